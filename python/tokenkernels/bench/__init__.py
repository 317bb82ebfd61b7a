"""Benchmarks of the tokenkernels ops against PyTorch baselines.

    python -m tokenkernels.bench [--family kcenter] [--device cpu|cuda] [--csv FILE]
                                 [--plot FILE.png] [--quick] [--repeats N] [--wait-idle S]

Each family is a module of this package (``tokenkernels.bench.<family>``) exposing
``DESCRIPTION`` and ``run(ctx: Context)``; register it in :data:`FAMILIES`. A family adds
:class:`Row` objects (one per case and implementation) and free-form notes to the context.

Timing: warmup, then the median of the repeats; ``time.perf_counter`` on CPU, a pair of CUDA
events per repeat (after a ``torch.cuda.synchronize``) on CUDA.
Slow baselines (the Python reference loop, the DivPrune-style loop) get fewer repeats, and
every measurement stops early once it has used its time budget (unless ``--repeats`` is given).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

FAMILIES: Dict[str, str] = {
    "kcenter": "tokenkernels.bench.kcenter",
    "cross_entropy": "tokenkernels.bench.cross_entropy",
    "tree": "tokenkernels.bench.tree",
    "integrations": "tokenkernels.bench.integrations",
    "kv_select": "tokenkernels.bench.kv_select",
}


@dataclasses.dataclass
class Timing:
    ms: float = math.nan
    n: int = 0
    other: float = math.nan   # cores other processes kept busy meanwhile (CPU only)


@dataclasses.dataclass
class Row:
    family: str
    case: str              # e.g. "kcenter isolated B1 N576 D4096 k56"
    impl: str              # "tokenkernels", "reference", "divprune_style", "gemm", peers
    timing: Timing
    work: float = 0.0      # flops (rate in GFLOP/s) or bytes (rate in GB/s)
    bytes: bool = False
    speedup_vs_divprune: float = math.nan   # DivPrune-style time / this time
    ratio_vs_gemm: float = math.nan         # this time / one fp32 x @ x.T
    picks: str = ""        # leading picks equal to the reference, e.g. "56/56"
    note: str = ""

    @property
    def rate(self) -> float:
        if not self.work or not self.timing.ms or math.isnan(self.timing.ms):
            return math.nan
        return self.work / (self.timing.ms * 1e-3) / 1e9

    @property
    def unit(self) -> str:
        return "GB/s" if self.bytes else "GFLOP/s"


class Context:
    """What a family's ``run`` gets: options, the timer, and where results go."""

    def __init__(self, device: torch.device, quick: bool, repeats: Optional[int],
                 wait_idle: float = 0.0):
        self.device = device
        self.quick = quick
        self.repeats = repeats
        self.wait_idle = wait_idle
        self.rows: List[Row] = []
        self.notes: List[str] = []
        self._case_no = 0
        self.total_cases = 0
        self._meter = LoadMeter()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], slow: bool = False) -> Timing:
        """Median wall time of ``fn()`` in ms. ``slow``: a baseline timed with fewer repeats.

        With ``wait_idle`` (CPU), first waits for other processes to go quiet, and measures
        again (twice at most) when they kept more than a quarter of a core busy meanwhile."""
        if self.cuda:
            return self._measure(fn, slow)
        t = Timing()
        for _ in range(3 if self.wait_idle > 0 else 1):
            if self.wait_idle > 0:
                wait_for_idle(self.wait_idle)
            meter = LoadMeter()
            t = self._measure(fn, slow)
            other = meter.other_cores()
            t.other = math.nan if other is None else other
            if not t.other > 0.25:
                break
        return t

    def _measure(self, fn: Callable[[], object], slow: bool) -> Timing:
        forced = self.repeats is not None
        if self.cuda:
            repeats, warmup, budget = (10, 2, 1.0) if self.quick else (50, 5, 3.0)
            if slow:
                repeats, warmup = (2, 1) if self.quick else (5, 1)
        else:
            repeats, warmup, budget = (3, 1, 0.5) if self.quick else (10, 1, 3.0)
            if slow:
                repeats, warmup = (1, 0) if self.quick else (3, 1)
        if forced:
            repeats = max(1, (self.repeats + 2) // 3) if slow else self.repeats
        min_repeats = min(repeats, 1 if self.quick else 3)
        for _ in range(warmup):
            fn()
        self.sync()
        samples: List[float] = []
        total = 0.0
        for _ in range(repeats):
            if self.cuda:
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ms = a.elapsed_time(b)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            samples.append(ms)
            total += ms * 1e-3
            if not forced and len(samples) >= min_repeats and total > budget:
                break
        return Timing(statistics.median(samples), len(samples))

    def add(self, rows: Sequence[Row], started: float) -> None:
        """Record one case's rows (all implementations) and print a progress line to stderr."""
        self._case_no += 1
        self.rows.extend(rows)
        parts = ", ".join(f"{r.impl} {fmt_ms(r.timing.ms)} ms" for r in rows)
        of = f"/{self.total_cases}" if self.total_cases else ""
        if self.wait_idle > 0:   # the worst measurement kept (the waits in between do not count)
            other = max([r.timing.other for r in rows if not math.isnan(r.timing.other)], default=None)
        else:
            other = self._meter.other_cores()
        load = "" if other is None or self.cuda else f", other load {other:.2f} cores"
        print(f"[{self._case_no}{of}] {rows[0].case}: {parts}  ({time.perf_counter() - started:.1f} s{load})",
              file=sys.stderr, flush=True)
        self._meter = LoadMeter()

    def note(self, text: str) -> None:
        self.notes.append(text)


# ------------------------------------------------------------------------------ formatting
def fmt_ms(ms: float) -> str:
    if ms is None or math.isnan(ms):
        return "-"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_x(x: float) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def fmt_rate(r: Row) -> str:
    v = r.rate
    return "-" if math.isnan(v) else f"{v:.1f} {r.unit}"


def table(rows: Sequence[Row]) -> str:
    head = ["case", "impl", "median ms", "GFLOP/s or GB/s", "vs DivPrune-style", "vs GEMM",
            "picks=ref", "n"]
    cells = [[r.case, r.impl, fmt_ms(r.timing.ms), fmt_rate(r), fmt_x(r.speedup_vs_divprune),
              fmt_x(r.ratio_vs_gemm), r.picks or "-", str(r.timing.n)] for r in rows]
    w = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]

    def line(v):
        return "| " + " | ".join(s.ljust(w[i]) if i < 2 else s.rjust(w[i]) for i, s in enumerate(v)) + " |"

    sep = "|" + "|".join("-" * (w[i] + 2) if i < 2 else "-" * (w[i] + 1) + ":" for i in range(len(w))) + "|"
    out = [line(head), sep]
    prev = None
    for r, c in zip(rows, cells):
        if prev is not None and r.case == prev:
            c = [""] + c[1:]
        out.append(line(c))
        prev = r.case
    return "\n".join(out)


def write_csv(path: str, rows: Sequence[Row], device: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["family", "case", "impl", "device", "median_ms", "repeats", "rate", "rate_unit",
                    "speedup_vs_divprune", "ratio_vs_gemm", "picks_eq_ref", "other_load_cores", "note"])
        for r in rows:
            w.writerow([r.family, r.case, r.impl, device, f"{r.timing.ms:.6g}", r.timing.n,
                        "" if math.isnan(r.rate) else f"{r.rate:.6g}", r.unit,
                        "" if math.isnan(r.speedup_vs_divprune) else f"{r.speedup_vs_divprune:.6g}",
                        "" if math.isnan(r.ratio_vs_gemm) else f"{r.ratio_vs_gemm:.6g}", r.picks,
                        "" if math.isnan(r.timing.other) else f"{r.timing.other:.3g}", r.note])


def write_plot(path: str, rows: Sequence[Row], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases: List[str] = []
    impls: List[str] = []
    for r in rows:
        if r.case not in cases:
            cases.append(r.case)
        if r.impl not in impls:
            impls.append(r.impl)
    val = {(r.case, r.impl): r.timing.ms for r in rows}
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(cases)), 5.5))
    for j, impl in enumerate(impls):
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(cases))]
        ys = [val.get((c, impl), math.nan) for c in cases]
        ax.bar(xs, ys, width, label=impl)
    ax.set_yscale("log")
    ax.set_ylabel("median time, ms (log scale; lower is better)")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c.replace(" B", "\nB", 1) for c in cases], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class LoadMeter:
    """CPU time the rest of the machine used while we ran (Linux /proc/stat; None elsewhere):
    benchmarks on a shared machine are only as good as its idle cores."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            import resource

            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
            busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # all but idle, iowait
            ru = resource.getrusage(resource.RUSAGE_SELF)
            return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime
        except (OSError, ValueError, ImportError, IndexError):
            return None

    def other_cores(self) -> Optional[float]:
        """Average number of cores other processes kept busy since construction."""
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        wall = end[0] - self.start[0]
        return max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / wall)


def wait_for_idle(max_s: float) -> None:
    """Wait (at most ``max_s``) until other processes have used < 0.1 cores for one second."""
    deadline = time.perf_counter() + max_s
    quiet = 0
    meter = LoadMeter()
    while time.perf_counter() < deadline:
        time.sleep(0.25)
        other = meter.other_cores()
        if other is None:
            return
        quiet = quiet + 1 if other < 0.1 else 0
        if quiet >= 4:
            return
        meter = LoadMeter()


# ------------------------------------------------------------------------------ entry point
def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({name}, {torch.get_num_threads()} threads)"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokenkernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--family", default="all", help=f"one of {sorted(FAMILIES)} or 'all' (default)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--csv", metavar="FILE", help="write every row to FILE as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the median times")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, < 1 min on CPU)")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="repeats per measurement (slow baselines: about N/3, at least 1)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="CPU on a shared machine: before each measurement wait up to S s until other "
                        "processes are quiet, and measure again (twice at most) if they were not")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.wait_idle < 0:
        p.error("--wait-idle must be >= 0")
    if args.family != "all" and args.family not in FAMILIES:
        p.error(f"unknown family {args.family!r}; have {sorted(FAMILIES)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import tokenkernels

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("tokenkernels.bench: CUDA is not available (CPU torch or no GPU); use --device cpu",
                  file=sys.stderr)
            return 2
        if not tokenkernels.cuda_available():
            print("tokenkernels.bench: this tokenkernels build has no CUDA kernels", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        print(f"tokenkernels.bench: --device must be cpu or cuda, got {args.device!r}", file=sys.stderr)
        return 2

    names = sorted(FAMILIES) if args.family == "all" else [args.family]
    header = (f"tokenkernels.bench: device {describe_device(device)}, torch {torch.__version__}, "
              f"tokenkernels {tokenkernels.__version__}, {'quick' if args.quick else 'full'}"
              + ("" if device.type == "cuda" else
                 f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"))
    print(header)
    print("median ms after warmup; rate = the op's useful flops (or bytes) / median; "
          "vs DivPrune-style = its time / this time; vs GEMM = this time / one fp32 x @ x.T; "
          "picks=ref = leading picks equal to tokenkernels.reference\n", flush=True)
    all_rows: List[Row] = []
    meter = LoadMeter()
    for name in names:
        mod = importlib.import_module(FAMILIES[name])
        ctx = Context(device, args.quick, args.repeats, args.wait_idle)
        print(f"[{name}] {mod.DESCRIPTION}", file=sys.stderr, flush=True)
        mod.run(ctx)
        print(f"## {name}\n")
        print(table(ctx.rows))
        for n in ctx.notes:
            print(f"\n{n}")
        print(flush=True)
        all_rows.extend(ctx.rows)
    other = meter.other_cores()
    if other is not None and device.type == "cpu":
        print(f"background load: other processes kept {other:.2f} of {os.cpu_count()} cores busy "
              f"on average during this run")
    if args.csv:
        write_csv(args.csv, all_rows, str(device))
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot:
        write_plot(args.plot, all_rows, header.replace("tokenkernels.bench: ", ""))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
