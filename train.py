"""Train a tri-modal masked diffusion model: one script from a 2-core laptop to multi-GPU torchrun.

    python train.py                                      # tiny model, embedded tri-modal data, CPU
    python train.py --help                               # every option, its default and what it does
    python train.py --preset=small --device=cuda         # one GPU (bf16 autocast)
    torchrun --standalone --nproc_per_node=8 train.py --preset=medium --batch_size=512
    python train.py --config=my_run.json --lr=2e-3       # a JSON file of options, then command-line ones
    python train.py --resume=runs/tiny/ckpt.pt           # continue exactly where a run stopped

``main`` reads top to bottom: configuration, data, model, optimizer, the loop, saving. One step:
1. ``data.BatchIterator`` builds the batch of step k, a pure function of (seed, k), with each pair
   row's role (conditional: one segment given clean; unconditional: one hidden; or joint);
2. ``corrupt_batch`` draws t and the masks (``mdm.corrupt``; anti-masking doubles each row) and
   applies the roles (``mdm.reveal_segments``, ``mdm.drop_segments``);
3. each process splits its rows into micro-batches whose ``mdm.nelbo`` is scaled so that the gradients
   summed over micro-batches and averaged over processes are those of the whole batch's NELBO;
4. AdamW steps with per-module learning rates; the weight EMA follows.
So the losses do not depend on the numbers of processes and accumulation steps, and a resumed run
continues exactly (tests/test_train.py checks both).

``batch_size`` B is the *physical* batch of ``sde_batch.py`` (anti-masked complements included) and
``tokens`` the horizon D; the schedule and every optimizer setting come from ``sde_batch.plan``
(kappa = 1 unless a reference run ``base_batch``/``base_tokens`` is given).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import math
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import AdamW
from tqdm import tqdm

import checkpoint
import evaluate
import mdm
import sde_batch
import shards
from data import Batch, BatchIterator, DataConfig, TriModalData
from distributed import NLL, Dist, Preemption, setup_distributed, teardown, use_fsdp, wrap
from model import PRESETS, Denoiser, ModelConfig, embed_codes, model_summary


# --- Configuration: two dataclasses (this one and data.DataConfig), one flat command line ---------
@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run except the data's (``data.DataConfig``). ``--help`` prints both."""

    # model
    preset: str = "tiny"  # a size from model.PRESETS: tiny, small, base, medium, large, xl
    d_model: int = 0  # width; 0 = the preset's
    n_layers: int = 0  # depth; 0 = the preset's
    n_heads: int = 0  # attention heads; 0 = the preset's
    objective: str = "mdm"  # mdm (masked diffusion) or ar (the autoregressive twin of the same shape)
    code_init: bool = True  # media token embeddings start from what their codes stand for (model.embed_codes)
    # batch and horizon
    batch_size: int = 64  # B: rows per optimizer step over all processes (anti-masked copies included)
    micro_batch: int = 0  # rows per forward pass of one process; 0 = B / processes
    tokens: float = 2.4e7  # D: the horizon in tokens (positions, padding included)
    mix_text: float = 0.15  # share of text rows (the three shares are normalized to sum to 1)
    mix_image_text: float = 0.55  # share of image-text rows
    mix_audio_text: float = 0.3  # share of audio-text rows
    # the diffusion objective
    schedule: str = "linear"  # the masking schedule beta(t): linear, cosine or poly<p> (mdm.Schedule)
    estimator: str = "time"  # NELBO estimator: time (t ~ U, weight w(t)) or count (|mask| ~ U{1..N}, weight N/|mask|)
    anti_masking: bool = True  # every row twice per batch, with a mask and with its complement (mdm.corrupt)
    t_min: float = 1e-3  # t is drawn in [t_min, 1 - t_min] (mdm.sample_times)
    cond_keep: float = 0.7  # share of pair rows shown one segment clean: the conditional tasks
    cond_media: float = 0.5  # share of those shown the media (captioning, recognition), not the text
    cond_drop: float = 0.1  # share of pair rows with one segment hidden: the unconditional branch of guidance
    # optimizer: the reference settings, which sde_batch rescales for this batch and horizon
    lr: float = 1e-3  # peak learning rate
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.99  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.1  # AdamW's decoupled weight decay (norm gains take none)
    warmup_tokens: float = 3e5  # linear warmup length, in tokens
    final_lr_frac: float = 0.1  # the cosine decay ends at this fraction of the peak lr
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = no clipping)
    ema: float = 0.995  # weight EMA factor per step (an average over ~1/(1 - ema) steps); 0 = off
    modules: str = ""  # changes to the per-module AdamW table MODULE_TABLE, e.g. embedding.lr=5,mlp_gate.eps=10
    depth_factor: float = 0.5  # lr multiplier of the last block; blocks in between interpolate geometrically
    # the SDE reference run (sde_batch.py)
    base_batch: int = 0  # B_base of the run these settings were tuned on; 0 = this run (kappa = 1)
    base_tokens: float = 0.0  # D_base of that run; 0 = this run's horizon
    min_steps: int = 200  # S_crit: warn when the run takes fewer optimizer steps
    # the run
    out_dir: str = "runs/tiny"  # where the checkpoint, metrics, figures and report go
    seed: int = 0  # seed of the initialization, the batches and the masks
    device: str = "auto"  # auto (cuda if visible), cpu or cuda
    dtype: str = "auto"  # auto (bf16 on cuda; on cpu whichever a timed probe finds faster), fp32 or bf16
    compile: str = "auto"  # torch.compile each block: auto (on a GPU, if a compiler works), true or false
    fsdp: str = "auto"  # FSDP2 sharding: auto (large and xl with several processes), true or false
    log_every: int = 10  # steps between lines of metrics.jsonl
    eval_every: int = 250  # steps between validation NELBOs; 0 = only at the end of the horizon
    eval_batches: int = 4  # validation batches per evaluation
    ckpt_every: int = 250  # steps between checkpoints (one is always written at the end)
    max_steps: int = 0  # stop this invocation after this many steps (0 = run to the horizon)
    final_report: bool = True  # at the end, write samples of every task and a metrics report
    prepare_only: bool = False  # prepare the shard set (--data, or the cache's) and exit without training

    def model_config(self, seq_len: int) -> ModelConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {list(PRESETS)}")
        if self.objective not in ("mdm", "ar"):
            raise ValueError(f"--objective must be mdm or ar, got {self.objective!r}")
        base = PRESETS[self.preset]
        shape = {k: getattr(self, k) for k in ("d_model", "n_layers", "n_heads") if getattr(self, k)}
        return replace(base, max_len=max(base.max_len, seq_len), causal=self.objective == "ar", **shape)

    def settings(self) -> sde_batch.OptimSettings:
        """The reference optimizer settings (``sde_batch.plan`` rescales them for the batch and horizon)."""
        betas, ema = (self.beta1, self.beta2), self.ema or None
        return sde_batch.OptimSettings(
            self.lr, betas, self.eps, self.weight_decay, ema, self.warmup_tokens, self.final_lr_frac
        )

    @property
    def ratios(self) -> dict[str, float]:
        return {"text": self.mix_text, "image_text": self.mix_image_text, "audio_text": self.mix_audio_text}


def option_help(cls: type) -> dict[str, str]:
    """Each field's one-line comment in the class's source: what ``--help`` prints for it."""
    return dict(re.findall(r"^    (\w+): [^=\n]+= .*?  # (.+)$", inspect.getsource(cls), re.M))


def to_value(kind: str, text: object) -> object:
    """A command-line (or JSON) value as the field's type; ValueError if it does not parse."""
    if kind.startswith("tuple"):
        items = text if isinstance(text, list | tuple) else [t for t in str(text).split(",") if t.strip()]
        return tuple(to_value(kind[6:-6], t) for t in items)  # tuple[float, ...] -> float
    if kind == "bool":
        word = str(text).lower()
        if word not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"not a boolean: {text!r}")
        return word in ("true", "1", "yes")
    return {"int": int, "float": float, "str": str}[kind](text if kind == "str" else str(text))


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # a bad option is an expected error (``user_errors``): one line
        raise ValueError(message)


def parser() -> ArgumentParser:
    """The command line: every field of TrainConfig and DataConfig as ``--name`` (or ``--na-me``)."""
    about = {"description": __doc__.split("\n\n")[0], "allow_abbrev": False, "argument_default": argparse.SUPPRESS}
    p = ArgumentParser(prog="train.py", usage="python train.py [--option=value ...]", **about)
    p.add_argument("--config", help="a JSON file of options (the command line wins)")
    p.add_argument("--resume", help="a checkpoint to continue exactly; its options apply unless given again")
    for where, cls in (("train", TrainConfig), ("data", DataConfig)):
        group, helps = p.add_argument_group(f"{where}.{cls.__name__}"), option_help(cls)
        for f in fields(cls):
            names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
            convert = lambda text, kind=f.type: to_value(kind, text)  # noqa: E731
            convert.__name__ = f.type  # argparse names it in "invalid <type> value"
            extra = {"nargs": "?", "const": "true"} if f.type == "bool" else {}
            metavar = {"int": "N", "float": "X", "str": "S", "bool": "BOOL"}.get(f.type, "A,B,...")
            text = f"{helps[f.name]} (default: {f.default})"
            group.add_argument(*names, dest=f.name, type=convert, help=text, metavar=metavar, **extra)
    return p


def parse_options(argv: list[str]) -> tuple[dict, str]:
    """(the options given, as {field: value}, the JSON file's first; the checkpoint to resume or "")."""
    given = vars(parser().parse_args(argv))
    path, resume = given.pop("config", None), given.pop("resume", "")
    options = {}
    if path:
        if not Path(path).is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold one JSON object of options, not a {type(raw).__name__}")
        kinds = {f.name: f.type for cls in (TrainConfig, DataConfig) for f in fields(cls)}
        for key, value in raw.items():
            if key not in kinds:
                raise ValueError(f"config file {path}: unknown option {key!r} (see python train.py --help)")
            options[key] = to_value(kinds[key], value)
    return {**options, **given}, resume


def split_options(options: dict, train: TrainConfig, data: DataConfig):
    """The two configs with ``options`` applied, each option to the config that has it."""
    mine = {f.name for f in fields(TrainConfig)}
    train = replace(train, **{k: v for k, v in options.items() if k in mine})
    return train, replace(data, **{k: v for k, v in options.items() if k not in mine})


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A ValueError or FileNotFoundError in this block (a bad option, an unreadable file, an impossible
    configuration) ends the run with one line, "train.py: error: ..." (status 1), and no traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: error: {e}") from None


def load_data(cfg: DataConfig, codec_sha256: str, d: Dist, given: set[str]) -> TriModalData:
    """The run's data, read from its shard set (``shards.py``): the --data folder, prepared there first
    if it is not yet, or the cache's copy of the sources. Process 0 prepares while the others wait."""
    folder = Path(cfg.data) if cfg.data else shards.cache_dir(cfg, codec_sha256)
    if d.main:
        shards.prepared(cfg, codec_sha256)
    if d.world > 1:
        dist.barrier()
    shards.check_same_data(cfg, folder, given)
    data = shards.open_shards(folder, codec_sha256, cfg)
    data.config = cfg  # what the checkpoint records: the run's own options ("" for the cache: found anew)
    return data


# --- Processes and devices ------------------------------------------------------------------------
def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")


def use_compile(choice: str, device: torch.device) -> tuple[bool, str]:
    """--compile made concrete, and why: (compile the blocks?, a note). auto compiles on a GPU only (on a CPU,
    lab/BENCHMARKS.md compares compiled and eager runs). Compiling needs a working toolchain (a C++ compiler;
    Triton on a GPU): a one-line function is compiled first, and without one the run goes on eager."""
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"--compile must be auto, true or false, got {choice!r}")
    if choice == "false" or (choice == "auto" and device.type == "cpu"):
        return False, f"--compile={choice}: eager" + (" on a CPU" if choice == "auto" else "")
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except Exception as e:  # whatever breaks the toolchain, the run is the same, eager
        why = " ".join(str(e).split())[:200]  # one line
        return False, f"--compile={choice}: eager, this machine cannot compile ({type(e).__name__}: {why})"
    return True, f"--compile={choice}: compiled blocks"


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast (matmuls in bf16, weights and reductions in fp32) where asked for, else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))


def time_dtypes(model: Denoiser, c: mdm.Corrupted, repeats: int = 3) -> dict[str, float]:
    """Median seconds of a forward and backward pass of ``c`` in fp32 and in bf16 autocast, interleaved.

    On a copy of the model, so the run's weights and random streams are untouched.
    """
    net, seconds = NLL(copy.deepcopy(model)), {"fp32": [], "bf16": []}
    for r in range(repeats + 1):  # round 0 warms up
        for name, times in seconds.items():
            start = time.perf_counter()
            with torch.autocast(c.x0.device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
                mdm.nelbo(net, c, model.vocab).loss.backward()
            times += [time.perf_counter() - start] if r else []
    return {name: sorted(times)[len(times) // 2] for name, times in seconds.items()}


def resolve_dtype(cfg: TrainConfig, model: Denoiser, c: mdm.Corrupted, d: Dist) -> tuple[TrainConfig, str]:
    """--dtype=auto made concrete, and why: bf16 on a GPU; on a CPU, bf16 if ``time_dtypes`` finds it >= 1.1x
    faster for this model and micro-batch (CPUs with bf16 instructions: AVX512-BF16, AMX), else fp32.

    Every process takes rank 0's choice. The run's config records the result, so a resumed run keeps it:
    a run is reproducible given (seed, threads, dtype).
    """
    if cfg.dtype != "auto":
        return cfg, f"--dtype={cfg.dtype}"
    if d.device.type != "cpu":
        return replace(cfg, dtype="bf16"), "--dtype=auto: bf16 on a GPU"
    t = time_dtypes(model, c)
    choice = torch.tensor(t["fp32"] / t["bf16"] >= 1.1)
    if d.world > 1:
        dist.broadcast(choice, 0)
    dtype = "bf16" if choice else "fp32"
    return replace(cfg, dtype=dtype), f"--dtype=auto: {dtype}, bf16 ran a step {t['fp32'] / t['bf16']:.2f}x as fast"


# --- Optimizer: the per-module AdamW table, its parameter groups, and the weight EMA -------------
@dataclass(frozen=True)
class ModuleSettings:
    """A row of the per-module AdamW table: multipliers of the run's learning rate, weight decay and eps."""

    lr: float = 1.0
    wd: float = 1.0
    eps: float = 1.0


# The paper's published summary: embedding and unembedding want much larger effective learning rates,
# attention and the MLP gate more conservative ones with their own epsilon, later blocks smaller updates
# (``depth_factor``). lab/STUDIES.md section 9 searches this table at the tiny size.
MODULE_TABLE: dict[str, ModuleSettings] = {
    "embedding": ModuleSettings(lr=3.0),  # its rows are updated sparsely, by the tokens present
    "unembedding": ModuleSettings(),
    "attn_qkv": ModuleSettings(),
    "attn_out": ModuleSettings(),
    "mlp_gate": ModuleSettings(),
    "mlp_up": ModuleSettings(),
    "mlp_down": ModuleSettings(),
    "norms": ModuleSettings(wd=0.0),  # LayerNorm gains take no weight decay
}
KIND_OF = {"embed": "embedding", "unembed": "unembedding", "attn.qkv": "attn_qkv", "attn.out": "attn_out",
           "mlp.gate": "mlp_gate", "mlp.up": "mlp_up", "mlp.down": "mlp_down"}  # fmt: skip


def module_table(changes: str = "") -> dict[str, ModuleSettings]:
    """MODULE_TABLE with ``--modules`` applied: comma-separated ``kind.lr|wd|eps=value``."""
    table = dict(MODULE_TABLE)
    for item in filter(None, (c.strip() for c in changes.split(","))):
        key, _, value = item.partition("=")
        kind, _, name = key.partition(".")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if kind not in table or name not in ("lr", "wd", "eps") or not 0 <= number < math.inf:
            raise ValueError(f"--modules: {item!r} is not kind.lr|wd|eps=value (value >= 0; kinds {', '.join(table)})")
        table[kind] = replace(table[kind], **{name: number})
    return table


def module_kind(name: str) -> str:
    """The table's kind of a ``Denoiser`` parameter, from its name (``blocks.2.mlp.gate.weight`` -> mlp_gate)."""
    if "norm" in name:
        return "norms"
    path = name.split(".")
    return KIND_OF[".".join(path[2:-1] if path[0] == "blocks" else path[:-1])]


def param_groups(model: Denoiser, cfg: TrainConfig, settings: sde_batch.OptimSettings) -> list[dict]:
    """AdamW groups, one per module kind outside the blocks and per (block, kind) inside them.

    For a row (lr, wd, eps) of the table and block l of n: lr multiplier lr · depth_factor^(l/(n-1)) (1
    outside the blocks), weight decay wd · lambda, epsilon eps · epsilon. ``settings`` are the plan's,
    already rescaled by the SDE rule (``sde_batch.rescale``), so the rule reaches every group:
    epsilon_g = eps · epsilon_base / sqrt(kappa), lambda_g = wd · lambda_base · sqrt(kappa).
    """
    table, n, groups = module_table(cfg.modules), len(model.blocks), {}
    for name, p in model.named_parameters():
        kind = module_kind(name)
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        key = kind if block is None else f"block{block}.{kind}"
        if key not in groups:
            row, depth = table[kind], 1.0 if block is None else cfg.depth_factor ** (block / max(1, n - 1))
            groups[key] = {"name": key, "params": [], "lr_mult": row.lr * depth,
                           "weight_decay": row.wd * settings.weight_decay, "eps": row.eps * settings.eps}  # fmt: skip
        groups[key]["params"].append(p)
    return list(groups.values())


def describe_table(cfg: TrainConfig, groups: list[dict]) -> str:
    """The table as run: each kind's multipliers and its groups' learning-rate multipliers by block."""
    lines = [f"per-module AdamW (multipliers of lr, weight decay, eps; depth factor {cfg.depth_factor}):"]
    for kind, row in module_table(cfg.modules).items():
        mults = [g["lr_mult"] for g in groups if g["name"].split(".")[-1] == kind]
        lines.append(f"  {kind:<12s} lr x{row.lr:<6g} wd x{row.wd:<6g} eps x{row.eps:<6g} "
                     f"group lr multipliers {' '.join(f'{m:.3g}' for m in mults)}")  # fmt: skip
    return "\n".join(lines)


class EMA:
    """theta_ema <- rho theta_ema + (1 - rho) theta, with rho_k = min(rho, (1 + k)/(10 + k)) at step k.

    The warm-up of rho lets the average forget the random initialization quickly. ``swap`` exchanges
    the model's weights with the average (for evaluation) and back. Kept by parameter name.
    """

    def __init__(self, model: nn.Module, rho: float | None) -> None:
        self.rho = rho
        self.params = {n: p.detach().clone().float() for n, p in model.named_parameters()} if rho else {}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        rho = min(self.rho or 0.0, (1 + step) / (10 + step))
        for name, p in model.named_parameters() if self.rho else ():
            self.params[name].lerp_(p.detach().float(), 1 - rho)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        for name, p in model.named_parameters() if self.rho else ():
            tmp = p.detach().clone()
            p.copy_(self.params[name])
            self.params[name].copy_(tmp)


# --- One training step, and the validation NELBO --------------------------------------------------
def noise_generator(seed: int, step: int) -> torch.Generator:
    """The forward process's randomness of a step: a pure function of (seed, step), like the data."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + 1)


def corrupt_batch(batch: Batch, vocab: mdm.Vocab, cfg: TrainConfig, step: int) -> mdm.Corrupted:
    """The forward process on the whole batch (the same on every process), with each pair row's role.
    The AR twin's "forward process" masks nothing (``mdm.next_token_batch``)."""
    if cfg.objective == "ar":
        return mdm.next_token_batch(batch.ids, batch.pad, vocab)
    g = noise_generator(cfg.seed, step)
    if cfg.estimator == "count":  # the mask-count form: the given and hidden segments stay out of the draw
        outside = batch.given | batch.hidden
        c = mdm.corrupt_by_count(batch.ids, batch.pad, vocab, outside, anti_masking=cfg.anti_masking, generator=g)
    else:
        schedule, anti = mdm.Schedule.parse(cfg.schedule), cfg.anti_masking
        c = mdm.corrupt(batch.ids, batch.pad, vocab, schedule, t_min=cfg.t_min, anti_masking=anti, generator=g)
    given, hidden = (torch.cat([m, m]) if cfg.anti_masking else m for m in (batch.given, batch.hidden))
    return mdm.drop_segments(mdm.reveal_segments(c, given), hidden, vocab)


def own_sequences(sequences: int, d: Dist) -> slice:
    """The sequences of a batch (rows of ``data.Batch``) that process ``d.rank`` reads: its 1/world of them."""
    n = sequences // d.world
    return slice(d.rank * n, (d.rank + 1) * n)


def own_rows(c: mdm.Corrupted, d: Dist, anti_masking: bool) -> mdm.Corrupted:
    """This process's rows of the corrupted batch: its own sequences and, with anti-masking, their complements
    (``mdm.corrupt`` puts the B masks first, then the B complements). One process keeps every row, in order."""
    sequences = c.x0.shape[0] // (2 if anti_masking else 1)
    own = torch.arange(sequences)[own_sequences(sequences, d)]
    return c.rows(torch.cat([own, own + sequences]) if anti_masking else own)


@dataclass
class StepResult:
    loss: float
    modality_sums: torch.Tensor
    modality_counts: torch.Tensor
    grad_norm: float


def train_step(
    net: nn.Module, opt: AdamW, c: mdm.Corrupted, vocab: mdm.Vocab, cfg: TrainConfig, d: Dist, micro: int, lr: float
) -> StepResult:
    """Gradient of the batch's NELBO from this process's micro-batches, then one AdamW step.

    Each micro-batch's loss is sum(w * nll) / N_global * world_size: summing over micro-batches and
    averaging over processes (what DDP/FSDP do with gradients) gives d/dtheta sum(w * nll) / N_global.
    """
    mine = own_rows(c, d, cfg.anti_masking).to(d.device)
    rows = mine.x0.shape[0]
    n_global = c.maskable.sum().clamp_min(1).to(d.device)
    sums = torch.zeros(len(mdm.MODALITIES), dtype=torch.float64, device=d.device)
    counts = torch.zeros(len(mdm.MODALITIES), dtype=torch.long, device=d.device)
    total = torch.zeros((), device=d.device)
    n_micro = rows // micro
    for k in range(n_micro):
        part, last = mine.rows(slice(k * micro, (k + 1) * micro)), k == n_micro - 1
        if hasattr(net, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            net.set_requires_gradient_sync(last)
        sync = net.no_sync() if hasattr(net, "no_sync") and not last else contextlib.nullcontext()  # DDP
        with sync, autocast(cfg, d.device):
            r = mdm.nelbo(net, part, vocab)
            loss = r.loss * part.maskable.sum().clamp_min(1) / n_global * d.world
        loss.backward()
        total += loss.detach() / d.world
        sums += r.modality_sums
        counts += r.modality_counts
    if d.world > 1:
        for t in (total, sums, counts):
            dist.all_reduce(t)
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_mult"]
    opt.step()
    opt.zero_grad(set_to_none=True)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return StepResult(float(total), sums.cpu(), counts.cpu(), float(grad_norm))


@torch.no_grad()
def validation(net, model: Denoiser, ema: EMA, data: TriModalData, cfg: TrainConfig, d: Dist, log: dict) -> dict:
    """Validation NELBO per modality (nats per data token) with the EMA weights (what sampling uses), logged.

    The same rows and masks at every evaluation, stratified t and no anti-masking or roles, so
    successive evaluations differ only by the weights. Every process evaluates its share of the rows.
    """
    model.eval()
    ema.swap(model)
    it = BatchIterator(data, "val", cfg.batch_size, cfg.ratios, seed=12345)
    schedule = mdm.Schedule.parse(cfg.schedule)
    sums = torch.zeros(len(mdm.MODALITIES), dtype=torch.float64, device=d.device)
    counts = torch.zeros(len(mdm.MODALITIES), dtype=torch.long, device=d.device)
    micro = cfg.micro_batch or cfg.batch_size // d.world
    for k in range(cfg.eval_batches):
        b = it.batch(k, own_sequences(cfg.batch_size, d))
        if cfg.objective == "ar":
            c = mdm.next_token_batch(b.ids, b.pad, data.vocab)
        else:
            c = mdm.corrupt(b.ids, b.pad, data.vocab, schedule, t_min=cfg.t_min, generator=noise_generator(999, k))
        mine = c.rows(own_sequences(cfg.batch_size, d)).to(d.device)
        for j in range(0, mine.x0.shape[0], micro):
            with autocast(cfg, d.device):
                r = mdm.nelbo(net, mine.rows(slice(j, j + micro)), data.vocab)
            sums += r.modality_sums
            counts += r.modality_counts
    if d.world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    result = mdm.per_modality(sums.cpu(), counts.cpu())
    result["all"] = float(sums.sum() / counts.sum())
    if hasattr(net, "reshard"):  # FSDP2 leaves the root's parameters unsharded after a forward-only pass
        net.reshard()
    ema.swap(model)
    model.train()
    if d.main:
        log_jsonl(Path(cfg.out_dir) / "metrics.jsonl", {**log, "val": result, "ema": bool(ema.rho)})
        evaluate.plot_losses(Path(cfg.out_dir) / "metrics.jsonl", Path(cfg.out_dir) / "loss.png")
    return result


# --- The run --------------------------------------------------------------------------------------
def log_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def startup_report(cfg: TrainConfig, data: TriModalData, model: Denoiser, plan, d: Dist, micro: int, fsdp: bool) -> str:
    accum, rows, lay = cfg.batch_size // (micro * d.world), cfg.batch_size // (1 + cfg.anti_masking), data.layout
    lines = [
        model_summary(model),
        f"data: |V| = {data.vocab.size}, L* = {lay.seq_len}, image {lay.image_len} tokens, audio {lay.audio_len} "
        f"tokens; mixing {cfg.ratios}; speed copies of training clips {data.config.audio_speeds or 'none'}",
        f"batch: {cfg.batch_size} rows/step ({rows} sequences{' x2 by anti-masking' if cfg.anti_masking else ''}) "
        f"= {plan.tokens_per_step:,} tokens/step; {d.world} process(es) x {micro} rows x {accum} accumulation step(s)",
        f"device: {d.device}, {'bf16 autocast' if uses_bf16(cfg, d.device) else 'fp32'}, "
        f"{'FSDP2' if fsdp else 'DDP' if d.world > 1 else 'single process'}",
        f"diffusion: {cfg.estimator} estimator, schedule {cfg.schedule}, anti-masking {cfg.anti_masking}, "
        f"t in [{cfg.t_min}, {1 - cfg.t_min}]; "
        f"pair rows conditional with p = {cfg.cond_keep} (the media given in {cfg.cond_media} of them), "
        f"unconditional with p = {cfg.cond_drop}; media embeddings from codes: {cfg.code_init}",
        plan.describe(),
    ]
    return "\n".join(lines + [w for w in [sde_batch.critical_batch_warning(plan)] if w])


def validate(cfg: TrainConfig, d: Dist) -> int:
    """Check the batch arithmetic and the choices up front; return the micro-batch."""
    uses_bf16(cfg, d.device), use_fsdp(cfg.fsdp, cfg.preset, d)  # both check their option
    if cfg.estimator not in ("time", "count"):
        raise ValueError(f"--estimator must be time or count, got {cfg.estimator!r}")
    module_table(cfg.modules)  # checks --modules
    if cfg.anti_masking and cfg.batch_size % 2:
        raise ValueError(f"--batch_size={cfg.batch_size} must be even with anti-masking (each sequence appears twice)")
    if (cfg.batch_size // (1 + cfg.anti_masking)) % d.world:
        per = "sequences (rows / 2 with anti-masking)" if cfg.anti_masking else "rows"
        raise ValueError(f"--batch_size={cfg.batch_size} must give each of the {d.world} processes as many {per}")
    micro = cfg.micro_batch or cfg.batch_size // d.world
    if (cfg.batch_size // d.world) % micro:
        raise ValueError(
            f"each of the {d.world} process(es) has {cfg.batch_size // d.world} rows per step, "
            f"which --micro_batch={micro} does not divide"
        )
    return micro


def main(argv: list[str] | None = None) -> dict:
    # 1. configuration: the defaults, or the resumed run's own; then the options given
    with user_errors():  # the options and files of the run: a bad one ends it with one line
        options, resume = parse_options(sys.argv[1:] if argv is None else argv)
        ckpt = checkpoint.read_checkpoint(resume) if resume else None
        cfg, data_cfg = TrainConfig(), DataConfig()
        if ckpt is not None:  # --max_steps belongs to an invocation, not to the run
            cfg = TrainConfig(**{**ckpt["config"], "max_steps": 0})
            data_cfg = DataConfig.from_dict(ckpt["data_config"])
        cfg, data_cfg = split_options(options, cfg, data_cfg)
        if cfg.objective == "ar":  # nothing is masked: no anti-masked copies, no roles, no speed copies
            cfg = replace(cfg, anti_masking=False, cond_drop=0.0, cond_keep=0.0)
            data_cfg = replace(data_cfg, audio_speeds=())
        d = setup_distributed(cfg.device)
        micro = validate(cfg, d)
        # 2. data: a shard set on disk (an existing --data set brings its own options; those given must agree)
        given = {f.name for f in fields(DataConfig)} & (set(options) if ckpt is None else set(asdict(data_cfg)))
        data_cfg = shards.adopt(data_cfg, given)
        reference = sde_batch.Reference(cfg.base_batch or cfg.batch_size, cfg.base_tokens or cfg.tokens, cfg.settings())
        plan = sde_batch.plan(reference, cfg.batch_size, cfg.tokens, data_cfg.seq_len, cfg.min_steps)  # before any data
        recorded = ckpt["audio_codec_sha256"] if ckpt is not None else ""
        named = ckpt is None or "audio_codec" in options  # a fresh run names its codec itself
        sha = checkpoint.codec_voucher(data_cfg.audio_codec, recorded, named)
        checkpoint.same_image_tokenizer(data_cfg.image_tokenizer, ckpt)
        data = load_data(data_cfg, sha, d, given)
        if cfg.prepare_only:
            teardown(d)
            print(f"prepared the shard set {data_cfg.data or shards.cache_dir(data_cfg, sha)}")
            return {"step": 0, "tokens": 0, "val": {}, "preempted": None}
        rows = cfg.batch_size // (2 if cfg.anti_masking else 1)  # the sequences of a batch
        it = BatchIterator(data, "train", rows, cfg.ratios, cfg.seed, cfg.cond_keep, cfg.cond_drop, cfg.cond_media)
        # 3. model (seeded after the data, whose first preparation may draw random numbers)
        torch.manual_seed(cfg.seed)
        model = Denoiser(cfg.model_config(data_cfg.seq_len), data.vocab)
        if cfg.code_init and ckpt is None:  # media embeddings start from their codes (the same on every process)
            g = torch.Generator().manual_seed(cfg.seed)
            for m, codes in data.code_vectors().items():
                embed_codes(model, m, torch.from_numpy(codes), g)
        model = model.to(d.device)
        first = own_rows(corrupt_batch(it.batch(0, own_sequences(rows, d)), data.vocab, cfg, 0), d, cfg.anti_masking)
        first = first.rows(slice(0, micro)).to(d.device)
        cfg, dtype_note = resolve_dtype(cfg, model, first, d)
        fsdp = use_fsdp(cfg.fsdp, cfg.preset, d)
        compiled, compile_note = use_compile(cfg.compile, d.device)
        net = wrap(model, d, fsdp, compiled, bf16=d.device.type == "cuda" and uses_bf16(cfg, d.device))
    # 4. optimizer, every setting from the SDE plan of this batch and horizon (made in step 1)
    s, table = plan.settings, {kind: asdict(row) for kind, row in module_table(cfg.modules).items()}
    opt = AdamW(param_groups(model, cfg, s), lr=s.lr, betas=s.betas, eps=s.eps, fused=True)
    ema = EMA(model, s.ema)
    step, tokens = checkpoint.restore(ckpt, model, opt, ema, it) if ckpt is not None else (0, 0)
    out = Path(cfg.out_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        print(startup_report(cfg, data, model, plan, d, micro, fsdp) + f"\ndtype: {dtype_note}")
        print(describe_table(cfg, opt.param_groups))
        print(f"compile: {compile_note}")
        if resume:
            print(f"resumed from {resume} at step {step} ({tokens:,} tokens)")
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "data": asdict(data_cfg)}, indent=2))

    # 5. the loop
    ckpt_path = out / ("ckpt" if fsdp else "ckpt.pt")
    last_good = str(ckpt_path) if resume else "none yet"
    stop = plan.steps if not cfg.max_steps else min(plan.steps, step + cfg.max_steps)
    bar = tqdm(total=plan.steps, initial=step, disable=not d.main, unit="step", dynamic_ncols=True, file=sys.stdout)
    t0, tokens0, val, tok_s = time.perf_counter(), tokens, {}, 0.0
    run_sums = torch.zeros(len(mdm.MODALITIES), dtype=torch.float64)  # the masked loss of each modality since
    run_counts = torch.zeros(len(mdm.MODALITIES), dtype=torch.long)  # the last log line, and its data tokens
    preempt, stopped_by, failure = Preemption(), None, None
    if step == 0 and cfg.eval_every:
        val = validation(net, model, ema, data, cfg, d, {"step": 0, "tokens": 0})  # the untrained baseline
    try:  # the signal handlers go back as they were, however the loop ends
        while step < stop and not stopped_by:
            c = corrupt_batch(it.batch(step, own_sequences(rows, d)), data.vocab, cfg, step)
            it.step = step + 1
            lr = plan.lr_for_step(step)
            r = train_step(net, opt, c, data.vocab, cfg, d, micro, lr)
            if not math.isfinite(r.loss):  # the same on every process (the loss is all-reduced)
                failure = (
                    f"non-finite loss ({r.loss}) at step {step}; the last good checkpoint is {last_good}. "
                    "Resume from it with a lower --lr (or check the data of this step)."
                )
                break
            ema.update(model, step)
            step, tokens = step + 1, tokens + plan.tokens_per_step
            run_sums += r.modality_sums
            run_counts += r.modality_counts
            tok_s = (tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
            if d.main and (step % max(1, cfg.log_every) == 0 or step == stop):
                row = {"step": step, "tokens": tokens, "loss": r.loss, "train": mdm.per_modality(run_sums, run_counts)}
                log_jsonl(out / "metrics.jsonl", {**row, "lr": lr, "grad_norm": r.grad_norm, "tokens_per_s": tok_s})
                run_sums.zero_()
                run_counts.zero_()
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == plan.steps:
                val = validation(net, model, ema, data, cfg, d, {"step": step, "tokens": tokens})
            stopped_by = signal.Signals(preempt.received).name if preempt.requested(d) else None
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == stop or stopped_by:
                run = {"config": asdict(cfg), "step": step, "tokens": tokens, "world": d.world, "module_table": table}
                if fsdp or d.main:
                    checkpoint.save_checkpoint(ckpt_path, run, data, model, opt, ema, it, d.rank, fsdp)
                last_good = f"{ckpt_path} (step {step})"
    finally:
        preempt.restore()
    bar.close()

    # 6. the end: a summary; once the processes have parted, the portable export and the report
    if d.main and not failure:
        seconds = time.perf_counter() - t0
        print(f"trained {step} steps, {tokens:,} tokens in {seconds / 60:.1f} min ({tok_s:,.0f} tokens/s)")
        bits = ", ".join(f"{m} {v / math.log(2):.3f}" for m, v in val.items())
        if val:
            print(f"validation NELBO (bits per data token): {bits}")
        if stopped_by:
            print(f"{stopped_by}: stopped after step {step}, wrote {ckpt_path}; continue with --resume={ckpt_path}")
    del net, model, opt, ema  # what holds the process group: DDP's reducer, FSDP's sharded tensors
    teardown(d)
    if failure:
        raise SystemExit(failure)
    if d.main and step == plan.steps and not stopped_by:
        checkpoint.export(checkpoint.load_for_inference(ckpt_path), out / "export")
        if cfg.final_report:
            evaluate.final_report(ckpt_path, out)
    return {"step": step, "tokens": tokens, "val": val, "preempted": stopped_by}


if __name__ == "__main__":
    result = main()
    if result["preempted"]:  # the conventional status of a process ended by that signal
        sys.exit(128 + signal.Signals[result["preempted"]].value)
