from __future__ import annotations

import contextlib
import warnings

import pytest

from iqmaild.core.facts import DirectoryView, PolicyConfig
from tests.core.world import CONFIG, DIRECTORY

# Hypothesis reports a falsifying example through libcst, whose import warns
# (mypy_extensions.TypedDict deprecation). Under ``-W error`` that warning turns a
# failing property into an INTERNALERROR that hides the example, so import it once,
# quietly, before any test runs.
with warnings.catch_warnings(), contextlib.suppress(Exception):
    warnings.simplefilter("ignore")
    import hypothesis.extra._patching  # noqa: F401


@pytest.fixture
def directory() -> DirectoryView:
    """acme (owner, tech, extra, tech-shared; acme-www, acme-mail), beta, gamma."""
    return DIRECTORY


@pytest.fixture
def policy_config() -> PolicyConfig:
    return CONFIG
