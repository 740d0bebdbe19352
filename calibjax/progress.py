"""Progress bars of long runs: one tqdm bar on stderr, or none."""

from __future__ import annotations

import sys


def bar(desc: str, unit: str, total: int | None = None, *, enabled: bool = True, **kwargs):
  """A tqdm bar on stderr (disabled, but still usable, when not ``enabled``); extra
  ``kwargs`` go to tqdm (``leave``, ``iterable``, …)."""
  from tqdm import tqdm
  return tqdm(desc=desc, unit=unit, total=total, file=sys.stderr, disable=not enabled, **kwargs)
