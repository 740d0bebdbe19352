"""Recalibration heads (Flax NNX): small modules on top of a frozen model that map its final
hidden state ``h [B, d]`` and logits ``z [B, V]`` to adjusted logits, and their losses.

Heads (each exactly the base model at its identity initialisation):

- :class:`TemperatureHead` — ``z' = z · s(h)``, ``s = exp(w·ĥ + b) > 0``, ``s = 1`` at
  init: reshapes each position's distribution, keeps its order;
- :class:`LowRankHead` — ``z' = z · s(h) + E (U Vᵀ ĥ)`` with ``E [V, d]`` the (frozen)
  output embedding and rank-r ``U, V [d, r]`` (``U = 0`` at init): can reorder tokens;
- :class:`ThresholdHead` — a per-position threshold ``τ(h) = σ(w·ĥ + b)`` in probability
  space, applied softly while training, ``z' = z + g · log σ((log p − log τ) / κ)`` (gate
  ``g = 0`` at init), and as a hard cut when sampling (:meth:`ThresholdHead.truncate`).

Every head reads the final hidden state through ``ĥ = h / rms(h)`` (its direction).

Losses (SPEC §2's decomposition ``KL(r‖p) = −log p(V) + KL(r‖q)``): on task positions
``λ_valid · (−log p(V)) + λ_shape · KL(r‖q)`` with ``r`` the target over the valid tokens and
``q`` the head's distribution restricted to them; on preservation positions
``λ_keep · KL(p_base‖p_head)``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx

from calibjax import errors
from calibjax.core import sharding
from calibjax.models import checkpoint

def _unit(h):
  """``h / rms(h)``: the heads see the direction of the final hidden state, not its scale
  (Gemma's normed states carry the norm weights: entries of tens; a raw ``w·h`` makes
  ``exp(w·h)`` jump at the first steps)."""
  h = h.astype(jnp.float32)
  return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


class TemperatureHead(nnx.Module):
  """``z' = z · exp(w·ĥ + b)``, ``ĥ = h / rms(h)``; exactly the identity at init."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs | None = None):
    del rngs
    self.w = nnx.Param(jnp.zeros((hidden,), jnp.float32))
    self.b = nnx.Param(jnp.zeros((), jnp.float32))

  def scale(self, h):
    return jnp.exp(_unit(h) @ self.w[...] + self.b[...])[..., None]

  def __call__(self, h, z, embed=None):
    return z * self.scale(h)


class LowRankHead(nnx.Module):
  """``z' = z · s(h) + E (U Vᵀ ĥ)``, ``ĥ = h / rms(h)``; ``E``: the model's output embedding
  ``[V, d]`` (passed in, never trained); identity at init (``U = 0``, ``s = 1``)."""

  def __init__(self, hidden: int, rank: int = 8, *, rngs: nnx.Rngs):
    self.temperature = TemperatureHead(hidden)
    self.u = nnx.Param(jnp.zeros((hidden, rank), jnp.float32))
    self.v = nnx.Param(jax.random.normal(rngs.params(), (hidden, rank), jnp.float32)
                       / math.sqrt(hidden))

  def __call__(self, h, z, embed):
    delta = (_unit(h) @ self.v[...]) @ self.u[...].T     # [B, d]
    return self.temperature(h, z) + delta @ jnp.asarray(embed, jnp.float32).T


class ThresholdHead(nnx.Module):
  """A learned per-position probability threshold ``τ(h) = σ(w·ĥ + b)``: soft (temperature
  ``kappa``, gate ``g``) in :meth:`__call__`, hard in :meth:`truncate`; identity at init."""

  def __init__(self, hidden: int, kappa: float = 0.5, init_tau: float = 1e-4, *,
               rngs: nnx.Rngs | None = None):
    del rngs
    self.w = nnx.Param(jnp.zeros((hidden,), jnp.float32))
    self.b = nnx.Param(jnp.asarray(math.log(init_tau / (1 - init_tau)), jnp.float32))
    self.g = nnx.Param(jnp.zeros((), jnp.float32))
    self.kappa = kappa

  def log_tau(self, h):
    return jax.nn.log_sigmoid(_unit(h) @ self.w[...] + self.b[...])[..., None]

  def __call__(self, h, z, embed=None):
    log_p = jax.nn.log_softmax(z, axis=-1)
    soft = self.g[...] * jax.nn.log_sigmoid((log_p - self.log_tau(h)) / self.kappa)
    return jnp.where(jnp.isfinite(z), z + soft, z)  # -inf stays -inf (0 · -inf is NaN)

  def truncate(self, h, z):
    """Hard cut: tokens with ``p < τ(h)`` get ``-inf`` (the most probable token always stays)."""
    log_p = jax.nn.log_softmax(z, axis=-1)
    keep = (log_p >= self.log_tau(h)) | (z == jnp.max(z, axis=-1, keepdims=True))
    return jnp.where(keep, z, -jnp.inf)


HEADS = {"temperature": TemperatureHead, "low_rank": LowRankHead, "threshold": ThresholdHead}


@dataclasses.dataclass(frozen=True)
class LossWeights:
  valid: float = 1.0
  shape: float = 1.0
  keep: float = 1.0


def task_loss(z, valid, target, weights: LossWeights = LossWeights()):
  """Mean over rows of ``λ_valid · (−log p(V)) + λ_shape · KL(r‖q)``.

  ``z [B, V]`` head logits, ``valid`` bool ``[B, V]``, ``target [B, V]`` non-negative weights
  on the valid tokens (normalised here; ``r``). Returns ``(loss, parts)`` with the per-row
  ``neg_log_valid_mass`` and ``kl_target_to_q``.
  """
  log_p = jax.nn.log_softmax(z, axis=-1)
  log_pv = jax.nn.logsumexp(jnp.where(valid, log_p, -jnp.inf), axis=-1)
  log_q = log_p - log_pv[:, None]
  r = jnp.where(valid, target, 0.0)
  r = r / jnp.sum(r, axis=-1, keepdims=True)
  kl = jnp.sum(jnp.where(r > 0, r * (jnp.log(jnp.where(r > 0, r, 1.0)) - log_q), 0.0), -1)
  loss = jnp.mean(weights.valid * -log_pv + weights.shape * kl)
  return loss, {"neg_log_valid_mass": -log_pv, "kl_target_to_q": kl}


def keep_loss(z_head, z_base, weights: LossWeights = LossWeights()):
  """Mean over rows of ``λ_keep · KL(p_base‖p_head)`` (nats per position)."""
  log_base = jax.nn.log_softmax(z_base, axis=-1)
  log_head = jax.nn.log_softmax(z_head, axis=-1)
  kl = jnp.sum(jnp.exp(log_base) * (log_base - log_head), axis=-1)
  return weights.keep * jnp.mean(kl), kl


def create(kind: str, hidden: int, *, rank: int = 8, seed: int = 0) -> nnx.Module:
  """A head of ``kind`` (one of :data:`HEADS`) at its identity initialisation."""
  if kind not in HEADS:
    raise errors.InputError(f"unknown head {kind!r}; heads are {sorted(HEADS)}.")
  if kind == "low_rank":
    return LowRankHead(hidden, rank, rngs=nnx.Rngs(seed))
  return HEADS[kind](hidden)


def bind(head: nnx.Module, embed):
  """The head as a jitted ``(hidden [B, d], logits [B, V]) -> logits`` callable, with the
  model's output embedding ``embed [V, d]`` bound (what the engines take as ``head=``)."""
  graph, state = nnx.split(head)
  state = sharding.replicated(state)  # beside the model's outputs on a mesh in context
  embed = jnp.asarray(embed, jnp.float32)
  apply = jax.jit(lambda st, h, z: nnx.merge(graph, st)(h, z, embed))
  return lambda hidden, logits: apply(state, hidden, logits)


def save(folder: str, head: nnx.Module, kind: str, *, rank: int = 8) -> None:
  """Saves a trained head (weights and how to rebuild it) through the checkpoint module."""
  hidden = next(x.shape[0] for x in jax.tree.leaves(nnx.state(head, nnx.Param)) if x.ndim)
  meta = {"kind": kind, "hidden": int(hidden), "rank": int(rank)}
  checkpoint.save(folder, nnx.state(head, nnx.Param), {"head.json": json.dumps(meta).encode()})


def load(folder: str, lm):
  """A head saved by :func:`save`, bound to ``lm``'s output embedding (see :func:`bind`).

  Raises:
    CheckpointError: missing, partial or corrupt folder, or a head that does not fit ``lm``.
  """
  box = {}

  def abstract(files):
    box["meta"] = meta = json.loads(files["head.json"])
    box["head"] = create(meta["kind"], meta["hidden"], rank=meta["rank"])
    params = nnx.state(box["head"], nnx.Param)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)

  state, _ = checkpoint.load(folder, abstract)
  embed = lm.embedding()
  if embed.shape[1] != box["meta"]["hidden"]:
    raise errors.CheckpointError(f"{folder}: a head for hidden size {box['meta']['hidden']}, "
                                 f"but the model's is {embed.shape[1]}.")
  nnx.update(box["head"], state)
  return bind(box["head"], embed)
