"""The implementation modules of the public API (private: import the ops from ``tokenkernels``,
``tokenkernels.tree`` and ``tokenkernels.kv_select``). One module per family: typed,
documented wrappers around ``torch.ops.tokenkernels`` and their fake (meta) kernels."""
