"""Every lab command starts from the repository root (``python -m lab.<tool>``); the cheap ones run for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bpe

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)


TOOLS = [
    "bench",
    "studies",
    "diagnostics",
    "tokenizers",
    "make_spoken_digits",
    "captioning",
    "seeds",
    "module_search",
    "tokenizer_study",
    "shard_bench",
]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_lab_command_starts_and_explains_itself(tool: str) -> None:
    done = lab(f"lab.{tool}", "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_the_bpe_command_reproduces_the_committed_tokenizer(tmp_path: Path) -> None:
    done = lab("lab.tokenizers", "train-bpe", "--vocab", "1024", "--out", str(tmp_path / "bpe.tiktoken"))
    assert done.returncode == 0, done.stderr
    committed = bpe.TextTokenizer.load(ROOT / "assets" / "text_bpe_1024.tiktoken")
    assert bpe.TextTokenizer.load(tmp_path / "bpe.tiktoken").ranks == committed.ranks


def test_the_sde_toy_prints_its_distances() -> None:
    done = lab("lab.sde_toy")
    assert done.returncode == 0 and "with the rule" in done.stdout and "B =  128" in done.stdout, done.stderr


def test_the_gpu_check_stops_at_once_on_a_machine_without_cuda(tmp_path: Path) -> None:
    """On a CPU, lab/gpu_check.sh exits non-zero with one line naming CUDA, and writes nothing."""
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "lab/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "needs a CUDA GPU" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_shard_benchmark_runs_on_a_small_set(tmp_path: Path) -> None:
    """The benchmark's pipeline end to end on a 10 MB set: a replicated stream, the loader, two measured runs."""
    done = lab("lab.shard_bench", "--gb", "0.01", "--steps", "2", "--loader_steps", "5", "--work", str(tmp_path / "w"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| replicated | 0.01 GB |" in done.stdout and "peak RSS < 1.5 GB" in done.stdout, done.stdout
    assert not (tmp_path / "w").exists(), "the scratch folder is removed"
