"""The tokenizer study at smoke size: every line it writes, the exact token rates of the pixel tokenizers,
a lossless tokenizer judged like the real images, and a second call that recomputes nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lab import tokenizer_study

COMMON = {"id", "size", "seed", "kind", "label", "modality", "tokens_per_item", "vocab_size", "bits_per_item"}
FIELDS = {
    "pixel": {"levels", "patch", "mse", "judge_accuracy", "judge_real", "codes_used"},
    "autoencoder": {"image_size", "levels", "mse", "judge_accuracy", "judge_real", "resampled_mse", "train_steps"},
    "codec": {"levels", "frames_per_token", "logmag_l1", "feature_l1", "judge_accuracy", "judge_original",
              "judge_griffin_lim", "sha256"},
    "run": {"tokenizer", "seq_len", "steps", "tokens", "bits_per_item_se", "text_bits_per_token",
            "generation_task", "generation_accuracy", "args"},
}  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict]:
    root = tmp_path_factory.mktemp("tokenizers")
    argv = ["--size", "smoke", "--out", str(root / "out"), "--runs", str(root / "runs"), "--threads", "1"]
    result = tokenizer_study.main(argv)
    return root / "out", argv, result


def lines(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_every_planned_line_is_written_with_its_fields_and_the_figures_exist(study) -> None:
    out, _, result = study
    records = lines(out)
    assert list(records) == tokenizer_study.planned(tokenizer_study.SIZES["smoke"])
    for r in records.values():
        assert COMMON | FIELDS[r["kind"]] | {"seconds"} <= set(r), r["id"]
        assert 0.0 <= (r["judge_accuracy"] if r["kind"] != "run" else r["generation_accuracy"]) <= 1.0
    for figure in ("fidelity_vs_tokens.png", "model_bits.png"):
        assert (out / figure).stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(tokenizer_study.strict_json(result)))
    assert {len(summary[t]) for t in ("images", "audio", "runs")} == {2, 4}


@pytest.mark.parametrize(("levels", "patch", "tokens", "vocab"), [(4, 2, 16, 256), (17, 1, 64, 17), (2, 2, 16, 16)])
def test_pixel_tokenizers_have_their_exact_token_rate_and_vocabulary(study, levels, patch, tokens, vocab) -> None:
    r = lines(study[0])[tokenizer_study.pixel_id(levels, patch)]
    assert (r["tokens_per_item"], r["vocab_size"]) == (tokens, vocab)
    assert r["bits_per_item"] == pytest.approx(tokens * math.log2(vocab))


def test_the_lossless_tokenizer_reconstructs_exactly_and_is_judged_like_the_real_images(study) -> None:
    records = lines(study[0])
    lossless, default = records["pixel_L17_P1"], records["pixel_L4_P2"]
    assert lossless["mse"] == 0.0 and lossless["judge_accuracy"] == lossless["judge_real"]
    assert default["mse"] > 0.0 and lossless["judge_real"] == default["judge_real"]


def test_the_runs_report_bits_per_item_and_fit_the_media_in_their_rows(study) -> None:
    records = lines(study[0])
    image, audio = records["run_image_L4_P2"], records["run_audio_codec_L5x5x5_F8"]
    assert (image["seq_len"], audio["seq_len"]) == (48, 32)  # the default text slot either way
    for r in (image, audio):
        assert r["bits_per_item"] == pytest.approx(r["bits_per_token"] * r["tokens_per_item"])
        assert r["steps"] > 0 and r["bits_per_item"] > 0


def test_a_second_call_recomputes_nothing(study) -> None:
    out, argv, _ = study
    before = (out / "results.jsonl").read_text()
    tokenizer_study.main(argv)
    assert (out / "results.jsonl").read_text() == before
