"""The benchmark report (small shapes) and the atomic results writer."""

import json
import os

import numpy as np
import pytest

from calibjax import benchmarking
from calibjax.results import write_json_atomic


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
