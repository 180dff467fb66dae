"""The GPU path: bf16 autocast, flash attention and ``torch.compile`` on CUDA.

These tests are marked ``cuda`` and deselected by default (``pytest.ini``); ``lab/gpu_check.sh``
runs them with ``-m cuda`` on a machine with a GPU. Selected on a machine without one, they fail
(``conftest.py``) rather than skip, so a GPU check can never pass by not running.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import mdm
from mdm import Schedule, Vocab
from model import Denoiser, ModelConfig

pytestmark = pytest.mark.cuda
VOCAB = Vocab(text=50, audio=20, image=17)


def batch(seed: int = 0, rows: int = 8, length: int = 32) -> mdm.Corrupted:
    """A corrupted batch of text rows (the ids' modality does not matter to the kernels tested here)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, VOCAB.text, (rows, length), generator=g)
    pad = torch.zeros_like(x0, dtype=torch.bool)
    return mdm.corrupt(x0, pad, VOCAB, Schedule("linear"), anti_masking=True, generator=g).to("cuda")


def model(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(ModelConfig(d_model=128, n_layers=2, n_heads=2, max_len=64), VOCAB).cuda()


def loss_and_grads(m: Denoiser, c: mdm.Corrupted, bf16: bool) -> tuple[float, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = mdm.nelbo(m.nll_at, c, VOCAB).loss
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])


def test_bf16_autocast_matches_fp32() -> None:
    m, c = model(), batch()
    loss32, g32 = loss_and_grads(m, c, bf16=False)
    loss16, g16 = loss_and_grads(m, c, bf16=True)
    assert abs(loss16 - loss32) < 2e-2 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_attention_runs_on_the_flash_kernel_under_bf16() -> None:
    """With only the flash backend allowed, a forward and backward pass must succeed (it raises otherwise)."""
    m, c = model(), batch()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        loss, grads = loss_and_grads(m, c, bf16=True)
    assert torch.isfinite(grads).all() and loss > 0


def test_compiled_blocks_match_eager() -> None:
    eager, compiled, c = model(), model(), batch()
    for block in compiled.blocks:
        block.compile()
    loss_e, g_e = loss_and_grads(eager, c, bf16=True)
    loss_c, g_c = loss_and_grads(compiled, c, bf16=True)
    assert abs(loss_c - loss_e) < 1e-2 * abs(loss_e)
    assert torch.nn.functional.cosine_similarity(g_c, g_e, dim=0) > 0.99
