"""A loaded language model: the NNX decoder, its tokenizer and jitted forward functions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calibjax import errors
from calibjax.core.rows import spread
from calibjax.models.decoder import LINEAR, Decoder, DecoderConfig, KVCache


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
  - ``branch(cache, path_kv, path_pos, tokens_b) -> (logits [B, V], hidden [B, d], the
    token's keys and values [B, L, 2, KV, hd])``: one token per row after the shared prefix
    and the row's own cached path (a tree of continuations; attention-only models);
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

  @functools.partial(jax.jit, static_argnums=0)
  def _branch(self, state, cache, path_kv, path_pos, tokens):
    model = nnx.merge(self._graph, state)
    b = tokens.shape[0]
    zero = jnp.zeros((), cache.index.dtype)
    rows = lambda x: jnp.broadcast_to(x, (b,) + x.shape[1:])
    write = lambda x, new: jax.lax.dynamic_update_slice(  # the paths after the prefix
        rows(x), new.astype(x.dtype), (zero, cache.index) + (zero,) * (x.ndim - 2))
    layers = tuple(tuple(write(x, path_kv[:, :, l, j]) for j, x in enumerate(kv))
                   for l, kv in enumerate(cache.layers))
    pos = write(cache.pos, path_pos)
    cache = KVCache(layers=layers, pos=pos, index=cache.index + path_pos.shape[1])
    ids = tokens[:, None]
    ids, cache = spread((ids, cache))
    logits, hidden, new = model(ids, jnp.ones_like(ids, bool), cache,
                                at=jnp.zeros(b, jnp.int32))
    own = jnp.stack([jnp.stack([k[:, cache.index], v[:, cache.index]], axis=1)
                     for k, v in new.layers], axis=1)
    return logits, hidden, own

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

  def branch(self, cache: KVCache, path_kv, path_pos, tokens):
    """One token per row after the prefix held by the batch-1 ``cache`` and the row's own
    path, whose keys and values (as returned by earlier calls) come in ``path_kv [B, P, L, 2,
    KV, hd]`` at positions ``path_pos [B, P]`` (−1: padding, anywhere in the row). Returns the
    logits ``[B, V]``, hidden states ``[B, d]`` and the token's own keys and values ``[B, L,
    2, KV, hd]``, so a tree of continuations runs one token per node: each node's path is
    computed once, not again for each of its descendants (:func:`extend` runs the whole
    path). ``cache`` is not modified. Attention-only models: a Gated DeltaNet layer's state
    is not a per-token cache."""
    if LINEAR in self.config.layer_types:
      raise errors.InputError("branch() needs an attention-only model; this one has Gated "
                              "DeltaNet layers (use extend()).")
    if cache.pos.shape[0] != 1:
      raise errors.ShapeMismatchError(f"branch() needs a batch-1 prefix cache, got batch "
                                      f"{cache.pos.shape[0]}.")
    tokens = self._check(np.asarray(tokens)[:, None])[:, 0]
    path_pos = np.asarray(path_pos, np.int32)
    want = (len(tokens), path_pos.shape[1], self.config.layers, 2, self.config.kv_heads,
            self.config.head_dim)
    if np.shape(path_kv) != want or path_pos.shape != want[:2]:
      raise errors.ShapeMismatchError(f"branch(): path_kv {np.shape(path_kv)} and path_pos "
                                      f"{path_pos.shape} must be {want} and {want[:2]}.")
    room = cache.pos.shape[1] - int(cache.index)
    if path_pos.shape[1] + 1 > room:
      raise errors.InputError(f"branch(): a path of {path_pos.shape[1]} slots and its token "
                              f"do not fit the {room} free cache slots; prefill with a larger "
                              "max_new_tokens.")
    return self._branch(self._state, cache, jnp.asarray(path_kv), jnp.asarray(path_pos),
                        jnp.asarray(tokens, jnp.int32))

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
