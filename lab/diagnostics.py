"""Diagnostics of a trained model: measurements that explain a figure of the report.

``digit_probe`` asks the model for the digit of an image or a clip in one network evaluation,
without a sampler: it separates "the model does not know the digit" from "the sampler loses it".

    python -m lab.diagnostics --checkpoint runs/tiny/ckpt.pt
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import data as data_lib
from checkpoint import Inference, load_for_inference


@torch.no_grad()
def digit_probe(
    inf: Inference,
    pairs: data_lib.PairData,
    task: str,
    template: str = "{word}",
    limit: int | None = None,
    chunk: int = 256,
) -> float:
    """What the model knows about the digit, without a sampler: one network evaluation per example.

    The ten captions ``template.format(word=..., d=...)`` share a prefix and then differ at one
    position, where their ten tokens are distinct. The prefix is given, that position and all
    later text positions are masked, and the prediction is the argmax of the model's logits over
    the ten tokens there: accuracy against the label. Beside the sampled accuracy it separates
    "the model does not know the digit" from "the sampler loses it". ``limit``: the first examples
    only, as ``media_to_text``; examples without a label are left out.
    """
    layout, vocab, tok = inf.layout, inf.layout.vocab, inf.text_tokenizer
    forms = [tok.encode(template.format(word=w, d=d)) for d, w in enumerate(data_lib.DIGIT_WORDS)]
    at = next((i for i in range(min(map(len, forms))) if len({f[i] for f in forms}) > 1), None)
    if at is None or len({f[at] for f in forms}) != 10:
        raise ValueError(f"the template {template!r} does not give ten distinct tokens where the digits differ")
    labels = pairs.labels[:limit]
    index = (labels >= 0).nonzero()[:, 0].tolist()
    if not index:
        raise ValueError("none of these examples has a digit label")
    candidates = vocab.to_global(torch.tensor([f[at] for f in forms]), "text")  # (10,)
    at = layout.text_slot(task).start + at  # the probed position in the row
    prefix = torch.tensor(forms[0])
    device = next(inf.model.parameters(), torch.empty(0)).device
    correct = 0
    for lo in range(0, len(index), chunk):
        ix = index[lo : lo + chunk]
        rows = torch.stack([layout.pair_row(task, pairs.media[i], prefix) for i in ix])
        rows[:, at:] = vocab.mask("text")
        where = torch.zeros_like(rows, dtype=torch.bool)
        where[:, at] = True
        logits = inf.model(rows.to(device), where=where.to(device))[:, candidates]  # (n, 10): one position per row
        correct += int((logits.argmax(-1).cpu() == labels[ix]).sum())
    return correct / len(index)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description="The sampler-free digit probe of a checkpoint, on every split.")
    p.add_argument("--checkpoint", required=True)
    args = p.parse_args(argv)
    inf = load_for_inference(args.checkpoint)
    data = data_lib.build_data(replace(inf.data_config, audio_speeds=()))
    out = {}
    for task, template in (("image_text", "the digit {d}"), ("audio_text", "{word}")):
        for split in ("train", "val", "test"):
            out[f"{task} {split}"] = digit_probe(inf, data.pairs[task][split], task, template)
            print(f"digit probe, {task} {split}: {out[f'{task} {split}']:.3f}")
    return out


if __name__ == "__main__":
    main()
