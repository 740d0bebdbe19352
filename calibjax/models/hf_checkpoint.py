"""Reading Hugging Face checkpoint folders: ``config.json``, safetensors weights (one file or
shards listed by ``model.safetensors.index.json``) and the tokenizer (``tokenizer.json``,
else a SentencePiece ``tokenizer.model``).

Tensors are read one at a time, in the dtype they are stored in (float32, float16 or
bfloat16 through ``ml_dtypes``), straight from the file into one buffer: loading never
holds the whole model on the host. Which tensor becomes which parameter is the family's
recipe (``calibjax.models.families``); a tensor the recipe does not know, a missing tensor
or a wrong shape is an error naming the tensor. The language model inside a multimodal
checkpoint is read; its vision tower and multi-token prediction head (``mtp.*``) are skipped,
and said so.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import numpy as np

from calibjax import errors
from calibjax.models import families
from calibjax.models.decoder import DecoderConfig

_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
_SKIPPED = {  # what a multimodal checkpoint holds beside its language model: not read
    "the vision tower": ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                         "model.multi_modal_projector.", "visual.", "model.visual."),
    "the multi-token prediction head": ("mtp.",)}
_IGNORED = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise errors.ModelLoadError(f"{path}: cannot be read ({e}).") from e


def read_config(folder: str) -> DecoderConfig:
  path = os.path.join(folder, "config.json")
  return families.read_config(_read_json(path), path)


class SafetensorsFile:
  """One ``.safetensors`` file: its header (names, dtypes, shapes, offsets) and each tensor
  read on demand with ``read(name)`` (only that tensor's bytes)."""

  DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
            "I32": np.int32}

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
      self.size = os.path.getsize(path)
    except (OSError, ValueError, struct.error) as e:
      raise errors.ModelLoadError(f"{path}: cannot be read as safetensors ({e}).") from e
    self.start = 8 + n
    header.pop("__metadata__", None)
    self.header = header
    for name, h in header.items():
      begin, end = h["data_offsets"]
      if self.start + end > self.size:
        raise errors.ModelLoadError(f"{path}: tensor {name} runs past the end of the file "
                                    f"(truncated: {self.size} bytes).")

  def _dtype(self, name):
    code = self.header[name]["dtype"]
    if code == "BF16":
      import ml_dtypes
      return np.dtype(ml_dtypes.bfloat16)
    if code not in self.DTYPES:
      raise errors.ModelLoadError(f"{self.path}: tensor {name} has dtype {code}; calibjax reads "
                                  "F32, F16 and BF16 weights.")
    return np.dtype(self.DTYPES[code])

  def shape(self, name) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def read(self, name: str) -> np.ndarray:
    h = self.header[name]
    begin, end = h["data_offsets"]
    dtype = self._dtype(name)
    count = int(np.prod(h["shape"], dtype=np.int64))
    if (end - begin) != count * dtype.itemsize:
      raise errors.ModelLoadError(f"{self.path}: tensor {name}: {end - begin} bytes for shape "
                                  f"{h['shape']} of {h['dtype']}.")
    with open(self.path, "rb") as f:
      f.seek(self.start + begin)
      data = np.fromfile(f, dtype=dtype, count=count)
    return data.reshape(h["shape"])


def weight_files(folder: str) -> list[SafetensorsFile]:
  """The folder's safetensors files: those the index names, else every ``*.safetensors``."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    names = sorted(set(_read_json(index).get("weight_map", {}).values()))
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
      raise errors.ModelLoadError(f"{index}: shard(s) {missing} are missing.")
    paths = [os.path.join(folder, n) for n in names]
  else:
    paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not paths:
    raise errors.ModelLoadError(f"{folder}: no *.safetensors files.")
  return [SafetensorsFile(p) for p in paths]


def read_params(folder: str, cfg: DecoderConfig, shapes: dict[str, tuple[int, ...]]):
  """Yields ``(NNX path, array)`` one parameter at a time, in the checkpoint's dtype.

  Args:
    shapes: the model's parameter shapes by NNX path (each array is checked against them).

  Raises:
    ModelLoadError: a tensor unknown to the family's recipe, missing, or of the wrong shape.
  """
  where = {}
  for f in weight_files(folder):
    for name in f.header:
      where[name] = f
  prefix = next((p for p in _PREFIXES if f"{p}embed_tokens.weight" in where), None)
  if prefix is None:
    raise errors.ModelLoadError(f"{folder}: no embed_tokens.weight under {_PREFIXES}; not a "
                                "decoder checkpoint calibjax reads.")
  recipes = families.recipes(cfg, set(where), prefix)
  used = {n for names, _ in recipes.values() for n in names}
  skipped = {what: sorted(n for n in where if n.startswith(starts))
             for what, starts in _SKIPPED.items()}
  skipped = {what: names for what, names in skipped.items() if names}
  unknown = sorted(set(where) - used - {n for names in skipped.values() for n in names}
                   - {n for n in where if n.endswith(_IGNORED)})
  if cfg.tie_embeddings:  # some tied checkpoints still store the copy
    unknown = [n for n in unknown if n != "lm_head.weight"]
  if unknown:
    raise errors.ModelLoadError(f"{folder}: {len(unknown)} tensor(s) the {cfg.family} layout does "
                                f"not know, e.g. {unknown[:5]}.")
  missing = sorted(used - set(where))
  if missing:
    raise errors.ModelLoadError(f"{folder}: {len(missing)} tensor(s) missing, e.g. "
                                f"{missing[:5]}.")
  for what, names in skipped.items():
    print(f"calibjax: {folder}: skipped {len(names)} tensors of {what} ({names[0]}, ...); "
          "only the language model is read.", file=sys.stderr)
  for target, (names, fn) in recipes.items():
    value = fn(*(where[n].read(n) for n in names))
    if value.shape != tuple(shapes[target]):
      raise errors.ModelLoadError(
          f"{folder}: tensor {names[0]} gives {target} of shape {value.shape}, the model "
          f"expects {tuple(shapes[target])}.")
    yield target, value


def _special_ids(folder: str, key: str, tokenizer_spec: dict) -> list[int]:
  """The ids of ``key`` (``"bos_token"``, ``"eos_token"``): ``tokenizer_config.json``'s token
  first, then ``generation_config.json``'s ``<key>_id`` (one or a list), without repeats."""
  out = []
  conf = os.path.join(folder, "tokenizer_config.json")
  text = _read_json(conf).get(key) if os.path.exists(conf) else None
  text = text.get("content") if isinstance(text, dict) else text
  ids = {t["content"]: t["id"] for t in tokenizer_spec.get("added_tokens", [])}
  if text in ids:
    out.append(int(ids[text]))
  gen = os.path.join(folder, "generation_config.json")
  value = _read_json(gen).get(key + "_id") if os.path.exists(gen) else None
  for v in (value if isinstance(value, list) else [] if value is None else [value]):
    if int(v) not in out:
      out.append(int(v))
  return out


def read_tokenizer(folder: str, vocab_size: int | None = None):
  """The folder's tokenizer: ``tokenizer.json`` (``HFTokenizer``), else ``tokenizer.model``
  (``SentencePieceTokenizer``). ``vocab_size``: the model's (default: ``config.json``'s)."""
  from calibjax.models.tokenizer import HFTokenizer
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.exists(path):
    return read_sentencepiece(folder)
  spec = _read_json(path)
  if vocab_size is None:
    vocab_size = read_config(folder).vocab_size
  eos = _special_ids(folder, "eos_token", spec)
  if not eos:
    raise errors.ModelLoadError(f"{folder}: no end-of-sequence token (eos_token_id in "
                                "generation_config.json or eos_token in tokenizer_config.json).")
  bos = _special_ids(folder, "bos_token", spec)
  return HFTokenizer(path, vocab_size, eos, bos[0] if bos else None)


def read_sentencepiece(folder: str):
  """The tokenizer of ``tokenizer.model`` (pieces, scores, types and special ids)."""
  from calibjax.models.tokenizer import SentencePieceTokenizer, model_proto_class
  path = os.path.join(folder, "tokenizer.model")
  proto = model_proto_class()()
  try:
    with open(path, "rb") as f:
      proto.ParseFromString(f.read())
  except Exception as e:  # OSError, protobuf DecodeError
    raise errors.ModelLoadError(f"{path}: not a readable SentencePiece model ({e}).") from e
  ts = proto.trainer_spec
  return SentencePieceTokenizer([p.piece for p in proto.pieces],
                                np.asarray([p.score for p in proto.pieces], np.float32),
                                np.asarray([p.type for p in proto.pieces], np.int32),
                                ts.bos_id, ts.eos_id, ts.unk_id, ts.pad_id)
