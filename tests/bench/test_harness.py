"""The one bench harness (tokenkernels.bench.harness): rows as implementation -> timing maps with
their baselines, ratios computed by the printer and the CSV writer, the timer's schedule, and the
C++ binary's JSON rows going through the same printer (tokenkernels.bench.cpp)."""
import io
import json
import math
import subprocess
import sys

import pytest
import torch

import tokenkernels
from tokenkernels.bench import cpp, harness
from tokenkernels.bench.harness import Row, Timing
from tokenkernels.testing import MEDUSA_63


def _row():
    r = Row("kcenter", "case A", baselines=("divprune_style", "gemm"))
    r.add("tokenkernels", Timing(2.0, 10, math.nan, 1.5), work=4e9, metrics={"picks=ref": "56/56"})
    r.add("divprune_style", Timing(8.0, 3), work=4e9)
    r.add("gemm", Timing(1.0, 10), work=1e9, bytes=True)
    return r


def test_ratios_are_computed_from_the_timings():
    r = _row()
    assert r.ratio("tokenkernels", "divprune_style") == 4.0
    assert r.ratio("tokenkernels", "gemm") == 0.5
    assert math.isnan(r.ratio("tokenkernels", "missing"))
    r.results["gemm"].timing.ms = 4.0          # nothing stored: a new time, a new ratio
    assert r.ratio("tokenkernels", "gemm") == 2.0


def test_table_columns_and_cells():
    lines = harness.table([_row()]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["case", "impl", "median ms", "min ms", "GFLOP/s or GB/s", "vs divprune_style",
                    "vs gemm", "picks=ref", "n"]
    ours = [c.strip() for c in lines[2].strip("|").split("|")]
    assert ours == ["case A", "tokenkernels", "2.00", "1.50", "2000.0 GFLOP/s", "4.00x", "0.50x",
                    "56/56", "10"]
    gemm = [c.strip() for c in lines[4].strip("|").split("|")]
    assert gemm[0] == "" and gemm[4] == "1000.0 GB/s" and gemm[7] == "-"
    assert lines[-1].startswith("vs X = X's median / this one's")


def test_table_with_a_different_baseline_per_case():
    a = Row("tree", "build", baselines=("reference",))
    a.add("tokenkernels", Timing(1.0, 1))
    a.add("reference", Timing(3.0, 1))
    b = Row("tree", "attention", baselines=("sdpa_dense_mask", "sdpa_no_mask_decode"))
    b.add("tokenkernels", Timing(2.0, 1))
    b.add("sdpa_dense_mask", Timing(4.0, 1))
    b.add("sdpa_no_mask_decode", Timing(1.0, 1))
    lines = harness.table([a, b]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[5:7] == ["vs baseline", "vs sdpa_no_mask_decode"]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:7]]
    assert [c[5] for c in cells] == ["3.00x", "base", "2.00x", "base", "4.00x"]
    assert [c[6] for c in cells] == ["-", "-", "0.50x", "0.25x", "1.00x"]


def test_csv_round_trip(tmp_path):
    path = tmp_path / "r.csv"
    sub = Row("cross_entropy", "case A fwd", baselines=("torch",))
    sub.add("tokenkernels", Timing(0.25, 3, 0.5, 0.2), work=1e6)
    sub.add("torch", Timing(1.0, 1), work=1e6)
    harness.write_csv(str(path), [_row(), sub], "cpu")
    text = path.read_text().splitlines()
    assert text[0].split(",") == harness.CSV_COLUMNS
    assert text[0].startswith("family,case,impl,device,median_ms,repeats,rate,rate_unit")   # gpu_proof
    assert "divprune_style;gemm,4;0.5," in text[1]
    rows, device = harness.read_csv(str(path))
    assert device == "cpu" and [r.case for r in rows] == ["case A", "case A fwd"]
    assert rows[0].baselines == ("divprune_style", "gemm")
    assert list(rows[0].results) == ["tokenkernels", "divprune_style", "gemm"]
    t = rows[0].results["tokenkernels"]
    assert (t.timing.ms, t.timing.min_ms, t.timing.n) == (2.0, 1.5, 10)
    assert t.metrics == {"picks=ref": "56/56"} and t.rate == pytest.approx(2000.0)
    assert rows[0].results["gemm"].bytes and rows[1].results["tokenkernels"].timing.other == 0.5
    assert rows[1].ratio("tokenkernels", "torch") == 4.0


def test_committed_results_are_in_the_harness_format():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "bench" / "results"
    files = sorted(folder.glob("*_cpu.csv"))
    assert {f.stem for f in files} == {"cross_entropy_cpu", "integrations_cpu", "kcenter_cpu",
                                       "kv_select_cpu", "spec_cpu", "tree_cpu"}
    for f in files:
        rows, device = harness.read_csv(str(f))
        assert device == "cpu" and rows, f
        for r in rows:
            assert set(r.baselines) <= set(r.results), (f.name, r.case)


@pytest.mark.parametrize("cuda", [False, True])
def test_schedule(cuda):
    s = harness.schedule(cuda, quick=True, slow=False)
    assert (s.repeats, s.warmup, s.budget_s) == ((10, 2, 1.0) if cuda else (3, 1, 0.5))
    s = harness.schedule(cuda, quick=False, slow=True)
    assert s.repeats == (5 if cuda else 3) and s.min_repeats == 3 and not s.forced
    s = harness.schedule(cuda, quick=False, slow=True, repeats=7)
    assert s.forced and s.repeats == 3
    assert harness.schedule(cuda, quick=False, slow=False, repeats=7).repeats == 7


def test_cpu_timer_median_and_min():
    calls = []
    t = harness.Timer(torch.device("cpu"), quick=False, repeats=5).measure(lambda: calls.append(1))
    assert t.n == 5 and len(calls) == 6          # one warm-up
    assert 0 <= t.min_ms <= t.ms


# ------------------------------------------------------------------------------ the C++ rows
def _lines():
    row = {"type": "row", "family": "kcenter", "case": "kcenter first B1 N576 D4096 k56",
           "baselines": ["aten_divprune_style", "aten_gemm"],
           "results": {"tokenkernels": {"median_ms": 1.0, "min_ms": 0.9, "n": 10, "other": None,
                                        "work": 2e9, "bytes": False, "metrics": {"picks=ref": "56/56"}},
                       "aten_divprune_style": {"median_ms": 5.0, "min_ms": 5.0, "n": 3, "other": None,
                                               "work": 2e9, "bytes": False, "metrics": {}},
                       "aten_gemm": {"median_ms": 0.5, "min_ms": 0.5, "n": 10, "other": None,
                                     "work": 1e9, "bytes": False, "metrics": {}}}}
    return [json.dumps({"type": "start", "device": "cpu", "torch": "2.13.0", "threads": 2, "mode": "quick"}),
            json.dumps({"type": "family", "name": "kcenter", "description": "greedy k-center"}),
            json.dumps(row),
            json.dumps({"type": "note", "family": "kcenter", "text": "batch scaling: 8x"}),
            json.dumps({"type": "end_family", "name": "kcenter"})]


def test_cpp_rows_go_through_the_python_printer():
    out, err = io.StringIO(), io.StringIO()
    runner = cpp.Runner(out=out, err=err)
    assert all(runner.handle(ln) is None for ln in _lines())
    runner.finish()
    text = out.getvalue()
    assert "## kcenter" in text and "batch scaling: 8x" in text
    head = next(ln for ln in text.splitlines() if ln.startswith("| case"))
    assert "vs aten_divprune_style" in head and "vs aten_gemm" in head and "picks=ref" in head
    ours = next(ln for ln in text.splitlines() if "| tokenkernels" in ln)
    assert "5.00x" in ours and "0.50x" in ours and "56/56" in ours
    assert "[1] kcenter first B1 N576 D4096 k56: tokenkernels 1.00 ms, aten_divprune_style 5.00 ms" in err.getvalue()
    assert runner.rows[0].ratio("tokenkernels", "aten_divprune_style") == 5.0


def test_cpp_control_lines():
    runner = cpp.Runner(wait_idle=0.01, out=io.StringIO(), err=io.StringIO())
    assert runner.handle('{"type": "ready"}') == "go"
    reply = runner.handle('{"type": "measured", "ms": 1.0}')
    assert reply == "again" or reply.startswith("keep ")
    assert cpp.Runner(out=io.StringIO()).handle("not json") is None


def test_the_binary_gets_medusa63_from_the_python_tree():
    args = cpp.binary_args(cpp.parse_args(["--family", "tree", "--quick"]))
    parents = [int(x) for x in args[args.index("--medusa63") + 1].split(",")]
    assert parents == tokenkernels.tree.from_paths(MEDUSA_63).tolist() and len(parents) == 64
    assert "--medusa63" not in cpp.binary_args(cpp.parse_args(["--family", "kcenter"]))
    assert "--control" in cpp.binary_args(cpp.parse_args(["--wait-idle", "2"]))


def _binary():
    exe = cpp.binary_path()
    if not exe.exists():   # built by every pip install unless TOKENKERNELS_BENCH=0
        pytest.skip(f"{exe} not built (TOKENKERNELS_BENCH=0)")
    return exe


def test_binary_prints_json_rows():
    exe = _binary()
    args = cpp.binary_args(cpp.parse_args(["--family", "tree", "--quick", "--repeats", "1"]))
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, check=True)
    msgs = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [m["type"] for m in msgs[:2]] == ["start", "family"] and msgs[-1]["type"] == "end_family"
    rows = [Row.from_json(m) for m in msgs if m["type"] == "row"]
    assert [r.case for r in rows][:2] == ["tree build B1 n64", "tree build B1 n256"]
    for r in rows:
        assert "tokenkernels" in r.results and set(r.baselines) <= set(r.results)
        assert r.results["tokenkernels"].timing.ms > 0
    assert all(r.results["tokenkernels"].metrics.get("check") == "mask+depth" for r in rows if "build" in r.case)
    # without the tree's parents the binary refuses the tree family
    bad = subprocess.run([str(exe), "--family", "tree"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--medusa63" in bad.stderr


def test_runner_end_to_end(tmp_path):
    _binary()
    csv_path = tmp_path / "cpp.csv"
    res = subprocess.run([sys.executable, "-m", "tokenkernels.bench.cpp", "--family", "kv_select", "--quick",
                          "--repeats", "1", "--csv", str(csv_path)], capture_output=True, text=True,
                         timeout=600, check=True)
    assert "## kv_select" in res.stdout and "vs sdpa_grouped" in res.stdout
    assert "[1] select+decode fp32 N8192" in res.stderr
    rows, device = harness.read_csv(str(csv_path))
    assert device == "cpu" and len(rows) == 7   # fp32: select+decode, cache hit, score, topk; bf16: 3
