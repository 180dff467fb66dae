"""A per-module AdamW search: successive halving over ``train.MODULE_TABLE``, judged by held-out NELBO.

    python -m lab.module_search --size quick                  # the search (seed 0), then best vs default on seeds 1, 2
    python -m lab.module_search --size smoke --out /tmp/ms    # seconds (the tests run this)

The search space (``SPACE``) holds the table's learning-rate multipliers of every module kind, the
epsilon multipliers of the attention projections and the MLP gate (the modules the paper's summary
says want their own epsilon) and the depth factor, each drawn log-uniformly. Successive halving
(``RUNGS``): every configuration of the first rung trains at a short horizon, the best third of each
rung (by ``loss_bits``, the mean over the three row types of the validation NELBO in bits per token,
``lab.studies.nelbo_parts``) trains again from scratch at a three times longer horizon, and the
default table always goes on as the reference. The best configuration of the last rung and the
default then train on more seeds (``Search.confirm_seeds``). Each run is ``train.main`` through
``lab.studies.Context`` (its line in ``<out>/module_search.jsonl``, skipped when present, so an
interrupted search resumes). The figure: held-out NELBO per rung; the best configurations'
learning-rate multiplier of each module kind against depth; best against default per seed.
The optimizer's second moments of the default run at the first rung are kept too: the median
sqrt(v) of each kind says where an epsilon starts to matter.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes

import train
from lab import studies
from lab.studies import Context, Model, RunSpec, say

STUDY = "module_search"
DEFAULT_MIX = (0.15, 0.55, 0.30)  # train.py's default mixture: the search tunes the present recipe
# name -> (low, high) of a log-uniform draw. Learning rates within 4x of the table's either way (the peak
# lr itself was swept: 3x it hurt, lab/STUDIES.md section 8); the embedding's from 1x to 30x the peak,
# since the paper reports much larger effective rates there; epsilons from the default 1e-8 to 1e-3,
# past the median sqrt(v) of every kind (``second_moments``), so the range spans "no effect" to "dominant".
SPACE: dict[str, tuple[float, float]] = {
    "embedding.lr": (1.0, 30.0),
    "unembedding.lr": (0.25, 4.0),
    "attn_qkv.lr": (0.25, 4.0),
    "attn_out.lr": (0.25, 4.0),
    "mlp_gate.lr": (0.25, 4.0),
    "mlp_up.lr": (0.25, 4.0),
    "mlp_down.lr": (0.25, 4.0),
    "norms.lr": (0.25, 4.0),
    "attn_qkv.eps": (1.0, 1e5),
    "attn_out.eps": (1.0, 1e5),
    "mlp_gate.eps": (1.0, 1e5),
    "depth_factor": (0.25, 2.0),
}

# Single changes to the default table, run beside the best configuration: the first rung's sensitivities
# (``sensitivity``) single out the unembedding's learning rate, and one change says more than twelve.
FOLLOWUPS: dict[str, dict[str, float]] = {"unembedding_x3": {"unembedding.lr": 3.0}}


@dataclass(frozen=True)
class Search:
    """The search's size: the model, the first rung's horizon and configurations, the rungs, the seeds."""

    model: Model
    batch: int
    first_tokens: float  # horizon of the first rung; each later rung is ``growth`` times longer
    configs: int  # random configurations of the first rung (the default table comes on top)
    rungs: int
    growth: int  # each rung keeps the best 1/growth (at least one) and trains them growth times longer
    confirm_seeds: tuple[int, ...]  # the best of the last rung, the default and FOLLOWUPS, trained on these too
    transfer: Model  # ... and once (seed 0) at this shape, the default run's, to see whether the choice carries
    transfer_tokens: float
    warmup_tokens: float
    eval: studies.Size  # how runs are judged (eval_batches, eval_rows)


SEARCHES: dict[str, Search] = {
    "smoke": Search(Model(32, 2, 2), 16, 1500, 3, 2, 3, (1,), Model(48, 2, 2), 1500, 300, studies.SIZES["smoke"]),
    "quick": Search(Model(64, 4, 2), 32, 4e5, 15, 3, 3, (1, 2), Model(128, 4, 4), 2.4e6, 2e4, studies.SIZES["quick"]),
}


def draw(n: int, seed: int) -> list[dict[str, float]]:
    """n configurations, each coordinate log-uniform in its SPACE range."""
    rng = np.random.default_rng(seed)
    return [{k: float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for k, (lo, hi) in SPACE.items()}
            for _ in range(n)]  # fmt: skip


def settings(config: dict[str, float]) -> dict[str, object]:
    """train.py options of a configuration: ``--modules`` for the table's entries, ``--depth_factor``."""
    table = ",".join(f"{k}={v:.4g}" for k, v in config.items() if k != "depth_factor")
    return {"modules": table, "depth_factor": f"{config.get('depth_factor', 0.5):.4g}"} if config else {}


def spec(
    name: str, config: dict[str, float], tokens: float, seed: int, s: Search, model: Model | None = None
) -> RunSpec:
    """A run of a configuration; at another ``model`` than the search's, its label joins the run's name."""
    base = {**(model or s.model).settings(), "batch_size": s.batch, "tokens": tokens, "warmup_tokens": s.warmup_tokens,
            **dict(zip(("mix_text", "mix_image_text", "mix_audio_text"), DEFAULT_MIX, strict=True))}  # fmt: skip
    info = {"config_name": name, "config": config, "horizon": tokens, "model": (model or s.model).label}
    variant = f"{name}_{model.label}_t{tokens:g}" if model else f"{name}_t{tokens:g}"
    return RunSpec(STUDY, variant, seed, {**base, **settings(config)}, info=info)


def successive_halving(ctx: Context, s: Search, seed: int = 0) -> list[list[dict]]:
    """The rungs' records; the default table ("default", an empty configuration) is in every rung."""
    candidates = {"default": {}, **{f"c{i:02d}": c for i, c in enumerate(draw(s.configs, seed))}}
    rungs, tokens = [], s.first_tokens
    for r in range(s.rungs):
        records = ctx.execute([spec(n, c, tokens, seed, s) for n, c in candidates.items()])
        rungs.append(records)
        ranked = sorted((x for x in records if "error" not in x), key=lambda x: x["loss_bits"])
        keep = max(1, len(candidates) // s.growth)
        best = [x["config_name"] for x in ranked if x["config_name"] != "default"][:keep]
        say(f"[{STUDY}] rung {r} ({tokens:g} tokens): best {', '.join(best)}")
        candidates = {"default": {}, **{n: candidates[n] for n in best}}
        tokens *= s.growth
    return rungs


def second_moments(ckpt: Path) -> dict[str, float]:
    """Median sqrt(v) (Adam's second moment) over the nonzero entries of each module kind, from a checkpoint."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["optimizer"]["state"]
    roots: dict[str, list[torch.Tensor]] = {}
    for name, st in state.items():
        root = st["exp_avg_sq"].sqrt().flatten()
        roots.setdefault(train.module_kind(name), []).append(root[root > 0])  # embedding rows never seen: v = 0
    return {k: float(torch.cat(v).median()) for k, v in roots.items()}


def lr_by_depth(config: dict[str, float], n_layers: int) -> dict[str, list[float]]:
    """Each kind's learning-rate multiplier per block (the embedding and unembedding: one value)."""
    table = train.module_table(settings(config).get("modules", ""))
    depth = config.get("depth_factor", 0.5)
    factors = [depth ** (i / max(1, n_layers - 1)) for i in range(n_layers)]
    return {k: [row.lr] if k in ("embedding", "unembedding") else [row.lr * f for f in factors]
            for k, row in table.items()}  # fmt: skip


def plot(
    rungs: Sequence[Sequence[dict]], confirm: Sequence[dict], transfer: Sequence[dict], s: Search, path: Path
) -> None:
    fig, (a, b, c) = studies.new_figure(3, width=5.0)
    plot_rungs(a, rungs)
    last = sorted((x for x in rungs[-1] if "error" not in x), key=lambda x: x["loss_bits"])
    for i, rec in enumerate(x for x in last if x["config_name"] != "default"):
        plot_depth(b, rec["config"], s.model.n_layers, "-" if i == 0 else ":", rec["config_name"])
    plot_depth(b, {}, s.model.n_layers, "--", "default")
    plot_confirm(c, confirm, transfer, s)
    studies.save_figure(fig, path)


def plot_rungs(ax: Axes, rungs: Sequence[Sequence[dict]]) -> None:
    for rung in rungs:
        for x in rung:
            if "error" not in x:
                default = x["config_name"] == "default"
                ax.scatter(x["horizon"] / 1e6, x["loss_bits"], s=30 if default else 12,
                           color="k" if default else "C0", marker="s" if default else "o", zorder=3)  # fmt: skip
    names = sorted(x["config_name"] for x in rungs[-1])  # the default, then the survivors
    for i, name in enumerate(names):
        pts = [(x["horizon"] / 1e6, x["loss_bits"]) for rung in rungs for x in rung
               if x["config_name"] == name and "error" not in x]  # fmt: skip
        ax.plot(*zip(*pts, strict=True), color="k" if name == "default" else f"C{i}", lw=1, label=name)
    ax.set(xscale="log", xlabel="horizon, millions of tokens", ylabel="held-out NELBO, bits/token (mean of tasks)",
           title="successive halving (black: the default table)")  # fmt: skip
    ax.legend(fontsize=7)


def plot_depth(ax: Axes, config: dict[str, float], n_layers: int, ls: str, label: str) -> None:
    for j, (kind, mults) in enumerate(lr_by_depth(config, n_layers).items()):
        xs = [-1] if kind == "embedding" else [n_layers] if kind == "unembedding" else list(range(n_layers))
        ax.plot(xs, mults, ls=ls, marker="o", ms=3, color=f"C{j}", label=f"{kind}" if ls == "-" else None)
    ax.plot([], [], ls=ls, color="gray", label=label)
    ax.set(yscale="log", xlabel="block (-1: embedding, n: unembedding)", ylabel="lr multiplier",
           title="learning-rate multiplier by module and depth")  # fmt: skip
    ax.legend(fontsize=6, ncol=2)


def plot_confirm(ax: Axes, confirm: Sequence[dict], transfer: Sequence[dict], s: Search) -> None:
    """Best against default: one column per seed at the search's shape, one for the transfer shape."""
    seeds = sorted({x["seed"] for x in confirm})
    columns = [(f"seed {k}", [x for x in confirm if x["seed"] == k]) for k in seeds]
    columns.append((f"{s.transfer.label}, {s.transfer_tokens / 1e6:g}M tokens", list(transfer)))
    for i, name in enumerate(dict.fromkeys(x["config_name"] for x in confirm)):
        pts = [(j, x["loss_bits"]) for j, (_, recs) in enumerate(columns) for x in recs
               if x["config_name"] == name and "error" not in x]  # fmt: skip
        ax.plot(*zip(*pts, strict=True), marker="o", ls="none", color=f"C{i}", label=name)
    ax.set(xticks=range(len(columns)), xticklabels=[c for c, _ in columns], ylabel="held-out NELBO, bits/token",
           title=f"best against the default ({s.model.label} unless named)")  # fmt: skip
    ax.legend(fontsize=7)


def best_of(rung: Sequence[dict]) -> dict:
    """The record of the rung's best configuration other than the default (lowest held-out NELBO)."""
    return min((x for x in rung if "error" not in x and x["config_name"] != "default"), key=lambda x: x["loss_bits"])


def sensitivity(rung: Sequence[dict]) -> dict[str, float]:
    """Spearman's rank correlation, over a rung's searched configurations, of each coordinate with the NELBO."""
    runs = [x for x in rung if "error" not in x and x["config"]]
    loss = np.argsort(np.argsort([x["loss_bits"] for x in runs]))
    return {k: float(np.corrcoef(np.argsort(np.argsort([x["config"][k] for x in runs])), loss)[0, 1]) for k in SPACE}


def summarize(
    rungs: Sequence[Sequence[dict]], confirm: Sequence[dict], transfer: Sequence[dict], moments: dict[str, float]
) -> dict:
    best = best_of(rungs[-1])
    by_seed: dict[int, dict[str, float]] = {}
    for x in confirm:
        by_seed.setdefault(x["seed"], {})[x["config_name"]] = x["loss_bits"]
    others = [n for n in dict.fromkeys(x["config_name"] for x in confirm) if n != "default"]
    return {
        "space": SPACE,
        "rungs": [
            {"horizon": r[0]["horizon"], "loss_bits": {x["config_name"]: x.get("loss_bits") for x in r}} for r in rungs
        ],
        "sensitivity_first_rung": sensitivity(rungs[0]),
        "best": {"name": best["config_name"], "config": best["config"], "settings": settings(best["config"])},
        "followups": FOLLOWUPS,
        "confirm_loss_bits": by_seed,
        "minus_default": {n: {k: v[n] - v["default"] for k, v in by_seed.items() if n in v} for n in others},
        "transfer_loss_bits": {x["config_name"]: x.get("loss_bits") for x in transfer},
        "median_sqrt_v_default_first_rung": moments,
    }


def run(ctx: Context, s: Search) -> dict:
    rungs = successive_halving(ctx, s)
    best = best_of(rungs[-1])
    horizon = rungs[-1][0]["horizon"]
    named = [("default", {}), (best["config_name"], best["config"]), *FOLLOWUPS.items()]
    confirm = ctx.execute([spec(n, c, horizon, k, s) for k in (0, *s.confirm_seeds) for n, c in named])
    transfer = ctx.execute([spec(n, c, s.transfer_tokens, 0, s, s.transfer) for n, c in named])
    default_first = ctx.run_dir(spec("default", {}, s.first_tokens, 0, s)) / "ckpt.pt"
    moments = second_moments(default_first)
    plot(rungs, confirm, transfer, s, ctx.out / f"{STUDY}.png")
    summary = summarize(rungs, confirm, transfer, moments)
    (ctx.out / f"{STUDY}_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for r in summary["rungs"]:
        line = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["loss_bits"].items(), key=lambda kv: kv[1]))
        say(f"rung at {r['horizon']:g} tokens: {line}")
    say(f"best: {summary['best']['name']} {summary['best']['settings']}")
    say(f"first rung, rank correlation of each coordinate with the NELBO: {summary['sensitivity_first_rung']}")
    say(f"minus the default, per seed (bits/token): {summary['minus_default']}")
    say(f"at {s.transfer.label}, {s.transfer_tokens:g} tokens: {summary['transfer_loss_bits']}")
    say(f"median sqrt(v) per kind (default, first rung): {moments}")
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="quick", choices=list(SEARCHES), help="the search's size (SEARCHES)")
    p.add_argument("--out", default="lab/studies", help="results folder (module_search.jsonl, .png, _summary.json)")
    p.add_argument("--runs", default="runs/studies", help="where the runs' folders go")
    p.add_argument("--force", action="store_true", help="rerun runs whose results exist")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one: two searches can share 2 cores)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(a.threads)
    s = SEARCHES[a.size]
    size = replace(s.eval, name=a.size)
    ctx = Context(size, Path(a.out), Path(a.runs), a.force)
    ctx.out.mkdir(parents=True, exist_ok=True)
    return run(ctx, s)


if __name__ == "__main__":
    main()
