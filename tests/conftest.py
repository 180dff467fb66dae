"""Shared test settings: deterministic hypothesis runs (CI must not flake), CPU only, few threads."""

import atexit
import os
import shutil
import sys
import tempfile

import torch
from hypothesis import settings

# Every run's data goes through a shard set (shards.py); the tests prepare theirs into a private cache.
CACHE = tempfile.mkdtemp(prefix="trimodal-mdm-cache-")
os.environ["TRIMODAL_MDM_CACHE"] = CACHE
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_runtest_setup(item) -> None:
    """A test marked ``cuda`` that was selected (``-m cuda``) fails without a GPU: it never skips silently."""
    import pytest

    if "cuda" in item.keywords and not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU (torch.cuda.is_available() is False)", pytrace=False)
