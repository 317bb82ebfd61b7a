#!/usr/bin/env python3
"""SASS / resource check of the CUDA kernels, no GPU needed (issue #13's evidence list).

Every CUDA source under ``csrc/`` may declare what its kernels' machine code must (or must not)
contain, in comment lines of exactly this form, next to the kernel::

    // sass: <kernel-name-substring> <arch> <token> [<token> ...]

``<arch>`` is ``sm_80`` or ``sm_90a``. A token is

* ``OPCODE``    an opcode prefix that must occur in the kernel's SASS (``HMMA``, ``HGMMA``,
                ``LDGSTS``, ``UTMALDG``, ``LDG.E.128``, ``REDUX`` ...);
* ``!OPCODE``   an opcode prefix that must not occur (``!LDL !STL``: no local memory, i.e. no
                spills and no arrays in local memory on the hot path);
* ``regs<=N``   at most N registers per thread;
* ``smem<=B``   at most B bytes of static shared memory (dynamic shared memory is the launcher's);
* ``stack==0``  no stack frame (ptxas -v "bytes stack frame" / spills).

The substring is matched against the demangled names of the kernels (entry functions) of that
arch; it must match at least one kernel, and every match must satisfy every token.

The check extracts the cubins of every object of the CUDA check build (``make cuda-check``:
``<build>/CMakeFiles/tk_cuda_kernels.dir/**/*.cu.o``) with ``cuobjdump -xelf all``, disassembles
them with ``nvdisasm`` and reads ``cuobjdump -res-usage``. Both tools come from the PyPI packages
nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm (requirements/cuda.txt) or the CUDA toolkit.

Usage: ``python tools/sass_check.py [--build build/cuda-check] [--table FILE.md] [--all]``.
Exit status 1 on any violated expectation (or an expectation that matches no kernel), 2 when the
tools or the objects are missing.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90a")
# opcodes always counted in the table (prefix match)
COUNTED = ("HMMA", "HGMMA", "LDGSTS", "UTMALDG", "LDSM", "LDG.E.128", "REDUX", "LDL", "STL")

EXPECT_RE = re.compile(r"^\s*//\s*sass:\s+(\S+)\s+(sm_\d+a?)\s+(.+?)\s*$")
TOKEN_RE = re.compile(r"^(!?)([A-Z][A-Z0-9_.]*)$|^(regs|smem)<=(\d+)$|^(stack)==0$")


@dataclass
class Expectation:
    kernel: str
    arch: str
    tokens: List[str]
    where: str                      # file:line


@dataclass
class Kernel:
    mangled: str
    name: str                       # demangled
    arch: str
    obj: str
    opcodes: Counter = field(default_factory=Counter)
    regs: Optional[int] = None
    stack: Optional[int] = None
    shared: Optional[int] = None
    local: Optional[int] = None

    def count(self, prefix: str) -> int:
        return sum(n for op, n in self.opcodes.items() if op.startswith(prefix))


# ------------------------------------------------------------------ parsing (unit-tested)
def parse_expectations(text: str, where: str = "<text>") -> List[Expectation]:
    """Every ``// sass:`` line of a source file; a malformed token raises ValueError."""
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        m = EXPECT_RE.match(line)
        if not m:
            if re.match(r"^\s*//\s*sass:", line):
                raise ValueError(f"{where}:{no}: malformed sass expectation: {line.strip()!r}")
            continue
        kernel, arch, rest = m.groups()
        if arch not in ARCHS:
            raise ValueError(f"{where}:{no}: unknown arch {arch!r} (one of {ARCHS})")
        tokens = rest.split()
        for t in tokens:
            if not TOKEN_RE.match(t):
                raise ValueError(f"{where}:{no}: bad token {t!r} in sass expectation")
        out.append(Expectation(kernel, arch, tokens, f"{where}:{no}"))
    return out


def parse_sass(text: str) -> Dict[str, Counter]:
    """nvdisasm output -> {mangled function: Counter(opcode)} (predicates stripped)."""
    funcs: Dict[str, Counter] = {}
    cur: Optional[Counter] = None
    for line in text.splitlines():
        m = re.match(r"^\s*\.section\s+\.text\.([^,\s]+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), Counter())
            continue
        if cur is None:
            continue
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if not m:
            continue
        ins = m.group(1).strip()
        if ins.startswith("@"):
            ins = ins.split(None, 1)[1] if " " in ins else ""
        if ins:
            cur[ins.split()[0]] += 1
    return funcs


def parse_res_usage(text: str) -> Dict[str, Dict[str, int]]:
    """``cuobjdump -res-usage`` of one cubin -> {mangled function: {"REG": .., "STACK": ..}}."""
    out: Dict[str, Dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^\s*Function\s+(\S+?):\s*$", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            cur = None
    return out


def evaluate(exp: Expectation, kernels: Iterable[Kernel]) -> List[str]:
    """The violations of one expectation over the kernels (empty: satisfied)."""
    matched = [k for k in kernels if k.arch == exp.arch and exp.kernel in k.name]
    if not matched:
        return [f"{exp.where}: no {exp.arch} kernel matches {exp.kernel!r}"]
    errors = []
    for k in matched:
        for t in exp.tokens:
            m = TOKEN_RE.match(t)
            neg, op, lim_kind, lim, stack = m.groups()
            short = k.name.split("(")[0]
            if op:
                n = k.count(op)
                if neg and n:
                    errors.append(f"{exp.where}: {short} [{k.arch}] has {n} {op} (declared {t})")
                elif not neg and not n:
                    errors.append(f"{exp.where}: {short} [{k.arch}] has no {op} (declared {t})")
            elif lim_kind == "regs":
                if k.regs is None or k.regs > int(lim):
                    errors.append(f"{exp.where}: {short} [{k.arch}] uses {k.regs} registers > {lim}")
            elif lim_kind == "smem":
                if k.shared is None or k.shared > int(lim):
                    errors.append(f"{exp.where}: {short} [{k.arch}] uses {k.shared} B static shared > {lim}")
            elif stack:
                if k.stack is None or k.stack != 0 or (k.local or 0) != 0:
                    errors.append(f"{exp.where}: {short} [{k.arch}] has a {k.stack} B stack frame / "
                                  f"{k.local} B local memory (declared stack==0)")
    return errors


# ------------------------------------------------------------------ tools and objects
def find_tool(name: str) -> Optional[str]:
    cands = []
    spec = importlib.util.find_spec("nvidia")
    if spec and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            cands += sorted(glob.glob(os.path.join(base, "cu*", "bin", name)))
    w = shutil.which(name)
    if w:
        cands.append(w)
    cands.append(f"/usr/local/cuda/bin/{name}")
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def load_kernels(objects: List[str], cuobjdump: str, nvdisasm: str) -> List[Kernel]:
    kernels: List[Kernel] = []
    with tempfile.TemporaryDirectory() as tmp:
        for obj in objects:
            d = Path(tmp) / Path(obj).name
            d.mkdir()
            subprocess.run([cuobjdump, "-xelf", "all", os.path.abspath(obj)], cwd=d, check=True,
                           capture_output=True)
            for cubin in sorted(d.glob("*.cubin")):
                arch = next((a for a in sorted(ARCHS, key=len, reverse=True)
                             if cubin.name.endswith(f".{a}.cubin")), None)
                if arch is None:
                    continue
                sass = subprocess.run([nvdisasm, "-c", str(cubin)], check=True, capture_output=True,
                                      text=True).stdout
                res = parse_res_usage(subprocess.run([cuobjdump, "-res-usage", str(cubin)], check=True,
                                                     capture_output=True, text=True).stdout)
                funcs = parse_sass(sass)
                names = demangle(list(funcs))
                for mangled, ops in funcs.items():
                    r = res.get(mangled, {})
                    kernels.append(Kernel(mangled, names[mangled], arch, os.path.relpath(obj, ROOT), ops,
                                          r.get("REG"), r.get("STACK"), r.get("SHARED"), r.get("LOCAL")))
    return kernels


def table(kernels: List[Kernel], only: Optional[List[Expectation]] = None) -> str:
    rows = ["| kernel | arch | regs | stack | static smem | " + " | ".join(COUNTED) + " |",
            "|---|---|--:|--:|--:|" + "--:|" * len(COUNTED)]
    for k in sorted(kernels, key=lambda k: (k.name, k.arch)):
        if only is not None and not any(e.arch == k.arch and e.kernel in k.name for e in only):
            continue
        name = k.name if len(k.name) <= 110 else k.name[:107] + "..."
        rows.append(f"| `{name}` | {k.arch} | {k.regs} | {k.stack} | {k.shared} | "
                    + " | ".join(str(k.count(op)) for op in COUNTED) + " |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=str(ROOT / "build" / "cuda-check"))
    ap.add_argument("--src", default=str(ROOT / "csrc"))
    ap.add_argument("--table", help="also write the table of the declared kernels (Markdown) here")
    ap.add_argument("--all", action="store_true", help="print every kernel, not only the declared ones")
    a = ap.parse_args(argv)

    exps: List[Expectation] = []
    for p in sorted(Path(a.src).rglob("*")):
        if p.suffix in (".cu", ".cuh", ".h", ".cpp") and p.is_file():
            exps += parse_expectations(p.read_text(errors="replace"), os.path.relpath(p, ROOT))
    objects = sorted(glob.glob(os.path.join(a.build, "CMakeFiles", "tk_cuda_kernels.dir", "**", "*.cu.o"),
                               recursive=True))
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if not cuobjdump or not nvdisasm:
        print("sass-check: cuobjdump / nvdisasm not found (pip install -r requirements/cuda.txt)")
        return 2
    if not objects:
        print(f"sass-check: no CUDA objects under {a.build} (run make cuda-check first)")
        return 2
    kernels = load_kernels(objects, cuobjdump, nvdisasm)
    errors: List[str] = []
    for e in exps:
        errors += evaluate(e, kernels)
    md = table(kernels, None if a.all else exps)
    print(md)
    if a.table:
        Path(a.table).write_text("<!-- written by tools/sass_check.py from the sm_80 / sm_90a check build -->\n"
                                 + md + "\n")
    print(f"sass-check: {len(objects)} objects, {len(kernels)} kernels, {len(exps)} expectations, "
          f"{len(errors)} violations")
    for err in errors:
        print("  " + err)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
