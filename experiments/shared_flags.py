"""The flags that several experiment binaries share, in one place (a binary never imports
another for its flags), in two groups:

- :data:`GENERAL`, every binary's: ``--model`` (a name such as ``gemma3-270m``, a ``.gguf``
  file or a Hugging Face directory), ``--dtype``, ``--prompt_style``,
  ``--chat_template_kwargs`` (:func:`template_kwargs`), ``--task`` (repeatable: a built-in
  name, a task file path, or ``all``), ``--out``, ``--seed``, ``--batch_size``, ``--resume``,
  ``--cache_dir``,
  ``--head``, ``--mesh``, ``--distributed`` (with ``--coordinator_address``,
  ``--num_processes``, ``--process_id``);
- :data:`SWEEP`, the frontier sweeps of ``frontier`` and ``head_report``: ``--samplers``,
  ``--rules``, ``--temperatures``, ``--oracle_taus``, ``--coverage_n``, ``--bound``
  (:func:`frontier_config`).
"""

from __future__ import annotations

from absl import app, flags

from calibjax import errors
from calibjax.analysis import frontier
from calibjax.core import truncation

MODEL = flags.DEFINE_string("model", "gemma3-270m", "Model name, .gguf file or HF directory.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                          "Weights and activations (norms, softmax and logits stay float32); "
                          "bfloat16 for 8B-class models.")
PROMPT_STYLE = flags.DEFINE_enum(
    "prompt_style", "auto", ["auto", "chat", "completion"],
    "chat: the task's chat_prompts as a user turn through the checkpoint's chat template; "
    "completion: its base-model prompts; auto: chat when the checkpoint has a template.")
TEMPLATE_KWARGS = flags.DEFINE_string(
    "chat_template_kwargs", "{}", "JSON object of keyword arguments for the chat template, over "
    'the defaults {"enable_thinking": false}, e.g. \'{"date_string": "01 Jan 2026"}\'.')
TASK = flags.DEFINE_multi_string("task", ["us_states"],
                                 "Task name, task file path, or 'all' (repeatable).")
OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Tree nodes or samples per model call.")
RESUME = flags.DEFINE_bool("resume", False, "Continue a run in --out, skipping finished items.")
CACHE_DIR = flags.DEFINE_string("cache_dir", None,
                                "Model and validity-index cache (default ~/.cache/calibjax).")
HEAD = flags.DEFINE_string("head", None, "A trained recalibration head (the head/ folder of "
                           "experiments.train_head), applied to the model's logits.")
MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:8 or data:4,model:2 (all "
                           "devices): every row function runs data-parallel over 'data'.")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "One of several processes (TPU pod slice, multi-GPU hosts, SLURM, "
    "Open MPI): calls jax.distributed.initialize(); the cluster is detected, or described by "
    "--coordinator_address, --num_processes and --process_id. Only process 0 writes.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "host:port of process 0 (with --distributed).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (with --distributed).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process (with --distributed).")

SAMPLERS = flags.DEFINE_multi_string(
    "samplers", [], "Explicit samplers (e.g. 'top_p=0.9,t=1.5', 'oracle_set,t=2'); "
    "replaces the default sweeps.")
RULES = flags.DEFINE_list("rules", list(truncation.RULES), "Rules swept by default.")
TEMPERATURES = flags.DEFINE_list("temperatures", ["0.7", "1", "1.5"], "Temperatures swept.")
ORACLE_TAUS = flags.DEFINE_list("oracle_taus", ["0.9", "0.95", "0.99"], "oracle_rank τ values.")
COVERAGE_N = flags.DEFINE_integer("coverage_n", 100, "N of coverage@N.")
BOUND = flags.DEFINE_float("bound", 1e-3, "Stop when every unexplored valid mass is below.")

GENERAL = (MODEL, DTYPE, PROMPT_STYLE, TEMPLATE_KWARGS, TASK, OUT, SEED, BATCH_SIZE, RESUME,
           CACHE_DIR, HEAD, MESH, DISTRIBUTED, COORDINATOR, NUM_PROCESSES, PROCESS_ID)
SWEEP = (SAMPLERS, RULES, TEMPERATURES, ORACLE_TAUS, COVERAGE_N, BOUND)
GROUPS = {"general": GENERAL, "sweep": SWEEP}


def template_kwargs() -> tuple[tuple[str, object], ...]:
  """``--chat_template_kwargs`` as ``(name, value)`` pairs (what the configs hold)."""
  import json
  try:
    value = json.loads(TEMPLATE_KWARGS.value)
  except ValueError as e:
    raise app.UsageError(f"--chat_template_kwargs: not JSON ({e}).") from None
  if not isinstance(value, dict):
    raise app.UsageError(f"--chat_template_kwargs: a JSON object, got {TEMPLATE_KWARGS.value!r}.")
  return tuple(sorted(value.items()))


def frontier_config() -> frontier.FrontierConfig:
  """The frontier sweeps of the :data:`SWEEP` flags (errors name the offending flag)."""
  unknown = sorted(set(RULES.value) - set(truncation.RULES))
  if unknown:
    raise errors.InputError(f"--rules: unknown {unknown}; rules are {list(truncation.RULES)}.")
  for s in SAMPLERS.value:
    truncation.Sampler.parse(s)  # errors name the offending part
  try:
    return frontier.FrontierConfig(
        rules=tuple(RULES.value), temperatures=tuple(float(t) for t in TEMPERATURES.value),
        oracle_taus=tuple(float(t) for t in ORACLE_TAUS.value), samplers=tuple(SAMPLERS.value),
        coverage_n=COVERAGE_N.value, bound=BOUND.value, batch_size=BATCH_SIZE.value,
        prompt_style=PROMPT_STYLE.value, template_kwargs=template_kwargs())
  except ValueError as e:
    raise app.UsageError(f"--temperatures / --oracle_taus: {e}") from None
