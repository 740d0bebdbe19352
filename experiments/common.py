"""The run scaffolding the experiment binaries share (their shared flags:
:mod:`experiments.shared_flags`): the model, head and tasks named on the command line (loaded
once per run, with errors that list the valid choices), the output folder (one run at a
time), its item store (``--resume``: the one resume loop, refused when a setting that changes
results differs), figures, the manifest, and one-line user errors.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
from absl import flags, logging

from calibjax import errors, models, results, tasks
from calibjax.analysis import plots
from calibjax.core import sharding
from .shared_flags import (CACHE_DIR, COORDINATOR, DISTRIBUTED, DTYPE, GROUPS, HEAD, MESH,
                           MODEL, NUM_PROCESSES, OUT, PROCESS_ID, RESUME, TASK)

def on_mesh(run):
  """Runs a binary's ``run()`` as one of ``--distributed`` processes (if asked) and under the
  ``--mesh`` device mesh (none: default placement)."""
  @functools.wraps(run)
  def wrapped(*args, **kwargs):
    if DISTRIBUTED.value and not jax.distributed.is_initialized():
      jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    if not MESH.value:
      return run(*args, **kwargs)
    with jax.set_mesh(sharding.make_mesh(MESH.value)):
      return run(*args, **kwargs)
  return wrapped


# Flags that change where and how a run works, never its numbers: left out of the settings
# that --resume compares (the model and head are compared by what they are, not by name).
_OPERATIONAL = {"out", "resume", "cache_dir", "task", "model", "head", "distributed",
                "coordinator_address", "num_processes", "process_id"}


def flag_values(binary: str, groups: tuple[str, ...] = ()) -> dict:
  """Every flag of the binary ``binary`` (a module of this package: ``experiments`` in a
  checkout, ``calibjax_experiments`` when installed), of the general shared flags and of the
  shared ``groups`` it uses (see :mod:`experiments.shared_flags`), by name — the same whether
  the binary runs as ``python -m`` (absl then files its flags under ``sys.argv[0]``), as its
  installed command, or imported beside others (tests)."""
  main = os.path.splitext(os.path.basename(sys.argv[0]))[0]
  values = {}
  for group in ("general",) + tuple(groups):
    values.update({f.name: f.value for f in GROUPS[group]})
  for module, defined in flags.FLAGS.flags_by_module_dict().items():
    if module == f"{__package__}.{binary}" or (module == sys.argv[0] and main == binary):
      values.update({f.name: f.value for f in defined})
  return values


class Run:
  """One binary's run: the tasks of ``--task``, the output folder held by this run alone
  (:class:`calibjax.results.OutputLock`), its item store for ``--resume`` keyed by every
  setting that changes a result, and at the end its manifest. A context manager: leaving it
  (normally or by an exception) releases the folder.

  Raises:
    InputError / TaskError / ModelLoadError: unknown task or model, a folder in use, a resume
      with other settings (named).
  """

  def __init__(self, name: str, *, groups: tuple[str, ...] = (), heads: tuple[str, ...] = ()):
    """``name``: the binary (``experiments.<name>``); ``groups``: the shared flag groups it
    reads besides the general one (they are settings of this run too); ``heads``: head folders
    it reads besides ``--head`` (compared by content, like ``--head``)."""
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
    self.name, self.out, self.started = name, OUT.value, time.time()
    self.groups = tuple(groups)
    self.tasks = load_tasks()
    self.validity_cache = os.path.join(CACHE_DIR.value or models.default_cache_dir(), "validity")
    self._model = self._head = None
    settings = self.settings(heads)
    self.lock = results.OutputLock(self.out)
    try:
      self.items = results.ItemStore(self.out, RESUME.value, settings)
    except BaseException:
      self.lock.release()
      raise

  def settings(self, heads: tuple[str, ...] = ()) -> dict:
    """What changes this run's results: its flags, the model and heads as they are on disk,
    the package version and each task's content."""
    from importlib import metadata
    from calibjax.models import checkpoint
    on_disk = lambda path: f"{os.path.abspath(path)} ({checkpoint.digest(path) or 'no head'})"
    return {"binary": self.name,
            **{k: v for k, v in flag_values(self.name, self.groups).items()
               if k not in _OPERATIONAL},
            "model": models.source_id(MODEL.value),
            "head": on_disk(HEAD.value) if HEAD.value else None,
            **({"heads": [on_disk(h) for h in heads]} if heads else {}),
            "calibjax": metadata.version("calibjax"),
            "tasks": {t.name: t.fingerprint() for t in self.tasks}}

  def model(self):
    """The ``--model``, loaded on first use (a resumed run with nothing left to compute never
    loads it)."""
    if self._model is None:
      self._model = load_model()
    return self._model

  def head(self):
    """The ``--head`` bound to the model (loaded and compiled once per run), or None."""
    if HEAD.value and self._head is None:
      from calibjax import recalibration
      self._head = recalibration.load(HEAD.value, self.model())
    return self._head

  def item(self, key: str, compute):
    """The result ``key`` of this run: computed by ``compute()`` and saved, or, when a
    ``--resume`` finds it finished, read back (the one resume loop of every binary)."""
    if not self.items.done(key):
      self.items.save(key, compute())
    return self.items.load(key)

  def __enter__(self) -> "Run":
    return self

  def __exit__(self, *exc) -> None:
    self.lock.release()

  def finish(self, **extra) -> None:
    """Writes ``manifest.json``: every flag of the binary and of this module, and ``extra``."""
    results.write_manifest(self.out, {"binary": self.name,
                                      **flag_values(self.name, self.groups)},
                           self.started, **extra)

  def figure(self, draw, data, filename: str) -> str:
    """Draws ``draw(data)`` into ``out/filename``; without matplotlib (the ``plots`` extra)
    the figure is skipped with a message (the data files are written all the same)."""
    path = os.path.join(self.out, filename)
    if not plots.available():
      print(f"calibjax: skipped {path}: matplotlib is not installed "
            "(pip install 'calibjax[plots]').", file=sys.stderr)
      return path
    return plots.save(draw(data), path)


def keep_compiled_programs() -> None:
  """JAX's persistent compilation cache in ``<cache_dir>/jax`` (``~/.cache/calibjax/jax``), so
  that a rerun, or the next binary of a job, reuses the programs a run compiled (a third of
  the main job's first run is compilation); a cache the user configured
  (``JAX_COMPILATION_CACHE_DIR``) is left as it is."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(CACHE_DIR.value or models.default_cache_dir(), "jax"))


def main(body):
  """An absl ``main`` that runs ``body()`` and reports calibjax's user errors (bad flags,
  files, models, folders) as one line on stderr with exit status 1; ``--verbosity=1`` shows
  the traceback instead. Compiled programs are kept across runs
  (:func:`keep_compiled_programs`)."""
  @functools.wraps(body)
  def wrapped(argv):
    del argv
    verbose = flags.FLAGS.verbosity >= 1
    keep_compiled_programs()
    try:
      body()
    except errors.CalibjaxError as e:
      if verbose:
        raise
      sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e} (--verbosity=1 shows the "
               "traceback)")
  return wrapped


def load_tasks() -> list[tasks.Task]:
  """The ``--task`` values (``all``: the whole built-in suite), each a name or a file."""
  out = []
  for value in TASK.value:
    out += tasks.load_all() if value == "all" else [tasks.load(value)]
  names = [t.name for t in out]
  if len(set(names)) != len(names):
    raise errors.InputError(f"--task names a task twice: {names}.")
  return out


def prompt_texts(lm, task_list) -> dict[str, str]:
  """Each task's prompt as ``lm`` reads it under ``--prompt_style`` and
  ``--chat_template_kwargs`` (what manifests record)."""
  from calibjax.models import prompts
  from .shared_flags import PROMPT_STYLE, template_kwargs
  return {t.name: prompts.task_prompt(lm, t, PROMPT_STYLE.value,
                                      template_kwargs=template_kwargs()).text for t in task_list}


def load_model():
  """The ``--model``; its weights sharded over the ``--mesh`` when it has a ``"model"`` axis
  (FSDP + tensor parallel), else replicated (a ``"data"``-only mesh is pure data parallel)."""
  mesh = sharding.make_mesh(MESH.value) if MESH.value else None
  if mesh is not None and sharding.MODEL not in mesh.axis_names:
    mesh = None
  return models.load(MODEL.value, cache_dir=CACHE_DIR.value, mesh=mesh, dtype=DTYPE.value)
