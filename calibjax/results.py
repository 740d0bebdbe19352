"""Writing results files: atomic (temp file + rename), deterministic JSON that diffs well."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any


def _plain(x: Any) -> Any:
  """JSON-ready copy: numpy/jax scalars and arrays become Python numbers and lists;
  non-finite floats become the strings "nan", "inf", "-inf"."""
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if hasattr(x, "tolist"):
    return _plain(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
  return x


def write_json_atomic(path: str, data: Any) -> str:
  """Writes ``data`` as sorted, indented JSON to ``path`` atomically; returns ``path``."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(_plain(data), f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path
