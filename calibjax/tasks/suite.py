"""The built-in task suite (files under ``calibjax/tasks/builtin/``) and loading a task by
name or path."""

from __future__ import annotations

import json
import os
from importlib import resources

from calibjax import errors
from calibjax.tasks.schema import Task, from_dict

BUILTIN = "builtin"


def names() -> list[str]:
  """The built-in tasks, sorted."""
  folder = resources.files("calibjax.tasks") / BUILTIN
  return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load(name_or_path: str) -> Task:
  """A built-in task by name, or a task file by path.

  Raises:
    TaskError: unknown name (the message lists the built-in ones), unreadable or malformed
      file (file, field and offending value).
  """
  if os.path.exists(name_or_path):
    source = name_or_path
    try:
      with open(name_or_path, encoding="utf-8") as f:
        text = f.read()
    except OSError as e:
      raise errors.TaskError(f"{source}: cannot be read ({e}).") from e
  elif name_or_path in names():
    res = resources.files("calibjax.tasks") / BUILTIN / f"{name_or_path}.json"
    source, text = f"calibjax/tasks/{BUILTIN}/{name_or_path}.json", res.read_text(encoding="utf-8")
  else:
    raise errors.TaskError(f"unknown task {name_or_path!r}: not a file, and not one of "
                           f"{', '.join(names())}.")
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise errors.TaskError(f"{source}: line {e.lineno}, column {e.colno}: invalid JSON "
                           f"({e.msg}).") from None
  return from_dict(raw, source)


def load_all(split: str | None = None) -> list[Task]:
  """Every built-in task (of one split if given)."""
  tasks = [load(n) for n in names()]
  return [t for t in tasks if split is None or t.split == split]
