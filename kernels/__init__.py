"""Pallas kernels for the whole-vocabulary hot paths (optional; the library works without).

None is implemented yet. Their references are the sort-free XLA row functions of the array
core: ``calibjax.ranks`` (valid-rank counting) and ``calibjax.shape`` (fused row statistics).
"""
