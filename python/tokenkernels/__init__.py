"""tokenkernels: hand-written C++/CUDA kernels for token-level hot spots of LLM and VLM work.

Ops are registered as ``torch.ops.tokenkernels.*``; the typed wrappers below are the public API.
``tokenkernels.reference`` holds the pure-PyTorch reference of every op (the test oracle).
"""
import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers torch.ops.tokenkernels)
from . import ops, reference
from .ops.kcenter import coverage_select, kcenter, mmtok_similarity
from .ops.cross_entropy import LinearCrossEntropy, VocabParallel, linear_cross_entropy
from . import variants  # noqa: F401  (which CUDA variants have run on a GPU)
from . import tree  # noqa: F401  (tokenkernels.tree.*: token trees for speculative decoding)
from . import kv_select  # noqa: E402  (kv_select family: tokenkernels.kv_select.*)

__all__ = ["kcenter", "coverage_select", "mmtok_similarity",
           "linear_cross_entropy", "LinearCrossEntropy", "VocabParallel",
           "tree", "kv_select", "ops", "reference", "variants", "cuda_available"]
__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when this build carries CUDA kernels and a GPU is visible."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "tokenkernels::kcenter", "CUDA")
