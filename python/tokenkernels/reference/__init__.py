"""Pure-PyTorch reference implementations: readable, the test oracle, and a fallback."""
from . import kcenter  # noqa: F401
from . import cross_entropy  # noqa: F401
from . import kv_select  # noqa: F401
