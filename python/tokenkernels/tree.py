"""``tokenkernels.tree``: token trees for speculative decoding (the public API).

See :mod:`tokenkernels._ops.tree` for the documentation of every function."""
from ._ops.tree import (DynamicTreeDrafter, Tree, attention, build, from_paths,  # noqa: F401
                       select_frontier, select_tree, verify_greedy, verify_sampling)

__all__ = ["Tree", "build", "from_paths", "attention", "verify_greedy", "verify_sampling",
           "select_frontier", "select_tree", "DynamicTreeDrafter"]
