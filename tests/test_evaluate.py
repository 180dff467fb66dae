"""Tests of evaluate.py: the likelihood estimator in bits, the text judge and the end-to-end report of a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data as data_lib
import evaluate
import mdm
import sample
import train
from model import Denoiser, ModelConfig

# Two tiny runs of a few steps (an MDM and its autoregressive twin): the report's machinery, not quality.
SMALL = [
    "--d_model=32",
    "--n_layers=2",
    "--n_heads=2",
    "--batch_size=16",
    "--seq_len=48",
    "--tokens=6000",
    "--warmup_tokens=1000",
    "--eval_every=0",
    "--eval_batches=1",
    "--final_report=false",
]


@pytest.fixture(scope="module")
def tiny_data() -> data_lib.TriModalData:
    return data_lib.build_data(data_lib.DataConfig(audio_speeds=()))


def uniform_support(model: Denoiser, vocab: mdm.Vocab, modality: str) -> int:
    """How many ids a fresh model's distribution covers at a masked position of ``modality``."""
    x = torch.full((1, 4), vocab.mask(modality))
    logits = model(x)[0, 0]
    return int(torch.isfinite(logits).sum())


def test_nelbo_bits_of_an_untrained_model_is_log2_of_its_support(tiny_data) -> None:
    """The unembedding starts at zero, so p_theta is uniform over each modality's ids, and the NELBO
    is E_t[w(t) * beta(t)] * log2 |support| = log2 |support| bits per token: an exact target for the
    estimator (stratified t, pooled batches) that the standard error must cover."""
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(d_model=32, n_layers=1, n_heads=2), tiny_data.vocab)
    for task, modality in (("text", "text"), ("image_text", "image"), ("audio_text", "audio")):
        est = evaluate.nelbo_bits(model, tiny_data, task, "val", batches=6, batch_size=16)[modality]
        target = math.log2(uniform_support(model, tiny_data.vocab, modality))
        assert math.isfinite(est.se) and est.se > 0
        assert abs(est.mean - target) < 4 * est.se + 1e-3 * target, (task, est, target)
    text = evaluate.nelbo_bits(model, tiny_data, "text", "val", batches=3, batch_size=16)
    # Bits per byte: the same bits over the UTF-8 bytes the rows hold (BPE averages ~2.8 bytes/token).
    assert 1.5 < text["text"].mean / text["bytes"].mean < 4.0


def test_report_writes_every_task_beside_its_judge_and_the_ar_twin(tmp_path: Path) -> None:
    mdm_dir, ar_dir, out = tmp_path / "mdm", tmp_path / "ar", tmp_path / "report"
    train.main([*SMALL, f"--out_dir={mdm_dir}"])
    train.main([*SMALL, f"--out_dir={ar_dir}", "--objective=ar"])
    evaluate.main(
        [
            "--checkpoint",
            str(mdm_dir / "ckpt.pt"),
            "--ar",
            str(ar_dir / "ckpt.pt"),
            "--out",
            str(out),
            "--per-digit",
            "1",
            "--batches",
            "2",
        ]
    )
    res = json.loads((out / "report.json").read_text())
    for task in ("t2i", "i2t", "s2t", "t2s"):
        acc = res["generation"][task].get("accuracy")
        assert acc is not None and 0.0 <= acc <= 1.0, task
        assert res["generation"][task]["nfe"] >= 1
    # The judges' ceilings are real measurements on held-out data, far above chance (0.1).
    c = res["ceilings"]
    assert c["image_judge_on_real"] > 0.9 and c["image_judge_on_tokens"] > 0.9
    assert c["speech_judge_on_codec"] > 0.8
    for key in ("text_bits_per_token", "text_bits_per_byte", "image_bits_per_token", "audio_bits_per_token"):
        assert key in res["likelihood"] and key in res["ar_likelihood"]
    tg = res["text_generation"]
    for key in ("samples", "real_test_text"):
        assert math.isfinite(tg[key]["ar_bits_per_token"]) and tg[key]["unigram_entropy_bits"] > 0
    md = (out / "report.md").read_text()
    assert "autoregressive twin NLL" in md and "Text NELBO / AR twin NLL" in md and "pocketsphinx" in md
    for name in ("t2i.png", "i2t.png", "t2s.png", "text_samples.txt"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "t2s").glob("*.wav"))) == 10


def test_text_sample_quality_entropy_and_ar_nll(tiny_data) -> None:
    v = tiny_data.vocab
    start = v.block_start("text")
    one_word = torch.full((2, 9), start + 5)
    one_word[:, 0] = v.task("text")
    assert evaluate.text_sample_quality(one_word, v)["unigram_entropy_bits"] == 0.0
    four_words = one_word.clone()
    four_words[:, 1:] = start + torch.arange(8) % 4
    assert abs(evaluate.text_sample_quality(four_words, v)["unigram_entropy_bits"] - 2.0) < 1e-9
    # A fresh causal twin is uniform over the text ids (+ EOS/PAD): log2 of its support per token.
    torch.manual_seed(0)
    ar = Denoiser(ModelConfig(d_model=32, n_layers=1, n_heads=2, causal=True), v)
    got = evaluate.text_sample_quality(four_words, v, ar)["ar_bits_per_token"]
    assert abs(got - math.log2(uniform_support(ar, v, "text"))) < 1e-6


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "nope.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and "no checkpoint" in err and err.count("\n") == 1


# The committed model (assets/tiny: the default run, seed 0) and the README's table of results
ROOT = Path(__file__).resolve().parents[1]
README_ROWS = {  # the README row's first words -> where report.json keeps the figure
    "text-to-image": ("generation", "t2i", "accuracy"),
    "captioning": ("generation", "i2t", "accuracy"),
    "speech recognition": ("generation", "s2t", "accuracy"),
    "text-to-speech": ("generation", "t2s", "accuracy"),
    "text NELBO": ("likelihood", "text_bits_per_token"),
}


def readme_committed_column() -> dict[str, float]:
    """The README Results table's column for the committed model, by row."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| ")]
    header = next(line for line in lines if "`assets/tiny`" in line).split("|")
    col = next(i for i, cell in enumerate(header) if "`assets/tiny`" in cell)
    return {row: float(line.split("|")[col]) for line in lines for row in README_ROWS if line.startswith(f"| {row}")}


def test_the_committed_model_samples_on_a_fresh_clone(tmp_path: Path) -> None:
    out = tmp_path / "t2i"
    sample.main(["--checkpoint", str(ROOT / "assets/tiny"), "--task", "t2i", "--prompt", "a handwritten seven",
                 "--num", "8", "--out", str(out)])  # fmt: skip
    images = np.load(out / "images.npy", allow_pickle=False)
    assert images.shape == (8, 8, 8) and (out / "grid.png").stat().st_size > 0
    digits, labels = data_lib.digits_images()
    train_rows = data_lib.split_indices(len(labels))["train"]
    judge = evaluate.DigitImageJudge().fit(digits[train_rows], labels[train_rows])
    assert (judge.predict(images) == 7).mean() >= 0.75  # the model draws the digit it is asked for


def test_the_committed_models_report_matches_the_readme(tmp_path: Path) -> None:
    """Re-evaluate assets/tiny and compare with the README's column. A CPU with other float kernels can flip a
    sample drawn within rounding of a decision boundary, hence a tolerance of about two samples in a hundred."""
    expected = readme_committed_column()
    assert set(expected) == set(README_ROWS), expected
    evaluate.main(["--checkpoint", str(ROOT / "assets/tiny"), "--out", str(tmp_path)])
    res = json.loads((tmp_path / "report.json").read_text())
    for row, keys in README_ROWS.items():
        value = res
        for key in keys:
            value = value[key]
        value = float(str(value).split()[0])  # the NELBO is written "5.8820 ± 0.0508"
        assert abs(value - expected[row]) <= (0.02 if keys[-1] == "accuracy" else 0.05), (row, value, expected[row])
