"""A task's prompt as a model reads it, in one of two styles:

- ``"completion"``: the task's base-model prompt (``prompts``, "… Answer:" style), encoded with
  the tokenizer's BOS;
- ``"chat"``: the task's ``chat_prompts`` entry as a user turn (after a system turn when the task
  has ``system_prompt``), rendered by the checkpoint's chat template with the generation
  prompt (:class:`calibjax.models.chat.ChatTemplate`), encoded without adding special tokens
  again (the template writes its own BOS: no double BOS);
- ``"auto"`` (the default everywhere): chat when the checkpoint has a chat template, else
  completion.

Template keyword arguments default to :data:`TEMPLATE_DEFAULTS` (Qwen3's ``enable_thinking``
off: the paper's answers are the first tokens of the reply, not a reasoning block); the
template's date is fixed (see :mod:`calibjax.models.chat`). The rendered text is what
results files record.
"""

from __future__ import annotations

import dataclasses

from calibjax import errors

STYLES = ("auto", "chat", "completion")
TEMPLATE_DEFAULTS = {"enable_thinking": False}


@dataclasses.dataclass(frozen=True)
class Prompt:
  """``style`` (``"chat"`` or ``"completion"``), the ``text`` the model reads (a rendered
  template includes its special tokens) and its token ``ids``."""
  style: str
  text: str
  ids: tuple[int, ...]


def task_prompt(lm, task, style: str = "auto", index: int = 0, template_kwargs=(),
                **more_kwargs) -> Prompt:
  """The ``index``-th prompt of ``task`` for ``lm`` in ``style`` (see the module docstring);
  ``template_kwargs`` (a dict or ``(name, value)`` pairs, as configs hold them) and
  ``more_kwargs`` reach the chat template over :data:`TEMPLATE_DEFAULTS`.

  Raises:
    InputError: an unknown style; chat asked of a model without a chat template; no such
      prompt.
    TaskError: chat asked of a task without ``chat_prompts``.
  """
  if style not in STYLES:
    raise errors.InputError(f"prompt style must be one of {list(STYLES)}, got {style!r}.")
  template = getattr(lm, "chat_template", None)
  chat = style == "chat" or (style == "auto" and template is not None)
  if chat and template is None:
    raise errors.InputError(f"{lm.name}: the checkpoint has no chat template "
                            "(chat_template.jinja or tokenizer_config.json's chat_template); "
                            "use the completion style.")
  prompts = task.chat_prompts if chat else task.prompts
  if chat and not prompts:
    raise errors.TaskError(f"{task.source}: no 'chat_prompts' for the chat prompt style.")
  if not 0 <= index < len(prompts):
    raise errors.InputError(f"task {task.name}: prompt {index} asked, it has {len(prompts)}.")
  if not chat:
    return Prompt("completion", prompts[index], tuple(lm.tokenizer.encode(prompts[index])))
  messages = ([{"role": "system", "content": task.system_prompt}] if task.system_prompt
              else []) + [{"role": "user", "content": prompts[index]}]
  text = template.render(messages, **{**TEMPLATE_DEFAULTS, **dict(template_kwargs),
                                      **more_kwargs})
  return Prompt("chat", text, tuple(lm.tokenizer.encode(text, add_bos=False)))


def resolve(lm, task, prompt=None, style: str = "auto", index: int = 0) -> Prompt:
  """What the engines take as ``prompt``: a :class:`Prompt` as is, a string as a completion
  prompt, None as the task's prompt in ``style`` (:func:`task_prompt`)."""
  if isinstance(prompt, Prompt):
    return prompt
  if isinstance(prompt, str):
    return Prompt("completion", prompt, tuple(lm.tokenizer.encode(prompt)))
  return task_prompt(lm, task, style, index)
