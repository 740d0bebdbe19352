r"""Benchmark of calibjax's whole-vocabulary metrics and samplers against references, peers
and the one-pass floor.

Command (from the repository root, in the environment of README.md):

  python -m experiments.benchmark --out=results/benchmark

Expected runtime: about 10 minutes on a 2-core CPU.
Expected output: tables of times (ms) and ratios, and two files:
- ``metrics.json`` (section ``metrics``): per shape ``floor_ms``, ``calibjax_ms`` (order_stats
  + shape_stats), ``numpy_ref_ms``, ``group_masses16_ms``, the ratios
  ``calibjax_over_floor``, ``numpy_ref_over_calibjax``, ``group_masses16_over_floor``, the
  largest difference from the reference per metric, targets met at [64, 262144];
- ``truncation.json`` (section ``truncation``): per shape and rule ``calibjax_ms`` (one
  value), ``calibjax_sweep32_ms``, ``numpy_ref_ms``, ``peer_ms`` and ``peer_over_calibjax``
  (PyTorch warpers in ``.venv-peer``; when it is absent the report says how to create it),
  ``calibjax_over_floor``, ``sweep32_over_one``, targets met at [64, 262144];
- ``model.json`` (section ``model``, on ``--model``: the packaged Gemma 3, a GGUF file or a
  Hugging Face folder of any family): cold load (checkpoint → first logits) and warm load
  (cache → first logits) seconds, prefill of 8 × 128 tokens and greedy decoding of 32 tokens
  for a batch of 8 in tokens/s, and the same for the PyTorch reference in `transformers`
  (``calibjax_over_peer``); ``load_memory``: the peak host memory a cold and a warm load
  add, in fresh processes, and its ratio to the weight files' size (a folder loaded in
  bfloat16);
- ``sequence.json`` (section ``sequence``): US states on ``--model``, exact
  enumeration for 64 samplers (7 rules and oracle_rank × 8 values, T = 1; wall time cold,
  compiled with each stage timed (model, sampler probabilities, validity index, host), and
  compiled as users run it; nodes, bound reached) against 1,000 Monte Carlo answers of one sampler:
  ``exact_over_forward_floor`` (nodes/s over the model's alone on the same node batches:
  the engine's own ``branch``/``extend`` calls replayed; ``whole_paths_floor_nodes_per_s``:
  ``extend`` on each node's whole path, as before the tree cache),
  ``mc_over_decode_floor`` (sampled tokens/s over greedy decoding at the same batch),
  ``mc1000_one_sampler_over_exact_64_samplers``. ``--model=random:<folder>`` (what
  ``experiments/device/prepare.py`` writes): the packaged model's shapes with random weights,
  for a device machine, where the 250 MB file cannot travel;
- ``calibjax_kernels.json`` (section ``kernels``, not run by default; for an accelerator:
  ``python -m experiments.benchmark --sections=kernels``): per dtype (float32, bfloat16) at
  ``--kernel_shape`` (256 × 262,144) the copy bandwidth and, per kernel, ``read_once_ms``
  (bytes read / that bandwidth), ``kernel_ms`` (the backend's variant, compiled),
  ``xla_ms`` (the array core's XLA path for the same numbers), ``read_fraction``,
  ``xla_over_kernel``, the differences from the kernel's reference on 8 rows, targets met
  (row statistics ≥ 0.5 of the read bandwidth, 32-threshold statistics ≥ 3× the XLA path).
  On CPU the kernels only run interpreted: parity is checked, kernel times are not taken.
All record versions, backend and device.
"""

import os

from absl import app, flags, logging

from calibjax.results import write_json_atomic
from . import benchmarking

_OUT = flags.DEFINE_string("out", "results/benchmark", "Output folder.")
_SHAPES = flags.DEFINE_list("shapes", ["64x262144", "8x32000"], "Shapes BxV to time.")
_N_VALID = flags.DEFINE_integer("n_valid", 50, "Valid tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per measurement (best is kept).")
_NUMPY_REPEATS = flags.DEFINE_integer("numpy_repeats", 1, "Timed runs of the NumPy reference.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic inputs.")
_SECTIONS = flags.DEFINE_multi_enum(
    "sections", ["metrics", "truncation", "model", "sequence"],
    ["metrics", "truncation", "model", "sequence", "kernels"],
    "Sections to run (kernels: on an accelerator, --sections=kernels).")
_KERNEL_SHAPE = flags.DEFINE_string("kernel_shape", "256x262144", "Shape BxV of the kernels section.")
_MODEL = flags.DEFINE_string("model", "gemma3-270m", "Model of the model and sequence sections: "
                             "a name, .gguf file or Hugging Face folder.")
_PEER_PYTHON = flags.DEFINE_string("peer_python", ".venv-peer/bin/python",
                                   "Python of the PyTorch peer environment ('' to skip).")


def _parse_shape(text: str) -> tuple[int, int]:
  try:
    b, v = text.lower().split("x")
    return int(b), int(v)
  except ValueError:
    raise app.UsageError(f"--shapes entries look like 64x262144, got {text!r}") from None


def _write(name: str, report: dict, text: str) -> None:
  path = write_json_atomic(os.path.join(_OUT.value, name), report)
  print(text)
  print(f"wrote {path}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
  shapes = tuple(_parse_shape(s) for s in _SHAPES.value)
  peer = _PEER_PYTHON.value or None
  if "metrics" in _SECTIONS.value:
    report = benchmarking.run_metrics_benchmark(benchmarking.MetricsBenchmarkConfig(
        shapes=shapes, n_valid=_N_VALID.value, repeats=_REPEATS.value,
        numpy_repeats=_NUMPY_REPEATS.value, seed=_SEED.value))
    _write("metrics.json", report, benchmarking.format_table(report))
  if "truncation" in _SECTIONS.value:
    report = benchmarking.run_truncation_benchmark(benchmarking.TruncationBenchmarkConfig(
        shapes=shapes, repeats=_REPEATS.value, numpy_repeats=_NUMPY_REPEATS.value,
        seed=_SEED.value, peer_python=peer))
    _write("truncation.json", report, benchmarking.format_truncation_table(report))
  if "model" in _SECTIONS.value:
    report = benchmarking.run_model_benchmark(benchmarking.ModelBenchmarkConfig(
        model=_MODEL.value, peer_python=peer))
    keys = ("cold_load_s", "warm_load_s", "prefill_tokens_per_s", "decode_tokens_per_s",
            "prefill_calibjax_over_peer", "decode_calibjax_over_peer")
    memory = {f"load_memory.{k}": v for k, v in report["load_memory"].items()
              if isinstance(v, float)}
    _write("model.json", report,
           "\n".join(f"{k:36s} {v:.2f}" for k, v in
                     [(k, report[k]) for k in keys if k in report] + list(memory.items())))
  if "sequence" in _SECTIONS.value:
    report = benchmarking.run_sequence_benchmark(benchmarking.SequenceBenchmarkConfig(
        model=_MODEL.value, seed=_SEED.value))
    keys = ("exact_cold_s", "exact_staged_s", "exact_s", "nodes_expanded", "nodes_evaluated",
            "exact_nodes_per_s", "forward_floor_nodes_per_s", "whole_paths_floor_nodes_per_s",
            "exact_over_forward_floor", "mc_s", "mc_tokens_per_s",
            "decode_floor_tokens_per_s", "mc_over_decode_floor",
            "mc1000_one_sampler_over_exact_64_samplers")
    _write("sequence.json", report, "\n".join(f"{k:42s} {report[k]:.2f}" for k in keys))
  if "kernels" in _SECTIONS.value:
    report = benchmarking.run_kernel_benchmark(benchmarking.KernelBenchmarkConfig(
        shape=_parse_shape(_KERNEL_SHAPE.value), repeats=_REPEATS.value, seed=_SEED.value))
    _write("kernels.json", report, benchmarking.format_kernel_table(report))


def cli():
  """``calibjax-benchmark``: the installed command of ``python -m experiments.benchmark``."""
  app.run(main)


if __name__ == "__main__":
  cli()
