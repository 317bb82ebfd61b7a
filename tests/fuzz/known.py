"""Defects the fuzz found in contract code that other engineers are rewriting (issue #16), kept
here instead of fixed so that their rewrites merge cleanly.

Each entry says which message of which op breaks the fuzz rule, whose code it is, and a
reproducer. The fuzz suite tolerates a violation only when an entry matches it, and
tests/fuzz/test_known.py asserts that every reproducer still breaks the rule -- so an entry
whose defect is fixed fails that test and must be deleted. The goal is an empty list.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch


@dataclass(frozen=True)
class Known:
    name: str
    owner: str                     # the file to fix
    what: str
    ops: Tuple[str, ...]           # substrings of the public op / schema name
    message: str                   # regex searched in the message (or in the fuzz's own assertion)
    reproduce: Callable[[], object]
    args: Optional[Tuple[str, ...]] = None   # only when one of these arguments was mutated
    how: Optional[str] = None      # only when the mutation's description matches this regex

    def matches(self, op: str, arg: Optional[str], message: str, how: Optional[str] = None) -> bool:
        if not any(o in op for o in self.ops):
            return False
        if self.args is not None and arg not in self.args:
            return False
        if self.how is not None and (how is None or re.search(self.how, how) is None):
            return False
        return re.search(self.message, message) is not None


def _tk():
    import tokenkernels
    return tokenkernels


# a value of the wrong Python type (or an int beyond int64) reaches torch's schema parser,
# whose message starts "tokenkernels::<schema>() Expected a value of type ..." / "Unable to cast"
_SCHEMA_PARSER = r"^tokenkernels::\w+\(\) Expected a value of type|Unable to cast"

KNOWN = [
    Known("kcenter-wrapper-types", "python/tokenkernels/_ops/kcenter.py",
          "bool options (check, sorted) and ints beyond int64 (k = 2**64) go unchecked to the schema",
          ("kcenter", "coverage_select"), _SCHEMA_PARSER,
          lambda: _tk().kcenter(torch.randn(4, 3), 2, check="yes")),
    Known("kcenter-per-item-types", "python/tokenkernels/_common.py (per_item)",
          "a non-tensor lengths / row_lengths / text_lengths / vision_lengths ('x') gives torch's "
          "TypeError \"new(): invalid data type 'str'\"",
          ("kcenter", "coverage_select", "mmtok_similarity"), r"^new\(\): invalid data type",
          lambda: _tk().kcenter(torch.randn(4, 3), 2, lengths="x")),
    Known("mmtok-devices", "python/tokenkernels/_ops/kcenter.py (mmtok_similarity)",
          "text / vision / *_lengths on different devices are not rejected: a meta vision with a CPU "
          "text gives a meta result, a meta text a wrong one, a meta text_lengths NotImplementedError "
          "'Cannot copy out of meta tensor'",
          ("mmtok_similarity",), r"",
          lambda: _meta_result(_tk().mmtok_similarity(torch.randn(1, 2, 3), torch.randn(1, 2, 3, device="meta"))),
          how=r"meta"),
    Known("tree-wrapper-types", "python/tokenkernels/_ops/tree.py",
          "build's check, attention's tree_lens / block_table, select_tree's n / select_frontier's m "
          "beyond int64 go unchecked to the schema",
          ("tree",), _SCHEMA_PARSER,
          lambda: _tk().tree.build(torch.tensor([-1, 0]), check="yes")),
    Known("tree-build-meta", "python/tokenkernels/_ops/tree.py (build reads max_depth / max_leaves)",
          "parents on meta: NotImplementedError 'Cannot copy out of meta tensor; no data!'",
          ("tree.build",), r"Cannot copy out of meta tensor",
          lambda: _tk().tree.build(torch.tensor([-1, 0], device="meta"))),
    Known("fakes-accept-mixed-meta", "the register_fake functions in python/tokenkernels/_ops/tree.py "
          "(kcenter's, kv_select's and cross_entropy's refuse it already)",
          "an op with one meta tensor among CPU tensors dispatches to its fake kernel and returns a "
          "shape-only result instead of raising: meta tensors, or -- where the fake allocates with "
          "new_empty on a CPU argument -- uninitialised CPU tensors (tree.attention with a meta "
          "block_table returns garbage such as -1.9e37; public API and direct calls alike)",
          ("tree_", "tree."),
          r"shape-only result|Tensor-likes are not close|non-finite output where the reference is finite",
          lambda: _meta_result(_tk().tree.select_frontier(torch.zeros(1, 2, device="meta"),
                                                          torch.zeros(1, 2, 3), 2)[0]),
          how=r"meta"),
    Known("tree-sizes-unbounded", "csrc/tree/tree_args.h (paths / verify: max_depth, max_leaves)",
          "max_depth / max_leaves far beyond n (a tree of n nodes has depth < n and at most n leaves) "
          "are accepted and sized into the outputs: 2**31 tries to allocate 34-275 GB, torch's "
          "allocator message instead of one naming the argument",
          ("tree_paths", "tree_verify", "tree.build"), r"you tried to allocate|can't allocate memory|"
          r"Storage size calculation overflowed",
          lambda: _tk().tree.build(torch.tensor([-1, 0]), max_depth=2**31, max_leaves=1)),
]


def _meta_result(out):
    if isinstance(out, torch.Tensor) and out.device.type == "meta":
        raise AssertionError("a meta argument among cpu tensors gave a shape-only result")
    return out


def tolerated(op: str, arg: Optional[str], message: str, how: Optional[str] = None) -> bool:
    return any(k.matches(op, arg, message, how) for k in KNOWN)


def avoid(op: str, arg: Optional[str], value) -> bool:
    """Cases not to run at all (none today: every known defect fails fast in the fuzz child,
    whose address space is capped)."""
    return False
