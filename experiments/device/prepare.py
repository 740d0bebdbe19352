"""Prepares the device check (``experiments/device/run.sh``) on this machine: what the device
image lacks and what cannot travel there.

  .venv/bin/python -m experiments.device.prepare

writes, under ``.device/`` (ignored by git, carried by the device call):

- ``gemma3-270m/config.json`` and ``tokenizer.json``: the packaged Gemma 3 270M's decoder
  configuration and SentencePiece tokenizer (262,144 tokens, 8.5 MB), so that the benchmark
  builds a model of its exact shapes with random weights there (``--model=random:<folder>``;
  the 250 MB model file does not fit the 64 MiB the device call carries);
- ``wheels/``: the pure or manylinux x86-64 wheels of calibjax's dependencies that the device
  image (Python 3.12, jax 0.11.2 with CUDA, flax, optax, orbax, chex, absl-py, tokenizers,
  sentencepiece, jinja2, ml-dtypes, matplotlib) does not hold, downloaded from PyPI.
"""

import json
import os
import subprocess
import sys

from calibjax import models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, ".device")
# not in the device image (KINDS.md of the device tool lists what is)
WHEELS = ["outlines-core==0.2.14", "gguf==0.19.0", "tqdm==4.70.1"]


def main():
  folder = os.path.join(OUT, "gemma3-270m")
  os.makedirs(folder, exist_ok=True)
  lm = models.load("gemma3-270m", progress=False)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(lm.config.to_dict(), f)
  with open(os.path.join(folder, "tokenizer.json"), "w") as f:
    json.dump(lm.tokenizer.fields(), f)
  wheels = os.path.join(OUT, "wheels")
  subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                  "--python-version", "3.12", "--platform", "manylinux2014_x86_64",
                  "--platform", "manylinux_2_17_x86_64", "--platform", "any", "-d", wheels,
                  *WHEELS], check=True)
  print("wrote", OUT, sorted(os.listdir(folder)), sorted(os.listdir(wheels)))


if __name__ == "__main__":
  main()
