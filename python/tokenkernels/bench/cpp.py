"""The C++ benchmark binary through the Python harness.

    python -m tokenkernels.bench.cpp [--family F] [--device cpu|cuda] [--quick] [--repeats N]
                                     [--wait-idle S] [--csv FILE] [--list] [--raw]

(also the ``tokenkernels-bench`` console script and ``make bench-cpp``). Runs the binary shipped
in the package (``tokenkernels/_bin/tokenkernels-bench``, bench/cpp/), which times the ops through
the dispatcher and ATen ports of the baselines without Python in the loop and prints its rows as
JSON lines; this runner turns them into the harness's progress lines, tables and CSV
(:mod:`tokenkernels.bench.harness`), measures the background load and, with ``--wait-idle``,
answers the binary's ``ready`` / ``measured`` lines (``--control``) to wait for a quiet machine
and measure again. It passes the tree family the parents of
:data:`tokenkernels.testing.MEDUSA_63` (``--medusa63``), so the C++ side keeps no copy of it.
``--raw`` runs the binary as it is (JSON lines); ``--list`` lists its families.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, List, Optional, Sequence

from .harness import (LoadMeter, Row, case_line, ensure_folder, fmt_duration, print_family,
                      wait_for_idle, write_csv)


def binary_path() -> Path:
    return Path(__file__).resolve().parent.parent / "_bin" / "tokenkernels-bench"


def medusa63_parents() -> List[int]:
    """Parents (root first, 64 nodes) of :data:`tokenkernels.testing.MEDUSA_63`."""
    import tokenkernels
    from tokenkernels.testing import MEDUSA_63

    return [int(p) for p in tokenkernels.tree.from_paths(MEDUSA_63).tolist()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tokenkernels-bench", description=__doc__.split("\n")[0])
    p.add_argument("--family", default="all", help="one family of the binary (--list) or 'all' (default)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (a smoke run)")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="repeats per measurement (slow baselines: about N/3, at least 1)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="CPU on a shared machine: before each measurement wait up to S s until other "
                        "processes are quiet, and measure again (twice at most) if they were not")
    p.add_argument("--csv", metavar="FILE", help="also write every row to FILE (the harness's CSV)")
    p.add_argument("--list", action="store_true", help="list the binary's families")
    p.add_argument("--raw", action="store_true", help="run the binary as it is: JSON lines on stdout")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.wait_idle < 0:
        p.error("--wait-idle must be >= 0")
    return args


def binary_args(args: argparse.Namespace) -> List[str]:
    out = ["--family", args.family, "--device", args.device]
    out += ["--quick"] if args.quick else []
    out += ["--repeats", str(args.repeats)] if args.repeats else []
    if args.family in ("all", "tree"):
        out += ["--medusa63", ",".join(map(str, medusa63_parents()))]
    if args.wait_idle > 0 and args.device == "cpu":
        out += ["--control"]
    return out


class Runner:
    """Reads the binary's JSON lines (``lines``) and prints what the Python bench prints;
    ``reply`` answers its control lines (``--control``); ``pids``: the binary's process, whose
    CPU time is not other load."""

    def __init__(self, wait_idle: float = 0.0, pids: Sequence[int] = (), out: IO = None, err: IO = None):
        self.wait_idle = wait_idle
        self.pids = tuple(pids)
        self.out = sys.stdout if out is None else out
        self.err = sys.stderr if err is None else err
        self.rows: List[Row] = []
        self.device = "cpu"
        self._fam: Optional[str] = None
        self._fam_rows: List[Row] = []
        self._notes: List[str] = []
        self._case_no = 0
        self._started = time.perf_counter()
        self._fam_started = self._started
        self._case_started = self._started
        self._meter = LoadMeter(self.pids)
        self._run_meter = LoadMeter(self.pids)
        self._measure_meter: Optional[LoadMeter] = None
        self._attempt = 0

    def handle(self, line: str) -> Optional[str]:
        """One line of the binary's stdout; returns the answer to send back, if any."""
        line = line.strip()
        if not line:
            return None
        try:
            msg = json.loads(line)
        except ValueError:
            print(line, file=self.out, flush=True)   # not ours to parse: pass it on
            return None
        kind = msg.get("type")
        if kind == "start":
            self.device = str(msg.get("device", "cpu")).split(" ")[0]
            print(f"tokenkernels-bench: device {msg.get('device')}, torch {msg.get('torch')}, "
                  f"{msg.get('threads')} threads, {msg.get('mode')} (C++: the ops through the dispatcher, "
                  f"ATen baselines)", file=self.out)
            print("median / min ms after warmup; rate = the op's flops (GFLOP/s) or bytes (GB/s) / median; "
                  "vs X = X's median / this one's (> 1: faster than X); further columns: the family's "
                  "metrics (bench/cpp/bench_<family>.cpp)\n", file=self.out, flush=True)
        elif kind == "family":
            self._fam, self._fam_rows, self._notes = msg["name"], [], []
            self._fam_started = self._case_started = time.perf_counter()
            self._meter = LoadMeter(self.pids)
            print(f"[{self._fam}] {msg.get('description', '')}", file=self.err, flush=True)
        elif kind == "row":
            row = Row.from_json(msg)
            if self.wait_idle > 0:   # the worst measurement kept (the waits in between do not count)
                other = max([x.timing.other for x in row.results.values() if not math.isnan(x.timing.other)],
                            default=None)
            else:                    # no figure per measurement: the case's, for each of them
                other = self._meter.other_cores()
                for x in row.results.values():
                    if math.isnan(x.timing.other) and other is not None:
                        x.timing.other = other
            self._case_no += 1
            now = time.perf_counter()
            cuda = self.device.startswith("cuda")
            print(case_line(f"[{self._case_no}]", [row], now - self._case_started, None if cuda else other,
                            f"elapsed {fmt_duration(now - self._started)}"), file=self.err, flush=True)
            self._case_started = now
            self._meter = LoadMeter(self.pids)
            self._fam_rows.append(row)
            self.rows.append(row)
        elif kind == "note":
            self._notes.append(str(msg.get("text", "")))
        elif kind == "end_family":
            print(f"[{msg.get('name')}] {len(self._fam_rows)} rows, "
                  f"{fmt_duration(time.perf_counter() - self._fam_started)}", file=self.err, flush=True)
            print_family(str(msg.get("name")), self._fam_rows, self._notes, file=self.out)
            self._fam = None
        elif kind == "ready":
            if self.wait_idle > 0:
                wait_for_idle(self.wait_idle, self.pids)
            self._measure_meter = LoadMeter(self.pids)
            return "go"
        elif kind == "measured":
            other = self._measure_meter.other_cores() if self._measure_meter else None
            self._attempt += 1
            if other is not None and other > 0.25 and self._attempt < 3:
                return "again"
            self._attempt = 0
            return "keep nan" if other is None else f"keep {other:.4f}"
        return None

    def finish(self) -> None:
        other = self._run_meter.other_cores()
        if other is not None and not self.device.startswith("cuda"):
            print(f"background load: other processes kept {other:.2f} of {os.cpu_count()} cores busy "
                  f"on average during this run", file=self.out)
        print(f"tokenkernels-bench: done, {self._case_no} rows, "
              f"{fmt_duration(time.perf_counter() - self._started)}", file=self.err, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    exe = binary_path()
    if not exe.exists():
        print(f"tokenkernels-bench: {exe} is missing; rebuild with pip install -e . --no-build-isolation "
              f"(TOKENKERNELS_BENCH on)", file=sys.stderr)
        return 2
    if args.list:
        return subprocess.call([str(exe), "--list"])
    cmd = [str(exe), *binary_args(args)]
    if args.raw:
        return subprocess.call(cmd)
    control = "--control" in cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE if control else subprocess.DEVNULL,
                            text=True, bufsize=1)
    runner = Runner(args.wait_idle if control else 0.0, pids=[proc.pid])
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            reply = runner.handle(line)
            if reply is not None and proc.stdin is not None:
                proc.stdin.write(reply + "\n")
                proc.stdin.flush()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    rc = proc.wait()
    runner.finish()
    if args.csv and runner.rows:
        ensure_folder(args.csv)
        write_csv(args.csv, runner.rows, runner.device)
        print(f"wrote {args.csv}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
