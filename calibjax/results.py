"""Writing results files: atomic (temp file + rename), deterministic JSON that diffs well; an
output folder held by one run at a time (:class:`OutputLock`); finished work items that a
resumed run reuses only under the same settings (:class:`ItemStore`)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, BinaryIO, Callable


def _plain(x: Any, strings: bool = True) -> Any:
  """JSON-ready copy: numpy/jax scalars and arrays become Python numbers and lists;
  non-finite floats become the strings "nan", "inf", "-inf" (with ``strings``)."""
  if isinstance(x, dict):
    return {str(k): _plain(v, strings) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v, strings) for v in x]
  if hasattr(x, "tolist"):
    return _plain(x.tolist(), strings)
  if strings and isinstance(x, float) and not math.isfinite(x):
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
  return x


def is_writer() -> bool:
  """Whether this process writes results: only process 0 of a multi-process run does (every
  process computes the same numbers)."""
  import jax
  return jax.process_index() == 0


def write_json_atomic(path: str, data: Any) -> str:
  """Writes ``data`` as sorted, indented JSON to ``path`` atomically; returns ``path``."""
  return write_text_atomic(path, json.dumps(_plain(data), indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str, text: str) -> str:
  """Writes ``text`` to ``path`` atomically (process 0 only, see :func:`is_writer`); returns
  ``path``."""
  return write_atomic(path, lambda f: f.write(text.encode()))


def write_atomic(path: str, write: Callable[[BinaryIO], Any]) -> str:
  """The one atomic writer of results files: ``write(f)`` fills a temporary file beside
  ``path``, which then replaces ``path`` in one step (a reader sees the old file or the new
  one, never a part). Process 0 only (see :func:`is_writer`); returns ``path``."""
  if not is_writer():
    return path
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for reading
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path


def jsonl(records) -> str:
  """Records as JSON lines (sorted keys), for :func:`write_text_atomic`."""
  return "".join(json.dumps(_plain(r), sort_keys=True) + "\n" for r in records)


def _git_commit() -> str | None:
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def write_manifest(out_dir: str, flags: dict, started: float, **extra) -> str:
  """``out_dir/manifest.json``: versions, flags, git commit, devices, start and wall time."""
  import datetime
  import platform
  import time
  from importlib import metadata

  import jax
  versions = {}
  for pkg in ("calibjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
              "outlines-core", "gguf"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = None
  iso = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()
  return write_json_atomic(os.path.join(out_dir, "manifest.json"), {
      "versions": versions, "python": platform.python_version(), "git_commit": _git_commit(),
      "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
      "flags": flags, "started": iso(started), "wall_s": time.time() - started, **extra})


class OutputLock:
  """One run at a time in an output folder: an exclusive ``flock`` on ``out_dir/.lock``,
  which holds the owner's pid, host and start time for the message a second run gets.

  The kernel drops the lock when its owner exits, however it dies, so a lock file left by a
  dead process is simply taken over (and said so on stderr). Use it as a context manager, or
  call :meth:`release`. Processes other than 0 of a multi-process run take no lock (they
  write nothing).

  Raises:
    InputError: another live process holds the folder (its pid and host are named).
  """

  def __init__(self, out_dir: str):
    import fcntl
    import socket
    import sys
    from calibjax import errors
    self._fd = None
    if not is_writer():
      return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise errors.InputError(f"{out_dir} is in use by another run ({owner}): wait for it to "
                              "finish, or choose another --out.") from None
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
      print(f"calibjax: taking over {path} from a run that is no longer running ({previous}).",
            file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                  f"{_now_iso()}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    """Empties the lock file (a clean exit leaves no owner behind) and unlocks it."""
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing drops the flock
      self._fd = None

  def __enter__(self) -> "OutputLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _now_iso() -> str:
  import datetime
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class ItemStore:
  """Completed work items of a run (``out_dir/items/<key>.json``, each written atomically),
  so that ``--resume`` skips them and an interrupted run (even ``kill -9``) loses nothing
  that was finished.

  ``settings`` is everything that changes a result (flags, model, head, package version,
  each task's content under ``"tasks"``), kept in ``out_dir/run.json``. A resumed run must
  bring the same settings as the run that wrote it (tasks: the same content for every task both runs name; new tasks
  are added), else it is refused with the differing settings named: finished items are
  never mixed with items computed under other settings.

  Without ``resume``, a folder that already holds items is an error: nothing is overwritten.
  """

  def __init__(self, out_dir: str, resume: bool, settings: dict | None = None):
    from calibjax import errors
    self.folder = os.path.join(out_dir, "items")
    self.saved = {}  # this run's items, as they read back (processes other than 0 write none)
    has_items = os.path.isdir(self.folder) and any(
        f.endswith(".json") for f in os.listdir(self.folder))
    if not resume and has_items:
      raise errors.InputError(f"{out_dir} already holds results of a run: pass --resume to "
                              "continue it, or choose another --out.")
    settings = _plain(settings or {})
    path = os.path.join(out_dir, "run.json")
    if resume and (has_items or os.path.exists(path)):
      try:
        with open(path) as f:
          before = json.load(f)
      except (OSError, ValueError):
        raise errors.InputError(
            f"{out_dir} holds results without a readable run.json (the settings they were "
            "made with): they cannot be resumed safely; choose another --out.") from None
      changed = _changes(before, settings)
      if changed:
        raise errors.InputError(
            f"--resume: {out_dir} was made with other settings, and its results would be "
            f"mixed with new ones: {'; '.join(changed)}. Rerun with the settings of "
            "run.json, or choose another --out.")
      settings = {**before, **settings, "tasks": {**before.get("tasks", {}),
                                                  **settings.get("tasks", {})}}
    os.makedirs(self.folder, exist_ok=True)
    write_json_atomic(path, settings)

  def _path(self, key: str) -> str:
    return os.path.join(self.folder, f"{key}.json")

  def done(self, key: str) -> bool:
    return key in self.saved or os.path.exists(self._path(key))

  def load(self, key: str) -> Any:
    if key in self.saved:
      return json.loads(self.saved[key])
    with open(self._path(key)) as f:
      return json.load(f)

  def save(self, key: str, data: Any) -> Any:
    """Writes the item (non-finite floats kept as JSON's NaN/Infinity, so they read back as
    floats) and returns it as it reads back."""
    self.saved[key] = json.dumps(_plain(data, strings=False), sort_keys=True)
    write_text_atomic(self._path(key), self.saved[key])
    return self.load(key)


def _changes(before: dict, now: dict) -> list[str]:
  """``"name: old → new"`` for each setting that differs (tasks: only those in both)."""
  out = []
  for key in sorted(set(before) | set(now)):
    if key == "tasks":
      old, new = before.get(key, {}), now.get(key, {})
      out += [f"task {t}: its content changed" for t in sorted(set(old) & set(new))
              if old[t] != new[t]]
    elif before.get(key) != now.get(key):
      out.append(f"{key}: {before.get(key, '(unset)')!r} then, {now.get(key, '(unset)')!r} now")
  return out
