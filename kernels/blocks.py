"""Block shapes and specs shared by the kernels: a grid over (row blocks, vocabulary blocks).

Every kernel reads ``[B, V]`` arrays in ``(block_rows, block_vocab)`` tiles and accumulates
per-row results over the vocabulary axis (the last grid axis, visited in order), so outputs
keep the same block for every vocabulary step. Block shapes are multiples of (8, 128) — 32 rows
by default, the native tile of bfloat16 (16) and int8 (32) as well as float32 (8) on TPU — or
the whole dimension when the array is smaller. The vocabulary tail of the last block is masked
by column index (:func:`in_bounds`), never read as data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

ROWS = 32


def block_rows(batch: int, rows: int = ROWS) -> int:
  """Rows per block: ``rows`` (a multiple of 8), or the whole batch when it is smaller."""
  if rows % 8:
    raise ValueError(f"block_rows must be a multiple of 8, got {rows}.")
  return batch if batch <= rows else rows


def block_vocab(vocab: int, block: int) -> int:
  """Vocabulary tokens per block: ``block`` (a multiple of 128) or the whole row if smaller."""
  if block % 128:
    raise ValueError(f"block_vocab must be a multiple of 128, got {block}.")
  return vocab if vocab <= block else block


def grid(batch: int, vocab: int, bb: int, bv: int) -> tuple[int, int]:
  return pl.cdiv(batch, bb), pl.cdiv(vocab, bv)


def tile_spec(bb: int, bv: int) -> pl.BlockSpec:
  """A ``[B, V]`` input read tile by tile."""
  return pl.BlockSpec((bb, bv), lambda i, j: (i, j))


def row_spec(bb: int, width: int) -> pl.BlockSpec:
  """A ``[B, width]`` per-row array (parameters or results), one block per row block."""
  return pl.BlockSpec((bb, width), lambda i, j: (i, 0))


def in_bounds(shape: tuple[int, int], vocab: int, bv: int) -> jax.Array:
  """Bool ``shape`` tile: True where the column lies inside the vocabulary (ragged tail)."""
  col = pl.program_id(1) * bv + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return col < vocab


def first_step() -> jax.Array:
  """True on the first vocabulary block of a row block: initialise the accumulators."""
  return pl.program_id(1) == 0


def as_int8(mask: jax.Array) -> jax.Array:
  """Bool masks travel as int8 (1 byte a token; bool refs are not portable across backends)."""
  return mask.astype(jnp.int8)
