"""Shared test settings: deterministic hypothesis runs (CI must not flake), CPU only, few threads."""

import os
import sys

import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(min(2, torch.get_num_threads()))
