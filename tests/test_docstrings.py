"""The examples in the public docstrings run and print what they say."""

import doctest

import pytest

import calibjax
from calibjax.core import calibration, inputs, oracle, order, shape, truncation

MODULES = [calibration, inputs, oracle, order, shape, truncation]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           extraglobs={"calibjax": calibjax})
  assert result.attempted > 0
  assert result.failed == 0
