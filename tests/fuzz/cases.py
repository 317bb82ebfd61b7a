"""Hypothesis strategies for the public API: a valid call of every public op (odd / 0 / 1
sizes, every dtype), then at most one argument replaced by a bad value (wrong type, dtype,
device (``meta``), rank, size; ints near 2^31 / 2^63; negative; NaN / Inf data; trees with
cycles and bad parents; out-of-range indices; unknown option strings).

A :class:`Call` knows its public op, its reference (:mod:`tests.fuzz._reference`) and how to
compare the two.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from hypothesis import strategies as st

import tokenkernels as tk
from tokenkernels.testing import random_parents

from . import _reference as ref

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
BIG_INTS = [2**31 - 1, 2**31, -2**31 - 1, 2**32 + 1, 2**63 - 1, -2**63, 2**64, -1]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
              torch.bool, torch.uint8, torch.int8, torch.complex64]


@dataclass
class Call:
    op: str                              # public name, e.g. "tree.attention"
    fn: Callable
    args: Dict[str, Any]                 # every argument by name (positional ones first)
    n_pos: int                           # how many of them are passed positionally
    ref: Optional[Callable] = None       # from _reference, same arguments
    compare: Optional[Callable] = None   # compare(call, out, ref_out)
    mutated: Optional[str] = None        # the argument replaced by a bad value, if any
    how: str = ""
    finite: bool = True                  # no NaN / Inf was put into the data
    extra: Dict[str, Any] = field(default_factory=dict)

    def split(self):
        names = list(self.args)
        return [self.args[n] for n in names[:self.n_pos]], {n: self.args[n] for n in names[self.n_pos:]}

    def run(self):
        a, kw = self.split()
        return self.fn(*a, **kw)

    def run_ref(self):
        a, kw = self.split()
        return self.ref(*a, **kw)

    def arg_names(self) -> List[str]:
        try:
            return list(inspect.signature(self.fn).parameters)
        except (TypeError, ValueError):
            return list(self.args)

    def __repr__(self):
        def r(v):
            if isinstance(v, torch.Tensor):
                s = f"tensor{tuple(v.shape)} {v.dtype} {v.device}"
                if v.numel() <= 12 and v.device.type != "meta":
                    s += f" {v.tolist()}"
                return s
            if isinstance(v, tk.tree.Tree):
                return f"Tree(parents={r(v.parents)})"
            return repr(v)[:200]
        body = ", ".join(f"{k}={r(v)}" for k, v in self.args.items())
        return f"{self.op}({body})  [mutated: {self.mutated or '-'} {self.how}]"


# ------------------------------------------------------------------ generic bad values
def _with_element(t: torch.Tensor, value, draw) -> torch.Tensor:
    t = t.clone()   # (keeps the strides of a strided cache)
    if t.numel():
        i = draw(st.integers(0, t.numel() - 1))
        where = []
        for size in reversed(t.shape):
            where.append(i % size)
            i //= size
        t[tuple(reversed(where))] = value
    return t


def bad_value(draw, value, name: str):
    """(new value, description) for argument ``value``."""
    if isinstance(value, torch.Tensor):
        kinds = ["dtype", "meta", "empty", "extra_dim", "drop_dim", "none", "int", "str", "list",
                 "noncontig"]
        if value.dtype.is_floating_point and value.numel():
            kinds += ["nan", "inf", "-inf"] * 2
        if not value.dtype.is_floating_point and value.dtype != torch.bool and value.numel():
            kinds += ["big"] * 3
        kind = draw(st.sampled_from(kinds))
        if kind == "dtype":
            dt = draw(st.sampled_from([d for d in ALL_DTYPES if d != value.dtype]))
            return (value.to(dt) if not dt.is_complex else value.to(torch.float32).to(dt)), f"dtype {dt}"
        if kind == "meta":
            return value.to("meta"), "on meta"
        if kind == "empty":
            if value.dim() == 0:
                return value.reshape(1)[:0], "empty"
            d = draw(st.integers(0, value.dim() - 1))
            return value.narrow(d, 0, 0), f"size 0 in dim {d}"
        if kind == "extra_dim":
            return value.unsqueeze(0), "extra leading dim"
        if kind == "drop_dim":
            return (value.reshape(-1)[:1].reshape(()) if value.dim() <= 1 else value[0]), "one dim fewer"
        if kind == "none":
            return None, "None"
        if kind == "int":
            return draw(st.sampled_from([0, 3, -1, 2**63 - 1])), "a Python int"
        if kind == "str":
            return "x", "a str"
        if kind == "list":
            return value.tolist() if value.numel() < 64 and value.device.type != "meta" else [1, 2], "a list"
        if kind == "noncontig":
            if value.dim() >= 2:
                return value.transpose(-1, -2).contiguous().transpose(-1, -2), "non-contiguous (valid)"
            return value, "unchanged"
        if kind in ("nan", "inf", "-inf"):
            return _with_element(value, float(kind), draw), f"an element {kind}"
        if kind == "big":
            info = torch.iinfo(value.dtype)
            vals = [v for v in BIG_INTS if info.min <= v <= info.max]
            v = draw(st.sampled_from(vals))
            return _with_element(value, v, draw), f"an element {v}"
    if isinstance(value, bool):
        return draw(st.sampled_from([None, 2, "yes", 1.5])), "bool -> other"
    if isinstance(value, int):
        v = draw(st.sampled_from(BIG_INTS + [None, 1.5, "3", True, float("nan")]))
        return v, f"int -> {v!r}"
    if isinstance(value, float):
        v = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e300, None, "x", True]))
        return v, f"float -> {v!r}"
    if isinstance(value, str):
        v = draw(st.sampled_from(["", "bogus", "AUTO", None, 3, "reference "]))
        return v, f"str -> {v!r}"
    if value is None:
        v = draw(st.sampled_from([torch.zeros(2, dtype=torch.long), torch.zeros(0), torch.ones(1, 1, 1),
                                  torch.zeros(2, dtype=torch.long, device="meta"), "x", 7]))
        desc = (f"a {tuple(v.shape)} {v.dtype} tensor on {v.device}" if isinstance(v, torch.Tensor)
                else repr(v))
        return v, f"None -> {desc}"
    return None, f"{type(value).__name__} -> None"


def maybe_mutate(draw, call: Call, special: Optional[Dict[str, Callable]] = None) -> Call:
    """Valid as drawn (about a quarter of the examples), or one argument replaced."""
    if not draw(st.integers(0, 3)):
        return call
    name = draw(st.sampled_from(sorted(call.args)))
    if special and name in special and draw(st.booleans()):
        new, how = special[name](draw, call.args[name])
    else:
        new, how = bad_value(draw, call.args[name], name)
    call.args[name] = new
    call.mutated, call.how = name, how
    if any(w in how for w in ("nan", "inf")):
        call.finite = False
    return call


# ------------------------------------------------------------------ comparisons
def _close(out, expect, atol, rtol, what, finite=True):
    if isinstance(expect, (tuple, list)):
        assert isinstance(out, (tuple, list)) and len(out) == len(expect), f"{what}: {type(out)} vs {type(expect)}"
        for i, (o, e) in enumerate(zip(out, expect)):
            _close(o, e, atol, rtol, f"{what}[{i}]", finite)
        return
    assert isinstance(out, torch.Tensor), f"{what}: got {type(out).__name__}"
    e = torch.as_tensor(expect)
    assert tuple(out.shape) == tuple(e.shape), f"{what}: shape {tuple(out.shape)} vs reference {tuple(e.shape)}"
    o, e = out.detach().cpu(), e.detach().cpu()
    if not finite:   # NaN / Inf data: propagating them is right, the reference's handling is no oracle
        return
    if o.dtype.is_floating_point or e.dtype.is_floating_point:
        o, e = o.double(), e.double()
        bad_nonfinite = torch.isfinite(e) & ~torch.isfinite(o)
        assert not bool(bad_nonfinite.any()), f"{what}: non-finite output where the reference is finite"
        torch.testing.assert_close(o, e, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(o.long(), e.long()), f"{what}: {o.tolist()} != reference {e.tolist()}"


def exact(call, out, expect):
    _close(out, expect, 0.0, 0.0, call.op, call.finite)


def close_kind(kind: str, scale: float = 1.0):
    from tokenkernels.testing import tol

    def cmp(call, out, expect):
        dt = call.extra.get("dtype", torch.float32)
        a = tol(dt, kind) * scale
        _close(out, expect, a, a, call.op, call.finite)
    return cmp


# ------------------------------------------------------------------ kcenter family
def _in_bounds_picks(call, out, N):
    idx = out[0] if isinstance(out, tuple) else out
    assert idx.dtype == torch.int64
    assert bool(((idx >= -1) & (idx < max(N, 1))).all()), f"{call.op}: picks out of range {idx.tolist()}"


def _kcenter_cmp(call, out, expect):
    x = call.args["x"]
    N = x.shape[-2]
    _in_bounds_picks(call, out, N)
    if not call.finite or call.args.get("sorted") or not isinstance(call.args.get("start"), str) \
            or not isinstance(out, tuple):
        return
    from tests.kcenter.oracle import replay_kcenter
    idx, radii = out
    ri, rr = expect
    if torch.equal(idx.cpu(), ri.cpu()):
        return
    start = call.args["start"]   # "isolated" or "first" (= token 0: no exclude is drawn)
    replay_kcenter(x, idx, radii, k=call.args["k"], metric=call.args["metric"],
                   start="isolated" if start == "isolated" else 0, lengths=call.args.get("lengths"))


@st.composite
def kcenter_calls(draw, device="cpu"):
    B = draw(st.sampled_from([1, 2, 3]))
    N = draw(st.sampled_from([0, 1, 2, 5, 17]))
    D = draw(st.sampled_from([1, 3, 8]))
    dt = draw(st.sampled_from(FLOATS))
    x = torch.randn(B, N, D).to(dt).to(device)
    k = draw(st.integers(0, N))
    lengths = None
    if draw(st.booleans()):
        lengths = torch.tensor([draw(st.integers(k, N)) for _ in range(B)], device=device)
    start = draw(st.sampled_from(["isolated", "first"]))
    args = dict(x=x, k=k, lengths=lengths, metric=draw(st.sampled_from(["cosine", "l2"])), start=start,
                exclude=None, sorted=False, return_radii=True, check=True, impl="auto")
    if draw(st.booleans()):
        args.pop("lengths"), args.pop("exclude")
    c = Call("kcenter", tk.kcenter, args, 2, ref.kcenter, _kcenter_cmp, extra=dict(dtype=dt))
    return maybe_mutate(draw, c)


def _coverage_cmp(call, out, expect):
    sim = call.args["sim"]
    _in_bounds_picks(call, out, sim.shape[-1])
    if not call.finite:
        return
    from tests.kcenter.oracle import replay_coverage
    if not isinstance(out, tuple):
        return
    idx, gains = out
    if torch.equal(idx.cpu(), expect[0].cpu()):
        return
    replay_coverage(sim, idx, gains, k=call.args["k"], lengths=call.args.get("lengths"),
                    row_lengths=call.args.get("row_lengths"))


@st.composite
def coverage_calls(draw, device="cpu"):
    B = draw(st.sampled_from([1, 2]))
    M = draw(st.sampled_from([0, 1, 3, 7]))
    N = draw(st.sampled_from([0, 1, 4, 9]))
    dt = draw(st.sampled_from(FLOATS))
    sim = torch.rand(B, M, N).to(dt).to(device)
    k = draw(st.integers(0, N))
    args = dict(sim=sim, k=k, lengths=None, row_lengths=None, return_gains=True, check=True)
    if draw(st.booleans()):
        args["row_lengths"] = torch.tensor([draw(st.integers(0, M)) for _ in range(B)], device=device)
    return maybe_mutate(draw, Call("coverage_select", tk.coverage_select, args, 2, ref.coverage_select,
                                   _coverage_cmp, extra=dict(dtype=dt)))


@st.composite
def mmtok_calls(draw, device="cpu"):
    B = draw(st.sampled_from([1, 2]))
    T, V, D = draw(st.sampled_from([0, 1, 3])), draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([1, 4]))
    tau = draw(st.sampled_from([0.02, 0.5, 1.0]))
    args = dict(text=torch.randn(B, T, D, device=device), vision=torch.randn(B, V, D, device=device),
                alpha=draw(st.sampled_from([0.0, 0.5, 1.0])), tau_tv=tau, tau_vv=None,
                text_lengths=None, vision_lengths=None)
    # fp32 logits are accurate to the cosine-key tolerance; the softmax scales that by 1/tau
    return maybe_mutate(draw, Call("mmtok_similarity", tk.mmtok_similarity, args, 2, ref.mmtok_similarity,
                                   close_kind("dist", 2.0 / tau)))


# ------------------------------------------------------------------ cross_entropy family
def _ce_cmp(call, out, expect):
    from tokenkernels.testing import tol
    h, w = call.args["hidden"], call.args["weight"]
    b = call.args.get("bias")
    scale = float((h.double().abs().reshape(-1, h.shape[-1]) @ w.double().abs().T).max()) if h.numel() and w.numel() else 0.0
    if isinstance(b, torch.Tensor) and b.numel():
        scale += float(b.double().abs().max())
    a = tol(torch.float32, "ce_loss") * 4 * (1.0 + scale)
    if h.dtype in (torch.float16, torch.bfloat16):
        # the reference rounds each logit to hidden's dtype (unit roundoff u, error <= u * scale),
        # the kernels accumulate in fp32: lse and the target logit each differ by up to that
        a += 4 * (torch.finfo(h.dtype).eps / 2) * scale
    _close(out, expect, a, a, call.op, call.finite)


@st.composite
def ce_calls(draw, device="cpu"):
    dt = draw(st.sampled_from(FLOATS))
    lead = draw(st.sampled_from([(0,), (1,), (5,), (2, 3)]))
    D, V = draw(st.sampled_from([0, 1, 7, 16])), draw(st.sampled_from([1, 2, 13]))
    hidden = torch.randn(*lead, D).to(dt).to(device)
    weight = (torch.randn(V, D) / max(D, 1) ** 0.5).to(dt).to(device)
    targets = torch.randint(0, V, lead, device=device)
    if targets.numel() and draw(st.booleans()):
        targets.view(-1)[0] = -100
    bias = torch.randn(V).to(dt).to(device) if draw(st.booleans()) else None
    args = dict(hidden=hidden, weight=weight, targets=targets, bias=bias,
                ignore_index=-100, reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                softcap=draw(st.sampled_from([None, 5.0])), label_smoothing=draw(st.sampled_from([0.0, 0.1])),
                z_loss=draw(st.sampled_from([0.0, 1e-3])), shift=draw(st.sampled_from([False, True, 0])),
                return_lse=draw(st.booleans()), return_aux=draw(st.booleans()), check=True, impl="auto")
    c = Call("linear_cross_entropy", tk.linear_cross_entropy, args, 4, ref.linear_cross_entropy, _ce_cmp,
             extra=dict(dtype=dt))
    return maybe_mutate(draw, c)


# ------------------------------------------------------------------ tree family
def _bad_parents(draw, p):
    p = p.clone()
    B, n = p.shape if p.dim() == 2 else (1, p.shape[0])
    pv = p.view(B, n)
    b = draw(st.integers(0, B - 1))
    i = draw(st.integers(0, n - 1))
    kind = draw(st.sampled_from(["self", "forward", "second_root", "root_not_-1", "huge", "neg"]))
    v = {"self": i, "forward": min(i + 1, n - 1) if n > 1 else 5, "second_root": -1, "root_not_-1": 0,
         "huge": 2**40 if p.dtype == torch.int64 else 2**31 - 1, "neg": -7}[kind]
    if kind == "root_not_-1":
        i = 0
    if kind == "second_root" and i == 0:
        i = n - 1
    pv[b, i] = v
    return p, f"parents[{b}, {i}] = {v} ({kind})"


@st.composite
def _tree(draw, device="cpu", B=None):
    B = B or draw(st.sampled_from([1, 2, 3]))
    n = draw(st.sampled_from([1, 2, 5, 33]))
    p = random_parents(B, n, seed=draw(st.integers(0, 1000)))
    if draw(st.booleans()):
        p = p.int()
    return p.to(device)


@st.composite
def build_calls(draw, device="cpu"):
    p = draw(_tree(device))
    B, n = p.shape
    args = dict(parents=p, tree_lens=None, check=True, impl="auto")
    if draw(st.booleans()):
        args["tree_lens"] = torch.tensor([draw(st.integers(1, n)) for _ in range(B)], device=device)
    return maybe_mutate(draw, Call("tree.build", tk.tree.build, args, 2, ref.tree_build, _build_cmp),
                        special={"parents": _bad_parents})


def _build_cmp(call, out, expect):
    for name in ("mask", "depth", "first_child", "next_sibling"):
        _close(getattr(out, name), expect[name], 0, 0, f"tree.build {name}", call.finite)
    _close(out.paths, expect["paths"], 0, 0, "tree.build paths", call.finite)


@st.composite
def from_paths_calls(draw, device="cpu"):
    raw = draw(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=3), max_size=6))
    choices = set()
    for r in raw:
        for j in range(1, len(r) + 1):
            choices.add(tuple(r[:j]))
    choices = sorted(choices)
    args = dict(choices=choices)

    def bad(draw, v):
        kind = draw(st.sampled_from(["neg", "str", "huge", "gap", "none", "empty", "dup", "nested"]))
        v = list(v)
        if kind == "neg":
            return v + [(-1,)], "a negative rank"
        if kind == "str":
            return v + [("a",)], "a str rank"
        if kind == "huge":
            return v + [(2**63,)], "rank 2^63"
        if kind == "gap":
            return v + [(3, 3, 3, 3)], "a path without its prefixes"
        if kind == "none":
            return None, "None"
        if kind == "empty":
            return v + [()], "the empty path"
        if kind == "dup":
            return v + v[:1], "a duplicate"
        return [[v]], "nested too deep"
    return maybe_mutate(draw, Call("tree.from_paths", tk.tree.from_paths, args, 1, ref.tree_from_paths, exact),
                        special={"choices": bad})


@st.composite
def attention_calls(draw, device="cpu"):
    p = draw(_tree(device, B=draw(st.sampled_from([1, 2]))))
    B, n = p.shape
    t = tk.tree.build(p)
    dt = draw(st.sampled_from(FLOATS))
    Hkv, G, D = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 5, 16]))
    prefix = [draw(st.integers(0, 9)) for _ in range(B)]
    need = max(prefix) + n
    paged = draw(st.booleans())
    q = torch.randn(B, n, Hkv * G, D).to(dt).to(device)
    table = None
    if paged:
        S = draw(st.sampled_from([1, 4, 16]))
        pages = -(-need // S)
        P = B * pages + 1
        k = torch.randn(P, S, Hkv, D).to(dt).to(device)
        table = torch.randperm(P)[:B * pages].view(B, pages).to(device)
    else:
        k = torch.randn(B, need + draw(st.integers(0, 3)), Hkv, D).to(dt).to(device)
    v = torch.randn_like(k)
    args = dict(q=q, k_cache=k, v_cache=v, prefix_lens=torch.tensor(prefix, device=device), mask=t,
                tree_lens=None, block_table=table, scale=None, return_lse=True, check=True, impl="auto")
    return maybe_mutate(draw, Call("tree.attention", tk.tree.attention, args, 5, ref.tree_attention,
                                   _attn_cmp, extra=dict(dtype=dt)))


def _attn_cmp(call, out, expect):
    from tokenkernels.testing import tol
    dt = call.extra["dtype"]
    _close(out[0], expect[0], tol(dt, "tree_attn"), tol(dt, "tree_attn"), "tree.attention out", call.finite)
    _close(out[1], expect[1], tol(dt, "tree_lse"), tol(dt, "tree_lse"), "tree.attention lse", call.finite)


@st.composite
def verify_calls(draw, device="cpu"):
    p = draw(_tree(device))
    B, n = p.shape
    t = tk.tree.build(p)
    V = draw(st.sampled_from([1, 3, 8]))
    draft = torch.randint(0, V, (B, n), device=device)
    if draw(st.booleans()):
        tgt = torch.randint(0, V, (B, n), device=device)
        args = dict(tree=t, draft_tokens=draft, target_argmax=tgt)
        return maybe_mutate(draw, Call("tree.verify_greedy", tk.tree.verify_greedy, args, 3,
                                       ref.tree_verify_greedy, exact))
    probs = torch.randn(B, n, V, device=device).softmax(-1)
    dprobs = torch.randn(B, n, V, device=device).softmax(-1) if draw(st.booleans()) else None
    args = dict(tree=t, draft_tokens=draft, target_probs=probs, draft_probs=dprobs, check=True,
                coins=torch.rand(B, n, device=device), bonus_u=torch.rand(B, device=device),
                mode=draw(st.sampled_from(["specinfer", "rsd"])))
    return maybe_mutate(draw, Call("tree.verify_sampling", tk.tree.verify_sampling, args, 3,
                                   ref.tree_verify_sampling, exact))


@st.composite
def dynamic_calls(draw, device="cpu"):
    B = draw(st.sampled_from([1, 2]))
    if draw(st.booleans()):
        F, K = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 4]))
        args = dict(cum_logp=torch.randn(B, F, device=device), child_logp=torch.randn(B, F, K, device=device),
                    m=draw(st.integers(0, F * K)))
        return maybe_mutate(draw, Call("tree.select_frontier", tk.tree.select_frontier, args, 3,
                                       ref.tree_select_frontier, exact))
    p = draw(_tree(device, B=B))
    T = p.shape[1]
    args = dict(cum_logp=-torch.rand(B, T, device=device).cumsum(-1), parents=p, n=draw(st.integers(1, T)))
    return maybe_mutate(draw, Call("tree.select_tree", tk.tree.select_tree, args, 3, ref.tree_select_tree,
                                   exact), special={"parents": _bad_parents})


# ------------------------------------------------------------------ kv_select family
@st.composite
def _kv_case(draw, device="cpu", C=None):
    from tests.kv_select.cases import make_case
    B = draw(st.sampled_from([1, 2]))
    N = draw(st.sampled_from([1, 5, 40]))
    seq = [draw(st.integers(0, N)) for _ in range(B)]
    dt = draw(st.sampled_from(FLOATS))
    c = make_case(seq, H_kv=draw(st.sampled_from([1, 2])), G=draw(st.sampled_from([1, 3])),
                  D=draw(st.sampled_from([1, 4, 8])), dtype=dt, n_max=N,
                  page_size=draw(st.sampled_from([None, 4])), strided=draw(st.booleans()),
                  device=device, seed=draw(st.integers(0, 99)), C=C)
    return c, dt, N


def _indices(draw, seq_lens, K, device):
    B = seq_lens.shape[0]
    rows = []
    for b in range(B):
        L = int(seq_lens[b])
        # distinct positions (as topk writes them), -1 padded
        picks = sorted(set(draw(st.lists(st.integers(0, max(L - 1, 0)), max_size=K)))) if L else []
        rows.append(picks[:K] + [-1] * (K - len(picks[:K])))
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _kv_cmp(kinds):
    from tokenkernels.testing import tol

    def cmp(call, out, expect):
        dt = call.extra["dtype"]
        outs = out if isinstance(out, tuple) else (out,)
        exps = expect if isinstance(expect, tuple) else (expect,)
        scale = call.extra.get("scale", 1.0)
        for o, e, kind in zip(outs, exps, kinds):
            _close(o, e, tol(dt, kind) * scale, tol(dt, kind) * scale, f"{call.op} ({kind})", call.finite)
    return cmp


@st.composite
def kv_calls(draw, device="cpu"):
    which = draw(st.sampled_from(["score", "topk", "sparse_decode", "sparse_prefill", "select"]))
    if which == "sparse_prefill":
        Cn = draw(st.sampled_from([1, 3]))
        c, dt, N = draw(_kv_case(device, C=Cn))
    else:
        c, dt, N = draw(_kv_case(device, C=draw(st.sampled_from([None, None, 2])) if which in ("score", "select") else None))
    sl, bt = c.seq_lens, c.block_table
    if which == "score":
        args = dict(q=c.q, k_cache=c.k, seq_lens=sl, block_table=bt, scale=draw(st.sampled_from([1.0, 0.3])),
                    skip=None, check=True, impl="auto")
        Hq = c.q.shape[-2]
        return maybe_mutate(draw, Call("kv_select.score", tk.kv_select.score, args, 3, ref.kv_score,
                                       _kv_cmp(["kv_score"]), extra=dict(dtype=dt, scale=Hq)))
    k, ns, nl = draw(st.integers(0, 6)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    if which == "topk":
        scores = ref.kv_score(c.q, c.k, sl, block_table=bt).float()
        args = dict(scores=scores, k=k, seq_lens=sl, n_sink=ns, n_local=nl, reuse=None, reuse_mask=None,
                    impl=draw(st.sampled_from(["auto", "tuned"])))
        return maybe_mutate(draw, Call("kv_select.topk", tk.kv_select.topk, args, 3, ref.kv_topk, exact))
    if which == "select":
        args = dict(q=c.q, k_cache=c.k, seq_lens=sl, k=k, n_sink=ns, n_local=nl, block_table=bt, scale=1.0,
                    check=True)
        return maybe_mutate(draw, Call("kv_select.select", tk.kv_select.select, args, 3, ref.kv_select, exact))
    K = draw(st.sampled_from([1, 4, 9]))
    if which == "sparse_decode":
        idx = _indices(draw, sl, K, device)
        args = dict(q=c.q, k_cache=c.k, v_cache=c.v, indices=idx, seq_lens=sl, block_table=bt, scale=None,
                    return_lse=True, check=True, impl="auto")
        return maybe_mutate(draw, Call("kv_select.sparse_decode", tk.kv_select.sparse_decode, args, 5,
                                       ref.kv_sparse_decode, _kv_cmp(["kv_out", "kv_lse"]), extra=dict(dtype=dt)))
    Cn = c.q.shape[1]
    start = torch.tensor([max(int(s) - draw(st.integers(0, Cn)), 0) for s in sl.tolist()], dtype=torch.int32,
                         device=device)
    idx = _indices(draw, start, K, device)
    args = dict(q=c.q, k_cache=c.k, v_cache=c.v, indices=idx, seq_lens=sl, chunk_start=start, block_table=bt,
                scale=None, return_lse=True, check=True, impl="auto")
    return maybe_mutate(draw, Call("kv_select.sparse_prefill", tk.kv_select.sparse_prefill, args, 6,
                                   ref.kv_sparse_prefill, _kv_cmp(["kv_out", "kv_lse"]), extra=dict(dtype=dt)))


STRATEGIES = {
    "kcenter": kcenter_calls, "coverage_select": coverage_calls, "mmtok_similarity": mmtok_calls,
    "linear_cross_entropy": ce_calls, "tree.build": build_calls, "tree.from_paths": from_paths_calls,
    "tree.attention": attention_calls, "tree.verify": verify_calls, "tree.dynamic": dynamic_calls,
    "kv_select": kv_calls,
}
