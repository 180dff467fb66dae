"""Why the default run draws a digit it cannot read: captioning ablations, probe accuracy against tokens.

Each variant trains the tiny model on image-text rows only (the captioning signal isolated) with
``train.main``, in this process, and at every validation reads the digit probe
(``lab.diagnostics.digit_probe``: one network evaluation per held-out image, the caption's prefix
given) with the EMA weights that sampling uses. A variant is train.py options plus, for the data's
form, a patch of this process's data code (one template only; PAD positions not data). The figure
is probe accuracy against training tokens, one line per variant.

    python -m lab.captioning --out lab/studies/captioning            # every variant, seed 0, 4M tokens
    python -m lab.captioning --variants fixed_template,pad_not_data,pad_light,pad_shown_half --seeds 1
    python -m lab.captioning --variants baseline --seeds 0,1 --tokens 8e6
    python -m lab.captioning --variants image_shift --tokens 8e6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import data as data_lib
import mdm
import train
from lab.diagnostics import digit_probe

PROBE_TEMPLATE = "a handwritten {word}"  # a template of every variant's caption set

# name -> (train.py options, data patch); every variant trains image-text rows only
VARIANTS: dict[str, tuple[list[str], str]] = {
    "baseline": ([], ""),
    "fixed_template": ([], "fixed_template"),  # every caption is PROBE_TEMPLATE: the digit sits at one place
    "words_only": ([], "words_only"),  # the six templates that name the digit by its word, not its numeral
    "pad_not_data": ([], "pad_not_data"),  # the PAD_text after EOS_text is neither masked nor predicted
    "pad_shown_half": ([], "pad_shown=0.5"),  # half the pair rows show their PAD_text clean (the text's length)
    "image_shift": ([], "image_shift"),  # captioning rows also see the training images moved by a pixel
    "pad_light": ([], "pad_weight=0.1"),  # PAD_text masked as before, its loss terms weighted 0.1
    "captioning_heavy": (["--cond_media=0.85"], ""),  # 60% of rows captioning instead of 35%
    "conditional_heavy": (["--cond_keep=0.9", "--cond_drop=0.05"], ""),  # 90% of rows conditional, not 70%
    "wide_192": (["--d_model=192", "--n_heads=6"], ""),  # about 2.2x the body's compute per token
    "lr_3e-3": (["--lr=3e-3"], ""),
    "count_estimator": (["--estimator=count"], ""),
    "lr_embed_10": (["--modules=embedding.lr=10"], ""),
    "no_code_init": (["--code_init=false"], ""),
    "deep_narrow": (["--d_model=96", "--n_layers=8", "--n_heads=4"], ""),  # about the tiny body's compute
    "wide_shallow": (["--d_model=184", "--n_layers=2", "--n_heads=4"], ""),
}


def shift_image(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The image moved down by dy and right by dx pixels; the uncovered border repeats the edge."""
    h, w, s = image.shape[0], image.shape[1], max(abs(dy), abs(dx))
    padded = np.pad(image, ((s, s), (s, s)) + ((0, 0),) * (image.ndim - 2), mode="edge")
    return padded[s - dy : s - dy + h, s - dx : s - dx + w]


@contextlib.contextmanager
def data_patch(name: str) -> Iterator[None]:
    """This process's data code changed for one variant, restored afterwards. The data is built in memory
    (``data.build_data``): a shard set in the cache would not know of the patched templates."""
    saved_templates, saved_nelbo = data_lib.CAPTION_TEMPLATES, mdm.nelbo
    saved_draw, saved_read, saved_load = data_lib.BatchIterator.draw, data_lib.BatchIterator.read, train.load_data

    def in_memory(cfg, codec_sha256, d, given):
        return data_lib.build_data(cfg, codec_sha256)

    train.load_data = in_memory
    if name == "fixed_template":
        data_lib.CAPTION_TEMPLATES = (PROBE_TEMPLATE,)
    elif name == "words_only":
        data_lib.CAPTION_TEMPLATES = tuple(t for t in saved_templates if "{word}" in t)
    elif name == "pad_not_data" or name.startswith("pad_shown="):
        share = float(name.split("=")[1]) if "=" in name else 1.0

        def draw(self, task: str, g: torch.Generator) -> tuple:
            plan = saved_draw(self, task, g)  # then one more draw per pair row, even for share 1
            return plan if task == "text" else (*plan, float(torch.rand((), generator=g)) < share)

        def read(self, task: str, plan: tuple, read: bool = True):
            if not read:
                raise ValueError("the pad_not_data variants run in one process (every row read)")
            ids, pad, given, hidden = saved_read(self, task, plan, read)
            if task != "text" and plan[5]:
                eos = int((ids == self.data.vocab.eos("text")).nonzero()[0, 0])
                pad = pad.clone()
                pad[eos + 1 :] = True
            return ids, pad, given, hidden

        data_lib.BatchIterator.draw, data_lib.BatchIterator.read = draw, read
    elif name == "image_shift":

        def load(cfg, codec_sha256, d, given):  # the 8 one-pixel moves of every training image, as captioning's copies
            built = in_memory(cfg, codec_sha256, d, given)
            pairs = built.pairs["image_text"]["train"]
            moves = [(y, x) for y in (-1, 0, 1) for x in (-1, 0, 1) if y or x]
            copies = [[built.image_tokenizer.encode(shift_image(im, y, x)) for y, x in moves] for im in pairs.raw]
            pairs.variants = torch.from_numpy(np.array(copies))  # (N, 8, M): BatchIterator's augmented copies
            return built

        train.load_data = load
    elif name.startswith("pad_weight="):
        weight = float(name.split("=")[1])

        def nelbo(nll_fn, c, vocab):
            def weighted(x_t, x0, masked):
                nll = nll_fn(x_t, x0, masked)
                return torch.where(x0[masked] == vocab.pad, nll * weight, nll)

            return saved_nelbo(weighted, c, vocab)

        mdm.nelbo = nelbo
    elif name:
        raise ValueError(f"unknown data patch {name!r}")
    try:
        yield
    finally:
        data_lib.CAPTION_TEMPLATES, mdm.nelbo = saved_templates, saved_nelbo
        data_lib.BatchIterator.draw, data_lib.BatchIterator.read, train.load_data = saved_draw, saved_read, saved_load


@contextlib.contextmanager
def probing(curve: list[dict], pad_clean: bool) -> Iterator[None]:
    """Every ``train.validation`` also reads the digit probe on the validation images, EMA weights in."""
    original = train.validation

    def validation(net, model, ema, data, cfg, d, log):
        result = original(net, model, ema, data, cfg, d, log)
        model.eval()
        ema.swap(model)
        inf = argparse.Namespace(model=model, layout=data.layout, text_tokenizer=data.text_tokenizer)
        pairs = data.pairs["image_text"]["val"]
        probe = probe_with_pad(inf, pairs, pad_clean)
        train_probe = probe_with_pad(inf, pairs_subset(data.pairs["image_text"]["train"], 256), pad_clean)
        ema.swap(model)
        model.train()
        curve.append({"tokens": log["tokens"], "step": log["step"], "probe_val": probe, "probe_train": train_probe,
                      "val_image_text": result.get("text", float("nan"))})  # fmt: skip
        print(f"  tokens {log['tokens']:>10,}  probe val {probe:.3f}  train {train_probe:.3f}", flush=True)
        return result

    train.validation = validation
    try:
        yield
    finally:
        train.validation = original


def pairs_subset(pairs: data_lib.PairData, n: int) -> data_lib.PairData:
    return data_lib.PairData(pairs.media[:n], pairs.captions[:n], pairs.labels[:n])


def probe_with_pad(inf, pairs: data_lib.PairData, pad_clean: bool) -> float:
    """The digit probe; for a model that never saw PAD masked, the caption's EOS and PADs are shown clean."""
    if not pad_clean:
        return digit_probe(inf, pairs, "image_text", PROBE_TEMPLATE)
    s = inf.layout.text_slot("image_text").start
    eos = s + len(inf.text_tokenizer.encode(PROBE_TEMPLATE.format(word="one", d=1)))  # every digit: one token
    vocab = inf.layout.vocab

    class PadsShown(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inf.model

        def forward(self, rows, where):
            rows = rows.clone()
            rows[:, eos], rows[:, eos + 1 :] = vocab.eos("text"), vocab.pad
            return self.inner(rows, where=where)

    shown = argparse.Namespace(model=PadsShown(), layout=inf.layout, text_tokenizer=inf.text_tokenizer)
    return digit_probe(shown, pairs, "image_text", PROBE_TEMPLATE)


def run_variant(name: str, seed: int, tokens: float, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """One run of a variant (``extra``: more train.py options, e.g. a smaller model for a test)."""
    options, patch = VARIANTS[name]
    run_dir = out / "runs" / f"{name}_s{seed}"
    argv = [
        "--mix_text=0", "--mix_audio_text=0", "--mix_image_text=1", f"--tokens={tokens:g}", f"--seed={seed}",
        f"--out_dir={run_dir}", "--eval_every=125", "--eval_batches=1", "--ckpt_every=100000",
        "--final_report=false", "--dtype=bf16", *options, *extra,
    ]  # fmt: skip
    curve: list[dict] = []
    start = time.time()
    print(f"{name} seed {seed}: {' '.join(argv)}", flush=True)
    with data_patch(patch), probing(curve, pad_clean=patch == "pad_not_data"):  # the others: PADs masked
        train.main(argv)
    return {"variant": name, "seed": seed, "options": options, "patch": patch, "tokens": tokens,
            "seconds": time.time() - start, "curve": curve}  # fmt: skip


def summary(records: list[dict]) -> list[dict]:
    """Per variant and horizon: the final validation probe of every seed, their mean, and the tokens at
    which the mean first passes 0.5."""
    out = []
    for name, horizon in dict.fromkeys((r["variant"], r["tokens"]) for r in records):
        runs = [r for r in records if r["variant"] == name and r["tokens"] == horizon]
        finals = [r["curve"][-1]["probe_val"] for r in runs]
        mean_curve = [(p["tokens"], sum(r["curve"][k]["probe_val"] for r in runs) / len(runs))
                      for k, p in enumerate(runs[0]["curve"])]  # fmt: skip
        passes = next((t for t, v in mean_curve if v >= 0.5), None)
        out.append({"variant": name, "tokens": horizon, "seeds": [r["seed"] for r in runs], "final": finals,
                    "mean": sum(finals) / len(finals), "tokens_to_0.5": passes})  # fmt: skip
    return out


def plot(records: list[dict], path: Path) -> None:
    """One panel per horizon: every run's validation probe against its tokens, a color per variant."""
    horizons = sorted({r["tokens"] for r in records})
    fig, axes = plt.subplots(1, len(horizons), figsize=(5.2 * len(horizons), 4.0), squeeze=False)
    names = list(dict.fromkeys(r["variant"] for r in records))
    for ax, horizon in zip(axes[0], horizons, strict=True):
        labelled = set()
        for r in (r for r in records if r["tokens"] == horizon):
            j = names.index(r["variant"])
            xs = [p["tokens"] / 1e6 for p in r["curve"]]
            ax.plot(xs, [p["probe_val"] for p in r["curve"]], color=f"C{j % 10}", ls="-" if j < 10 else "--",
                    label=None if r["variant"] in labelled else r["variant"], lw=1.2, alpha=0.85)  # fmt: skip
            labelled.add(r["variant"])
        ax.set(xlabel="training tokens, millions (image-text rows only)", ylabel="digit probe, validation images",
               title=f"horizon {horizon / 1e6:g}M tokens", ylim=(0, 1))  # fmt: skip
        ax.axhline(0.1, color="gray", lw=0.5, ls=":")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def finished(record: dict) -> bool:
    """Whether a run reached its horizon (a stopped one leaves a shorter curve)."""
    return record["curve"][-1]["tokens"] >= 0.99 * record["tokens"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="lab/studies/captioning", help="results folder")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--tokens", type=float, default=4e6, help="training tokens per run")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    for name in filter(None, a.variants.split(",")):  # --variants "": only the figure and the summary
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
        for seed in map(int, a.seeds.split(",")):
            same = (r for r in done if (r["variant"], r["seed"], r["tokens"]) == (name, seed, a.tokens))
            if any(finished(r) for r in same):
                continue
            record = run_variant(name, seed, a.tokens, out)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done.append(record)
    chosen = [r for r in done if finished(r)]  # every horizon
    plot(chosen, out / "probe_vs_tokens.png")
    rows = summary(chosen)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        finals = ", ".join(f"{v:.2f}" for v in r["final"])
        print(f"{r['variant']:18s} {r['tokens'] / 1e6:g}M tokens, seeds {r['seeds']}: final probe {finals} "
              f"(mean {r['mean']:.2f}); the mean passes 0.5 at {r['tokens_to_0.5'] or '-'} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
