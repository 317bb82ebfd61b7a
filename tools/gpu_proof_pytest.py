"""pytest plugin used by tools/gpu_proof.py (``-p gpu_proof_pytest``, with tools/ on PYTHONPATH).

Streams one JSON line per event to the file named by ``GPU_PROOF_JSONL`` (flushed at once, so a
run killed at its deadline or crashed by the GPU still leaves every finished test on record):

    {"event": "start",  "nodeid", "family", "impl", "device"}            before each test
    {"event": "result", "nodeid", "family", "impl", "device", "outcome", "duration", "message"}
    {"event": "sticky", "nodeid", "message"}     a failure that leaves the CUDA context unusable
    {"event": "collection", "count": n}          the number of tests selected (after deselection)
    {"event": "collected", "nodeid", "family", "impl", "device"}         with GPU_PROOF_COLLECT=1

``impl`` is the value of the test's ``impl`` parameter (None when it has none: the op's default,
``impl="auto"``); ``outcome``: passed, failed, error (setup/teardown), skipped, xfailed, xpassed.

``GPU_PROOF_DESELECT``: a file of node ids (one a line) to leave out (tests that already ran
before a restart). ``GPU_PROOF_MARKERS=1`` writes ``@@gpu-proof start|end <impl> <nodeid>`` lines
straight to stdout (fd 1) around each test, so compute-sanitizer reports printed in between can
be attributed to the test that was running. After a sticky CUDA error (illegal address, device-
side assert, launch failure, ...) the session stops; gpu_proof.py restarts it without the tests
already done.
"""
from __future__ import annotations

import json
import os
import time

import pytest

STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure",
          "misaligned address", "illegal instruction", "cudaErrorIllegalAddress",
          "cudaErrorLaunchFailure", "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED",
          "hardware stack error", "uncorrectable ECC", "an illegal instruction was encountered",
          "CUDA error: unknown error")

_out = None
_reports: dict = {}
_started: dict = {}


def _emit(rec: dict) -> None:
    if _out is not None:
        _out.write(json.dumps(rec) + "\n")
        _out.flush()


def _family(nodeid: str) -> str:
    parts = nodeid.split("::", 1)[0].split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else parts[0]


def _params(item) -> dict:
    cs = getattr(item, "callspec", None)
    return dict(cs.params) if cs is not None else {}


def _describe(item) -> dict:
    """The record of a test: its family, its impl (the ``impl`` parameter, else the module's
    ``GPU_PROOF_IMPL``: a file whose tests all run one variant, e.g. the ``impl="tuned"`` kernels'
    own tests, says so there, so its failures count against that variant, not "auto") and device."""
    p = _params(item)
    impl = p.get("impl")
    if not isinstance(impl, str):
        impl = getattr(getattr(item, "module", None), "GPU_PROOF_IMPL", None)
    device = p.get("device")
    return {"nodeid": item.nodeid, "family": _family(item.nodeid),
            "impl": impl if isinstance(impl, str) else None,
            "device": device if isinstance(device, str) else None}


def _marker(text: str) -> None:
    if os.environ.get("GPU_PROOF_MARKERS") == "1":
        try:
            os.write(1, f"\n@@gpu-proof {text}\n".encode())
        except OSError:
            pass


def pytest_configure(config):
    global _out
    path = os.environ.get("GPU_PROOF_JSONL")
    if path:
        _out = open(path, "a", buffering=1)


def pytest_unconfigure(config):
    global _out
    if _out is not None:
        _out.close()
        _out = None


def pytest_collection_modifyitems(session, config, items):
    path = os.environ.get("GPU_PROOF_DESELECT")
    if path and os.path.exists(path):
        with open(path) as f:
            done = {line.strip() for line in f if line.strip()}
        keep = [it for it in items if it.nodeid not in done]
        gone = [it for it in items if it.nodeid in done]
        if gone:
            config.hook.pytest_deselected(items=gone)
            items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    # remember the item's description for the result record (logreport has no item)
    _reports.setdefault(item.nodeid, {"desc": _describe(item), "phases": []})


def pytest_collection_finish(session):
    _emit({"event": "collection", "count": len(session.items)})
    if os.environ.get("GPU_PROOF_COLLECT") == "1":     # the final selection (after -k, deselect)
        for it in session.items:
            _emit(dict(_describe(it), event="collected"))


def pytest_runtest_protocol(item, nextitem):
    desc = _describe(item)
    _started[item.nodeid] = time.time()
    _emit(dict(desc, event="start"))
    _marker(f"start {desc['impl'] or '-'} {item.nodeid}")
    return None


def pytest_runtest_logreport(report):
    entry = _reports.setdefault(report.nodeid, {"desc": None, "phases": []})
    entry["phases"].append(report)


def _message(rep) -> str:
    text = getattr(rep, "longreprtext", "") or ""
    if rep.skipped and isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        text = str(rep.longrepr[2])
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # the "E   ..." lines say what went wrong; fall back to the last line
    errs = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
    msg = errs[0] if errs else (lines[-1] if lines else "")
    return msg[:300]


def pytest_runtest_logfinish(nodeid, location):
    entry = _reports.pop(nodeid, {"desc": None, "phases": []})
    desc = entry["desc"] or {"nodeid": nodeid, "family": _family(nodeid), "impl": None,
                             "device": None}
    outcome, message, duration = "passed", "", 0.0
    for rep in entry["phases"]:
        duration += getattr(rep, "duration", 0.0) or 0.0
        xfail = hasattr(rep, "wasxfail")
        if rep.when == "call":
            if xfail:
                outcome = "xfailed" if rep.skipped else "xpassed"
            elif rep.failed:
                outcome, message = "failed", _message(rep)
            elif rep.skipped:
                outcome, message = "skipped", _message(rep)
        elif rep.failed:                       # setup / teardown
            outcome, message = "error", _message(rep)
        elif rep.skipped and rep.when == "setup":
            outcome, message = ("xfailed" if xfail else "skipped"), _message(rep)
    _emit(dict(desc, event="result", outcome=outcome, duration=round(duration, 4),
               message=message))
    _marker(f"end {desc['impl'] or '-'} {nodeid}")
    _started.pop(nodeid, None)
    if outcome in ("failed", "error"):
        text = "\n".join(getattr(r, "longreprtext", "") or "" for r in entry["phases"])
        hit = next((s for s in STICKY if s.lower() in text.lower()), None)
        if hit is not None:
            _emit({"event": "sticky", "nodeid": nodeid, "message": hit})
            _session_stop(f"gpu-proof: sticky CUDA error in {nodeid} ({hit}); restarting")


_session = None


def pytest_sessionstart(session):
    global _session
    _session = session


def _session_stop(reason: str) -> None:
    if _session is not None:
        _session.shouldstop = reason
