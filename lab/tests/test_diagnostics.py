"""Tests of the lab's diagnostics: the sampler-free digit probe, the estimators' gradient noise."""

from __future__ import annotations

import pytest
import torch

import data as data_lib
import train
from checkpoint import Inference
from lab.diagnostics import digit_probe, gradient_variance
from model import Denoiser, ModelConfig


@pytest.fixture(scope="module")
def tiny_data() -> data_lib.TriModalData:
    return data_lib.build_data(data_lib.DataConfig(audio_speeds=()))


class _DigitOracle(torch.nn.Module):
    """A model that knows the digit perfectly, and only where the probe asks.

    It reads the label from the first media token (the test writes it there), checks the row is
    what the probe promises (the caption's prefix clean, the rest of the text MASK) and puts all
    its mass on that digit's token at the probed position alone; elsewhere its logits are flat."""

    def __init__(self, layout: data_lib.Layout, tokens: torch.Tensor, task: str, prefix: list[int], at: int) -> None:
        super().__init__()
        self.layout, self.tokens, self.task, self.prefix, self.at = layout, tokens, task, prefix, at
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device to read

    def forward(self, rows: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        v, text = self.layout.vocab, self.layout.text_slot(self.task)
        pos = text.start + self.at
        given = v.to_global(torch.tensor(self.prefix[: self.at]), "text")
        assert (rows[:, text.start : pos] == given).all(), "the caption's prefix is given"
        assert (rows[:, pos : text.stop] == v.mask("text")).all(), "the rest of the text is masked"
        label = rows[:, self.layout.media_slot(self.task).start] - v.block_start(data_lib.MEDIA[self.task])
        logits = torch.zeros(*rows.shape, v.size)
        logits[torch.arange(len(rows)), pos, self.tokens[label]] = 10.0
        return logits if where is None else logits[where]


@pytest.mark.parametrize("task,template", [("image_text", "the digit {d}"), ("audio_text", "{word}")])
def test_digit_probe_reads_the_models_digit(tiny_data, task: str, template: str) -> None:
    layout, tok, v = tiny_data.layout, tiny_data.text_tokenizer, tiny_data.vocab
    forms = [tok.encode(template.format(word=w, d=d)) for d, w in enumerate(data_lib.DIGIT_WORDS)]
    at = next(i for i in range(min(map(len, forms))) if len({f[i] for f in forms}) > 1)
    tokens = v.to_global(torch.tensor([f[at] for f in forms]), "text")
    labels = torch.arange(40) % 10
    media = torch.zeros(40, layout.media_len(task), dtype=torch.long)
    media[:, 0] = labels
    pairs = data_lib.PairData(media, [[[1]]] * 40, labels)
    oracle = _DigitOracle(layout, tokens, task, forms[0], at)
    inf = Inference(oracle, layout, tok, tiny_data.image_tokenizer, tiny_data.audio_codec, tiny_data.config, 0)
    assert digit_probe(inf, pairs, task, template) == 1.0
    pairs.labels = (labels + 1) % 10  # the same model, every label wrong
    assert digit_probe(inf, pairs, task, template) == 0.0
    assert digit_probe(inf, pairs, task, template, chunk=7) == 0.0  # chunks of rows: the same
    pairs.labels = torch.where(labels < 5, labels, -1)  # unlabelled examples are left out
    assert digit_probe(inf, pairs, task, template, chunk=7) == 1.0
    pairs.labels = torch.where(torch.arange(40) < 12, labels, (labels + 1) % 10)
    assert digit_probe(inf, pairs, task, template, limit=12) == 1.0  # the first 12 only
    assert digit_probe(inf, pairs, task, template, limit=24) == 0.5
    with pytest.raises(ValueError, match="ten distinct tokens"):
        digit_probe(inf, pairs, task, "a digit")
    pairs.labels = torch.full((40,), -1)
    with pytest.raises(ValueError, match="none of these"):
        digit_probe(inf, pairs, task, template)


def test_both_estimators_estimate_the_same_loss_with_a_measured_gradient_noise(tiny_data) -> None:
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(d_model=32, n_layers=1, n_heads=2), tiny_data.vocab)
    it = data_lib.BatchIterator(tiny_data, "train", 8, {"image_text": 1.0}, 0, 1.0, 0.0, 1.0)
    results = {}
    for estimator in ("time", "count"):
        cfg = train.TrainConfig(estimator=estimator, cond_keep=1.0, cond_drop=0.0, cond_media=1.0)
        results[estimator] = r = gradient_variance(model, it.batch(0), cfg, draws=48)
        assert r["trace_cov"] > 0 and r["mean_sq_norm"] > 0 and r["loss_se"] > 0
    a, b = results["time"], results["count"]  # two unbiased estimates of one NELBO (the time one on its window)
    assert abs(a["loss"] - b["loss"]) < 4 * (a["loss_se"] ** 2 + b["loss_se"] ** 2) ** 0.5 + 0.01 * b["loss"]
