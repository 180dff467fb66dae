"""The lab's tests run like the core's: CPU only, few threads, deterministic hypothesis runs."""

import os

import torch
from hypothesis import settings

settings.register_profile("lab", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lab"))
torch.set_num_threads(min(2, torch.get_num_threads()))
