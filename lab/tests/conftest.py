"""The lab's tests run like the core's: CPU only, few threads, deterministic hypothesis runs."""

import atexit
import os
import shutil
import tempfile

import torch
from hypothesis import settings

# Every run's data goes through a shard set (shards.py); the tests prepare theirs into a private cache.
CACHE = tempfile.mkdtemp(prefix="trimodal-mdm-cache-")
os.environ["TRIMODAL_MDM_CACHE"] = CACHE
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)


settings.register_profile("lab", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lab"))
torch.set_num_threads(min(2, torch.get_num_threads()))
