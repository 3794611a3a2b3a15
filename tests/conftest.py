"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

from helpers import pattern

# Prefect (when a test uses it) keeps its state here, never in the user's home.
os.environ.setdefault("PREFECT_HOME", os.path.join(os.path.dirname(__file__), "..", ".prefect-home"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture
def images():
    """(content, style) PIL images, 64x48 and 48x64."""
    return pattern((64, 48), "content"), pattern((48, 64), "style")
