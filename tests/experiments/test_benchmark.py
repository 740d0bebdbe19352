"""The benchmark report (small shapes) and the atomic results writer."""

import json
import os

import numpy as np
import pytest

from calibjax.results import write_json_atomic
from experiments import benchmarking


def test_metrics_report_fields_and_agreement():
  cfg = benchmarking.MetricsBenchmarkConfig(shapes=((3, 700),), n_valid=5, repeats=1)
  report = benchmarking.run_metrics_benchmark(cfg, log=lambda *_: None)
  row = report["shapes"]["3x700"]
  for key in ("floor_ms", "calibjax_ms", "numpy_ref_ms", "calibjax_over_floor",
              "numpy_ref_over_calibjax", "group_masses16_over_floor"):
    assert row[key] > 0, key
  assert row["calibjax_over_floor"] == pytest.approx(row["calibjax_ms"] / row["floor_ms"])
  # the timed calibjax numbers are the reference's numbers
  assert max(row["max_abs_diff_vs_numpy"].values()) < 1e-4
  assert set(row["max_abs_diff_vs_numpy"]) >= {"auroc", "valid_entropy", "kl_target_to_p"}
  assert report["environment"]["backend"] == "cpu"


def test_write_json_atomic(tmp_path):
  path = tmp_path / "sub" / "r.json"
  write_json_atomic(str(path), {"b": np.float32(np.nan), "a": np.arange(2), "c": -np.inf})
  assert json.loads(path.read_text()) == {"a": [0, 1], "b": "nan", "c": "-inf"}
  with pytest.raises(TypeError):
    write_json_atomic(str(path), {"x": object()})
  assert json.loads(path.read_text())["a"] == [0, 1]      # the old file survives a failure
  assert os.listdir(tmp_path / "sub") == ["r.json"]        # and no temp file is left behind


@pytest.mark.slow  # the benchmark harness only: 7 rules x 3 compiled variants
def test_truncation_report_without_peer():
  cfg = benchmarking.TruncationBenchmarkConfig(shapes=((2, 600),), repeats=1, peer_python=None)
  report = benchmarking.run_truncation_benchmark(cfg, log=lambda *_: None)
  row = report["shapes"]["2x600"]
  assert set(row["rules"]) == set(benchmarking.RULE_VALUES)
  for rule, r in row["rules"].items():
    assert r["tokens_differing_from_numpy"] == 0, rule
    assert r["sweep32_over_one"] == pytest.approx(
        r["calibjax_sweep32_ms"] / r["calibjax_nokeep_ms"])
    assert len(r["sweep_values"]) == 32 and "peer_ms" not in r
  assert row["peer"] == {"available": False, "how": benchmarking.PEER_HOW}


def test_kernel_report_on_cpu_checks_parity_and_takes_no_kernel_times():
  cfg = benchmarking.KernelBenchmarkConfig(shape=(6, 1500), dtypes=("float32", "bfloat16"),
                                           n_valid=7, thresholds=5, slots=8, repeats=1,
                                           parity_rows=4)
  report = benchmarking.run_kernel_benchmark(cfg, log=lambda *_: None)
  assert report["kernels_timed"] is False and report["variant"] == "grid"
  assert "interpret mode is not performance" in report["note"]
  for dtype, row in report["dtypes"].items():
    assert row["copy_bandwidth_gb_s"] > 0
    assert set(row["ops"]) == {"row_stats", "threshold_stats", "valid_rank_counts"}
    for name, r in row["ops"].items():
      assert "kernel_ms" not in r and "read_fraction" not in r, name
      parity = r["parity_vs_reference"]
      assert all(v == 0 for k, v in parity.items() if k.endswith("differing")), (dtype, name)
      assert max(v for k, v in parity.items() if k.endswith("max_abs_diff")) < 1e-5
    assert row["ops"]["row_stats"]["xla_ms"] > 0 and "xla_ms" not in row["ops"][
        "valid_rank_counts"]
  assert "row_stats" in benchmarking.format_kernel_table(report)


def test_kernel_report_xla_path_computes_the_kernels_numbers():
  """The timed XLA path of threshold statistics gives the reference's numbers."""
  import calibjax_kernels as kernels
  x = benchmarking._kernel_inputs(benchmarking.KernelBenchmarkConfig(
      shape=(5, 900), dtypes=("float32",), n_valid=6, thresholds=7), "float32")
  xla = benchmarking._threshold_stats_xla(x["z"], x["m"], x["consts6"], x["thresholds"])
  ref = kernels.threshold_stats_reference(x["z"], x["m"], x["consts6"], x["thresholds"])
  counts = np.asarray(ref.count)
  assert counts.min() < counts.max()  # the thresholds cut inside the rows
  for got, want in zip(xla, ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float32), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow  # the benchmark harness only: the exact engine twice and Monte Carlo
def test_sequence_report_on_a_random_model_of_given_shapes(tmp_path):
  """``--model=random:<folder>`` (the tiny model's shapes): the bound-0 workload, the stages
  adding up to the run, the floors, and Monte Carlo's token count (one draw per sample
  per step: between n and n · max_new_tokens)."""
  from calibjax.testing import tiny
  (tmp_path / "config.json").write_text(json.dumps(tiny.CONFIG.to_dict()))
  (tmp_path / "tokenizer.json").write_text(json.dumps(tiny.tokenizer().fields()))
  cfg = benchmarking.SequenceBenchmarkConfig(model=f"random:{tmp_path}", task="weekdays",
                                             mc_samples=64, mc_max_new_tokens=6)
  report = benchmarking.run_sequence_benchmark(cfg, log=lambda *_: None)
  # the whole weekdays tree of the tiny vocabulary (245 nodes) is under the 448-node cap
  assert report["nodes_expanded"] == 245 and "random weights" in report["model_used"]
  stages = report["exact_stages_s"]
  assert set(stages) == {"model", "sampler_probs", "validity_index", "host"}
  # every node the engine evaluated: the tree's and the canonical paths' prefixes it had not
  assert report["nodes_evaluated"] >= 245
  assert min(stages.values()) >= 0 and sum(stages.values()) == pytest.approx(report["exact_staged_s"])
  assert report["exact_over_forward_floor"] == pytest.approx(
      report["exact_nodes_per_s"] / report["forward_floor_nodes_per_s"])
  assert 64 <= report["mc_tokens_drawn"] <= 64 * 6
  assert report["mc_over_decode_floor"] == pytest.approx(
      report["mc_tokens_per_s"] / report["decode_floor_tokens_per_s"])
  assert set(report["targets_met"]) == {f"{k}{op}{v:g}" for k, (op, v) in
                                        benchmarking.SEQUENCE_TARGETS.items()}
