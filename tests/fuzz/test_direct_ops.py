"""Bad-input fuzz of the ops themselves (issue #16, item 0b): every op of the schema is public.

The ``torch.ops.tokenkernels.*`` calls that valid public-API calls make are recorded (by
namespace, so schema renames need no change here); then one argument at a time is replaced by
a value of its schema type that is bad (ints near 2^31 / 2^63, negative; tensors of another
dtype, rank, device (``meta``), empty, NaN / Inf, out-of-range indices; unknown option
strings) and the op is called directly. The cases of each op run in a forked child with a
per-call timeout (a crash or hang names its case): the child must exit normally (no signal, no hang, no sanitizer report), and
an exception must be a ValueError / TypeError / IndexError / RuntimeError whose message starts
with ``tokenkernels.`` and names an argument of the schema. A meta tensor mixed with CPU
tensors must be an error, not a shape-only result.

TOKENKERNELS_FUZZ_EXAMPLES=N adds N random mutations per argument to the fixed ones.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Tuple

import pytest
import torch

import tokenkernels as tk
from tokenkernels.testing import random_parents

from ._harness import (COLLECT, EXAMPLES, OpRecorder, check_error, collect, isolated, note,
                       per_call_timeout, schema_arg_names)

INTS = [-1, -2**31, 2**31 - 1, 2**31, 2**32 + 1, 2**63 - 1, -2**63, 0]
FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e308]
STRINGS = ["", "bogus", "AUTO", "reference"]


def _valid_public_calls(device: str) -> None:
    """One valid call of every public op (several ops each), recorded by :func:`recorded`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=g).to(device)
    tk.kcenter(x, 3, lengths=torch.tensor([7, 5], device=device), exclude=torch.zeros(2, 7, dtype=torch.bool,
               device=device), start="first", sorted=True, return_radii=True)
    tk.kcenter(x, torch.tensor([2, 3], device=device), metric="l2", impl="plain")
    sim = tk.mmtok_similarity(torch.randn(2, 3, 5, device=device), x)
    tk.coverage_select(sim, 2, lengths=torch.tensor([7, 6], device=device), row_lengths=torch.tensor([10, 9], device=device))
    h = torch.randn(6, 8, device=device, requires_grad=True)
    w = torch.randn(11, 8, device=device, requires_grad=True)
    t = torch.randint(0, 11, (6,), device=device)
    b = torch.randn(11, device=device, requires_grad=True)
    loss = tk.linear_cross_entropy(h, w, t, b, softcap=10.0, label_smoothing=0.1, z_loss=1e-3, return_aux=True)[0]
    loss.backward()
    p = random_parents(2, 9, seed=1).to(device)
    tree = tk.tree.build(p, torch.tensor([9, 6], device=device))
    q = torch.randn(2, 9, 4, 8, device=device)
    kc = torch.randn(2, 20, 2, 8, device=device)
    pre = torch.tensor([5, 11], device=device)
    tk.tree.attention(q, kc, kc.clone(), pre, tree)
    kp = kc.reshape(10, 4, 2, 8)
    table = torch.arange(10, device=device).view(2, 5)
    tk.tree.attention(q, kp, kp.clone(), pre, tree, block_table=table, out=torch.empty_like(q),
                      lse_out=q.new_empty(2, 9, 4))
    d = torch.randint(0, 5, (2, 9), device=device)
    tk.tree.verify_greedy(tree, d, torch.randint(0, 5, (2, 9), device=device))
    tp = torch.randn(2, 9, 5, device=device).softmax(-1)
    tk.tree.verify_sampling(tree, d, tp, draft_probs=torch.randn(2, 9, 5, device=device).softmax(-1),
                            generator=torch.Generator(device).manual_seed(0), mode="rsd")
    tk.tree.select_frontier(torch.randn(2, 3, device=device), torch.randn(2, 3, 4, device=device), 5)
    tk.tree.select_tree(-torch.rand(2, 9, device=device).cumsum(-1), p, 4)
    kv = tk.kv_select
    qd = torch.randn(2, 6, 8, device=device)
    k = torch.randn(2, 30, 2, 8, device=device)
    sl = torch.tensor([30, 17], dtype=torch.int32, device=device)
    s = kv.score(qd, k, sl)
    idx = kv.topk(s, 4, sl, n_sink=2, n_local=3)
    kv.topk(s, 4, sl, n_sink=2, n_local=3, out=torch.empty_like(idx))
    kv.select(qd, k, sl, k=4, n_sink=2, n_local=3, cache=kv.SelectionCache())
    kv.sparse_decode(qd, k, k.clone(), idx, sl)
    kv.sparse_decode(qd, k, k.clone(), idx, sl, out=torch.empty_like(qd), lse=qd.new_empty(2, 6))
    kpg = k.reshape(15, 4, 2, 8)
    bt = torch.arange(15, dtype=torch.int32, device=device)[:14].view(2, 7)
    kv.score(qd, kpg, torch.tensor([28, 17], dtype=torch.int32, device=device), block_table=bt)
    qc = torch.randn(2, 3, 6, 8, device=device)
    start = sl - 3
    kv.sparse_prefill(qc, k, k.clone(), idx, sl, start)
    kv.sparse_prefill(qc, k, k.clone(), idx, sl, start, out=torch.empty_like(qc), lse=qc.new_empty(2, 3, 6))


def recorded(device: str) -> Dict[str, Tuple[Any, tuple]]:
    """op name -> (OpOverload, args) of its first recorded call."""
    rec = OpRecorder()
    with rec:
        _valid_public_calls(device)
    calls: Dict[str, Tuple[Any, tuple]] = {}
    for func, args, kwargs in rec.calls:
        assert not kwargs
        # the dispatcher leaves trailing arguments at their schema defaults out of args
        schema = func._schema.arguments
        args = tuple(args) + tuple(a.default_value for a in schema[len(args):])
        calls.setdefault(str(func), (func, args))
    return calls


def _tensor_mutations(t: torch.Tensor, rng: random.Random) -> List[Tuple[str, torch.Tensor]]:
    out = [("meta", t.to("meta")), ("extra dim", t.unsqueeze(0))]
    if t.dim():
        out += [("one dim fewer", t[0]), ("empty", t.narrow(0, 0, 0)), ("first dim +1", torch.cat([t, t[:1]]))]
    else:
        out += [("1-d", t.reshape(1))]
    for dt in (torch.float32, torch.float16, torch.int32, torch.int64, torch.bool, torch.float64):
        if dt != t.dtype:
            out.append((f"dtype {dt}", t.to(dt)))
    if t.dim() >= 2:
        out.append(("non-contiguous", t.transpose(-1, -2).contiguous().transpose(-1, -2)))
    if t.numel():
        flat = [i for i in range(t.numel())]
        picks = [0, t.numel() - 1] + [rng.choice(flat) for _ in range(EXAMPLES // 8)]
        if t.dtype.is_floating_point:
            for v in FLOATS[:3]:
                for i in picks[:2 + EXAMPLES // 8]:
                    out.append((f"[{i}] = {v}", _set(t, i, v)))
        elif t.dtype != torch.bool:
            info = torch.iinfo(t.dtype)
            for v in INTS + [rng.randint(info.min, info.max) for _ in range(EXAMPLES // 4)]:
                if info.min <= v <= info.max:
                    for i in picks[:2 + EXAMPLES // 8]:
                        out.append((f"[{i}] = {v}", _set(t, i, v)))
            out.append(("all -1", torch.full_like(t, -1)))
            out.append(("all max", torch.full_like(t, info.max)))
    return out


def _set(t, i, v):
    t = t.clone()
    where = []
    for size in reversed(t.shape):
        where.append(i % size)
        i //= size
    t[tuple(reversed(where))] = v
    return t


def mutations(func, args: tuple, rng: random.Random) -> List[Tuple[int, str, Any]]:
    """(argument index, description, value) for every bad value of every argument."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        v = args[i]
        ty = str(a.type)
        if ty.startswith("Tensor"):
            if v is None:
                out += [(i, "a (2,) int64 tensor", torch.zeros(2, dtype=torch.long)),
                        (i, "a (0,) float tensor", torch.zeros(0)),
                        (i, "a meta tensor", torch.zeros(2, dtype=torch.long, device="meta"))]
            else:
                out += [(i, d, m) for d, m in _tensor_mutations(v, rng)]
                if ty.endswith("?"):
                    out.append((i, "None", None))
        elif ty in ("int", "SymInt"):
            vals = INTS + [rng.randint(-2**63, 2**63 - 1) for _ in range(EXAMPLES // 4)]
            out += [(i, f"= {x}", x) for x in vals]
        elif ty in ("float", "float?"):
            out += [(i, f"= {x}", x) for x in FLOATS]
            if ty == "float?":
                out.append((i, "None", None))
        elif ty == "str":
            out += [(i, f"= {x!r}", x) for x in STRINGS]
        elif ty == "bool":
            out.append((i, "flipped", not v))
    return out


def _has_meta(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args)


def run_group(func, args: tuple, cases: List[Tuple[int, str, Any]], device: str) -> None:
    names = schema_arg_names(func)
    for i, how, value in cases:
        bad = list(args)
        bad[i] = value
        what = f"{func}: {names[i]} {how}"
        note(what)
        try:
            with per_call_timeout():
                out = func(*bad)
        except BaseException as e:  # noqa: BLE001
            try:
                check_error(e, names, what)
            except AssertionError as err:
                if COLLECT:
                    collect(str(err).splitlines()[0][:500])
                    continue
                raise
            continue
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if _has_meta(bad) and not all(a is None or not isinstance(a, torch.Tensor) or a.device.type == "meta"
                                      for a in bad):
            if any(isinstance(o, torch.Tensor) for o in outs) or out is None:
                msg = f"{what}: a meta tensor among {device} tensors gave a shape-only result instead of an error"
                if COLLECT:
                    collect(msg)
                    continue
                raise AssertionError(msg)


_RECORDED: Dict[str, Dict[str, Tuple[Any, tuple]]] = {}


def _recorded(device):
    if device not in _RECORDED:
        _RECORDED[device] = recorded(device)
    return _RECORDED[device]


def test_every_op_is_recorded(device):
    """The valid calls reach every op of the schema, so every op gets fuzzed below."""
    got = {str(f._schema.name) for f, _ in _recorded(device).values()}
    assert got == set(tk.op_names()), sorted(set(tk.op_names()) - got)


@pytest.mark.parametrize("group", range(4))
def test_direct_ops(device, group):
    calls = sorted(_recorded(device).items())
    rng = random.Random(group)
    mine = calls[group::4]

    failures = []
    for name, (func, args) in mine:
        cases = mutations(func, args, rng)
        try:
            isolated(lambda: run_group(func, args, cases, device), device=device, timeout=300)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)
