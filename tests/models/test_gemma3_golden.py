"""The packaged Gemma 3 270M against the PyTorch reference (`transformers`) on the same GGUF.

`tests/data/gemma3_golden.npz` was made by `experiments/peers/torch_gemma3.py golden` (see
BUILD_NOTES.md): for 6 prompts (one of 963 tokens, past the 512-token sliding window) the
reference's top-100 next tokens at every position with their log-probabilities computed in
float64 and in float32, and the reference tokenizer's ids for a mixed corpus.
"""

import os

import numpy as np
import pytest
from flax import nnx

from calibjax.models import LanguageModel, gemma3


DATA = np.load(os.path.join(os.path.dirname(__file__), os.pardir, "data", "gemma3_golden.npz"))
PROMPTS = sorted({k.split("/")[0] for k in DATA.files if k.startswith("prompt")})
CORPUS = sorted({k.split("/")[0] for k in DATA.files if k.startswith("corpus")})


@pytest.fixture(scope="module")
def lm(gemma):
  return gemma


def test_tokenizer_matches_the_reference(lm):
  assert len(CORPUS) == 15
  for c in CORPUS:
    text = str(DATA[f"{c}/text"])
    assert lm.tokenizer.encode(text, add_bos=False) == DATA[f"{c}/ids"].tolist(), repr(text)
    assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text, repr(text)
  assert lm.tokenizer.encode("Hi")[0] == 2 and len(lm.vocab) == 262144


def test_prompts_tokenize_like_the_reference(lm):
  for p in PROMPTS:
    assert lm.tokenizer.encode(str(DATA[f"{p}/text"])) == DATA[f"{p}/ids"].tolist(), p


def test_log_probabilities_match_the_reference(lm):
  """max |Δ log p| over the reference's top-100 tokens, and the argmax, at every position.

  Within the 512-token sliding window calibjax meets 2e-3 against both the float32 and the
  float64 reference (measured 1.7e-4). Past it, on the 963-token prompt, a few positions with
  a peaked distribution (the 100th token near log p = -20) reach 2.85e-3 against the float32
  reference and 4.7e-3 against the float64 one: one RoPE inverse frequency differs by one
  float32 ulp between calibjax's (correctly rounded) and PyTorch's pow, and those positions
  amplify it (with the reference's table: 4.1e-4, next test). Past the window the bound is
  5e-3; the argmax must agree everywhere.
  """
  for p in PROMPTS:
    ids = DATA[f"{p}/ids"]
    logp = _log_probs(lm, ids)
    mine = np.take_along_axis(logp, DATA[f"{p}/top_ids"], -1)
    np.testing.assert_array_equal(logp.argmax(-1), DATA[f"{p}/top_ids"][:, 0], err_msg=p)
    for ref in ("top_logp64", "top_logp32"):
      err = np.abs(mine - DATA[f"{p}/{ref}"]).max(-1)
      assert err[:512].max() <= 2e-3, (p, ref, err[:512].max())
      if len(err) > 512:
        assert err[512:].max() <= 5e-3, (p, ref, err[512:].max())


def _log_probs(lm, ids):
  z = np.asarray(lm.logits(ids[None])[0], np.float64)
  top = z.max(-1, keepdims=True)
  return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def test_past_the_window_only_the_reference_rope_rounding_differs(lm, monkeypatch):
  """With the reference's RoPE table — PyTorch's float32 ``pow`` returns 10000^(222/256) =
  1e6^(148/256) = 2942.727 one ulp below the correctly rounded 2942.7273 that calibjax uses —
  calibjax meets the 2e-3 bound at every position of the 963-token prompt against the float32
  reference."""
  correct = gemma3.inv_freq

  def reference_table(base, hd):
    powers = np.float32(base) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd))
    if hd == 256:
      i = {1e4: 111, 1e6: 74}[base]
      powers[i] = np.nextafter(powers[i], np.float32(0))
    return np.float32(1) / powers

  assert np.sum(reference_table(1e4, 256) != correct(1e4, 256)) == 1
  monkeypatch.setattr(gemma3, "inv_freq", reference_table)
  twin = LanguageModel(nnx.merge(lm._graph, lm._state), lm.tokenizer, "reference-rope")
  ids = DATA["prompt5/ids"]
  mine = np.take_along_axis(_log_probs(twin, ids), DATA["prompt5/top_ids"], -1)
  err = np.abs(mine - DATA["prompt5/top_logp32"]).max(-1)
  assert err.max() <= 2e-3, err.max()


def test_cached_decoding_equals_full_forward(lm):
  ids = DATA["prompt0/ids"]
  full = np.asarray(lm.logits(ids[None])[0])
  logits, _, cache = lm.prefill(ids[None, :5], max_new_tokens=8)
  np.testing.assert_allclose(np.asarray(logits[0]), full[4], atol=2e-4)
  for t in range(5, len(ids)):
    logits, _, cache = lm.decode(cache, ids[t:t + 1])
    np.testing.assert_allclose(np.asarray(logits[0]), full[t], atol=2e-4)
