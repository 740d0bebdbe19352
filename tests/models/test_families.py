"""Every model family against its reference implementation: the tiny random checkpoints of
``tests/data/families`` (made by ``experiments/peers/make_family_fixtures.py`` with
`transformers`, every tensor re-randomised) and their float32 / float64 log-probabilities over
304-token prompts (past every sliding window and scaled-RoPE range). Also: cached decoding,
the mesh, and the errors of broken checkpoints."""

import json
import os
import shutil

import numpy as np
import pytest

from calibjax import errors, models
from calibjax.models import families, hf_checkpoint
from tests.helpers import ROOT

DATA = os.path.join(ROOT, "tests", "data", "families")
VARIANTS = sorted(os.listdir(DATA))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("family-cache"))


def load(name, cache, **kw):
  return models.load(os.path.join(DATA, name), cache_dir=cache, progress=False, **kw)


def log_probs(lm, ids):
  z = np.asarray(lm.logits(ids), np.float64)[0]
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_every_family_and_variant_is_here():
  kinds = {families.read_config(json.load(open(os.path.join(DATA, v, "config.json"))), v).family
           for v in VARIANTS}
  assert kinds == set(families.FAMILIES)
  assert len(VARIANTS) == 14


@pytest.mark.parametrize("name", VARIANTS)
def test_log_probs_equal_the_reference_at_every_position(name, cache):
  """Within 1e-4 of the float32 reference, or within twice that reference's own distance
  from the float64 one (its float32 rounding), of the float64 reference."""
  ref = np.load(os.path.join(DATA, name, "reference.npz"))
  lm = load(name, cache)
  ids = ref["ids"]
  logp = log_probs(lm, ids)
  following = np.append(ids[0, 1:], 0)
  got = np.concatenate([logp[:, ref["columns"]], logp[np.arange(ids.shape[1]), following][:, None]],
                       1)
  error32 = np.abs(got - ref["float32"]).max()
  rounding = np.abs(ref["float32"] - ref["float64"]).max()
  assert error32 <= 1e-4 or np.abs(got - ref["float64"]).max() <= 2 * rounding, (
      error32, rounding)
  assert lm.tokenizer.decode(lm.tokenizer.encode("Randomly name a state", add_bos=False)) == (
      "Randomly name a state")


@pytest.mark.parametrize("name", ["llama3", "olmo3", "qwen3_moe", "gemma2"])
def test_cached_decoding_equals_the_full_forward(name, cache):
  lm = load(name, cache)
  ids = np.load(os.path.join(DATA, name, "reference.npz"))["ids"][:, :40]
  ids = np.concatenate([ids, ids[:, ::-1]])  # two rows
  want = np.asarray(lm.logits(ids))
  logits, _, kv = lm.prefill(ids[:, :30], max_new_tokens=10)
  np.testing.assert_allclose(np.asarray(logits), want[:, 29], atol=5e-5)
  for t in range(30, 40):
    logits, _, kv = lm.decode(kv, ids[:, t])
    np.testing.assert_allclose(np.asarray(logits), want[:, t], atol=5e-5)


def test_hybrid_state_survives_chunks_padding_and_decoding(cache):
  """Qwen3.5: two rows of 300 and 250 prompt tokens prefilled together (padded to a bucket of
  512: eight chunks, the shorter row right-padded), then four decoding steps each: every
  step's logits are those of each row's own unpadded full forward. Extending the 300-token
  prompt by several continuations at once gives them too."""
  lm = load("qwen35", cache)
  ids = np.load(os.path.join(DATA, "qwen35", "reference.npz"))["ids"][0]
  rows = [ids[:304], np.concatenate([ids[50:300], ids[:4]])]
  want = [np.asarray(lm.logits(r[None]))[0] for r in rows]
  lengths = (300, 250)
  prompt = np.zeros((2, 300), np.int64)
  mask = np.zeros((2, 300), bool)
  for i, n in enumerate(lengths):
    prompt[i, :n], mask[i, :n] = rows[i][:n], True
  logits, _, kv = lm.prefill(prompt, mask, max_new_tokens=4)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(logits)[i], want[i][n - 1], atol=5e-5)
  for step in range(4):
    logits, _, kv = lm.decode(kv, [rows[i][n + step] for i, n in enumerate(lengths)])
    for i, n in enumerate(lengths):
      np.testing.assert_allclose(np.asarray(logits)[i], want[i][n + step], atol=5e-5)
  _, _, prefix = lm.prefill(ids[None, :300], max_new_tokens=8)
  tails = np.array([[ids[300], ids[301], ids[302]], [ids[300], 0, 0], [7, 9, 0]])
  ext, _ = lm.extend(prefix, tails, tails > 0)
  for tail, got in zip(tails, np.asarray(ext)):
    tail = tail[tail > 0]
    full = np.asarray(lm.logits(np.concatenate([ids[:300], tail])[None]))[0, -1]
    np.testing.assert_allclose(got, full, atol=5e-5)


@pytest.mark.parametrize("name", ["qwen35_moe"])  # experts, DeltaNet, gated attention
def test_on_a_mesh_equals_one_device(name, cache, tmp_path):
  """``--mesh=data:2,model:4`` on the 8 CPU devices: the single-device numbers."""
  import jax
  from calibjax.core import sharding
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  plain = load(name, cache)
  sharded = load(name, str(tmp_path), mesh=sharding.make_mesh("data:2,model:4"))
  q = sharded._state["blocks"][0]["attn"]["q_proj"].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec("data", "model")
  ids = np.load(os.path.join(DATA, name, "reference.npz"))["ids"][:, :24].repeat(2, 0)
  np.testing.assert_allclose(sharded.logits(ids), plain.logits(ids), atol=3e-5)
  np.testing.assert_array_equal(sharded.greedy(ids, None, 5), plain.greedy(ids, None, 5))


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen35"])
def test_bfloat16_runs_every_tensor_in_bfloat16(name, cache):
  lm16 = load(name, cache, dtype="bfloat16")
  import jax
  assert {str(x.dtype) for x in jax.tree.leaves(lm16._state)} == {"bfloat16"}
  ids = np.load(os.path.join(DATA, name, "reference.npz"))["ids"][:, :32]
  l16, l32 = np.asarray(lm16.logits(ids)), np.asarray(load(name, cache).logits(ids))
  assert l16.dtype == np.float32 and np.abs(l16 - l32).max() < 0.05 * np.abs(l32).max()


def copy(name, tmp_path):
  folder = tmp_path / name
  shutil.copytree(os.path.join(DATA, name), folder)
  return folder


def rewrite(folder, change):
  """Rewrites ``model.safetensors`` with ``change(tensors)`` applied."""
  from safetensors.numpy import save_file
  f = hf_checkpoint.SafetensorsFile(str(folder / "model.safetensors"))
  tensors = {n: f.read(n) for n in f.header}
  change(tensors)
  save_file(tensors, str(folder / "model.safetensors"))


def test_broken_checkpoints_are_errors_that_name_the_tensor(tmp_path):
  cases = {
      "unknown": (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
                  r"do(es)? not know.*mlp\.extra\.weight"),
      "missing": (lambda t: t.pop("model.layers.1.self_attn.q_norm.weight"),
                  r"missing.*layers\.1\.self_attn\.q_norm\.weight"),
      "shape": (lambda t: t.update({"model.norm.weight": np.zeros(31, np.float32)}),
                r"model\.norm\.weight gives final_norm\.weight of shape \(31,\)"),
  }
  for what, (change, message) in cases.items():
    folder = copy("qwen3", tmp_path / what)
    rewrite(folder, change)
    with pytest.raises(errors.ModelLoadError, match=message):
      models.load(str(folder), cache_dir=str(tmp_path / "c"), progress=False)


def test_unsupported_architectures_and_files(tmp_path):
  folder = copy("qwen3", tmp_path)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_next"}))
  with pytest.raises(errors.ModelLoadError, match="unsupported architecture.*'qwen3_next'"):
    models.load(str(folder), cache_dir=str(tmp_path / "c"), progress=False)
  rope = {**config, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}
  (folder / "config.json").write_text(json.dumps(rope))
  with pytest.raises(errors.ModelLoadError, match="RoPE type 'longrope'"):
    models.load(str(folder), cache_dir=str(tmp_path / "c"), progress=False)
  (folder / "config.json").write_text(json.dumps(config))
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
  with pytest.raises(errors.ModelLoadError, match="past the end of the file"):
    models.load(str(folder), cache_dir=str(tmp_path / "c"), progress=False)
  sharded = copy("qwen25", tmp_path)
  os.remove(sharded / "model-00002-of-00002.safetensors")
  with pytest.raises(errors.ModelLoadError, match=r"shard\(s\) \['model-00002-of-00002"):
    models.load(str(sharded), cache_dir=str(tmp_path / "c"), progress=False)


def test_a_multimodal_config_reads_its_text_model_and_the_outer_tying():
  raw = json.load(open(os.path.join(DATA, "qwen35_moe_vl", "config.json")))
  cfg = families.read_config(raw, "vl")
  assert cfg.family == "qwen3_5_moe_text" and not cfg.tie_embeddings
  assert cfg.layer_types.count("linear_attention") == 3 and cfg.moe.shared_ffn == 40
  assert cfg.rope == (("full_attention", families.Rope(10_000.0, partial=0.25)),)
  text = {k: v for k, v in raw["text_config"].items() if k != "tie_word_embeddings"}
  tied = families.read_config({**raw, "tie_word_embeddings": True, "text_config": text}, "vl")
  assert tied.tie_embeddings
  own = families.read_config({**raw, "tie_word_embeddings": True,
                              "text_config": {**text, "tie_word_embeddings": False}}, "vl")
  assert not own.tie_embeddings  # the text model's own setting wins


def test_rope_from_legacy_and_new_config_formats_agree():
  """Llama 3's ``rope_scaling`` + ``rope_theta`` and the same as ``rope_parameters``."""
  legacy = json.load(open(os.path.join(DATA, "llama3", "config.json")))
  assert "rope_scaling" in legacy and "rope_parameters" not in legacy
  new = {k: v for k, v in legacy.items() if k not in ("rope_scaling", "rope_theta")}
  new["rope_parameters"] = {**legacy["rope_scaling"], "rope_theta": legacy["rope_theta"]}
  a, b = families.read_config(legacy, "legacy"), families.read_config(new, "new")
  assert a == b and a.rope_of(0).kind == "llama3" and a.rope_of(0).original_context == 64


def test_token_bytes_agree_with_the_tokenizers_library(cache):
  """Each byte-level token's bytes (through the byte alphabet) decode to what the
  `tokenizers` library decodes it to; special tokens and the padded rows are never text."""
  lm = load("llama3", cache)
  tok = lm.tokenizer
  tb = tok.token_bytes()
  assert len(tb) == lm.config.vocab_size == 320 and tb[300:] == [None] * 20
  assert tb[:3] == [None] * 3  # <|bos|>, <|eos|>, <|pad|>
  checked = 0
  for i, b in enumerate(tb[3:300], 3):
    try:
      text = b.decode("utf-8")
    except UnicodeDecodeError:  # a part of a multi-byte character
      continue
    assert text == tok.decode([i]), i
    checked += 1
  assert checked > 150  # the 128 lone bytes 0x80-0xFF are no UTF-8 text
  text = "Randomly name a state in US. New York, Ohio!"
  ids = tok.encode(text, add_bos=False)
  assert b"".join(tb[i] for i in ids) == text.encode()
  assert tok.encode(text)[0] == tok.bos_id == 0 and tok.eos_id == 1


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_hidden_states_and_output_embedding_give_the_logits(name, cache):
  """What the recalibration heads rely on: logits = final hidden state @ ``embedding()``ᵀ,
  with ``embedding()`` the untied ``lm_head`` (Llama 3) or the tied input embedding (Qwen3)."""
  lm = load(name, cache)
  ids = np.load(os.path.join(DATA, name, "reference.npz"))["ids"][:, :20]
  logits, hidden, _ = lm.prefill(ids, max_new_tokens=1)
  want = np.asarray(hidden, np.float64) @ np.asarray(lm.embedding(), np.float64).T
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-4)
  tied = lm.config.tie_embeddings
  assert tied == (name == "qwen3") and ("lm_head" in lm._state) == (not tied)


def test_heads_refuse_soft_capped_logits(cache):
  """Recalibration positions recompute logits as h Eᵀ: for Gemma 2's soft-capped logits that
  would be wrong, so it is an error, not a silent mismatch."""
  import jax
  from calibjax import tasks
  from calibjax.recalibration import training
  lm = load("gemma2", cache)
  with pytest.raises(errors.InputError, match="soft-caps"):
    training.keep_positions(lm, jax.random.key(0))
  with pytest.raises(errors.InputError, match="soft-caps"):
    training.task_positions(lm, tasks.load("coin_flip"))
