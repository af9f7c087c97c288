"""Shared by the plugin's tests: quadllm's own test helpers (tiny models, the character tokenizer,
stock checkpoints), loaded from the repository's tests/conftest.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def helpers():
    """The module ``tests/conftest.py`` of the repository."""
    spec = importlib.util.spec_from_file_location("quadllm_test_helpers", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("quadllm_test_helpers", module)
    spec.loader.exec_module(module)
    return module
