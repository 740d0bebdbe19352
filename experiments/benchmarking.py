"""Measurement of the array core against its references and the one-pass floor.

Ratios, not absolute times, are the result: the machines here are shared and noisy, and every
number in one report comes from the same process on the same inputs. Each timing is the best
of ``repeats`` runs after a compile-and-warm-up call.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import shutil
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import calibjax_kernels as kernels
from calibjax.core import dispatch, order, selection, shape
from calibjax.core.rows import map_rows
from calibjax.core.rules import REGISTRY
from calibjax.models.language_model import pad_rows
from calibjax.testing import references as numpy_reference


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


# One value and a 32-value sweep per rule, spanning its useful range (Rule.example, .dense)
RULE_VALUES = {name: (r.example, np.asarray(r.dense)) for name, r in REGISTRY.items()
               if not r.oracle}
PEER_HOW = "bash experiments/peers/setup_peer_env.sh  (creates .venv-peer: torch + transformers)"


@dataclasses.dataclass(frozen=True)
class TruncationBenchmarkConfig:
  """Shapes, repeats, seed, and the peer environment's Python (None: skip the peer)."""
  shapes: tuple[tuple[int, int], ...] = ((64, 262144), (8, 32000))
  repeats: int = 5
  numpy_repeats: int = 1
  seed: int = 0
  peer_python: str | None = ".venv-peer/bin/python"


def run_peer(script: str, args: list[str], peer_python: str | None, log: Callable) -> dict:
  """Runs ``experiments/peers/<script> <args...> OUT.json`` in the peer environment and
  returns ``{"available": True, **OUT}``, or ``{"available": False, "how": ...}`` when the
  environment is missing or the run fails (with its error)."""
  import json
  import subprocess
  import tempfile
  if not peer_python or not os.path.exists(peer_python):
    log(f"peer environment {peer_python} not found; to create it: {PEER_HOW}")
    return {"available": False, "how": PEER_HOW}
  path = os.path.join(os.path.dirname(__file__), "peers", script)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "peer.json")
    proc = subprocess.run([peer_python, path, *args, out], capture_output=True, text=True,
                          timeout=3600, check=False)
    if proc.returncode != 0:
      log(f"peer failed: {proc.stderr[-2000:]}")
      return {"available": False, "error": proc.stderr[-2000:], "how": PEER_HOW}
    with open(out) as f:
      return {"available": True, **json.load(f)}


def _peer_warper_times(z: np.ndarray, peer_python: str | None, log: Callable) -> dict:
  """Times the PyTorch warpers on ``z`` (saved to a temporary file for the peer)."""
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    inputs = os.path.join(tmp, "inputs.npz")
    np.savez(inputs, logits=z)
    return run_peer("torch_warpers.py", ["time", inputs], peer_python, log)


def run_truncation_benchmark(cfg: TruncationBenchmarkConfig, log: Callable = print) -> dict:
  """Per shape and rule: one value (with and without keep masks), a 32-value sweep, the
  float64 NumPy reference, agreement with it, the PyTorch warpers (peer) and the floor."""
  from calibjax.core import truncation
  report = {"environment": environment(), "config": dataclasses.asdict(cfg), "shapes": {}}
  for batch, vocab in cfg.shapes:
    name = f"{batch}x{vocab}"
    z_np, _ = synthetic_inputs(batch, vocab, 1, cfg.seed)
    z = jnp.asarray(z_np)
    row = {**floor_ms(z, cfg.repeats), "rules": {}}
    for rule, (value, values) in RULE_VALUES.items():
      log(f"[{name}] {rule}")
      one = jax.jit(lambda z, v, r=rule: truncation.truncate(z, r, v))
      bare = jax.jit(lambda z, v, r=rule: truncation.truncate(z, r, v, return_keep=False))
      swept = jax.jit(lambda z, v, r=rule: truncation.truncate(
          z, r, truncation.Sweep(tuple(v)), return_keep=False), static_argnums=1)
      r = {"value": value, "sweep_values": [float(v) for v in values]}
      r["calibjax_ms"] = best_ms(one, z, value, repeats=cfg.repeats)
      r["calibjax_nokeep_ms"] = best_ms(bare, z, value, repeats=cfg.repeats)
      r["calibjax_sweep32_ms"] = best_ms(swept, z, tuple(float(v) for v in values),
                                         repeats=cfg.repeats)
      r["numpy_ref_ms"] = best_ms(numpy_reference.truncate, z_np, rule, value,
                                  repeats=cfg.numpy_repeats)
      want = numpy_reference.truncate(z_np, rule, value)
      # the value as a Python float (float64, as the reference takes it): a traced value is
      # float32, whose 0.9 differs from 0.9 by 1.5e-8 (docs/semantics.md)
      exact = truncation.truncate(z, rule, value).keep
      r["tokens_differing_from_numpy"] = int(np.sum(np.asarray(exact) != want))
      r["calibjax_over_floor"] = r["calibjax_ms"] / row["floor_ms"]
      r["sweep32_over_one"] = r["calibjax_sweep32_ms"] / r["calibjax_nokeep_ms"]
      r["numpy_ref_over_calibjax"] = r["numpy_ref_ms"] / r["calibjax_ms"]
      row["rules"][rule] = r
    log(f"[{name}] PyTorch warpers (peer environment)")
    peer = _peer_warper_times(z_np, cfg.peer_python, log)
    row["peer"] = {k: v for k, v in peer.items() if k != "ms"}
    for rule, ms in peer.get("ms", {}).items():
      row["rules"][rule]["peer_ms"] = ms
      row["rules"][rule]["peer_over_calibjax"] = ms / row["rules"][rule]["calibjax_ms"]
    if (batch, vocab) == (64, 262144):
      rules = row["rules"]
      row["targets_met"] = {
          "top_p_peer_over_calibjax>=5": (rules["top_p"].get("peer_over_calibjax", 0) >= 5
                                          if peer.get("available") else None),
          "top_p_sweep32_over_one<=4": rules["top_p"]["sweep32_over_one"] <= 4,
          "every_rule_over_floor<=40": all(r["calibjax_over_floor"] <= 40
                                           for r in rules.values())}
    report["shapes"][name] = row
  return report


def format_truncation_table(report: dict) -> str:
  """A plain-text table per shape: one row per rule."""
  cols = ("calibjax_ms", "calibjax_sweep32_ms", "numpy_ref_ms", "peer_ms",
          "calibjax_over_floor", "sweep32_over_one", "peer_over_calibjax")
  lines = []
  for name, row in report["shapes"].items():
    lines.append(f"{name}  (floor {row['floor_ms']:.2f} ms)")
    lines.append("rule".ljust(12) + "".join(c.rjust(21) for c in cols))
    for rule, r in row["rules"].items():
      cells = "".join((f"{r[c]:21.2f}" if c in r else "-".rjust(21)) for c in cols)
      lines.append(rule.ljust(12) + cells)
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ModelBenchmarkConfig:
  """A model (name, GGUF file or Hugging Face folder), prefill ``batch × prompt_len``,
  ``new_tokens`` greedy steps."""
  model: str = "gemma3-270m"
  batch: int = 8
  prompt_len: int = 128
  new_tokens: int = 32
  repeats: int = 3
  peer_python: str | None = ".venv-peer/bin/python"


_LOAD_MEMORY = """
import json, resource, sys, time
from calibjax import models
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
lm = models.load(sys.argv[1], cache_dir=sys.argv[2], dtype=sys.argv[3], progress=False)
print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "s": time.perf_counter() - start}))
"""


def _disk_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
             if f.endswith((".safetensors", ".gguf")))


def load_memory(model: str, dtype: str) -> dict:
  """Peak host memory (``ru_maxrss``) of a cold and then a warm :func:`calibjax.models.load`,
  each in a fresh process, less the process's peak before loading; and as ratios to the
  checkpoint's size on disk (its weight files)."""
  import subprocess
  import sys
  import tempfile
  from calibjax import models
  path = models.resolve(model)
  disk = _disk_bytes(path)
  out = {"disk_mb": disk / 2**20, "dtype": dtype}
  with tempfile.TemporaryDirectory() as cache:
    for kind in ("cold", "warm"):
      run = subprocess.run([sys.executable, "-c", _LOAD_MEMORY, path, cache, dtype],
                           capture_output=True, text=True, check=True)
      r = json.loads(run.stdout.strip().splitlines()[-1])
      added = (r["peak_kb"] - r["base_kb"]) * 1024
      out[f"{kind}_load_s"] = r["s"]
      out[f"{kind}_peak_added_mb"] = added / 2**20
      out[f"{kind}_peak_added_over_disk"] = added / disk
  return out


def run_model_benchmark(cfg: ModelBenchmarkConfig, log: Callable = print) -> dict:
  """Cold and warm load, prefill and greedy-decode throughput, against the PyTorch peer;
  the load's peak host memory."""
  import tempfile
  from calibjax import models
  report = {"environment": environment(), "config": dataclasses.asdict(cfg)}
  log("peak host memory of loading (fresh processes)")
  report["load_memory"] = load_memory(cfg.model, "bfloat16" if os.path.isdir(
      models.resolve(cfg.model)) else "float32")
  with tempfile.TemporaryDirectory() as cache:
    log("cold load (checkpoint -> first logits)")
    start = time.perf_counter()
    lm = models.load(cfg.model, cache_dir=cache, progress=False)
    ids = np.random.default_rng(0).integers(10, min(20000, lm.config.vocab_size),
                                            (cfg.batch, cfg.prompt_len))
    jax.block_until_ready(lm.logits(ids[:1, :8]))
    report["cold_load_s"] = time.perf_counter() - start
    log("warm load (cache -> first logits)")
    start = time.perf_counter()
    lm = models.load(cfg.model, cache_dir=cache, progress=False)
    jax.block_until_ready(lm.logits(ids[:1, :8]))
    report["warm_load_s"] = time.perf_counter() - start
  report["warm_over_cold"] = report["warm_load_s"] / report["cold_load_s"]
  log("prefill and decode")
  prefill_s = best_ms(lambda x: lm.prefill(x, max_new_tokens=cfg.new_tokens), ids,
                      repeats=cfg.repeats) / 1e3
  total_s = best_ms(lambda x: lm.greedy(x, new_tokens=cfg.new_tokens), ids,
                    repeats=cfg.repeats) / 1e3
  report["prefill_tokens_per_s"] = cfg.batch * cfg.prompt_len / prefill_s
  report["decode_tokens_per_s"] = cfg.batch * cfg.new_tokens / max(total_s - prefill_s, 1e-9)
  log("PyTorch reference (peer environment)")
  peer = run_peer("torch_model.py", ["time", models.resolve(cfg.model)], cfg.peer_python,
                  log)
  report["peer"] = peer
  if peer["available"]:
    for k in ("prefill", "decode"):
      report[f"{k}_calibjax_over_peer"] = (report[f"{k}_tokens_per_s"] /
                                          peer[f"{k}_tokens_per_s"])
  report["targets_met"] = {
      "decode_calibjax_over_peer>=1": report.get("decode_calibjax_over_peer", 0) >= 1.0
      if report["peer"]["available"] else None,
      "prefill_calibjax_over_peer>=0.8": report.get("prefill_calibjax_over_peer", 0) >= 0.8
      if report["peer"]["available"] else None,
      "warm_over_cold<=1/3": report["warm_over_cold"] <= 1 / 3}
  return report


@dataclasses.dataclass(frozen=True)
class SequenceBenchmarkConfig:
  """Exact enumeration for :func:`sequence_samplers` against Monte Carlo for one sampler."""
  model: str = "gemma3-270m"
  task: str = "us_states"
  bound: float = 1e-3
  batch_size: int = 32
  mc_samples: int = 1000
  mc_sampler: str = "top_p=0.9"
  mc_max_new_tokens: int = 16
  seed: int = 0


def sequence_samplers() -> list[str]:
  """64 samplers at T = 1: the 8 benchmark values (``Rule.sequence``) of each of the 7 rules
  and of ``oracle_rank``'s τ."""
  return [f"{name}={v:g}" for name, r in REGISTRY.items() for v in r.sequence]


RANDOM = "random:"


def load_benchmark_model(name: str):
  """``name`` through :func:`calibjax.models.load`, or ``random:<folder>``: the shapes of a
  model with random weights, from the folder's ``config.json`` (a ``DecoderConfig``) and
  ``tokenizer.json`` (a SentencePiece tokenizer's fields), as ``experiments/device/prepare.py``
  writes them for the packaged Gemma 3 (whose 250 MB file cannot travel to a device
  machine). The model says which it is in ``benchmark_note``."""
  from calibjax import models
  if not name.startswith(RANDOM):
    lm = models.load(name, progress=False)
    lm.benchmark_note = name
    return lm
  from flax import nnx
  folder = name[len(RANDOM):]
  with open(os.path.join(folder, "config.json")) as f:
    cfg = models.DecoderConfig.from_dict(json.load(f))
  with open(os.path.join(folder, "tokenizer.json")) as f:
    tokenizer = models.SentencePieceTokenizer(**json.load(f))
  model = models.Decoder(cfg, nnx.Rngs(0))
  # random weights give logits of std ~25: one token takes all the mass. The final norm is
  # scaled so that they have std 3, about a trained model's
  v = cfg.vocab_size
  probe = jax.numpy.asarray([[tokenizer.bos_id, v // 4, v // 2, 3 * v // 4]])
  z = models.LanguageModel(model, tokenizer, name).logits(probe)[0, -1]
  factor = 3.0 / float(jnp.std(z))
  w = model.final_norm.weight
  w.set_value((1.0 + w.get_value()) * factor - 1.0 if cfg.norm_plus_one else
              w.get_value() * factor)
  lm = models.LanguageModel(model, tokenizer, name)
  lm.benchmark_note = (f"random weights of the shapes in {folder} ({cfg.family}, "
                       f"{cfg.layers} layers, vocabulary {cfg.vocab_size}), logits scaled to "
                       "std 3; the exact engine expands a fixed 448 nodes (bound 0)")
  return lm


class _Stages:
  """Wall time of the exact engine's stages, each call waited for (the engine waits for each
  batch anyway): ``model`` (the model at a batch of nodes, ``branch`` or ``extend``: forward
  and vocabulary projection), ``sampler_probs`` (every sampler's probabilities of the valid
  tokens), ``validity_index`` (the task's index over the vocabulary); the rest is host
  bookkeeping. Also records each model call's inputs, to replay them as the floor, and each
  batch's nodes (``nodes``: how many were evaluated, spare rows excluded; ``paths``: their
  rows as :meth:`LanguageModel.extend` would run them whole)."""

  def __init__(self, lm):
    from calibjax.sequence import probabilities, tree
    self.seconds, self.calls, self.paths, self.nodes = {}, [], [], 0
    self._undo = []
    for name in ("extend", "branch"):
      self._wrap(lm, name, "model", record=True)
    self._wrap(probabilities.ValidTokenProbs, "__call__", "sampler_probs")
    self._wrap(tree, "ValidityIndex", "validity_index")
    forward = tree.NodeEvaluator.forward

    def counted(evaluator, nodes):
      self.nodes += len(nodes)
      rows = [(evaluator.last,) + node.path for node in nodes]
      self.paths.append(rows + rows[:1] * (evaluator.batch_size - len(rows)))
      return forward(evaluator, nodes)
    tree.NodeEvaluator.forward = counted
    self._undo.append(lambda: setattr(tree.NodeEvaluator, "forward", forward))

  def _wrap(self, owner, name, stage, record=False):
    original = getattr(owner, name)
    self.seconds.setdefault(stage, 0.0)

    def timed(*args, **kwargs):
      if record:
        self.calls.append((name, args[1:]))
      start = time.perf_counter()
      out = jax.block_until_ready(original(*args, **kwargs))
      self.seconds[stage] += time.perf_counter() - start
      return out
    setattr(owner, name, timed)
    self._undo.append(lambda: setattr(owner, name, original))

  def close(self):
    for undo in self._undo[::-1]:
      undo()


def _best_of_two(run) -> float:
  best = math.inf
  for _ in range(2):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  return best


def _forward_floors_s(lm, stages, cache) -> tuple[float, float]:
  """The model alone on the exact engine's node batches, best of two: its own calls replayed
  (``branch`` on the tree cache, or ``extend``), and ``extend`` on each node's whole path
  (the engine before the tree cache)."""
  def replay():
    for name, args in stages.calls:
      jax.block_until_ready(getattr(lm, name)(cache, *args))

  def whole_paths():
    for rows in stages.paths:
      jax.block_until_ready(lm.extend(cache, *pad_rows(rows)))
  return _best_of_two(replay), _best_of_two(whole_paths)


def _decode_floor(lm, prompt_ids, rows: int, steps: int) -> float:
  """Greedy decoding's tokens per second at ``rows`` rows (the prefill subtracted): what
  Monte Carlo's batch would decode without a sampler."""
  ids = np.repeat(np.asarray([prompt_ids]), rows, axis=0)
  lm.greedy(ids, None, steps)  # compile
  jax.block_until_ready(lm.prefill(ids, None, steps))
  start = time.perf_counter()
  lm.greedy(ids, None, steps)
  total = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(lm.prefill(ids, None, steps))
  prefill = time.perf_counter() - start
  return rows * steps / max(total - prefill, 1e-9)


SEQUENCE_TARGETS = {"exact_over_forward_floor": (">=", 0.5), "mc_over_decode_floor": (">=", 0.5),
                    "mc1000_one_sampler_over_exact_64_samplers": (">=", 1.0)}


def run_sequence_benchmark(cfg: SequenceBenchmarkConfig, log: Callable = print) -> dict:
  """Exact enumeration for 64 samplers and ``mc_samples`` Monte Carlo answers of one sampler
  on ``cfg.model`` (loaded beforehand), each against its floor: the exact engine's nodes per
  second (the best of its third and fourth runs, compiled and not instrumented; the first is
  ``exact_cold_s``) over the model's alone on the same node batches (the engine's own calls
  replayed; ``extend`` on whole paths too), Monte Carlo's sampled tokens per second
  (compilation included) over greedy decoding at the same batch size (compiled); the exact
  engine's time by stage (its second run, each stage waited for: ``exact_staged_s``,
  :class:`_Stages`); and ``mc1000_one_sampler_over_exact_64_samplers``, both runs cold."""
  from calibjax import sequence, tasks
  from calibjax.models import prompts
  lm = load_benchmark_model(cfg.model)
  task = tasks.load(cfg.task)
  samplers = sequence_samplers()
  log(f"exact enumeration, {len(samplers)} samplers")
  random = cfg.model.startswith(RANDOM)  # a fixed workload: the tree's masses are not real
  index_cache = tempfile.mkdtemp(prefix="calibjax-validity-")  # as the binaries keep it

  def run_exact(stages=None):
    start = time.perf_counter()
    try:
      res = sequence.exact(lm, task, samplers, bound=0.0 if random else cfg.bound,
                           batch_size=cfg.batch_size, max_nodes=448 if random else 50_000,
                           cache_dir=index_cache)
    finally:
      if stages is not None:
        stages.close()
    return res, time.perf_counter() - start
  _, cold_s = run_exact()  # compilation included
  log("exact enumeration again, compiled, each stage waited for and timed")
  stages = _Stages(lm)
  _, staged_s = run_exact(stages)
  log("exact enumeration twice more, compiled (the best of the two, as for the floor)")
  (res, exact_s), (_, again_s) = run_exact(), run_exact()
  exact_s = min(exact_s, again_s)
  log(f"forward floor: {len(stages.calls)} model calls replayed")
  prompt = prompts.resolve(lm, task, None)
  _, _, cache = lm.prefill(np.asarray([list(prompt.ids)[:-1]]), max_new_tokens=25)
  floor_s, whole_paths_s = _forward_floors_s(lm, stages, cache)
  log(f"Monte Carlo, {cfg.mc_samples} samples of {cfg.mc_sampler}")
  # every batch draws a token per sample at each step and decodes between steps: the tokens
  # drawn are the samples plus the rows of every decoding call
  drawn = [cfg.mc_samples]
  decode = lm.decode

  def counted(cache, tokens):
    drawn[0] += len(tokens)
    return decode(cache, tokens)
  lm.decode = counted
  start = time.perf_counter()
  try:
    mc = sequence.sample(lm, task, cfg.mc_sampler, cfg.mc_samples, jax.random.key(cfg.seed),
                         max_new_tokens=cfg.mc_max_new_tokens)
  finally:
    del lm.decode
  mc_s = time.perf_counter() - start
  shutil.rmtree(index_cache, ignore_errors=True)
  log("decode floor: greedy decoding at Monte Carlo's batch")
  decode_tokens_per_s = _decode_floor(lm, list(prompt.ids), min(cfg.mc_samples, 256),
                                      cfg.mc_max_new_tokens)
  mc_exact = res.samplers[samplers.index(cfg.mc_sampler)] if cfg.mc_sampler in samplers else None
  breakdown = dict(stages.seconds)
  breakdown["host"] = staged_s - sum(breakdown.values())
  report = {
      "environment": environment(), "config": dataclasses.asdict(cfg),
      "model_used": getattr(lm, "benchmark_note", cfg.model),
      "exact_cold_s": cold_s, "exact_s": exact_s, "exact_staged_s": staged_s,
      "nodes_expanded": res.nodes_expanded,
      "bound_reached": res.bound_reached,
      "max_unexplored_mass": max(r.unexplored_mass for r in res.samplers),
      "exact_stages_s": breakdown,
      "nodes_evaluated": stages.nodes, "exact_nodes_per_s": stages.nodes / exact_s,
      "forward_floor_nodes_per_s": stages.nodes / floor_s,
      "whole_paths_floor_nodes_per_s": stages.nodes / whole_paths_s,
      "mc_s": mc_s, "mc_tokens_drawn": drawn[0], "mc_tokens_per_s": drawn[0] / mc_s,
      "decode_floor_tokens_per_s": decode_tokens_per_s,
      "mc_seq_validity": mc.seq_validity, "mc_seq_validity_ci": mc.seq_validity_ci,
      "exact_seq_validity_of_mc_sampler": None if mc_exact is None else mc_exact.seq_validity,
      "seq_validity": {r.sampler: r.seq_validity for r in res.samplers},
      "coverage100": {r.sampler: r.coverage.get(100) for r in res.samplers}}
  report["exact_over_forward_floor"] = (report["exact_nodes_per_s"]
                                        / report["forward_floor_nodes_per_s"])
  report["mc_over_decode_floor"] = report["mc_tokens_per_s"] / decode_tokens_per_s
  report["mc1000_one_sampler_over_exact_64_samplers"] = mc_s / cold_s  # both compile
  report["targets_met"] = {f"{k}{op}{v:g}": (report[k] >= v) for k, (op, v) in
                           SEQUENCE_TARGETS.items()}
  return report


@dataclasses.dataclass(frozen=True)
class KernelBenchmarkConfig:
  """The kernels' input shape and dtypes, valid tokens per row, thresholds and valid-logit
  slots per row, repeats, the rows checked against the references, and the seed."""
  shape: tuple[int, int] = (256, 262144)
  dtypes: tuple[str, ...] = ("float32", "bfloat16")
  n_valid: int = 50
  thresholds: int = 32
  slots: int = 64
  repeats: int = 10
  parity_rows: int = 8
  seed: int = 0


# Targets of the kernels issue, on an accelerator at [256, 262144].
KERNEL_TARGETS = {"row_stats.read_fraction": (">=", 0.5),
                  "threshold_stats.xla_over_kernel": (">=", 3.0)}


def _kernel_inputs(cfg: KernelBenchmarkConfig, dtype: str) -> dict:
  """Logits, mask and every kernel's per-row arguments: temperature 0.8, thresholds spread
  over each row's top 20 nats of scaled logit, the valid logits as slots (+inf padded)."""
  z_np, m_np = synthetic_inputs(*cfg.shape, cfg.n_valid, cfg.seed)
  z = jnp.asarray(z_np, dtype)
  zf = np.asarray(z.astype(jnp.float32))
  t = np.full(cfg.shape[0], 0.8, np.float32)
  top = zf.max(axis=1)
  total = np.exp((zf - top[:, None]) / t[:, None]).sum(axis=1, dtype=np.float32)
  a_top = top / t
  zero = np.zeros_like(t)
  slots = np.sort(np.where(m_np, zf, np.inf), axis=1)[:, :cfg.slots]
  return dict(z=z, m=jnp.asarray(m_np), t=jnp.asarray(t),
              consts6=jnp.asarray(np.stack([t, top / t, total, zero, zero, zero], axis=1)),
              thresholds=jnp.asarray(a_top[:, None] - np.linspace(0, 20, cfg.thresholds)[None]),
              slots=jnp.asarray(slots), consts3=jnp.asarray(np.stack([t, top, total], axis=1)))


@jax.jit
def _threshold_stats_xla(z, m, consts, thresholds):
  """What the array core's XLA path computes for the same quantities (``score="logit"``):
  :func:`calibjax.core.selection.threshold_stats` row by row."""
  def row(zr, mr, c, th):
    a = zr.astype(jnp.float32) / c[0]
    p = jnp.exp(a - c[1]) / c[2]
    alive = a > -jnp.inf
    pv = jnp.where(mr & alive, p, 0.0)
    return selection.threshold_stats(a - c[3] - c[4], alive, th, (
        jnp.ones_like(p), p, mr.astype(jnp.float32), pv,
        jnp.where(pv > 0, pv * jnp.log(pv), 0.0)))
  return map_rows(row, z, m, consts, thresholds, batch_shape=z.shape[:1])


def _parity(got, want) -> dict:
  """Largest difference per field (integer fields: the number of differing entries)."""
  out = {}
  for name, g, w in zip(got._fields, got, want):
    if g is None:
      continue
    g, w = np.asarray(g), np.asarray(w)
    if np.issubdtype(g.dtype, np.integer):
      out[f"{name}_differing"] = int(np.sum(g != w))
    else:
      both = np.isfinite(g) & np.isfinite(w)
      out[f"{name}_max_abs_diff"] = float(np.max(np.abs(g - w)[both], initial=0.0))
      out[f"{name}_nonfinite_differing"] = int(np.sum(np.isfinite(g) != np.isfinite(w)))
  return out


def run_kernel_benchmark(cfg: KernelBenchmarkConfig, log: Callable = print) -> dict:
  """Times each kernel (the backend's variant, compiled), the XLA path computing the same
  numbers, and reading the input once (its bytes at the copy bandwidth measured in the same
  process); checks the kernels against their references on ``parity_rows`` rows. On CPU the
  kernels only run interpreted: parity is checked, kernel times are not taken."""
  backend = jax.default_backend()
  variant = dispatch.VARIANT.get(backend)
  timed = variant is not None and backend != "cpu"
  report = {"environment": environment(), "config": dataclasses.asdict(cfg), "variant": variant,
            "kernels_timed": timed, "dtypes": {}}
  if not timed:
    report["note"] = (f"no compiled kernel variant on {backend}: parity checked in interpret "
                      "mode, kernel times not taken (interpret mode is not performance)")
  kernel = lambda op: jax.jit(functools.partial(op, variant=variant or "grid",
                                                interpret=not timed))
  for dtype in cfg.dtypes:
    log(f"[{dtype}] generating inputs {cfg.shape}")
    x = _kernel_inputs(cfg, dtype)
    z_bytes, m_bytes = x["z"].nbytes, x["m"].nbytes
    copy_ms = best_ms(jax.jit(lambda v: v * 2), x["z"], repeats=cfg.repeats)
    bandwidth = 2 * z_bytes / (copy_ms * 1e-3)  # bytes/s: one read and one write
    row = {"z_bytes": z_bytes, "copy_ms": copy_ms, "copy_bandwidth_gb_s": bandwidth / 1e9,
           "ops": {}}
    ops = {
        "row_stats": (kernels.row_stats, kernels.row_stats_reference,
                      lambda z, m, t: shape.row_stats_flat(z, m, t, "xla"),
                      (x["z"], x["m"], x["t"]), z_bytes + m_bytes),
        "threshold_stats": (kernels.threshold_stats, kernels.threshold_stats_reference,
                            _threshold_stats_xla,
                            (x["z"], x["m"], x["consts6"], x["thresholds"]), z_bytes + m_bytes),
        "valid_rank_counts": (kernels.valid_rank_counts, kernels.valid_rank_counts_reference,
                              None, (x["z"], x["slots"], x["consts3"]), z_bytes),
    }
    for name, (op, reference, xla, args, read_bytes) in ops.items():
      log(f"[{dtype}] {name}")
      r = {"read_once_ms": read_bytes / bandwidth * 1e3}
      head = tuple(a[:cfg.parity_rows] for a in args)
      r["parity_vs_reference"] = _parity(kernel(op)(*head), reference(*head))
      if xla is not None:
        r["xla_ms"] = best_ms(jax.jit(xla), *args, repeats=cfg.repeats)
      if timed:
        r["kernel_ms"] = best_ms(kernel(op), *args, repeats=cfg.repeats)
        r["read_fraction"] = r["read_once_ms"] / r["kernel_ms"]
        if xla is not None:
          r["xla_over_kernel"] = r["xla_ms"] / r["kernel_ms"]
      row["ops"][name] = r
    if timed and cfg.shape == (256, 262144):
      row["targets_met"] = {}
      for key, (op_name, bound) in KERNEL_TARGETS.items():
        name, field = key.split(".")
        value = row["ops"][name][field]
        row["targets_met"][key] = bool(value >= bound if op_name == ">=" else value <= bound)
    report["dtypes"][dtype] = row
  return report


def format_kernel_table(report: dict) -> str:
  """A plain-text table: per dtype and kernel, times (ms) and ratios."""
  cols = ("read_once_ms", "kernel_ms", "xla_ms", "read_fraction", "xla_over_kernel")
  lines = ["dtype".ljust(10) + "kernel".ljust(20) + "".join(c.rjust(17) for c in cols)]
  for dtype, row in report["dtypes"].items():
    for name, r in row["ops"].items():
      cells = "".join((f"{r[c]:17.3f}" if c in r else "-".rjust(17)) for c in cols)
      lines.append(dtype.ljust(10) + name.ljust(20) + cells)
    lines.append(f"{dtype}: copy bandwidth {row['copy_bandwidth_gb_s']:.1f} GB/s")
  if "note" in report:
    lines.append(report["note"])
  env = report["environment"]
  lines.append(f"backend {env['backend']} ({env['device']}), variant {report['variant']}")
  return "\n".join(lines)
