"""The captioning study's variants change what they say and nothing after them; a run records its probe curve.
The seed-spread table gives every seed, the mean and the worst."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import data as data_lib
import mdm
from lab import captioning, seeds


@pytest.fixture(scope="module")
def tiny_data() -> data_lib.TriModalData:
    return data_lib.build_data(data_lib.DataConfig(audio_speeds=()))


TINY = ("--d_model=32", "--n_layers=2", "--n_heads=2", "--warmup_tokens=3000", "--eval_every=3", "--dtype=fp32")


def test_the_template_patch_changes_the_captions_and_restores_them() -> None:
    before = data_lib.digit_captions(7)
    with captioning.data_patch("fixed_template"):
        assert data_lib.digit_captions(7) == ["a handwritten seven"]
    with captioning.data_patch("words_only"):
        assert all("7" not in c for c in data_lib.digit_captions(7)) and len(data_lib.digit_captions(7)) == 6
    assert data_lib.digit_captions(7) == before


def test_pad_patches_mark_the_pads_or_weight_their_terms(tiny_data) -> None:
    it = data_lib.BatchIterator(tiny_data, "train", 16, {"image_text": 1.0}, 0, 0.7, 0.1, 0.5)
    plain = it.batch(0)
    with captioning.data_patch("pad_not_data"):
        marked = it.batch(0)
    after_eos = marked.ids == tiny_data.vocab.pad  # pair rows only: every PAD_text follows its EOS_text
    assert after_eos.any() and (marked.pad == after_eos).all() and not plain.pad.any()
    c = mdm.corrupt(plain.ids, plain.pad, tiny_data.vocab, mdm.Schedule.parse("linear"), t=torch.full((16,), 0.999))
    ones = lambda x_t, x0, where: torch.ones(int(where.sum()))  # noqa: E731 (an oracle: -log p = 1 everywhere)
    with captioning.data_patch("pad_weight=0.1"):
        weighted = mdm.nelbo(ones, c, tiny_data.vocab).loss
    full = mdm.nelbo(ones, c, tiny_data.vocab).loss
    pads, rows = c.masked & (c.x0 == tiny_data.vocab.pad), c.masked.nonzero()[:, 0]
    expected = full - 0.9 * (c.weight[pads.nonzero()[:, 0]].sum() / c.maskable.sum())
    assert abs(float(weighted) - float(expected)) < 1e-6 and len(rows) > 0


def test_shift_image_moves_every_pixel_and_repeats_the_edge() -> None:
    image = np.arange(20).reshape(4, 5)
    moved = captioning.shift_image(image, 1, -2)
    assert (moved[1:, :3] == image[:3, 2:]).all() and (moved[0, :3] == image[0, 2:]).all()
    assert (moved[1:, 3:] == image[:3, 4:5]).all() and (captioning.shift_image(image, 0, 0) == image).all()


def test_a_variant_run_records_the_probe_at_every_validation(tmp_path: Path) -> None:
    record = captioning.run_variant("fixed_template", 0, 2e4, tmp_path, TINY)
    steps = [p["step"] for p in record["curve"]]
    assert steps[0] == 0 and steps[-1] == 7 and len(steps) >= 3  # step 0, every 3 steps, the end
    assert all(0.0 <= p["probe_val"] <= 1.0 and 0.0 <= p["probe_train"] <= 1.0 for p in record["curve"])
    assert captioning.finished(record) and data_lib.digit_captions(1)[0] == "a handwritten one"  # restored
    json.dumps(record)  # a results line


def fake_report(acc: float, bits: float) -> dict:
    gen = {task: {"accuracy": acc} for task in ("t2i", "i2t", "s2t", "t2s")}
    return {"generation": gen, "likelihood": {"text_bits_per_token": f"{bits:.4f} ± 0.0100"}}


def test_the_seed_table_gives_the_mean_and_the_worst() -> None:
    runs = [{"seed": s, "minutes": m, "peak_gb": g, "report": fake_report(a, b)}
            for s, m, g, a, b in ((0, 10.0, 1.0, 0.9, 5.0), (1, 12.0, 1.5, 0.7, 6.0))]  # fmt: skip
    lines = seeds.table(runs).splitlines()
    assert lines[-2] == "| mean | 0.800 | 0.800 | 0.800 | 0.800 | 5.500 | 11.0 | 1.25 |"
    assert lines[-1] == "| worst | 0.700 | 0.700 | 0.700 | 0.700 | 6.000 | 12.0 | 1.50 |"  # the lowest accuracy
