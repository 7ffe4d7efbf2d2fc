"""Helpers for the lab tests: a results store that synthesizes results from a function."""

import pytest

from bnlab.lab.config import Context


class SyntheticResults:
    """Answers ``get(config)`` with ``make(config)``: synthetic result sets for decide()."""

    def __init__(self, make):
        self.make = make

    def get(self, config):
        return self.make(config)

    def __contains__(self, config):
        return True


def context(module, profile="quick", seeds=None):
    settings = module.PROFILES[profile]
    return Context(profile=profile, seeds=list(seeds or settings["seeds"]), settings=settings, workers=2)


@pytest.fixture
def synthetic():
    return SyntheticResults
