"""``tokenkernels.kv_select``: token-level KV selection and sparse attention (TokenSelect).

The implementation lives in :mod:`tokenkernels._ops.kv_select`; this module is its public name.
"""
from ._ops.kv_select import (SelectionCache, capacity, score, select, sparse_decode,  # noqa: F401
                            sparse_prefill, topk)

__all__ = ["score", "topk", "sparse_decode", "sparse_prefill", "select", "SelectionCache", "capacity"]
