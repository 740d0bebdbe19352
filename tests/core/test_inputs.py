"""Host-side input checks and the shared input normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calibjax as cj
from calibjax.core import inputs


def test_check_logits_names_rows_and_tokens():
  z = np.zeros((2, 3, 5), np.float32)
  z[1, 2, 4] = np.nan
  z[0, 1, 0] = np.inf
  with pytest.raises(cj.errors.NonFiniteLogitsError) as e:
    cj.check_logits(z)
  msg = str(e.value)
  assert "row (0, 1): token 0 is inf" in msg and "row (1, 2): token 4 is nan" in msg
  assert "2 bad rows" in msg


def test_check_logits_all_neg_inf_row_and_legal_neg_inf():
  z = np.array([[0.0, -np.inf], [-np.inf, -np.inf]], np.float32)
  with pytest.raises(cj.errors.NonFiniteLogitsError, match=r"row \(1,\): every logit is -inf"):
    cj.check_logits(z)
  cj.check_logits(z[:1])  # -inf alone is legal
  assert issubclass(cj.errors.NonFiniteLogitsError, ValueError)


def test_row_finite_flag():
  z = jnp.array([[0.0, 1.0], [0.0, jnp.nan], [jnp.inf, 0.0], [-jnp.inf, -jnp.inf],
                 [-jnp.inf, 2.0]])
  np.testing.assert_array_equal(np.asarray(inputs.row_finite(z)),
                                [True, False, False, False, True])


def test_mask_broadcast_and_errors():
  m = inputs.as_mask(np.array([True, False, True]), (4, 3))
  assert m.shape == (4, 3)
  with pytest.raises(cj.errors.ShapeMismatchError, match=r"\(4,\).*\(2, 3\)"):
    inputs.as_mask(np.ones(4, bool), (2, 3))
  with pytest.raises(cj.errors.InputError, match="rank|shape"):
    inputs.as_logits(np.float32(1.0))
  with pytest.raises(cj.errors.InputError, match="dtype"):
    inputs.as_logits(np.array(["a"]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_upcast(dtype):
  z = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), dtype)
  assert inputs.as_logits(z).dtype == jnp.float32
  m = np.arange(64) % 5 == 0
  got = cj.shape_stats(z, m)
  want = cj.shape_stats(z.astype(jnp.float32), m)
  np.testing.assert_array_equal(np.asarray(got.valid_entropy), np.asarray(want.valid_entropy))


def test_capacity_buckets():
  m = np.zeros((2, 300), bool)
  m[0, :50] = True
  assert inputs.capacity(jnp.asarray(m), None) == 64
  assert inputs.capacity(jnp.asarray(m), 64) == 128  # one slot stays a +inf sentinel
  assert jax.jit(lambda m: jnp.zeros(inputs.capacity(m, None)))(m).shape == (512,)


_Z = jnp.array([[2.0, 1.0, 0.0, -1.0]])
_M = jnp.array([[True, False, True, False]])
TEMPERATURE_TAKERS = {
    "cutoff_curve": lambda t: cj.cutoff_curve(_Z, _M, jnp.array([1, 2]), t),
    "shape_stats": lambda t: cj.shape_stats(_Z, _M, temperature=t),
    "row_stats": lambda t: cj.row_stats(_Z, _M, temperature=t),
    "group_masses": lambda t: cj.group_masses(_Z, _M, jnp.array([1.0, t])),
    "truncate": lambda t: cj.truncate(_Z, "top_p", 0.9, temperature=t),
    "truncate_chain": lambda t: cj.truncate_chain(_Z, "top_k=2", temperature=t),
    "oracle_cutoff": lambda t: cj.oracle_cutoff(_Z, _M, temperature=t),
    "top_label_ece": lambda t: cj.top_label_ece(_Z, jnp.array([0]), temperature=t),
}


@pytest.mark.parametrize("name", sorted(TEMPERATURE_TAKERS))
@pytest.mark.parametrize("t", [-1.0, 0.0, float("nan"), float("inf")])
def test_every_public_function_rejects_bad_temperatures(name, t):
  """One check for all (inputs.prepare): T = -1 used to give cutoff_curve plausible wrong
  validities, T = 0 or NaN NaN results."""
  with pytest.raises(cj.errors.InputError, match="finite and > 0"):
    TEMPERATURE_TAKERS[name](t)
