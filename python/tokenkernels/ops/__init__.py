"""Typed, documented wrappers around ``torch.ops.tokenkernels`` (one module per family)."""
from . import kcenter  # noqa: F401
from . import cross_entropy  # noqa: F401
from . import kv_select  # noqa: F401
