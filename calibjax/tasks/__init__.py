"""Tasks with exactly known valid answers (SPEC §6).

- :mod:`calibjax.tasks.schema` — the JSON task file and :class:`Task`;
- :mod:`calibjax.tasks.suite` — the built-in tasks and loading by name or path;
- :mod:`calibjax.tasks.validity` — each task's token-validity masks (outlines-core), loaded
  when imported.
"""

from calibjax.tasks.schema import Task, from_dict
from calibjax.tasks.suite import load, load_all, names

__all__ = ["Task", "from_dict", "load", "load_all", "names"]
