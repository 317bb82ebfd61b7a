"""tools/env.py, the environment behind `make test` / `make bench`: mode choice (a CUDA torch
already on the machine is kept), the lock's consistency with direct.txt and pyproject, and the
small version-specifier matcher it uses without third-party packages."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("tk_env_tool", ROOT / "tools" / "env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


env = _load()


@pytest.mark.parametrize("version,spec,ok", [
    ("5.24.0", ">=5.17,<6", True), ("5.17.0", ">=5.17,<6", True), ("5.16.1", ">=5.17,<6", False),
    ("6.0.0", ">=5.17,<6", False), ("2.13.0+cpu", "==2.13.0", True), ("2.13.1", "==2.13.0", False),
    ("2.11.0+cu130", "==2.13.0", False), ("84.2.1", ">=64", True), ("1.2", "", True),
    ("4.4.5", ">=3.18", True), ("3.17.9", ">=3.18", False), ("1.0", "!=1.0", False),
])
def test_satisfies(version, spec, ok):
    assert env.satisfies(version, spec) is ok


def test_split_req():
    assert env.split_req("transformers>=5.17,<6") == ("transformers", ">=5.17,<6")
    assert env.split_req("typing_extensions==4.16.0") == ("typing_extensions", "==4.16.0")
    assert env.split_req("pytest") == ("pytest", "")


def test_lock_pins_every_direct_requirement_within_its_range():
    pins = env.lock_pins()
    for r in env.read_reqs(env.DIRECT):
        name, spec = env.split_req(r)
        pin = pins.get(env.norm(name))
        assert pin is not None, f"{name} is in direct.txt but not pinned in lock.txt"
        assert env.satisfies(env.split_req(pin)[1][2:], spec), (pin, spec)
    assert pins["torch"] == "torch==2.13.0"


def test_pyproject_extras_declare_the_supported_transformers_range():
    from tokenkernels.integrations._hf_common import TRANSFORMERS_RANGE

    text = (ROOT / "pyproject.toml").read_text()
    direct = {env.norm(env.split_req(r)[0]): env.split_req(r)[1] for r in env.read_reqs(env.DIRECT)}
    assert direct["transformers"] == TRANSFORMERS_RANGE
    assert text.count(f'"transformers{TRANSFORMERS_RANGE}"') >= 2     # the hf and test extras


def _fake_torch(tmp_path, cuda):
    pkg = tmp_path / "site" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('env.py must not import torch')\n")
    (pkg / "version.py").write_text(f"__version__ = '2.11.0'\ncuda: Optional[str] = {cuda!r}\n")
    return tmp_path / "site"


def _mode(tmp_path, site, forced=""):
    code = (f"import importlib.util, sys; sys.path.insert(0, {str(site)!r}); "
            f"s = importlib.util.spec_from_file_location('e', {str(ROOT / 'tools' / 'env.py')!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(m.mode())")
    envvars = {"PATH": "/usr/bin:/bin", "TOKENKERNELS_VENV": str(tmp_path / "no-venv"),
               "TOKENKERNELS_ENV": forced}
    return subprocess.run([sys.executable, "-S", "-c", code], env=envvars, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_mode_keeps_a_cuda_torch_and_locks_everything_else(tmp_path):
    assert _mode(tmp_path, _fake_torch(tmp_path / "a", "13.0")) == "system"
    assert _mode(tmp_path, _fake_torch(tmp_path / "b", None)) == "venv"        # CPU torch
    assert _mode(tmp_path, tmp_path / "empty") == "venv"                       # no torch at all
    assert _mode(tmp_path, _fake_torch(tmp_path / "c", "13.0"), forced="venv") == "venv"


def test_mode_rejects_an_unknown_setting(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as e:
        _mode(tmp_path, tmp_path / "empty", forced="conda")
    assert "TOKENKERNELS_ENV" in e.value.stderr


def test_system_mode_keeps_a_cuda_torch_and_installs_only_what_is_missing(monkeypatch):
    # the GPU machine: torch 2.11.0+cu130, transformers 5.17.0, pip packages for the rest
    have = {env.norm(n): v for n, v in {
        "torch": "2.11.0+cu130", "transformers": "5.17.0", "pytest": "9.0.3",
        "hypothesis": "6.1",
        "numpy": "2.5.2", "matplotlib": "3.10", "ninja": "1.11", "cmake": "3.31",
        "setuptools": "80.9", "wheel": "0.45"}.items()}
    assert env.system_missing(have) == []   # accelerate, CCE, Liger: optional on a system python
    pins = env.lock_pins()
    for name in ("accelerate", "cut-cross-entropy", "liger-kernel"):
        assert name in pins and not any(m.startswith(name) for m in env.system_missing(have))
    old_hf = dict(have, transformers="5.16.1")
    assert env.system_missing(old_hf) == [pins["transformers"]]
    no_tools = {k: v for k, v in have.items() if k not in ("cmake", "ninja", "hypothesis")}
    monkeypatch.setattr(env.shutil, "which", lambda name: None)
    assert sorted(env.system_missing(no_tools)) == sorted([pins["cmake"], pins["ninja"], pins["hypothesis"]])
    monkeypatch.setattr(env.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert env.system_missing(no_tools) == [pins["hypothesis"]]
    assert env.system_missing({k: v for k, v in have.items() if k != "torch"})[0] == pins["torch"]


# ---- packaging metadata: pyproject, README, the lock and the CUDA check agree with what is tested
def _tested_pythons_and_torches():
    """(python, torch) pairs that are tested: the lock (the suite) and tools/cuda_torch_check.sh
    (the CUDA build + import against the GPU machine's torch)."""
    import re
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    lock_py = re.search(r"# Python (3\.\d+), Linux", lock).group(1)
    lock_torch = env.split_req(env.lock_pins()["torch"])[1][2:]
    sh = (ROOT / "tools" / "cuda_torch_check.sh").read_text()
    check_py = re.search(r"sys.version_info\[:2\] != \((3), (\d+)\)", sh).groups()
    check_torch = re.search(r"TORCH_PINS=\(torch==([0-9.]+)\)", sh).group(1)
    return [(lock_py, lock_torch), (".".join(check_py), check_torch)]


def _pyproject():
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _minor(v: str):
    return tuple(int(p) for p in v.split(".")[:2])


def test_pyproject_python_and_torch_ranges_are_what_is_tested():
    proj = _pyproject()
    tested = _tested_pythons_and_torches()
    pythons = sorted({p for p, _ in tested}, key=_minor)
    lo = pythons[0]
    # requires-python: exactly from the oldest tested Python on
    assert proj["requires-python"] == f">={lo}", proj["requires-python"]
    # classifiers: the tested minor versions, no others
    cls = {c.rsplit(" :: ", 1)[1] for c in proj["classifiers"]
           if c.startswith("Programming Language :: Python :: 3.")}
    assert cls == set(pythons), (cls, pythons)
    # torch: every tested release inside the range, the lower end tight (the oldest tested minor)
    (torch_req,) = [d for d in proj["dependencies"] if env.norm(env.split_req(d)[0]) == "torch"]
    spec = env.split_req(torch_req)[1]
    torches = sorted({t for _, t in tested}, key=_minor)
    for t in torches:
        assert env.satisfies(t, spec), (t, spec)
    oldest = _minor(torches[0])
    assert not env.satisfies(f"{oldest[0]}.{oldest[1] - 1}.0", spec), spec
    # the README's words
    readme = (ROOT / "README.md").read_text()
    assert f"Python {lo}+" in readme
    assert f"torch `{spec}`" in readme
    assert "3.10" not in proj["requires-python"]


def test_extension_uses_the_stable_abi_of_the_oldest_python():
    import tokenkernels
    proj = _pyproject()
    lo = _minor(proj["requires-python"][2:])
    assert tokenkernels._C.__file__.endswith("_C.abi3.so"), tokenkernels._C.__file__
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f"Py_LIMITED_API=0x{lo[0]:02X}{lo[1]:02X}0000" in cmake
    setup = (ROOT / "setup.py").read_text()
    assert f'LIMITED_API = "cp{lo[0]}{lo[1]}"' in setup
