"""Loading: GGUF files the tests write, the Orbax cache (warm, partial, corrupt), errors."""

import os

import numpy as np
import pytest

import calibjax.models as models
from calibjax import errors
from calibjax.models import checkpoint
from calibjax.testing import tiny


@pytest.fixture()
def gguf_file(tmp_path):
  m = tiny.model(seed=4)
  path = str(tmp_path / "tiny.gguf")
  tiny.write_gguf(path, m)
  return path, m


def reference_logits(m, ids):
  import jax.numpy as jnp
  from calibjax.models.decoder import KVCache
  ids = jnp.asarray(ids)
  return np.asarray(m(ids, jnp.ones(ids.shape, bool), KVCache.empty(m.cfg, *ids.shape))[0])


IDS = np.array([[2, 40, 41, 42, 43, 260, 261, 262]])


def test_cold_then_warm_load(gguf_file, tmp_path, monkeypatch):
  path, m = gguf_file
  cache = str(tmp_path / "cache")
  lm = models.load(path, cache_dir=cache, progress=False)
  assert lm.config == m.cfg and lm.vocab == tiny.TOKENS
  np.testing.assert_allclose(np.asarray(lm.logits(IDS)), reference_logits(m, IDS), atol=2e-5)
  # the warm load restores the checkpoint and never reads the GGUF tensors
  monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("GGUF read again"))
  warm = models.load(path, cache_dir=cache, progress=False)
  np.testing.assert_array_equal(np.asarray(warm.logits(IDS)), np.asarray(lm.logits(IDS)))
  assert warm.tokenizer.encode("ab a") == lm.tokenizer.encode("ab a")


@pytest.mark.parametrize("damage", ["marker", "side_file", "state", "bit_flip"])
def test_partial_or_corrupt_cache_is_rebuilt(gguf_file, tmp_path, capsys, damage):
  path, m = gguf_file
  cache = str(tmp_path / "cache")
  models.load(path, cache_dir=cache, progress=False)
  (entry,) = os.listdir(cache)
  folder = os.path.join(cache, entry)
  if damage == "marker":
    os.remove(os.path.join(folder, "COMPLETE"))
  elif damage == "side_file":
    with open(os.path.join(folder, "config.json"), "a") as f:
      f.write(" ")
  else:  # the largest file of the Orbax state: truncated, or one bit flipped (same size)
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(folder, "state")) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
      if damage == "state":
        f.truncate(os.path.getsize(biggest) // 2)
      else:
        f.seek(os.path.getsize(biggest) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
  lm = models.load(path, cache_dir=cache, progress=False)
  err = capsys.readouterr().err
  assert "rebuilding the cache" in err
  if damage in ("state", "bit_flip"):  # found by its digest, before Orbax reads anything
    assert f"{os.path.relpath(biggest, folder)}: checksum mismatch" in err
  np.testing.assert_allclose(np.asarray(lm.logits(IDS)), reference_logits(m, IDS), atol=2e-5)
  checkpoint.load(folder, lambda files: models._abstract(m.cfg)[1])  # healthy again


def test_bad_files(tmp_path):
  m = tiny.model()
  wrong = str(tmp_path / "llama.gguf")
  tiny.write_gguf(wrong, m, arch="llama")
  with pytest.raises(errors.ModelLoadError, match="architecture 'llama'"):
    models.load(wrong, cache_dir=str(tmp_path / "c"), progress=False)
  missing = str(tmp_path / "missing.gguf")
  tiny.write_gguf(missing, m, drop="blk.3.ffn_up.weight")
  with pytest.raises(errors.ModelLoadError, match="blk.3.ffn_up.weight"):
    models.load(missing, cache_dir=str(tmp_path / "c"), progress=False)
  good = str(tmp_path / "good.gguf")
  tiny.write_gguf(good, m)
  truncated = str(tmp_path / "truncated.gguf")
  with open(good, "rb") as f, open(truncated, "wb") as g:
    g.write(f.read()[: os.path.getsize(good) // 3])
  with pytest.raises(errors.ModelLoadError, match="truncated or corrupt"):
    models.load(truncated, cache_dir=str(tmp_path / "c"), progress=False)
  with pytest.raises(errors.ModelLoadError, match="known names: gemma3-270m"):
    models.load("gemma9-1t", cache_dir=str(tmp_path / "c"))
  with pytest.raises(errors.InputError, match="dtype"):
    models.load(good, dtype="float8")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(errors.ModelLoadError, match="empty: not a model folder .no config.json"):
    models.load(str(empty), cache_dir=str(tmp_path / "c"))


def test_hugging_face_directory(tmp_path):
  """A tiny HF-format checkpoint written here: config.json, safetensors, tokenizer.model."""
  m = tiny.model(seed=6)
  folder = tmp_path / "hf"
  tiny.write_hf(str(folder), m)
  lm = models.load(str(folder), cache_dir=str(tmp_path / "cache"), progress=False)
  assert lm.config == m.cfg
  np.testing.assert_allclose(np.asarray(lm.logits(IDS)), reference_logits(m, IDS), atol=2e-5)
  assert lm.tokenizer.encode("ab a  b é") == tiny.tokenizer().encode("ab a  b é")
  (folder / "model.safetensors").write_bytes(b"\x00" * 10)
  with pytest.raises(errors.ModelLoadError, match="cannot be read"):
    models.load(str(folder), cache_dir=str(tmp_path / "cache2"), progress=False)


def test_checkpoint_round_trip_and_checksums(tmp_path):
  from flax import nnx
  m = tiny.model(seed=5)
  state = nnx.state(m)
  folder = str(tmp_path / "ckpt")
  checkpoint.save(folder, state, {"a.json": b"{}", "b.bin": b"\x00\x01"})
  restored, files = checkpoint.load(folder, lambda files: models._abstract(m.cfg)[1])
  assert files == {"a.json": b"{}", "b.bin": b"\x00\x01"}
  for x, y in zip(jax_leaves(restored), jax_leaves(state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with open(os.path.join(folder, "b.bin"), "wb") as f:
    f.write(b"\x00\x02")
  with pytest.raises(errors.CheckpointError, match="checksum"):
    checkpoint.load(folder, lambda files: models._abstract(m.cfg)[1])
  with pytest.raises(errors.CheckpointError, match="COMPLETE"):
    checkpoint.load(str(tmp_path / "nothing"), lambda files: None)


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_orbax_staging_holds_the_largest_tensor():
  """Orbax refuses a tensor larger than its staging budget: a 248,320 × 1,024 float32
  embedding (1.02 GB, Qwen3.5's vocabulary) needs 2 GB, Llama 3 8B's in float32 3 GB."""
  import jax
  import jax.numpy as jnp
  tree = lambda *shapes: [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  assert checkpoint.staging_gb(tree((10, 10))) == 1
  assert checkpoint.staging_gb(tree((248_320, 1_024), (1_024,))) == 2
  assert checkpoint.staging_gb(tree((128_256, 4_096))) == 3
  assert checkpoint.staging_gb([jax.ShapeDtypeStruct((128_256, 4_096), jnp.bfloat16)]) == 2


def test_sentencepiece_model_bytes_equal_sentencepiece_own_message():
  """calibjax declares SentencePiece's ModelProto itself (any protobuf ≥ 5); the bytes it writes
  are sentencepiece's own generated message's, field for field, and parse back through both.
  The unknown token is UNKNOWN even where the file calls it CONTROL (Gemma's GGUF does)."""
  from sentencepiece import sentencepiece_model_pb2 as pb
  from calibjax.models.tokenizer import SentencePieceTokenizer, model_proto_class
  tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "  ", "▁b"] + [f"<0x{b:02X}>" for b in range(256)]
  types = [3, 3, 3, 3, 1, 4, 1] + [6] * 256
  scores = [0.0, 0.0, 0.0, 0.0, -1.5, 0.0, -2.25] + [0.0] * 256
  mine = SentencePieceTokenizer(tokens, scores, types, bos=2, eos=1, unk=3, pad=0).model_proto
  ref = pb.ModelProto()
  for tok, score, kind in zip(tokens, scores, [3, 3, 3, 2] + types[4:]):
    ref.pieces.add(piece=tok.replace(" ", "▁") if kind == 4 else tok, score=score, type=kind)
  ref.trainer_spec.MergeFrom(pb.TrainerSpec(
      model_type=pb.TrainerSpec.BPE, vocab_size=263, split_digits=True,
      allow_whitespace_only_pieces=True, byte_fallback=True, unk_id=3, bos_id=2, eos_id=1,
      pad_id=0))
  ref.normalizer_spec.MergeFrom(pb.NormalizerSpec(
      name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      escape_whitespaces=True))
  assert mine == ref.SerializeToString()
  back = model_proto_class().FromString(ref.SerializeToString())
  assert [p.type for p in back.pieces][:8] == [3, 3, 3, 2, 1, 4, 1, 6]
  assert back.pieces[5].piece == "▁▁" and back.trainer_spec.pad_id == 0
