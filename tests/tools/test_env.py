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
        "torch": "2.11.0+cu130", "transformers": "5.17.0", "pytest": "9.0.3", "hypothesis": "6.1",
        "numpy": "2.5.2", "matplotlib": "3.10", "ninja": "1.11", "cmake": "3.31",
        "setuptools": "80.9", "wheel": "0.45"}.items()}
    assert env.system_missing(have) == []
    pins = env.lock_pins()
    old_hf = dict(have, transformers="5.16.1")
    assert env.system_missing(old_hf) == [pins["transformers"]]
    no_tools = {k: v for k, v in have.items() if k not in ("cmake", "ninja", "hypothesis")}
    monkeypatch.setattr(env.shutil, "which", lambda name: None)
    assert sorted(env.system_missing(no_tools)) == sorted([pins["cmake"], pins["ninja"], pins["hypothesis"]])
    monkeypatch.setattr(env.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert env.system_missing(no_tools) == [pins["hypothesis"]]
    assert env.system_missing({k: v for k, v in have.items() if k != "torch"})[0] == pins["torch"]
