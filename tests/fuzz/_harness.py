"""The fuzz suite's machinery: isolated runs, the outcome rule, op-call recording.

* :func:`isolated` runs a function in a forked child (CPU) with a per-call timeout
  (``signal.alarm`` in the child: its default action kills the child, so a hang inside C++ ends
  too) and an overall timeout; the parent asserts the child exited normally, left no sanitizer
  report (``make sanitize``) and passed. On CUDA (no fork after CUDA is initialised) it runs in
  this process under a ``faulthandler`` watchdog that dumps the stacks and exits on a hang.
* :func:`outcome` is the rule every fuzzed call obeys: it raises ValueError / TypeError /
  IndexError / RuntimeError (or torch's subclasses of them) whose message starts with
  ``"tokenkernels."`` and names an argument, or it returns normally (the caller then compares
  with the reference).
* :class:`OpRecorder` records the ``torch.ops.tokenkernels.*`` calls a block of code makes, by
  namespace, not by name (the schemas are being renamed).
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import re
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# default run: a few dozen examples per test (the whole suite well under a minute on 2 cores);
# TOKENKERNELS_FUZZ_EXAMPLES=N for longer campaigns
EXAMPLES = int(os.environ.get("TOKENKERNELS_FUZZ_EXAMPLES", "0") or 0)
CALL_TIMEOUT = int(os.environ.get("TOKENKERNELS_FUZZ_CALL_TIMEOUT", "20"))
# make sanitize points this at its report folder; a child's report is a failure of that child
REPORTS = os.environ.get("TOKENKERNELS_SANITIZE_REPORTS")

COLLECT = os.environ.get("TOKENKERNELS_FUZZ_COLLECT")

ERRORS = (ValueError, TypeError, IndexError, RuntimeError)


def examples(default: int) -> int:
    return EXAMPLES or default


def collect(line: str) -> None:
    """Campaign mode (TOKENKERNELS_FUZZ_COLLECT=FILE): append a violation instead of failing."""
    with open(COLLECT, "a") as f:
        f.write(line.replace("\n", " ") + "\n")


# ------------------------------------------------------------------------ the outcome rule
def check_error(e: BaseException, arg_names: Iterable[str], what: str) -> None:
    """A fuzzed call raised ``e``: it must be one of :data:`ERRORS` and its message must start with
    ``tokenkernels.`` and name one of ``arg_names``."""
    if not isinstance(e, ERRORS):
        raise AssertionError(f"{what}: raised {type(e).__name__} (not ValueError/TypeError/"
                             f"IndexError/RuntimeError): {e}") from e
    msg = str(e)
    if not msg.startswith("tokenkernels."):
        raise AssertionError(f"{what}: {type(e).__name__} message does not start with "
                             f"'tokenkernels.': {msg[:300]!r}") from e
    first = msg.split("\n", 1)[0]
    names = [n for n in arg_names if re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", first)]
    if not names:
        raise AssertionError(f"{what}: the message names none of the arguments "
                             f"{sorted(set(arg_names))}: {first[:300]!r}") from e


def outcome(call: Callable[[], Any], arg_names: Iterable[str], what: str) -> Tuple[bool, Any]:
    """(True, result) or (False, exception) after checking the exception with :func:`check_error`."""
    try:
        return True, call()
    except BaseException as e:  # noqa: BLE001 -- KeyboardInterrupt aside, every exception is judged
        if isinstance(e, KeyboardInterrupt):
            raise
        check_error(e, arg_names, what)
        return False, e


# ------------------------------------------------------------------------ isolation
_CURRENT: Optional[str] = None      # the child's "what is running now" file


def note(text: str) -> None:
    """Say which case runs now (the parent reports it when the child dies or hangs)."""
    if _CURRENT is not None:
        with open(_CURRENT, "w") as f:
            f.write(text)


@contextmanager
def per_call_timeout(seconds: int = CALL_TIMEOUT):
    """In a forked child: SIGALRM (default action: terminate) if the block runs too long."""
    if _CURRENT is None:
        yield
        return
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)


# what ASan logs (allocator_may_return_null=1, make sanitize) when a size an op wrongly accepts
# fails to allocate: no memory error -- the fuzz judges the call's exception instead
_ALLOC_WARNING = re.compile(r"^==\d+==WARNING: AddressSanitizer failed to allocate 0x[0-9a-f]+ bytes$")


def is_report(path: str) -> bool:
    """A sanitizer log file with anything but allocation-failure warnings in it."""
    with open(path, errors="replace") as f:
        return any(line.strip() and not _ALLOC_WARNING.match(line.strip()) for line in f)


def _reports_of(pid: int) -> List[str]:
    if not REPORTS or not os.path.isdir(REPORTS):
        return []
    return [p for p in (os.path.join(REPORTS, f) for f in os.listdir(REPORTS) if f.endswith(f".{pid}"))
            if is_report(p)]


def isolated(fn: Callable[[], None], *, device: str = "cpu", timeout: float = 240.0) -> None:
    """Run ``fn`` in a forked child (CPU) and re-raise its failure here; see the module doc."""
    if device != "cpu" or not hasattr(os, "fork"):
        faulthandler.dump_traceback_later(timeout, exit=True)
        try:
            fn()
        finally:
            faulthandler.cancel_dump_traceback_later()
        return
    global _CURRENT
    with tempfile.TemporaryDirectory(prefix="tk-fuzz-") as tmp:
        result, current = os.path.join(tmp, "result"), os.path.join(tmp, "current")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:   # the child: never returns into pytest
            code = 0
            try:
                _CURRENT = current
                torch.set_num_threads(1)   # no OpenMP pool inherited across fork
                _limit_memory()
                fn()
                payload = None
            except BaseException:  # noqa: BLE001
                payload = traceback.format_exc()
            try:
                with open(result, "wb") as f:
                    pickle.dump(payload, f)
            except BaseException:  # noqa: BLE001
                code = 3
            os._exit(code)
        deadline = time.monotonic() + timeout
        status = None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"fuzz child timed out after {timeout} s while running: {_read(current)}")
            time.sleep(0.01)
        reports = _reports_of(pid)
        if reports:
            text = "".join(_read(r, 4000) for r in reports)
            raise AssertionError(f"sanitizer report(s) {reports} while running: {_read(current)}\n{text}")
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            why = "a hang (per-call timeout)" if sig == signal.SIGALRM else signal.Signals(sig).name
            raise AssertionError(f"fuzz child killed by {why} while running: {_read(current)}")
        if os.WEXITSTATUS(status) != 0 or not os.path.exists(result):
            raise AssertionError(f"fuzz child exited {os.WEXITSTATUS(status)} while running: {_read(current)}")
        with open(result, "rb") as f:
            payload = pickle.load(f)
        if payload is not None:
            raise AssertionError(f"in the fuzz child:\n{payload}")


def _limit_memory(extra_gib: int = 6) -> None:
    """A size near 2^31 / 2^63 that an op accepts must fail to allocate, not take the machine's
    memory: the child's address space is capped at its size now + ``extra_gib`` (not under ASan,
    which reserves terabytes of shadow memory; make sanitize caps ASan's allocator instead)."""
    if REPORTS is not None or "asan" in os.environ.get("LD_PRELOAD", ""):
        return
    import resource
    try:
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        cap = vm + extra_gib * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (OSError, ValueError):
        pass


def _read(path: str, limit: int = 2000) -> str:
    try:
        with open(path) as f:
            return f.read()[:limit]
    except OSError:
        return "(nothing recorded)"


# ------------------------------------------------------------------------ recording op calls
class OpRecorder(TorchDispatchMode):
    """Records (OpOverload, args, kwargs) of every ``tokenkernels`` op called inside the block
    (whatever the ops are named), with the arguments cloned as they were at the call."""

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "tokenkernels":
            clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.calls.append((func, tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def schema_arg_names(func) -> List[str]:
    return [a.name for a in func._schema.arguments]


def public_name(func) -> str:
    """``tokenkernels::tree_build`` -> ``tree_build`` (for messages)."""
    return func._schema.name.split("::", 1)[1]
