"""Media tokens: how an image or a sound becomes a short sequence of integers.

``data.py`` puts these tokens and the BPE text tokens of ``bpe.py`` into one vocabulary (``mdm.Vocab``). The media
tokenizers, from the simplest to the learned ones:

1. ``PixelTokenizer``    gray-level patches as tokens: the default for the 8x8 digits (no training).
2. ``FSQ``               finite scalar quantization (Mentzer et al., 2023): round each of a few bounded latent
                         channels to a handful of levels; the tuple of levels is the token. No codebook, no
                         commitment loss, every code usable.
3. ``MuLaw``             8-bit mu-law companding: the exact, training-free code the committed clips are stored in.
   ``AudioCodec``        STFT frames -> conv encoder -> FSQ, and back by a conv decoder and Griffin-Lim: ~31 tokens
                         per second, ``tokens_per_clip`` for a clip cut to the fixed length the sequence layout needs;
                         ``assets/audio_codec.pt`` was trained on ``assets/spoken_digits.npz`` by ``lab/tokenizers.py``.
4. ``ImageAutoencoder``  a conv autoencoder with FSQ for larger or colour images (32x32 -> 64 tokens), trained by
                         ``python -m lab.tokenizers train-image`` and named by ``--image_tokenizer=PATH``. The two
                         image tokenizers share one interface: ``from_picture`` (any picture -> its input),
                         ``encode``/``encode_batch``, ``decode``, ``to_picture`` (-> uint8), ``side``, ``patch``.
5. Loading: ``load_audio_codec`` and ``load_image_tokenizer`` read this project's checkpoints (tensors only, never
   code), checking the sha256 a run recorded for them.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

DEFAULT_AUDIO_CODEC = Path(__file__).resolve().parent / "assets" / "audio_codec.pt"
FORMAT_AUDIO = "trimodal-mdm/audio-codec/v1"
FORMAT_IMAGE = "trimodal-mdm/image-autoencoder/v1"


# --- 1. Gray-level patches ------------------------------------------------------------------------
class PixelTokenizer:
    """Gray-level patches as tokens: small grayscale images without any training.

    An image of side x side pixels with integer gray levels 0 .. in_levels-1 is quantized to ``levels`` gray levels,
    q = round(x (levels-1)/(in_levels-1)), and cut into (side/patch)^2 patches of patch x patch pixels; a patch is
    one token, its levels read as a number in base ``levels`` (row-major): id = sum_j q_j levels^j < levels^(patch^2).

    * ``PixelTokenizer(levels=17, patch=1)``: one token per pixel, lossless for the 8x8 digits.
    * The default ``PixelTokenizer(levels=4, patch=2)``: 16 tokens of 256 values per digit. Four gray levels keep the
      digits recognizable, and four times fewer, more telling tokens let the tiny model learn image-text tasks on a CPU.
    """

    mode = "L"  # the PIL mode of the pictures it reads (``from_picture``)

    def __init__(self, levels: int = 4, patch: int = 2, side: int = 8, in_levels: int = 17) -> None:
        if side % patch:
            raise ValueError(f"the patch size {patch} must divide the image side {side}")
        if not 2 <= levels <= in_levels:
            raise ValueError(f"levels must lie in [2, {in_levels}], got {levels}")
        if levels ** (patch * patch) > 2**63:  # the largest id must fit an int64 (it would wrap, silently)
            raise ValueError(f"{levels} levels in {patch}x{patch} patches make {levels}^{patch * patch} ids: too many")
        self.levels, self.patch, self.side, self.in_levels = levels, patch, side, in_levels
        self.vocab_size, self.tokens_per_image = levels ** (patch * patch), (side // patch) ** 2

    def encode(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.shape != (self.side, self.side):
            raise ValueError(f"expected a {self.side}x{self.side} image, got shape {image.shape}")
        if image.min() < 0 or image.max() > self.in_levels - 1 or not np.allclose(image, np.rint(image)):
            raise ValueError(f"pixel values must be integers in [0, {self.in_levels}); quantize first (from_picture)")
        q = np.rint(np.rint(image) * (self.levels - 1) / (self.in_levels - 1)).astype(np.int64)
        n, p = self.side // self.patch, self.patch
        patches = q.reshape(n, p, n, p).transpose(0, 2, 1, 3).reshape(n * n, p * p)  # both in row-major order
        return patches @ self.levels ** np.arange(p * p)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids).astype(np.int64)
        if ids.shape != (self.tokens_per_image,):
            raise ValueError(f"expected {self.tokens_per_image} image tokens, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"image token ids must lie in [0, {self.vocab_size})")
        n, p = self.side // self.patch, self.patch
        q = self._levels(ids).reshape(n, n, p, p).transpose(0, 2, 1, 3).reshape(self.side, self.side)  # un-patch
        return np.rint(q * (self.in_levels - 1) / (self.levels - 1)).astype(np.int64)

    def _levels(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids -> (n, patch * patch) the gray level of each pixel of each patch (the base-levels digits)."""
        return (ids[:, None] // self.levels ** np.arange(self.patch * self.patch)) % self.levels

    def code_vectors(self) -> np.ndarray:
        """(vocab_size, patch * patch): what each token stands for, its pixels' gray levels (``model.embed_codes``)."""
        return self._levels(np.arange(self.vocab_size)).astype(np.float32)

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        """(N, side, side) gray levels -> (N, tokens_per_image) ids."""
        return np.stack([self.encode(x) for x in images])

    def to_picture(self, image: np.ndarray) -> np.ndarray:
        """An image's gray levels as a picture: uint8, 0 .. 255."""
        return (np.asarray(image, dtype=np.int64) * 255 // (self.in_levels - 1)).astype(np.uint8)

    def from_picture(self, image: np.ndarray) -> np.ndarray:
        """Any grayscale/colour picture (H, W[, C]) in [0, 255] -> side x side levels 0 .. in_levels-1, resized by
        area averaging (PIL); bright = ink as in the digits data, so a bright image is inverted."""
        from PIL import Image

        img = Image.fromarray(np.asarray(image).astype(np.uint8)).convert("L").resize((self.side, self.side), Image.BOX)
        a = np.asarray(img, dtype=np.float64) / 255.0
        a = 1.0 - a if a.mean() > 0.5 else a
        return np.rint(a * (self.in_levels - 1)).astype(np.int64)


# --- 2. Finite scalar quantization ----------------------------------------------------------------
class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple", 2023).

    A latent z in R^d (d = len(levels), the last dimension of every tensor here) is squashed channel by channel
    into a bounded interval and rounded to L_j levels:

        h_j   = (L_j - 1)(1 - eps)/2,   o_j = 0.5 if L_j is even else 0,   s_j = tan(o_j / h_j)
        b_j   = h_j tanh(z_j + s_j) - o_j                   (bounded: round(b_j) takes L_j values)
        q_j   = round_ste(b_j) / floor(L_j / 2)             (codes in [-1, 1])

    (s_j shifts even-L channels so that b_j spans L_j integers, with tan as in the paper's reference code:
    ~ atanh(o_j/h_j) for large L_j, and finite for L_j = 2 where atanh(o_j/h_j) is not.)
    round_ste(x) = x + stopgrad(round(x) - x) rounds in the forward pass and is the identity in the backward pass
    (the straight-through estimator): the encoder gets the decoder loss's gradient as if there were no quantizer.
    The implicit codebook is the grid prod_j {L_j levels}, of size prod_j L_j ((7, 5, 5, 5) -> 875); mixed-radix index:

        index = sum_j digit_j * prod_{k<j} L_k,   digit_j = q_j floor(L_j/2) + floor(L_j/2) in [0, L_j).
    """

    def __init__(self, levels: tuple[int, ...] = (7, 5, 5, 5), eps: float = 1e-3) -> None:
        super().__init__()
        if len(levels) == 0 or any(int(n) < 2 for n in levels):
            raise ValueError(f"FSQ needs at least one channel and every level count >= 2, got {levels}")
        self.levels = tuple(int(n) for n in levels)
        self.dim, self.codebook_size = len(self.levels), math.prod(self.levels)
        lv = torch.tensor(self.levels, dtype=torch.long)
        half_l = (lv.double() - 1) * (1 - eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0).double()
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), lv[:-1]]), 0)  # 1, L_0, L_0 L_1, ...
        buffers = {"half_l": half_l, "offset": offset, "shift": torch.tan(offset / half_l), "half_width": lv // 2}
        buffers = {k: v.float() for k, v in buffers.items()} | {"basis": basis, "lv": lv}  # float32, then int64
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def bound(self, z: Tensor) -> Tensor:
        return torch.tanh(z + self.shift) * self.half_l - self.offset

    def forward(self, z: Tensor) -> Tensor:
        """(..., d) latents -> (..., d) quantized codes in [-1, 1], straight-through gradient."""
        b = self.bound(z)
        return (b + (torch.round(b) - b).detach()) / self.half_width

    def codes_to_indices(self, q: Tensor) -> Tensor:
        """(..., d) codes -> (...,) int64 indices in [0, codebook_size)."""
        return (torch.round(q * self.half_width + self.half_width).long() * self.basis).sum(-1)  # digits . basis

    def indices_to_codes(self, idx: Tensor) -> Tensor:
        """(...,) indices -> (..., d) codes; the inverse of ``codes_to_indices``."""
        digits = torch.div(idx.long().unsqueeze(-1), self.basis, rounding_mode="floor") % self.lv
        return (digits.float() - self.half_width) / self.half_width

    def code_vectors(self) -> np.ndarray:
        """(codebook_size, d): every token's code, what it stands for (``model.embed_codes`` starts from it)."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self.basis.device)).cpu().numpy()

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(..., d) latents -> (codes, indices)."""
        q = self.forward(z)
        return q, self.codes_to_indices(q)


def check_indices(ids: Tensor, vocab_size: int, what: str, length: int = 0) -> None:
    if length and (ids.dim() != 2 or ids.shape[1] != length):
        raise ValueError(f"expected (B, {length}) {what} token ids, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{what} token ids must lie in [0, {vocab_size}); got [{int(ids.min())}, {int(ids.max())}]")


# --- 3. The audio codec ---------------------------------------------------------------------------
class MuLaw:
    """8-bit mu-law companding: the exact, training-free audio code (256 values per sample) of the committed clips.

        y = sign(x) ln(1 + mu |x|) / ln(1 + mu),   code = round((y + 1)/2 (2^bits - 1))

    Decoding inverts both steps; the error is at most half a quantization step in y, i.e. |dx| <= (1/(2^bits - 1))
    ln(1 + mu) (1 + mu |x|) / mu to first order. At 8000 codes per second a clip is far too long for the tiny model."""

    def __init__(self, bits: int = 8) -> None:
        self.levels = 2**bits
        self.mu = float(self.levels - 1)

    def encode(self, wave: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(wave, dtype=np.float64), -1.0, 1.0)
        y = np.sign(x) * np.log1p(self.mu * np.abs(x)) / np.log1p(self.mu)
        return np.rint((y + 1) * ((self.levels - 1) / 2)).astype(np.int64)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.levels):
            raise ValueError(f"mu-law ids must lie in [0, {self.levels})")
        y = ids.astype(np.float64) / (self.levels - 1) * 2 - 1
        return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(self.mu)) / self.mu).astype(np.float32)


@dataclass(frozen=True)
class AudioCodecConfig:
    """Shape of the audio codec. Frames: hop samples apart, n_fft long (Hann window, 75% overlap).

    n_frames = n_samples / hop; tokens per second = sample_rate / (hop * frames_per_token), 12000 / (96 * 4) = 31.25
    by default. clip_seconds * sample_rate must be a multiple of hop * frames_per_token, so a clip is exactly
    tokens_per_clip tokens (default 1.024 s -> 32 tokens, longer than any spoken digit clip)."""

    sample_rate: int = 12000
    clip_seconds: float = 1.024
    n_fft: int = 384
    hop: int = 96
    frames_per_token: int = 4
    levels: tuple[int, ...] = (7, 5, 5, 5)
    channels: int = 64
    res_blocks: int = 2
    log_floor: float = 1e-2
    griffin_lim_iters: int = 32

    def __post_init__(self) -> None:
        if self.frames_per_token < 1 or self.frames_per_token & (self.frames_per_token - 1):
            raise ValueError(f"frames_per_token must be a power of two, got {self.frames_per_token}")
        n, k = self.clip_seconds * self.sample_rate, self.hop * self.frames_per_token
        if abs(n - round(n)) > 1e-6 or round(n) % k:
            msg = f"clip_seconds * sample_rate = {n:g} samples must be a multiple of hop * frames_per_token = {k}"
            raise ValueError(msg)

    @property
    def n_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @property
    def tokens_per_clip(self) -> int:
        return self.n_samples // (self.hop * self.frames_per_token)

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1


class ResBlock1d(nn.Module):
    """x + Conv(GELU(Conv(GELU(x)))), kernel 3, the first conv dilated to widen the receptive field."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


def audio_encoder(cfg: AudioCodecConfig) -> nn.Sequential:
    """(B, n_bins, n_frames) features -> (B, len(levels), tokens) latents; each stride-2 conv halves time."""
    c = cfg.channels
    layers: list[nn.Module] = [nn.Conv1d(cfg.n_bins, c, 3, padding=1)]
    for i in range(int(math.log2(cfg.frames_per_token))):
        layers += [ResBlock1d(c, dilation=1 + i % 2), nn.GELU(), nn.Conv1d(c, c, 4, stride=2, padding=1)]
    layers += [ResBlock1d(c, dilation=d) for d in (1, 2, 4)[: cfg.res_blocks]]
    layers += [nn.GELU(), nn.Conv1d(c, len(cfg.levels), 1)]
    return nn.Sequential(*layers)


def audio_decoder(cfg: AudioCodecConfig) -> nn.Sequential:
    """(B, len(levels), tokens) codes -> (B, n_bins, n_frames) features; the mirror of the encoder."""
    c = cfg.channels
    layers: list[nn.Module] = [nn.Conv1d(len(cfg.levels), c, 3, padding=1)]
    layers += [ResBlock1d(c, dilation=d) for d in (1, 2, 4)[: cfg.res_blocks]]
    for i in range(int(math.log2(cfg.frames_per_token))):
        layers += [nn.GELU(), nn.ConvTranspose1d(c, c, 4, stride=2, padding=1), ResBlock1d(c, dilation=1 + i % 2)]
    layers += [nn.GELU(), nn.Conv1d(c, cfg.n_bins, 3, padding=1)]
    return nn.Sequential(*layers)


def stft(waves: Tensor, n_fft: int, hop: int) -> Tensor:
    """(B, n) -> (B, n_fft//2 + 1, n//hop + 1) complex STFT, Hann window, centred frames."""
    return torch.stft(waves, n_fft, hop, window=torch.hann_window(n_fft, device=waves.device), return_complex=True)


def istft(spec: Tensor, n_fft: int, hop: int, length: int) -> Tensor:
    return torch.istft(spec, n_fft, hop, window=torch.hann_window(n_fft, device=spec.device), length=length)


def griffin_lim(mag: Tensor, n_fft: int, hop: int, length: int, n_iter: int = 64, momentum: float = 0.99) -> Tensor:
    """Waveforms whose STFT magnitude is close to ``mag`` (B, bins, frames): the fast Griffin-Lim algorithm.

    Griffin & Lim (1984) alternate two projections: keep the phase of X, impose the magnitude (X <- |S| X/|X|), and
    go to the nearest consistent spectrogram (X <- STFT(ISTFT(X))). The "fast" variant (Perraudin et al., 2013)
    extrapolates the phase with a momentum term, X_n <- P(X_n) + alpha (P(X_n) - P(X_{n-1})) with alpha ~ 0.99,
    converging in far fewer iterations. Phases start at 0 (deterministic: the same magnitudes give the same wave).
    """
    angles = torch.ones_like(mag, dtype=torch.complex64)
    previous = torch.zeros_like(angles)
    for _ in range(n_iter):
        rebuilt = stft(istft(mag * angles, n_fft, hop, length), n_fft, hop)
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / (angles.abs() + 1e-16)
        previous = rebuilt
    return istft(mag * angles, n_fft, hop, length)


def fit_length(wave: np.ndarray, n_samples: int) -> np.ndarray:
    """Pad with zeros at the end, or crop the end, to exactly n_samples (float32, 1-D)."""
    x = np.asarray(wave, dtype=np.float32).reshape(-1)[:n_samples]
    return np.pad(x, (0, n_samples - len(x)))


class AudioCodec(nn.Module):
    """A small FSQ codec over log-magnitude STFT frames; Griffin-Lim turns decoded magnitudes into audio.

    encode: wave -> fixed length -> |STFT| -> features f = (log(|S| + floor) - mean_bin) / std_bin ->
            conv encoder (time / frames_per_token) -> FSQ indices, ``tokens_per_clip`` of them.
    decode: indices -> FSQ codes -> conv decoder -> features -> |S| -> Griffin-Lim -> wave.

    The STFT has n_frames + 1 centred frames; the encoder sees the first n_frames and decoding appends one
    silent frame (the last frame covers only the final hop/2 samples of the clip). ``encode``/``decode`` (one
    clip) and ``*_batch`` take and give numpy arrays; ``*_tensor``, batched torch tensors (TorchScript exports)."""

    def __init__(self, cfg: AudioCodecConfig = AudioCodecConfig()) -> None:
        super().__init__()
        self.cfg, self.fsq = cfg, FSQ(cfg.levels)
        self.encoder, self.decoder = audio_encoder(cfg), audio_decoder(cfg)
        self.register_buffer("feat_mean", torch.zeros(cfg.n_bins, 1))
        self.register_buffer("feat_std", torch.ones(cfg.n_bins, 1))
        # plain attributes (TorchScript keeps them; the adapters read them)
        self.vocab_size, self.tokens_per_clip = self.fsq.codebook_size, cfg.tokens_per_clip
        self.sample_rate, self.clip_seconds = cfg.sample_rate, cfg.clip_seconds
        self.n_fft, self.hop, self.n_samples = cfg.n_fft, cfg.hop, cfg.n_samples
        self.log_floor, self.griffin_lim_iters = cfg.log_floor, cfg.griffin_lim_iters

    def code_vectors(self) -> np.ndarray:
        return self.fsq.code_vectors()

    def magnitudes(self, waves: Tensor) -> Tensor:
        """(B, n_samples) -> (B, n_bins, n_frames) |STFT| (the last, half-empty frame dropped)."""
        return stft(waves, self.n_fft, self.hop).abs()[..., :-1]

    def features(self, mag: Tensor) -> Tensor:
        return (torch.log(mag + self.log_floor) - self.feat_mean) / self.feat_std

    def set_normalization(self, mags: Tensor) -> None:
        """Per-bin mean and std of log-magnitudes over a (B, n_bins, n_frames) training sample."""
        logs = torch.log(mags + self.log_floor)
        self.feat_mean.copy_(logs.mean(dim=(0, 2))[:, None])
        self.feat_std.copy_(logs.std(dim=(0, 2))[:, None].clamp_min(1e-3))

    def latents(self, waves: Tensor) -> Tensor:
        """(B, n_samples) -> (B, tokens, d) continuous latents before FSQ."""
        return self.encoder(self.features(self.magnitudes(waves))).transpose(1, 2)

    @torch.jit.export
    def encode_tensor(self, waves: Tensor) -> Tensor:
        """(B, n_samples) float waves -> (B, tokens_per_clip) int64 token ids."""
        return self.fsq.codes_to_indices(self.fsq(self.latents(waves)))

    @torch.jit.export
    def decode_tensor(self, ids: Tensor) -> Tensor:
        """(B, tokens_per_clip) ids -> (B, n_samples) waves, by Griffin-Lim from decoded magnitudes."""
        feats = self.decoder(self.fsq.indices_to_codes(ids).transpose(1, 2))
        mag = (torch.exp(feats * self.feat_std + self.feat_mean) - self.log_floor).clamp_min(0.0)  # features^-1
        mag = F.pad(mag, (0, 1))  # the dropped last frame, silent
        return griffin_lim(mag, self.n_fft, self.hop, self.n_samples, self.griffin_lim_iters)

    def forward(self, waves: Tensor) -> Tensor:
        """Training pass: (B, n_samples) -> reconstructed features (B, n_bins, n_frames)."""
        return self.decoder(self.fsq(self.latents(waves)).transpose(1, 2))

    def encode(self, wave: np.ndarray) -> np.ndarray:
        """One waveform (float, at ``sample_rate``) -> (tokens_per_clip,) int64 ids in [0, vocab_size)."""
        return self.encode_batch([wave])[0]

    def encode_batch(self, waves: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack([fit_length(w, self.n_samples) for w in waves]))
        with torch.no_grad():
            return self.encode_tensor(x).numpy()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """(tokens_per_clip,) ids -> (n_samples,) float32 waveform at ``sample_rate``."""
        return self.decode_batch(np.asarray(ids)[None])[0]

    def decode_batch(self, ids: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        check_indices(t, self.vocab_size, "audio", self.tokens_per_clip)
        with torch.no_grad():
            return self.decode_tensor(t).numpy()

    def save(self, path: str | Path, half: bool = True) -> None:
        """Plain tensors + a config dict (float16 weights by default: half the size, no audible change)."""
        state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in self.state_dict().items()}
        torch.save({"format": FORMAT_AUDIO, "config": asdict(self.cfg), "state_dict": state}, path)


# --- 4. The image autoencoder ---------------------------------------------------------------------
def resize_picture(picture: np.ndarray, side: int, mode: str = "L") -> np.ndarray:
    """A picture (H, W[, C]) in [0, 255] -> (side, side[, C]) floats in [0, 1], in PIL ``mode`` ("L" or "RGB"), resized
    bilinearly (antialiased when shrinking): what an autoencoder reads, in training (``lab.tokenizers``) and in use."""
    from PIL import Image

    img = Image.fromarray(np.asarray(picture).astype(np.uint8)).convert(mode)
    return np.asarray(img.resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0


@dataclass(frozen=True)
class ImageAEConfig:
    """A conv autoencoder: (C, S, S) images in [0, 1] -> (S/4)^2 FSQ tokens (28x28 -> 7x7 = 49)."""

    image_size: int = 28
    in_channels: int = 1
    width: int = 32
    levels: tuple[int, ...] = (7, 5, 5, 5)

    def __post_init__(self) -> None:
        if self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two stride-2 stages), got {self.image_size}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (gray) or 3 (RGB), got {self.in_channels}")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // 4) ** 2


class ImageAutoencoder(nn.Module):
    """Encoder: conv 3x3 -> two stride-2 convs (S -> S/4) -> 1x1 conv to len(levels) channels -> FSQ.
    Decoder: the mirror with transposed convs and a sigmoid. Images are (N, H, W) or (N, H, W, C) floats in [0, 1]
    in the numpy API; tokens are raster-ordered (row by row), (N, (S/4)^2) int64."""

    def __init__(self, cfg: ImageAEConfig = ImageAEConfig()) -> None:
        super().__init__()
        self.cfg, self.fsq = cfg, FSQ(cfg.levels)
        w, d = cfg.width, len(cfg.levels)
        self.encoder = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, d, 1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Conv2d(d, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(2 * w, 2 * w, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, cfg.in_channels, 3, padding=1),
        )  # fmt: skip
        self.vocab_size, self.tokens_per_image = self.fsq.codebook_size, cfg.tokens_per_image
        self.image_size = self.side = cfg.image_size
        self.patch, self.mode = 4, "L" if cfg.in_channels == 1 else "RGB"  # a token: a 4x4 patch, in the middle

    def forward(self, x: Tensor) -> Tensor:
        """Training pass: (N, C, S, S) in [0, 1] -> reconstructions in [0, 1] (straight-through FSQ)."""
        z = self.encoder(x * 2 - 1).permute(0, 2, 3, 1)
        return torch.sigmoid(self.decoder(self.fsq(z).permute(0, 3, 1, 2)))

    @torch.jit.export
    def encode_tensor(self, x: Tensor) -> Tensor:
        """(N, C, S, S) in [0, 1] -> (N, (S/4)^2) int64 ids."""
        z = self.encoder(x * 2 - 1).permute(0, 2, 3, 1)
        return self.fsq.codes_to_indices(self.fsq(z)).flatten(1)

    @torch.jit.export
    def decode_tensor(self, ids: Tensor) -> Tensor:
        """(N, (S/4)^2) ids -> (N, C, S, S) images in [0, 1]."""
        codes = self.fsq.indices_to_codes(ids.reshape(ids.shape[0], self.image_size // 4, self.image_size // 4))
        return torch.sigmoid(self.decoder(codes.permute(0, 3, 1, 2)))

    def _to_tensor(self, images: np.ndarray) -> Tensor:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        want = (self.cfg.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"expected images of shape (N, H, W[, C]) with (C, H, W) = {want}, got {images.shape}")
        return x

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S) or (N, S, S, C) floats in [0, 1] -> (N, tokens_per_image) int64 ids."""
        with torch.no_grad():
            return self.encode_tensor(self._to_tensor(images)).numpy()

    def encode(self, image: np.ndarray) -> np.ndarray:
        return self.encode_batch(np.asarray(image)[None])[0]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self.decode_batch(np.asarray(ids)[None])[0]

    def code_vectors(self) -> np.ndarray:
        """(vocab_size, len(levels)): each token's FSQ code (``model.embed_codes``)."""
        return self.fsq.code_vectors()

    def from_picture(self, image: np.ndarray) -> np.ndarray:
        """Any picture (H, W[, C]) in [0, 255] -> (S, S[, C]) floats in [0, 1] (``resize_picture``). Unlike the pixel
        tokenizer it never inverts a bright picture: it reads pictures as it was trained on them."""
        return resize_picture(image, self.side, self.mode)

    def to_picture(self, image: np.ndarray) -> np.ndarray:
        return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)

    def decode_batch(self, ids: np.ndarray) -> np.ndarray:
        """(N, tokens_per_image) ids -> images shaped like the encoder's input, in [0, 1]."""
        t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        check_indices(t, self.vocab_size, "image", self.tokens_per_image)
        with torch.no_grad():
            x = self.decode_tensor(t)
        return (x[:, 0] if self.cfg.in_channels == 1 else x.permute(0, 2, 3, 1)).numpy()

    def save(self, path: str | Path) -> None:
        torch.save({"format": FORMAT_IMAGE, "config": asdict(self.cfg), "state_dict": self.state_dict()}, path)


# --- 5. Loading: this project's tokenizer checkpoints (tensors, never code) -----------------------
def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes ("" if there is no such file)."""
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""


def read_tokenizer(path: str | Path, expected: str, sha256: str = "") -> dict:
    """A tokenizer checkpoint saved by this file, read with ``weights_only=True`` (tensors, no code).

    ``sha256``, when given, is the hash a run recorded for this file: a different file is refused (it would
    give the model other tokens than it was trained on). A TorchScript archive is refused too: it is a
    program, and loading it runs its code (``lab/torchscript.py`` wraps one for your own scripts)."""
    path, what = Path(path), expected.split("/")[1].replace("-", " ")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found; train one with `python -m lab.tokenizers`")
    if sha256 and (digest := file_sha256(path)) != sha256:
        msg = f"the {what} at {path} has sha256 {digest[:12]}..., not the {sha256[:12]}... recorded for it"
        raise ValueError(msg + "; it is not the file this run was trained with")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any("/code/" in n or n.endswith("/constants.pkl") for n in zf.namelist()):
                raise ValueError(f"{path} is a TorchScript program; only {what} checkpoints written by fsq.py load")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch.save file, or one holding more than tensors and plain containers
        raise ValueError(f"{path} is not a checkpoint of an {what} written by fsq.py ({type(e).__name__})") from None
    found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
    if found != expected:
        raise ValueError(f"{path} holds {found!r}, expected a checkpoint of format {expected!r} written by fsq.py")
    return blob


def _from_blob(blob: dict, model_cls: type, config_cls: type) -> nn.Module:
    model = model_cls(config_cls(**{**blob["config"], "levels": tuple(blob["config"]["levels"])}))
    model.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    return model.eval()


def load_audio_codec(path: str | Path = DEFAULT_AUDIO_CODEC, sha256: str = "") -> AudioCodec:
    """The AudioCodec saved at ``path`` (``sha256``: the hash recorded for it, checked if given)."""
    return _from_blob(read_tokenizer(path, FORMAT_AUDIO, sha256), AudioCodec, AudioCodecConfig)


def load_image_tokenizer(path: str | Path, sha256: str = "") -> ImageAutoencoder:
    """The ImageAutoencoder saved at ``path`` (``sha256`` as above)."""
    return _from_blob(read_tokenizer(path, FORMAT_IMAGE, sha256), ImageAutoencoder, ImageAEConfig)
