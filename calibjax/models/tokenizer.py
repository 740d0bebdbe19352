"""The SentencePiece tokenizer of a Gemma checkpoint, rebuilt from GGUF metadata.

A BPE model from the token list, scores and types, with byte fallback, split digits, the
identity normaliser (no dummy prefix, whitespace kept, spaces escaped to "▁") and
whitespace-only pieces allowed. User-defined whitespace-run tokens are stored in GGUF with
literal spaces and are re-escaped to "▁" form. Checked against the reference tokenizer on
a golden corpus (``tests/models/test_tokenizer.py``).
"""

from __future__ import annotations

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

_BYTE, _USER, _CONTROL, _UNKNOWN, _UNUSED = 6, 4, 3, 2, 5


class Tokenizer:
  """``encode(text, add_bos=True) -> list[int]``, ``decode(ids) -> str``, ``vocab``."""

  def __init__(self, tokens: list[str], scores, types, bos: int, eos: int, unk: int, pad: int):
    proto = pb.ModelProto()
    for tok, score, kind in zip(tokens, scores, types):
      piece = proto.pieces.add()
      piece.piece = tok.replace(" ", "▁") if kind == _USER else tok
      piece.score = float(score)
      piece.type = int(kind) if int(kind) in (1, 2, 3, 4, 5, 6) else 1
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
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
    self.types = types

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ids = self._sp.encode(text)
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def __len__(self) -> int:
    return len(self.vocab)
