r"""PyTorch peer: the reference `generate()` warpers of `transformers`, run on saved inputs.

Runs in its own environment (`experiments/peers/setup_peer_env.sh` creates `.venv-peer`:
Python 3.11, torch 2.13.0 CPU, transformers 5.24.0); it imports neither JAX nor calibjax.

  .venv-peer/bin/python experiments/peers/torch_warpers.py golden tests/data/warper_golden.npz
      writes the golden keep masks the tests compare against (deterministic inputs);
  .venv-peer/bin/python experiments/peers/torch_warpers.py time INPUTS.npz OUT.json
      times TopP, MinP, Typical and Eta on the logits saved by the benchmark.
"""

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.generation import logits_process as lp  # noqa: E402

WARPERS = {
    "top_k": lambda v: lp.TopKLogitsWarper(int(v)),
    "top_p": lambda v: lp.TopPLogitsWarper(float(v)),
    "min_p": lambda v: lp.MinPLogitsWarper(float(v)),
    "typical": lambda v: lp.TypicalLogitsWarper(float(v)),
    "epsilon": lambda v: lp.EpsilonLogitsWarper(float(v)),
    "eta": lambda v: lp.EtaLogitsWarper(float(v)),
}
PARAMS = {
    "top_k": [1, 5, 50, 500], "top_p": [0.5, 0.9, 0.95, 0.99],
    "min_p": [0.01, 0.05, 0.1, 0.3], "typical": [0.2, 0.5, 0.9, 0.95],
    "epsilon": [1e-4, 3e-4, 1e-3, 3e-3], "eta": [1e-4, 3e-4, 1e-3, 3e-3],
}
TEMPERATURES = [0.7, 1.0, 1.5]


def families(rng):
  """Tie-free float32 logits [8, 1000] of three shapes, and one tied family."""
  gauss = rng.standard_normal((8, 1000)) * 3
  head = rng.standard_normal((8, 1000))
  head[:, :5] += rng.uniform(4, 9, (8, 5))          # a few dominant tokens
  zipf = -1.1 * np.log(np.arange(1, 1001))[None] + rng.standard_normal((8, 1000)) * 0.3
  out = {}
  for name, z in (("gauss", gauss), ("head", head), ("zipf", zipf)):
    z = z.astype(np.float32)
    assert all(len(np.unique(r)) == r.size for r in z), name
    out[name] = z
  out["ties"] = rng.integers(-4, 5, (8, 1000)).astype(np.float32)
  return out


def keep_mask(rule, value, logits, temperature):
  scores = lp.TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits.copy()))
  return (WARPERS[rule](value)(None, scores) > -np.inf).numpy()


def golden(path):
  data = {}
  for fam, z in families(np.random.default_rng(20261128)).items():
    data[f"logits/{fam}"] = z
    for rule, values in PARAMS.items():
      for v in values:
        for t in TEMPERATURES:
          data[f"keep/{fam}/{rule}/{v}/{t}"] = np.packbits(keep_mask(rule, v, z, t), axis=-1)
  data["meta/versions"] = np.array([torch.__version__, transformers.__version__])
  np.savez_compressed(path, **data)
  print(f"wrote {len(data)} arrays to {path}")


def timing(inputs, out, repeats=5):
  z = torch.from_numpy(np.load(inputs)["logits"])
  params = {"top_p": 0.9, "min_p": 0.1, "typical": 0.9, "eta": 3e-4}
  result = {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "shape": list(z.shape), "ms": {}}
  for rule, v in params.items():
    warper = WARPERS[rule](v)
    warper(None, z)  # warm-up
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      warper(None, z)
      best = min(best, time.perf_counter() - start)
    result["ms"][rule] = best * 1e3
  with open(out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  mode, *args = sys.argv[1:]
  {"golden": golden, "time": timing}[mode](*args)
