"""Tokenizers: each media tokenizer's fidelity against its token rate, and what a model trained on it pays.

    python -m lab.tokenizer_study --size quick                        # the results in lab/studies/tokenizers
    python -m lab.tokenizer_study --size smoke --out /tmp/tokenizers  # seconds (lab/tests runs this)

Images (scikit-learn's 8x8 digits, gray levels 0..16). ``fsq.PixelTokenizer`` at several (levels, patch), no
training, and ``fsq.ImageAutoencoder`` at several (image size, FSQ levels), trained briefly with
``lab.tokenizers.train_image_autoencoder`` on the training images upsampled bilinearly
(``lab.tokenizers.default_images``). Each is judged on the held-out test images at 8x8: the reconstruction
MSE (pixels in [0, 1]; an autoencoder's output area-averaged back to 8x8) and the accuracy of the digit judge
of ``evaluate.fit_judges`` (fitted on the real training images) on the reconstructions, beside its accuracy
on the real test images.

Audio (the spoken digits of ``data.spoken_digits``). The committed codec ``assets/audio_codec.pt`` as it is,
and ``fsq.AudioCodec``s with other FSQ levels (vocabularies) and frames per token (token rates) trained
briefly with ``lab.tokenizers.train_audio_codec`` on the training clips, the default configuration among them
(the comparison at equal training). Each is judged on the test clips: the L1 distance between its decoded
log-magnitudes and the clip's (natural log, floor 0.01, before Griffin-Lim) and pocketsphinx's digit accuracy
on its reconstructions (``lab.tokenizers.audio_report``), beside the originals and Griffin-Lim from their
exact magnitudes.

Models. Short ``train.main`` runs of one small model at an equal token budget: image-text rows only for a few
pixel tokenizers (``--image_levels``, ``--image_patch``), audio-text rows only for a few codecs
(``--audio_codec``). The text slot keeps the default's size, so ``--seq_len`` grows with the media's tokens:
rows are longer and fewer items are seen. Each run is judged by its test NELBO of the media part in bits per
item (``evaluate.nelbo_bits`` per token times tokens per item) and by text-to-image or text-to-speech
accuracy with the sampler presets.

Outputs in --out: ``results.jsonl`` (one line per tokenizer or run; a line already there for the same size is
not recomputed), ``summary.json``, ``fidelity_vs_tokens.png``, ``model_bits.png``, and a printed table.
Trained tokenizers and runs go to --runs (git-ignored by default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes

import data as data_lib
import evaluate
import sample as sample_lib
import train
from checkpoint import load_for_inference
from fsq import (
    DEFAULT_AUDIO_CODEC,
    AudioCodec,
    AudioCodecConfig,
    ImageAEConfig,
    PixelTokenizer,
    file_sha256,
    fit_length,
)
from fsq import load_audio_codec as load_codec
from lab import tokenizers
from lab.studies import (
    Results,
    data_built_once,
    format_table,
    new_figure,
    save_figure,
    say,
    shared_data,
    strict_json,
)

COMMITTED = "codec_committed"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE_TOKENS = PixelTokenizer().tokens_per_image  # the layout's default share of a row
DEFAULT_AUDIO_TOKENS = AudioCodecConfig().tokens_per_clip


# ----------------------------------------------------------------------------------------------
# 1. Sizes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """Everything that makes the study bigger or smaller; presets in ``SIZES``."""

    name: str
    pixels: tuple[tuple[int, int], ...]  # PixelTokenizer (levels, patch)
    autoencoders: tuple[tuple[int, tuple[int, ...]], ...]  # ImageAutoencoder (image_size, FSQ levels)
    ae_train: tokenizers.TrainConfig
    codecs: tuple[tuple[tuple[int, ...], int], ...]  # trained AudioCodecs (FSQ levels, frames_per_token)
    codec_train: tokenizers.TrainConfig
    clips: int  # test clips judged (0: all)
    image_runs: tuple[tuple[int, int], ...]  # PixelTokenizer (levels, patch) of the image-text runs
    audio_runs: tuple[str, ...]  # codec ids of the audio-text runs
    run_tokens: float  # every run's horizon (positions, padding included)
    run_options: tuple[str, ...]  # train.py options of every run: the model, the batch, the warmup
    eval_batches: int  # test NELBO: eval_batches x eval_rows rows
    eval_rows: int
    per_digit: int  # text-to-image / text-to-speech prompts per digit


SIZES: dict[str, Size] = {
    "smoke": Size(
        name="smoke",
        pixels=((4, 2), (17, 1), (2, 2)),
        autoencoders=((8, (4, 4, 4, 4)),),
        ae_train=tokenizers.TrainConfig(steps=4, batch=8, warmup=2),
        codecs=(((5, 5, 5), 8),),
        codec_train=tokenizers.TrainConfig(steps=2, batch=4, warmup=1),
        clips=4,
        image_runs=((4, 2),),
        audio_runs=("codec_L5x5x5_F8",),
        run_tokens=3e3,
        run_options=("--d_model=32", "--n_layers=2", "--n_heads=2", "--batch_size=16", "--warmup_tokens=1e3"),
        eval_batches=2,
        eval_rows=16,
        per_digit=1,
    ),
    "quick": Size(
        name="quick",
        pixels=((2, 1), (4, 1), (17, 1), (2, 2), (4, 2), (8, 2), (17, 2), (2, 4), (3, 4), (4, 4)),
        autoencoders=(
            (8, (8, 5, 5, 5)),
            (16, (2, 2, 2, 2)),
            (16, (4, 4, 4, 4)),
            (16, (8, 5, 5, 5)),
            (32, (4, 4, 4, 4)),
            (32, (8, 5, 5, 5)),
        ),
        ae_train=tokenizers.TrainConfig(steps=300, batch=32),
        codecs=(((7, 5, 5, 5), 4), ((5, 5, 5), 4), ((8, 8, 8, 5), 4), ((7, 5, 5, 5), 2), ((7, 5, 5, 5), 8)),
        codec_train=tokenizers.TrainConfig(steps=500, batch=32),
        clips=0,
        image_runs=((2, 2), (4, 2), (8, 2), (4, 1), (17, 1)),
        audio_runs=(COMMITTED, "codec_L7x5x5x5_F4", "codec_L7x5x5x5_F8"),
        run_tokens=2e6,
        run_options=("--d_model=64", "--n_layers=2", "--n_heads=2", "--batch_size=64", "--warmup_tokens=1e5"),
        eval_batches=16,
        eval_rows=64,
        per_digit=10,
    ),
}


def levels_name(levels: Sequence[int]) -> str:
    return "x".join(map(str, levels))


def pixel_id(levels: int, patch: int) -> str:
    return f"pixel_L{levels}_P{patch}"


def autoencoder_id(image_size: int, levels: Sequence[int]) -> str:
    return f"ae_S{image_size}_L{levels_name(levels)}"


def codec_id(levels: Sequence[int], frames_per_token: int) -> str:
    return f"codec_L{levels_name(levels)}_F{frames_per_token}"


# ----------------------------------------------------------------------------------------------
# 2. The held-out data and the judges
# ----------------------------------------------------------------------------------------------


@dataclass
class Heldout:
    """The images and clips the tokenizers are fitted and judged on, with the judges."""

    train_ix: np.ndarray  # indices of the training and test digits in data.digits_images() order
    test_ix: np.ndarray
    test_images: np.ndarray  # (N, 8, 8) gray levels 0..16
    test_labels: np.ndarray
    train_clips: list[np.ndarray]
    test_clips: list[np.ndarray]
    clip_labels: np.ndarray
    sample_rate: int
    judges: evaluate.Judges


def held_out(size: Size) -> Heldout:
    """The default data's image split (data.build_data's) and the spoken digits' own train/test split."""
    base = shared_data(data_lib.DataConfig(audio_speeds=()))
    judges = evaluate.fit_judges(base)  # the digit judge on the real training images, as evaluate.report does
    images, _ = data_lib.digits_images()
    split = data_lib.split_indices(len(images), base.config.split_seed)
    test = base.pairs["image_text"]["test"]
    if not np.array_equal(np.stack(test.raw), images[split["test"]]):
        raise SystemExit("the test images of data.build_data are not data.split_indices' test split of the digits")
    waves, meta = data_lib.spoken_digits()
    test_ix = np.flatnonzero(meta["split"] == "test")
    test_ix = test_ix[: size.clips] if size.clips else test_ix
    return Heldout(
        train_ix=split["train"],
        test_ix=split["test"],
        test_images=np.stack(test.raw),
        test_labels=test.labels.numpy(),
        train_clips=[waves[i] for i in np.flatnonzero(meta["split"] == "train")],
        test_clips=[waves[i] for i in test_ix],
        clip_labels=meta["labels"][test_ix],
        sample_rate=int(meta["sample_rate"]),
        judges=judges,
    )


def upsampled_digits(image_size: int, held: Heldout) -> tuple[np.ndarray, np.ndarray]:
    """(training images, test images) upsampled to image_size (lab.tokenizers.default_images), in [0, 1]."""
    images, labels, source = tokenizers.default_images(image_size)
    if "scikit-learn digits" not in source or len(images) != len(data_lib.digits_images()[1]):
        raise SystemExit(f"image size {image_size}: expected the digits upsampled, got {source}; choose another size")
    if not np.array_equal(labels[held.test_ix], held.test_labels):
        raise SystemExit("the upsampled digits are not in the order of data.digits_images()")
    return images[held.train_ix], images[held.test_ix]


def to_8x8(images: np.ndarray) -> np.ndarray:
    """(N, S, S) in [0, 1] -> (N, 8, 8) by area averaging."""
    x = torch.from_numpy(np.asarray(images, np.float32))[:, None]
    return F.interpolate(x, size=(8, 8), mode="area")[:, 0].numpy()


def mse_01(reconstructed: np.ndarray, real: np.ndarray) -> float:
    """Mean squared error of 8x8 images given in gray levels 0..16, in [0, 1] pixel units."""
    return float(np.mean((np.asarray(reconstructed, np.float64) / 16 - np.asarray(real, np.float64) / 16) ** 2))


# ----------------------------------------------------------------------------------------------
# 3. Image tokenizers
# ----------------------------------------------------------------------------------------------


def image_fidelity(reconstructed: np.ndarray, ids: np.ndarray, vocab: int, held: Heldout) -> dict:
    """What every image line holds: token rate, vocabulary, bits, MSE and the judge on the reconstructions."""
    tokens = int(ids.shape[1])
    return {
        "modality": "image",
        "tokens_per_item": tokens,
        "vocab_size": int(vocab),
        "bits_per_item": tokens * math.log2(vocab),
        "mse": mse_01(reconstructed, held.test_images),
        "judge_accuracy": held.judges.image.accuracy(reconstructed, held.test_labels),
        "judge_real": held.judges.image.accuracy(held.test_images, held.test_labels),
        "codes_used": len(np.unique(ids)),
        "test_items": len(held.test_images),
    }


def pixel_record(levels: int, patch: int, held: Heldout) -> dict:
    tok = PixelTokenizer(levels, patch)
    ids = np.stack([tok.encode(x) for x in held.test_images])
    reconstructed = np.stack([tok.decode(i) for i in ids])
    label = f"pixels L{levels} P{patch}"
    return {"kind": "pixel", "label": label, "levels": levels, "patch": patch,
            **image_fidelity(reconstructed, ids, tok.vocab_size, held)}  # fmt: skip


def autoencoder_record(image_size: int, levels: tuple[int, ...], held: Heldout, size: Size, folder: Path) -> dict:
    """Train an FSQ image autoencoder on the upsampled training digits; judge it at 8x8."""
    train_images, test_images = upsampled_digits(image_size, held)
    cfg = ImageAEConfig(image_size=image_size, levels=levels)
    log: list[str] = []
    model = tokenizers.train_image_autoencoder(train_images, cfg, size.ae_train, log=log.append)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / f"{autoencoder_id(image_size, levels)}.pt")
    ids = model.encode_batch(test_images)
    reconstructed = to_8x8(model.decode_batch(ids)) * 16
    resampled = to_8x8(test_images) * 16  # the test images up and down again: the resizing alone
    label = f"AE{image_size} {levels_name(levels)}"
    return {
        "kind": "autoencoder", "label": label, "image_size": image_size, "levels": list(levels),
        **image_fidelity(reconstructed, ids, model.vocab_size, held),
        "resampled_mse": mse_01(resampled, held.test_images),
        "judge_resampled": held.judges.image.accuracy(resampled, held.test_labels),
        "train_steps": size.ae_train.steps, "train_batch": size.ae_train.batch, "train_log": log[-1] if log else "",
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# 4. Audio codecs
# ----------------------------------------------------------------------------------------------


def codec_spec(cid: str, size: Size) -> tuple[tuple[int, ...], int]:
    """The (levels, frames_per_token) of a trained codec's id."""
    for levels, frames in size.codecs:
        if codec_id(levels, frames) == cid:
            return levels, frames
    raise SystemExit(f"no codec {cid!r} in size {size.name!r}; the codecs are {[codec_id(*c) for c in size.codecs]}")


def codec_file(cid: str, held: Heldout, size: Size, folder: Path) -> Path:
    """The codec's file: the committed one, or a codec trained now if its file is not there yet."""
    if cid == COMMITTED:
        return DEFAULT_AUDIO_CODEC
    path = folder / f"{cid}.pt"
    if not path.is_file():
        levels, frames = codec_spec(cid, size)
        cfg = AudioCodecConfig(sample_rate=held.sample_rate, levels=levels, frames_per_token=frames)
        say(f"training {cid}: {cfg.tokens_per_clip} tokens per clip, vocab {math.prod(levels)}")
        log = lambda line: say(f"  {line}")  # noqa: E731
        codec = tokenizers.train_audio_codec(held.train_clips, cfg, size.codec_train, log=log)
        folder.mkdir(parents=True, exist_ok=True)
        codec.save(path)
    return path


def spectral_errors(codec: AudioCodec, clips: Sequence[np.ndarray]) -> dict[str, float]:
    """L1 between the decoder's and the clip's features, normalized (the training loss) and as log-magnitudes
    ln(|S| + floor) (the same units for every codec), before Griffin-Lim; clips at the window's start."""
    x = torch.from_numpy(np.stack([fit_length(c, codec.n_samples) for c in clips]))
    with torch.no_grad():
        mag = codec.magnitudes(x)
        predicted = codec(x)
        decoded = (torch.exp(predicted * codec.feat_std + codec.feat_mean) - codec.log_floor).clamp_min(0.0)
        feature_l1 = (predicted - codec.features(mag)).abs().mean()
        logmag_l1 = (torch.log(decoded + codec.log_floor) - torch.log(mag + codec.log_floor)).abs().mean()
    return {"feature_l1": float(feature_l1), "logmag_l1": float(logmag_l1)}


def shown(path: Path) -> str:
    """A path as results record it: relative to the repository when inside it (the same on every machine)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def codec_record(cid: str, held: Heldout, size: Size, folder: Path) -> dict:
    """Train (unless committed), reload what was saved, and judge a codec on the test clips."""
    path = codec_file(cid, held, size, folder)
    codec = load_codec(path)
    accuracy = tokenizers.audio_report(codec, held.test_clips, held.clip_labels, held.judges.speech, cid)
    ids = codec.encode_batch(held.test_clips)
    levels, frames = codec.cfg.levels, codec.cfg.frames_per_token
    trained = "committed" if cid == COMMITTED else f"{size.codec_train.steps} steps"
    return {
        "kind": "codec", "label": f"{levels_name(levels)} F{frames} ({trained})", "modality": "audio",
        "levels": list(levels), "frames_per_token": frames, "committed": cid == COMMITTED,
        "train_steps": None if cid == COMMITTED else size.codec_train.steps,
        "tokens_per_item": codec.tokens_per_clip, "vocab_size": codec.vocab_size,
        "bits_per_item": codec.tokens_per_clip * math.log2(codec.vocab_size),
        **spectral_errors(codec, held.test_clips),
        "judge_accuracy": accuracy["codec"], "judge_original": accuracy["original"],
        "judge_griffin_lim": accuracy["griffin_lim_exact"],
        "codes_used": len(np.unique(ids)), "test_items": len(held.test_clips),
        "path": shown(path), "sha256": file_sha256(path),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# 5. Models trained on each tokenizer, at an equal token budget
# ----------------------------------------------------------------------------------------------


def seq_len_for(media_tokens: int, default_media_tokens: int) -> int:
    """The row length that keeps the default row's text slot: the media's tokens more or fewer."""
    return data_lib.DataConfig.seq_len + media_tokens - default_media_tokens


def image_run_options(levels: int, patch: int) -> tuple[list[str], int]:
    tok = PixelTokenizer(levels, patch)
    seq_len = seq_len_for(tok.tokens_per_image, DEFAULT_IMAGE_TOKENS)
    mix = ["--mix_text=0", "--mix_audio_text=0", "--mix_image_text=1"]
    return [*mix, f"--image_levels={levels}", f"--image_patch={patch}", f"--seq_len={seq_len}"], seq_len


def audio_run_options(codec_path: Path) -> tuple[list[str], int]:
    seq_len = seq_len_for(load_codec(codec_path).tokens_per_clip, DEFAULT_AUDIO_TOKENS)
    mix = ["--mix_text=0", "--mix_image_text=0", "--mix_audio_text=1"]
    return [*mix, f"--audio_codec={shown(codec_path)}", f"--seq_len={seq_len}"], seq_len


def train_run(run_dir: Path, options: Sequence[str], size: Size, seed: int) -> tuple[list[str], dict, float]:
    """One train.main run in this process, its output in run_dir/train.log; (argv, result, seconds)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: nothing left of an interrupted one
    run_dir.mkdir(parents=True)
    argv = [
        *options, f"--tokens={size.run_tokens:g}", f"--seed={seed}", f"--out_dir={run_dir}", "--final_report=false",
        "--eval_every=0", "--eval_batches=1", "--ckpt_every=0", "--log_every=25", "--dtype=fp32", *size.run_options,
    ]  # fmt: skip
    t0 = time.perf_counter()
    with (run_dir / "train.log").open("w") as log, contextlib.redirect_stdout(log), data_built_once():
        result = train.main(argv)
    return argv, result, time.perf_counter() - t0


def judge_run(ckpt: Path, task: str, size: Size, held: Heldout, seed: int) -> dict:
    """Test NELBO of the media part per item and per token, of the text part per token, and the judged task."""
    inf = load_for_inference(ckpt)
    built = shared_data(replace(inf.data_config, audio_speeds=()))  # held-out rows never hear speed copies
    est = evaluate.nelbo_bits(inf.model, built, task, "test", size.eval_batches, size.eval_rows, seed)
    media, n = data_lib.MEDIA[task], built.layout.media_len(task)
    if task == "image_text":
        gen = evaluate.text_to_image(inf, held.judges, sample_lib.PRESETS["t2i"], size.per_digit, seed)
    else:
        gen = evaluate.text_to_speech(inf, held.judges, sample_lib.PRESETS["t2s"], size.per_digit, seed)
    return {
        "bits_per_item": est[media].mean * n, "bits_per_item_se": est[media].se * n,
        "bits_per_token": est[media].mean, "text_bits_per_token": est["text"].mean,
        "generation_task": "t2i" if task == "image_text" else "t2s", "generation_accuracy": float(gen["accuracy"]),
        "params": inf.model.num_parameters(), "params_body": inf.model.num_parameters(body_only=True),
    }  # fmt: skip


def run_record(rid: str, held: Heldout, size: Size, seed: int, runs: Path) -> dict:
    """Train and judge the model of one run id: run_image_L<levels>_P<patch> or run_audio_<codec id>."""
    if rid.startswith("run_image_"):
        levels, patch = (int(p[1:]) for p in rid.removeprefix("run_image_").split("_"))
        options, seq_len = image_run_options(levels, patch)
        task, tokenizer, tok = "image_text", pixel_id(levels, patch), PixelTokenizer(levels, patch)
        tokens, vocab, label = tok.tokens_per_image, tok.vocab_size, f"pixels L{levels} P{patch}"
    else:
        tokenizer = rid.removeprefix("run_audio_")
        path = codec_file(tokenizer, held, size, runs / "tokenizers")
        options, seq_len = audio_run_options(path)
        codec = load_codec(path)
        task, tokens, vocab = "audio_text", codec.tokens_per_clip, codec.vocab_size
        trained = "committed" if tokenizer == COMMITTED else f"{size.codec_train.steps} steps"
        label = f"{levels_name(codec.cfg.levels)} F{codec.cfg.frames_per_token} ({trained})"
    say(f"training {rid}: seq_len {seq_len}, {size.run_tokens:g} tokens")
    run_dir = runs / f"{rid}_s{seed}"
    argv, result, seconds = train_run(run_dir, options, size, seed)
    t0 = time.perf_counter()
    judged = judge_run(run_dir / "ckpt.pt", task, size, held, seed)
    items = result["tokens"] // (2 * seq_len)  # anti-masking: every item is two rows, its mask and the complement
    return {
        "kind": "run", "label": label, "modality": data_lib.MEDIA[task], "tokenizer": tokenizer,
        "tokens_per_item": tokens, "vocab_size": vocab, "seq_len": seq_len, "seed": seed,
        "steps": result["step"], "tokens": result["tokens"], "items_seen": items,
        **judged, "train_s": seconds, "eval_s": time.perf_counter() - t0, "args": argv,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# 6. The figures, the summary, the table
# ----------------------------------------------------------------------------------------------

COLORS = {"pixel": "C0", "autoencoder": "C1", "codec": "C2", "committed": "C3"}
LEGEND = {"pixel": "PixelTokenizer", "autoencoder": "FSQ autoencoder", "codec": "codec, short-trained",
          "committed": "the committed codec"}  # fmt: skip


def family(r: Mapping) -> str:
    return "committed" if r.get("committed") else r["kind"]


def spread(ys: Sequence[float], gap: float, top: float) -> list[float]:
    """Label heights for sorted ys: each at least ``gap`` above the one below, none above ``top``."""
    placed: list[float] = []
    for y in ys:
        placed.append(max(y, placed[-1] + gap) if placed else y)
    for i in reversed(range(len(placed))):  # push down from the top what went past it
        placed[i] = min(placed[i], top if i == len(placed) - 1 else placed[i + 1] - gap)
    return placed


def annotate_column(ax: Axes, points: list[tuple[float, float, str]], gap: float, top: float) -> None:
    """Labels to the right of points sharing one x, spread vertically (leader lines to the points)."""
    points = sorted(points, key=lambda p: p[1])
    for (x, y, text), ty in zip(points, spread([p[1] for p in points], gap, top), strict=True):
        ax.annotate(text, (x, y), xytext=(x * 1.15, ty), fontsize=5.5, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.3, "color": "0.6"})  # fmt: skip


def token_axis(ax: Axes, tokens: Sequence[int]) -> None:
    """A log-2 x axis of tokens per item, ticked at the values present, room for labels on the right."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(tokens)), [str(t) for t in sorted(set(tokens))])
    ax.set_xticks([], minor=True)
    ax.set_xlim(min(tokens) / 1.6, max(tokens) * 3.2)
    ax.set_xlabel("tokens per item")


def fidelity_panel(
    ax: Axes, records: Sequence[dict], ceilings: Mapping[str, float], title: str, ylabel: str, zoom: bool = False
) -> None:
    """Judged accuracy against tokens per item, every point labelled; ``zoom``: the y axis from just below the
    lowest point, not from 0."""
    low = max(0.0, min(r["judge_accuracy"] for r in records) - 0.08) if zoom else 0.0
    low, high = (low - 0.02, 1.02) if low > 0 else (-0.02, 1.06)
    for fam in dict.fromkeys(family(r) for r in records):
        pts = [r for r in records if family(r) == fam]
        ax.scatter([r["tokens_per_item"] for r in pts], [r["judge_accuracy"] for r in pts], s=18,
                   color=COLORS[fam], label=LEGEND[fam], zorder=3)  # fmt: skip
    for x in sorted({r["tokens_per_item"] for r in records}):
        column = [(x, r["judge_accuracy"], f"{r['label']}, V={r['vocab_size']}") for r in records
                  if r["tokens_per_item"] == x]  # fmt: skip
        annotate_column(ax, column, gap=0.032 * (high - low), top=high - 0.02 * (high - low))
    for (name, value), style in zip(ceilings.items(), ("--", ":"), strict=False):
        ax.axhline(value, color="0.3", lw=0.8, ls=style, label=f"{name} {value:.3f}")
    token_axis(ax, [r["tokens_per_item"] for r in records])
    ax.set(ylabel=ylabel, title=title, ylim=(low, high))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")


def plot_fidelity(records: Sequence[dict], path: Path) -> None:
    images = [r for r in records if r["kind"] in ("pixel", "autoencoder")]
    audio = [r for r in records if r["kind"] == "codec"]
    fig, axes = new_figure(2, width=6.2, height=5.2)
    if images:
        ceiling = {"real test images": images[0]["judge_real"]}
        if resized := [r["judge_resampled"] for r in images if r["kind"] == "autoencoder" and r["image_size"] != 8]:
            ceiling["real, resized up and back (worst size)"] = min(resized)
        fidelity_panel(axes[0], images, ceiling, "images: 8x8 digits, test split", "digit judge accuracy", zoom=True)
    if audio:
        original, griffin_lim = audio[0]["judge_original"], audio[0]["judge_griffin_lim"]
        ceiling = {"original clips": original, "Griffin-Lim of exact |S|": griffin_lim}
        fidelity_panel(axes[1], audio, ceiling, "audio: spoken digits, test split", "pocketsphinx digit accuracy")
    save_figure(fig, path)


def plot_model_bits(records: Sequence[dict], path: Path) -> None:
    """Each run's test NELBO of its media part, bits per item, against tokens per item."""
    fig, axes = new_figure(2, width=5.0, height=3.9)
    for ax, modality in zip(axes, ("image", "audio"), strict=True):
        runs = [r for r in records if r["modality"] == modality]
        if not runs:
            continue
        ax.errorbar([r["tokens_per_item"] for r in runs], [r["bits_per_item"] for r in runs],
                    yerr=[r["bits_per_item_se"] for r in runs], fmt="o", ms=4, capsize=2)  # fmt: skip
        task = runs[0]["generation_task"]
        for r in runs:
            ax.annotate(f"{r['label']}, V={r['vocab_size']}\n{task} {r['generation_accuracy']:.2f}",
                        (r["tokens_per_item"], r["bits_per_item"]), xytext=(4, 2), textcoords="offset points",
                        fontsize=6)  # fmt: skip
        token_axis(ax, [r["tokens_per_item"] for r in runs])
        ax.set(ylabel=f"test NELBO, bits per {modality}", title=f"{modality}-text runs")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


TABLES = {  # summary table -> (kinds of line, columns)
    "images": (("pixel", "autoencoder"), ("tokens_per_item", "vocab_size", "bits_per_item", "mse", "judge_accuracy")),
    "audio": (("codec",), ("tokens_per_item", "vocab_size", "bits_per_item", "logmag_l1", "judge_accuracy")),
    "runs": (("run",), ("tokens_per_item", "vocab_size", "seq_len", "items_seen", "bits_per_item", "bits_per_item_se",
                        "generation_task", "generation_accuracy")),
}  # fmt: skip


def table_rows(records: Sequence[dict], table: str) -> list[dict]:
    kinds, columns = TABLES[table]
    return [{"id": r["id"], "tokenizer": r["label"], **{k: r[k] for k in columns}, "seconds": round(r["seconds"], 1)}
            for r in records if r["kind"] in kinds]  # fmt: skip


def summary(records: Sequence[dict], size: Size, seed: int) -> dict:
    """The numbers of the write-up: each tokenizer's and run's row, the ceilings, the wall time."""
    images = [r for r in records if r["kind"] in TABLES["images"][0]]
    audio = [r for r in records if r["kind"] == "codec"]
    return {
        "size": size.name,
        "seed": seed,
        "seconds": sum(r["seconds"] for r in records),
        "ceilings": {
            "image_judge_real": images[0]["judge_real"] if images else None,
            "speech_judge_original": audio[0]["judge_original"] if audio else None,
            "speech_judge_griffin_lim": audio[0]["judge_griffin_lim"] if audio else None,
        },
        **{table: table_rows(records, table) for table in TABLES},
    }


# ----------------------------------------------------------------------------------------------
# 7. The study
# ----------------------------------------------------------------------------------------------


def planned(size: Size) -> list[str]:
    """Every line of a size, in the order they are made."""
    return [
        *(pixel_id(*p) for p in size.pixels),
        *(autoencoder_id(*a) for a in size.autoencoders),
        COMMITTED,
        *(codec_id(*c) for c in size.codecs),
        *(f"run_image_L{levels}_P{patch}" for levels, patch in size.image_runs),
        *(f"run_audio_{c}" for c in size.audio_runs),
    ]


def make_record(rid: str, held: Heldout, size: Size, seed: int, runs: Path) -> dict:
    """The line of one planned id (``planned``): a tokenizer measured, or a run trained and judged."""
    if rid.startswith("pixel_"):
        levels, patch = (int(p[1:]) for p in rid.removeprefix("pixel_").split("_"))
        return pixel_record(levels, patch, held)
    if rid.startswith("ae_"):
        image_size, levels = next((s, lv) for s, lv in size.autoencoders if autoencoder_id(s, lv) == rid)
        return autoencoder_record(image_size, levels, held, replace_seed(size, seed), runs / "tokenizers")
    if rid.startswith("codec_"):
        return codec_record(rid, held, replace_seed(size, seed), runs / "tokenizers")
    return run_record(rid, held, replace_seed(size, seed), seed, runs)


def replace_seed(size: Size, seed: int) -> Size:
    """The size with its tokenizers trained from ``seed``."""
    return replace(size, ae_train=replace(size.ae_train, seed=seed), codec_train=replace(size.codec_train, seed=seed))


def run_study(size: Size, out: Path, runs: Path, seed: int = 0) -> dict:
    """Make every missing line of the size, then the figures, the summary and the table."""
    results = Results(out / "results.jsonl")
    held: Heldout | None = None
    for rid in planned(size):
        if results.done(rid, size.name, seed=seed):
            continue
        held = held or held_out(size)
        t0 = time.perf_counter()
        record = make_record(rid, held, size, seed, runs / size.name)
        record = {"id": rid, "size": size.name, "seed": seed, **record, "seconds": time.perf_counter() - t0}
        results.add(record)
        say(f"{rid}: {record['seconds']:.1f} s")
    records = [r for r in results.records(size.name) if r["id"] in planned(size) and r["seed"] == seed]
    plot_fidelity(records, out / "fidelity_vs_tokens.png")
    plot_model_bits([r for r in records if r["kind"] == "run"], out / "model_bits.png")
    result = summary(records, size, seed)
    (out / "summary.json").write_text(json.dumps(strict_json(result), indent=1) + "\n")
    for table in TABLES:
        say(f"\n{table}:\n{format_table(result[table])}")
    say(f"total measured time {result['seconds'] / 60:.1f} min")
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lab.tokenizer_study", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=tuple(SIZES), default="quick", help="smoke (seconds, the tests) or quick")
    p.add_argument("--out", default="lab/studies/tokenizers", help="results.jsonl, summary.json and figures")
    p.add_argument("--runs", default="runs/tokenizer_study", help="trained tokenizers and model runs")
    p.add_argument("--seed", type=int, default=0, help="seed of every tokenizer's training and every run")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return run_study(SIZES[args.size], out, Path(args.runs), args.seed)
    except FileNotFoundError as e:  # the embedded data or a tokenizer file missing
        raise SystemExit(f"tokenizer_study: {e}") from None


if __name__ == "__main__":
    main()
