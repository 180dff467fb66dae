"""Evaluation: how good are a trained model's likelihoods and generations?

1. Judges, small offline models trained or configured from the repository's data, never downloaded:
   ``SpeechJudge`` (pocketsphinx, whose English model ships in its wheel, held by a JSGF grammar to the ten
   digit words) for text-to-speech; ``DigitImageJudge`` (an MLP on scikit-learn's 8x8 digits) for text-to-image.
2. Likelihood: the NELBO per modality in bits (``mdm.nelbo``) on held-out rows, with a standard error.
3. Generation: every cross-modal task judged (``text_to_image``, ``media_to_text``, ``text_to_speech``)
   and unconditional text judged by the autoregressive twin (``text_sample_quality``).
4. Reports: ``report`` writes report.json, report.md, sample grids, spectrograms and WAV files;
   ``plot_losses`` draws a run's loss curves. ``python evaluate.py --checkpoint CKPT`` runs it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data as data_lib
import fsq
import mdm
import sample as sample_lib
import shards
from checkpoint import load_for_inference
from data import DIGIT_WORDS, resample
from model import Denoiser


# --- 1. Judges ------------------------------------------------------------------------------------
class SpeechJudge:
    """Offline digit recognition with pocketsphinx and a one-word JSGF grammar.

    ``recognize(wave, sample_rate)`` returns the recognized word ("" when the decoder finds none). The wave is
    resampled to 16 kHz (the rate of pocketsphinx's en-us model), peak-normalized, and padded with ``pad_seconds``
    of silence on both sides (the decoder needs some silence to find the word boundaries).

    Trap: ``pocketsphinx.Decoder(jsgf=<grammar text>)`` segfaults; the grammar is added with
    ``add_jsgf_string`` and switched on with ``activate_search``.
    """

    MODEL_RATE = 16000

    def __init__(self, words: Sequence[str] = DIGIT_WORDS, pad_seconds: float = 0.25) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("SpeechJudge needs pocketsphinx: pip install pocketsphinx") from e
        self.words = tuple(words)
        self.pad_seconds = pad_seconds
        self.decoder = Decoder(loglevel="FATAL")
        grammar = "#JSGF V1.0;\ngrammar digits;\npublic <digit> = " + " | ".join(self.words) + " ;\n"
        self.decoder.add_jsgf_string("digits", grammar)
        self.decoder.activate_search("digits")

    def recognize(self, wave: np.ndarray, sample_rate: int) -> str:
        x = resample(np.asarray(wave, dtype=np.float32).reshape(-1), sample_rate, self.MODEL_RATE)
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > 0:
            x = 0.9 * x / peak
        pad = np.zeros(int(self.pad_seconds * self.MODEL_RATE), dtype=np.float32)
        pcm = (np.concatenate([pad, x, pad]) * 32767).astype(np.int16)
        self.decoder.start_utt()
        self.decoder.process_raw(pcm.tobytes(), no_search=False, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    def recognize_all(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        return [self.recognize(w, sample_rate) for w in waves]

    def accuracy(self, waves: Sequence[np.ndarray], labels: Sequence[int], sample_rate: int) -> float:
        """Fraction of waves recognized as the word ``self.words[label]``."""
        if len(waves) != len(labels) or len(waves) == 0:
            raise ValueError(f"need as many labels as waves (and at least one): {len(waves)} vs {len(labels)}")
        said = self.recognize_all(waves, sample_rate)
        return float(np.mean([s == self.words[int(y)] for s, y in zip(said, labels, strict=True)]))


class DigitImageJudge:
    """A digit classifier (an MLP with one hidden layer of ``hidden`` ReLU units) for 8x8 images with gray
    levels 0..16 as in scikit-learn's digits: (N, 8, 8) or (N, 64), integers or floats in [0, 16]."""

    def __init__(self, hidden: int = 64, seed: int = 0) -> None:
        self.hidden, self.seed, self.model = hidden, seed, None

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
        if x.shape[1] != 64:
            raise ValueError(f"DigitImageJudge expects 8x8 images (64 pixels), got {x.shape[1]} pixels")
        return x / 16.0

    def fit(self, images: np.ndarray, labels: np.ndarray) -> DigitImageJudge:
        from sklearn.neural_network import MLPClassifier

        self.model = MLPClassifier(hidden_layer_sizes=(self.hidden,), alpha=1e-3, max_iter=600, random_state=self.seed)
        self.model.fit(self._flat(images), np.asarray(labels))
        return self

    def predict(self, images: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("DigitImageJudge: call fit(images, labels) first")
        return self.model.predict(self._flat(images))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))


# --- 2. Likelihood: per-modality NELBO in bits, with a standard error -----------------------------
LN2 = math.log(2)


@dataclass
class Estimate:
    """A mean with its standard error (both in bits per token unless said otherwise)."""

    mean: float
    se: float

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.se:.4f}"


def nelbo_bits(
    model: Denoiser,
    data: data_lib.TriModalData,
    task: str,
    split: str = "test",
    batches: int = 16,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Estimate]:
    """NELBO per data token of each modality (and "all"), in bits, on ``task`` rows of a held-out split.

    With S_b the bits and N_b the data tokens of a modality in batch b = 1..B:

        mean = sum_b S_b / sum_b N_b,        se = std_b(S_b / N_b) / sqrt(B)

    The variance is low by construction: t is stratified over each batch (one t per stratum of [t_min, 1 - t_min]).
    The causal twin (``model.cfg.causal``) scores the same rows exactly by next-token NLL. For text rows, "bytes"
    is bits per UTF-8 byte of the text the rows hold (what compares across tokenizers).
    """
    it = data_lib.BatchIterator(data, split, batch_size, {task: 1.0}, seed=seed)
    device = next(model.parameters()).device
    sums, counts, per_byte = [], [], []
    with torch.no_grad():
        for k in range(batches):
            b = it.batch(k)
            if model.cfg.causal:
                c = mdm.next_token_batch(b.ids, b.pad, data.vocab)
            else:
                g = torch.Generator().manual_seed(seed * 7919 + k)
                c = mdm.corrupt(b.ids, b.pad, data.vocab, mdm.Schedule("linear"), stratified=True, generator=g)
            r = mdm.nelbo(model.nll_at, c.to(device), data.vocab)
            sums.append(r.modality_sums.cpu().double() / LN2)
            counts.append(r.modality_counts.cpu().double())
            if task == "text":
                per_byte.append(float(sums[-1].sum()) / max(1, _text_bytes(b.ids, data.vocab, data.text_tokenizer)))
    s, n = torch.stack(sums), torch.stack(counts)  # (B, modalities), then a column for "all"
    s, n = torch.cat([s, s.sum(1, keepdim=True)], 1), torch.cat([n, n.sum(1, keepdim=True)], 1)
    out = {}
    for i, m in enumerate((*mdm.MODALITIES, "all")):
        seen = n[:, i] > 0
        if seen.any():
            out[m] = Estimate(float(s[:, i].sum() / n[:, i].sum()), _standard_error(s[seen, i] / n[seen, i]))
    if per_byte:
        out["bytes"] = Estimate(float(np.mean(per_byte)), _standard_error(per_byte))
    return out


def _standard_error(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def _text_bytes(ids: torch.Tensor, vocab: mdm.Vocab, tok: data_lib.TextTokenizer) -> int:
    start = vocab.block_start("text")
    content = ids[(ids >= start) & (ids < start + vocab.text)] - start
    return len(tok.decode_bytes(content.tolist()))


def likelihood_report(model: Denoiser, data: data_lib.TriModalData, split: str = "test", batches: int = 16) -> dict:
    """NELBO (or the twin's NLL) in bits: text rows (per token and per byte), and each pair's parts."""
    text, image, audio = (nelbo_bits(model, data, t, split, batches) for t in ("text", "image_text", "audio_text"))
    return {
        "text_bits_per_token": text["text"],
        "text_bits_per_byte": text["bytes"],
        "image_bits_per_token": image["image"],
        "caption_bits_per_token": image["text"],
        "audio_bits_per_token": audio["audio"],
        "transcript_bits_per_token": audio["text"],
    }


# --- 3. Generation: each cross-modal task judged offline ------------------------------------------
@dataclass
class Judges:
    """The judges, trained on the training split of the data a model was trained on."""

    image: DigitImageJudge
    speech: SpeechJudge
    sample_rate: int


DIGIT_VIEW = fsq.PixelTokenizer(levels=17, patch=1)  # the judge's view: 8x8 pixels, gray levels 0 .. 16


def judge_view(tok, images: Sequence[np.ndarray]) -> np.ndarray:
    """Images in a tokenizer's own form (``decode``) as the digit judge reads them: the pixel tokenizer's already
    are; an autoencoder's are area-averaged down to 8x8 gray levels (``PixelTokenizer.from_picture``)."""
    if isinstance(tok, fsq.PixelTokenizer):
        return np.stack(images)
    return np.stack([DIGIT_VIEW.from_picture(tok.to_picture(x)) for x in images])


def fit_judges(data: data_lib.TriModalData) -> Judges:
    img = data.pairs["image_text"]["train"]
    image = DigitImageJudge().fit(judge_view(data.image_tokenizer, img.raw), img.labels.numpy())
    return Judges(image, SpeechJudge(), data.audio_codec.sample_rate)


def ceilings(data: data_lib.TriModalData, judges: Judges, split: str = "test") -> dict[str, float]:
    """What each judge scores on real held-out data, raw and through the tokenizer: the best a generator can get."""
    img, aud = data.pairs["image_text"][split], data.pairs["audio_text"][split]
    codec, tok, rate = data.audio_codec, data.image_tokenizer, judges.sample_rate
    through = [codec.decode(codec.encode(w)) for w in aud.raw]
    tokenized = judge_view(tok, [tok.decode(tok.encode(x)) for x in img.raw])
    return {
        "image_judge_on_real": judges.image.accuracy(judge_view(tok, img.raw), img.labels.numpy()),
        "image_judge_on_tokens": judges.image.accuracy(tokenized, img.labels.numpy()),
        "speech_judge_on_real": judges.speech.accuracy(aud.raw, aud.labels.tolist(), rate),
        "speech_judge_on_codec": judges.speech.accuracy(through, aud.labels.tolist(), rate),
    }


def digit_prompts(per_digit: int, transcripts: bool = False) -> tuple[list[str], np.ndarray]:
    """Prompts naming each digit ``per_digit`` times: the caption templates in turn, or the bare word."""
    pairs = [(d, j) for d in range(10) for j in range(per_digit)]
    prompts = [DIGIT_WORDS[d] if transcripts else data_lib.digit_captions(d)[j % 10] for d, j in pairs]
    return prompts, np.array([d for d, _ in pairs])


def _cost(s: sample_lib.Sample) -> dict:
    """nfe: network passes of the batch; row_nfe: per row, the passes that carried it; tokens: positions a row
    generated, and tokens_per_nfe their ratio."""
    rows = s.ids.shape[0]
    tokens = float((s.order >= 0).sum()) / rows
    row_nfe = s.row_evals / rows
    cost = {"nfe": s.nfe, "row_nfe": row_nfe, "tokens": tokens, "tokens_per_nfe": tokens / max(row_nfe, 1e-9)}
    return {**cost, "seconds_per_sample": s.seconds_per_sample}


def text_to_image(inf, judges: Judges, cfg, per_digit: int = 10, seed: int = 0) -> dict:
    """Generate digits from captions; the image judge must read back the digit the caption names."""
    prompts, labels = digit_prompts(per_digit)
    texts = [inf.text_tokenizer.encode(p) for p in prompts]
    _, s = sample_lib.generate(inf.model, inf.layout, "t2i", cfg, texts=texts, seed=seed)
    images = np.stack([inf.image_tokenizer.decode(sample_lib.decode_media(r, inf.layout, "t2i")) for r in s.ids])
    accuracy = judges.image.accuracy(judge_view(inf.image_tokenizer, images), labels)
    return {"accuracy": accuracy, **_cost(s), "images": images, "prompts": prompts}


def media_to_text(inf, pairs: data_lib.PairData, task: str, cfg, seed: int = 0, limit: int | None = None) -> dict:
    """i2t / s2t: caption held-out images or transcribe held-out clips; the text must name the digit."""
    n = len(pairs) if limit is None else min(limit, len(pairs))
    _, s = sample_lib.generate(inf.model, inf.layout, task, cfg, media=[pairs.media[i] for i in range(n)], seed=seed)
    texts = [sample_lib.decode_text(r, inf.layout, task, inf.text_tokenizer) for r in s.ids]
    labels = pairs.labels[:n].tolist()
    accuracy = float(np.mean([data_lib.digit_named_in(t) == y for t, y in zip(texts, labels, strict=True)]))
    return {"accuracy": accuracy, **_cost(s), "texts": texts, "labels": labels}


def text_to_speech(inf, judges: Judges, cfg, per_digit: int = 10, seed: int = 0) -> dict:
    """Speak each digit word; pocketsphinx (digit grammar) must recognize it."""
    prompts, labels = digit_prompts(per_digit, transcripts=True)
    texts = [inf.text_tokenizer.encode(p) for p in prompts]
    _, s = sample_lib.generate(inf.model, inf.layout, "t2s", cfg, texts=texts, seed=seed)
    ids = np.stack([sample_lib.decode_media(r, inf.layout, "t2s") for r in s.ids])
    waves = list(inf.audio_codec.decode_batch(ids))
    accuracy = judges.speech.accuracy(waves, labels.tolist(), judges.sample_rate)
    return {"accuracy": accuracy, **_cost(s), "waves": waves, "prompts": prompts}


def text_sample_quality(
    rows: torch.Tensor, vocab: mdm.Vocab, ar_model: Denoiser | None = None, pad: torch.Tensor | None = None
) -> dict:
    """Unconditional text, judged two ways: the AR twin's NLL of the samples and their unigram entropy.

    rows (B, L): finished text rows (TASK_text then text ids); pad (B, L) their padding, if any.

        ar_bits_per_token    = -1/N sum_i log2 p_AR(x_i | x_<i)   over the samples' N text tokens
        unigram_entropy_bits = -sum_v p_v log2 p_v                 p: the samples' pooled token histogram

    The first is the "generative perplexity" of MDLM and others, in bits: how natural the text looks to an
    independent model trained on the same data. Low is better only together with the second: a sampler that
    repeats one word scores a low NLL and a low entropy. Compare both with real held-out text.
    """
    pad = torch.zeros_like(rows, dtype=torch.bool) if pad is None else pad
    start = vocab.block_start("text")
    text_ids = rows[(rows >= start) & (rows < start + vocab.text) & ~pad]
    counts = torch.bincount(text_ids.flatten(), minlength=1).double()
    p = counts[counts > 0] / counts.sum()
    out = {"unigram_entropy_bits": float(-(p * p.log2()).sum()), "tokens": int(text_ids.numel())}
    if ar_model is not None:
        c = mdm.next_token_batch(rows, pad, vocab)
        with torch.no_grad():
            nll = mdm.nelbo(ar_model.nll_at, c.to(next(ar_model.parameters()).device), vocab).loss
        out["ar_bits_per_token"] = float(nll) / LN2
    return out


# --- 4. Reports: JSON, a markdown table, sample grids, spectrograms and audio files ---------------
def _plot_spectrograms(path: Path, waves: list[np.ndarray], labels: list[str], sample_rate: int) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch

    fig = Figure(figsize=(2.0 * len(waves), 2.2))
    for i, (w, label) in enumerate(zip(waves, labels, strict=True)):
        ax = fig.add_subplot(1, len(waves), i + 1)
        ax.specgram(np.asarray(w, dtype=np.float64) + 1e-9, NFFT=256, Fs=sample_rate, noverlap=192, cmap="magma")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(
    checkpoint: str | Path,
    out: str | Path,
    ar_checkpoint: str | Path | None = None,
    per_digit: int = 10,
    batches: int = 16,
    limit: int | None = None,
    seed: int = 0,
) -> dict:
    """Everything about one checkpoint: likelihoods, every generation task against its judge, samples.

    Writes ``out/report.json``, ``out/report.md`` and figures; returns the JSON dict.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    inf = load_for_inference(checkpoint)
    ar = load_for_inference(ar_checkpoint).model if ar_checkpoint else None
    sha = fsq.file_sha256(inf.data_config.audio_codec)
    data = shards.open_shards(shards.prepared(inf.data_config, sha), sha, inf.data_config)
    judges, presets = fit_judges(data), sample_lib.PRESETS
    test_img = data.pairs["image_text"]["test"]
    res: dict = {"checkpoint": str(checkpoint), "step": inf.step}
    res["likelihood"] = likelihood_report(inf.model, data, batches=batches)
    if ar is not None:
        res["ar_likelihood"] = likelihood_report(ar, data, batches=batches)
    res["ceilings"] = ceilings(data, judges)
    t2i = text_to_image(inf, judges, presets["t2i"], per_digit, seed)
    i2t = media_to_text(inf, test_img, "i2t", presets["i2t"], seed, limit)
    s2t = media_to_text(inf, data.pairs["audio_text"]["test"], "s2t", presets["s2t"], seed, limit)
    t2s = text_to_speech(inf, judges, presets["t2s"], per_digit, seed)
    _, text = sample_lib.generate(inf.model, inf.layout, "text", presets["text"], texts=[()] * 16, seed=seed)
    texts = [sample_lib.decode_text(r, inf.layout, "text", inf.text_tokenizer) for r in text.ids]
    real = data_lib.BatchIterator(data, "test", 16, {"text": 1.0}, seed=seed).batch(0)
    res["text_generation"] = {
        "samples": text_sample_quality(text.ids, data.vocab, ar),
        "real_test_text": text_sample_quality(real.ids, data.vocab, ar, real.pad),
    }
    tasks = {"t2i": t2i, "i2t": i2t, "s2t": s2t, "t2s": t2s}
    bulky = ("images", "waves", "texts", "labels", "prompts")
    res["generation"] = {name: {k: v for k, v in m.items() if k not in bulky} for name, m in tasks.items()}
    res["samplers"] = {k: v.to_dict() for k, v in presets.items()}
    res["text_samples"] = texts
    res["examples"] = {
        "i2t": [{"label": y, "caption": c} for y, c in zip(i2t["labels"][:10], i2t["texts"][:10], strict=True)],
        "s2t": [{"label": y, "transcript": c} for y, c in zip(s2t["labels"][:10], s2t["texts"][:10], strict=True)],
    }
    res["seconds"] = time.perf_counter() - t0
    pick = [d * per_digit + j for d in range(10) for j in range(min(per_digit, 4))]
    picture = inf.image_tokenizer.to_picture
    sample_lib.save_image_grid(
        out / "t2i.png", [picture(t2i["images"][i]) for i in pick], [t2i["prompts"][i] for i in pick]
    )
    caps = [ascii(c) for c in i2t["texts"][:16]]  # ascii: glyphs every font has
    sample_lib.save_image_grid(out / "i2t.png", [picture(x) for x in test_img.raw[:16]], caps)
    firsts = [d * per_digit for d in range(10)]
    waves = [t2s["waves"][i] for i in firsts]
    _plot_spectrograms(out / "t2s.png", waves, [t2s["prompts"][i] for i in firsts], judges.sample_rate)
    (out / "t2s").mkdir(exist_ok=True)
    sample_lib.save_wavs(out / "t2s", waves, judges.sample_rate)
    sample_lib.write_texts(out / "text_samples.txt", texts, ["unconditional"] * len(texts))
    (out / "report.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(res))
    return res


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Markdown table lines, after a blank line (floats with 3 decimals, None as an empty cell)."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v)  # noqa: E731
    lines = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def markdown(res: dict) -> str:
    """The report as markdown tables: each figure beside its judge's score on real data."""
    g, c, lk, ar = res["generation"], res["ceilings"], res["likelihood"], res.get("ar_likelihood", {})
    tg, s = res["text_generation"], res["samplers"]
    tasks = [  # (task, what is judged, the judge's score on real data through the tokenizer)
        ("t2i", "text-to-image: the digit judge reads the captioned digit", c["image_judge_on_tokens"]),
        ("i2t", "captioning: the caption names the digit", None),
        ("s2t", "speech recognition: the transcript names the digit", None),
        ("t2s", "text-to-speech: pocketsphinx (digit grammar) recognizes it", c["speech_judge_on_codec"]),
    ]
    lines = [f"# Evaluation of {res['checkpoint']} (step {res['step']})"]
    header = ["task (test split)", "accuracy", "judge on real data, through the tokenizer"]
    lines += table(header, [[what, g[t].get("accuracy"), ceiling] for t, what, ceiling in tasks])
    raw = f"digit judge {c['image_judge_on_real']:.3f}, pocketsphinx {c['speech_judge_on_real']:.3f}"
    lines += ["", f"Judges on the raw held-out data: {raw}."]
    header = ["likelihood (test split, bits)", "masked diffusion NELBO", "autoregressive twin NLL"]
    lines += table(header, [[k.replace("_", " "), v, ar.get(k)] for k, v in lk.items()])
    if ar:
        ratio = lk["text_bits_per_token"].mean / ar["text_bits_per_token"].mean
        lines += ["", f"Text NELBO / AR twin NLL = {ratio:.3f}."]
    rows = [(f"{len(res['text_samples'])} samples", tg["samples"]), ("real test text", tg["real_test_text"])]
    header = ["unconditional text", "unigram entropy (bits)", "AR twin NLL (bits/token)"]
    lines += table(header, [[w, q["unigram_entropy_bits"], q.get("ar_bits_per_token", "(pass --ar)")] for w, q in rows])
    settings = "{sampler}{at}, {steps} steps, {schedule}, T={temperature}, guidance {guidance}"
    at = {t: f" {s[t]['threshold']}" if s[t]["sampler"] == "threshold" else "" for t in g}
    cost = ("nfe", "row_nfe", "tokens_per_nfe", "seconds_per_sample")
    rows = [[t, settings.format(at=at[t], **s[t]), *(m[k] for k in cost)] for t, m in g.items()]
    header = ["sampler per task", "settings", "NFE (batch)", "NFE per row", "tokens per row NFE", "s per sample"]
    lines += table(header, rows)
    lines += ["", "Unconditional text samples:", ""] + [f"> {t[:300]!r}" for t in res["text_samples"][:4]]
    return "\n".join(lines) + "\n"


def final_report(checkpoint: str | Path, out: str | Path) -> dict:
    """What ``python train.py`` writes when its horizon is reached: samples of every task and the metrics."""
    res = report(checkpoint, Path(out) / "report")
    print((Path(out) / "report" / "report.md").read_text())
    return res


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Training loss and validation NELBO per modality (bits per token) against tokens seen."""
    from matplotlib.figure import Figure

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        (val if "val" in r else train).append(r)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] / LN2 for r in train], lw=0.8, alpha=0.6, label="train (all)")
    for m in (*mdm.MODALITIES, "all"):
        pts = [(r["tokens"], r["val"][m] / LN2) for r in val if math.isfinite(r["val"].get(m, math.nan))]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"val {m}")
    ax.set(xlabel="tokens seen", ylabel="NELBO (bits per data token)", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = sample_lib.ArgumentParser(prog="evaluate.py", description="Evaluate a trimodal-mdm checkpoint offline.")
    p.option("checkpoint", required=True, help="a checkpoint or export folder written by train.py")
    p.option("ar", default=None, help="a checkpoint of the autoregressive twin (train.py --objective=ar)")
    p.option("out", default=None, help="output folder (default: report/ next to the checkpoint)")
    p.option("per_digit", type=int, default=10, help="text-to-image and text-to-speech samples per digit")
    p.option("batches", type=int, default=16, help="batches of 64 rows per likelihood estimate")
    p.option("seed", type=int, default=0, help="the samplers' seed")
    args = p.parse_args(argv)
    out = args.out or str(Path(args.checkpoint).parent / "report")
    try:
        report(args.checkpoint, out, args.ar, args.per_digit, args.batches, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:  # expected: a missing or unreadable checkpoint
        sample_lib.fail(e, "evaluate.py")
    print(Path(out, "report.md").read_text())


if __name__ == "__main__":
    main()
