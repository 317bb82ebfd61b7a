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
    Known("check-h-prefix", "csrc/check.h (check_float_input / check_same_device / check_per_item / "
          "check_mask: used by every family's *_args.h)",
          "messages start 'tokenkernels: <arg> ...' without the op name",
          ("kcenter", "coverage", "kv_", "kv_select", "tree"), r"^tokenkernels: ",
          lambda: _tk().coverage_select(torch.ones(1, 2, 3, dtype=torch.int8), 1)),
    Known("fakes-accept-mixed-meta", "the register_fake functions in python/tokenkernels/_ops/kv_select.py, "
          "cross_entropy.py (kcenter's and tree's refuse it already)",
          "an op with one meta tensor among CPU tensors dispatches to its fake kernel and returns a "
          "shape-only result instead of raising: meta tensors, or -- where the fake allocates with "
          "new_empty on a CPU argument -- uninitialised CPU tensors (public API and direct calls alike)",
          ("kv_", "lce_", "cross_entropy_", "kv_select.", "linear_cross_entropy"),
          r"shape-only result|Tensor-likes are not close|non-finite output where the reference is finite",
          lambda: _meta_result(_tk().kv_select.score(torch.randn(1, 2, 4, device="meta"), torch.randn(1, 5, 1, 4),
                                                     torch.tensor([5], dtype=torch.int32))),
          how=r"meta"),
    Known("kv-wrapper-types", "python/tokenkernels/_ops/kv_select.py",
          "check='yes' goes unchecked to the schema; scale='x' or a (2,) tensor: float() raises "
          "ValueError without the op's name",
          ("kv_select",), _SCHEMA_PARSER + r"|could not convert string to float|only one element tensors",
          lambda: _tk().kv_select.select(torch.randn(1, 2, 4), torch.randn(1, 5, 1, 4),
                                         torch.tensor([5], dtype=torch.int32), k=1, scale="x")),
    Known("kv-budget-int32", "csrc/kv_select/kv_select_args.h (check_topk_args) + _ops/kv_select.py (_budget)",
          "n_sink + k + n_local up to int64 is accepted although the indices are int32: n_sink = 2**31 "
          "allocates (B, 2**31 + ...) int32 -- 8.6 GB per request -- instead of raising",
          ("kv_select", "kv_topk", "kv_select_topk"), r"you tried to allocate|can't allocate memory|"
          r"out of memory|std::bad_alloc|Storage size calculation overflowed",
          lambda: _tk().kv_select.topk(torch.randn(1, 5), 1, torch.tensor([5], dtype=torch.int32),
                                       n_sink=2**31, n_local=0)),
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
