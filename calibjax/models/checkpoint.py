"""The one checkpoint module: every Orbax save and restore of calibjax goes through here.

A cache entry is a folder holding ``state/`` (an Orbax standard-checkpoint save of an
NNX state), any number of small side files (JSON, bytes), and ``COMPLETE`` — written last,
holding the SHA-256 of every side file and of every file Orbax wrote under ``state/``. An
entry without ``COMPLETE``, with a file that is missing, extra or does not match its digest
(one flipped bit in a tensor's data file included), or whose state Orbax cannot restore into
the expected shapes is reported by :class:`calibjax.errors.CheckpointError`; callers rebuild
it, never use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from typing import Callable

import jax

from calibjax import errors

_MARKER = "COMPLETE"


def staging_gb(state) -> int:
  """How many GB of tensors Orbax may stage in host memory at once while saving or restoring
  ``state``: 1, or the largest tensor rounded up (Orbax refuses a tensor larger than its
  budget; its default, 96, would stage a whole 8B model: a second copy on the host)."""
  largest = max((math.prod(a.shape) * jax.numpy.dtype(a.dtype).itemsize
                 for a in jax.tree.leaves(state)), default=0)
  return max(1, math.ceil(largest / 1e9))


def _checkpointer(state):
  import orbax.checkpoint as ocp
  gb = staging_gb(state)
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=gb,
                                                        restore_concurrent_gb=gb))


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _state_digests(folder: str) -> dict[str, str]:
  """SHA-256 of every file under ``folder/state``, keyed by its path relative to ``folder``."""
  out = {}
  root = os.path.join(folder, "state")
  for parent, _, names in os.walk(root):
    for name in names:
      path = os.path.join(parent, name)
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
          digest.update(chunk)
      out[os.path.relpath(path, folder)] = digest.hexdigest()
  return out


def save(folder: str, state, files: dict[str, bytes]) -> None:
  """Writes ``state`` and ``files`` into ``folder`` (replaced if present), marker last."""
  import orbax.checkpoint as ocp
  if os.path.exists(folder):
    shutil.rmtree(folder)
  os.makedirs(folder)
  with _checkpointer(state) as ckpt:
    ckpt.save(os.path.join(os.path.abspath(folder), "state"),
              args=ocp.args.StandardSave(state))
  for name, data in files.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)
  tmp = os.path.join(folder, _MARKER + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": {name: _sha(data) for name, data in files.items()},
               "state": _state_digests(folder)}, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(folder, _MARKER))


def digest(folder: str) -> str | None:
  """One SHA-256 for a whole entry (of its ``COMPLETE`` marker, which holds the digest of
  every file), without reading the tensors; None when the entry has no marker."""
  try:
    with open(os.path.join(folder, _MARKER), "rb") as f:
      return _sha(f.read())
  except OSError:
    return None


def _placed(sharding) -> bool:
  """A sharding on real devices (not None, not on an abstract mesh from ``eval_shape``)."""
  return sharding is not None and not (
      isinstance(sharding, jax.sharding.NamedSharding) and
      isinstance(sharding.mesh, jax.sharding.AbstractMesh))


def load(folder: str, abstract_state: Callable[[dict[str, bytes]], object]
         ) -> tuple[object, dict[str, bytes]]:
  """Restores the side files, then the state into ``abstract_state(files)`` (the expected
  shapes and dtypes, which may depend on the side files, e.g. a config).

  Leaves of the abstract state that carry a sharding are restored into it (each device reads
  its shard); the others onto this process's first device.

  Raises:
    CheckpointError: missing, partial or corrupt entry (the message says which part).
  """
  import orbax.checkpoint as ocp
  marker = os.path.join(folder, _MARKER)
  if not os.path.exists(marker):
    raise errors.CheckpointError(f"{folder}: no {_MARKER} marker (missing or partial entry).")
  try:
    with open(marker) as f:
      digests = json.load(f)
    files = {}
    for name, digest in digests["files"].items():
      with open(os.path.join(folder, name), "rb") as f:
        files[name] = f.read()
      if _sha(files[name]) != digest:
        raise errors.CheckpointError(f"{folder}/{name}: checksum mismatch (corrupt).")
    state_digests = _state_digests(folder)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise errors.CheckpointError(f"{folder}: unreadable side files or marker of an older "
                                 f"format ({type(e).__name__}: {e}).") from e
  want = digests["state"]
  for name in sorted(set(want) | set(state_digests)):
    if want.get(name) != state_digests.get(name):
      what = ("missing" if name not in state_digests else "not written by the save"
              if name not in want else "checksum mismatch (corrupt)")
      raise errors.CheckpointError(f"{folder}/{name}: {what}.")
  try:
    abstract_state = abstract_state(files)
  except (KeyError, ValueError, TypeError) as e:
    raise errors.CheckpointError(f"{folder}: side files do not describe a model ({e}).") from e
  # leaves without a sharding go to this process's first device: Orbax would otherwise reuse
  # the sharding recorded at save time (e.g. replicated over a mesh that was in context then)
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_state = jax.tree.map(
      lambda a: a if _placed(getattr(a, "sharding", None)) else
      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), abstract_state)
  try:
    with _checkpointer(abstract_state) as ckpt:
      state = ckpt.restore(os.path.join(os.path.abspath(folder), "state"),
                           args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # Orbax/TensorStore raise many kinds for damaged data
    raise errors.CheckpointError(f"{folder}/state: cannot be restored ({type(e).__name__}: "
                                 f"{str(e)[:300]}).") from e
  want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_state)
  got = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  if want != got:
    raise errors.CheckpointError(f"{folder}/state: restored shapes differ from the model's.")
  return state, files
