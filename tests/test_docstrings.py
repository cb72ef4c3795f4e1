"""The `Example:` sections of the public docstrings run and print what they say."""

import doctest

import pytest

from keras_label_relax import losses


@pytest.mark.parametrize("module", [losses], ids=lambda module: module.__name__)
def test_docstring_examples(module):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
