"""Bad arguments raise a clear error that names the argument."""
import pytest
import torch

import tokenkernels as tk

from ..conftest import HAS_CUDA

ERR = (RuntimeError, ValueError, TypeError)


def _x(device, B=2, N=10, D=4, dtype=torch.float32):
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)


def _sim(device, B=2, M=6, N=10):
    return torch.rand(B, M, N, generator=torch.Generator().manual_seed(0)).to(device)


def _l(v, device):
    return torch.tensor(v, device=device)


# ------------------------------------------------------------------------------ kcenter
@pytest.mark.parametrize("start", ["isolated", "first", "random"])
def test_k_exceeds_valid_tokens(device, start):
    x = _x(device)
    with pytest.raises(RuntimeError, match=r"k = 11 exceeds the number of valid tokens \(10\)"):
        tk.kcenter(x, 11, start=start)
    with pytest.raises(RuntimeError, match=r"k = 6 exceeds the number of valid tokens \(5\) of item 1"):
        tk.kcenter(x, 6, lengths=_l([10, 5], device), start=start)
    ex = torch.zeros(2, 10, dtype=torch.bool, device=device)
    ex[0, :8] = True
    with pytest.raises(RuntimeError, match=r"k = 3 exceeds the number of valid tokens \(2\) of item 0"):
        tk.kcenter(x, 3, exclude=ex, start=start)
    with pytest.raises(RuntimeError, match=r"k = 4 exceeds the number of valid tokens \(3\) of item 1"):
        tk.kcenter(x, _l([2, 4], device), lengths=_l([10, 3], device), start=start)
    with pytest.raises(RuntimeError, match="exceeds the number of valid tokens"):
        tk.kcenter(x[0], 11, start=start)


def test_k_negative_or_wrong_type(device):
    x = _x(device)
    with pytest.raises(ValueError, match="k must be >= 0"):
        tk.kcenter(x, -1)
    with pytest.raises(ValueError, match="k must be >= 0"):
        tk.kcenter(x, _l([-1, -2], device))
    with pytest.raises(RuntimeError, match=r"k must be >= 0, got k\[1\] = -1"):
        tk.kcenter(x, _l([3, -1], device))
    with pytest.raises(TypeError, match="k must be an int"):
        tk.kcenter(x, 2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        tk.kcenter(x, True)
    with pytest.raises(TypeError, match="k must be an integer tensor"):
        tk.kcenter(x, torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(ValueError, match=r"k must be an int or have shape \(2,\)"):
        tk.kcenter(x, _l([1, 2, 3], device))
    with pytest.raises(RuntimeError, match=r"k\[1\] = 5 exceeds k_max = 3"):
        tk.kcenter(x, _l([1, 5], device), k_max=3)


@pytest.mark.parametrize("shape", [(10,), (1, 2, 10, 4), ()], ids=["1d", "4d", "0d"])
def test_x_wrong_rank(device, shape):
    with pytest.raises(ValueError, match=r"x must be 2-D \(N, D\) or 3-D \(B, N, D\)"):
        tk.kcenter(torch.randn(shape, device=device), 1)


def test_x_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tk.kcenter([[1.0, 2.0]], 1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float64], ids=str)
def test_x_wrong_dtype(device, dtype):
    x = torch.ones(2, 5, 3, dtype=dtype, device=device)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        tk.kcenter(x, 1)


def test_x_no_features(device):
    with pytest.raises(RuntimeError, match="x must have D >= 1"):
        tk.kcenter(torch.randn(2, 5, 0, device=device), 1)


def test_lengths_bad_values(device):
    x = _x(device)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, N=10\]"):
        tk.kcenter(x, 1, lengths=_l([11, 10], device))
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, N=10\]"):
        tk.kcenter(x, 0, lengths=_l([3, -1], device))
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, N=10\]"):
        tk.kcenter(x, 1, lengths=_l([-1, 3], device), start="first")


def test_lengths_bad_shape_or_dtype(device):
    x = _x(device)
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        tk.kcenter(x, 1, lengths=_l([10, 10, 10], device))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        tk.kcenter(x, 1, lengths=_l([[10, 10]], device))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        tk.kcenter(x, 1, lengths=torch.tensor([10.0, 9.0], device=device))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        tk.kcenter(x, 1, lengths=torch.tensor([True, True], device=device))


def test_exclude_bad_shape_or_dtype(device):
    x = _x(device)
    with pytest.raises(ValueError, match=r"exclude must have shape \(2, 10\)"):
        tk.kcenter(x, 1, exclude=torch.zeros(2, 9, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"exclude must have shape \(2, 10\)"):
        tk.kcenter(x, 1, exclude=torch.zeros(10, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"exclude must have shape \(1, 10\)"):
        tk.kcenter(x[0], 1, exclude=torch.zeros(9, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="exclude must be a bool tensor"):
        tk.kcenter(x, 1, exclude=torch.zeros(2, 10, dtype=torch.uint8, device=device))
    with pytest.raises(TypeError, match="exclude must be a bool tensor"):
        tk.kcenter(x, 1, exclude=[[False] * 10] * 2)


def test_start_index_invalid(device):
    x = _x(device)
    with pytest.raises(RuntimeError, match="start index 10 of item 0 is not a valid token"):
        tk.kcenter(x, 2, start=_l([10, 0], device))
    with pytest.raises(RuntimeError, match="start index -1 of item 1 is not a valid token"):
        tk.kcenter(x, 2, start=_l([0, -1], device))
    with pytest.raises(RuntimeError, match="start index 12 of item 0 is not a valid token"):
        tk.kcenter(x, 2, start=12)
    with pytest.raises(RuntimeError, match="start index 7 of item 1 is not a valid token"):
        tk.kcenter(x, 2, start=_l([0, 7], device), lengths=_l([10, 7], device))
    ex = torch.zeros(2, 10, dtype=torch.bool, device=device)
    ex[0, 4] = True
    with pytest.raises(RuntimeError, match="start index 4 of item 0 is not a valid token"):
        tk.kcenter(x, 2, start=4, exclude=ex)
    with pytest.raises(ValueError, match=r"start must have shape \(2,\)"):
        tk.kcenter(x, 2, start=_l([0, 1, 2], device))
    with pytest.raises(TypeError, match="start must be an integer tensor"):
        tk.kcenter(x, 2, start=torch.tensor([0.0, 1.0], device=device))
    with pytest.raises(TypeError, match="start must be a str or an index tensor"):
        tk.kcenter(x, 2, start=1.5)


def test_bad_strings(device):
    x = _x(device)
    with pytest.raises(ValueError, match="kcenter: metric must be one of 'cosine', 'l2', got 'dot'"):
        tk.kcenter(x, 2, metric="dot")
    with pytest.raises(ValueError, match="start must be 'isolated', 'first', 'random' or an index tensor, got 'last'"):
        tk.kcenter(x, 2, start="last")
    with pytest.raises(ValueError, match="impl must be one of"):
        tk.kcenter(x, 2, impl="fast")


SELECT = torch.ops.tokenkernels.kcenter_select
COVERAGE = torch.ops.tokenkernels.kcenter_coverage_select


def test_raw_op_bad_metric(device):
    x = _x(device)
    with pytest.raises(ValueError, match="kcenter: metric must be one of 'cosine', 'l2', got 'cos'"):
        SELECT(x, 1, None, None, None, None, "cos", False, True, "auto")
    with pytest.raises(RuntimeError, match="lengths must be int64"):
        SELECT(x, 1, None, _l([3, 3], device).int(), None, None, "cosine", False, True, "auto")
    with pytest.raises(RuntimeError, match="exclude must be bool"):
        SELECT(x, 1, None, None, torch.zeros(2, 10, device=device), None, "cosine", False, True, "auto")
    with pytest.raises(RuntimeError, match="k must be >= 0"):
        SELECT(x, -1, None, None, None, None, "cosine", False, True, "auto")


@pytest.mark.parametrize("impl", ["", "AUTO", "reference", "1"])
def test_raw_op_bad_impl(device, impl):
    """The schema's impl is the op-level variant name; "reference" is the Python API's only."""
    with pytest.raises(ValueError, match="kcenter: impl must be one of 'auto', 'plain', 'simt', 'tuned', "
                                         f"'stream', got '{impl}'"):
        SELECT(_x(device), 1, None, None, None, None, "cosine", False, True, impl)


def test_raw_op_shapes_are_value_errors(device):
    """Called directly, each op checks its own shapes with the wrapper's messages."""
    x, sim = _x(device), _sim(device)
    with pytest.raises(ValueError, match=r"kcenter: x must be \(B, N, D\), got shape \[10, 4\]"):
        SELECT(x[0], 1, None, None, None, None, "cosine", False, True, "auto")
    with pytest.raises(ValueError, match=r"kcenter: k must be an int or have shape \(2,\), got \[3\]"):
        SELECT(x, 1, _l([1, 1, 1], device), None, None, None, "cosine", False, True, "auto")
    with pytest.raises(ValueError, match=r"kcenter: start must have shape \(2,\), got \[1\]"):
        SELECT(x, 1, None, None, None, _l([0], device), "cosine", False, True, "auto")
    with pytest.raises(ValueError, match=r"coverage_select: sim must be \(B, M, N\)"):
        COVERAGE(sim[0], 1, None, None, None, None, True)
    with pytest.raises(ValueError, match=r"coverage_select: row_lengths must have shape \(2,\)"):
        COVERAGE(sim, 1, None, None, _l([6], device), None, True)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_mismatched_devices():
    x = _x("cuda")
    with pytest.raises(RuntimeError, match="lengths is on cpu but x is on cuda"):
        tk.kcenter(x, 2, lengths=torch.tensor([10, 10]))
    with pytest.raises(RuntimeError, match="exclude is on cpu but x is on cuda"):
        tk.kcenter(x, 2, exclude=torch.zeros(2, 10, dtype=torch.bool))
    sim = _sim("cuda")
    with pytest.raises(RuntimeError, match="lengths is on cpu but sim is on cuda"):
        tk.coverage_select(sim, 2, lengths=torch.tensor([10, 10]))
    with pytest.raises(RuntimeError, match="row_lengths is on cpu but sim is on cuda"):
        tk.coverage_select(sim, 2, row_lengths=torch.tensor([6, 6]))
    with pytest.raises(RuntimeError, match="exclude is on cpu but sim is on cuda"):
        tk.coverage_select(sim, 2, exclude=torch.zeros(2, 10, dtype=torch.bool))
    # the raw op checks the per-item k tensor's device too
    with pytest.raises(RuntimeError, match="k is on cpu but x is on cuda"):
        SELECT(x, 2, torch.tensor([2, 2]), None, None, None, "cosine", False, True, "auto")


# ------------------------------------------------------------------------------ coverage_select
def test_coverage_k_exceeds_valid(device):
    sim = _sim(device)
    with pytest.raises(RuntimeError, match=r"k = 11 exceeds the number of valid candidates \(10\)"):
        tk.coverage_select(sim, 11)
    with pytest.raises(RuntimeError, match=r"k = 4 exceeds the number of valid candidates \(3\) of item 1"):
        tk.coverage_select(sim, 4, lengths=_l([10, 3], device))
    ex = torch.zeros(2, 10, dtype=torch.bool, device=device)
    ex[1, 1:] = True
    with pytest.raises(RuntimeError, match=r"k = 2 exceeds the number of valid candidates \(1\) of item 1"):
        tk.coverage_select(sim, 2, exclude=ex)
    with pytest.raises(ValueError, match="k must be >= 0"):
        tk.coverage_select(sim, -3)
    with pytest.raises(RuntimeError, match=r"k\[0\] = -1 must lie in \[0, k_max = 2\]"):
        tk.coverage_select(sim, _l([-1, 2], device))


def test_coverage_sim_negative(device):
    sim = _sim(device)
    sim[1, 2, 3] = -1e-3
    with pytest.raises(RuntimeError, match="sim must be non-negative"):
        tk.coverage_select(sim, 2)


def test_coverage_row_lengths(device):
    sim = _sim(device)
    with pytest.raises(RuntimeError, match=r"row_lengths must lie in \[0, M=6\]"):
        tk.coverage_select(sim, 2, row_lengths=_l([7, 6], device))
    with pytest.raises(RuntimeError, match=r"row_lengths must lie in \[0, M=6\]"):
        tk.coverage_select(sim, 2, row_lengths=_l([-1, 6], device))
    with pytest.raises(ValueError, match=r"row_lengths must have shape \(2,\)"):
        tk.coverage_select(sim, 2, row_lengths=_l([6], device))
    with pytest.raises(TypeError, match="row_lengths must be an integer tensor"):
        tk.coverage_select(sim, 2, row_lengths=torch.tensor([6.0, 6.0], device=device))


def test_coverage_bad_shapes_and_dtypes(device):
    sim = _sim(device)
    with pytest.raises(ValueError, match="sim must be 2-D"):
        tk.coverage_select(sim[0, 0], 1)
    with pytest.raises(ValueError, match="sim must be 2-D"):
        tk.coverage_select(sim[None], 1)
    with pytest.raises(RuntimeError, match="sim must be float32, float16 or bfloat16"):
        tk.coverage_select((sim * 10).long(), 1)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, N=10\]"):
        tk.coverage_select(sim, 1, lengths=_l([11, 3], device))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        tk.coverage_select(sim, 1, lengths=_l([1, 2, 3], device))
    with pytest.raises(ValueError, match=r"exclude must have shape \(2, 10\)"):
        tk.coverage_select(sim, 1, exclude=torch.zeros(2, 6, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="exclude must be a bool tensor"):
        tk.coverage_select(sim, 1, exclude=torch.zeros(2, 10, dtype=torch.int64, device=device))


# ------------------------------------------------------------------------------ mmtok_similarity
def test_mmtok_bad_inputs(device):
    t = torch.randn(2, 3, 8, device=device)
    v = torch.randn(2, 5, 8, device=device)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        tk.mmtok_similarity(t, v, alpha=1.5)
    with pytest.raises(ValueError, match="text .* and vision .* must share batch and feature sizes"):
        tk.mmtok_similarity(t, v[..., :7])
    with pytest.raises(ValueError, match="text .* and vision .* must share batch and feature sizes"):
        tk.mmtok_similarity(t, v[:1])
    with pytest.raises(ValueError, match="vision must be 2-D"):
        tk.mmtok_similarity(t, v[0, 0])
    with pytest.raises(ValueError, match=r"text_lengths must have shape \(2,\)"):
        tk.mmtok_similarity(t, v, text_lengths=_l([1], device))


def test_arguments_on_another_device_than_x():
    """A meta lengths/exclude with CPU x used to reach the shape-only fake kernel and return
    uninitialised memory."""
    x, sim = _x("cpu"), _sim("cpu")
    m = lambda *s, **kw: torch.zeros(*s, device="meta", **kw)
    with pytest.raises(ValueError, match="kcenter: lengths is on meta but x is on cpu"):
        tk.kcenter(x, 2, lengths=m(2, dtype=torch.long))
    with pytest.raises(ValueError, match="kcenter: exclude is on meta"):
        tk.kcenter(x, 2, exclude=m(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="kcenter: k is on meta"):
        tk.kcenter(x, m(2, dtype=torch.long), k_max=2)
    with pytest.raises(ValueError, match="kcenter: start is on meta"):
        tk.kcenter(x, 2, start=m(2, dtype=torch.long))
    with pytest.raises(ValueError, match="coverage_select: lengths is on meta but sim is on cpu"):
        tk.coverage_select(sim, 2, lengths=m(2, dtype=torch.long))
    with pytest.raises(ValueError, match="coverage_select: row_lengths is on meta"):
        tk.coverage_select(sim, 2, row_lengths=m(2, dtype=torch.long))
    with pytest.raises(ValueError, match="coverage_select: exclude is on meta"):
        tk.coverage_select(sim, 2, exclude=m(2, 10, dtype=torch.bool))
    # direct op calls: the fake kernel refuses mixed devices too
    with pytest.raises(ValueError, match="lengths is on meta"):
        SELECT(x, 2, None, m(2, dtype=torch.long), None, None, "cosine", False, True, "auto")
    with pytest.raises(ValueError, match="exclude is on meta"):
        COVERAGE(sim, 2, None, None, None, m(2, 10, dtype=torch.bool), True)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_arguments_on_cpu_with_cuda_x():
    x, sim = _x("cuda"), _sim("cuda")
    with pytest.raises(ERR, match="lengths is on cpu"):
        tk.kcenter(x, 2, lengths=torch.tensor([3, 3]))
    with pytest.raises(ERR, match="exclude is on cpu"):
        tk.coverage_select(sim, 2, exclude=torch.zeros(2, 10, dtype=torch.bool))


@pytest.mark.parametrize("name", ["tau_tv", "tau_vv"])
@pytest.mark.parametrize("tau", [0.0, float("nan"), -0.02, float("inf")],
                         ids=["zero", "nan", "negative", "inf"])
def test_mmtok_bad_temperature(name, tau):
    t, v = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=f"mmtok_similarity: {name} must be a finite temperature > 0"):
        tk.mmtok_similarity(t, v, **{name: tau})
    with pytest.raises(TypeError, match=f"mmtok_similarity: {name} must be a float"):
        tk.mmtok_similarity(t, v, **{name: "0.02"})


def test_mmtok_bad_alpha():
    t, v = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="alpha must lie in"):
        tk.mmtok_similarity(t, v, alpha=float("nan"))
    with pytest.raises(TypeError, match="alpha must be a float"):
        tk.mmtok_similarity(t, v, alpha="0.5")
    assert torch.isfinite(tk.mmtok_similarity(t, v, alpha=1, tau_tv=1)).all()


# ------------------------------------------------------------------------------ impl="reference"
def _bad_calls(device):
    x, sim = _x(device), _sim(device)
    neg = sim.clone()
    neg[0, 0, 0] = -1.0
    ex = torch.zeros(2, 10, dtype=torch.bool, device=device)
    ex[0, 4] = True
    return [
        pytest.param(tk.kcenter, (x, 11), {}, id="kcenter-k-exceeds-valid"),
        pytest.param(tk.kcenter, (x, _l([3, -1], device)), {}, id="kcenter-k-item-negative"),
        pytest.param(tk.kcenter, (x, _l([1, 5], device)), dict(k_max=3), id="kcenter-k-item-beyond-k-max"),
        pytest.param(tk.kcenter, (x, _l([1, 2, 3], device)), {}, id="kcenter-k-shape"),
        pytest.param(tk.kcenter, (x, 1), dict(lengths=_l([11, 10], device)), id="kcenter-lengths-value"),
        pytest.param(tk.kcenter, (x, 1), dict(lengths=_l([10, 10, 10], device)), id="kcenter-lengths-shape"),
        pytest.param(tk.kcenter, (x, 1), dict(exclude=torch.zeros(2, 9, dtype=torch.bool, device=device)),
                     id="kcenter-exclude-shape"),
        pytest.param(tk.kcenter, (x, 2), dict(start=4, exclude=ex), id="kcenter-start-excluded"),
        pytest.param(tk.kcenter, (x, 2), dict(start=_l([0, 1, 2], device)), id="kcenter-start-shape"),
        pytest.param(tk.kcenter, (x, 2), dict(metric="dot"), id="kcenter-metric"),
        pytest.param(tk.kcenter, (x.double(), 1), {}, id="kcenter-x-dtype"),
        pytest.param(tk.kcenter, (torch.randn(2, 5, 0, device=device), 1), {}, id="kcenter-x-no-features"),
        pytest.param(tk.coverage_select, (sim, 11), {}, id="coverage-k-exceeds-valid"),
        pytest.param(tk.coverage_select, (sim, _l([-1, 2], device)), {}, id="coverage-k-item-range"),
        pytest.param(tk.coverage_select, (neg, 2), {}, id="coverage-sim-negative"),
        pytest.param(tk.coverage_select, (sim, 2), dict(row_lengths=_l([7, 6], device)),
                     id="coverage-row-lengths-value"),
        pytest.param(tk.coverage_select, (sim, 2), dict(row_lengths=_l([6], device)),
                     id="coverage-row-lengths-shape"),
        pytest.param(tk.coverage_select, (sim, 1), dict(exclude=torch.zeros(2, 6, dtype=torch.bool, device=device)),
                     id="coverage-exclude-shape"),
        pytest.param(tk.coverage_select, ((sim * 10).long(), 1), {}, id="coverage-sim-dtype"),
    ]


@pytest.mark.parametrize("op,args,kw", _bad_calls("cpu"))
def test_reference_rejects_bad_inputs_like_the_kernel(device, op, args, kw):
    """impl="reference" is an implementation of the op: the same bad input raises the same
    exception type with the same message (up to how the offending value is printed)."""
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kw = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
    errors = []
    for impl in ("auto", "reference"):
        with pytest.raises(ERR) as e:
            op(*args, **kw, impl=impl)
        errors.append((type(e.value), str(e.value).split(", got")[0].split(" (")[0]))
    assert errors[0] == errors[1]


# ------------------------------------------------- Python types (issue #16: fuzz known defects)
_X4 = lambda: torch.randn(4, 3, generator=torch.Generator().manual_seed(1))  # noqa: E731
_S4 = lambda: torch.rand(4, 3, generator=torch.Generator().manual_seed(1))   # noqa: E731


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("call,exc,match", [
    pytest.param(lambda i: tk.kcenter(_X4(), 2, check="yes", impl=i), TypeError,
                 "kcenter: check must be a bool, got str", id="kcenter-check-str"),
    pytest.param(lambda i: tk.kcenter(_X4(), 2, sorted=1, impl=i), TypeError,
                 "kcenter: sorted must be a bool, got int", id="kcenter-sorted-int"),
    pytest.param(lambda i: tk.kcenter(_X4(), 2, return_radii="no", impl=i), TypeError,
                 "kcenter: return_radii must be a bool, got str", id="kcenter-return_radii-str"),
    pytest.param(lambda i: tk.kcenter(_X4(), 2**64, impl=i), ValueError,
                 "kcenter: k must fit in int64, got 18446744073709551616", id="kcenter-k-2**64"),
    pytest.param(lambda i: tk.kcenter(_X4(), torch.tensor(2), k_max=2**64, impl=i), ValueError,
                 "kcenter: k_max must fit in int64", id="kcenter-k_max-2**64"),
    pytest.param(lambda i: tk.kcenter(_X4(), 2, k_max="3", impl=i), TypeError,
                 "kcenter: k_max must be an integer", id="kcenter-k_max-str"),
    pytest.param(lambda i: tk.kcenter(_X4(), 2, start=-(2**64), impl=i), ValueError,
                 "kcenter: start must fit in int64", id="kcenter-start-2**64"),
    pytest.param(lambda i: tk.kcenter(_X4(), 2, metric=None, impl=i), TypeError,
                 "kcenter: metric must be a str, got NoneType", id="kcenter-metric-none"),
    pytest.param(lambda i: tk.coverage_select(_S4(), 2, check="yes", impl=i), TypeError,
                 "coverage_select: check must be a bool, got str", id="coverage-check-str"),
    pytest.param(lambda i: tk.coverage_select(_S4(), 2, return_gains=None, impl=i), TypeError,
                 "coverage_select: return_gains must be a bool, got NoneType", id="coverage-return_gains-none"),
    pytest.param(lambda i: tk.coverage_select(_S4(), 2**64, impl=i), ValueError,
                 "coverage_select: k must fit in int64", id="coverage-k-2**64"),
    # per_item: a non-tensor lengths gave torch's "new(): invalid data type 'str'"
    pytest.param(lambda i: tk.kcenter(_X4(), 2, lengths="x", impl=i), TypeError,
                 "kcenter: lengths must be an integer tensor, got str", id="kcenter-lengths-str"),
    pytest.param(lambda i: tk.kcenter(_X4(), 2, lengths=[2**64], impl=i), ValueError,
                 "kcenter: lengths must fit in int64", id="kcenter-lengths-list-2**64"),
    pytest.param(lambda i: tk.coverage_select(_S4(), 2, row_lengths="x", impl=i), TypeError,
                 "coverage_select: row_lengths must be an integer tensor, got str", id="coverage-row_lengths-str"),
    pytest.param(lambda i: tk.coverage_select(_S4(), 2, lengths=True, impl=i), TypeError,
                 "coverage_select: lengths must be an integer tensor, got bool", id="coverage-lengths-bool"),
])
def test_python_types(call, exc, match, impl):
    with pytest.raises(exc, match=match):
        call(impl)


def test_bool_options_accept_numpy_bools():
    np = pytest.importorskip("numpy")
    got = tk.kcenter(_X4(), 2, sorted=np.True_, check=np.False_)
    assert torch.equal(got, tk.kcenter(_X4(), 2, sorted=True))


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: tk.mmtok_similarity(torch.randn(1, 2, 3), torch.randn(1, 2, 3, device="meta")),
                 "mmtok_similarity: vision is on meta but text is on cpu", id="vision-meta"),
    pytest.param(lambda: tk.mmtok_similarity(torch.randn(1, 2, 3, device="meta"), torch.randn(1, 2, 3)),
                 "mmtok_similarity: vision is on cpu but text is on meta", id="text-meta"),
    pytest.param(lambda: tk.mmtok_similarity(torch.randn(1, 2, 3), torch.randn(1, 2, 3),
                                             text_lengths=torch.ones(1, dtype=torch.long, device="meta")),
                 "mmtok_similarity: text_lengths is on meta but text is on cpu", id="text_lengths-meta"),
    pytest.param(lambda: tk.mmtok_similarity(torch.randn(1, 2, 3), torch.randn(1, 2, 3),
                                             vision_lengths=torch.ones(1, dtype=torch.long, device="meta")),
                 "mmtok_similarity: vision_lengths is on meta but text is on cpu", id="vision_lengths-meta"),
])
def test_mmtok_devices(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("name", ["text_lengths", "vision_lengths"])
def test_mmtok_lengths_types(name):
    t, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match=f"mmtok_similarity: {name} must be an integer tensor, got str"):
        tk.mmtok_similarity(t, v, **{name: "x"})
    # a list is made a tensor on text's device, like a tensor of the same values
    assert torch.equal(tk.mmtok_similarity(t, v, **{name: [1, 3]}),
                       tk.mmtok_similarity(t, v, **{name: torch.tensor([1, 3])}))
