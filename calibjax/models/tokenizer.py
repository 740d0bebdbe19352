"""Tokenizers: SentencePiece (a Gemma GGUF file's metadata, or a ``tokenizer.model``) and a
Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library.

Both give ``encode(text, add_bos=True) -> list[int]``, ``decode(ids) -> str``, ``vocab``
(token strings, as long as the model's vocabulary), ``bos_id``, ``eos_id`` and
``token_bytes()``: each token's exact bytes for the validity masks (None for a token that is
never text: control, special, unused, or past the tokenizer's end).

SentencePiece: a BPE model from the token list, scores and types, with byte fallback, split
digits, the identity normaliser (no dummy prefix, whitespace kept, spaces escaped to "▁") and
whitespace-only pieces allowed. User-defined whitespace-run tokens are stored in GGUF with
literal spaces and are re-escaped to "▁" form. Checked against the reference tokenizer on a
golden corpus (``tests/models/test_tokenizer.py``).
"""

from __future__ import annotations

import functools
import json

import numpy as np

from calibjax import errors

_BYTE, _USER, _CONTROL, _UNKNOWN, _UNUSED = 6, 4, 3, 2, 5
_SKIP_TYPES = (_UNKNOWN, _CONTROL, _UNUSED)  # never produced as text
_BPE = 2  # TrainerSpec.ModelType


@functools.cache
def model_proto_class():
  """SentencePiece's ``ModelProto`` message (``tokenizer.model``), with the fields calibjax
  reads and writes (others are kept as unknown fields when parsing), declared through
  protobuf's descriptor API with sentencepiece's field numbers. Not sentencepiece's generated
  ``sentencepiece_model_pb2``: the one in sentencepiece 0.2.3 runs only on protobuf 7, which
  would force protobuf 7 on every user (and 0.2.0–0.2.2's on nothing newer than its build);
  this works on any protobuf ≥ 5. Enums are declared as int32 (the same varint on the wire).
  Tested byte for byte against ``sentencepiece_model_pb2``."""
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  field = descriptor_pb2.FieldDescriptorProto
  kinds = {"string": field.TYPE_STRING, "float": field.TYPE_FLOAT, "int32": field.TYPE_INT32,
           "bool": field.TYPE_BOOL}
  file = descriptor_pb2.FileDescriptorProto(name="calibjax/sentencepiece_model.proto",
                                            package="calibjax.sentencepiece", syntax="proto2")
  for name, fields in (
      ("SentencePiece", [("piece", 1, "string"), ("score", 2, "float"), ("type", 3, "int32")]),
      ("TrainerSpec", [("model_type", 3, "int32"), ("vocab_size", 4, "int32"),
                       ("split_digits", 25, "bool"), ("allow_whitespace_only_pieces", 26, "bool"),
                       ("byte_fallback", 35, "bool"), ("unk_id", 40, "int32"),
                       ("bos_id", 41, "int32"), ("eos_id", 42, "int32"), ("pad_id", 43, "int32")]),
      ("NormalizerSpec", [("name", 1, "string"), ("add_dummy_prefix", 3, "bool"),
                          ("remove_extra_whitespaces", 4, "bool"),
                          ("escape_whitespaces", 5, "bool")]),
      ("ModelProto", [("pieces", 1, ".calibjax.sentencepiece.SentencePiece"),
                      ("trainer_spec", 2, ".calibjax.sentencepiece.TrainerSpec"),
                      ("normalizer_spec", 3, ".calibjax.sentencepiece.NormalizerSpec")])):
    message = file.message_type.add(name=name)
    for fname, number, kind in fields:
      f = message.field.add(name=fname, number=number, label=field.LABEL_OPTIONAL)
      if kind in kinds:
        f.type = kinds[kind]
      else:
        f.type, f.type_name = field.TYPE_MESSAGE, kind
    if name == "ModelProto":
      message.field[0].label = field.LABEL_REPEATED
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName(
      "calibjax.sentencepiece.ModelProto"))


def piece_bytes(piece: str, byte_fallback: bool = True) -> bytes:
  """A SentencePiece-style token's bytes: ``<0xAB>`` is that byte, ``▁`` a space."""
  if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
    return bytes([int(piece[3:5], 16)])
  return piece.replace("▁", " ").encode("utf-8")


class SentencePieceTokenizer:
  """The SentencePiece tokenizer of a Gemma checkpoint (see the module docstring)."""

  def __init__(self, tokens: list[str], scores, types, bos: int, eos: int, unk: int, pad: int):
    import sentencepiece as spm
    proto = model_proto_class()()
    for i, (tok, score, kind) in enumerate(zip(tokens, scores, types)):
      piece = proto.pieces.add()
      piece.piece = tok.replace(" ", "▁") if kind == _USER else tok
      piece.score = float(score)
      # the unknown token is UNKNOWN whatever the file says (Gemma's GGUF marks it CONTROL;
      # SentencePiece before 0.2.3 refuses a model without an UNKNOWN piece)
      piece.type = _UNKNOWN if i == unk else int(kind) if int(kind) in (1, 2, 3, 4, 5, 6) else 1
    ts = proto.trainer_spec
    ts.model_type = _BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk, bos, eos, pad
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    self.model_proto = proto.SerializeToString()  # a SentencePiece `tokenizer.model`
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.vocab = list(tokens)
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos, eos, pad, unk
    self.eos_ids = (eos,)
    self.types = np.asarray(types)
    self.scores = np.asarray(scores, np.float32)

  def fields(self) -> dict:
    """The constructor's arguments as JSON-able values."""
    return dict(tokens=self.vocab, scores=self.scores.tolist(), types=self.types.tolist(),
                bos=self.bos_id, eos=self.eos_id, unk=self.unk_id, pad=self.pad_id)

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ids = self._sp.encode(text)
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  @functools.cache
  def token_bytes(self) -> list[bytes | None]:
    return [None if int(kind) in _SKIP_TYPES else piece_bytes(tok, int(kind) == _BYTE)
            for tok, kind in zip(self.vocab, self.types)]

  def __len__(self) -> int:
    return len(self.vocab)


@functools.cache
def _byte_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def _uses(node, kind: str) -> bool:
  """Whether a tokenizer.json component (or a Sequence of them) is of ``kind``."""
  if isinstance(node, dict):
    return node.get("type") == kind or any(_uses(v, kind) for v in node.values())
  if isinstance(node, list):
    return any(_uses(v, kind) for v in node)
  return False


class HFTokenizer:
  """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library: byte-level BPE
  (Llama 3, Qwen, Olmo) or SentencePiece-style (``▁`` and ``<0xAB>`` byte-fallback pieces:
  Gemma, Mistral). ``encode(text, add_bos=True)`` adds the special tokens the file's
  post-processor adds (Llama's and Gemma's BOS; none for Qwen), ``add_bos=False`` none.

  Args:
    path: the ``tokenizer.json``.
    vocab_size: the model's vocabulary (embedding rows; often more than the tokenizer's).
    eos_ids: the end-of-sequence ids (``generation_config.json`` / ``tokenizer_config.json``;
      instruct models often have several, e.g. Llama 3.1's ``<|eot_id|>`` and
      ``<|end_of_text|>``: each ends an answer); ``eos_id`` is the first.
    bos_id: the beginning-of-sequence id, None when the model has none.
  """

  def __init__(self, path: str, vocab_size: int, eos_ids, bos_id: int | None):
    from tokenizers import Tokenizer as Backend
    try:
      with open(path, encoding="utf-8") as f:
        spec = json.load(f)
      self._tok = Backend.from_str(json.dumps(spec))
    except Exception as e:  # OSError, JSON, the library's own errors
      raise errors.ModelLoadError(f"{path}: not a readable tokenizer.json ({e}).") from e
    n = self._tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
      raise errors.ModelLoadError(f"{path}: {n} tokens, more than the model's {vocab_size} "
                                  "embedding rows.")
    self.vocab = [self._tok.id_to_token(i) or "" for i in range(n)] + [""] * (vocab_size - n)
    self.special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    self.added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    self.byte_level = _uses(spec.get("decoder"), "ByteLevel") or _uses(
        spec.get("pre_tokenizer"), "ByteLevel")
    self.byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    self.size = n
    self.eos_ids = tuple(int(e) for e in eos_ids)
    self.eos_id, self.bos_id = self.eos_ids[0], bos_id

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_bos).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  @functools.cache
  def token_bytes(self) -> list[bytes | None]:
    table = _byte_decoder()
    out = []
    for i, tok in enumerate(self.vocab):
      if i >= self.size or i in self.special:
        out.append(None)
      elif i in self.added:  # added (non-special) tokens are stored as text
        out.append(self.added[i].encode("utf-8"))
      elif self.byte_level:
        out.append(bytes(table[c] for c in tok) if all(c in table for c in tok) else None)
      else:
        out.append(piece_bytes(tok, self.byte_fallback))
    return out

  def __len__(self) -> int:
    return len(self.vocab)
