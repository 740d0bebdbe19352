"""The array core: pure, jittable functions over whole-vocabulary logits ``[..., V]``.

Modules, bottom up: :mod:`~calibjax.core.inputs` (the one entry check),
:mod:`~calibjax.core.rows` (row maps and meshes), :mod:`~calibjax.core.pytree` (result
types), :mod:`~calibjax.core.double_float`, :mod:`~calibjax.core.selection` (sort-free
radix selection), :mod:`~calibjax.core.dispatch` (XLA or Pallas, one table),
:mod:`~calibjax.core.ranks`, :mod:`~calibjax.core.order` (SPEC §1),
:mod:`~calibjax.core.shape` (§2), :mod:`~calibjax.core.calibration` (§3),
:mod:`~calibjax.core.rules` and :mod:`~calibjax.core.truncation` (§4),
:mod:`~calibjax.core.oracle` (§5), :mod:`~calibjax.core.sampling` (§7: one token per row,
tail-faithful), :mod:`~calibjax.core.sharding` (vocabulary-split
statistics and parameter placement). ``import calibjax`` exports their public API.
"""
