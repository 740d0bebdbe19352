"""The one exception hierarchy of calibjax.

Every error raised for bad user input derives from :class:`CalibjaxError`; input errors also
derive from :class:`ValueError` so that generic handlers keep working. Messages say what was
wrong, where (row, token, file, field) and what to do.
"""


class CalibjaxError(Exception):
  """Base class of every calibjax error."""


class InputError(CalibjaxError, ValueError):
  """Bad user input: wrong shapes, dtypes or values."""


class ShapeMismatchError(InputError):
  """Two inputs that must agree in shape (or vocabulary size) do not."""


class NonFiniteLogitsError(InputError):
  """Logits contain NaN or +inf (``-inf`` is legal: probability 0, ranked last)."""


class ModelLoadError(CalibjaxError):
  """A model file or directory cannot be used: wrong architecture, missing or misshapen
  tensors, truncated or unreadable file."""


class CheckpointError(CalibjaxError):
  """A cached checkpoint is missing, partial or corrupt (it is rebuilt, never used)."""


class TaskError(InputError):
  """A task file or task specification is malformed (the message names file and field)."""
