"""Bad-input fuzz of the public API (issue #16, item 0).

Every example is a call of a public op with at most one argument replaced by a bad value
(tests/fuzz/cases.py). It must raise ValueError / TypeError / IndexError / RuntimeError whose
message starts with ``tokenkernels.`` and names an argument, or return what the pure-PyTorch
reference returns (tests/fuzz/_reference.py; tolerances from tokenkernels.testing; no
non-finite output where the reference is finite; with NaN / Inf put into the data only the
shapes are compared, since propagating them is right) -- never crash or hang: each test's examples
run in a forked child with a per-call timeout (tests/fuzz/_harness.py).

Every violation fails (the defects the first campaigns found are fixed, each with a regression
test in tests/<family>/test_bad_inputs*.py).
TOKENKERNELS_FUZZ_EXAMPLES=N sets the examples per test (default: a short run);
TOKENKERNELS_FUZZ_COLLECT=FILE appends every violation to FILE and goes on (a campaign that
lists every defect instead of stopping at the first of each test).
"""
import pytest
import torch
from hypothesis import event, given, settings

from ._harness import COLLECT, collect, examples, isolated, note, outcome, per_call_timeout
from .cases import STRATEGIES


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)
    elif hasattr(out, "__dataclass_fields__"):
        for name in out.__dataclass_fields__:
            yield from _tensors(getattr(out, name))


def check_call(call, device):
    try:
        _check_call(call, device)
    except AssertionError as e:
        if not COLLECT:
            raise
        collect(f"{call.op} [{call.mutated}: {call.how}]: {str(e).splitlines()[0][-400:]}")


def _check_call(call, device):
    what = repr(call)
    note(what)
    with per_call_timeout():
        ok, out = outcome(call.run, call.arg_names(), what)
    if not ok:
        event(f"{call.op}: error")
        return
    inputs = list(_tensors(list(call.args.values())))
    if any(t.device.type == "meta" for t in inputs) and not all(t.device.type == "meta" for t in inputs):
        for t in _tensors(out):
            assert t.device.type != "meta", f"{what}: a meta argument among {device} tensors gave a " \
                                            f"shape-only result instead of an error"
    if call.ref is None:
        return
    try:
        with per_call_timeout():
            expect = call.run_ref()
    except Exception as e:  # noqa: BLE001 -- the reference does not validate everything
        event(f"{call.op}: reference raised {type(e).__name__}")
        return
    call.compare(call, out, expect)
    event(f"{call.op}: compared")


@pytest.mark.parametrize("family", sorted(STRATEGIES))
def test_public_api(family, device):
    @settings(max_examples=examples(30), database=None)
    @given(STRATEGIES[family](device))
    def fuzz(call):
        check_call(call, device)

    isolated(fuzz, device=device)
