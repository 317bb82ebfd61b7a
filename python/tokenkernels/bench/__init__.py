"""Benchmarks of the tokenkernels ops against PyTorch baselines.

    python -m tokenkernels.bench [--full | --quick] [--family kcenter] [--device cpu|cuda]
                                 [--csv FILE] [--plot FILE.png] [--no-files] [--repeats N]
                                 [--wait-idle S]

The quick run is the default (``make bench``): every family's table in about 35 s on a quiet
2-core CPU, well under 3 minutes on a loaded one; ``--quick`` is accepted as its explicit name.
``--full`` runs the larger shapes with more repeats (~12-20 minutes on 2 cores, cross_entropy
about half of it).

Output: the tables on stdout; on stderr a start line (cases per family, expected total), one
progress line per case, ``[i/n] case: impl ms, ... (s of the case) | elapsed .., ~.. left``,
counted across every selected family, a line per finished family, and a final line with the
total wall time. The time left weighs the remaining cases by :data:`CASE_SECONDS` (typical
seconds per case and family) scaled by the elapsed time over the finished cases' share.
Every row also goes to ``bench/results/latest_<device>_<quick|full>.csv`` and a bar chart
(one panel per family) to the same name with ``.png`` (``_<family>`` added for a one-family
run), in ``bench/results`` under the current directory when that folder exists, else in the
current directory; ``--csv`` / ``--plot`` choose other paths, ``--no-files`` skips the defaults.

Each family is a module of this package (``tokenkernels.bench.<family>``) exposing
``DESCRIPTION``, ``cases(quick, cuda)`` (the case labels it runs, in order: the runner counts
them up front) and ``run(ctx: Context)``, which runs exactly those cases; register it in
:data:`FAMILIES` and :data:`CASE_SECONDS`. A family adds :class:`Row` objects (one
``ctx.add`` per case, all implementations) and free-form notes to the context.

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
import textwrap
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple


def _process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): the wall time reported
    at the end counts from the interpreter's start, so it includes importing torch."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


_T_IMPORT = time.perf_counter() - _process_age()   # "import to last table" counts from here

import torch  # noqa: E402

FAMILIES: Dict[str, str] = {
    "kcenter": "tokenkernels.bench.kcenter",
    "cross_entropy": "tokenkernels.bench.cross_entropy",
    "tree": "tokenkernels.bench.tree",
    "integrations": "tokenkernels.bench.integrations",
    "kv_select": "tokenkernels.bench.kv_select",
}

# Typical wall seconds per case (the family's whole run, set-up included, over its number of
# cases) on a quiet 2-core CPU: the weights of the time-left estimate and the expected total
# printed at the start. Only their ratios matter once a case has finished: the estimate scales
# them by the elapsed time over the finished cases' expected seconds. CUDA: no figures (every
# case weighs the same; the start line gives no expected total).
CASE_SECONDS: Dict[str, Dict[str, float]] = {
    "quick": {"cross_entropy": 4.5, "integrations": 3.5, "kcenter": 1.3, "kv_select": 0.6,
              "tree": 0.1},
    "full": {"cross_entropy": 150.0, "integrations": 21.0, "kcenter": 5.0, "kv_select": 2.5,
             "tree": 0.4},
}


def mode_name(quick: bool) -> str:
    return "quick" if quick else "full"


def family_cases(name: str, quick: bool, cuda: bool = False) -> List[str]:
    """The case labels family ``name`` runs, in order: one progress line (and the first column
    of its table rows) each. Every family module exposes ``cases(quick, cuda)``; its ``run``
    runs exactly these."""
    return list(importlib.import_module(FAMILIES[name]).cases(quick, cuda))


def plan(names: Sequence[str], quick: bool, cuda: bool = False) -> List[Tuple[str, List[str]]]:
    """(family, case labels) for every selected family, in run order."""
    return [(n, family_cases(n, quick, cuda)) for n in names]


def fmt_duration(s: Optional[float]) -> str:
    """'48 s', '1 min 10 s', '12 min', '1 h 5 min'; '?' when unknown."""
    if s is None or math.isnan(s) or math.isinf(s):
        return "?"
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    m, sec = divmod(s, 60)
    if m < 10:
        return f"{m} min {sec} s" if sec else f"{m} min"
    m += sec >= 30                   # from 10 min on, whole minutes
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if m else f"{h} h"


class Progress:
    """The overall case count and time-left estimate across every family of a run.

    ``plan``: (family, case labels) in run order; ``costs``: typical seconds per case per family
    (missing: 1, equal weights). Time left = the remaining cases' expected seconds x (elapsed /
    the finished cases' expected seconds), so a slower or faster machine scales the estimate
    after the first case, and the family mix is weighted by the table."""

    def __init__(self, plan: Sequence[Tuple[str, Sequence[str]]],
                 costs: Optional[Dict[str, float]] = None, absolute: bool = True,
                 clock: Callable[[], float] = time.perf_counter):
        self.plan = [(f, list(c)) for f, c in plan]
        self.costs = dict(costs) if costs else {}
        # ``absolute``: the costs are seconds for this very setting (not only relative weights,
        # e.g. with --repeats or --wait-idle), so an expected total can be printed up front.
        self.known = absolute and bool(costs) and all(f in self.costs for f, _ in self.plan)
        self.total = sum(len(c) for _, c in self.plan)
        self.expected_s = sum(self.cost(f) * len(c) for f, c in self.plan)
        self.clock = clock
        self.done = 0
        self.done_cost = 0.0
        self.started = clock()
        self._family: Optional[str] = None
        self._family_done = 0
        self._family_started = self.started

    def cost(self, family: str) -> float:
        return self.costs.get(family, 1.0)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        """Estimated seconds left (nan before the first case when no typical figures exist)."""
        rest = self.expected_s - self.done_cost
        if self.done_cost > 0:
            return rest * self.elapsed() / self.done_cost
        return rest if self.known else math.nan

    def start_line(self) -> str:
        fams = ", ".join(f"{f} {len(c)}" for f, c in self.plan)
        exp = (f", expected ~{fmt_duration(self.expected_s)} on a quiet 2-core CPU" if self.known
               else "")
        return f"{self.total} cases in {len(self.plan)} families ({fams}){exp}"

    def begin_family(self, family: str) -> None:
        self._family = family
        self._family_done = 0
        self._family_started = self.clock()

    def case_done(self) -> Tuple[str, str]:
        """Count one finished case of the current family: ('[i/n]', 'elapsed .., ~.. left')."""
        self.done += 1
        self._family_done += 1
        self.done_cost += self.cost(self._family or "")
        tag = f"[{self.done}/{self.total}]"
        left = self.left() if self.done < self.total else 0.0
        return tag, f"elapsed {fmt_duration(self.elapsed())}, ~{fmt_duration(left)} left"

    def end_family(self) -> Optional[str]:
        """Close the current family: cases it listed but did not run (a failed part) are
        counted as done so the rest stay right; returns a line saying so, or None."""
        fam = self._family
        listed = next((len(c) for f, c in self.plan if f == fam), self._family_done)
        missing = listed - self._family_done
        self._family = None
        took = fmt_duration(self.clock() - self._family_started)
        if missing > 0:
            self.done += missing
            self.done_cost += missing * self.cost(fam or "")
            return f"[{fam}] {self._family_done} of {listed} cases ran ({missing} skipped), {took}"
        if missing < 0:
            return f"[{fam}] ran {self._family_done} cases but listed {listed}, {took}"
        return f"[{fam}] {listed} cases, {took}"


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
                 wait_idle: float = 0.0, progress: Optional[Progress] = None):
        self.device = device
        self.quick = quick
        self.repeats = repeats
        self.wait_idle = wait_idle
        self.progress = progress
        self.rows: List[Row] = []
        self.notes: List[str] = []
        self.case_labels: List[str] = []   # rows[0].case of every add(), in order
        self._case_no = 0
        self.total_cases = 0               # this family's, for the '[i/n]' without a Progress
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
        if not rows:   # every implementation failed: nothing to show (the runner counts it skipped)
            return
        self._case_no += 1
        self.rows.extend(rows)
        self.case_labels.append(rows[0].case)
        head = rows[0].case   # rows of a sub-case ("<case> fwd") are named by their suffix
        parts = ", ".join(f"{r.impl}{'' if r.case == head else ' (' + r.case[len(head):].strip() + ')'} "
                          f"{fmt_ms(r.timing.ms)} ms" for r in rows)
        if self.progress is not None:
            tag, eta = self.progress.case_done()
            eta = f" | {eta}"
        else:
            tag = f"[{self._case_no}" + (f"/{self.total_cases}]" if self.total_cases else "]")
            eta = ""
        if self.wait_idle > 0:   # the worst measurement kept (the waits in between do not count)
            other = max([r.timing.other for r in rows if not math.isnan(r.timing.other)], default=None)
        else:
            other = self._meter.other_cores()
        load = "" if other is None or self.cuda else f", other load {other:.2f} cores"
        print(f"{tag} {rows[0].case}: {parts}  ({time.perf_counter() - started:.1f} s{load}){eta}",
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
    """Median times as grouped bars (log scale): one panel per family, one group per case,
    one bar per implementation present in that case (colours and legend per family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: List[str] = []
    for r in rows:
        if r.family not in families:
            families.append(r.family)
    if not families:
        families = [""]
    fig, axes = plt.subplots(len(families), 1, figsize=(14.0, 3.6 * len(families) + 0.6),
                             squeeze=False)
    for ax, fam in zip(axes[:, 0], families):
        frows = [r for r in rows if r.family == fam]
        cases: List[str] = []
        impls: List[str] = []
        for r in frows:
            if r.case not in cases:
                cases.append(r.case)
            if r.impl not in impls:
                impls.append(r.impl)
        colour = {impl: f"C{j % 10}" for j, impl in enumerate(impls)}
        widest = max([sum(1 for r in frows if r.case == c) for c in cases] + [1])
        width = 0.8 / widest
        seen = set()
        for i, c in enumerate(cases):
            here = [r for r in frows if r.case == c and not math.isnan(r.timing.ms)]
            for j, r in enumerate(here):
                x = i + (j - (len(here) - 1) / 2) * width
                ax.bar(x, r.timing.ms, width, color=colour[r.impl],
                       label=None if r.impl in seen else r.impl)
                seen.add(r.impl)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([textwrap.fill(c, 22) for c in cases], fontsize=7)
        ax.set_title(fam, fontsize=10, loc="left")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    fig.suptitle(textwrap.fill(title + " -- lower is better", 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
        # /proc/stat counts in clock ticks (10 ms): intervals shorter than a few ticks say nothing
        if self.start is None or end is None or end[0] - self.start[0] < 0.05:
            return None
        wall = end[0] - self.start[0]
        other = ((end[1] - self.start[1]) - (end[2] - self.start[2])) / wall
        return min(float(os.cpu_count() or 1), max(0.0, other))


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


def default_outputs(device: torch.device, quick: bool, family: str = "all",
                    cwd: Optional[str] = None) -> Tuple[str, str]:
    """(csv, png) paths a run writes unless told otherwise: ``bench/results/latest_<device>_<mode>``
    under ``cwd`` (the current directory) when that folder exists, else directly in ``cwd``;
    a one-family run adds ``_<family>`` so it does not overwrite the all-families files."""
    cwd = os.getcwd() if cwd is None else cwd
    folder = os.path.join(cwd, "bench", "results")
    if not os.path.isdir(folder):
        folder = cwd
    stem = f"latest_{device.type}_{mode_name(quick)}" + ("" if family == "all" else f"_{family}")
    base = os.path.relpath(os.path.join(folder, stem), cwd) if folder != cwd else stem
    return base + ".csv", base + ".png"


def output_paths(args: argparse.Namespace, device: torch.device,
                 cwd: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """(csv, png) to write, None for none: --csv/--plot when given, else the defaults unless
    --no-files."""
    d_csv, d_png = (None, None) if args.no_files else default_outputs(device, args.quick,
                                                                      args.family, cwd)
    return args.csv or d_csv, args.plot or d_png


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokenkernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--family", default="all", help=f"one of {sorted(FAMILIES)} or 'all' (default)")
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda when a GPU and a CUDA build of tokenkernels are present, "
                        "else cpu), cpu or cuda[:i]")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="quick", action="store_false",
                      help="the full run: larger shapes, more repeats (~12-20 min on a 2-core CPU)")
    mode.add_argument("--quick", dest="quick", action="store_true",
                      help="the quick run (the default; accepted for old commands): every family's "
                           "table in under 3 min on a 2-core CPU")
    p.set_defaults(quick=True)
    p.add_argument("--csv", metavar="FILE",
                   help="write every row to FILE as CSV (default: bench/results/latest_<device>_<mode>.csv)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="write a bar chart of the median times (default: the CSV's name with .png)")
    p.add_argument("--no-files", action="store_true",
                   help="write no default CSV/plot (an explicit --csv/--plot is still written)")
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

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and tokenkernels.cuda_available() else "cpu"
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
    mode = mode_name(args.quick)
    csv_path, png_path = output_paths(args, device)
    header = (f"tokenkernels.bench: device {describe_device(device)}, torch {torch.__version__}, "
              f"tokenkernels {tokenkernels.__version__}, {mode}"
              + ("" if device.type == "cuda" else
                 f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"))
    print(header)
    print("median ms after warmup; rate = the op's useful flops (or bytes) / median; "
          "vs DivPrune-style = its time / this time; vs GEMM = this time / one fp32 x @ x.T; "
          "picks=ref = leading picks equal to tokenkernels.reference\n", flush=True)
    progress = Progress(plan(names, args.quick, device.type == "cuda"),
                        costs=None if device.type == "cuda" else CASE_SECONDS[mode],
                        absolute=args.repeats is None and not args.wait_idle)
    print(f"tokenkernels.bench: {mode} run, {progress.start_line()}"
          + ("" if args.quick else "; the quick run is the default"), file=sys.stderr, flush=True)
    all_rows: List[Row] = []
    meter = LoadMeter()
    for name in names:
        mod = importlib.import_module(FAMILIES[name])
        ctx = Context(device, args.quick, args.repeats, args.wait_idle, progress=progress)
        progress.begin_family(name)
        n = next(len(c) for f, c in progress.plan if f == name)
        print(f"[{name}] {mod.DESCRIPTION} ({n} cases)", file=sys.stderr, flush=True)
        mod.run(ctx)
        print(progress.end_family(), file=sys.stderr, flush=True)
        print(f"## {name}\n")
        print(table(ctx.rows))
        for note in ctx.notes:
            print(f"\n{note}")
        print(flush=True)
        all_rows.extend(ctx.rows)
    other = meter.other_cores()
    if other is not None and device.type == "cpu":
        print(f"background load: other processes kept {other:.2f} of {os.cpu_count()} cores busy "
              f"on average during this run")
    wall = time.perf_counter() - _T_IMPORT
    print(f"wall time: {fmt_duration(wall)} ({wall:.1f} s, import to last table), "
          f"{progress.done} cases", flush=True)
    if csv_path:
        _ensure_folder(csv_path)
        write_csv(csv_path, all_rows, str(device))
        print(f"wrote {csv_path}", file=sys.stderr)
    if png_path:
        _ensure_folder(png_path)
        write_plot(png_path, all_rows, header.replace("tokenkernels.bench: ", ""))
        print(f"wrote {png_path}", file=sys.stderr)
    total = time.perf_counter() - _T_IMPORT
    print(f"tokenkernels.bench: done, {progress.done} cases, total wall time {fmt_duration(total)} "
          f"({total:.1f} s; import to last table {wall:.1f} s)", file=sys.stderr, flush=True)
    return 0


def _ensure_folder(path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
