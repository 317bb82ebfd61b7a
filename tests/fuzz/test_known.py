"""Every defect tests/fuzz/known.py tolerates still exists: a fixed one fails here, so its entry
(which would otherwise hide a regression) gets deleted."""
import pytest

from . import known
from ._harness import check_error, isolated, per_call_timeout


def _still_broken(k):
    try:
        with per_call_timeout():
            k.reproduce()
    except AssertionError as e:          # the reproducer's own "shape-only result" verdict
        assert k.matches(" ".join(k.ops), None, str(e), "meta"), str(e)
        return
    except BaseException as e:  # noqa: BLE001
        try:
            check_error(e, ["x", "k", "sim", "check", "lengths", "parents", "n_sink", "max_depth", "scale",
                            "vision", "text_lengths"], k.name)
        except AssertionError:
            assert k.matches(" ".join(k.ops), None, str(e), "meta"), f"{k.name}: another message now: {e}"
            return
        raise AssertionError(f"{k.name} is fixed ({e}): delete its entry in tests/fuzz/known.py")
    raise AssertionError(f"{k.name} is fixed (no error): delete its entry in tests/fuzz/known.py")


@pytest.mark.parametrize("k", known.KNOWN, ids=lambda k: k.name)
def test_known_defect_still_reproduces(k):
    isolated(lambda: _still_broken(k))
