"""Result types of the array core: frozen dataclasses that are JAX pytrees (every field a
leaf or ``None``), so they pass through ``jit``, ``vmap`` and ``jax.tree.map``."""

from __future__ import annotations

import dataclasses

import jax


def dataclass(cls):
  """``cls`` as a frozen dataclass registered as a pytree, with ``replace(**fields)``."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)
  return jax.tree_util.register_dataclass(cls)
