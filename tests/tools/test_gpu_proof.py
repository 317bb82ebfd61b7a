"""tools/gpu_proof.py (`make gpu-proof`): the parsers of pytest and compute-sanitizer output, the
budget logic, the pytest plugin's restarts, the verdicts, the summary and the dry run. Pure
Python: no build, GPU or torch needed (fast: a few pytest subprocesses on tiny test files)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tools" / "gpu_proof_samples"


def _load():
    spec = importlib.util.spec_from_file_location("tk_gpu_proof", ROOT / "tools" / "gpu_proof.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tk_gpu_proof"] = mod
    spec.loader.exec_module(mod)
    return mod


gp = _load()


# ------------------------------------------------------------------ pytest results
def test_parse_jsonl_results_unfinished_and_cut_lines():
    text = (SAMPLES / "tests_tests_kv_select.jsonl").read_text()
    p = gp.parse_jsonl(text)
    assert len(p["results"]) == 2 and all(r["outcome"] == "passed" for r in p["results"].values())
    assert p["unfinished"]["nodeid"].endswith("test_sparse_prefill[cuda-torch.float16-16-4]")
    smoke = gp.parse_jsonl((SAMPLES / "tests_smoke_cross_entropy.jsonl").read_text())
    failed = [r for r in smoke["results"].values() if r["outcome"] == "failed"]
    assert [r["impl"] for r in failed] == ["tuned"] and "not close" in failed[0]["message"]
    assert smoke["unfinished"] is None


def test_parse_pytest_text_rA_and_verbose():
    p = gp.parse_pytest_text((SAMPLES / "tests_tests_cross_entropy.txt").read_text(),
                             ["auto", "plain", "tuned"])
    outcomes = {k.split("::")[-1]: v["outcome"] for k, v in p["results"].items()}
    assert outcomes == {"test_options_fp32[cuda-plain-mean]": "passed",
                        "test_options_fp32[cuda-softcap-sum]": "passed",
                        "test_impl_vs_reference_with_bias[cuda-torch.float32-tuned]": "passed",
                        "test_options_low_precision_rule[cuda-softcap-torch.bfloat16-mean]": "failed"}
    assert p["counts"] == {"failed": 1, "passed": 3, "skipped": 1, "deselected": 250}
    # "plain" in test_options_fp32 is an option set, not an impl: only *impl* tests get one
    impls = {k.split("::")[-1]: v["impl"] for k, v in p["results"].items()}
    assert impls["test_options_fp32[cuda-plain-mean]"] is None
    assert impls["test_impl_vs_reference_with_bias[cuda-torch.float32-tuned]"] == "tuned"
    fail = next(v for v in p["results"].values() if v["outcome"] == "failed")
    assert fail["message"].startswith("AssertionError: hidden.grad")
    v = gp.parse_pytest_text("tests/tree/test_build.py::test_build_impls[cuda-plain] PASSED  [ 50%]\n"
                             "tests/tree/test_build.py::test_build_impls[cuda-tuned] FAILED  [100%]\n"
                             "========== 1 failed, 1 passed in 0.52s ==========\n")
    assert {r["impl"]: r["outcome"] for r in v["results"].values()} == {"plain": "passed", "tuned": "failed"}
    assert v["counts"] == {"failed": 1, "passed": 1}


# ------------------------------------------------------------------ compute-sanitizer
def test_parse_sanitizer_memcheck_sample_attributes_the_error_to_the_running_test():
    p = gp.parse_sanitizer((SAMPLES / "sanitizer_memcheck.txt").read_text(), "memcheck")
    assert p["summary"] and p["errors"] == 1
    assert p["kernel_errors"] == 1 and p["api_errors"] == 1 and p["ours"] == 1
    k = next(r for r in p["records"] if r["kind"] == "kernel")
    assert k["header"] == "Invalid __global__ read of size 16 bytes"
    assert k["where"].startswith("at void tokenkernels::kv_select::")
    assert k["nodeid"].endswith("test_decode_impls_agree[cuda-tuned]")
    assert (k["family"], k["impl"]) == ("kv_select", "tuned")
    api = next(r for r in p["records"] if r["kind"] == "api")
    assert api["nodeid"] == "" and not api["ours"]        # torch's start-up, before any test
    assert len(p["tests"]) == 12
    assert p["test_impls"]["tests/kv_select/test_cache.py::test_threshold_decides_hits[cuda]"] is None


@pytest.mark.parametrize("text,tool,errors,warnings", [
    ("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n", "memcheck", 0, 0),
    ("========= ERROR SUMMARY: 3 errors\n", "synccheck", 3, 0),
    ("========= ERROR SUMMARY: 1 error\n", "memcheck", 1, 0),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", "racecheck", 0, 0),
    ("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n", "racecheck", 1, 1),
])
def test_parse_sanitizer_summaries(text, tool, errors, warnings):
    p = gp.parse_sanitizer(text, tool)
    assert p["summary"] and (p["errors"], p["warnings"]) == (errors, warnings)


def test_parse_sanitizer_race_and_barrier_records_and_a_cut_run():
    text = textwrap.dedent("""\
        @@gpu-proof start tuned tests/tree/test_attention.py::test_attention_impls[cuda-dtype0-tuned]
        ========= Error: Race reported between Write access at void tokenkernels::tree::(anonymous namespace)::prefix_tuned_kernel(tokenkernels::tree::AttnProblem)+0x1a0 in /r/csrc/tree/tree_kernels.cu:330
        =========     and Read access at void tokenkernels::tree::prefix_tuned_kernel(...)+0x220 in /r/csrc/tree/tree_kernels.cu:341 [256 hazards]
        =========
        @@gpu-proof end tuned tests/tree/test_attention.py::test_attention_impls[cuda-dtype0-tuned]
        @@gpu-proof start - tests/tree/test_attention.py::test_attention_medusa_tree_vs_sdpa[cuda]
        ========= Barrier error detected. Divergent thread(s) in warp
        =========     at 0x3f0 in /r/csrc/tree/tree_kernels.cu:70:tokenkernels::tree::build_kernel
        =========     by thread (37,0,0) in block (0,0,0)
        """)
    p = gp.parse_sanitizer(text, "racecheck", only_ours=True)
    assert not p["summary"]                              # cut before its SUMMARY line
    assert [(r["impl"], r["family"]) for r in p["records"]] == [("tuned", "tree"), (None, "tree")]
    assert p["records"][0]["where"].startswith("and Read access")
    assert p["ours"] == 2 and p["tests"][-1].endswith("medusa_tree_vs_sdpa[cuda]")
    # without the kernel filter, a record counts as ours only when it names tokenkernels / csrc
    other = gp.parse_sanitizer("========= Invalid __global__ write of size 4 bytes\n"
                               "=========     at void at::native::vectorized_elementwise_kernel<4>(...)+0x10\n"
                               "========= ERROR SUMMARY: 1 error\n", "memcheck")
    assert other["kernel_errors"] == 1 and other["ours"] == 0
    # pytest's own "=== ... ===" lines in the same stream (-s) are not records
    noise = gp.parse_sanitizer("=========================== short test summary info ============================\n"
                               "========= 1 passed in 0.20s =========\n========= ERROR SUMMARY: 0 errors\n")
    assert noise["records"] == [] and noise["summary"] and noise["errors"] == 0


# ------------------------------------------------------------------ the budget
class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_schedule_on_time_gives_each_stage_its_plan_and_the_rest_to_the_last():
    c = Clock()
    s = gp.Schedule(gp.scaled_plans(540), 540, clock=c)
    assert sum(p.planned for p in s.plans) + gp.RESERVE == pytest.approx(540)
    got = {}
    for p in s.plans:
        got[p.name] = s.slice(p.name)
        c.t += {"probe": 5, "build": 70}.get(p.name, got[p.name])      # the others use their slice
    assert got["probe"] == 20 and got["smoke"] == 60 and got["bench"] == 100
    assert got["build"] == 300                       # may borrow up to its cap ...
    assert got["tests"] == pytest.approx(60 + 15 + 80)   # ... what probe and build leave goes last
    assert c.t <= 540 - gp.RESERVE + 1e-9            # never past the budget


def test_schedule_slow_build_squeezes_later_stages_in_proportion_and_keeps_the_reserve():
    slices = gp.simulate(540, {"build": 300})
    assert slices["build"] == 300
    later = ["smoke", "sanitizers", "peak", "bench"]
    plans = {p.name: p.planned for p in gp.scaled_plans(540)}
    ratios = [slices[n] / plans[n] for n in later]
    assert max(ratios) < 1 and max(ratios) - min(ratios) < 0.3
    assert all(slices[n] >= gp.StagePlan(n, 0).floor or n == "peak" for n in later)
    assert sum(slices.values()) <= 540 - gp.RESERVE + 1e-6


def test_schedule_no_time_means_below_floor_and_budgets_scale():
    c = Clock()
    s = gp.Schedule(gp.scaled_plans(540), 540, clock=c)
    c.t = 540 - gp.RESERVE - 5
    assert s.slice("bench") < s.plan("bench").floor
    assert s.slice("tests") <= 5
    small = gp.scaled_plans(200)
    assert all(p.planned >= p.floor for p in small)
    assert sum(p.planned for p in small) < 200
    assert gp.sub_slices(90, {"a": 1, "b": 2}) == {"a": 30, "b": 60}
    assert gp.sub_slices(60, {"a": 1, "b": 2, "c": 1}, done=["a"]) == {"b": 40, "c": 20}


def test_run_proc_stops_a_process_at_its_deadline(tmp_path):
    log = tmp_path / "x.log"
    r = gp.run_proc([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(60)"], log, 1.0)
    assert r.stopped and r.elapsed < 2.5
    text = log.read_text()
    assert "hi" in text and "stopped at its deadline" in text
    ok = gp.run_proc([sys.executable, "-c", "raise SystemExit(3)"], log, 10.0)
    assert ok.rc == 3 and not ok.stopped and not ok.ok


# ------------------------------------------------------------------ the plugin + restarts
FAKE_TESTS = '''
import os, signal, time, pytest

FLAG = os.path.join(os.path.dirname(__file__), "flag_{name}")

@pytest.mark.parametrize("impl", ["plain", "tuned"])
@pytest.mark.parametrize("device", ["cuda"])
def test_a(device, impl):
    if impl == "tuned" and "{mode}" == "sticky" and not os.path.exists(FLAG):
        open(FLAG, "w").close()
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if impl == "tuned" and "{mode}" == "crash" and not os.path.exists(FLAG):
        open(FLAG, "w").close()
        os.kill(os.getpid(), signal.SIGSEGV)
    if impl == "tuned" and "{mode}" == "hang":
        time.sleep(60)

def test_b():
    pass
'''


@pytest.mark.parametrize("mode", ["sticky", "crash", "hang", "broken"])
def test_runner_restarts_after_sticky_errors_and_crashes(tmp_path, mode):
    d = tmp_path / "fake"
    d.mkdir()
    (d / "test_fake.py").write_text(FAKE_TESTS.format(name=mode, mode=mode) + ("def (:\n" if mode == "broken" else ""))
    args = gp.parse_args(["--results", str(tmp_path / "res"), "--work", str(tmp_path / "work")])
    r = gp.Runner(args, gp.Console())
    r.work.mkdir(parents=True)
    r.py, r.cwd = sys.executable, d
    r.report["impls"]["fake"] = ["auto", "plain", "tuned"]
    r.min_run = 1.0
    r.selection = lambda stage, family: [str(d / "test_fake.py"), "-p", "no:hypothesispytest"]
    fam = r.run_tests("smoke", "fake", 3.0 if mode == "hang" else 30.0)
    out = {k.split("::")[-1]: v["outcome"] for k, v in fam["results"].items()}
    if mode == "broken":                              # a collection error: nothing ran, say why
        assert out == {} and "SyntaxError" in fam["stages"]["smoke"]["error"]
        assert not fam["stages"]["smoke"]["complete"] and len(fam["runs"]) == 1
        return
    if mode == "hang":
        assert out == {"test_a[cuda-plain]": "passed", "test_a[cuda-tuned]": "interrupted"}
        assert not fam["stages"]["smoke"]["complete"]
        assert fam["results"][next(k for k in fam["results"] if "tuned" in k)]["impl"] == "tuned"
        return
    want = "failed" if mode == "sticky" else "crashed"
    assert out == {"test_a[cuda-plain]": "passed", "test_a[cuda-tuned]": want, "test_b": "passed"}
    assert fam["stages"]["smoke"]["complete"] and len(fam["runs"]) == 2
    assert fam["runs"][0].get("restart")
    tuned = next(v for k, v in fam["results"].items() if "tuned" in k)
    assert tuned["impl"] == "tuned" and tuned["family"] == "fake"


def test_module_impl_attribution():
    """Tests without an ``impl`` parameter count for their module's GPU_PROOF_IMPL (the tuned
    kernels' own test files), else for "auto" (None); a parameter always wins."""
    import types
    sys.path.insert(0, str(Path(gp.__file__).parent))
    import gpu_proof_pytest as plug
    mod = types.SimpleNamespace(GPU_PROOF_IMPL="tuned")
    item = types.SimpleNamespace(nodeid="tests/kcenter/test_tuned_cuda.py::test_x[8-bf16]", module=mod)
    assert plug._describe(item)["impl"] == "tuned" and plug._describe(item)["family"] == "kcenter"
    item.callspec = types.SimpleNamespace(params={"impl": "plain", "device": "cuda"})
    assert plug._describe(item)["impl"] == "plain"
    assert plug._describe(types.SimpleNamespace(nodeid="tests/tree/test_a.py::t", module=types.SimpleNamespace()))["impl"] is None


# ------------------------------------------------------------------ verdicts, summary, results
def _report(results, complete=True, sanitizers=None):
    return {"impls": {"kcenter": ["auto", "plain", "tuned", "stream"]}, "stages": [{"name": "probe", "status": "ok"}],
            "tests": {"kcenter": {"results": {r["nodeid"]: r for r in results}, "complete": complete}},
            "sanitizers": sanitizers or {}}


def _rec(n, impl, outcome):
    return {"nodeid": f"tests/kcenter/test_k.py::t[{n}]", "family": "kcenter", "impl": impl, "outcome": outcome}


def test_proven_pass_partial_fail_untested():
    recs = [_rec(1, None, "passed"), _rec(2, "plain", "passed"), _rec(3, "tuned", "passed"),
            _rec(4, "tuned", "failed"), _rec(5, "stream", "skipped")]
    assert gp.proven(_report(recs)) == {"kcenter": {"auto": "pass", "plain": "pass", "tuned": "fail",
                                                    "stream": "untested"}}
    assert gp.proven(_report(recs[:2], complete=False))["kcenter"]["plain"] == "partial"
    assert gp.proven(_report([_rec(6, "plain", "crashed")]))["kcenter"]["plain"] == "fail"
    san = {"memcheck": {"records": [{"kind": "kernel", "ours": True, "family": "kcenter", "impl": "plain"}],
                        "tests": [], "summary": True}}
    assert gp.proven(_report(recs, sanitizers=san))["kcenter"]["plain"] == "fail"
    other = {"memcheck": {"records": [{"kind": "kernel", "ours": False, "family": "kcenter", "impl": "plain"}]}}
    assert gp.proven(_report(recs, sanitizers=other))["kcenter"]["plain"] == "pass"


def test_summary_of_the_samples_and_the_results_folder(tmp_path):
    report = gp.load_sample_report()
    assert report["proven"]["kv_select"]["tuned"] == "fail"          # the memcheck error
    assert report["proven"]["cross_entropy"]["tuned"] == "fail"      # the smoke failure
    assert report["proven"]["kcenter"]["stream"] == "pass"
    assert report["proven"]["tree"]["plain"] == "partial"            # its full run did not complete
    text = gp.render_summary(report)
    lines = text.splitlines()
    assert lines[-1].startswith("gpu-proof: FAIL; proven.json:")
    assert any(ln.startswith("kv_select     tuned") and ln.rstrip().endswith("fail") for ln in lines)
    ce = next(ln for ln in lines if "lce N2048 D2304 V65536 bfloat16   " in ln)
    assert "288.7 TFLOP/s" in ce and "39%" in ce and "torch 1.53x" in ce and "liger 1.20x" in ce
    assert len(text) < 12000                          # fits the device tool's output tail
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "a.log").write_text("x" * 100)
    files = gp.write_results(report, text, tmp_path / "res", work, gp.Console())
    assert sorted(f.name for f in files) == sorted(gp.RESULT_FILES)
    assert gp.check_results_folder(tmp_path / "res") == []
    assert json.loads((tmp_path / "res" / "proven.json").read_text()) == report["proven"]
    csv_text = (tmp_path / "res" / "bench_cuda.csv").read_text()
    assert csv_text.splitlines()[0] == ",".join(gp.BENCH_COLUMNS) and "liger" in csv_text
    (tmp_path / "res" / "bad name.txt").write_text("")
    assert any("name outside" in p for p in gp.check_results_folder(tmp_path / "res"))


def test_bench_progress_fallback():
    text = ("[3/7] lce N2048 D2304 V65536 bfloat16: tokenkernels 6.41 ms, tokenkernels (fwd) 2.05 ms, "
            "torch 9.82 ms, liger - ms  (4.2 s) | elapsed 12 s, ~20 s left\n")
    rows = gp.parse_bench_progress(text, "cross_entropy")
    assert [(r["case"], r["impl"], r["median_ms"]) for r in rows] == [
        ("lce N2048 D2304 V65536 bfloat16", "tokenkernels", 6.41),
        ("lce N2048 D2304 V65536 bfloat16 fwd", "tokenkernels", 2.05),
        ("lce N2048 D2304 V65536 bfloat16", "torch", 9.82),
        ("lce N2048 D2304 V65536 bfloat16", "liger", None)]


# ------------------------------------------------------------------ wheels, arch, dry run
def test_wheels_names_tags_and_plan(tmp_path):
    w = gp.parse_wheel("nvidia_cutlass-4.2.0.0-py3-none-any.whl")
    assert (w["dist"], w["ver"]) == ("nvidia-cutlass", "4.2.0.0") and gp.wheel_ok(w)[0]
    assert not gp.wheel_ok(gp.parse_wheel("x-1.0-cp311-cp311-manylinux_2_28_x86_64.whl"))[0]
    assert gp.wheel_ok(gp.parse_wheel("x-1.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"))[0]
    assert not gp.wheel_ok(gp.parse_wheel("x-1.0-cp312-cp312-manylinux_2_34_x86_64.whl"), glibc=(2, 28))[0]
    assert gp.wheel_ok(gp.parse_wheel("x-1.0-cp38-abi3-manylinux2014_x86_64.whl"))[0]
    assert not gp.wheel_ok(gp.parse_wheel("x-1.0-cp312-cp312-manylinux_2_28_aarch64.whl"))[0]
    for f in ["nvidia_cutlass-4.2.0.0-py3-none-any.whl", "pytest_timeout-2.4.0-py3-none-any.whl",
              "pytest_timeout-2.3.1-py3-none-any.whl", "setuptools-84.2.1-py3-none-any.whl",
              "junk.whl"]:
        (tmp_path / f).write_bytes(b"")
    plan = gp.plan_wheels(tmp_path, {"setuptools": "80.9.0", "nvidia-cutlass": "4.1.0.0"}, "cp312", (2, 28))
    assert plan["install"] == ["nvidia_cutlass-4.2.0.0-py3-none-any.whl", "pytest_timeout-2.4.0-py3-none-any.whl"]
    assert plan["missing"] == []
    whys = dict(plan["skip"])
    assert "already installed" in whys["setuptools-84.2.1-py3-none-any.whl"]
    assert "older" in whys["pytest_timeout-2.3.1-py3-none-any.whl"] and "junk.whl" in whys
    assert gp.plan_wheels(tmp_path / "none", {}, "cp312", (2, 28))["missing"] == ["nvidia-cutlass==4.2.0.0"]
    cmd = gp.download_command()
    assert "nvidia-cutlass==4.2.0.0" in cmd and "--only-binary=:all:" in cmd and cmd.count("--platform") == 3


@pytest.mark.parametrize("cap,arch", [("9.0", "90a"), ("8.0", "80"), ("8.6", "86"), ("10.0", "100a"), ("12.0", "120")])
def test_arch_for(cap, arch):
    assert gp.arch_for(cap) == arch


def test_impls_are_read_from_the_ops():
    impls = gp.read_impls()
    assert impls["kcenter"] == ["auto", "plain", "simt", "tuned", "stream"]
    assert impls["cross_entropy"] == ["auto", "plain", "wmma", "tuned"]
    assert all(impls[f][:2] == ["auto", "plain"] and "tuned" in impls[f] for f in gp.FAMILIES)
    assert set(gp.SMOKE) == set(gp.SANITIZE) == set(gp.FAMILIES)
    assert all(set(gp.SANITIZE[f]) <= set(gp.SMOKE[f]) for f in gp.FAMILIES)


def test_dry_run(tmp_path, capsys):
    rc = gp.main(["--dry-run", "--no-collect", "--results", str(tmp_path / "res"), "--work", str(tmp_path / "w"),
                  "--wheels", str(tmp_path / "nowheels"), "--budget", "540"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.rstrip().endswith("gpu-proof --dry-run: ok")
    for needle in ("TOKENKERNELS_CUDA=ON TOKENKERNELS_CUDA_ARCHS=90a", "pip install --no-build-isolation",
                   "--tool racecheck", "--kernel-name kernel_substring=tokenkernels", "tokenkernels.bench --device cuda",
                   "WARNING: nvidia-cutlass==4.2.0.0 not carried", "(SAMPLE: rendered from",
                   "schedule for a budget of 540 s"):
        assert needle in out, needle
    assert not (tmp_path / "res").exists()           # a dry run writes no results


def test_make_targets_pass_the_options():
    out = subprocess.run(["make", "-n", "gpu-proof", "DRY_RUN=1", "OUT=/tmp/o", "BUDGET=300"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert "tools/gpu_proof.py" in out and "--dry-run" in out and '--results "/tmp/o"' in out and "--budget 300" in out
    out = subprocess.run(["make", "-n", "gpu-proof", "RESULTS=/tmp/r"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "--dry-run" not in out and '--results "/tmp/r"' in out


def test_a_machine_without_a_cuda_torch_gets_a_summary_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gp, "GPU_PYTHONS", [])
    fake = tmp_path / "python3"                      # an interpreter without torch
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    fake.chmod(0o755)
    rc = gp.main(["--python", str(fake), "--results", str(tmp_path / "res"), "--work", str(tmp_path / "w"),
                  "--budget", "120"])
    out = capsys.readouterr().out
    assert rc == 2
    assert out.rstrip().splitlines()[-1].startswith("gpu-proof: NOT RUN")
    assert "no interpreter with a CUDA torch" in out
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == sorted(gp.RESULT_FILES)
    proven = json.loads((tmp_path / "res" / "proven.json").read_text())
    assert set(proven) == set(gp.FAMILIES) and {v for f in proven.values() for v in f.values()} == {"untested"}
    assert issubclass(gp._Terminated, BaseException) and not issubclass(gp._Terminated, Exception)
