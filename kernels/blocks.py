"""The one driver of every kernel: per-row accumulators streamed over vocabulary blocks.

An op is a pure ``step(acc, tiles, rows, inside) -> acc``: ``tiles`` are ``(rows, columns)``
tiles of its ``[B, V]`` inputs (logits, an int8 mask), ``rows`` its per-row parameters
(``[rows, width]`` each), ``inside`` marks the columns inside the vocabulary (the ragged tail
is never read as data), and ``acc`` its per-row accumulators. :func:`stream` runs it in one of
two variants, with the very same ``step``:

- ``"grid"`` (TPU; the interpreter on CPU): a ``(row blocks, vocabulary blocks)`` grid whose
  last axis is visited in order; the accumulators live in the output blocks, initialised under
  ``pl.when`` on the first vocabulary block. Blocks are multiples of (8, 128) — 32 rows by
  default, the native tile of bfloat16 (16) and int8 (32) as well as float32 (8) on TPU — or
  the whole dimension when the array is smaller. Refused on a GPU, where it would race.
- ``"loop"`` (GPU, lowered through Triton): a grid over row blocks only, as a GPU grid runs
  its programs in any order; each program loops over the vocabulary blocks with
  ``lax.fori_loop``, its accumulators carried in registers, and reads its tiles with masked
  loads. Block shapes, and the widths of parameters and results (padded here), are powers of 2.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

ROWS = {"grid": 32, "loop": 1}
VARIANTS = tuple(ROWS)


def rows_per_block(batch: int, rows: int | None, variant: str) -> int:
  """Rows per block. ``"grid"``: a multiple of 8, or the whole batch when it is smaller;
  ``"loop"``: a power of 2."""
  rows = ROWS[variant] if rows is None else rows
  if variant == "loop":
    if rows < 1 or rows & (rows - 1):
      raise ValueError(f"block_rows must be a power of 2 for the loop variant, got {rows}.")
    return rows
  if rows % 8:
    raise ValueError(f"block_rows must be a multiple of 8, got {rows}.")
  return batch if batch <= rows else rows


def vocab_per_block(vocab: int, block: int, variant: str) -> int:
  """Vocabulary tokens per block. ``"grid"``: a multiple of 128, or the whole row if smaller;
  ``"loop"``: a power of 2, at most the row rounded up to one."""
  if variant == "loop":
    if block < 1 or block & (block - 1):
      raise ValueError(f"block_vocab must be a power of 2 for the loop variant, got {block}.")
    return min(block, _pow2(vocab))
  if block % 128:
    raise ValueError(f"block_vocab must be a multiple of 128, got {block}.")
  return vocab if vocab <= block else block


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def as_int8(mask: jax.Array) -> jax.Array:
  """Bool masks travel as int8 (1 byte a token; bool refs are not portable across backends)."""
  return mask.astype(jnp.int8)


Step = Callable[[tuple, tuple, tuple, jax.Array], tuple]


def stream(step: Step, tiles: Sequence[jax.Array], rows: Sequence[jax.Array],
           outs: Sequence[tuple[int, jnp.dtype, float]], *, variant: str,
           block_rows: int | None, block_vocab: int, interpret: bool) -> list[jax.Array]:
  """Runs ``step`` over ``tiles`` (``[B, V]`` each) with per-row ``rows`` (``[B, w]`` each);
  ``outs``: ``(width, dtype, initial value)`` of each accumulator. Returns them ``[B, width]``."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
  if variant == "grid" and not interpret and jax.default_backend() == "gpu":
    raise ValueError("the grid variant races on GPU (its vocabulary blocks would run in any "
                     "order); use variant='loop'.")
  batch, vocab = tiles[0].shape
  bb = rows_per_block(batch, block_rows, variant)
  bv = vocab_per_block(vocab, block_vocab, variant)
  run = _grid if variant == "grid" else _loop
  return run(step, list(tiles), list(rows), list(outs), batch, vocab, bb, bv, interpret)


def _grid(step, tiles, rows, outs, batch, vocab, bb, bv, interpret):
  from jax.experimental import pallas as pl  # Pallas loads when a kernel is built
  nt, nr = len(tiles), len(rows)

  def kernel(*refs):
    tile_refs, row_refs, acc_refs = refs[:nt], refs[nt:nt + nr], refs[nt + nr:]

    @pl.when(pl.program_id(1) == 0)
    def _init():
      for r, (_, _, init) in zip(acc_refs, outs):
        r[...] = jnp.full(r.shape, init, r.dtype)

    col = pl.program_id(1) * bv + jax.lax.broadcasted_iota(jnp.int32, (bb, bv), 1)
    new = step(tuple(r[...] for r in acc_refs), tuple(r[...] for r in tile_refs),
               tuple(r[...] for r in row_refs), col < vocab)
    for r, v in zip(acc_refs, new):
      r[...] = v

  row_spec = lambda w: pl.BlockSpec((bb, w), lambda i, j: (i, 0))
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(batch, bb), pl.cdiv(vocab, bv)),
      in_specs=[pl.BlockSpec((bb, bv), lambda i, j: (i, j))] * nt
      + [row_spec(r.shape[1]) for r in rows],
      out_specs=[row_spec(w) for w, _, _ in outs],
      out_shape=[jax.ShapeDtypeStruct((batch, w), d) for w, d, _ in outs],
      interpret=interpret)(*tiles, *rows)


def _loop(step, tiles, rows, outs, batch, vocab, bb, bv, interpret):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
  nt, nr = len(tiles), len(rows)
  widths = [r.shape[1] for r in rows]
  rows = [jnp.pad(r, ((0, 0), (0, _pow2(w) - w))) for r, w in zip(rows, widths)]
  padded = [(_pow2(w), d, init) for w, d, init in outs]

  def kernel(*refs):
    tile_refs, row_refs, out_refs = refs[:nt], refs[nt:nt + nr], refs[nt + nr:]
    i = pl.program_id(0)
    live = (i * bb + jnp.arange(bb)) < batch
    here = pl.ds(i * bb, bb)
    row_vals = tuple(plgpu.load(r.at[here, pl.ds(0, r.shape[1])], mask=live[:, None], other=0)
                     for r in row_refs)

    def body(j, acc):
      inside = jnp.broadcast_to(((j * bv + jnp.arange(bv)) < vocab)[None, :], (bb, bv))
      block = tuple(plgpu.load(r.at[here, pl.ds(j * bv, bv)], mask=live[:, None] & inside,
                               other=0) for r in tile_refs)
      return tuple(step(acc, block, row_vals, inside))

    init = tuple(jnp.full((bb, w), v, d) for w, d, v in padded)
    acc = jax.lax.fori_loop(0, pl.cdiv(vocab, bv), body, init)
    for r, v in zip(out_refs, acc):
      plgpu.store(r.at[here, pl.ds(0, r.shape[1])], v, mask=live[:, None])

  anywhere = pl.BlockSpec(memory_space=pl.ANY)
  res = pl.pallas_call(
      kernel, grid=(pl.cdiv(batch, bb),), in_specs=[anywhere] * (nt + nr),
      out_specs=[anywhere] * len(outs),
      out_shape=[jax.ShapeDtypeStruct((batch, w), d) for w, d, _ in padded],
      interpret=interpret)(*tiles, *rows)
  return [r[:, :w] for r, (w, _, _) in zip(res, outs)]
