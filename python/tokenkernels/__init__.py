"""tokenkernels: hand-written C++/CUDA kernels for token-level hot spots of LLM and VLM work.

Ops are registered as ``torch.ops.tokenkernels.<family>_<op>``; the typed wrappers are the
public API, each under one name:

* ``tokenkernels.kcenter``, ``coverage_select``, ``mmtok_similarity`` (visual-token selection);
* ``tokenkernels.linear_cross_entropy``, ``LinearCrossEntropy``, ``VocabParallel``;
* ``tokenkernels.tree.*`` (speculative-decoding token trees);
* ``tokenkernels.kv_select.*`` (TokenSelect).

``tokenkernels.reference`` holds the pure-PyTorch reference of every op (the test oracle, also
reachable as ``impl="reference"``); ``tokenkernels.variants`` which CUDA variants have run on a
GPU; ``tokenkernels.testing`` the tolerance table and test data the test suite shares. The
implementation modules live in the private ``tokenkernels._ops``.
"""
import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers torch.ops.tokenkernels)
from . import reference, variants  # noqa: F401
from ._ops.kcenter import coverage_select, kcenter, mmtok_similarity
from ._ops.cross_entropy import LinearCrossEntropy, VocabParallel, linear_cross_entropy
from . import tree  # noqa: F401  (tokenkernels.tree.*: token trees for speculative decoding)
from . import kv_select  # noqa: F401  (tokenkernels.kv_select.*: TokenSelect)

__all__ = ["kcenter", "coverage_select", "mmtok_similarity",
           "linear_cross_entropy", "LinearCrossEntropy", "VocabParallel",
           "tree", "kv_select", "reference", "variants", "cuda_available"]
__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when this build carries the CUDA kernels of every op and a GPU is visible."""
    if not torch.cuda.is_available():
        return False
    return bool(op_names()) and all(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
                                    for n in op_names())


def op_names() -> list:
    """The qualified names (``"tokenkernels::tree_build"``, ...) of every registered public op.
    Ops whose name starts with an underscore (``tokenkernels::_...``) are the CUDA kernels' host
    planners and emulators, exposed on the CPU for the tests only: not part of the API."""
    return sorted({s.name for s in torch._C._jit_get_all_schemas()
                   if s.name.startswith("tokenkernels::") and not s.name.startswith("tokenkernels::_")})
