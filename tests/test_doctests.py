"""The examples in public docstrings run."""

import doctest
import importlib

import pytest

MODULES = ["bnlab.functional", "bnlab.nn.batchnorm", "bnlab.tools.convert", "bnlab.tools.recalibrate"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
