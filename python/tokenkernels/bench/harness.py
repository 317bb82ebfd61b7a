"""The one benchmark harness: rows, the timer, the load meter, the progress counter, the table
printer and the CSV / PNG writers. Every family module (``tokenkernels.bench.<family>``) and the
C++ binary's rows (:mod:`tokenkernels.bench.cpp`) go through it.

A :class:`Row` is one case of one family: a map from implementation name to its
:class:`Result` (a :class:`Timing`: median / min / repeats, plus the work behind a rate and
free-form metrics), and the names of the implementations the ratios are taken against
(``baselines``). Ratios are computed here, when printing or writing, never stored.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import textwrap
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

Metric = Union[str, float, int]


# ------------------------------------------------------------------------------ rows
@dataclasses.dataclass
class Timing:
    ms: float = math.nan       # median of the repeats
    n: int = 0                 # repeats timed
    other: float = math.nan    # cores other processes kept busy meanwhile (CPU only)
    min_ms: float = math.nan   # fastest repeat


@dataclasses.dataclass
class Result:
    """One implementation's measurement in a row."""
    timing: Timing
    work: float = 0.0          # flops (rate in GFLOP/s) or bytes (rate in GB/s); 0: no rate
    bytes: bool = False
    metrics: Dict[str, Metric] = dataclasses.field(default_factory=dict)   # e.g. {"picks=ref": "56/56"}
    note: str = ""

    @property
    def rate(self) -> float:
        ms = self.timing.ms
        if not self.work or ms is None or math.isnan(ms) or ms <= 0:
            return math.nan
        return self.work / (ms * 1e-3) / 1e9

    @property
    def unit(self) -> str:
        return "GB/s" if self.bytes else "GFLOP/s"


@dataclasses.dataclass
class Row:
    """One case of a family: implementation name -> :class:`Result`, in the order added.

    ``baselines``: the implementations the ratios are taken against (``vs X`` = X's median /
    this one's: > 1 is faster than X); the first is the CSV's. A sub-measurement of a case (e.g.
    the forward alone) is a second Row named ``<case> <suffix>``, added with the case's Row."""
    family: str
    case: str
    results: Dict[str, Result] = dataclasses.field(default_factory=dict)
    baselines: Tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.baselines, str):
            self.baselines = (self.baselines,)
        self.baselines = tuple(self.baselines)

    def add(self, impl: str, timing: Timing, work: float = 0.0, bytes: bool = False,
            metrics: Optional[Dict[str, Metric]] = None, note: str = "") -> Result:
        r = Result(timing, work, bytes, dict(metrics or {}), note)
        self.results[impl] = r
        return r

    def ms(self, impl: str) -> float:
        r = self.results.get(impl)
        return math.nan if r is None else r.timing.ms

    def ratio(self, impl: str, baseline: str) -> float:
        """``baseline``'s median / ``impl``'s (nan when either is missing)."""
        a, b = self.ms(impl), self.ms(baseline)
        if a is None or b is None or math.isnan(a) or math.isnan(b) or a <= 0:
            return math.nan
        return b / a

    def to_json(self) -> dict:
        return {"family": self.family, "case": self.case, "baselines": list(self.baselines),
                "results": {k: {"median_ms": _num(r.timing.ms), "min_ms": _num(r.timing.min_ms),
                                "n": r.timing.n, "other": _num(r.timing.other), "work": r.work,
                                "bytes": r.bytes, "metrics": r.metrics, "note": r.note}
                            for k, r in self.results.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Row":
        """The inverse of :meth:`to_json`; also the rows the C++ binary prints (JSON lines)."""
        row = cls(d["family"], d["case"], baselines=tuple(d.get("baselines") or ()))
        for impl, r in (d.get("results") or {}).items():
            t = Timing(_flt(r.get("median_ms")), int(r.get("n") or 0), _flt(r.get("other")),
                       _flt(r.get("min_ms")))
            row.add(impl, t, float(r.get("work") or 0.0), bool(r.get("bytes")),
                    dict(r.get("metrics") or {}), str(r.get("note") or ""))
        return row


def _num(x: float) -> Optional[float]:
    return None if x is None or math.isnan(x) else x


def _flt(x) -> float:
    return math.nan if x is None or x == "" else float(x)


def as_rows(rows: Union[Row, Sequence[Row]]) -> List[Row]:
    return [rows] if isinstance(rows, Row) else list(rows)


# ------------------------------------------------------------------------------ load meter
class LoadMeter:
    """CPU time the rest of the machine used while we ran (Linux /proc/stat; None elsewhere):
    benchmarks on a shared machine are only as good as its idle cores.

    ``pids``: further processes of ours (the C++ bench binary) whose CPU time does not count as
    other load (read from /proc/<pid>/stat, all threads)."""

    def __init__(self, pids: Sequence[int] = ()):
        self.pids = tuple(pids)
        self.start = self._sample()

    def _sample(self):
        try:
            import resource

            hz = os.sysconf("SC_CLK_TCK")
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
            busy = (sum(v[:8]) - v[3] - v[4]) / hz   # all but idle, iowait
            ru = resource.getrusage(resource.RUSAGE_SELF)
            mine = ru.ru_utime + ru.ru_stime
            for pid in self.pids:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    mine += (int(fields[11]) + int(fields[12])) / hz   # utime, stime
                except (OSError, IndexError, ValueError):
                    pass
            return time.perf_counter(), busy, mine
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


def wait_for_idle(max_s: float, pids: Sequence[int] = ()) -> None:
    """Wait (at most ``max_s``) until other processes have used < 0.1 cores for one second."""
    deadline = time.perf_counter() + max_s
    quiet = 0
    meter = LoadMeter(pids)
    while time.perf_counter() < deadline:
        time.sleep(0.25)
        other = meter.other_cores()
        if other is None:
            return
        quiet = quiet + 1 if other < 0.1 else 0
        if quiet >= 4:
            return
        meter = LoadMeter(pids)


# ------------------------------------------------------------------------------ timer
@dataclasses.dataclass
class Schedule:
    """How many times to run a measurement: warmup, repeats, the time budget after which it
    stops early (unless forced), and the fewest repeats it keeps."""
    warmup: int
    repeats: int
    budget_s: float
    min_repeats: int
    forced: bool


def schedule(cuda: bool, quick: bool, slow: bool, repeats: Optional[int] = None) -> Schedule:
    """The timing rules of both harnesses (bench/README.md "Timing rules"); bench/cpp/bench_main.cpp
    applies the same numbers."""
    if cuda:
        n, warmup, budget = (10, 2, 1.0) if quick else (50, 5, 3.0)
        if slow:
            n, warmup = (2, 1) if quick else (5, 1)
    else:
        n, warmup, budget = (3, 1, 0.5) if quick else (10, 1, 3.0)
        if slow:
            n, warmup = (1, 0) if quick else (3, 1)
    forced = repeats is not None
    if forced:
        n = max(1, (repeats + 2) // 3) if slow else repeats
    return Schedule(warmup, n, budget, min(n, 1 if quick else 3), forced)


class Timer:
    """Median (and min) time of a callable.

    CPU: ``time.perf_counter`` (a steady clock) around each call after the warm-up. CUDA: a
    pair of CUDA events per repeat on the current stream, and before each repeat a write of a
    buffer twice the L2 size, so every repeat starts with a cold L2 (what a kernel meets in a
    model step, not the previous repeat's operands); the flush is queued before the start event,
    so it is not timed, and while it runs the host queues the call, which hides launch gaps."""

    def __init__(self, device: torch.device, quick: bool, repeats: Optional[int] = None,
                 cold_l2: bool = True):
        self.device = device
        self.quick = quick
        self.repeats = repeats
        self.cold_l2 = cold_l2
        self._flush: Optional[torch.Tensor] = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        if not (self.cuda and self.cold_l2):
            return
        if self._flush is None:
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 64 * 2**20
            self._flush = torch.empty(2 * int(l2), dtype=torch.int8, device=self.device)
        self._flush.zero_()

    def measure(self, fn: Callable[[], object], slow: bool = False) -> Timing:
        s = schedule(self.cuda, self.quick, slow, self.repeats)
        for _ in range(s.warmup):
            fn()
        self.sync()
        samples: List[float] = []
        total = 0.0
        for _ in range(s.repeats):
            if self.cuda:
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                self.flush_l2()
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
            if not s.forced and len(samples) >= s.min_repeats and total > s.budget_s:
                break
        return Timing(statistics.median(samples), len(samples), math.nan, min(samples))


# ------------------------------------------------------------------------------ progress
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


def case_line(tag: str, rows: Sequence[Row], seconds: float, other: Optional[float],
              eta: str = "") -> str:
    """The progress line of one case: ``[i/n] case: impl 1.23 ms, impl (fwd) 0.5 ms  (s, load) | eta``
    (tools/gpu_proof.py parses it when a run is cut before its CSV)."""
    head = rows[0].case   # rows of a sub-case ("<case> fwd") are named by their suffix
    parts = ", ".join(f"{impl}{'' if r.case == head else ' (' + r.case[len(head):].strip() + ')'} "
                      f"{fmt_ms(res.timing.ms)} ms" for r in rows for impl, res in r.results.items())
    load = "" if other is None or math.isnan(other) else f", other load {other:.2f} cores"
    return f"{tag} {head}: {parts}  ({seconds:.1f} s{load})" + (f" | {eta}" if eta else "")


class Context:
    """What a family's ``run`` gets: options, the timer, and where results go."""

    def __init__(self, device: torch.device, quick: bool, repeats: Optional[int],
                 wait_idle: float = 0.0, progress: Optional[Progress] = None, family: str = ""):
        self.device = device
        self.family = family
        self.quick = quick
        self.repeats = repeats
        self.wait_idle = wait_idle
        self.progress = progress
        self.timer = Timer(device, quick, repeats)
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
        self.timer.sync()

    def time(self, fn: Callable[[], object], slow: bool = False) -> Timing:
        """Median wall time of ``fn()`` in ms. ``slow``: a baseline timed with fewer repeats.

        With ``wait_idle`` (CPU), first waits for other processes to go quiet, and measures
        again (twice at most) when they kept more than a quarter of a core busy meanwhile."""
        if self.cuda:
            return self.timer.measure(fn, slow)
        t = Timing()
        for _ in range(3 if self.wait_idle > 0 else 1):
            if self.wait_idle > 0:
                wait_for_idle(self.wait_idle)
            meter = LoadMeter()
            t = self.timer.measure(fn, slow)
            other = meter.other_cores()
            t.other = math.nan if other is None else other
            if not t.other > 0.25:
                break
        return t

    def row(self, case: str, baselines: Union[str, Sequence[str]] = ()) -> Row:
        """A new row of this context's family."""
        return Row(self.family, case, baselines=tuple([baselines] if isinstance(baselines, str) else baselines))

    def add(self, rows: Union[Row, Sequence[Row]], started: float) -> None:
        """Record one case's rows (all implementations) and print a progress line to stderr."""
        rows = [r for r in as_rows(rows) if r.results]
        if not rows:   # every implementation failed: nothing to show (the runner counts it skipped)
            return
        for r in rows:
            r.family = r.family or self.family
        self._case_no += 1
        self.rows.extend(rows)
        self.case_labels.append(rows[0].case)
        if self.progress is not None:
            tag, eta = self.progress.case_done()
        else:
            tag = f"[{self._case_no}" + (f"/{self.total_cases}]" if self.total_cases else "]")
            eta = ""
        if self.wait_idle > 0:   # the worst measurement kept (the waits in between do not count)
            other = max([x.timing.other for r in rows for x in r.results.values()
                         if not math.isnan(x.timing.other)], default=None)
        else:
            other = self._meter.other_cores()
        print(case_line(tag, rows, time.perf_counter() - started, None if self.cuda else other, eta),
              file=sys.stderr, flush=True)
        self._meter = LoadMeter()

    def note(self, text: str) -> None:
        self.notes.append(text)


# ------------------------------------------------------------------------------ formatting
def fmt_ms(ms: Optional[float]) -> str:
    if ms is None or math.isnan(ms):
        return "-"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_x(x: Optional[float]) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def fmt_rate(r: Result) -> str:
    v = r.rate
    if math.isnan(v):
        return "-"
    if not r.bytes and v >= 1e4:
        return f"{v / 1e3:.1f} TFLOP/s"
    return f"{v:.1f} {r.unit}"


def fmt_metric(v: Metric) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _ordered(items: Iterable[str]) -> List[str]:
    out: List[str] = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def ratio_columns(rows: Sequence[Row]) -> Tuple[str, List[str]]:
    """The ratio columns of a table: (header of the first baselines' column, the further
    baselines' names). The rows' first baselines share one column, headed ``vs <name>`` when
    they are the same everywhere, else ``vs baseline`` (the baseline's own cell then reads
    ``base``); every further baseline name gets a column ``vs <name>``."""
    firsts = _ordered(r.baselines[0] for r in rows if r.baselines)
    extra = [b for b in _ordered(b for r in rows for b in r.baselines[1:])
             if not (len(firsts) == 1 and b == firsts[0])]
    if not firsts:
        return "", extra
    return ("vs " + firsts[0]) if len(firsts) == 1 else "vs baseline", extra


def table(rows: Sequence[Row]) -> str:
    """The markdown table of a family's rows: one line per case and implementation."""
    first, extra = ratio_columns(rows)
    metric_keys = _ordered(k for r in rows for x in r.results.values() for k in x.metrics)
    head = (["case", "impl", "median ms", "min ms", "GFLOP/s or GB/s"] + ([first] if first else [])
            + [f"vs {b}" for b in extra] + metric_keys + ["n"])
    cells = []
    for r in rows:
        b0 = r.baselines[0] if r.baselines else None
        for impl, x in r.results.items():
            ratios = []
            if first:
                ratios.append("-" if b0 is None else "base" if impl == b0 and first == "vs baseline"
                              else fmt_x(r.ratio(impl, b0)))
            ratios += [fmt_x(r.ratio(impl, b)) if b in r.baselines[1:] else "-" for b in extra]
            cells.append([r.case, impl, fmt_ms(x.timing.ms), fmt_ms(x.timing.min_ms), fmt_rate(x)]
                         + ratios + [fmt_metric(x.metrics[k]) if k in x.metrics else "-"
                                     for k in metric_keys] + [str(x.timing.n)])
    w = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]

    def line(v):
        return "| " + " | ".join(s.ljust(w[i]) if i < 2 else s.rjust(w[i]) for i, s in enumerate(v)) + " |"

    sep = "|" + "|".join("-" * (w[i] + 2) if i < 2 else "-" * (w[i] + 1) + ":" for i in range(len(w))) + "|"
    out = [line(head), sep]
    prev = None
    for c in cells:
        case = c[0]
        if case == prev:
            c = [""] + c[1:]
        out.append(line(c))
        prev = case
    if not first and not extra:
        return "\n".join(out)
    legend = ("vs X = X's median / this one's (> 1: faster than X)"
              + ("; vs baseline: against the case's first baseline, whose own line reads 'base'"
                 if first == "vs baseline" else ""))
    return "\n".join(out + ["", legend])


def print_family(name: str, rows: Sequence[Row], notes: Sequence[str], file=None) -> None:
    file = sys.stdout if file is None else file
    print(f"## {name}\n", file=file)
    print(table(rows), file=file)
    for note in notes:
        print(f"\n{note}", file=file)
    print(file=file, flush=True)


# ------------------------------------------------------------------------------ files
CSV_COLUMNS = ["family", "case", "impl", "device", "median_ms", "repeats", "rate", "rate_unit",
               "min_ms", "baselines", "vs_baselines", "other_load_cores", "metrics", "note"]


def _g(x: float, digits: int = 6) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.{digits}g}"


def write_csv(path: str, rows: Sequence[Row], device: str) -> None:
    """One line per (case, implementation). ``baselines`` / ``vs_baselines``: the row's baseline
    names and this implementation's ratios against them (baseline median / this median),
    ``;``-separated in the same order; ``metrics``: a JSON object."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            for impl, x in r.results.items():
                w.writerow([r.family, r.case, impl, device, _g(x.timing.ms), x.timing.n, _g(x.rate),
                            x.unit if x.work else "", _g(x.timing.min_ms), ";".join(r.baselines),
                            ";".join(_g(r.ratio(impl, b), 4) for b in r.baselines),
                            _g(x.timing.other, 3), json.dumps(x.metrics) if x.metrics else "", x.note])


def read_csv(path: str) -> Tuple[List[Row], str]:
    """(rows, device) of a file :func:`write_csv` wrote (rates come back as work over 1 ms)."""
    rows: Dict[Tuple[str, str], Row] = {}
    device = ""
    with open(path, newline="") as f:
        for d in csv.DictReader(f):
            device = d["device"]
            key = (d["family"], d["case"])
            if key not in rows:
                rows[key] = Row(d["family"], d["case"],
                                baselines=tuple(b for b in d["baselines"].split(";") if b))
            t = Timing(_flt(d["median_ms"]), int(d["repeats"] or 0), _flt(d["other_load_cores"]),
                       _flt(d["min_ms"]))
            rate = _flt(d["rate"])
            work = 0.0 if math.isnan(rate) or math.isnan(t.ms) else rate * 1e9 * t.ms * 1e-3
            rows[key].add(d["impl"], t, work, d["rate_unit"] == "GB/s",
                          json.loads(d["metrics"]) if d["metrics"] else {}, d["note"])
    return list(rows.values()), device


def write_plot(path: str, rows: Sequence[Row], title: str) -> None:
    """Median times as grouped bars (log scale): one panel per family, one group per case,
    one bar per implementation present in that case (colours and legend per family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = _ordered(r.family for r in rows) or [""]
    fig, axes = plt.subplots(len(families), 1, figsize=(14.0, 3.6 * len(families) + 0.6),
                             squeeze=False)
    for ax, fam in zip(axes[:, 0], families):
        frows = [r for r in rows if r.family == fam]
        impls = _ordered(i for r in frows for i in r.results)
        colour = {impl: f"C{j % 10}" for j, impl in enumerate(impls)}
        widest = max([len(r.results) for r in frows] + [1])
        width = 0.8 / widest
        seen = set()
        for i, r in enumerate(frows):
            here = [(k, x) for k, x in r.results.items() if not math.isnan(x.timing.ms)]
            for j, (impl, x) in enumerate(here):
                pos = i + (j - (len(here) - 1) / 2) * width
                ax.bar(pos, x.timing.ms, width, color=colour[impl],
                       label=None if impl in seen else impl)
                seen.add(impl)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_xticks(range(len(frows)))
        ax.set_xticklabels([textwrap.fill(r.case, 22) for r in frows], fontsize=7)
        ax.set_title(fam, fontsize=10, loc="left")
        ax.grid(axis="y", which="both", alpha=0.3)
        if seen:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    fig.suptitle(textwrap.fill(title + " -- lower is better", 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ensure_folder(path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
