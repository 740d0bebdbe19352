"""Measurement of the array core against its references and the one-pass floor.

Ratios, not absolute times, are the result: the machines here are shared and noisy, and every
number in one report comes from the same process on the same inputs. Each timing is the best
of ``repeats`` runs after a compile-and-warm-up call.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from calibjax import numpy_reference, order, shape
from calibjax.rowwise import map_rows


def best_ms(fn: Callable, *args, repeats: int = 5) -> float:
  """Best wall time in ms of ``fn(*args)`` (outputs blocked on) over ``repeats`` runs, after
  one untimed warm-up call."""
  jax.block_until_ready(fn(*args))
  best = np.inf
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best * 1e3


def environment() -> dict:
  """Versions, backend and device of this process, for every report."""
  import flax
  dev = jax.devices()[0]
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
      numpy=np.__version__, backend=jax.default_backend(),
      device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}", device_count=jax.device_count(),
      cpu_count=os.cpu_count(), machine=platform.machine())


def _entropy_pass(z):
  top = jnp.max(z, axis=-1, keepdims=True)
  e = jnp.exp(z - top)
  total = jnp.sum(e, axis=-1)
  return jnp.log(total) + top[..., 0], jnp.log(total) - jnp.sum(e * (z - top), axis=-1) / total


_floor_batched = jax.jit(_entropy_pass)
_floor_rows = jax.jit(lambda z: map_rows(_entropy_pass, z, batch_shape=z.shape[:-1]))


def floor_ms(z: jax.Array, repeats: int = 5) -> dict:
  """The one-pass floor: logsumexp and entropy of every row in one fused jitted pass, both
  as one batched expression and row by row (``lax.map``); ``floor_ms`` is the faster."""
  batched = best_ms(_floor_batched, z, repeats=repeats)
  rows = best_ms(_floor_rows, z, repeats=repeats)
  return dict(floor_ms=min(batched, rows), floor_batched_ms=batched, floor_rows_ms=rows)


@dataclasses.dataclass(frozen=True)
class MetricsBenchmarkConfig:
  """Shapes ``(B, V)`` to time, valid tokens per row, repeats, and the seed of the inputs."""
  shapes: tuple[tuple[int, int], ...] = ((64, 262144), (8, 32000))
  n_valid: int = 50
  n_temperatures: int = 16
  repeats: int = 10
  numpy_repeats: int = 1
  seed: int = 0


# Targets of the foundation issue, on a 2-core CPU at [64, 262144].
TARGETS = {"calibjax_over_floor": ("<=", 8.0), "numpy_ref_over_calibjax": (">=", 5.0),
           "group_masses16_over_floor": ("<=", 24.0)}


def synthetic_inputs(batch: int, vocab: int, n_valid: int, seed: int):
  """Gaussian logits (scale 3) and a mask of ``n_valid`` random valid tokens per row."""
  rng = np.random.default_rng(seed)
  z = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
  m = np.zeros((batch, vocab), bool)
  for b in range(batch):
    m[b, rng.choice(vocab, n_valid, replace=False)] = True
  return z, m


def token_diagnostic(max_valid: int) -> Callable:
  """The timed unit: everything in ``order_stats`` and ``shape_stats`` at T = 1, jitted."""
  return jax.jit(lambda z, m: (order.order_stats(z, m, max_valid=max_valid),
                               shape.shape_stats(z, m)))


def _numpy_diagnostic(z, m):
  return numpy_reference.order_stats(z, m), numpy_reference.shape_stats(z, m)


def run_metrics_benchmark(cfg: MetricsBenchmarkConfig, log: Callable = print) -> dict:
  """Times the token diagnostic, its float64 NumPy reference, ``group_masses`` over
  ``n_temperatures`` temperatures and the floor, per shape; checks agreement with the
  reference; returns the report (see BUILD_NOTES.md for the fields)."""
  report = {"environment": environment(), "config": dataclasses.asdict(cfg), "shapes": {}}
  temps = jnp.asarray(np.geomspace(0.1, 20.0, cfg.n_temperatures), jnp.float32)
  gm = jax.jit(lambda z, m, t: shape.group_masses(z, m, t))
  for batch, vocab in cfg.shapes:
    name = f"{batch}x{vocab}"
    log(f"[{name}] generating inputs")
    z_np, m_np = synthetic_inputs(batch, vocab, cfg.n_valid, cfg.seed)
    z, m = jnp.asarray(z_np), jnp.asarray(m_np)
    row = floor_ms(z, cfg.repeats)
    diag = token_diagnostic(cfg.n_valid)
    log(f"[{name}] timing calibjax")
    row["calibjax_ms"] = best_ms(diag, z, m, repeats=cfg.repeats)
    row["group_masses16_ms"] = best_ms(gm, z, m, temps, repeats=cfg.repeats)
    log(f"[{name}] timing the float64 NumPy reference")
    row["numpy_ref_ms"] = best_ms(_numpy_diagnostic, z_np, m_np, repeats=cfg.numpy_repeats)
    got, want = diag(z, m), _numpy_diagnostic(z_np, m_np)
    row["max_abs_diff_vs_numpy"] = {
        f: float(np.max(np.abs(np.asarray(getattr(g, f), np.float64) - w[f])))
        for g, w in zip(got, want) for f in w}
    row["calibjax_over_floor"] = row["calibjax_ms"] / row["floor_ms"]
    row["numpy_ref_over_calibjax"] = row["numpy_ref_ms"] / row["calibjax_ms"]
    row["group_masses16_over_floor"] = row["group_masses16_ms"] / row["floor_ms"]
    if (batch, vocab) == (64, 262144):
      row["targets_met"] = {
          k: bool(row[k] <= bound if op == "<=" else row[k] >= bound)
          for k, (op, bound) in TARGETS.items()}
    report["shapes"][name] = row
  return report


def format_table(report: dict) -> str:
  """A plain-text table of the report's timings and ratios."""
  cols = ("floor_ms", "calibjax_ms", "numpy_ref_ms", "group_masses16_ms",
          "calibjax_over_floor", "numpy_ref_over_calibjax", "group_masses16_over_floor")
  lines = ["shape".ljust(12) + "".join(c.rjust(27) for c in cols)]
  for name, row in report["shapes"].items():
    lines.append(name.ljust(12) + "".join(f"{row[c]:27.2f}" for c in cols))
  env = report["environment"]
  lines.append(f"backend {env['backend']} ({env['device']}), jax {env['jax']}, "
               f"{env['cpu_count']} CPUs")
  return "\n".join(lines)
