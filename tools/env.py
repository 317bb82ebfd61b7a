#!/usr/bin/env python3
"""The project's Python environment for `make test` / `make bench` (standard library only).

    python3 tools/env.py python      print the interpreter the make targets use
    python3 tools/env.py ensure      create / update that environment (prints what it does)
    python3 tools/env.py check       exit 1 (and say why) unless the environment is complete
    python3 tools/env.py lock        regenerate requirements/lock.txt in a scratch venv

Two modes, picked once per checkout (``TOKENKERNELS_ENV=venv|system`` forces one):

* ``venv`` (the default): a project-local virtual environment (``.venv``, or ``TOKENKERNELS_VENV``)
  that sees none of the machine's packages, with exactly the versions of
  ``requirements/lock.txt`` (torch 2.13.0 CPU, transformers, pytest, ...). A stamp file holds a
  hash of the lock: when it matches, nothing is installed and nothing is fetched (offline).
* ``system``: chosen automatically when the interpreter that runs this script already holds a
  CUDA build of torch (a GPU machine, e.g. torch 2.11.0+cu130 without internet). That torch is
  kept and the interpreter is used as it is; only requirements of ``requirements/direct.txt``
  that are missing (or, for transformers, outside the supported range) are installed, pinned to
  the lock's versions -- offline that works from carried wheels (``PIP_FIND_LINKS=DIR
  PIP_NO_INDEX=1``). Nothing is installed when everything is present.

Where ``nvcc`` exists, the CUTLASS/CuTe headers (``requirements/cuda.txt``) are installed too.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
LOCK = REQ / "lock.txt"
DIRECT = REQ / "direct.txt"
CUDA_REQ = REQ / "cuda.txt"
STAMP_NAME = ".tokenkernels-env"
TOOLS_ON_PATH = ("cmake", "ninja")   # system mode: the PyPI package or a binary on PATH


def say(msg: str) -> None:
    print(f"tools/env.py: {msg}", file=sys.stderr, flush=True)


def venv_dir() -> Path:
    return Path(os.environ.get("TOKENKERNELS_VENV", ROOT / ".venv")).resolve()


def venv_python(v: Path) -> Path:
    return v / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def torch_cuda_of_this_interpreter() -> str | None:
    """The CUDA version of the torch this interpreter would import (None: no torch / CPU build),
    read from torch/version.py without importing torch (fast)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    vfile = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        text = vfile.read_text()
    except OSError:
        return None
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None


def mode() -> str:
    forced = os.environ.get("TOKENKERNELS_ENV", "").strip().lower()
    if forced in ("venv", "system"):
        return forced
    if forced:
        raise SystemExit(f"tools/env.py: TOKENKERNELS_ENV must be 'venv' or 'system', got {forced!r}")
    if venv_python(venv_dir()).exists():
        return "venv"
    return "system" if torch_cuda_of_this_interpreter() else "venv"


def interpreter() -> Path:
    return Path(sys.executable) if mode() == "system" else venv_python(venv_dir())


# ------------------------------------------------------------------ requirement files
# A direct requirement whose line carries this tag is installed in venv mode (it is in the lock)
# but not demanded in system mode: a GPU machine has no package index, and its tests and bench
# treat these packages as optional (gpu_proof carries the bench peers' wheels itself).
OPTIONAL_TAG = "[optional on a system python]"


def read_reqs(path: Path, system: bool = False) -> list[str]:
    """The requirements of a requirements file; ``system``: without the ones tagged
    OPTIONAL_TAG."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or (system and OPTIONAL_TAG in raw):
            continue
        out.append(line)
    return out


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def split_req(req: str) -> tuple[str, str]:
    m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", req)
    if not m:
        raise SystemExit(f"tools/env.py: cannot read requirement {req!r}")
    return m.group(1), m.group(2).replace(" ", "")


def _vt(v: str) -> tuple:
    parts = []
    for p in re.split(r"[.+]", v):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def satisfies(version: str, spec: str) -> bool:
    """A small subset of PEP 440 specifiers: comma-separated ==, >=, <=, >, <, != on release
    numbers (enough for requirements/direct.txt)."""
    if not spec:
        return True
    have = _vt(version)
    for clause in spec.split(","):
        m = re.match(r"(==|>=|<=|!=|>|<)(.+)", clause)
        if not m:
            raise SystemExit(f"tools/env.py: unsupported specifier {clause!r}")
        op, want = m.group(1), _vt(m.group(2))
        n = max(len(have), len(want))
        a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
        if op == "==" and a[:len(want)] != want:
            return False
        ok = {">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b, "!=": a != b, "==": True}[op]
        if not ok:
            return False
    return True


def installed_versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))")
    import json

    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout
    return {norm(k): v for k, v in json.loads(out).items()}


def lock_pins() -> dict[str, str]:
    pins = {}
    for r in read_reqs(LOCK):
        name, spec = split_req(r)
        if spec.startswith("=="):
            pins[norm(name)] = f"{name}{spec}"
    return pins


def fingerprint(m: str) -> str:
    h = hashlib.sha256()
    for p in (LOCK, CUDA_REQ):
        h.update(p.read_bytes())
    h.update(f"{m}|{bool(nvcc())}|{sys.version_info[:2]}".encode())
    return h.hexdigest()


def pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    say("$ " + " ".join(cmd))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise SystemExit(
            "tools/env.py: pip failed. Offline, carry the wheels and point pip at them: "
            "PIP_FIND_LINKS=/path/to/wheels PIP_NO_INDEX=1 make test")


# ------------------------------------------------------------------ commands
def cuda_extras(python: Path, have: dict[str, str]) -> list[str]:
    if not nvcc():
        return []
    missing = []
    for r in read_reqs(CUDA_REQ):
        name, spec = split_req(r)
        v = have.get(norm(name))
        if v is None or not satisfies(v, spec):
            missing.append(r)
    return missing


def system_missing(have: dict[str, str]) -> list[str]:
    """System mode: the lock's pins of the direct requirements the interpreter lacks (any torch
    already there is kept; a cmake / ninja binary on PATH counts as present)."""
    pins = lock_pins()
    missing = []
    for r in read_reqs(DIRECT, system=True):
        name, spec = split_req(r)
        v = have.get(norm(name))
        if norm(name) == "torch" and v is not None:
            continue                                        # keep the machine's torch
        if v is None and norm(name) in TOOLS_ON_PATH and shutil.which(norm(name)):
            continue                                        # a cmake / ninja binary will do
        if v is None or not satisfies(v, spec):
            missing.append(pins.get(norm(name), r))
    return missing


def ensure() -> Path:
    m = mode()
    if m == "system":
        python = Path(sys.executable)
        cuda = torch_cuda_of_this_interpreter()
        say(f"using {python} as it is (it holds a CUDA torch{f', CUDA {cuda}' if cuda else ''}; "
            f"TOKENKERNELS_ENV=venv for a locked venv instead)")
        have = installed_versions(python)
        missing = system_missing(have)
        if missing:
            pip(python, *missing)
        extra = cuda_extras(python, have)
        if extra:
            pip(python, "--no-deps", *extra)
        if not missing and not extra:
            say("every requirement is present (nothing installed)")
        return python

    v = venv_dir()
    python = venv_python(v)
    stamp = v / STAMP_NAME
    want = fingerprint(m)
    if python.exists() and stamp.exists() and stamp.read_text().strip() == want:
        say(f"{v} matches {LOCK.relative_to(ROOT)} (nothing installed)")
        return python
    if not python.exists():
        say(f"creating the virtual environment {v} (sees none of the machine's packages)")
        r = subprocess.run([sys.executable, "-m", "venv", str(v)])
        if r.returncode != 0 or not python.exists():
            raise SystemExit(f"tools/env.py: `{sys.executable} -m venv {v}` failed; install the venv "
                             "module (Debian: apt-get install python3-venv)")
    pip(python, "-q", "-r", str(LOCK))
    extra = cuda_extras(python, installed_versions(python))
    if extra:
        pip(python, "-q", "--no-deps", *extra)
    stamp.write_text(want + "\n")
    say(f"{v} is ready: exactly {LOCK.relative_to(ROOT)}")
    return python


def check() -> int:
    python = interpreter()
    if not python.exists():
        print(f"tools/env.py: no environment yet ({python}); run make deps", file=sys.stderr)
        return 1
    have = installed_versions(python)
    bad = []
    reqs = read_reqs(LOCK) if mode() == "venv" else read_reqs(DIRECT, system=True)
    for r in reqs:
        name, spec = split_req(r)
        v = have.get(norm(name))
        if mode() == "system" and norm(name) == "torch" and v is not None:
            continue
        if mode() == "system" and v is None and norm(name) in TOOLS_ON_PATH and shutil.which(norm(name)):
            continue
        if v is None or not satisfies(v, spec):
            bad.append(f"{r} (have {v or 'none'})")
    if bad:
        print("tools/env.py: not satisfied: " + ", ".join(bad), file=sys.stderr)
        return 1
    print(f"tools/env.py: {python} satisfies {'the lock' if mode() == 'venv' else 'direct.txt'}")
    return 0


def lock() -> int:
    """Resolve requirements/direct.txt in a scratch venv and freeze it into requirements/lock.txt."""
    with tempfile.TemporaryDirectory() as tmp:
        v = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(v)], check=True)
        py = venv_python(v)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(DIRECT)], check=True)
        frozen = subprocess.run([str(py), "-m", "pip", "freeze", "--all", "--exclude", "pip"],
                                check=True, capture_output=True, text=True).stdout
    lines = []
    for line in frozen.splitlines():
        name, spec = split_req(line)
        if spec.startswith("==") and "+" in spec:          # torch==2.13.0+cpu -> torch==2.13.0
            spec = spec.split("+", 1)[0]
        lines.append(f"{name}{spec}")
    header = ("# Exact versions `make test` / `make bench` install into .venv (generated by "
              "`make lock` from requirements/direct.txt;\n# Python "
              f"{sys.version_info[0]}.{sys.version_info[1]}, Linux x86-64). CI tests exactly these.\n")
    LOCK.write_text(header + "\n".join(sorted(lines, key=str.lower)) + "\n")
    print(f"wrote {LOCK} ({len(lines)} packages)")
    return 0


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "python"
    if cmd == "python":
        print(interpreter())
        return 0
    if cmd == "ensure":
        ensure()
        return 0
    if cmd == "check":
        return check()
    if cmd == "lock":
        return lock()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
