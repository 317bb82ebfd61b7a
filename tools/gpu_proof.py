#!/usr/bin/env python3
"""`make gpu-proof`: prove the CUDA build on a bare GPU machine in one run (standard library only).

    python3 tools/gpu_proof.py [--results DIR] [--budget S] [--dry-run] [--python PY] ...

One run, at most ``--budget`` seconds (default 540), on a machine that has a CUDA torch, nvcc and
no internet (the lent kind: one H200, /opt/torch/.venv/bin/python3 with torch 2.11.0+cu130):

  probe       the GPU (nvidia-smi / torch), its arch (sm_90 -> "90a"), nvcc, compute-sanitizer
  wheels      installs the wheels carried in .whl/ that the machine lacks into a --target folder
              (/tmp/site, put on PYTHONPATH): nvidia-cutlass==4.2.0.0 (needed), pytest-timeout,
              setuptools/wheel, Liger-Kernel, Cut Cross-Entropy when carried
  build       TOKENKERNELS_CUDA=ON TOKENKERNELS_CUDA_ARCHS=<its arch> MAX_JOBS=<nproc>
              pip install -e . --no-build-isolation --no-deps, then checks tokenkernels.cuda_available()
  smoke       a few CUDA tests per family and impl variant (SMOKE below), one pytest per family
  sanitizers  compute-sanitizer memcheck, racecheck, synccheck on a smaller subset (SANITIZE)
  peak        the device's measured peak: a bf16 8192^3 torch matmul and a device-to-device copy
  bench       python -m tokenkernels.bench --device cuda --family F (quick) for every family
  tests       the rest of `pytest tests/<family> -k cuda`, one pytest per family, with every
              second left

Every stage gets a slice of the budget and is stopped at its end (SIGINT, SIGTERM, SIGKILL to its
process group); a stage that finishes early leaves its time to the last one; the summary is
always printed last. Results (``--results``, else $GPU_PROOF_RESULTS, else $OUT, else
build/gpu-proof) -- at most 8 files, one folder, names [A-Za-z0-9._-]:

  summary.txt   the summary table printed last       summary.json  everything, machine-readable
  proven.json   {"kcenter": {"auto": "pass", "plain": "pass", ...}, ...} per family and impl
  bench_cuda.csv every benchmark row                 gpu-proof.log  this run's console output
  logs.tar.gz   every stage's full log, the pytest JSON lines, junit XML, per-family CSVs

proven.json, per family and ``impl`` value (tests without an ``impl`` parameter count for
"auto", the ops' default): "pass" -- its CUDA tests passed, none failed, the family's whole CUDA
suite ran, no sanitizer error attributed to it; "partial" -- passed so far, but the family's run
did not complete (deadline); "fail" -- a test failed, crashed the process, or a sanitizer error
was reported while one of its tests ran; "untested" -- none of its tests ran.

``--dry-run`` runs everything that needs no GPU: argument parsing, the wheel check, the build
plan (the exact commands), the stage schedule, a collection check of the test selections (when
this interpreter can import torch and pytest; ``--no-collect`` skips it) and the summary printer
on the recorded samples in tools/gpu_proof_samples/. Exit status: 0 all proven, 1 something
failed, 2 the run could not start (no CUDA torch, no GPU, bad arguments).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple


def _load_env_tool():
    """tools/env.py (the environment behind make, also standard library only): its package-name
    and version helpers are shared, not copied."""
    import importlib.util

    name = "tokenkernels_env_tool"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "env.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_ENV = _load_env_tool()
norm = _ENV.norm        # PEP 503 package-name normalisation
_vt = _ENV._vt          # release-number tuple of a version string

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
SAMPLES = TOOLS / "gpu_proof_samples"

FAMILIES = ["kcenter", "cross_entropy", "kv_select", "tree"]
BENCH_FAMILIES = ["kcenter", "cross_entropy", "kv_select", "tree", "integrations"]
# share of the bench stage per family (the quick CUDA runs; cross_entropy also measures memory)
BENCH_WEIGHTS = {"kcenter": 20, "cross_entropy": 30, "kv_select": 15, "tree": 15, "integrations": 20}
# share of a test stage per family (about their CUDA test counts: 1059, 649, 966, 977)
TEST_WEIGHTS = {"kcenter": 29, "cross_entropy": 18, "kv_select": 26, "tree": 27}
DEFAULT_IMPLS = {"kcenter": ["auto", "plain", "simt", "tuned", "stream"],
                 "cross_entropy": ["auto", "plain", "wmma", "tuned"],
                 "kv_select": ["auto", "plain", "simt", "tuned"], "tree": ["auto", "plain", "simt", "tuned"]}

# The fast subset: per family, every impl variant once (tests with an ``impl`` parameter) plus a
# test of the default path ("auto"). Checked against the collected tests by --dry-run.
SMOKE: Dict[str, List[str]] = {
    "kcenter": [
        "tests/kcenter/test_kcenter.py::test_impl_variants[cuda-isolated-cosine-auto]",
        "tests/kcenter/test_kcenter.py::test_impl_variants[cuda-isolated-cosine-plain]",
        "tests/kcenter/test_kcenter.py::test_impl_variants[cuda-isolated-cosine-tuned]",
        "tests/kcenter/test_kcenter.py::test_impl_variants[cuda-isolated-cosine-stream]",
        "tests/kcenter/test_kcenter.py::test_impl_variants[cuda-first-l2-plain]",
        "tests/kcenter/test_kcenter.py::test_impl_variants[cuda-first-l2-tuned]",
        "tests/kcenter/test_kcenter.py::test_impl_variants[cuda-first-l2-stream]",
        "tests/kcenter/test_coverage.py::test_coverage_vs_reference_grid[cuda-torch.float32-M40-N129-dense-auto]",
        "tests/kcenter/test_kcenter.py::test_impl_variants[cuda-isolated-cosine-simt]",
        "tests/kcenter/test_kcenter.py::test_impl_variants[cuda-first-l2-simt]",
        # the tuned kernels' own tests (the impl-parametrised ones above run fp32: its fallback)
        "tests/kcenter/test_tuned_cuda.py::test_tuned_sizes[isolated-cosine-1000-bf16]",
        "tests/kcenter/test_tuned_cuda.py::test_tuned_issue_shape[8-bf16]",
    ],
    "cross_entropy": [
        "tests/cross_entropy/test_impls.py::test_impl_vs_reference[cuda-mean-torch.bfloat16-auto]",
        "tests/cross_entropy/test_impls.py::test_impl_vs_reference[cuda-mean-torch.bfloat16-plain]",
        "tests/cross_entropy/test_impls.py::test_impl_vs_reference[cuda-mean-torch.bfloat16-tuned]",
        "tests/cross_entropy/test_impls.py::test_impl_vs_reference[cuda-none-torch.float32-plain]",
        "tests/cross_entropy/test_impls.py::test_impl_vs_reference[cuda-none-torch.float16-tuned]",
        "tests/cross_entropy/test_impls.py::test_impl_vs_reference[cuda-mean-torch.bfloat16-wmma]",
        "tests/cross_entropy/test_tuned_forward_cuda.py::test_tuned_forward_vs_truth[N7-D40-V256-torch.bfloat16]",
        "tests/cross_entropy/test_tuned_backward_cuda.py::test_tuned_backward_options[plain-torch.bfloat16-mean]",
    ],
    "kv_select": [
        "tests/kv_select/test_kv_select.py::test_decode_impls_agree[cuda-plain]",
        "tests/kv_select/test_kv_select.py::test_decode_impls_agree[cuda-tuned]",
        "tests/kv_select/test_kv_select.py::test_score_impls_agree[cuda-bf16-D128-plain]",
        "tests/kv_select/test_kv_select.py::test_score_impls_agree[cuda-bf16-D128-tuned]",
        "tests/kv_select/test_cache.py::test_threshold_decides_hits[cuda]",
        "tests/kv_select/test_kv_select.py::test_decode_impls_agree[cuda-simt]",
        "tests/kv_select/test_kv_select.py::test_score_impls_agree[cuda-bf16-D128-simt]",
        "tests/kv_select/test_topk_tuned.py::test_tuned_out_and_select[cuda]",
        "tests/kv_select/test_score_tuned.py::test_tuned_llama_131072[cuda-B3-paged16]",
        "tests/kv_select/test_sparse_tuned.py::test_decode_tuned_batch_and_strided[cuda-64-dtype1]",
        "tests/kv_select/test_sparse_tuned.py::test_prefill_tuned_out_int64_noncontiguous[cuda-dtype0]",
    ],
    "tree": [
        "tests/tree/test_build.py::test_build_impls[cuda-plain]",
        "tests/tree/test_build.py::test_build_impls[cuda-tuned]",
        "tests/tree/test_attention.py::test_attention_impls[cuda-dtype0-plain]",
        "tests/tree/test_attention.py::test_attention_impls[cuda-dtype0-tuned]",
        "tests/tree/test_attention.py::test_attention_medusa_tree_vs_sdpa[cuda]",
        "tests/tree/test_rsd.py::test_rsd_vs_reference[cuda-129-top_k_exhausted-fp32-auto]",
        "tests/spec/test_generate.py::test_greedy_equals_hf[cuda-0-dynamic]",
        "tests/spec/test_generate.py::test_left_padded_batch[cuda-dynamic]",
        "tests/tree/test_build.py::test_build_impls[cuda-simt]",
        "tests/tree/test_attention.py::test_attention_impls[cuda-dtype0-simt]",
        "tests/tree/test_attention_tuned.py::test_attention_tuned_llama_heads_long_prefix[cuda-dtype1]",
    ],
}
# the test folders of a family (tests/spec: the speculative decoding loop over the tree ops)
TEST_DIRS: Dict[str, List[str]] = {"tree": ["tests/tree", "tests/spec"]}
# Under compute-sanitizer (10-100x slower): one test per variant and family.
SANITIZE: Dict[str, List[str]] = {
    "kcenter": SMOKE["kcenter"][:4] + SMOKE["kcenter"][7:10],
    "cross_entropy": SMOKE["cross_entropy"][:3] + SMOKE["cross_entropy"][5:8],
    "kv_select": SMOKE["kv_select"][:5] + SMOKE["kv_select"][5:6] + SMOKE["kv_select"][7:8] + SMOKE["kv_select"][9:11],
    "tree": SMOKE["tree"][:5] + SMOKE["tree"][8:11],
}
# (tool, share of the stage, only tokenkernels' kernels): memcheck checks every kernel (torch's
# too, with the caching allocator off, so out-of-bounds accesses hit real allocation ends);
# racecheck and synccheck only ours (--kernel-name kernel_substring=tokenkernels: cuBLAS under
# racecheck would eat the slice).
SANITIZERS = [("memcheck", 0.45, False), ("racecheck", 0.33, True), ("synccheck", 0.22, True)]

# Wheels the GPU machine may lack (it has torch, pytest, hypothesis, numpy, transformers, ...).
REQUIRED_WHEELS = {"nvidia-cutlass": "4.2.0.0"}           # the CUTLASS/CuTe headers (cuda.txt)
# pinned so a carried folder is reproducible (setuptools, wheel: the lock's); installed only where
# the machine lacks them (pytest-timeout: per-test timeouts; Liger, CCE: bench peers on CUDA)
OPTIONAL_WHEELS = ["pytest-timeout==2.4.0", "setuptools==84.2.1", "wheel==0.48.0", "liger-kernel==0.8.5",
                   "cut-cross-entropy==25.1.1"]
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
SITE_DEFAULT = "/tmp/site"
GPU_PYTHONS = ["/opt/torch/.venv/bin/python3"]


def download_command(dest: str = ".whl", python: str = "python3") -> List[str]:
    """The pip download run here, before the GPU session (the GPU machine has no internet)."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp"]
    for p in WHEEL_PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["-d", dest] + [f"{n}=={v}" for n, v in REQUIRED_WHEELS.items()] + OPTIONAL_WHEELS
    return cmd


# ============================================================================ small helpers
def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s >= 9.5 else f"{s:.1f} s"


def quote(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def env_line(env: Dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


class Console:
    """Everything printed also goes to a transcript (gpu-proof.log in the results)."""

    def __init__(self):
        self.lines: List[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.extend(text.split("\n"))


# ============================================================================ the schedule
class StagePlan:
    def __init__(self, name: str, planned: float, floor: float = 10.0, cap: Optional[float] = None,
                 elastic: bool = False, what: str = ""):
        self.name, self.planned, self.floor, self.cap, self.elastic = name, planned, floor, cap, elastic
        self.what = what


# planned seconds for the default budget of 540 s (15 s kept for the summary); other budgets scale
BASE_BUDGET = 540.0
RESERVE = 15.0
BASE_PLANS = [
    StagePlan("probe", 20, 5, what="GPU, arch, nvcc, compute-sanitizer, interpreter"),
    StagePlan("wheels", 25, 5, what="carried wheels the machine lacks -> --target site"),
    StagePlan("build", 150, 30, cap=300, what="pip install -e . for the machine's arch (may borrow up to its cap)"),
    StagePlan("smoke", 60, 20, what="one pytest per family: every impl variant once"),
    StagePlan("sanitizers", 90, 20, what="memcheck 45% / racecheck 33% / synccheck 22%"),
    StagePlan("peak", 20, 8, what="bf16 8192^3 matmul + device-to-device copy"),
    StagePlan("bench", 100, 20, what="tokenkernels.bench --device cuda per family (quick)"),
    StagePlan("tests", 60, 15, elastic=True, what="the rest of pytest tests/<family> -k cuda"),
]


def scaled_plans(budget: float) -> List[StagePlan]:
    f = max(0.05, (budget - RESERVE) / (BASE_BUDGET - RESERVE))
    return [StagePlan(p.name, max(p.floor, p.planned * f), p.floor,
                      None if p.cap is None else max(p.floor, p.cap * f), p.elastic, p.what)
            for p in BASE_PLANS]


class Schedule:
    """Time slices of one run. A stage gets its planned seconds while the run is on time; the
    build may borrow up to its cap (keeping the later stages' floors); when behind, the remaining
    stages are squeezed in proportion to their plans; the elastic (last) stage gets every second
    left. A slice under the stage's floor means: skip it. ``reserve`` seconds stay for the summary."""

    def __init__(self, plans: Sequence[StagePlan], budget: float, reserve: float = RESERVE,
                 clock: Callable[[], float] = time.monotonic):
        self.plans = list(plans)
        self.budget, self.reserve, self.clock = float(budget), float(reserve), clock
        self.started = clock()
        self.end = self.started + self.budget

    def plan(self, name: str) -> StagePlan:
        return next(p for p in self.plans if p.name == name)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        """Seconds left for stages (the reserve excluded)."""
        return self.end - self.reserve - self.clock()

    def slice(self, name: str) -> float:
        i = next(k for k, p in enumerate(self.plans) if p.name == name)
        p, later = self.plans[i], self.plans[i + 1:]
        avail = self.left()
        floors = sum(q.floor for q in later)
        if p.elastic:
            s = avail - floors
        elif p.cap is not None:
            s = min(p.cap, avail - floors)
        else:
            need = p.planned + sum(q.planned for q in later)
            s = p.planned if avail >= need else max(p.floor, p.planned * avail / need)
            s = min(s, avail - floors) if avail - floors >= p.floor else min(s, avail)
        return max(0.0, min(s, avail))


def sub_slices(total: float, weights: Dict[str, float], done: Iterable[str] = ()) -> Dict[str, float]:
    """Split ``total`` seconds over the keys not yet done, in proportion to their weights."""
    rest = {k: w for k, w in weights.items() if k not in set(done)}
    s = sum(rest.values()) or 1.0
    return {k: total * w / s for k, w in rest.items()}


# ============================================================================ processes
class ProcResult:
    def __init__(self, rc: Optional[int], elapsed: float, stopped: bool, note: str = ""):
        self.rc, self.elapsed, self.stopped, self.note = rc, elapsed, stopped, note

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.stopped

    def to_json(self) -> dict:
        return {"rc": self.rc, "elapsed": round(self.elapsed, 2), "stopped": self.stopped,
                "note": self.note}


def stop_times(limit: float) -> Tuple[float, float]:
    """(SIGINT at, SIGTERM at) seconds after the start for a slice of ``limit`` s; SIGKILL at
    ``limit``. pytest writes its summary on SIGINT; compute-sanitizer prints its own."""
    grace_int = min(8.0, 0.2 * limit)
    grace_term = min(3.0, 0.08 * limit)
    return limit - grace_int, limit - grace_term


def run_proc(cmd: Sequence[str], log: Path, limit: float, env: Optional[Dict[str, str]] = None,
             cwd: Path = ROOT) -> ProcResult:
    """Run ``cmd`` in its own process group, stdout+stderr appended to ``log``; stop it when
    ``limit`` seconds are used up (SIGINT, SIGTERM, SIGKILL to the group, see stop_times)."""
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n$ {quote(cmd)}\n[gpu-proof: slice {limit:.0f} s]\n".encode())
        f.flush()
        try:
            p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=str(cwd), env=env,
                                 start_new_session=True)
        except OSError as e:
            f.write(f"[gpu-proof: could not start: {e}]\n".encode())
            return ProcResult(None, time.monotonic() - start, False, f"could not start: {e}")
        t_int, t_term = stop_times(limit)
        phase = 0
        rc = None
        try:
            while True:
                try:
                    rc = p.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    t = time.monotonic() - start
                    sig = None
                    if phase == 0 and t >= t_int:
                        sig, phase = signal.SIGINT, 1
                    elif phase == 1 and t >= t_term:
                        sig, phase = signal.SIGTERM, 2
                    elif phase == 2 and t >= limit:
                        sig, phase = signal.SIGKILL, 3
                    if sig is not None:
                        _killpg(p.pid, sig)
        finally:                               # also when we are terminated ourselves
            _killpg(p.pid, signal.SIGKILL)     # leftovers of the group (children of the child)
            if rc is None:
                try:
                    rc = p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        elapsed = time.monotonic() - start
        note = ["", "stopped at its deadline (SIGINT)", "stopped at its deadline (SIGTERM)",
                "killed at its deadline (SIGKILL)"][phase]
        if rc is not None and rc < 0 and phase == 0:
            note = f"died of signal {-rc}"
        f.write(f"\n[gpu-proof: exit {rc} after {elapsed:.1f} s{'; ' + note if note else ''}]\n".encode())
    return ProcResult(rc, elapsed, phase > 0, note)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def capture(cmd: Sequence[str], timeout: float = 30.0, env: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
    """A short command's (rc, stdout+stderr); rc 127 when it cannot run."""
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                           env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL)
        return r.returncode, (r.stdout or "") + (r.stderr or "")
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)


# ============================================================================ parsers
RESULT_OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "crashed", "interrupted")
FAILING = ("failed", "error", "crashed")


def family_of(nodeid: str) -> str:
    parts = nodeid.split("::", 1)[0].split("/")
    fam = parts[1] if len(parts) > 2 and parts[0] == "tests" else parts[0]
    for owner, dirs in TEST_DIRS.items():       # tests/spec counts for the tree family
        if f"tests/{fam}" in dirs:
            return owner
    return fam


def parse_jsonl(text: str) -> dict:
    """The plugin's JSON lines -> {"results": {nodeid: rec}, "started": [start recs in order],
    "unfinished": start rec|None (started, no result: the test running when the process ended),
    "sticky": [recs], "collected": [recs], "count": tests selected (None: not known)}. Malformed lines (a write cut by a kill) are skipped."""
    results: Dict[str, dict] = {}
    started: List[dict] = []
    sticky: List[dict] = []
    collected: List[dict] = []
    count: Optional[int] = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ev = rec.get("event")
        if ev == "start":
            started.append(rec)
        elif ev == "result":
            results[rec["nodeid"]] = rec
        elif ev == "sticky":
            sticky.append(rec)
        elif ev == "collected":
            collected.append(rec)
        elif ev == "collection":
            count = rec.get("count")
    unfinished = next((r for r in reversed(started) if r["nodeid"] not in results), None)
    return {"results": results, "started": started, "unfinished": unfinished, "sticky": sticky,
            "collected": collected, "count": count}


_RA = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS)\s+(\S+::\S+?)(?:\s+-\s+(.*))?\s*$")
_VERBOSE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_FINAL = re.compile(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)"
                    r"(?:, \d+ \w+)*) in [\d.]+s\b")
_WORD = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
         "XFAIL": "xfailed", "XPASS": "xpassed"}


def impl_from_id(nodeid: str, impls: Sequence[str]) -> Optional[str]:
    """The impl of a node id by its parameter id (only for test functions named *impl*: other
    tests use words like "plain" for other parameters). The fallback when no JSON lines exist."""
    m = re.match(r".*::([^\[]+)\[(.*)\]$", nodeid)
    if not m or "impl" not in m.group(1):
        return None
    toks = m.group(2).split("-")
    return next((t for t in reversed(toks) if t in impls), None)


def parse_pytest_text(text: str, impls: Sequence[str] = ("auto", "plain", "simt", "wmma", "tuned", "stream")) -> dict:
    """A pytest log (``-rA`` short summary and/or ``-v`` lines) -> {"results": {nodeid: rec},
    "counts": {outcome: n} (from the final "== ... in 1.2s ==" line when present)}."""
    results: Dict[str, dict] = {}
    counts: Dict[str, int] = {}
    for line in text.splitlines():
        line = line.rstrip()
        m = _RA.match(line)
        if m:
            word, nodeid, msg = m.group(1), m.group(2), (m.group(3) or "")
        else:
            m = _VERBOSE.match(line)
            if not m:
                f = _FINAL.match(line)
                if f:
                    for part in f.group(1).split(","):
                        mm = re.match(r"\s*(\d+) (\w+)", part)
                        if mm:
                            w = {"errors": "error", "deselected": "deselected"}.get(mm.group(2), mm.group(2))
                            counts[w] = int(mm.group(1))
                continue
            nodeid, word, msg = m.group(1), m.group(2), ""
        prev = results.get(nodeid)
        rec = {"event": "result", "nodeid": nodeid, "family": family_of(nodeid),
               "impl": impl_from_id(nodeid, impls), "device": None, "outcome": _WORD[word],
               "duration": None, "message": msg[:300]}
        if prev is None or (msg and not prev.get("message")):
            results[nodeid] = rec
    return {"results": results, "counts": counts}


_SUMMARY_ERR = re.compile(r"ERROR SUMMARY:\s*(\d+) errors?")
_SUMMARY_RACE = re.compile(r"RACECHECK SUMMARY:\s*(\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_MARK = re.compile(r"^@@gpu-proof (start|end) (\S+) (\S+)\s*$")
_NOT_RECORD = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY",
               "Target application returned", "Saved host backtrace", "Host Frame",
               "Device Frame", "This can happen", "No CUDA", "Internal Sanitizer", "Tool")


def parse_sanitizer(text: str, tool: str = "", only_ours: bool = False) -> dict:
    """compute-sanitizer output (with the plugin's @@gpu-proof markers) -> counts and records.

    Returns {"tool", "summary": bool (its SUMMARY line was printed: the run finished),
    "errors", "warnings" (from the SUMMARY line; racecheck: its errors/warnings), "records":
    [{"kind": "kernel"|"api", "header", "where", "nodeid", "impl", "family"}], "kernel_errors",
    "api_errors", "ours": kernel errors in tokenkernels' kernels (all of them when the run was
    limited to ours, ``only_ours``; else those naming tokenkernels or csrc/), "tests": [node ids
    run, in order], "test_impls": {nodeid: impl}}. A record is attributed to the test whose start
    marker came last before it (the one running when the tool reported)."""
    summary = False
    errors = warnings = 0
    records: List[dict] = []
    tests: List[str] = []
    test_impls: Dict[str, Optional[str]] = {}
    current: Optional[Tuple[str, str]] = None       # (impl, nodeid)
    rec: Optional[dict] = None
    for raw in text.splitlines():
        line = raw.rstrip()
        m = _MARK.match(line.strip())
        if m:
            if m.group(1) == "start":
                current = (m.group(2), m.group(3))
                tests.append(m.group(3))
                test_impls[m.group(3)] = None if m.group(2) == "-" else m.group(2)
            rec = None
            continue
        s = _SUMMARY_RACE.search(line)
        if s:
            summary = True
            errors, warnings = int(s.group(2)), int(s.group(3))
            rec = None
            continue
        s = _SUMMARY_ERR.search(line)
        if s:
            summary = True
            errors = int(s.group(1))
            rec = None
            continue
        if not line.startswith("=========") or line.startswith("=" * 10) or (
                len(line) > 9 and line.endswith("=")):
            continue                  # not the tool's prefix: pytest's "=== ... ===" lines
        body = line[len("========="):]
        if not body.strip():
            rec = None
            continue
        indented = body.startswith("  ")     # "=========     at ..." continues a record
        body = body.strip()
        if not indented:
            if body.startswith(_NOT_RECORD):
                rec = None
                continue
            kind = "api" if body.startswith("Program hit") else "kernel"
            impl, nodeid = current if current else ("-", "")
            rec = {"kind": kind, "header": body[:200], "where": "", "nodeid": nodeid,
                   "impl": None if impl == "-" else impl, "family": family_of(nodeid) if nodeid else ""}
            records.append(rec)
        elif rec is not None:
            if not rec["where"] and (body.startswith("at ") or body.startswith("and ")):
                rec["where"] = body[:200]
            if "tokenkernels" in body or "csrc/" in body:
                rec["ours"] = True
    for r in records:
        r["ours"] = r["kind"] == "kernel" and (only_ours or bool(r.get("ours"))
                                               or "tokenkernels" in r["header"] or "csrc/" in r["header"])
    kernel = sum(1 for r in records if r["kind"] == "kernel")
    api = sum(1 for r in records if r["kind"] == "api")
    ours = sum(1 for r in records if r["ours"])
    return {"tool": tool, "summary": summary, "errors": errors, "warnings": warnings, "records": records,
            "kernel_errors": kernel, "api_errors": api, "ours": ours, "tests": tests,
            "test_impls": test_impls}


BENCH_COLUMNS = ["family", "case", "impl", "device", "median_ms", "repeats", "rate", "rate_unit"]


def parse_bench_csv(text: str) -> List[dict]:
    """tokenkernels.bench --csv rows -> dicts (median_ms, rate as floats, None when empty)."""
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        if not r.get("family"):
            continue
        out = dict(r)
        for k in ("median_ms", "rate"):
            try:
                out[k] = float(r.get(k) or "nan")
            except ValueError:
                out[k] = float("nan")
            if out[k] != out[k]:
                out[k] = None
        rows.append(out)
    return rows


_PROGRESS = re.compile(r"^\[\d+(?:/\d+)?\] (.+?): (.+?)  \(")
_PART = re.compile(r"^(.+?)(?: \((.+)\))? ([\d.]+|-) ms$")


def parse_bench_progress(text: str, family: str) -> List[dict]:
    """The bench's stderr progress lines (``[i/n] case: impl 1.23 ms, impl (fwd) 0.5 ms  (..)``)
    -> rows with median_ms only: what is left of a family cut at its deadline (no CSV yet)."""
    rows = []
    for line in text.splitlines():
        m = _PROGRESS.match(line.strip())
        if not m:
            continue
        case = m.group(1)
        for part in m.group(2).split(", "):
            pm = _PART.match(part.strip())
            if not pm:
                continue
            impl, sub, ms = pm.group(1), pm.group(2), pm.group(3)
            rows.append({"family": family, "case": case + (f" {sub}" if sub else ""), "impl": impl,
                         "device": "cuda", "median_ms": None if ms == "-" else float(ms), "rate": None,
                         "rate_unit": "", "repeats": ""})
    return rows


# ============================================================================ wheels
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<ver>[^-]+)(?:-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def parse_wheel(filename: str) -> Optional[dict]:
    m = _WHEEL.match(os.path.basename(filename))
    if not m:
        return None
    d = m.groupdict()
    d["dist"] = norm(d["name"])
    d["file"] = os.path.basename(filename)
    return d


def wheel_ok(w: dict, py_tag: str = "cp312", glibc: Tuple[int, int] = (2, 28), machine: str = "x86_64") -> Tuple[bool, str]:
    """Can the target interpreter (CPython ``py_tag``, Linux ``machine``, ``glibc``) install it?"""
    major_minor = py_tag[2:]
    pys = set(w["py"].split("."))
    abis = set(w["abi"].split("."))
    plats = w["plat"].split(".")
    py_ok = bool(pys & {"py3", f"py{major_minor}", py_tag, "py2.py3"}) or any(
        p.startswith("cp3") and "abi3" in abis and int(p[3:] or 0) <= int(major_minor[1:]) for p in pys)
    abi_ok = bool(abis & {"none", "abi3", py_tag})
    if not py_ok or not abi_ok:
        return False, f"needs {w['py']}-{w['abi']}, the target is {py_tag}"
    for p in plats:
        if p == "any" or p == f"linux_{machine}":
            return True, ""
        m = re.match(r"manylinux_(\d+)_(\d+)_(\w+)$", p)
        if m and m.group(3) == machine and (int(m.group(1)), int(m.group(2))) <= glibc:
            return True, ""
        legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
        for k, v in legacy.items():
            if p == f"{k}_{machine}" and v <= glibc:
                return True, ""
    return False, f"platform {w['plat']} does not fit linux {machine} glibc {glibc[0]}.{glibc[1]}"


def plan_wheels(wheel_dir: Path, installed: Dict[str, str], py_tag: str, glibc: Tuple[int, int]) -> dict:
    """What to install from ``wheel_dir``: {"install": [files], "skip": [(file, why)],
    "missing": [requirement not installed and not carried], "present": {dist: version}}."""
    files = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    best: Dict[str, dict] = {}
    skip: List[Tuple[str, str]] = []
    for f in files:
        w = parse_wheel(f.name)
        if w is None:
            skip.append((f.name, "not a wheel file name"))
            continue
        ok, why = wheel_ok(w, py_tag, glibc)
        if not ok:
            skip.append((f.name, why))
            continue
        cur = best.get(w["dist"])
        if cur is None or _vt(w["ver"]) > _vt(cur["ver"]):
            if cur is not None:
                skip.append((cur["file"], f"older than {w['file']}"))
            best[w["dist"]] = w
        else:
            skip.append((f.name, f"older than {cur['file']}"))
    install: List[str] = []
    present: Dict[str, str] = {}
    for dist, w in sorted(best.items()):
        have = installed.get(dist)
        want = REQUIRED_WHEELS.get(dist)
        if want is not None and w["ver"] != want:
            skip.append((w["file"], f"{dist} must be {want}"))
            continue
        if have is not None and (want is None or have == want):
            present[dist] = have
            skip.append((w["file"], f"{dist} {have} already installed"))
            continue
        install.append(w["file"])
    missing = []
    for dist, want in REQUIRED_WHEELS.items():
        if installed.get(dist) != want and not any(parse_wheel(f)["dist"] == dist for f in install):
            missing.append(f"{dist}=={want}")
    return {"install": install, "skip": skip, "missing": missing, "present": present,
            "carried": [f.name for f in files]}


def unzip_wheels(files: Sequence[Path], site: Path) -> None:
    """Install wheels without pip (the fallback): unzip, then move <name>.data/{purelib,platlib}."""
    site.mkdir(parents=True, exist_ok=True)
    for f in files:
        with zipfile.ZipFile(f) as z:
            z.extractall(site)
    for data in site.glob("*.data"):
        for sub in ("purelib", "platlib"):
            d = data / sub
            if d.is_dir():
                for item in d.iterdir():
                    target = site / item.name
                    if target.exists():
                        shutil.rmtree(target) if target.is_dir() else target.unlink()
                    shutil.move(str(item), str(target))
        shutil.rmtree(data, ignore_errors=True)


# ============================================================================ interpreter
PROBE_PY = r"""
import importlib.util, json, os, platform, re, sys
out = {"executable": sys.executable, "version": "%d.%d.%d" % sys.version_info[:3],
       "tag": "cp%d%d" % sys.version_info[:2], "machine": platform.machine(),
       "glibc": platform.libc_ver()[1] or ""}
spec = importlib.util.find_spec("torch")
tv = cuda = None
if spec is not None and spec.submodule_search_locations:
    try:
        text = open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")).read()
        m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", text, re.M)
        tv = m.group(1) if m else None
        m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
        cuda = m.group(1) if m else None
    except OSError:
        pass
out["torch"], out["torch_cuda"] = tv, cuda
out["modules"] = {m: importlib.util.find_spec(m) is not None for m in
                  ("pytest", "pytest_timeout", "hypothesis", "transformers", "numpy", "matplotlib",
                   "cutlass_library", "setuptools", "wheel", "pip", "cmake", "ninja",
                   "liger_kernel", "cut_cross_entropy", "flashinfer")}
try:
    import importlib.metadata as md
    out["dists"] = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
                    for d in md.distributions() if d.metadata["Name"]}
except Exception:
    out["dists"] = {}
print(json.dumps(out))
"""


def probe_python(py: str) -> Optional[dict]:
    if not py or not (os.path.exists(py) or shutil.which(py)):
        return None
    rc, out = capture([py, "-c", PROBE_PY], timeout=20)
    if rc != 0:
        return None
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def choose_python(explicit: Optional[str], fallback: Optional[str]) -> Tuple[Optional[str], Optional[dict], List[str]]:
    """The interpreter for the build, tests and benchmarks: the first candidate holding a CUDA
    torch (--python, $GPU_PROOF_PYTHON, /opt/torch/.venv/bin/python3, python3 on PATH, this one);
    without one (a CPU machine: the dry run) the fallback (make's environment), else this one."""
    notes: List[str] = []
    cands: List[str] = []
    for c in [explicit, os.environ.get("GPU_PROOF_PYTHON")] + GPU_PYTHONS + [shutil.which("python3"), sys.executable]:
        if c and c not in cands:
            cands.append(c)
    first_probe: Optional[Tuple[str, dict]] = None
    for c in cands:
        info = probe_python(c)
        if info is None:
            notes.append(f"{c}: not usable")
            continue
        notes.append(f"{c}: Python {info['version']}, torch {info['torch'] or 'none'}"
                     + (f" (CUDA {info['torch_cuda']})" if info.get("torch_cuda") else " (no CUDA)"))
        if explicit and c == explicit:
            return c, info, notes
        if info.get("torch_cuda"):
            return c, info, notes
        if first_probe is None and info.get("torch"):
            first_probe = (c, info)
    if fallback:
        info = probe_python(fallback)
        if info is not None:
            notes.append(f"{fallback}: Python {info['version']}, torch {info['torch'] or 'none'} (make's environment)")
            return fallback, info, notes
    if first_probe:
        return first_probe[0], first_probe[1], notes
    info = probe_python(sys.executable)
    return sys.executable, info, notes


def find_tool(name: str, nvcc: Optional[str] = None) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    dirs = []
    if nvcc:
        dirs.append(Path(nvcc).parent)
    dirs += [Path("/usr/local/cuda/bin"), Path("/usr/local/cuda/compute-sanitizer")]
    dirs += sorted(Path("/usr/local").glob("cuda-*/bin"), reverse=True)
    dirs += sorted(Path("/usr/local").glob("cuda-*/compute-sanitizer"), reverse=True)
    for d in dirs:
        p = d / name
        if p.exists():
            return str(p)
    return None


def arch_for(cap: str) -> str:
    """Compute capability "9.0" -> the build's arch: "90a" (Hopper: the sm_90a features),
    "10.0" -> "100a"; others as they are ("8.0" -> "80")."""
    cap = cap.strip()
    m = re.match(r"(\d+)\.(\d+)", cap)
    if not m:
        raise ValueError(f"cannot read a compute capability from {cap!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    return f"{major}{minor}" + ("a" if (major, minor) in ((9, 0), (10, 0)) else "")


# ============================================================================ the run
def read_impls() -> Dict[str, List[str]]:
    """Each family's impl values: "auto" and the variants of ``CUDA_VARIANTS`` in python/tokenkernels/variants.py."""
    out = {}
    try:
        text = (ROOT / "python" / "tokenkernels" / "variants.py").read_text()
    except OSError:
        text = ""
    for fam in FAMILIES:
        m = re.search(r"^\s*['\"]" + fam + r"['\"]\s*:\s*\{([^}]*)\}", text, re.M)
        names = re.findall(r"['\"](\w+)['\"]\s*:", m.group(1)) if m else []
        out[fam] = ["auto"] + names if names else list(DEFAULT_IMPLS[fam])
    return out


def round_robin(groups: Dict[str, List[str]]) -> List[str]:
    """Interleave the families' lists (a run stopped early still covers every family)."""
    out: List[str] = []
    lists = [list(v) for v in groups.values()]
    for i in range(max((len(v) for v in lists), default=0)):
        out += [v[i] for v in lists if i < len(v)]
    return out


class Runner:
    def __init__(self, args: argparse.Namespace, console: Console):
        self.args = args
        self.say = console
        self.console = console
        self.work = Path(args.work).resolve()
        self.results = Path(args.results).resolve()
        self.site = Path(args.site)
        self.sched = Schedule(scaled_plans(args.budget), args.budget)
        self.report: dict = {"schema": 1, "dry_run": False, "budget": args.budget, "meta": {},
                             "stages": [], "tests": {}, "sanitizers": {}, "bench": {}, "peak": {},
                             "wheels": {}, "impls": read_impls()}
        self.py: Optional[str] = None
        self.pyinfo: dict = {}
        self.built = False
        self.gpu_ok = False
        self.has_timeout_plugin = False
        self.cwd = ROOT
        self.min_run = 8.0          # seconds a pytest (re)start needs at least

    # -------------------------------------------------------------- bookkeeping
    def stage(self, name: str, fn: Callable[[float], Tuple[str, str]], needs: Sequence[bool] = (),
              why: str = "") -> None:
        limit = self.sched.slice(name)
        plan = self.sched.plan(name)
        t0 = time.monotonic()
        if not all(needs):
            st, note = "skipped", why
        elif limit < plan.floor:
            st, note = "skipped", f"no time left ({limit:.0f} s < {plan.floor:.0f} s)"
        else:
            self.say(f"gpu-proof: [{self.sched.elapsed():5.0f} s] {name}: slice {limit:.0f} s")
            try:
                st, note = fn(limit)
            except Exception as e:      # noqa: BLE001  (a bug here must not lose the summary)
                st, note = "error", f"{type(e).__name__}: {e}"
        took = time.monotonic() - t0
        self.report["stages"].append({"name": name, "status": st, "elapsed": round(took, 1),
                                      "slice": round(limit, 1), "note": note})
        self.say(f"gpu-proof: [{self.sched.elapsed():5.0f} s] {name}: {st} in {took:.0f} s"
                 + (f" ({note})" if note else ""))

    def base_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        pybin = str(Path(self.py).parent) if self.py else ""
        nvcc = self.report["meta"].get("nvcc")
        extra = [p for p in (pybin, str(Path(nvcc).parent) if nvcc else "") if p]
        env["PATH"] = os.pathsep.join(extra + [env.get("PATH", "")])
        pp = [str(ROOT / "python"), str(TOOLS), str(self.site)]
        if env.get("PYTHONPATH"):
            pp.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pp)
        env["PYTHONUNBUFFERED"] = "1"
        env["PIP_NO_INDEX"] = "1"
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env["TOKENKERNELS_ENV"] = "system"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        return env

    # -------------------------------------------------------------- stages
    def do_probe(self, limit: float) -> Tuple[str, str]:
        meta = self.report["meta"]
        self.py, info, notes = choose_python(self.args.python, self.args.fallback_python)
        self.pyinfo = info or {}
        meta["python"] = self.py
        meta["python_candidates"] = notes
        meta["python_version"] = self.pyinfo.get("version")
        meta["torch"] = self.pyinfo.get("torch")
        meta["torch_cuda"] = self.pyinfo.get("torch_cuda")
        meta["nproc"] = os.cpu_count()
        nvcc = find_tool("nvcc")
        meta["nvcc"] = nvcc
        if nvcc:
            rc, out = capture([nvcc, "--version"])
            m = re.search(r"release ([\d.]+)", out)
            meta["nvcc_version"] = m.group(1) if m else None
        san = find_tool("compute-sanitizer", nvcc)
        meta["compute_sanitizer"] = san
        smi = find_tool("nvidia-smi")
        if smi:
            rc, out = capture([smi, "--query-gpu=name,compute_cap,memory.total,driver_version",
                               "--format=csv,noheader"])
            if rc == 0 and out.strip():
                f = [x.strip() for x in out.strip().splitlines()[0].split(",")]
                if len(f) >= 4:
                    meta.update(gpu=f[0], compute_cap=f[1], gpu_memory=f[2], driver=f[3])
        if not self.pyinfo.get("torch_cuda"):
            return "fail", f"no interpreter with a CUDA torch ({'; '.join(notes)})"
        code = ("import json, torch; ok = torch.cuda.is_available(); "
                "print(json.dumps({'available': ok, 'count': torch.cuda.device_count(), "
                "'name': torch.cuda.get_device_name(0) if ok else None, "
                "'cap': '%d.%d' % torch.cuda.get_device_capability(0) if ok else None, "
                "'cuda': torch.version.cuda}))")
        rc, out = capture([self.py, "-c", code], timeout=max(10.0, limit - 5))
        try:
            t = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return "fail", f"torch could not query the GPU: {out.strip()[-300:]}"
        if not t.get("available"):
            return "fail", "torch.cuda.is_available() is False"
        meta.setdefault("gpu", t["name"])
        meta.setdefault("compute_cap", t["cap"])
        meta["torch_cuda_runtime"] = t["cuda"]
        meta["arch"] = self.args.arch or arch_for(meta["compute_cap"])
        self.gpu_ok = True
        note = f"{meta['gpu']}, sm {meta['compute_cap']} -> arch {meta['arch']}, python {self.py}"
        if not nvcc:
            return "fail", note + "; no nvcc"
        if not san:
            note += "; no compute-sanitizer"
        return "ok", note

    def do_wheels(self, limit: float) -> Tuple[str, str]:
        wdir = Path(self.args.wheels)
        glibc = _vt(self.pyinfo.get("glibc") or "2.28")[:2] or (2, 28)
        plan = plan_wheels(wdir, self.pyinfo.get("dists", {}), self.pyinfo.get("tag", "cp312"), glibc)
        self.report["wheels"] = plan
        notes = []
        st = "ok"
        if plan["install"]:
            files = [wdir / f for f in plan["install"]]
            cmd = [self.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target",
                   str(self.site)] + [str(f) for f in files]
            r = run_proc(cmd, self.work / "wheels.log", limit, env=self.base_env())
            if not r.ok:
                try:
                    unzip_wheels(files, self.site)
                    notes.append(f"pip failed ({r.rc}); unzipped instead")
                except (OSError, zipfile.BadZipFile) as e:
                    return "fail", f"pip failed ({r.rc}) and unzip failed: {e}"
            notes.append("installed " + ", ".join(f"{parse_wheel(f)['dist']} {parse_wheel(f)['ver']}"
                                                 for f in plan["install"]))
        else:
            notes.append("nothing to install" + ("" if plan["carried"] else f" ({wdir} is empty)"))
        if plan["missing"]:
            st = "fail"
            notes.append("MISSING " + ", ".join(plan["missing"]) + " (carry it: make gpu-wheels)")
        info = probe_python_env(self.py, self.base_env())
        if info:
            self.pyinfo["modules"] = info.get("modules", self.pyinfo.get("modules", {}))
        self.has_timeout_plugin = bool(self.pyinfo.get("modules", {}).get("pytest_timeout"))
        return st, "; ".join(notes)

    def build_env(self) -> Dict[str, str]:
        env = self.base_env()
        env.update(TOKENKERNELS_CUDA="ON", TOKENKERNELS_CUDA_ARCHS=self.report["meta"].get("arch") or "90a",
                   MAX_JOBS=str(self.args.jobs or os.cpu_count() or 2), TOKENKERNELS_BENCH="0")
        nvcc = self.report["meta"].get("nvcc")
        if nvcc:
            env["CUDACXX"] = nvcc
            env.setdefault("CUDA_HOME", str(Path(nvcc).parent.parent))
        return env

    def build_cmds(self) -> List[List[str]]:
        py = self.py or "python3"
        return [[py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
                [py, "setup.py", "build_ext", "--inplace"]]

    VERIFY = ("import json, tokenkernels as tk; print(json.dumps({'cuda_available': tk.cuda_available(), "
              "'module': tk._C.__file__}))")

    def do_build(self, limit: float) -> Tuple[str, str]:
        env = self.build_env()
        t0 = time.monotonic()
        log = self.work / "build.log"
        pip_cmd, inplace_cmd = self.build_cmds()
        r = run_proc(pip_cmd, log, limit - 10, env=env)
        note = f"arch {env['TOKENKERNELS_CUDA_ARCHS']}, {env['MAX_JOBS']} jobs, pip -e {fmt_s(r.elapsed)}"
        ok, out = self._verify(env)
        if not ok and not r.stopped and limit - (time.monotonic() - t0) > 20:
            r2 = run_proc(inplace_cmd, log, limit - (time.monotonic() - t0) - 5, env=env)
            note += f"; pip failed (rc {r.rc}), setup.py build_ext --inplace {fmt_s(r2.elapsed)} (rc {r2.rc})"
            ok, out = self._verify(env)
        if ok:
            self.built = True
            if r.rc != 0:
                note += f"; pip rc {r.rc} but the module imports (PYTHONPATH)"
            return "ok", note
        tail = " | ".join(_tail_lines(log, 4))
        return "fail", note + f"; {r.note or 'rc ' + str(r.rc)}; {out.strip()[-200:]} | {tail[-400:]}"

    def _verify(self, env: Dict[str, str]) -> Tuple[bool, str]:
        rc, out = capture([self.py, "-c", self.VERIFY], timeout=45, env=env)
        try:
            d = json.loads(out.strip().splitlines()[-1])
            self.report["meta"]["module"] = d.get("module")
            return bool(d.get("cuda_available")), out
        except (ValueError, IndexError):
            return False, out

    # -------------------------------------------------------------- pytest stages
    def pytest_cmd(self, stage: str, family: str, run: int, selection: Sequence[str],
                   extra: Sequence[str] = ()) -> List[str]:
        t = self.args.test_timeout
        cmd = [self.py or "python3", "-m", "pytest", "-p", "gpu_proof_pytest", "-p", "no:cacheprovider",
               "-q", "-rA", f"--junitxml={self.work / f'junit_{stage}_{family}_{run}.xml'}",
               "-o", f"faulthandler_timeout={t}"]
        if self.has_timeout_plugin:
            cmd += [f"--timeout={t}"]
        return cmd + list(extra) + list(selection)

    def selection(self, stage: str, family: str) -> List[str]:
        return list(SMOKE[family]) if stage == "smoke" else TEST_DIRS.get(family, [f"tests/{family}"]) + ["-k", "cuda"]

    def run_tests(self, stage: str, family: str, limit: float) -> dict:
        """One family's pytest, restarted (without the tests already done) after a sticky CUDA
        error or a crash while time is left. Returns the family's record of this stage."""
        t0 = time.monotonic()
        fam = self.report["tests"].setdefault(family, {"results": {}, "runs": [], "complete": False,
                                                       "stages": {}})
        done_file = self.work / f"done_{family}.txt"
        log = self.work / f"tests_{stage}_{family}.log"
        env = self.base_env()
        env["GPU_PROOF_DESELECT"] = str(done_file)
        complete = False
        why = ""
        for run in range(1, 6):
            left = limit - (time.monotonic() - t0)
            if left < self.min_run:
                why = why or "no time left"
                break
            done_file.write_text("\n".join(sorted(fam["results"])) + "\n")
            jsonl = self.work / f"tests_{stage}_{family}_{run}.jsonl"
            env["GPU_PROOF_JSONL"] = str(jsonl)
            mark = log.stat().st_size if log.exists() else 0
            r = run_proc(self.pytest_cmd(stage, family, run, self.selection(stage, family)), log, left,
                         env=env, cwd=self.cwd)
            parsed = parse_jsonl(jsonl.read_text() if jsonl.exists() else "")
            if not parsed["results"] and not parsed["started"]:    # the plugin did not load: the log
                with open(log, "rb") as f:
                    f.seek(mark)
                    text = f.read().decode(errors="replace")
                parsed = dict(parsed, **parse_pytest_text(text, self.report["impls"][family]))
            new = {k: dict(v, stage=stage, family=family) for k, v in parsed["results"].items()
                   if k not in fam["results"]}
            fam["results"].update(new)
            unfinished = parsed.get("unfinished")
            run_rec = dict(r.to_json(), stage=stage, run=run, new=len(new))
            fam["runs"].append(run_rec)
            if unfinished and unfinished["nodeid"] not in fam["results"]:
                # the test running when the process ended: cut by the deadline, or it crashed
                outcome = "interrupted" if r.stopped else "crashed"
                fam["results"][unfinished["nodeid"]] = dict(
                    unfinished, event="result", outcome=outcome, duration=None, stage=stage, family=family,
                    message=r.note or f"the process ended with {r.rc} during this test")
            if r.stopped:
                n = parsed.get("count")
                if n is not None and len(new) >= n and not unfinished:
                    complete, why = True, ""      # every test had finished: only the exit was late
                else:
                    why = "stopped at its deadline"
                break
            sticky = [s for s in parsed["sticky"] if s["nodeid"] in new]
            # a signal, an odd exit (2: stopped by the plugin, 3: internal error) or a test that
            # started and never reported (e.g. pytest-timeout's os._exit): the rest did not run
            crashed = r.rc is None or r.rc < 0 or r.rc not in (0, 1, 5) or unfinished is not None
            if sticky or crashed:
                why = (f"sticky CUDA error in {sticky[-1]['nodeid']}" if sticky else f"pytest exit {r.rc}")
                run_rec["restart"] = why
                if not new and not unfinished:
                    break                      # nothing moved: do not loop
                continue
            complete = True
            why = ""
            break
        fam["stages"][stage] = {"complete": complete, "why": why,
                                "elapsed": round(time.monotonic() - t0, 1)}
        if not any(r.get("stage") == stage for r in fam["results"].values()) and fam["runs"] and \
                fam["runs"][-1]["rc"] not in (0, 5) and not fam["runs"][-1]["stopped"]:
            # pytest itself failed (collection / import error): nothing proven, say why
            fam["stages"][stage]["error"] = " | ".join(_tail_lines(log, 6))[-600:]
        if stage == "tests":
            fam["complete"] = complete
        return fam

    def do_tests(self, stage: str, limit: float) -> Tuple[str, str]:
        t0 = time.monotonic()
        done: List[str] = []
        for family in FAMILIES:
            left = limit - (time.monotonic() - t0)
            share = sub_slices(left, TEST_WEIGHTS, done)[family]
            if share < 8:
                self.report["tests"].setdefault(family, {"results": {}, "runs": [], "complete": False,
                                                         "stages": {}})["stages"][stage] = {
                    "complete": False, "why": "no time left", "elapsed": 0.0}
                done.append(family)
                continue
            self.run_tests(stage, family, share)
            done.append(family)
            c = count_outcomes(r for r in self.report["tests"][family]["results"].values() if r.get("stage") == stage)
            st = self.report["tests"][family]["stages"][stage]
            self.say(f"gpu-proof:        {stage} {family}: {fmt_counts(c)}"
                     + ("" if st["complete"] else f" (incomplete: {st['why']})"))
        recs = [r for f in self.report["tests"].values() for r in f["results"].values() if r.get("stage") == stage]
        c = count_outcomes(recs)
        incomplete = [f for f in FAMILIES if not self.report["tests"].get(f, {}).get("stages", {}).get(stage, {}).get("complete")]
        errors = [f for f in FAMILIES if self.report["tests"].get(f, {}).get("stages", {}).get(stage, {}).get("error")]
        st = "fail" if any(c.get(o) for o in FAILING) or errors else ("partial" if incomplete else "ok")
        return st, f"{sum(c.values())} tests: {fmt_counts(c)}" + (f"; incomplete: {', '.join(incomplete)}" if incomplete else "")

    # -------------------------------------------------------------- sanitizers
    def sanitizer_cmd(self, tool: str, ids: Sequence[str], kernel_filter: bool) -> List[str]:
        san = self.report["meta"].get("compute_sanitizer") or "compute-sanitizer"
        cmd = [san, "--tool", tool, "--print-limit", "100", "--error-exitcode", "86"]
        if kernel_filter:
            cmd += ["--kernel-name", "kernel_substring=tokenkernels"]
        return cmd + [self.py or "python3", "-m", "pytest", "-s", "-q", "-p", "gpu_proof_pytest",
                      "-p", "no:cacheprovider"] + list(ids)

    def do_sanitizers(self, limit: float) -> Tuple[str, str]:
        if not self.report["meta"].get("compute_sanitizer"):
            return "skipped", "no compute-sanitizer on this machine"
        t0 = time.monotonic()
        ids = round_robin(SANITIZE)
        weights = {t: w for t, w, _ in SANITIZERS}
        done: List[str] = []
        notes, bad = [], False
        for tool, _, only_ours in SANITIZERS:
            left = limit - (time.monotonic() - t0)
            share = sub_slices(left, weights, done)[tool]
            done.append(tool)
            res: dict = {"tool": tool, "ran": False}
            self.report["sanitizers"][tool] = res
            if share < 10:
                res["why"] = "no time left"
                notes.append(f"{tool} skipped")
                continue
            log = self.work / f"sanitizer_{tool}.log"
            env = self.base_env()
            env["GPU_PROOF_MARKERS"] = "1"
            env["GPU_PROOF_JSONL"] = str(self.work / f"sanitizer_{tool}.jsonl")
            if tool == "memcheck":
                env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"   # real allocation bounds for memcheck
            t1 = time.monotonic()
            r = run_proc(self.sanitizer_cmd(tool, ids, only_ours), log, share, env=env)
            parsed = parse_sanitizer(log.read_text(errors="replace"), tool, only_ours)
            res["kernel_filter"] = only_ours
            if only_ours and not parsed["tests"] and not parsed["summary"] and not r.stopped:
                # the kernel filter not understood by this compute-sanitizer: once without it
                rest = share - (time.monotonic() - t1)
                if rest >= 10:
                    log.write_text(log.read_text(errors="replace") + "\n[gpu-proof: again without --kernel-name]\n")
                    r = run_proc(self.sanitizer_cmd(tool, ids, kernel_filter=False), log, rest, env=env)
                    parsed = parse_sanitizer(log.read_text(errors="replace"), tool)
                    res["kernel_filter"] = False
            res.update(parsed, ran=True, proc=r.to_json(), selected=len(ids))
            outcomes = parse_jsonl((self.work / f"sanitizer_{tool}.jsonl").read_text()
                                   if (self.work / f"sanitizer_{tool}.jsonl").exists() else "")
            res["test_outcomes"] = count_outcomes(outcomes["results"].values())
            if parsed["ours"]:
                bad = True
            notes.append(fmt_sanitizer(res))
        return ("fail" if bad else "ok"), "; ".join(notes)

    # -------------------------------------------------------------- peak + bench
    PEAK = r"""
import json, torch
torch.backends.cuda.matmul.allow_tf32 = False
dev = torch.device("cuda")
def timed(fn, reps):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps): fn()
    b.record(); b.synchronize()
    return a.elapsed_time(b) / 1e3 / reps
n = 8192
x = torch.randn(n, n, device=dev, dtype=torch.bfloat16); y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
out = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
s = timed(lambda: torch.matmul(x, y, out=out), 20)
del x, y, out
nbytes = 2 << 30
src = torch.empty(nbytes, device=dev, dtype=torch.uint8); dst = torch.empty_like(src)
c = timed(lambda: dst.copy_(src), 20)
print(json.dumps({"bf16_tflops": 2 * n**3 / s / 1e12, "copy_gbs": 2 * nbytes / c / 1e9,
                  "matmul_ms": s * 1e3, "copy_ms": c * 1e3, "name": torch.cuda.get_device_name()}))
"""

    def do_peak(self, limit: float) -> Tuple[str, str]:
        log = self.work / "peak.log"
        r = run_proc([self.py, "-c", self.PEAK], log, limit, env=self.base_env())
        for line in reversed(log.read_text(errors="replace").splitlines()):
            if line.startswith("{"):
                try:
                    self.report["peak"] = json.loads(line)
                except ValueError:
                    continue
                p = self.report["peak"]
                return "ok", f"bf16 matmul {p['bf16_tflops']:.0f} TFLOP/s, copy {p['copy_gbs']:.0f} GB/s"
        return "fail", r.note or f"rc {r.rc}"

    def bench_cmd(self, family: str) -> List[str]:
        cmd = [self.py or "python3", "-m", "tokenkernels.bench", "--device", "cuda", "--family", family,
               "--no-files", "--csv", str(self.work / f"bench_{family}.csv")]
        return cmd + (["--full"] if self.args.bench_full else [])

    def do_bench(self, limit: float) -> Tuple[str, str]:
        t0 = time.monotonic()
        done: List[str] = []
        notes, failed = [], []
        for family in BENCH_FAMILIES:
            left = limit - (time.monotonic() - t0)
            share = sub_slices(left, BENCH_WEIGHTS, done)[family]
            done.append(family)
            res: dict = {"rows": [], "ran": False}
            self.report["bench"][family] = res
            if share < 8:
                res["why"] = "no time left"
                failed.append(f"{family} (no time)")
                continue
            log = self.work / f"bench_{family}.log"
            csv_path = self.work / f"bench_{family}.csv"
            r = run_proc(self.bench_cmd(family), log, share, env=self.base_env())
            res.update(ran=True, proc=r.to_json())
            if csv_path.exists():
                res["rows"] = parse_bench_csv(csv_path.read_text())
                res["source"] = "csv"
            else:
                res["rows"] = parse_bench_progress(log.read_text(errors="replace"), family)
                res["source"] = "progress lines"
            if not r.ok or not res["rows"]:
                failed.append(f"{family} ({r.note or 'rc ' + str(r.rc)})")
            self.say(f"gpu-proof:        bench {family}: {len({x['case'] for x in res['rows']})} cases, "
                     f"{fmt_s(r.elapsed)}" + ("" if r.ok else f" ({r.note or 'rc ' + str(r.rc)})"))
        n = sum(len({x["case"] for x in b["rows"]}) for b in self.report["bench"].values())
        notes.append(f"{n} cases")
        if failed:
            notes.append("incomplete: " + ", ".join(failed))
        return ("ok" if not failed else "partial"), "; ".join(notes)

    # -------------------------------------------------------------- the whole run
    def run(self) -> int:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        a = self.args
        self.say(f"gpu-proof: budget {a.budget:.0f} s, results {self.results}, work {self.work}")
        old = signal.signal(signal.SIGTERM, _raise_term)
        # a watchdog: whatever hangs, the summary still comes out before the budget is gone
        signal.signal(signal.SIGALRM, _raise_term)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, a.budget - RESERVE / 2))
        try:
            self.stage("probe", self.do_probe)
            self.stage("wheels", self.do_wheels, [self.gpu_ok], "no GPU")
            self.stage("build", self.do_build, [self.gpu_ok], "no GPU")
            need, why = [self.gpu_ok, self.built], "no GPU" if not self.gpu_ok else "the build failed"
            self.stage("smoke", lambda s: self.do_tests("smoke", s), need, why)
            self.stage("sanitizers", self.do_sanitizers, need, why)
            self.stage("peak", self.do_peak, [self.gpu_ok], "no GPU")
            self.stage("bench", self.do_bench, need, why)
            self.stage("tests", lambda s: self.do_tests("tests", s), need, why)
        except (_Terminated, KeyboardInterrupt) as e:
            self.report["stages"].append({"name": "stopped", "status": "error", "elapsed": 0,
                                          "slice": 0, "note": f"{type(e).__name__}: summary of what ran"})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGTERM, old)
        self.report["elapsed"] = round(self.sched.elapsed(), 1)
        self.report["proven"] = proven(self.report)
        text = render_summary(self.report)
        rc = exit_status(self.report)
        try:
            write_results(self.report, text, self.results, self.work, self.console)
        except OSError as e:
            self.say(f"gpu-proof: could not write the results to {self.results}: {e}")
        self.say(text)
        return rc


class _Terminated(BaseException):
    """SIGTERM or the watchdog: not an Exception, so no stage's error handler swallows it."""


def _raise_term(signum, frame):
    raise _Terminated()


def _tail_lines(path: Path, n: int) -> List[str]:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []
    return lines[-n:]


def probe_python_env(py: Optional[str], env: Dict[str, str]) -> Optional[dict]:
    if not py:
        return None
    rc, out = capture([py, "-c", PROBE_PY], timeout=60, env=env)
    try:
        return json.loads(out.strip().splitlines()[-1]) if rc == 0 else None
    except (ValueError, IndexError):
        return None


# ============================================================================ aggregation
def count_outcomes(recs: Iterable[dict]) -> Dict[str, int]:
    c: Dict[str, int] = {}
    for r in recs:
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    return c


def fmt_counts(c: Dict[str, int]) -> str:
    order = ["passed", "failed", "error", "crashed", "interrupted", "skipped", "xfailed", "xpassed"]
    parts = [f"{c[k]} {k}" for k in order if c.get(k)]
    return ", ".join(parts) if parts else "none ran"


def fmt_sanitizer(res: dict) -> str:
    tool = res.get("tool", "?")
    if not res.get("ran"):
        return f"{tool} not run ({res.get('why', '')})"
    if not res.get("summary"):
        return f"{tool} incomplete ({len(res.get('tests', []))} tests, {res.get('kernel_errors', 0)} errors so far)"
    if tool == "racecheck":
        s = f"{tool} {res['errors']} hazards ({res['warnings']} warnings)"
    else:
        s = f"{tool} {res['errors']} errors"
    extra = []
    foreign = res.get("kernel_errors", 0) - res.get("ours", 0)
    if res.get("ours"):
        extra.append(f"{res['ours']} in tokenkernels kernels")
    if foreign > 0:
        extra.append(f"{foreign} in other kernels")
    if res.get("api_errors"):
        extra.append(f"{res['api_errors']} API")
    return s + (f" ({', '.join(extra)})" if extra else "") + f", {len(res.get('tests', []))} tests"


def sanitizer_by_variant(report: dict) -> Dict[Tuple[str, str], Dict[str, int]]:
    """(family, impl) -> {tool: kernel errors attributed to its tests}; tests without an impl
    parameter count for "auto"."""
    out: Dict[Tuple[str, str], Dict[str, int]] = {}
    for tool, res in report.get("sanitizers", {}).items():
        for rec in res.get("records", []):
            if not rec.get("ours") or not rec.get("family"):
                continue
            key = (rec["family"], rec.get("impl") or "auto")
            out.setdefault(key, {}).setdefault(tool, 0)
            out[key][tool] += 1
    return out


def sanitized_variants(report: dict) -> Dict[Tuple[str, str], Dict[str, bool]]:
    """(family, impl) -> {tool: True when one of its tests ran under the tool}."""
    out: Dict[Tuple[str, str], Dict[str, bool]] = {}
    for tool, res in report.get("sanitizers", {}).items():
        for nodeid in res.get("tests", []):
            impl = res.get("test_impls", {}).get(nodeid) or "auto"
            out.setdefault((family_of(nodeid), impl), {})[tool] = True
    return out


def proven(report: dict) -> Dict[str, Dict[str, str]]:
    """The machine-readable verdict per family and impl (see the module docstring)."""
    san = sanitizer_by_variant(report)
    out: Dict[str, Dict[str, str]] = {}
    for fam, impls in report.get("impls", {}).items():
        t = report.get("tests", {}).get(fam, {})
        recs = list(t.get("results", {}).values())
        out[fam] = {}
        for impl in impls:
            mine = [r for r in recs if (r.get("impl") or "auto") == impl]
            if any(r["outcome"] in FAILING for r in mine) or sum(san.get((fam, impl), {}).values()):
                out[fam][impl] = "fail"
            elif not any(r["outcome"] in ("passed", "xfailed") for r in mine):
                out[fam][impl] = "untested"
            else:
                out[fam][impl] = "pass" if t.get("complete") else "partial"
    return out


def exit_status(report: dict) -> int:
    st = {s["name"]: s["status"] for s in report["stages"]}
    if st.get("probe") != "ok":
        return 2
    verdicts = [v for f in report.get("proven", {}).values() for v in f.values()]
    if any(s in ("fail", "error") for s in st.values()) or "fail" in verdicts:
        return 1
    return 0


# ============================================================================ the summary
OURS = ("tokenkernels", "tokenselect", "kcenter ", "coverage ")


def is_ours(impl: str) -> bool:
    return impl.lower().startswith(OURS)


def frac_of_peak(row: dict, peak: dict) -> Optional[float]:
    rate = row.get("rate")
    if not rate or not peak:
        return None
    if row.get("rate_unit") == "GB/s" and peak.get("copy_gbs"):
        return rate / peak["copy_gbs"]
    low = re.search(r"bfloat16|bf16|float16|fp16|half", row.get("case", ""))
    if row.get("rate_unit") == "GFLOP/s" and low and peak.get("bf16_tflops"):
        return rate / (peak["bf16_tflops"] * 1e3)
    return None


def fmt_rate(row: dict) -> str:
    r = row.get("rate")
    if not r:
        return "-"
    if row.get("rate_unit") == "GFLOP/s":
        return f"{r / 1e3:.1f} TFLOP/s" if r >= 1e3 else f"{r:.0f} GFLOP/s"
    return f"{r:.0f} {row.get('rate_unit', '')}"


def bench_lines(report: dict, width: int = 44) -> List[str]:
    peak = report.get("peak") or {}
    lines = []
    for fam in BENCH_FAMILIES:
        b = report.get("bench", {}).get(fam)
        if not b:
            continue
        if not b.get("rows"):
            why = b.get("why") or (b.get("proc") or {}).get("note") or f"rc {(b.get('proc') or {}).get('rc')}"
            lines.append(f"  {fam:<13} no rows ({why})")
            continue
        cases: List[str] = []
        for r in b["rows"]:
            if r["case"] not in cases:
                cases.append(r["case"])
        for case in cases:
            rows = [r for r in b["rows"] if r["case"] == case]
            ours = next((r for r in rows if is_ours(r["impl"])), None)
            label = case if len(case) <= width else case[: width - 1] + "~"
            if ours is None or not ours.get("median_ms"):
                lines.append(f"  {fam:<13} {label:<{width}} (no tokenkernels row)")
                continue
            fp = frac_of_peak(ours, peak)
            peers = [f"{r['impl']} {r['median_ms'] / ours['median_ms']:.2f}x" for r in rows
                     if not is_ours(r["impl"]) and r.get("median_ms")]
            lines.append(f"  {fam:<13} {label:<{width}} {ours['median_ms']:>9.3f} ms {fmt_rate(ours):>14} "
                         f"{('%3.0f%%' % (100 * fp)) if fp is not None else '   -'}  "
                         + (", ".join(peers) if peers else "-"))
    return lines


def render_summary(report: dict) -> str:
    meta = report.get("meta", {})
    out = ["=" * 30 + " gpu-proof summary " + "=" * 30]
    if report.get("dry_run"):
        out.append("(SAMPLE: rendered from tools/gpu_proof_samples/, not a real run)")
    out.append(f"device   {meta.get('gpu', '?')} (sm {meta.get('compute_cap', '?')} -> arch {meta.get('arch', '?')}), "
               f"{meta.get('gpu_memory', '?')}, driver {meta.get('driver', '?')}")
    out.append(f"software torch {meta.get('torch', '?')} (CUDA {meta.get('torch_cuda', '?')}), nvcc {meta.get('nvcc_version', '?')}, "
               f"python {meta.get('python_version', '?')} ({meta.get('python', '?')})")
    out.append(f"budget   {report.get('budget', 0):.0f} s, used {report.get('elapsed', 0):.0f} s")
    p = report.get("peak") or {}
    if p.get("bf16_tflops"):
        out.append(f"peak     bf16 matmul 8192^3 {p['bf16_tflops']:.0f} TFLOP/s; device-to-device copy "
                   f"{p['copy_gbs']:.0f} GB/s (read+write)")
    out.append("")
    out.append(f"{'stage':<11} {'status':<8} {'time':>6} {'slice':>6}  note")
    for s in report.get("stages", []):
        note = s.get("note", "")
        note = note if len(note) <= 150 else note[:147] + "..."
        out.append(f"{s['name']:<11} {s['status']:<8} {fmt_s(s['elapsed']):>6} {fmt_s(s['slice']):>6}  {note}")
    out.append("")
    san = sanitizer_by_variant(report)
    ran = sanitized_variants(report)
    tools = [t for t, _, _ in SANITIZERS]
    out.append(f"{'family':<14}{'impl':<8}{'pass':>6}{'fail':>6}{'skip':>6}  "
               + "".join(f"{t:>10}" for t in tools) + "  proven")
    verdicts = report.get("proven", {})
    for fam, impls in report.get("impls", {}).items():
        recs = list(report.get("tests", {}).get(fam, {}).get("results", {}).values())
        for impl in impls:
            mine = [r for r in recs if (r.get("impl") or "auto") == impl]
            c = count_outcomes(mine)
            cells = []
            for t in tools:
                res = report.get("sanitizers", {}).get(t, {})
                if not ran.get((fam, impl), {}).get(t):
                    cells.append("-")
                else:
                    n = san.get((fam, impl), {}).get(t, 0)
                    cells.append(str(n) if res.get("summary") or n else f"{n}?")
            out.append(f"{fam:<14}{impl:<8}{c.get('passed', 0):>6}"
                       f"{sum(c.get(o, 0) for o in FAILING):>6}{c.get('skipped', 0):>6}  "
                       + "".join(f"{x:>10}" for x in cells) + f"  {verdicts.get(fam, {}).get(impl, '?')}")
    out.append("(sanitizer columns: kernel errors reported while that variant's tests ran; '-' not run; "
               "'?' run cut before its summary)")
    fails = [r for f in report.get("tests", {}).values() for r in f.get("results", {}).values()
             if r["outcome"] in FAILING]
    errs = [(fam, stage, st["error"]) for fam, f in report.get("tests", {}).items()
            for stage, st in f.get("stages", {}).items() if st.get("error")]
    if errs:
        out.append("")
        out.append("pytest could not run:")
        for fam, stage, e in errs[:4]:
            out.append(f"  {stage} {fam}: {e[-300:]}")
    if fails:
        out.append("")
        out.append(f"failures ({len(fails)}, first 8):")
        for r in fails[:8]:
            out.append(f"  {r['outcome']:<8}{r['nodeid']}  {r.get('message', '')[:140]}")
    recs = [(t, r) for t, res in report.get("sanitizers", {}).items() for r in res.get("records", [])
            if r["kind"] == "kernel"]
    recs.sort(key=lambda tr: not tr[1].get("ours"))
    if recs:
        out.append("")
        out.append(f"sanitizer findings ({len(recs)}, first 6; ours = in a tokenkernels kernel):")
        for t, r in recs[:6]:
            out.append(f"  {t:<10}{'ours ' if r.get('ours') else 'other'} {r['header'][:80]}  "
                       f"{r.get('where', '')[:90]}  [{r.get('nodeid') or '?'}]")
    bl = bench_lines(report)
    if bl:
        out.append("")
        out.append(f"bench (CUDA; ms = tokenkernels' median; %peak of the measured peak above; "
                   f"peers: their ms / ours, > 1 = tokenkernels faster)")
        out.extend(bl)
    rc = exit_status(report)
    counts: Dict[str, int] = {}
    for f in verdicts.values():
        for v in f.values():
            counts[v] = counts.get(v, 0) + 1
    out.append("")
    out.append(f"gpu-proof: {['PASS', 'FAIL', 'NOT RUN'][rc]}; proven.json: "
               + ", ".join(f"{counts[k]} {k}" for k in ("pass", "partial", "fail", "untested") if counts.get(k)))
    return "\n".join(out)


# ============================================================================ results folder
RESULT_FILES = ["summary.txt", "summary.json", "proven.json", "bench_cuda.csv", "gpu-proof.log", "logs.tar.gz"]
MAX_FILE = 15 * 2**20


def merged_bench_csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(BENCH_COLUMNS)
    for fam in BENCH_FAMILIES:
        for r in report.get("bench", {}).get(fam, {}).get("rows", []):
            w.writerow([("" if r.get(k) is None else r.get(k, "")) for k in BENCH_COLUMNS])
    return buf.getvalue()


def write_results(report: dict, summary: str, results: Path, work: Optional[Path], console: Optional[Console]) -> List[Path]:
    """The few files the device tool brings back (<= 8, one folder, plain names, < 16 MiB)."""
    results.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (results / name).exists():
            (results / name).unlink()
    written = []

    def put(name: str, data: bytes) -> None:
        if len(data) > MAX_FILE:
            data = data[-MAX_FILE:]
        (results / name).write_bytes(data)
        written.append(results / name)

    put("summary.txt", (summary + "\n").encode())
    put("proven.json", (json.dumps(report.get("proven", {}), indent=2) + "\n").encode())
    slim = json.loads(json.dumps(report, default=str))
    put("summary.json", (json.dumps(slim, indent=1) + "\n").encode())
    put("bench_cuda.csv", merged_bench_csv(report).encode())
    if console is not None:
        put("gpu-proof.log", ("\n".join(console.lines + summary.split("\n")) + "\n").encode())
    if work is not None and work.is_dir():
        buf = io.BytesIO()
        per_file = 4 * 2**20
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in sorted(work.rglob("*")):
                if not f.is_file():
                    continue
                data = f.read_bytes()
                if len(data) > per_file:
                    data = b"[gpu-proof: first and last 2 MiB]\n" + data[: per_file // 2] + b"\n...\n" + data[-per_file // 2:]
                info = tarfile.TarInfo(f"gpu-proof/{f.relative_to(work)}")
                info.size = len(data)
                info.mtime = int(f.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
        put("logs.tar.gz", buf.getvalue())
    return written


def check_results_folder(folder: Path) -> List[str]:
    """Problems with a results folder for the device tool (empty list: fine)."""
    problems = []
    files = [f for f in folder.rglob("*") if f.is_file()]
    if len(files) > 8:
        problems.append(f"{len(files)} files (at most 8 come back)")
    for f in files:
        rel = f.relative_to(folder)
        if len(rel.parts) > 2:
            problems.append(f"{rel}: more than 2 folders deep")
        if not all(re.fullmatch(r"[A-Za-z0-9._-]+", p) for p in rel.parts):
            problems.append(f"{rel}: name outside [A-Za-z0-9._-]")
        if f.stat().st_size > 16 * 2**20:
            problems.append(f"{rel}: over 16 MiB")
    return problems


# ============================================================================ the dry run
def load_sample_report() -> dict:
    """A report built from the recorded samples through the same parsers a real run uses."""
    s = json.loads((SAMPLES / "report_stub.json").read_text())
    report = {"schema": 1, "dry_run": True, "budget": s["budget"], "elapsed": s["elapsed"],
              "meta": s["meta"], "stages": s["stages"], "tests": {}, "sanitizers": {}, "bench": {},
              "peak": json.loads((SAMPLES / "peak.json").read_text()), "impls": read_impls()}
    for fam in FAMILIES:
        t = report["tests"].setdefault(fam, {"results": {}, "runs": [], "complete": fam in s["complete"], "stages": {}})
        for stage in ("smoke", "tests"):
            j = SAMPLES / f"tests_{stage}_{fam}.jsonl"
            x = SAMPLES / f"tests_{stage}_{fam}.txt"
            if j.exists():
                parsed = parse_jsonl(j.read_text())
                u = parsed["unfinished"]
                if u:
                    parsed["results"][u["nodeid"]] = dict(u, event="result", outcome="interrupted",
                                                          message="stopped at its deadline (SIGINT)")
            elif x.exists():
                parsed = parse_pytest_text(x.read_text(), report["impls"][fam])
            else:
                continue
            for k, v in parsed["results"].items():
                t["results"].setdefault(k, dict(v, stage=stage))
    for tool, _, only_ours in SANITIZERS:
        f = SAMPLES / f"sanitizer_{tool}.txt"
        if f.exists():
            report["sanitizers"][tool] = dict(parse_sanitizer(f.read_text(), tool, only_ours), ran=True)
    rows = parse_bench_csv((SAMPLES / "bench_cuda.csv").read_text())
    for fam in BENCH_FAMILIES:
        report["bench"][fam] = {"rows": [r for r in rows if r["family"] == fam], "ran": True}
    report["proven"] = proven(report)
    return report


def collect_check(py: str, env: Dict[str, str], work: Path) -> Tuple[bool, List[str]]:
    """Collect the CUDA tests (as a CPU machine sees them: skipped, but collected) with the
    plugin and check the selections: every SMOKE / SANITIZE id exists, every family x impl has a
    smoke test and at least one CUDA test."""
    lines: List[str] = []
    work.mkdir(parents=True, exist_ok=True)
    jsonl = work / "collect.jsonl"
    if jsonl.exists():
        jsonl.unlink()
    env = dict(env, GPU_PROOF_JSONL=str(jsonl), GPU_PROOF_COLLECT="1")
    cmd = [py, "-m", "pytest", "-p", "gpu_proof_pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
           "-k", "cuda"] + [d for f in FAMILIES for d in TEST_DIRS.get(f, [f"tests/{f}"])]
    rc, out = capture(cmd, timeout=300, env=env)
    parsed = parse_jsonl(jsonl.read_text() if jsonl.exists() else "")
    coll = {r["nodeid"]: r for r in parsed["collected"]}
    if rc != 0 or not coll:
        return False, [f"collection failed (rc {rc}): {out.strip()[-600:]}"]
    impls = read_impls()
    ok = True
    per: Dict[str, int] = {}
    for r in coll.values():
        per[r["family"]] = per.get(r["family"], 0) + 1
    lines.append("collected CUDA tests: " + ", ".join(f"{f} {per.get(f, 0)}" for f in FAMILIES))
    for name, sel in (("SMOKE", SMOKE), ("SANITIZE", SANITIZE)):
        for fam, ids in sel.items():
            for i in ids:
                if i not in coll:
                    ok = False
                    lines.append(f"ERROR: {name}[{fam}] {i} is not a collected test")
    for fam in FAMILIES:
        for impl in impls[fam]:
            smoke = [i for i in SMOKE[fam] if i in coll and (coll[i]["impl"] or "auto") == impl]
            anyt = [r for r in coll.values() if r["family"] == fam and (r["impl"] or "auto") == impl]
            if not smoke:
                ok = False
                lines.append(f"ERROR: {fam} impl={impl}: no smoke test")
            if not anyt:
                ok = False
                lines.append(f"ERROR: {fam} impl={impl}: no CUDA test at all")
            san = [i for i in SANITIZE[fam] if i in coll and (coll[i]["impl"] or "auto") == impl]
            lines.append(f"  {fam:<14}{impl:<7} {len(anyt):>4} CUDA tests, {len(smoke)} smoke, {len(san)} under sanitizers")
    return ok, lines


def dry_run(args: argparse.Namespace, console: Console) -> int:
    say = console
    ok = True
    say("gpu-proof --dry-run: plans the GPU run; nothing is installed, built or run on a GPU")
    say(f"arguments: budget {args.budget:.0f} s, results {Path(args.results).resolve()}, "
        f"work {Path(args.work).resolve()}, wheels {Path(args.wheels).resolve()}, site {args.site}, "
        f"bench {'full' if args.bench_full else 'quick'}, per-test timeout {args.test_timeout} s")
    r = Runner(args, console)
    py, info, notes = choose_python(args.python, args.fallback_python)
    r.py, r.pyinfo = py, info or {}
    say("interpreter (the first with a CUDA torch; else make's environment):")
    for n in notes:
        say(f"  {n}")
    say(f"  -> {py}" + ("" if (info or {}).get("torch_cuda") else
                        "  (no CUDA torch here: the GPU machine's /opt/torch/.venv/bin/python3 is used there)"))
    nvcc = find_tool("nvcc")
    r.report["meta"].update(nvcc=nvcc, arch=args.arch or "90a (from the GPU: nvidia-smi compute_cap 9.0 on an H200)",
                            compute_sanitizer=find_tool("compute-sanitizer", nvcc))
    say(f"tools here: nvcc {nvcc or 'none'}, compute-sanitizer {r.report['meta']['compute_sanitizer'] or 'none'}, "
        f"nvidia-smi {find_tool('nvidia-smi') or 'none'}")
    for cap, want in (("9.0", "90a"), ("8.0", "80"), ("10.0", "100a"), ("8.9", "89")):
        if arch_for(cap) != want:
            ok = False
            say(f"ERROR: arch_for({cap}) = {arch_for(cap)}, expected {want}")

    # ---- wheels
    wdir = Path(args.wheels)
    say("")
    say(f"wheels: carried in {wdir}/ (target: CPython 3.12, manylinux x86_64, glibc 2.28)")
    gpu_installed = {"torch": "2.11.0+cu130", "pytest": "9", "hypothesis": "6", "numpy": "2",
                     "transformers": "5.17.0", "matplotlib": "3", "setuptools": "80", "pip": "25"}
    plan = plan_wheels(wdir, gpu_installed, "cp312", (2, 28))
    for f in plan["carried"]:
        say(f"  {f}")
    if not plan["carried"]:
        say("  (none)")
    for f, why in plan["skip"]:
        say(f"  skip {f}: {why}")
    say("  would install (what a GPU machine with torch, pytest, setuptools, ... lacks): "
        + (", ".join(plan["install"]) or "nothing"))
    if plan["missing"]:
        say(f"  WARNING: {', '.join(plan['missing'])} not carried: the CUDA build needs it. Here, first:")
        say(f"    make gpu-wheels      # = {quote(download_command())}")
    say(f"  $ {quote([py, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile', '--no-cache-dir', '--upgrade', '--target', args.site] + [str(wdir / f) for f in plan['install']] or ['...'])}")
    say(f"  then PYTHONPATH={ROOT / 'python'}:{TOOLS}:{args.site} for every later stage")

    # ---- build and the commands of every stage
    r.report["meta"]["arch"] = args.arch or "90a"
    env = r.build_env()
    show = {k: env[k] for k in ("TOKENKERNELS_CUDA", "TOKENKERNELS_CUDA_ARCHS", "MAX_JOBS", "TOKENKERNELS_BENCH")}
    say("")
    say("build (arch and jobs from the GPU machine: here with 90a and this machine's cores):")
    pip_cmd, inplace_cmd = r.build_cmds()
    say(f"  $ {env_line(show)} {quote(pip_cmd)}")
    say(f"  fallback when pip fails and the module does not import: $ {quote(inplace_cmd)}")
    say(f"  check: $ {quote([py, '-c', Runner.VERIFY])}")
    say("")
    say("smoke (one pytest per family; restarted without the finished tests after a sticky CUDA error):")
    r.has_timeout_plugin = True
    for fam in FAMILIES:
        say(f"  {fam}: $ {quote(r.pytest_cmd('smoke', fam, 1, ['<%d ids>' % len(SMOKE[fam])]))}")
        for i in SMOKE[fam]:
            say(f"      {i}")
    say("  (--timeout only when pytest-timeout is importable there; JSON lines via GPU_PROOF_JSONL)")
    say("sanitizers (all families in one process per tool, round-robin; PYTORCH_NO_CUDA_MEMORY_CACHING=1 for memcheck):")
    ids = round_robin(SANITIZE)
    for tool, _, only_ours in SANITIZERS:
        say(f"  $ {quote(r.sanitizer_cmd(tool, ['<%d ids>' % len(ids)], only_ours))}")
    say(f"peak: $ {py} -c '<bf16 8192^3 matmul x20, 2 GiB device copy x20>'")
    say("bench:")
    for fam in BENCH_FAMILIES:
        say(f"  $ {quote(r.bench_cmd(fam))}")
    say("tests (the rest):")
    for fam in FAMILIES:
        say(f"  $ GPU_PROOF_DESELECT=<done ids> {quote(r.pytest_cmd('tests', fam, 1, r.selection('tests', fam)))}")

    # ---- the schedule
    sched = Schedule(scaled_plans(args.budget), args.budget, clock=lambda: 0.0)
    say("")
    say(f"schedule for a budget of {args.budget:.0f} s ({RESERVE:.0f} s kept for the summary):")
    say(f"  {'stage':<11}{'slice':>7}{'floor':>7}{'cap':>7}  what")
    total = 0.0
    for p in sched.plans:
        total += p.planned
        say(f"  {p.name:<11}{p.planned:>6.0f}s{p.floor:>6.0f}s{(f'{p.cap:.0f}s' if p.cap else '-'):>7}  "
            f"{'+ every second left: ' if p.elastic else ''}{p.what}")
    say(f"  {'total':<11}{total:>6.0f}s  + {RESERVE:.0f} s reserve = {total + RESERVE:.0f} s")
    if total + RESERVE > args.budget + 1e-6:
        ok = False
        say("ERROR: the planned slices exceed the budget")
    for name, w in (("tests per family", TEST_WEIGHTS), ("bench per family", BENCH_WEIGHTS),
                    ("sanitizers", {t: w for t, w, _ in SANITIZERS})):
        s = sub_slices(100.0, w)
        say(f"  {name}: " + ", ".join(f"{k} {v:.0f}%" for k, v in s.items()))
    say("  slowest build allowed (its cap): then " + ", ".join(
        f"{n} {v:.0f} s" for n, v in simulate(args.budget, {"build": sched.plan("build").cap or 0}).items()
        if n != "build"))

    # ---- collection check
    say("")
    if args.no_collect:
        say("collection check: skipped (--no-collect)")
    elif not (info or {}).get("torch") or not (info or {}).get("modules", {}).get("pytest"):
        say(f"collection check: skipped ({py} has no torch or pytest)")
    else:
        cok, lines = collect_check(py, r.base_env(), Path(args.work))
        say(f"collection check ({py}): {'ok' if cok else 'FAILED'}")
        for ln in lines:
            say(f"  {ln}")
        ok = ok and cok

    # ---- the summary printer on the samples
    report = load_sample_report()
    text = render_summary(report)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        write_results(report, text, Path(tmp), None, console)
        problems = check_results_folder(Path(tmp))
    if problems:
        ok = False
        say("ERROR: results folder: " + "; ".join(problems))
    say("")
    say(text)
    say("")
    say(f"gpu-proof --dry-run: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def download_wheels(args: argparse.Namespace, say: Console) -> int:
    py = args.pip_python if args.pip_python and os.path.exists(args.pip_python) else sys.executable
    cmd = download_command(args.wheels, py)
    say(f"$ {quote(cmd)}")
    rc = subprocess.call(cmd, cwd=str(ROOT))
    if rc != 0:
        say(f"gpu-wheels: pip download failed ({rc})")
        return rc
    plan = plan_wheels(Path(args.wheels), {}, "cp312", (2, 28))
    total = sum((Path(args.wheels) / f).stat().st_size for f in plan["carried"])
    say(f"gpu-wheels: {len(plan['carried'])} wheels in {args.wheels} ({total / 2**20:.1f} MiB; the device "
        f"tool carries 64 MiB): " + ", ".join(plan["carried"]))
    if plan["missing"]:
        say(f"gpu-wheels: still missing {', '.join(plan['missing'])}")
        return 1
    return 0


def simulate(budget: float, took: Dict[str, float]) -> Dict[str, float]:
    """Slices a run would get when stage X takes took[X] seconds (others: their whole slice)."""
    t = [0.0]
    sched = Schedule(scaled_plans(budget), budget, clock=lambda: t[0])
    out = {}
    for p in sched.plans:
        s = sched.slice(p.name)
        out[p.name] = s
        t[0] += min(s, took.get(p.name, s)) if s >= p.floor else 0.0
    return out


# ============================================================================ main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_proof.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="plan only: no GPU, nothing installed or built")
    p.add_argument("--results", default=None,
                   help="results folder (default: $GPU_PROOF_RESULTS, else $OUT, else build/gpu-proof)")
    p.add_argument("--work", default=None, help="scratch folder for the logs (default build/gpu-proof-work)")
    p.add_argument("--budget", type=float, default=None,
                   help="total seconds, summary included (default $GPU_PROOF_BUDGET or 540)")
    p.add_argument("--python", default=None, help="the interpreter with the CUDA torch (default: found)")
    p.add_argument("--fallback-python", default=None, help="used when no CUDA torch is found (make's environment)")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels (default .whl)")
    p.add_argument("--site", default=SITE_DEFAULT, help=f"pip --target folder for them (default {SITE_DEFAULT})")
    p.add_argument("--arch", default=None, help="TOKENKERNELS_CUDA_ARCHS (default: from the GPU, 9.0 -> 90a)")
    p.add_argument("--jobs", type=int, default=None, help="MAX_JOBS (default: every core)")
    p.add_argument("--test-timeout", type=int, default=120, help="per-test timeout in s (pytest-timeout / faulthandler)")
    p.add_argument("--bench-full", action="store_true", help="the benchmark's --full shapes (default quick)")
    p.add_argument("--no-collect", action="store_true", help="dry run: skip the test collection check")
    p.add_argument("--download-wheels", action="store_true",
                   help="here, before the GPU session: pip download the wheels into --wheels (make gpu-wheels)")
    p.add_argument("--pip-python", default=None, help="the interpreter whose pip downloads (default: this one)")
    a = p.parse_args(argv)
    if a.budget is None:
        a.budget = float(os.environ.get("GPU_PROOF_BUDGET") or BASE_BUDGET)
    if a.budget < 60:
        p.error("--budget must be at least 60 s")
    if a.results is None:
        a.results = os.environ.get("GPU_PROOF_RESULTS") or os.environ.get("OUT") or str(ROOT / "build" / "gpu-proof")
    if a.work is None:
        a.work = str(ROOT / "build" / "gpu-proof-work")
    if Path(a.work).resolve() == Path(a.results).resolve():
        p.error("--work and --results must differ (the results folder keeps only a few files)")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    console = Console()
    if args.download_wheels:
        return download_wheels(args, console)
    if args.dry_run:
        return dry_run(args, console)
    return Runner(args, console).run()


if __name__ == "__main__":
    sys.exit(main())
