"""The benchmark CLI (python -m tokenkernels.bench): quick by default, --full, the case plan
every family exposes (and runs exactly), the time-left estimate, and the default output files."""
import csv
import math
import re

import pytest
import torch

from tokenkernels import bench
from tokenkernels.bench import Context, Progress, Timing, fmt_duration

# Cases per family on CPU: the quick run (the default) and --full.
EXPECTED = {
    "quick": {"cross_entropy": 2, "integrations": 4, "kcenter": 7, "kv_select": 2, "spec": 2,
              "tree": 8},
    "full": {"cross_entropy": 4, "integrations": 4, "kcenter": 7, "kv_select": 2, "spec": 2,
             "tree": 10},
}
PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] (.+?): .*\| elapsed .+, ~.+ left$")


# ------------------------------------------------------------------------------ arguments
def test_default_is_quick():
    a = bench.parse_args([])
    assert a.quick is True and a.family == "all" and a.no_files is False


def test_full_flag():
    assert bench.parse_args(["--full"]).quick is False


def test_quick_is_an_alias_of_the_default():
    assert bench.parse_args(["--quick"]).quick is True
    assert vars(bench.parse_args(["--quick"])) == vars(bench.parse_args([]))


def test_quick_and_full_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--full"])
    assert "not allowed with" in capsys.readouterr().err


# ------------------------------------------------------------------------------ case plan
@pytest.mark.parametrize("mode", ["quick", "full"])
def test_case_counts(mode):
    quick = mode == "quick"
    p = bench.plan(sorted(bench.FAMILIES), quick)
    assert {f: len(c) for f, c in p} == EXPECTED[mode]
    for f, labels in p:
        assert len(set(labels)) == len(labels), f"{f}: duplicate case labels {labels}"
    prog = Progress(p, bench.CASE_SECONDS[mode])
    assert prog.total == sum(EXPECTED[mode].values())
    assert prog.start_line().startswith(f"{prog.total} cases in 6 families")
    assert "expected ~" in prog.start_line()
    assert set(bench.CASE_SECONDS[mode]) == set(bench.FAMILIES)


def test_case_counts_cuda():
    # cross_entropy runs bf16 only on CUDA; the other families do the same cases
    assert len(bench.family_cases("cross_entropy", True, cuda=True)) == 1
    assert len(bench.family_cases("cross_entropy", False, cuda=True)) == 2
    # kv_select adds on CUDA the impl comparisons of issue #13: the attention core (sparse_decode
    # B = 1 and 64, sparse_prefill), top-k alone (B = 1 and 64) and scoring (B = 1 and 4)
    assert len(bench.family_cases("kv_select", True, cuda=True)) == EXPECTED["quick"]["kv_select"] + 3 + 2 + 2
    # kcenter adds the issue #13 shape (B = 8, N = 2880, k = 288) for both start rules
    assert len(bench.family_cases("kcenter", True, cuda=True)) == EXPECTED["quick"]["kcenter"] + 2
    for f in ("integrations", "spec", "tree"):
        assert len(bench.family_cases(f, True, cuda=True)) == EXPECTED["quick"][f]


class _NoTiming(Context):
    """Runs a family's code without timing anything (each measurement: 1 ms, not called)."""

    def time(self, fn, slow=False):
        return Timing(1.0, 1, math.nan)


def _run_untimed(name, quick=True):
    mod = __import__(bench.FAMILIES[name], fromlist=["run"])
    labels = bench.family_cases(name, quick)
    prog = Progress([(name, labels)], {name: 1.0})
    ctx = _NoTiming(torch.device("cpu"), quick, None, progress=prog)
    prog.begin_family(name)
    mod.run(ctx)
    line = prog.end_family()
    assert line.startswith(f"[{name}] {len(labels)} cases, "), line   # none skipped or extra
    return labels, ctx


def test_kcenter_runs_its_listed_cases(monkeypatch):
    from tokenkernels.bench import kcenter

    # same structure, small features: the listed labels follow the constants
    monkeypatch.setattr(kcenter, "D", 64)
    monkeypatch.setattr(kcenter, "SHAPES", [(1, 576, 8), (8, 576, 8)])
    monkeypatch.setattr(kcenter, "COVERAGE", (10, 576, 8))
    labels, ctx = _run_untimed("kcenter")
    assert len(labels) == 5
    assert ctx.case_labels == labels
    assert [r.case for r in ctx.rows if "tokenkernels" in r.results] == labels
    assert all(r.baselines and set(r.baselines) <= set(r.results) for r in ctx.rows)


def test_cross_entropy_runs_its_listed_cases(monkeypatch):
    from tokenkernels.bench import cross_entropy

    monkeypatch.setattr(cross_entropy, "cpu_peak_extra", lambda *a: 0.0)   # no subprocess
    monkeypatch.setattr(cross_entropy, "CPU_QUICK", [(64, 32, 1000)])
    labels, ctx = _run_untimed("cross_entropy")
    assert labels == ["lce N64 D32 V1000 float32", "lce N64 D32 V1000 bfloat16"]
    assert ctx.case_labels == labels


def test_integrations_failed_part_is_counted_as_skipped(monkeypatch):
    from tokenkernels.bench import integrations

    def broken(ctx):
        raise RuntimeError("no model here")

    def one(ctx):
        row = bench.Row("integrations", integrations.loss_labels(ctx.quick, ctx.cuda)[0])
        row.add("hf", Timing(1.0, 1))
        ctx.add(row, 0.0)

    parts = ((one, integrations.loss_labels), (broken, integrations.tokenselect_labels),
             (broken, integrations.visual_labels))
    monkeypatch.setattr(integrations, "PARTS", parts)
    prog = Progress([("integrations", integrations.cases(True)), ("tree", ["t"])], None)
    ctx = Context(torch.device("cpu"), True, None, progress=prog)
    prog.begin_family("integrations")
    integrations.run(ctx)
    assert ctx.case_labels == integrations.loss_labels(True, False)
    assert "1 of 4 cases ran (3 skipped)" in prog.end_family()
    assert prog.done == 4 and prog.total == 5
    assert any("no model here" in n for n in ctx.notes)


@pytest.mark.parametrize("family", ["tree", "kv_select"])
def test_progress_lines_and_files_of_a_real_run(family, capsys, tmp_path, monkeypatch):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--family", family, "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    labels = bench.family_cases(family, True)
    lines = [m for m in map(PROGRESS.match, err.splitlines()) if m]
    assert [m.group(3) for m in lines] == labels
    assert [int(m.group(1)) for m in lines] == list(range(1, len(labels) + 1))
    assert {int(m.group(2)) for m in lines} == {len(labels)}
    assert f"quick run, {len(labels)} cases in 1 families ({family} {len(labels)})" in err
    assert re.search(rf"done, {len(labels)} cases, total wall time \d+ s", err)
    assert re.search(r"^wall time: .+ import to last table", out, re.M)
    # files: the default names, and every table row in the CSV
    csv_path = tmp_path / "bench" / "results" / f"latest_cpu_quick_{family}.csv"
    png_path = csv_path.with_suffix(".png")
    assert f"wrote {csv_path.relative_to(tmp_path)}" in err
    assert png_path.stat().st_size > 1000
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows if r["impl"].startswith("tokenkernels")][:1] == labels[:1]
    assert sorted({r["case"] for r in rows}) == sorted(labels)


# ------------------------------------------------------------------------------ estimate
@pytest.mark.parametrize("s, text", [
    (0, "0 s"), (0.4, "0 s"), (48, "48 s"), (59.6, "1 min"), (60, "1 min"), (70, "1 min 10 s"),
    (599, "9 min 59 s"), (630, "11 min"), (3599, "1 h"), (3725, "1 h 2 min"), (-3, "0 s"),
    (math.nan, "?"), (None, "?"), (math.inf, "?"),
])
def test_fmt_duration(s, text):
    assert fmt_duration(s) == text


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_estimate_weighted_by_family_costs():
    clock = _Clock()
    p = Progress([("a", ["a1", "a2"]), ("b", ["b1"])], {"a": 2.0, "b": 1.0}, clock=clock)
    assert p.total == 3 and p.left() == 5.0
    assert p.start_line() == "3 cases in 2 families (a 2, b 1), expected ~5 s on a quiet 2-core CPU"
    p.begin_family("a")
    clock.t += 4.0                 # the machine runs 2x slower than the table
    assert p.case_done() == ("[1/3]", "elapsed 4 s, ~6 s left")     # (2 + 1) x 2
    clock.t += 4.0
    assert p.case_done() == ("[2/3]", "elapsed 8 s, ~2 s left")     # 1 x 2
    assert p.end_family() == "[a] 2 cases, 8 s"
    p.begin_family("b")
    clock.t += 2.0
    assert p.case_done() == ("[3/3]", "elapsed 10 s, ~0 s left")


def test_estimate_without_typical_figures():
    clock = _Clock()
    p = Progress([("x", ["1", "2", "3", "4"])], None, clock=clock)
    assert math.isnan(p.left()) and "expected" not in p.start_line()
    p.begin_family("x")
    clock.t += 10.0
    assert p.case_done() == ("[1/4]", "elapsed 10 s, ~30 s left")   # per finished case
    # relative weights only (e.g. --repeats): no expected total up front
    assert "expected" not in Progress([("x", ["1"])], {"x": 5.0}, absolute=False).start_line()


# ------------------------------------------------------------------------------ output files
def test_default_outputs_in_bench_results(tmp_path):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    cpu = torch.device("cpu")
    assert bench.default_outputs(cpu, True, cwd=str(tmp_path)) == (
        "bench/results/latest_cpu_quick.csv", "bench/results/latest_cpu_quick.png")
    assert bench.default_outputs(torch.device("cuda", 0), False, cwd=str(tmp_path)) == (
        "bench/results/latest_cuda_full.csv", "bench/results/latest_cuda_full.png")
    assert bench.default_outputs(cpu, True, "kcenter", cwd=str(tmp_path))[0] == \
        "bench/results/latest_cpu_quick_kcenter.csv"


def test_default_outputs_without_bench_results(tmp_path):
    assert bench.default_outputs(torch.device("cpu"), False, cwd=str(tmp_path)) == (
        "latest_cpu_full.csv", "latest_cpu_full.png")


def test_output_overrides_and_no_files(tmp_path):
    cpu = torch.device("cpu")
    paths = lambda *argv: bench.output_paths(bench.parse_args(list(argv)), cpu, cwd=str(tmp_path))  # noqa: E731
    assert paths() == ("latest_cpu_quick.csv", "latest_cpu_quick.png")
    assert paths("--full", "--csv", "a.csv") == ("a.csv", "latest_cpu_full.png")
    assert paths("--plot", "p.png") == ("latest_cpu_quick.csv", "p.png")
    assert paths("--no-files") == (None, None)
    assert paths("--no-files", "--csv", "a.csv") == ("a.csv", None)


def test_progress_line_names_sub_case_rows(capsys):
    ctx = Context(torch.device("cpu"), True, None)
    ctx.total_cases = 1
    a, b = bench.Row("x", "lce A"), bench.Row("x", "lce A fwd")
    a.add("tokenkernels", Timing(1.0, 1))
    a.add("torch", Timing(2.0, 1))
    b.add("tokenkernels", Timing(0.5, 1))
    ctx.add([a, b], 0.0)
    line = capsys.readouterr().err
    assert line.startswith("[1/1] lce A: tokenkernels 1.00 ms, torch 2.00 ms, tokenkernels (fwd) 0.500 ms  (")
    assert ctx.case_labels == ["lce A"]


def test_device_defaults_to_auto():
    assert bench.parse_args([]).device == "auto"
    assert bench.parse_args(["--device", "cpu"]).device == "cpu"


def test_spec_runs_its_listed_cases(monkeypatch):
    from tokenkernels.bench import spec

    monkeypatch.setattr(spec, "_sizes", lambda quick: (1, 8))   # 1 prompt, 8 new tokens
    labels, ctx = _run_untimed("spec")
    assert ctx.case_labels == labels == [spec.case_label(m, True) for m in ("greedy", "sampling")]
    greedy, sampling = ctx.rows
    hf = {"hf generate", "hf assisted", "hf prompt_lookup"}
    ours = {"spec model", "spec recycling", "spec lookup"}
    has_loop = spec._import_spec()[0] is not None
    for row in ctx.rows:
        assert row.baselines == ("hf generate", "hf assisted")
        assert set(row.results) == (hf | ours if has_loop else hf), (row.results.keys(), ctx.notes)
    # plain decoding: one target forward per token (the prefill makes the first)
    assert greedy.results["hf generate"].metrics["fwd/tok"] == 1.0
    for impl, r in greedy.results.items():
        assert r.metrics["=greedy"] == "1/1", impl          # every method reproduces plain greedy
        assert r.metrics["tok/fwd"] >= 1.0 and r.metrics["tok/fwd"] * r.metrics["fwd/tok"] == pytest.approx(1)
    assert all("=greedy" not in r.metrics for r in sampling.results.values())
    assert not [n for n in ctx.notes if "failed" in n or "!=" in n], ctx.notes


def test_spec_forward_counter_counts_the_decoder():
    from tokenkernels.bench.spec import ForwardCounter

    lin = torch.nn.Linear(2, 2)
    c = ForwardCounter(lin)
    lin(torch.zeros(1, 2))
    lin(torch.zeros(1, 2))
    c.close()
    lin(torch.zeros(1, 2))
    assert c.n == 2


def test_kv_select_topk_case_runs(monkeypatch):
    """The CUDA-only top-k case (plain vs tuned vs torch.topk), run on the CPU untimed at a small
    width: it builds its row and checks tuned == plain."""
    from tokenkernels.bench import kv_select

    label = kv_select.topk_case_label(2, 8192)
    prog = Progress([("kv_select", [label])], {"kv_select": 1.0})
    ctx = _NoTiming(torch.device("cpu"), True, None, progress=prog)
    prog.begin_family("kv_select")
    row = kv_select._topk_case(ctx, 2, 8192)
    assert row.case == label and ctx.case_labels == [label]
    assert list(row.results) == ["tokenkernels topk plain", "tokenkernels topk tuned", "torch.topk + sort"]
    assert row.results["tokenkernels topk tuned"].metrics == {"tuned=plain": "equal"}
    assert row.baselines == ("tokenkernels topk plain",)


# ------------------------------------------------------------------------------ cross_entropy peers
def test_cross_entropy_full_cpu_shapes():
    from tokenkernels.bench import cross_entropy

    assert cross_entropy.CPU_SHAPES == [(2048, 1024, 32000), (1024, 2048, 128256)]
    assert bench.family_cases("cross_entropy", False) == [
        cross_entropy.case_label(N, D, V, dt) for (N, D, V) in cross_entropy.CPU_SHAPES
        for dt in (torch.float32, torch.bfloat16)]


def test_cross_entropy_fp64_loss_over_vocabulary_chunks():
    from tokenkernels.bench.cross_entropy import fp64_loss, make_inputs

    h, w, t = make_inputs(40, 24, 1000, torch.float32, torch.device("cpu"))
    want = torch.nn.functional.cross_entropy(h.detach().double() @ w.detach().double().T, t,
                                             ignore_index=-100).item()
    for chunk in (None, 999, 300, 256):   # one chunk, a 1-column tail, uneven, even
        assert fp64_loss(h, w, t, chunk=chunk) == pytest.approx(want, rel=1e-12, abs=1e-12)
    t_none = torch.full_like(t, -100)
    assert fp64_loss(h, w, t_none) == 0.0


# the CPU peers: torch's F.linear_cross_entropy paths come with torch 2.13 and CCE / Liger with
# requirements/lock.txt, so each must be present; Liger (Triton only) may fail, as a note
CE_PEERS = ("tokenkernels", "torch", "torch lce", "torch chunked",
            "cut_cross_entropy[torch_compile]", "liger")


def test_cross_entropy_peers_run_or_are_noted(monkeypatch):
    """Every peer on a tiny case, really called (the quick schedule's peers get an untimed
    fwd+bwd first): it has a row with its loss error against fp64, or a note saying it failed."""
    from tokenkernels.bench import cross_entropy

    monkeypatch.setattr(cross_entropy, "cpu_peak_extra", lambda *a: 0.0)   # no subprocess
    monkeypatch.setattr(cross_entropy, "CPU_QUICK", [(48, 32, 777)])
    labels, ctx = _run_untimed("cross_entropy")
    assert not [n for n in ctx.notes if "not importable" in n or "left out" in n], ctx.notes
    both = [r for r in ctx.rows if r.case in labels]
    fwd = [r for r in ctx.rows if r.case.endswith(" fwd")]
    assert [r.case for r in both] == labels and len(fwd) == 2
    for row in both + fwd:
        assert row.baselines == ("torch", "torch chunked")
    for row in both:
        ran = set(row.results)
        noted = {p for p in CE_PEERS if any(n.startswith(f"{row.case}: {p} failed: ") for n in ctx.notes)}
        assert ran | noted == set(CE_PEERS) and not ran & noted, (ran, noted, ctx.notes)
        # everything but Liger runs on the CPU
        assert set(CE_PEERS) - {"liger"} <= ran, ctx.notes
        fp32 = row.case.endswith("float32")
        for impl, r in row.results.items():
            err = r.metrics["abs(loss - fp64)"]
            assert math.isfinite(err) and err >= 0, impl
            # fp32: near-exact; bf16 (loss ~ log(777) ~ 6.7): torch's reference path rounds its
            # logits to bf16 and its chunked path lands ~0.1 off here (what the metric shows)
            assert err < (1e-4 if fp32 else 0.5), (row.case, impl, err)
            assert {"peak extra MB", "extra - grads MB"} <= set(r.metrics)


def test_cross_entropy_missing_peer_is_a_note(monkeypatch):
    import sys

    from tokenkernels.bench import cross_entropy

    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)      # import raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    notes = []
    fns = cross_entropy.impls(torch.device("cpu"), notes)
    assert not any(k.startswith(("cut_cross_entropy", "liger")) for k in fns)
    assert {"tokenkernels", "torch", "torch lce", "torch chunked"} <= set(fns)
    assert any(n.startswith("cut_cross_entropy not importable (ModuleNotFoundError") for n in notes), notes
    assert any(n.startswith("liger_kernel not importable (ModuleNotFoundError") for n in notes), notes
    # the memory subprocess's filter imports no peer package it does not measure
    assert set(cross_entropy.impls(torch.device("cpu"), only="torch chunked")) == {
        "tokenkernels", "torch", "torch lce", "torch chunked"}
    # a torch without F.linear_cross_entropy (the GPU machine's 2.11): both paths left out, noted
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy")
    notes = []
    assert set(cross_entropy.impls(torch.device("cpu"), notes)) == {"tokenkernels", "torch"}
    assert any("'torch lce' and 'torch chunked' left out" in n for n in notes), notes


def test_cross_entropy_peak_memory_of_a_compiled_peer():
    """The fresh-process memory measurement of CCE's torch_compile impl (warm-up compiles it
    first, then the peak above the inputs): a number, not the nan of a failed subprocess."""
    from tokenkernels.bench import cross_entropy

    extra = cross_entropy.cpu_peak_extra(256, 64, 4096, torch.float32,
                                         "cut_cross_entropy[torch_compile]")
    assert math.isfinite(extra) and extra >= 0


# ------------------------------------------------------------------------------ HF loss patch
def test_loss_patch_shape_is_lm_head_bound():
    from tokenkernels.bench import integrations

    V, B, L = integrations._loss_shape(False)
    assert V == 128256 and B * L >= 4096      # fp32 logits of >= 2 GiB against a D256 model
    assert integrations.loss_labels(False, False) == [f"train step llama D256 2L V{V} B{B} L{L}"]


def test_loss_patch_rows_report_time_and_memory_ratios(monkeypatch):
    from tokenkernels.bench import integrations

    monkeypatch.setattr(integrations, "_loss_shape", lambda quick: (512, 1, 16))
    peaks = {False: 400 * 2**20, True: 100 * 2**20}
    monkeypatch.setattr(integrations, "_cpu_step_peak", lambda V, B, L, patched: peaks[patched])
    ctx = _NoTiming(torch.device("cpu"), True, None)
    integrations.bench_loss(ctx)
    row, = ctx.rows
    assert row.baselines == ("hf",) and list(row.results) == ["hf", "tokenkernels"]
    assert row.results["hf"].metrics == {"peak MiB": 400, "mem vs hf": 1.0}
    assert row.results["tokenkernels"].metrics == {"peak MiB": 100, "mem vs hf": 4.0}
    assert any("4.00x less" in n and "the patch is faster" in n for n in ctx.notes), ctx.notes
