"""Shared test settings: deterministic hypothesis runs (CI must not flake), CPU only, few threads."""

import os
import sys

import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_runtest_setup(item) -> None:
    """A test marked ``cuda`` that was selected (``-m cuda``) fails without a GPU: it never skips silently."""
    import pytest

    if "cuda" in item.keywords and not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU (torch.cuda.is_available() is False)", pytrace=False)
