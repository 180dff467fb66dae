"""The network: a bidirectional pre-norm transformer p_theta(x_0 | x_t) over the shared vocabulary.

``mdm.py`` needs only -log p_theta(x_0,i | x_t) at the masked positions; this is its network, a plain
transformer (as in nanoGPT) with rotary positions, QK-norm and SwiGLU, and three changes:

* no causal mask: every position sees the whole row (``causal=True`` gives the autoregressive baseline);
* no time input: the pattern of MASK tokens in x_t carries all the information about t that the
  optimal denoiser needs (the true conditionals of masked positions do not depend on t);
* each position's logits cover only its own modality's tokens, so MASK is never predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mdm import MODALITIES, Vocab


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the denoiser. Presets in ``PRESETS``; parameter counts also depend on the Vocab."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 256
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = mlp_ratio * d_model (rounded up to a multiple of 8)
    rope_base: float = 10_000.0
    causal: bool = False  # True only for the autoregressive twin used as a baseline (bench, evaluate)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("the head dimension must be even for rotary embeddings")

    @property
    def mlp_hidden(self) -> int:
        return 8 * math.ceil(self.mlp_ratio * self.d_model / 8)  # 8/3: the parameters of a 4x GELU MLP


# Width, depth and heads of each named size. Comments count the transformer body (about 12 d^2 per layer, the
# "non-embedding" count); embedding and unembedding add 2 |V| d (0.8M for tiny's vocabulary, 77M at d=768, |V|=50k).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4, max_len=256),  # 0.8M body; CPU minutes
    "small": ModelConfig(d_model=512, n_layers=8, n_heads=8, max_len=256),  # 25M
    "base": ModelConfig(d_model=768, n_layers=18, n_heads=12, max_len=1024),  # 127M
    "medium": ModelConfig(d_model=1024, n_layers=28, n_heads=16, max_len=1024),  # 353M
    "large": ModelConfig(d_model=2048, n_layers=20, n_heads=16, max_len=2048),  # 1.0B
    "xl": ModelConfig(d_model=2560, n_layers=38, n_heads=20, max_len=2048),  # 3.0B, about the paper's largest
}


def norm(dim: int) -> nn.LayerNorm:
    """y = (x - mean(x)) / sqrt(var(x) + eps) * g: LayerNorm with a gain and no bias.

    RMSNorm (the same without the mean) is as good a normalizer, but on a CPU it runs as six kernels
    forward and more backward where LayerNorm is one fused kernel each way: a few times faster, and at
    the tiny sizes the norms are a large share of a step.
    """
    return nn.LayerNorm(dim, eps=1e-6, bias=False)


def rotary_table(max_len: int, head_dim: int, base: float) -> Tensor:
    """(max_len, head_dim/2) complex64: e^{i p theta_j}, theta_j = base^(-2j/head_dim), for position p."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate each pair (x_2j, x_2j+1) of x (B, H, L, d) by its position's angle p theta_j.

    Read as the complex number x_2j + i x_2j+1, the rotation is one multiplication by e^{i p theta_j}
    (no slicing into halves and concatenating them back, a copy each way).
    """
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, H, L, d/2), a view of x
    return torch.view_as_real(z * rope).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm and rotary positions; bidirectional unless causal."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.causal = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.causal
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm, self.k_norm = norm(self.head_dim), norm(self.head_dim)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B,H,L,hd)
        q, k = apply_rotary(self.q_norm(q), rope), apply_rotary(self.k_norm(k), rope)
        if x.device.type == "cpu":  # in fp32: a CPU's bf16 attention backward is slow
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=self.causal)
        else:  # in v's dtype (bf16 under autocast, where flash attention applies); the norms return fp32
            y = F.scaled_dot_product_attention(q.type_as(v), k.type_as(v), v, is_causal=self.causal)  # (B,H,L,hd)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    """MLP(x) = W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # two matrices: no chunk, no concatenated gradient


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = norm(cfg.d_model), Attention(cfg)
        self.mlp_norm, self.mlp = norm(cfg.d_model), SwiGLU(cfg)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class Denoiser(nn.Module):
    """p_theta(x_0 | x_t), without time input (see the module docstring).

    Output restriction ("zero-masking" plus modality restriction): at a position of modality m the
    logits cover only ``vocab.predict_slice(m)`` (m's content tokens, BOS_m, EOS_m and, for text,
    PAD_text). MASK and task tokens and other modalities' tokens get probability exactly 0.

    Initialization: token embeddings and all linear layers ~ N(0, 0.02^2), norm gains = 1, except
    * each block's two residual-output projections (attention out, MLP down) ~ N(0, (0.02 / sqrt(2 n_layers))^2),
      so the residual stream's variance does not grow with depth;
    * the unembedding is zero, so at initialization every position predicts the uniform distribution
      over its modality's sub-vocabulary and the loss per masked token is exactly log |slice_m|.
    """

    def __init__(self, cfg: ModelConfig, vocab: Vocab) -> None:
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.embed = nn.Embedding(vocab.size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = norm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, vocab.control_start, bias=False)  # only predictable ids
        self.slices = [vocab.predict_slice(m) for m in MODALITIES]
        logit_mask = torch.full((len(MODALITIES), vocab.size), -math.inf)  # (3, |V|): 0 on slice_m
        for m, s in enumerate(self.slices):
            logit_mask[m, s] = 0.0
        rope = rotary_table(cfg.max_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
        buffers = {"rope": rope, "modality_ids": vocab.modality_table(), "logit_mask": logit_mask}
        for name, buffer in buffers.items():
            self.register_buffer(name, buffer, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            elif name == "unembed.weight":
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02)

    def num_parameters(self, body_only: bool = False) -> int:
        """All parameters, or those of the transformer body (without embedding and unembedding)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() - self.unembed.weight.numel() if body_only else total

    def hidden(self, x_t: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, d) final normalized hidden states."""
        L = x_t.shape[1]
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds the model's max_len {self.cfg.max_len}")
        h, rope = self.embed(x_t), self.rope[:L]
        for block in self.blocks:
            h = block(h, rope)
        return self.final_norm(h)

    def modality_logits(self, h: Tensor, m: int) -> Tensor:
        """(n, d) hidden states of positions of modality MODALITIES[m] -> (n, |slice_m|) logits.

        The rows are padded with zeros to a multiple of 256 and cut again: the number of masked positions
        changes at every step, and a CPU's bf16 matmuls (oneDNN) keep one kernel per shape, a cache that
        would otherwise grow with the steps.
        """
        n = h.shape[0]
        h = torch.cat([h, h.new_zeros(-n % 256, h.shape[1])])
        return (h @ self.unembed.weight[self.slices[m]].T)[:n]

    def nll_at(self, x_t: Tensor, x0: Tensor, where: Tensor) -> Tensor:
        """-log p_theta(x0_i | x_t) at the positions where (B, L) is True -> (n,), row-major.

        Only these positions are unembedded, each against its own modality's slice. For the causal
        twin (``cfg.causal``) x_t is the clean row and position i is predicted from the hidden state
        at i - 1: -log p(x_i | x_<i), next-token prediction (see ``next_token_batch``).
        """
        h = self.hidden(x_t)  # (B, L, d)
        if self.cfg.causal:
            h = F.pad(h[:, :-1], (0, 0, 1, 0))  # the state at i - 1 predicts position i
        h = h[where]  # (n, d)
        mod, target = self.modality_ids[x_t[where]], x0[where]  # (n,) modality and target of each position
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for m, s in enumerate(self.slices):
            rows = (mod == m).nonzero()[:, 0]
            if rows.numel():
                logits = self.modality_logits(h[rows], m).float()
                out[rows] = F.cross_entropy(logits, target[rows] - s.start, reduction="none")
        return out

    def forward(self, x_t: Tensor, where: Tensor | None = None) -> Tensor:
        """Logits over the whole vocabulary, -inf outside each position's sub-vocabulary (float32).

        x_t (B, L) ids. Without ``where``: (B, L, |V|). With a bool ``where`` (B, L): (n, |V|) at
        those positions only, row-major (the samplers ask only for still-masked positions).
        """
        h, mod = self.hidden(x_t), self.modality_ids[x_t]  # (B, L, d), (B, L)
        if where is not None:
            h, mod = h[where], mod[where]
        logits = (h @ self.unembed.weight.T).float()  # (..., |predictable|), padded with -inf to (..., |V|)
        return F.pad(logits, (0, self.vocab.size - logits.shape[-1]), value=-math.inf) + self.logit_mask[mod]


@torch.no_grad()
def embed_codes(model: Denoiser, modality: str, codes: Tensor, generator: torch.Generator | None = None) -> None:
    """Start a media block's input embeddings from what its tokens stand for (call before training).

    A media token is a code c in R^k (the gray levels of a patch's pixels, ``data.PixelTokenizer``, or
    an FSQ code, ``fsq``), and near codes mean near content; a random embedding table knows none of
    this. Adding a random linear image of the standardized code,

        E[id] <- E[id] + z(c_id) R,   z = (c - mean) / std per code dimension,   R ~ N(0, 0.02^2)^(k x d),

    gives the transformer, from step 0, a view of each image / clip that is linear in its content; the
    table stays an ordinary trained parameter (``train.py --code_init``). codes: (|V_m|, k), one row
    per content token of the modality, in id order.
    """
    if modality not in ("image", "audio"):
        raise ValueError(f"embed_codes starts media embeddings (image, audio), not {modality!r}")
    n = model.vocab.content_size(modality)
    if codes.ndim != 2 or codes.shape[0] != n:
        raise ValueError(f"{modality} codes must have shape ({n}, k), one row per token; got {tuple(codes.shape)}")
    z = (codes - codes.mean(0)) / codes.std(0).clamp_min(1e-6)
    R = torch.randn(codes.shape[1], model.cfg.d_model, generator=generator, dtype=torch.float64) * 0.02
    start = model.vocab.block_start(modality)
    model.embed.weight[start : start + n] += (z.double() @ R).to(model.embed.weight)


def model_summary(model: Denoiser) -> str:
    """One line: preset shape and parameter count (embedding, body, unembedding)."""
    cfg, total, body = model.cfg, model.num_parameters(), model.num_parameters(body_only=True)
    return (
        f"Denoiser d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} |V|={model.vocab.size}: "
        f"{total / 1e6:.2f}M parameters ({body / 1e6:.2f}M body, {(total - body) / 1e6:.2f}M embedding + unembedding)"
    )


if __name__ == "__main__":
    # The untrained tiny model on one draw of the forward process: its loss is that of a uniform guess.
    from mdm import Schedule, corrupt, nelbo

    vocab = Vocab(text=256, audio=64, image=17)
    model = Denoiser(PRESETS["tiny"], vocab)
    print(model_summary(model))
    x0 = vocab.to_global(torch.tensor([list(b"Masked diffusion forgets a sentence one token at a time.")] * 8), "text")
    c = corrupt(x0, torch.zeros_like(x0, dtype=torch.bool), vocab, Schedule("linear"))
    with torch.no_grad():
        loss = nelbo(model.nll_at, c, vocab).loss.item()
    n = vocab.predict_size("text")
    print(f"untrained NELBO, one draw of 8 rows: {loss:.3f} nats per token")
    print(f"(its expectation is the loss of a uniform guess over the {n} text ids: log {n} = {math.log(n):.3f})")
