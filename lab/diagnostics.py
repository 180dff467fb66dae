"""Diagnostics of a trained model: measurements that explain a figure of the report.

``digit_probe`` asks the model for the digit of an image or a clip in one network evaluation,
without a sampler: it separates "the model does not know the digit" from "the sampler loses it".
``gradient_variance`` compares the two NELBO estimators (``mdm.corrupt``, ``mdm.corrupt_by_count``)
by the noise they put into the gradient, on a fixed batch, as training draws them.

    python -m lab.diagnostics --checkpoint runs/tiny/ckpt.pt              # the digit probe
    python -m lab.diagnostics --checkpoint runs/tiny/ckpt.pt --variance   # the estimators' gradient noise
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import data as data_lib
import mdm
import train
from checkpoint import Inference, load_for_inference
from model import Denoiser


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


def gradient_variance(
    model: Denoiser, batch: data_lib.Batch, cfg: train.TrainConfig, draws: int = 64
) -> dict[str, float]:
    """tr Cov[g] of the training loss's gradient g on one fixed batch, over ``draws`` draws of the forward
    process exactly as ``train.corrupt_batch`` makes them (cfg's estimator, anti-masking, stratified t, the
    rows' roles), each draw one step's noise. Also |E g|^2 and the loss (nats per data token): its mean over
    the draws and that mean's standard error."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, squares, losses = None, None, []
    for step in range(draws):
        c = train.corrupt_batch(batch, model.vocab, cfg, step)
        loss = mdm.nelbo(model.nll_at, c, model.vocab).loss
        g = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)]).double()
        total, squares = (g, g**2) if total is None else (total + g, squares + g**2)
        losses.append(float(loss.detach()))
    mean = total / draws
    trace = float((squares / draws - mean**2).sum()) * draws / (draws - 1)
    spread = torch.tensor(losses, dtype=torch.float64)
    loss = {"loss": float(spread.mean()), "loss_se": float(spread.std() / draws**0.5)}
    return {"trace_cov": trace, "mean_sq_norm": float((mean**2).sum()), **loss}


def variance_table(inf: Inference, data: data_lib.TriModalData, rows: int = 32, draws: int = 64) -> list[dict]:
    """``gradient_variance`` of each estimator, with and without anti-masking, on ``rows`` training rows of
    captioning (image given) and of recognition (clip given): the rows where the digit has to be read."""
    out, base = [], train.TrainConfig(cond_keep=1.0, cond_drop=0.0, cond_media=1.0)
    for task in ("image_text", "audio_text"):
        it = data_lib.BatchIterator(data, "train", rows, {task: 1.0}, 0, 1.0, 0.0, 1.0)
        for estimator in ("time", "count"):
            for anti in (False, True):
                cfg = replace(base, estimator=estimator, anti_masking=anti)
                r = gradient_variance(inf.model, it.batch(0), cfg, draws)
                out.append({"rows": task, "estimator": estimator, "anti_masking": anti, **r})
                print(f"{task} {estimator:5s} anti-masking {anti!s:5s}: tr Cov[g] {r['trace_cov']:.4g}, "
                      f"|E g|^2 {r['mean_sq_norm']:.4g}, loss {r['loss']:.4f}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description="The sampler-free digit probe of a checkpoint, on every split.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--variance", action="store_true", help="the NELBO estimators' gradient noise instead")
    args = p.parse_args(argv)
    inf = load_for_inference(args.checkpoint)
    data = data_lib.build_data(replace(inf.data_config, audio_speeds=()))
    if args.variance:
        return {"variance": variance_table(inf, data)}
    out = {}
    for task, template in (("image_text", "the digit {d}"), ("audio_text", "{word}")):
        for split in ("train", "val", "test"):
            out[f"{task} {split}"] = digit_probe(inf, data.pairs[task][split], task, template)
            print(f"digit probe, {task} {split}: {out[f'{task} {split}']:.3f}")
    return out


if __name__ == "__main__":
    main()
