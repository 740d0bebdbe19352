"""Chat templates: a checkpoint's Jinja template, rendered as ``transformers``'
``apply_chat_template`` renders it, without ``transformers``.

The template is the folder's ``chat_template.jinja``, else the ``chat_template`` of
``tokenizer_config.json`` (a string, or a list of named templates: ``name=`` picks one,
default ``"default"``). It runs in ``jinja2``'s immutable sandbox with ``trim_blocks``,
``lstrip_blocks`` and the ``loopcontrols`` extension; ``tojson`` without ASCII escaping;
``raise_exception``; ``strftime_now``; the special-token strings of ``tokenizer_config.json``
(``bos_token``, ``eos_token``, …) and ``tools=None``, ``documents=None`` as variables.

The date: ``strftime_now`` formats a fixed date (:data:`DATE`, Llama 3.1's own default
``26 Jul 2024``; ``date=`` changes it), never the clock, so a prompt never changes with the
day a run starts. The rendered text already holds the template's special tokens (BOS
included): encode it without adding them again.
"""

from __future__ import annotations

import datetime
import json
import os

from calibjax import errors

DATE = datetime.date(2024, 7, 26)
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
            "mask_token")


def _token_text(value):
  return value.get("content") if isinstance(value, dict) else value


class ChatTemplate:
  """A compiled chat template and the special-token strings it is rendered with."""

  def __init__(self, source: str, special: dict[str, str] | None = None,
               where: str = "<template>"):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    self.source, self.where = source, where
    self.special = dict(special or {})
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                        sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
      self._template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
      raise errors.ModelLoadError(f"{where}: the chat template does not compile ({e}).") from e

  @classmethod
  def from_folder(cls, folder: str, name: str | None = None) -> "ChatTemplate | None":
    """The folder's template (see the module docstring), or None when it has none.

    Raises:
      ModelLoadError: unreadable files, an unknown template ``name``, a template that does not
        compile.
    """
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = {}
    if os.path.exists(config_path):
      try:
        with open(config_path, encoding="utf-8") as f:
          config = json.load(f)
      except (OSError, ValueError) as e:
        raise errors.ModelLoadError(f"{config_path}: cannot be read ({e}).") from e
    special = {k: _token_text(config[k]) for k in _SPECIAL if _token_text(config.get(k))}
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja) and name is None:
      with open(jinja, encoding="utf-8", newline="") as f:
        return cls(f.read(), special, jinja)
    templates = config.get("chat_template")
    if isinstance(templates, list):  # [{"name": ..., "template": ...}, ...]
      named = {t["name"]: t["template"] for t in templates}
      key = name or "default"
      if key not in named:
        raise errors.ModelLoadError(f"{config_path}: no chat template named {key!r} (has "
                                    f"{sorted(named)}).")
      return cls(named[key], special, f"{config_path} ({key})")
    if name is not None:
      raise errors.ModelLoadError(f"{folder}: no named chat templates (asked for {name!r}).")
    return cls(templates, special, config_path) if isinstance(templates, str) else None

  def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
             date: datetime.date = DATE, **kwargs) -> str:
    """The conversation as text, ending with the assistant's turn header when
    ``add_generation_prompt``; ``kwargs`` reach the template (``enable_thinking=False`` for
    Qwen3, ``date_string=`` for Llama 3.1, …).

    Raises:
      InputError: the template refused the conversation (its ``raise_exception``).
    """
    import jinja2
    variables = {**self.special, "tools": None, "documents": None,
                 "strftime_now": date.strftime, **kwargs}
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **variables)
    except jinja2.exceptions.TemplateError as e:
      raise errors.InputError(f"{self.where}: the chat template refused the conversation "
                              f"({e}).") from e
