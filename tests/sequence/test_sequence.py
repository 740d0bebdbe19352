"""The exact engine against a brute-force enumeration with independent pieces (a string-prefix
oracle and full forwards), on a tiny model; the accounting identity; the real model."""

import numpy as np
import pytest

from calibjax import sequence, tasks
from calibjax.core import truncation
from calibjax.testing import references as ref
from tests.helpers import TASK, small_lm

SAMPLERS = ["t=1", "top_k=3,t=0.7", "min_p=0.2,t=1.5", "top_p=0.8", "top_p=0.95", "oracle_set",
            "oracle_rank=0.9,t=1.3"]


@pytest.fixture(scope="module")
def lm():
  return small_lm()


def reference_probs(z, valid, spec):
  """p_S over the vocabulary, float64, from the NumPy reference keep mask."""
  keep = ref.truncate_chain(z, spec.rules, spec.temperature, valid)
  a = np.where(keep, ref._scaled(z, spec.temperature), -np.inf)
  p = np.exp(a - a.max())
  return p / p.sum()


def valid_mask(tok, task, text):
  """String-prefix oracle: the tokens that keep ``text`` a prefix of a full answer."""
  tb = tok.token_bytes()
  full = {(l + a + x).encode() for l in task.leading for a in task.answers for x in task.terminators}
  complete = {(l + a).encode() for l in task.leading for a in task.answers}
  prefixes = {s[:k] for s in full for k in range(1, len(s) + 1)}
  valid = np.array([b is not None and b != b"" and text + b in prefixes for b in tb])
  valid[list(tok.eos_ids)] = text in complete
  return valid


def brute_force(lm, task, sampler):
  """P_S(answer) by depth-first enumeration of every valid token sequence."""
  tok = lm.tokenizer
  tb = tok.token_bytes()
  full = {(l + a + x).encode(): i for l in task.leading for i, a in enumerate(task.answers)
          for x in task.terminators}
  complete = {(l + a).encode(): i for l in task.leading for i, a in enumerate(task.answers)}
  spec = truncation.Sampler.parse(sampler)
  out = np.zeros(len(task.answers))
  prompt = tok.encode(task.prompts[0])

  def visit(path, text, prob):
    z = np.asarray(lm.logits(np.array([prompt + path]))[0, -1], np.float32)
    valid = valid_mask(tok, task, text)
    p = reference_probs(z, valid, spec)
    for v in np.flatnonzero(valid):
      if p[v] == 0:
        continue
      if v in tok.eos_ids:
        out[complete[text]] += prob * p[v]
      elif text + tb[v] in full:
        out[full[text + tb[v]]] += prob * p[v]
      else:
        visit(path + [int(v)], text + tb[v], prob * p[v])

  visit([], b"", 1.0)
  return out


def test_exact_equals_brute_force_on_a_tiny_model(lm):
  res = sequence.exact(lm, TASK, SAMPLERS, bound=0.0, progress=False)
  assert res.bound_reached and res.nodes_expanded > 10
  assert res.samplers[0].seq_validity > 0.05  # the check has something to check
  for s, r in zip(SAMPLERS, res.samplers):
    want = brute_force(lm, TASK, s)
    np.testing.assert_allclose(r.answer_probs, want, rtol=1e-5, atol=1e-9, err_msg=s)
    assert r.seq_validity + r.invalid_mass + r.unexplored_mass == pytest.approx(1.0, abs=1e-6)
  oracle = res.samplers[SAMPLERS.index("oracle_set")]
  assert oracle.seq_validity == pytest.approx(1.0, abs=1e-6) and oracle.invalid_mass < 1e-9


def test_node_evaluator_tree_cache_and_its_fallbacks(lm):
  """The tree cache (one token per node on its ancestors' keys and values) gives the logits of
  whole paths: level by level against an evaluator that keeps nothing (``cache_bytes=0``:
  every node after the root runs its whole path); a batch holding a node and its own child
  (whose parent has not run) runs whole paths; the cap on kept bytes holds."""
  from calibjax.sequence.tree import NodeEvaluator, Tree
  tree = Tree(TASK, lm.tokenizer)
  prompt = lm.tokenizer.encode(TASK.prompts[0])
  cached = NodeEvaluator(lm, prompt, tree, batch_size=4)
  plain = NodeEvaluator(lm, prompt, tree, batch_size=4, cache_bytes=0)
  calls = {"branch": 0}
  branch = lm.branch

  def counted(*args):
    calls["branch"] += 1
    return branch(*args)
  lm.branch = counted
  try:
    level = [tree.root(np.ones(1))]
    for depth in range(2):
      got, _, valid = cached.forward(level)
      want, _, want_valid = plain.forward(level)
      np.testing.assert_allclose(np.asarray(got)[:len(level)], np.asarray(want)[:len(level)],
                                 atol=3e-5, err_msg=f"depth {depth}")
      np.testing.assert_array_equal(valid, want_valid)
      level = [tree.child(node, v, node.mass) for node, m in zip(level, valid)
               for v in np.flatnonzero(m) if v not in tree.eos_ids][:4]
    assert calls["branch"] == 2 + 1  # the cached evaluator's two levels, the plain's root
    assert plain.kept_bytes == 0 and len(plain.own_kv) == 0
    # a node not run yet (its parent ran) and its child
    node, v = next((n, v) for n in level for v in np.flatnonzero(tree.valid_mask(n))
                   if v not in tree.eos_ids)
    mixed = [node, tree.child(node, v, node.mass)]
    got, _, _ = cached.forward(mixed)
    assert calls["branch"] == 3  # whole paths
    assert 0 < cached.kept_bytes == sum(x.nbytes for x in cached.own_kv.values())
    for row, n in enumerate(mixed):
      full = np.asarray(lm.logits(np.array([prompt + list(n.path)])))[0, -1]
      np.testing.assert_allclose(np.asarray(got)[row], full, atol=3e-5)
  finally:
    del lm.branch


def test_compounding_along_canonical_paths(lm):
  """Per-step validity along each answer's canonical path (" " + answer + "\\n") equals the
  reference sampler's valid mass at each prefix; path_validity is their product."""
  res = sequence.exact(lm, TASK, SAMPLERS[:3], bound=0.2, progress=False)  # some prefixes unexpanded
  tok = lm.tokenizer
  prompt = tok.encode(TASK.prompts[0])
  for path, answer in zip(res.canonical_paths, TASK.answers):
    assert path == tuple(tok.encode(" " + answer + "\n", add_bos=False))
  for k, s in enumerate(SAMPLERS[:3]):
    spec = truncation.Sampler.parse(s)
    r = res.samplers[k]
    for i, path in enumerate(res.canonical_paths):
      want = []
      for j in range(len(path)):
        z = np.asarray(lm.logits(np.array([prompt + list(path[:j])]))[0, -1], np.float32)
        valid = valid_mask(tok, TASK, "".join(tok.vocab[t] for t in path[:j]).encode())
        want.append(reference_probs(z, valid, spec)[valid].sum())
      np.testing.assert_allclose(r.step_validity[i], want, rtol=1e-5, err_msg=(s, i))
      assert r.path_validity[i] == pytest.approx(np.prod(want), rel=1e-5)


def test_bound_and_metrics(lm):
  res = sequence.exact(lm, TASK, ["t=1"], bound=0.05, progress=False)
  r = res.samplers[0]
  assert r.unexplored_mass <= 0.05 and res.bound_reached
  assert r.seq_validity + r.invalid_mass + r.unexplored_mass == pytest.approx(1.0, abs=1e-6)
  p = r.answer_probs
  assert r.coverage[1] == pytest.approx(p.sum() / 4)
  assert r.coverage[10] == pytest.approx(np.sum(1 - (1 - p) ** 10) / 4)
  cond = p / p.sum()
  nz = cond[cond > 0]
  assert r.entropy == pytest.approx(-np.sum(nz * np.log(nz)))
  if (cond > 0).all():
    assert r.kl_to_target == pytest.approx(np.sum(np.log((1 / 4) / cond)) / 4)
  else:
    assert r.kl_to_target == np.inf


PACKAGED = ["t=1", "top_k=2,t=1.5", "oracle_rank=0.95,t=2"]  # the second truncates heavily


@pytest.mark.parametrize("task_name,samplers", [
    pytest.param("weekdays", PACKAGED[1:2], marks=pytest.mark.slow),
    pytest.param("coin_flip", PACKAGED, marks=pytest.mark.slow),
    pytest.param("weekdays", PACKAGED[::2], marks=pytest.mark.slow),
    pytest.param("integers_1_20", PACKAGED, marks=pytest.mark.slow)])
def test_packaged_model_monte_carlo_agrees_with_exact(gemma, task_name, samplers):
  """Exact values inside the Monte Carlo intervals: seq_validity at 99.9%, each answer's
  probability at 1 − 0.001/|A| (Bonferroni over the answers). Under ``-m slow`` only (the
  largest test: ~95 s of CI's 8 minutes); the tiny model checks every sampler kind in CI."""
  import jax
  task = tasks.load(task_name)
  res = sequence.exact(gemma, task, samplers, bound=1e-3, progress=False)
  n = 600
  for s, r in zip(samplers, res.samplers):
    assert r.seq_validity + r.invalid_mass + r.unexplored_mass == pytest.approx(1.0, abs=1e-5)
    assert r.unexplored_mass <= 1e-3 and res.bound_reached
    mc = sequence.sample(gemma, task, s, n, jax.random.key(PACKAGED.index(s)), confidence=0.999,
                         batch_size=300, progress=False)
    lo, hi = mc.seq_validity_ci
    assert lo - 1e-3 <= r.seq_validity <= hi + 1e-3, (s, r.seq_validity, mc.seq_validity_ci)
    ci = sequence.wilson(mc.counts, n, 1 - 0.001 / len(task.answers))
    for a, p in enumerate(r.answer_probs):
      assert ci[a, 0] - 1e-3 <= p <= ci[a, 1] + 1e-3, (s, task.answers[a], p, ci[a])


@pytest.mark.parametrize("sampler", ["t=1", "top_k=3,t=0.7", "min_p=0.2,t=1.5", "oracle_set,t=1.5",
                                     "oracle_rank=0.9"])
def test_monte_carlo_agrees_with_exact(lm, sampler):
  import jax
  exact = sequence.exact(lm, TASK, [sampler], bound=0.0, progress=False).samplers[0]
  assert exact.seq_validity > 0.05
  mc = sequence.sample(lm, TASK, sampler, 3000, jax.random.key(0), max_new_tokens=8,
                       batch_size=1000, confidence=0.999)
  assert len(mc.texts) == 3000 and set(mc.reason) <= {"valid", "wrong", "early_eos",
                                                       "no_terminator"}
  assert mc.coverage == np.count_nonzero(mc.counts) / len(TASK.answers)
  # coverage@10: the mean over 300 disjoint groups of 10 samples of (distinct answers / |A|)
  # against the exact expectation, within 4 standard errors (the spread at least that of one
  # group differing by one answer: all 300 groups can be alike when one count dominates)
  groups = mc.answer.reshape(300, 10)
  cov = np.array([len(set(g[g >= 0].tolist())) / len(TASK.answers) for g in groups])
  exact10 = sequence.exact(lm, TASK, [sampler], bound=0.0, coverage_n=(10,),
                           progress=False).samplers[0].coverage[10]
  spread = max(cov.std(), 1 / len(TASK.answers) / np.sqrt(300))
  assert abs(cov.mean() - exact10) <= 4 * spread / np.sqrt(300), (cov.mean(), exact10)
  lo, hi = mc.seq_validity_ci  # exact values carry float32 rounding (~1e-7)
  assert lo - 1e-6 <= exact.seq_validity <= hi + 1e-6, (exact.seq_validity, mc.seq_validity_ci)
  for a, (p, (lo, hi)) in enumerate(zip(exact.answer_probs, mc.answer_ci)):
    assert lo - 1e-6 <= p <= hi + 1e-6, (TASK.answers[a], p, lo, hi)
  # the same key gives the same samples, another key other ones
  run = lambda seed: sequence.sample(lm, TASK, sampler, 40, jax.random.key(seed),
                                     max_new_tokens=8).texts
  assert run(1) == run(1) and run(1) != run(2)


def test_wilson_interval_hand_values():
  lo, hi = sequence.wilson(5, 10, 0.95)
  assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
  assert tuple(sequence.wilson(0, 20, 0.95)) == pytest.approx((0.0, 0.1611), abs=1e-4)


@pytest.mark.parametrize("name", ["qwen3", "qwen35_moe"])
def test_exact_equals_brute_force_on_a_byte_level_family(name, tmp_path):
  """The same on tiny random checkpoints (``tests/data/families``): byte-level BPE tokens, a
  padded vocabulary (320 rows, 300 tokens), no BOS; Qwen3, and the Qwen3.5 hybrid (every
  node extends the prompt's recurrent states)."""
  import os
  from calibjax import models
  from tests.helpers import ROOT
  lm = models.load(os.path.join(ROOT, "tests", "data", "families", name),
                   cache_dir=str(tmp_path), progress=False)
  out = lm._state["embed" if lm.config.tie_embeddings else "lm_head"]
  out.set_value(out.get_value() * 0.1)  # moderate logits (as small_lm): answers get real mass
  task = tasks.from_dict({"name": "states", "description": "", "prompts": ["Answer:"],
                          "answers": ["Ohio", "Texas", "Utah"], "terminators": ["\n", "."]})
  samplers = ["t=1", "top_k=40", "min_p=0.5,t=1.5"]
  res = sequence.exact(lm, task, samplers, bound=1e-30, progress=False)
  assert res.bound_reached and res.nodes_expanded > 5
  # a random model: the answers are rare (~1e-12), so they are compared relatively
  assert (res.samplers[0].answer_probs > 1e-16).all()
  for s, r in zip(samplers, res.samplers):
    np.testing.assert_allclose(r.answer_probs, brute_force(lm, task, s), rtol=1e-5, atol=1e-28,
                               err_msg=s)


def _engine_pass_equals_truncate_chain(z, m, specs, cap):
  """The engine's grouped pass against :func:`calibjax.truncate_chain`, sampler by sampler
  (single rules through :func:`calibjax.truncate` with all of a rule's values at one
  temperature as one sweep, which equals ``truncate_chain`` value by value: one compile per
  rule and temperature)."""
  import types
  import jax.numpy as jnp
  import calibjax as cj
  from calibjax.core.rules import RULES
  from calibjax.sequence.probabilities import ValidTokenProbs
  nodes = [types.SimpleNamespace(text=f"row {b}".encode(), path=()) for b in range(len(z))]
  idx, probs, invalid = ValidTokenProbs(specs)(jnp.asarray(z), m, nodes)
  assert idx.shape[1] == cap
  parsed = [cj.Sampler.parse(spec) for spec in specs]
  sweeps: dict = {}
  for k, s in enumerate(parsed):
    if len(s.rules) == 1 and s.rules[0][0] in RULES:
      sweeps.setdefault((s.rules[0][0], s.temperature), []).append(k)
  kept = {}
  for (rule, t), members in sweeps.items():
    tr = cj.truncate(z, rule, cj.sweep([parsed[k].rules[0][1] for k in members]),
                     temperature=t, valid_mask=m)
    for j, k in enumerate(members):
      kept[k] = (tr.keep[j], tr.kept_mass[j], tr.validity[j])
  for k, spec in enumerate(specs):
    if k not in kept:
      tr = cj.truncate_chain(z, spec, valid_mask=m, max_valid=cap)
      kept[k] = (tr.keep, tr.kept_mass, tr.validity)
    keep, kept_mass, validity = map(np.asarray, kept[k])
    a = z.astype(np.float64) / parsed[k].temperature
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.where(keep, p, 0.0) / kept_mass.astype(np.float64)[:, None]
    for b in range(len(z)):
      ids = idx[b][idx[b] >= 0]
      np.testing.assert_allclose(probs[k, b, :len(ids)], want[b, ids], rtol=2e-5, atol=1e-7,
                                 err_msg=f"{spec} row {b}")
    np.testing.assert_allclose(invalid[k], 1.0 - validity, atol=2e-6, err_msg=spec)


def test_engine_pass_equals_truncate_chain_per_sampler():
  """The engine's grouped pass (one sweep per rule and temperature, oracle_rank's τ sharing one
  valid-rank count, the logit-score rules' cuts sharing one pass) against
  :func:`calibjax.truncate_chain` one sampler at a time, on rows whose valid count is exactly
  the capacity (8), one less, one more (a capacity of 16) and a single token (a tree node
  always has one); a −inf logit, ties among the valid ones, ties made by rounding z / T."""
  from calibjax.core.rules import REGISTRY
  rng = np.random.default_rng(5)
  counts = [8, 7, 9, 1, 2, 8]
  z = (rng.standard_normal((len(counts), 3001)) * 3).astype(np.float32)
  m = np.zeros(z.shape, bool)
  for b, n in enumerate(counts):
    m[b, rng.choice(z.shape[1], n, replace=False)] = True
    z[b, m[b]] += 4
  z[0, np.flatnonzero(m[0])[:3]] = z[0, np.flatnonzero(m[0])[0]]  # tied valid logits
  z[1, 5] = -np.inf
  specs = [f"{name}={v:g},t={t}" for name, r in REGISTRY.items() if r.sequence
           for v in (r.sequence[0], r.sequence[-1]) for t in (1, 1.3)] + [
               "oracle_set,t=1.3", "top_k=3,top_p=0.9",  # one compile each in truncate_chain
               "top_p=0.8,t=0.7"]  # row 5: two logits whose z / 0.7 round to one float32
  # (XLA's z · (1/0.7) made them differ: the engine kept 24 tokens, truncate and NumPy 25)
  _engine_pass_equals_truncate_chain(z, m, specs, 16)


def test_kth_largest_equals_the_radix_selection():
  """``top_k``'s cut from the row's largest values (blocked ``top_k``) equals
  :func:`calibjax.core.rules.select_value`'s on counts: ties at the cut, −inf logits, more
  k than alive tokens, k past the vocabulary."""
  import jax
  import jax.numpy as jnp
  from calibjax.core.rules import select_value
  from calibjax.sequence.probabilities import kth_largest
  rng = np.random.default_rng(11)
  z = rng.integers(-40, 40, (4, 20_000)).astype(np.float32) / 4  # many ties
  z[1, rng.random(20_000) < 0.99] = -np.inf  # ~200 alive tokens
  z[2, :] = -np.inf
  z[2, :3] = (1.0, 1.0, -2.0)
  z[3, :40] = 30.0  # 40 tied at the top
  ks = (1, 2, 3, 5, 39, 40, 41, 70, 300)
  for b, row in enumerate(jnp.asarray(z)):
    alive = row > -jnp.inf
    want = select_value(row, alive.astype(jnp.float32), jnp.asarray(ks, jnp.float32), alive)[0]
    got = jax.jit(lambda r: kth_largest(r, r > -jnp.inf, ks))(row)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"row {b}")
  small = jnp.asarray(z[0, :100])
  got = kth_largest(small, small > -jnp.inf, (1, 100, 101, 5000))
  np.testing.assert_array_equal(np.asarray(got)[1:], np.full(3, np.float32(z[0, :100].min())))


def carried_cut_case():
  """Rows where an ulp of z / T decides whether the top token is kept (see below)."""
  rng = np.random.default_rng(0)
  z = (rng.standard_normal((32, 3001)) * 3).astype(np.float32)
  m = np.zeros(z.shape, bool)
  m[:, :4] = True
  m[np.arange(32), z.argmax(1)] = True
  specs = [f"{rule}={v},t={t}" for rule, values in (("epsilon", (0.5, 0.9)), ("eta", (0.5, 0.9)),
                                                    ("min_p", (0.9, 1.0)))
           for v in values for t in (0.7, 1.3, 0.9, 1.7)]
  _engine_pass_equals_truncate_chain(z, m, specs, 8)


def test_cuts_carried_to_the_logit_keep_the_top_token():
  """Regression: XLA computed z / T in one fusion as z · (1/T), an ulp off the division in
  another, so a cut clamped to the top token's score, carried to a, fell above that token's
  a: nothing kept, NaN probabilities (``epsilon=0.5,t=0.7`` on the first of these rows whose
  top token has p < 0.5; seen in the frontier binary). Run at XLA's default optimisation
  level in a fresh process: the tests' ``--xla_backend_optimization_level=0`` never makes
  that product."""
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run([sys.executable, "-c", "from tests.sequence.test_sequence import "
                        "carried_cut_case; carried_cut_case()"], env=env, capture_output=True,
                       text=True, cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
  assert run.returncode == 0, run.stderr[-3000:]


def test_monte_carlo_draws_equal_the_keep_mask_draws():
  """:func:`monte_carlo.next_tokens` cuts a single logit-score rule on ``a`` and draws from it
  without a keep mask: the same draws as ``categorical`` over :func:`calibjax.truncate_chain`'s
  keep mask, for every such rule (edge values included, T ≠ 1), and only kept tokens."""
  import jax
  import jax.numpy as jnp
  import calibjax as cj
  from calibjax.core import sampling
  from calibjax.sequence.monte_carlo import next_tokens
  rng = np.random.default_rng(8)
  z = jnp.asarray((rng.standard_normal((64, 3001)) * 3).astype(np.float32))
  key = jax.random.key(2)
  for spec in ("top_k=1,t=0.7", "top_k=40,t=1.3", "top_p=0.5,t=0.7", "top_p=0.99,t=1.3",
               "min_p=0.2,t=0.7", "epsilon=0.001,t=1.3", "eta=0.01,t=0.7",
               "top_n_sigma=1,t=1.3", "top_p=1"):
    s = cj.Sampler.parse(spec)
    keep = cj.truncate_chain(z, s).keep
    want = sampling.categorical(key, jnp.where(keep, z / s.temperature, -jnp.inf))
    got = next_tokens(key, z, None, s)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=spec)
    assert np.asarray(keep)[np.arange(64), np.asarray(got)].all(), spec
