"""TorchScript tokenizers: this project's codecs exported as programs, and pretrained ones wrapped.

The core (``fsq.py``) loads only its own tokenizer checkpoints, which hold tensors and nothing that
runs. A TorchScript archive is a program: loading it runs its code. This file is for your own
scripts that want a full-size pretrained codec (EnCodec, DAC, SNAC, ...) behind the numpy API of
``fsq.AudioCodec``, or our codecs outside Python:

    export_torchscript(fsq.load_audio_codec(), "codec.ts")     # ours, loadable by torch.jit.load
    codec = load_scripted_audio_codec("codec.ts", sha256)      # runs it only if you vouch for it

``sha256`` is the hash you vouch for: the file's own (``fsq.file_sha256``) when you chose the file
yourself, or one you recorded when you first trusted it; a file with another hash is refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fsq import AudioCodec, ImageAutoencoder, check_indices, file_sha256, fit_length


def vouched(path: str | Path, sha256: str) -> Path:
    """``path``, once its sha256 equals the hash the caller vouches for ("" vouches for nothing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no TorchScript file at {path}")
    if not sha256:
        raise ValueError(f"{path} is a TorchScript program and nothing vouches for it: pass the sha256 you trust")
    if file_sha256(path) != sha256:
        raise ValueError(f"{path} has sha256 {file_sha256(path)[:12]}..., not the {sha256[:12]}... vouched for")
    return path


def load_scripted_audio_codec(path: str | Path, sha256: str) -> ScriptedAudioCodec:
    return ScriptedAudioCodec(_jit_load(vouched(path, sha256)), source=str(path))


def load_scripted_image_tokenizer(path: str | Path, sha256: str) -> ScriptedImageTokenizer:
    return ScriptedImageTokenizer(_jit_load(vouched(path, sha256)), source=str(path))


class ScriptedAudioCodec:
    """A TorchScript audio codec behind the same numpy API as ``AudioCodec``.

    The module must expose ``encode(waves: Tensor (B, n_samples) float) -> Tensor (B, T) int64``,
    ``decode(ids: Tensor (B, T) int64) -> Tensor (B, n_samples) float`` and the int/float attributes
    ``vocab_size``, ``sample_rate``, ``tokens_per_clip``, ``clip_seconds``. To bring a full-size
    pretrained codec (EnCodec, DAC, SNAC, ...), export it once where that package and its weights
    are installed, e.g.::

        class Export(torch.nn.Module):            # one stream of tokens: flatten codebooks into time,
            def __init__(self, codec):            # or offset codebook k by k * codebook_size
                super().__init__()
                self.codec, self.vocab_size, self.sample_rate = codec, 1024 * 8, 24000
                self.tokens_per_clip, self.clip_seconds = 8 * 75, 1.0
            @torch.jit.export
            def encode(self, waves): ...          # (B, n) -> (B, T) int64, T = tokens_per_clip
            @torch.jit.export
            def decode(self, ids): ...            # (B, T) -> (B, n)
        torch.jit.script(Export(codec)).save("codec.ts")   # or torch.jit.trace_module

    and load it with ``load_scripted_audio_codec("codec.ts", sha256)``: this project never imports those packages.
    ``export_torchscript(AudioCodec.load())`` writes our own codec in this form.
    """

    REQUIRED = ("vocab_size", "sample_rate", "tokens_per_clip", "clip_seconds")

    def __init__(self, module: torch.jit.ScriptModule, source: str = "TorchScript module") -> None:
        _require_members(module, ("encode", "decode"), self.REQUIRED, source)
        self.module = module
        self.vocab_size = int(module.vocab_size)
        self.sample_rate = int(module.sample_rate)
        self.tokens_per_clip = int(module.tokens_per_clip)
        self.clip_seconds = float(module.clip_seconds)
        self.n_samples = round(self.clip_seconds * self.sample_rate)

    def encode(self, wave: np.ndarray) -> np.ndarray:
        return self.encode_batch([wave])[0]

    def encode_batch(self, waves: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack([fit_length(w, self.n_samples) for w in waves]))
        with torch.no_grad():
            return self.module.encode(x).long().numpy()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self.decode_batch(np.asarray(ids)[None])[0]

    def decode_batch(self, ids: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        check_indices(t, self.vocab_size, "audio")
        with torch.no_grad():
            return self.module.decode(t).float().numpy()


class ScriptedImageTokenizer:
    """A TorchScript image tokenizer behind a batched numpy API (``ImageAutoencoder.encode_batch``, ``decode_batch``).

    The module must expose ``encode(images: Tensor (N, C, S, S) in [0, 1]) -> (N, T) int64``,
    ``decode(ids) -> (N, C, S, S)`` and attributes ``vocab_size``, ``tokens_per_image``,
    ``image_size``, ``in_channels``. Export a pretrained VQ/FSQ tokenizer the way
    ``ScriptedAudioCodec`` describes for audio.
    """

    REQUIRED = ("vocab_size", "tokens_per_image", "image_size", "in_channels")

    def __init__(self, module: torch.jit.ScriptModule, source: str = "TorchScript module") -> None:
        _require_members(module, ("encode", "decode"), self.REQUIRED, source)
        self.module = module
        self.vocab_size, self.tokens_per_image = int(module.vocab_size), int(module.tokens_per_image)
        self.image_size, self.in_channels = int(module.image_size), int(module.in_channels)

    def encode(self, images: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        with torch.no_grad():
            return self.module.encode(x).long().numpy()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        check_indices(t, self.vocab_size, "image")
        with torch.no_grad():
            x = self.module.decode(t).float()
        return (x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)).numpy()


class _AudioExport(nn.Module):
    """Our AudioCodec in the TorchScript contract of ``ScriptedAudioCodec``."""

    def __init__(self, codec: AudioCodec) -> None:
        super().__init__()
        self.codec = codec
        self.vocab_size, self.sample_rate = codec.vocab_size, codec.sample_rate
        self.tokens_per_clip, self.clip_seconds = codec.tokens_per_clip, codec.clip_seconds

    @torch.jit.export
    def encode(self, waves: Tensor) -> Tensor:
        return self.codec.encode_tensor(waves)

    @torch.jit.export
    def decode(self, ids: Tensor) -> Tensor:
        return self.codec.decode_tensor(ids)

    def forward(self, waves: Tensor) -> Tensor:
        return self.encode(waves)


class _ImageExport(nn.Module):
    """Our ImageAutoencoder in the TorchScript contract of ``ScriptedImageTokenizer``."""

    def __init__(self, model: ImageAutoencoder) -> None:
        super().__init__()
        self.model = model
        self.vocab_size, self.tokens_per_image = model.vocab_size, model.tokens_per_image
        self.image_size, self.in_channels = model.image_size, model.cfg.in_channels

    @torch.jit.export
    def encode(self, images: Tensor) -> Tensor:
        return self.model.encode_tensor(images)

    @torch.jit.export
    def decode(self, ids: Tensor) -> Tensor:
        return self.model.decode_tensor(ids)

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)


def export_torchscript(model: AudioCodec | ImageAutoencoder, path: str | Path) -> None:
    """Save one of our tokenizers as TorchScript (loadable without this file by ``torch.jit.load``)."""
    wrapper = _AudioExport(model) if isinstance(model, AudioCodec) else _ImageExport(model)
    with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; it still works and needs no Python
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(wrapper.eval()).save(str(path))


def _jit_load(path: str | Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _require_members(module, methods: tuple[str, ...], attributes: tuple[str, ...], source: str) -> None:
    missing = [m for m in methods if not hasattr(module, m)] + [a for a in attributes if not hasattr(module, a)]
    if missing:
        raise ValueError(
            f"{source} lacks {', '.join(missing)}; a TorchScript tokenizer must expose the methods "
            f"{', '.join(methods)} and the attributes {', '.join(attributes)} (see ScriptedAudioCodec)"
        )
