"""What a bug report needs: calibjax's and its stack's versions, the Python, the JAX backend
and devices, and the cache folder with its size (``python -m calibjax env``)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

STACK = ("calibjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
         "gguf", "sentencepiece", "safetensors", "outlines-core", "matplotlib")


def cache_dir() -> str:
  """The cache folder of converted models and validity indexes: ``$CALIBJAX_CACHE``, else
  ``~/.cache/calibjax``."""
  return os.environ.get("CALIBJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "calibjax")


def folder_size(path: str) -> int:
  """Bytes of the files under ``path`` (0 if it does not exist; links are not followed)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      if not os.path.islink(full):
        total += os.path.getsize(full)
  return total


def report() -> dict:
  """Versions (``None``: not installed), Python, platform, backend, devices, cache."""
  import jax
  versions = {}
  for name in STACK:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  folder = cache_dir()
  return {"versions": versions, "python": sys.version.split()[0],
          "platform": platform.platform(), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
          "cache_dir": folder, "cache_bytes": folder_size(folder)}


def format_report(env: dict) -> str:
  """The report as aligned text lines."""
  lines = [f"{name:18s} {version or '(not installed)'}"
           for name, version in env["versions"].items()]
  size = env["cache_bytes"]
  lines += [f"{'python':18s} {env['python']}", f"{'platform':18s} {env['platform']}",
            f"{'backend':18s} {env['backend']}",
            f"{'devices':18s} {len(env['devices'])}: {', '.join(env['devices'])}",
            f"{'processes':18s} {env['process_count']}",
            f"{'cache':18s} {env['cache_dir']} ({size / 2**20:.1f} MiB)"]
  return "\n".join(lines)
