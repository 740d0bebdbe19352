"""A loaded language model: the NNX decoder, its tokenizer and jitted forward functions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calibjax import errors
from calibjax.core.rows import spread
from calibjax.models.decoder import Decoder, DecoderConfig, KVCache


def bucket(n: int, minimum: int = 16) -> int:
  """Static length for ``n`` tokens: the next power of two (≥ ``minimum``)."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def pad_rows(rows) -> tuple[np.ndarray, np.ndarray]:
  """Token rows of different lengths as right-padded ``ids [B, W]`` (int64, 0 padding) and
  the ``mask [B, W]`` of their real tokens (``W``: the longest row)."""
  width = max(map(len, rows))
  ids = np.zeros((len(rows), width), np.int64)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, True
  return ids, mask


def _last_real(mask):
  """Index of each row's last real token (0 for a row with none)."""
  return jnp.maximum(jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), -1), axis=1), 0)


class LanguageModel:
  """``tokenizer``, ``vocab`` (token strings), ``config``, ``chat_template`` (the checkpoint's,
  or None), and:

  - ``logits(ids_bt, mask=None) -> [B, T, V]`` float32 (full forward);
  - ``prefill(ids_bt, mask, max_new_tokens) -> (last logits [B, V], last hidden [B, d],
    cache)``;
  - ``decode(cache, tokens_b) -> (logits [B, V], hidden [B, d], cache)``;
  - ``extend(cache, ids_bt, mask) -> (last logits [B, V], last hidden [B, d])``: B
    continuations of one shared prefix (a batch-1 cache), which is left unchanged;
  - ``repeat(cache, n)``: a batch-1 cache copied into ``n`` rows (one prompt, many samples);
  - ``greedy(ids_bt, mask, new_tokens) -> [B, new_tokens]`` greedy decoding in one call.

  Inputs are padded to power-of-two length buckets, so each bucket compiles once. ``mask``
  marks real tokens (left or right padding both work); without it every token is real.
  """

  def __init__(self, model: Decoder, tokenizer, name: str, chat_template=None):
    self.config: DecoderConfig = model.cfg
    self.tokenizer = tokenizer
    self.chat_template = chat_template  # a calibjax.models.chat.ChatTemplate, or None
    self.vocab = tokenizer.vocab
    self.name = name
    self._graph, self._state = nnx.split(model)
    self.dtype = jax.tree.leaves(self._state)[0].dtype

  @functools.partial(jax.jit, static_argnums=(0, 4, 6), donate_argnames=("cache",))
  def _forward(self, state, ids, mask, size, cache=None, last=False):
    model = nnx.merge(self._graph, state)
    ids, mask = spread((ids, mask))  # data parallel over a mesh's "data" axis, if any
    if cache is None:
      cache = KVCache.empty(self.config, ids.shape[0], size, self.dtype)
    return model(ids, mask, cache, at=_last_real(mask) if last else None)

  @functools.partial(jax.jit, static_argnums=0)
  def _extend(self, state, cache, ids, mask):
    model = nnx.merge(self._graph, state)
    cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (ids.shape[0],) + x.shape[1:])
                         if x.ndim else x, cache)
    ids, mask, cache = spread((ids, mask, cache))
    logits, hidden, _ = model(ids, mask, cache, at=_last_real(mask))
    return logits, hidden

  def _check(self, ids):
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise errors.InputError(f"ids must be int [B, T], got {ids.dtype} of shape {ids.shape}.")
    if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
      raise errors.InputError(f"token ids must lie in [0, {self.config.vocab_size}).")
    return ids

  def _padded(self, ids, mask):
    ids = self._check(ids)
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != ids.shape:
      raise errors.ShapeMismatchError(f"mask {mask.shape} must match ids {ids.shape}.")
    t = bucket(ids.shape[1])
    pad = ((0, 0), (0, t - ids.shape[1]))
    return jnp.asarray(np.pad(ids, pad)), jnp.asarray(np.pad(mask, pad)), t

  def logits(self, ids, mask=None) -> jax.Array:
    """Next-token logits at every position, ``[B, T, V]`` float32."""
    pids, pmask, t = self._padded(ids, mask)
    return self._forward(self._state, pids, pmask, t)[0][:, :np.shape(ids)[1]]

  def prefill(self, ids, mask=None, max_new_tokens: int = 64):
    """Runs the prompt into a fresh cache with room for ``max_new_tokens`` decoding steps
    (rounded up to a bucket) and returns the logits and hidden state at each row's last real
    token."""
    pids, pmask, t = self._padded(ids, mask)
    size = t + bucket(max_new_tokens, minimum=1)
    return self._forward(self._state, pids, pmask, size, None, True)

  def extend(self, cache: KVCache, ids, mask=None):
    """Runs each row of ``ids [B, T]`` (real tokens marked by ``mask``, right-padded) after
    the prefix held by the batch-1 ``cache`` and returns the logits ``[B, V]`` and hidden
    states ``[B, d]`` at each row's last real token. ``cache`` is not modified (the exact
    engine reuses one prompt cache for every node)."""
    if cache.pos.shape[0] != 1:
      raise errors.ShapeMismatchError(f"extend() needs a batch-1 prefix cache, got batch "
                                      f"{cache.pos.shape[0]}.")
    ids = self._check(ids)
    mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != ids.shape:
      raise errors.ShapeMismatchError(f"mask {mask.shape} must match ids {ids.shape}.")
    t = bucket(ids.shape[1], minimum=1)
    room = cache.pos.shape[1] - int(cache.index)
    if t > room:
      raise errors.InputError(f"extend(): {ids.shape[1]} tokens (bucket {t}) do not fit the "
                              f"{room} free cache slots; prefill with a larger max_new_tokens.")
    pad = ((0, 0), (0, t - ids.shape[1]))
    return self._extend(self._state, cache, jnp.asarray(np.pad(ids, pad)),
                        jnp.asarray(np.pad(mask, pad)))

  @functools.partial(jax.jit, static_argnums=(0, 4))
  def _greedy(self, state, logits, cache, steps):
    model = nnx.merge(self._graph, state)
    first = jnp.zeros(logits.shape[:1], jnp.int32)

    def step(carry, _):
      logits, cache = carry
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      ids = token[:, None]
      logits, _, cache = model(ids, jnp.ones_like(ids, bool), cache, at=first)
      return (logits, cache), token

    _, tokens = jax.lax.scan(step, (logits, cache), None, length=steps)
    return tokens.T

  def greedy(self, ids, mask=None, new_tokens: int = 32) -> np.ndarray:
    """Greedy continuation ``[B, new_tokens]`` of each row, the whole decoding loop in one
    compiled call (``lax.scan`` over cached steps: no per-token dispatch or host sync)."""
    logits, _, cache = self.prefill(ids, mask, max_new_tokens=new_tokens)
    return np.asarray(self._greedy(self._state, logits, cache, int(new_tokens)))

  def embedding(self) -> jax.Array:
    """The output projection ``[V, d]`` (logits are ``hidden @ embeddingᵀ``, before any
    soft-capping): the input embedding when tied, else ``lm_head``."""
    return self._state["embed" if self.config.tie_embeddings else "lm_head"][...]

  @staticmethod
  def repeat(cache: KVCache, n: int) -> KVCache:
    """A batch-1 ``cache`` copied into ``n`` rows."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0) if x.ndim else jnp.array(x), cache)

  def decode(self, cache: KVCache, tokens):
    """Appends one token per row; returns its logits ``[B, V]``, hidden ``[B, d]``, cache.

    The cache is updated in place: the ``cache`` passed in is consumed (donated), use the
    one returned."""
    if int(cache.index) >= cache.pos.shape[1]:
      raise errors.InputError(f"the cache is full ({cache.pos.shape[1]} slots); prefill with "
                              "a larger max_new_tokens.")
    ids = jnp.asarray(tokens, jnp.int32)[:, None]
    logits, hidden, cache = self._forward(self._state, ids, jnp.ones_like(ids, bool),
                                          cache.pos.shape[1], cache)
    return logits[:, 0], hidden[:, 0], cache
