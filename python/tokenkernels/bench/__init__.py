"""Benchmarks of the tokenkernels ops against PyTorch baselines.

    python -m tokenkernels.bench [--full | --quick] [--family kcenter] [--device cpu|cuda]
                                 [--csv FILE] [--plot FILE.png] [--no-files] [--repeats N]
                                 [--wait-idle S]

The quick run is the default (``make bench``): every family's table in about 1.5 minutes on a
quiet 2-core CPU (cross_entropy's five peers, each memory-measured in a fresh process, about a
minute of it), a few minutes on a loaded one; ``--quick`` is accepted as its explicit name.
``--full`` runs the larger shapes with more repeats (~30-40 minutes on 2 cores, cross_entropy
about 20 of them).

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
:data:`FAMILIES` and :data:`CASE_SECONDS`. A family only defines its cases: per case one
:class:`Row` (implementation name -> timing and metrics, and the baselines the ratios are taken
against) passed to ``ctx.add``, and free-form notes. Everything else -- the timer, the load
meter, the progress lines, the table, the CSV and the plot -- is :mod:`tokenkernels.bench.harness`,
which the C++ binary's rows go through too (:mod:`tokenkernels.bench.cpp`).

Timing: warmup, then the median (and min) of the repeats; ``time.perf_counter`` on CPU, a pair
of CUDA events per repeat with the L2 flushed before each on CUDA (:class:`harness.Timer`).
Slow baselines (the Python reference loop, the DivPrune-style loop) get fewer repeats, and
every measurement stops early once it has used its time budget (unless ``--repeats`` is given).
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple


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

from .harness import (CSV_COLUMNS, Context, LoadMeter, Progress, Result, Row, Timer,  # noqa: E402,F401
                      Timing, case_line, ensure_folder, fmt_duration, fmt_ms, fmt_rate, fmt_x,
                      print_family, read_csv, schedule, table, wait_for_idle, write_csv, write_plot)

FAMILIES: Dict[str, str] = {
    "kcenter": "tokenkernels.bench.kcenter",
    "cross_entropy": "tokenkernels.bench.cross_entropy",
    "tree": "tokenkernels.bench.tree",
    "integrations": "tokenkernels.bench.integrations",
    "kv_select": "tokenkernels.bench.kv_select",
    "spec": "tokenkernels.bench.spec",
}

# Typical wall seconds per case (the family's whole run, set-up included, over its number of
# cases) on a quiet 2-core CPU: the weights of the time-left estimate and the expected total
# printed at the start. Only their ratios matter once a case has finished: the estimate scales
# them by the elapsed time over the finished cases' expected seconds. CUDA: no figures (every
# case weighs the same; the start line gives no expected total).
CASE_SECONDS: Dict[str, Dict[str, float]] = {
    # cross_entropy: five impls per case, each memory-measured in its own fresh process (quick:
    # estimated from a run with ~1.4 other cores busy, scaled down); integrations full: the loss
    # step at V128256 x 4096 tokens (~3 min of the family's ~4)
    "quick": {"cross_entropy": 30.0, "integrations": 3.5, "kcenter": 1.3, "kv_select": 0.6,
              "spec": 8.0, "tree": 0.1},
    "full": {"cross_entropy": 330.0, "integrations": 65.0, "kcenter": 5.0, "kv_select": 2.5,
             "spec": 40.0, "tree": 0.4},
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
                      help="the full run: larger shapes, more repeats (~30-40 min on a 2-core CPU)")
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
    print("median / min ms after warmup" + (" (L2 flushed before every repeat)" if device.type == "cuda"
                                            else "")
          + "; rate = the op's useful flops (or bytes) / median; vs X = X's median / this one's "
          "(> 1: faster than X); further columns: the family's metrics (module docstrings)\n",
          flush=True)
    progress = Progress(plan(names, args.quick, device.type == "cuda"),
                        costs=None if device.type == "cuda" else CASE_SECONDS[mode],
                        absolute=args.repeats is None and not args.wait_idle)
    print(f"tokenkernels.bench: {mode} run, {progress.start_line()}"
          + ("" if args.quick else "; the quick run is the default"), file=sys.stderr, flush=True)
    all_rows: List[Row] = []
    meter = LoadMeter()
    for name in names:
        mod = importlib.import_module(FAMILIES[name])
        ctx = Context(device, args.quick, args.repeats, args.wait_idle, progress=progress,
                      family=name)
        progress.begin_family(name)
        n = next(len(c) for f, c in progress.plan if f == name)
        print(f"[{name}] {mod.DESCRIPTION} ({n} cases)", file=sys.stderr, flush=True)
        mod.run(ctx)
        print(progress.end_family(), file=sys.stderr, flush=True)
        print_family(name, ctx.rows, ctx.notes)
        all_rows.extend(ctx.rows)
    other = meter.other_cores()
    if other is not None and device.type == "cpu":
        print(f"background load: other processes kept {other:.2f} of {os.cpu_count()} cores busy "
              f"on average during this run")
    wall = time.perf_counter() - _T_IMPORT
    print(f"wall time: {fmt_duration(wall)} ({wall:.1f} s, import to last table), "
          f"{progress.done} cases", flush=True)
    if csv_path:
        ensure_folder(csv_path)
        write_csv(csv_path, all_rows, str(device))
        print(f"wrote {csv_path}", file=sys.stderr)
    if png_path:
        ensure_folder(png_path)
        write_plot(png_path, all_rows, header.replace("tokenkernels.bench: ", ""))
        print(f"wrote {png_path}", file=sys.stderr)
    total = time.perf_counter() - _T_IMPORT
    print(f"tokenkernels.bench: done, {progress.done} cases, total wall time {fmt_duration(total)} "
          f"({total:.1f} s; import to last table {wall:.1f} s)", file=sys.stderr, flush=True)
    return 0
