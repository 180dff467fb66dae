"""Train a tri-modal masked diffusion model: one script from a 2-core laptop to multi-GPU torchrun.

    python train.py                                      # tiny model, embedded tri-modal data, CPU
    python train.py --preset=small --device=cuda         # one GPU (bf16 autocast)
    torchrun --standalone --nproc_per_node=8 train.py --preset=medium --batch_size=512
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \\
        --rdzv_endpoint=$HEAD_NODE:29500 train.py --preset=large --fsdp=true   # and node_rank=1 on the other
    python train.py --config=my_run.json --lr=2e-3       # a JSON config file, then --key=value overrides
    python train.py --resume=runs/tiny/ckpt.pt           # continue exactly where a run stopped

What one step does (read ``train_step`` first):
1. ``data.BatchIterator`` builds the global batch of step k, a pure function of (seed, k);
2. ``mdm.corrupt`` draws t and the masks for all of it (anti-masking doubles each sequence), and
   ``mdm.reveal_segments`` / ``mdm.drop_segments`` make some pair rows conditional (one segment
   given clean: the text-to-image, captioning, ... situations) or unconditional (for guidance);
3. this process keeps its rows and splits them into micro-batches; each micro-batch's
   ``mdm.nelbo`` is scaled so that the gradients summed over micro-batches and averaged by DDP/FSDP
   over processes are those of the NELBO of the whole global batch;
4. AdamW steps with per-module learning rates; the weight EMA follows.
So the losses of a run do not depend on the number of processes or of accumulation steps, and a
resumed run continues exactly (tests/test_train.py checks both).

Batch vocabulary: ``batch_size`` B counts rows per optimizer step over all processes (the *physical*
batch of ``sde_batch.py``; with anti-masking half of them are the complements of the other half);
``micro_batch`` is what one process runs at once, so there are B / (micro_batch * world_size)
accumulation steps. ``tokens`` is the horizon D; the learning-rate
schedule and every optimizer setting come from ``sde_batch.plan`` (kappa = 1 unless a reference run
``base_batch``/``base_tokens`` is given).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import data as data_lib
import fsq
import mdm
import sde_batch

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run. Override any field with --name=value or a JSON file (--config)."""

    # model: a preset from mdm.PRESETS, optionally reshaped
    preset: str = "tiny"
    d_model: int = 0  # 0: the preset's
    n_layers: int = 0
    n_heads: int = 0
    # data (see data.DataConfig)
    seq_len: int = 48
    text_vocab: int = 1024
    text_tokenizer: str = "default"
    text_files: str = ""  # comma-separated .txt / .jsonl files added to the text task
    image_dir: str = ""
    audio_dir: str = ""
    audio_codec: str = ""  # a codec checkpoint (fsq.py format or TorchScript); "" = the committed one
    image_levels: int = 4  # image tokens: gray levels per pixel and pixels per token side (data.PixelTokenizer)
    image_patch: int = 2
    audio_speeds: str = "0.8,0.9,1.1,1.2"  # speed-perturbed copies of the training clips that recognition
    # rows condition on ("" = none; data.speed_perturb, train.condition_on_copies)
    strict: bool = False
    mix_text: float = 0.15  # modality mixing ratios (normalised to sum to 1)
    mix_image_text: float = 0.45
    mix_audio_text: float = 0.4
    # batch and horizon
    batch_size: int = 64  # B: rows per optimizer step, all processes together (anti-masked copies included)
    micro_batch: int = 0  # rows per forward pass per process; 0 = B / world_size
    tokens: float = 8e6  # D: the token horizon (positions, padding included)
    # the SDE reference run (0 = this run is the reference: kappa = 1)
    base_batch: int = 0
    base_tokens: float = 0.0
    gamma: float = 0.44
    min_steps: int = 200  # S_crit: warn when the run has fewer optimizer steps
    # optimizer: reference settings, rescaled by kappa (sde_batch.rescale)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_tokens: float = 3e5
    final_lr_frac: float = 0.1
    ema: float = 0.995  # weight EMA factor per step (an average over ~1/(1 - ema) steps); 0 = off
    grad_clip: float = 1.0
    lr_embed: float = 3.0  # learning-rate multipliers per module group (our reading of the paper)
    lr_unembed: float = 1.0
    depth_factor: float = 0.5  # the last block's lr multiplier; blocks in between interpolate geometrically
    # objective: "mdm" (masked diffusion) or "ar" (the autoregressive twin of the same shape, a baseline)
    objective: str = "mdm"
    code_init: bool = True  # media token embeddings start from their codes (mdm.embed_codes)
    # diffusion
    schedule: str = "linear"
    anti_masking: bool = True
    t_min: float = 1e-3
    cond_drop: float = 0.1  # probability of hiding one segment of a pair row (the unconditional branch, for guidance)
    cond_keep: float = 0.7  # probability of showing one segment of a pair row clean (the conditional tasks)
    cond_media: float = 0.5  # of those, the share showing the media (captioning, recognition), not the text
    # run
    out_dir: str = "runs/tiny"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on cuda, fp32 on cpu) | fp32 | bf16
    compile: bool = False
    fsdp: str = "auto"  # auto (on for presets large and xl with more than one process) | true | false
    log_every: int = 10
    eval_every: int = 250  # 0: evaluate only at the end of the horizon
    eval_batches: int = 4
    ckpt_every: int = 250
    max_steps: int = 0  # stop after this many steps of this invocation (0 = run to the horizon)
    final_report: bool = True  # write samples of every task and a metrics report at the end

    def data_config(self, copies: bool = True, codec_sha256: str = "") -> data_lib.DataConfig:
        """The run's data; ``copies=False`` leaves out the speed-perturbed training clips (only training uses them).

        codec_sha256: the hash of the audio codec that the caller vouches for (``fsq.check_sha256``).
        """
        return data_lib.DataConfig(
            seq_len=self.seq_len,
            text_vocab=self.text_vocab,
            text_tokenizer=self.text_tokenizer,
            text_files=tuple(f for f in self.text_files.split(",") if f),
            image_dir=self.image_dir or None,
            audio_dir=self.audio_dir or None,
            strict=self.strict,
            image_levels=self.image_levels,
            image_patch=self.image_patch,
            audio_speeds=self.speeds() if copies else (),
            **({"audio_codec": self.audio_codec} if self.audio_codec else {}),
            audio_codec_sha256=codec_sha256,
            seed=self.seed,
        )

    def speeds(self) -> tuple[float, ...]:
        """--audio_speeds as factors, each in data.SPEED_RANGE (data.speed_perturb)."""
        try:
            factors = tuple(float(f) for f in self.audio_speeds.split(",") if f.strip())
        except ValueError:
            raise ValueError(f"--audio_speeds takes comma-separated factors, got {self.audio_speeds!r}") from None
        lo, hi = data_lib.SPEED_RANGE
        if not all(lo <= f <= hi for f in factors):
            raise ValueError(f"--audio_speeds: each factor must lie in [{lo}, {hi}], got {self.audio_speeds!r}")
        return factors

    def model_config(self) -> mdm.ModelConfig:
        if self.preset not in mdm.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {list(mdm.PRESETS)}")
        base = mdm.PRESETS[self.preset]
        if self.objective not in ("mdm", "ar"):
            raise ValueError(f"--objective must be mdm or ar, got {self.objective!r}")
        shape = {k: getattr(self, k) for k in ("d_model", "n_layers", "n_heads") if getattr(self, k)}
        return replace(base, max_len=max(base.max_len, self.seq_len), causal=self.objective == "ar", **shape)

    @property
    def ratios(self) -> dict[str, float]:
        return {"text": self.mix_text, "image_text": self.mix_image_text, "audio_text": self.mix_audio_text}

    def optim_settings(self) -> sde_batch.OptimSettings:
        return sde_batch.OptimSettings(
            lr=self.lr,
            betas=(self.beta1, self.beta2),
            eps=self.eps,
            weight_decay=self.weight_decay,
            ema=self.ema or None,
            warmup_tokens=self.warmup_tokens,
            final_lr_frac=self.final_lr_frac,
        )


def parse_config(argv: list[str], base: TrainConfig | None = None) -> tuple[TrainConfig, dict]:
    """--config=file.json first, then --key=value (or --key value) overrides; returns (config, overrides)."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options look like --key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            key, value = arg[2:], "true"
        pairs.append((key.replace("-", "_"), value))
        i += 1
    values: dict = {}
    for key, value in pairs:
        if key == "config":
            path = Path(value)
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist")
            try:
                values.update(json.loads(path.read_text()))
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    overrides = {k: v for k, v in pairs if k not in ("config", "resume")}
    values.update(overrides)
    out = {}
    for key, value in values.items():
        if key not in kinds:
            raise ValueError(f"unknown option --{key}; see the fields of TrainConfig in train.py")
        out[key] = _convert(key, value, kinds[key])
    resume = dict(pairs).get("resume", "")
    cfg = replace(base or TrainConfig(), **out)
    return cfg, {"resume": resume, **{k: out[k] for k in overrides}}


def _convert(key: str, value: object, kind: str) -> object:
    if not isinstance(value, str):
        return value
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return {"int": lambda v: int(float(v)), "float": float, "str": str}[kind](value)
    except ValueError:
        raise ValueError(f"--{key}: cannot read {value!r} as {kind}") from None


# ----------------------------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Single process, or one process per device under torchrun (RANK/WORLD_SIZE set): gloo on CPU, nccl on GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but no CUDA device is visible")
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, torch.device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return Dist(rank, world, local, torch.device("cuda", local))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dist.init_process_group("gloo")
    return Dist(rank, world, local, torch.device("cpu"))


class Preemption:
    """SIGTERM and SIGUSR1 ask the run to stop after the current step, with a checkpoint.

    A cluster preempts a job by sending SIGTERM (Kubernetes, SLURM at the end of a time limit) or,
    when asked to (``#SBATCH --signal=USR1@120``), SIGUSR1 a while before it kills it. The handler
    only records the signal; the loop checks ``requested`` between steps, so the checkpoint it then
    writes is an ordinary one of a finished step and ``--resume`` continues bit-identically. With
    several processes the signal reaches them at different moments: ``requested`` takes the maximum
    over processes, so all of them stop after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def requested(self, d: Dist) -> bool:
        flag = torch.tensor([0 if self.received is None else self.received], device=d.device)
        if d.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.received = int(flag) or None
        return bool(flag)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast (matmuls in bf16, weights and reductions in fp32) where asked for, else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))


class NLL(nn.Module):
    """The denoiser's training forward, (x_t, x0, where) -> -log p_theta(x0_i | x_t) at ``where``.

    DDP and FSDP act through a module's forward; ``Denoiser.nll_at`` is a method, so this wrapper
    makes it the forward that they wrap. Its state dict is the denoiser's under the prefix "model.".
    """

    def __init__(self, model: mdm.Denoiser) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: torch.Tensor, x0: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return self.model.nll_at(x_t, x0, where)


def use_fsdp(cfg: TrainConfig, d: Dist) -> bool:
    if cfg.fsdp not in ("auto", "true", "false"):
        raise ValueError(f"--fsdp must be auto, true or false, got {cfg.fsdp!r}")
    return cfg.fsdp == "true" or (cfg.fsdp == "auto" and d.world > 1 and cfg.preset in ("large", "xl"))


def wrap(model: mdm.Denoiser, cfg: TrainConfig, d: Dist) -> nn.Module:
    """Plain, DDP or FSDP2 (each block sharded, then the root); optionally compile each block."""
    if cfg.compile:
        for block in model.blocks:
            block.compile()  # in place: state-dict keys stay the same (no "_orig_mod." prefix)
    net = NLL(model)
    if d.world == 1:
        return net
    if use_fsdp(cfg, d):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        bf16 = d.device.type == "cuda" and cfg.dtype != "fp32"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kw = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
        for block in model.blocks:
            fully_shard(block, **kw)
        return fully_shard(net, **kw)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------
# Optimizer: per-module parameter groups, EMA
# ----------------------------------------------------------------------------------------------


def param_groups(model: mdm.Denoiser, cfg: TrainConfig, settings: sde_batch.OptimSettings) -> list[dict]:
    """AdamW groups: embedding, unembedding, and per block its attention, MLP and norms.

    Learning-rate multipliers (our reading of the paper's per-module settings, DESIGN.md section 1):
    the embedding gets ``lr_embed`` (its rows are updated sparsely, by the tokens present), the
    unembedding ``lr_unembed``; block l of n gets depth_factor^(l/(n-1)), so later blocks take smaller
    steps. Norm gains take no weight decay. Each group's lr is multiplier x the scheduled lr.
    """
    n = len(model.blocks)
    groups = [
        {
            "name": "embedding",
            "params": [model.embed.weight],
            "lr_mult": cfg.lr_embed,
            "weight_decay": settings.weight_decay,
        },
        {
            "name": "unembedding",
            "params": [model.unembed.weight],
            "lr_mult": cfg.lr_unembed,
            "weight_decay": settings.weight_decay,
        },
        {"name": "final_norm", "params": [model.final_norm.weight], "lr_mult": 1.0, "weight_decay": 0.0},
    ]
    for i, block in enumerate(model.blocks):
        depth = cfg.depth_factor ** (i / max(1, n - 1))
        norms = [p for name, p in block.named_parameters() if "norm" in name]
        groups += [
            {"name": f"block{i}.attention", "params": [block.attn.qkv.weight, block.attn.out.weight], "lr_mult": depth},
            {"name": f"block{i}.mlp", "params": list(block.mlp.parameters()), "lr_mult": depth},
            {"name": f"block{i}.norms", "params": norms, "lr_mult": depth, "weight_decay": 0.0},
        ]
    seen = [id(p) for g in groups for p in g["params"]]
    if sorted(seen) != sorted(id(p) for p in model.parameters()) or len(set(seen)) != len(seen):
        raise AssertionError("parameter groups must cover every parameter exactly once")
    for g in groups:
        g.setdefault("weight_decay", settings.weight_decay)
    return groups


def make_optimizer(model: mdm.Denoiser, cfg: TrainConfig, settings: sde_batch.OptimSettings, device: torch.device):
    return torch.optim.AdamW(
        param_groups(model, cfg, settings),
        lr=settings.lr,
        betas=settings.betas,
        eps=settings.eps,
        fused=True,  # one kernel for all parameters, on CPU as on GPU (4x faster than the loop)
    )


class EMA:
    """theta_ema <- rho theta_ema + (1 - rho) theta, with rho_k = min(rho, (1 + k)/(10 + k)) at step k.

    The warm-up of rho lets the average forget the random initialization quickly. ``swap`` exchanges
    the model's weights with the average (for evaluation and sampling) and back.
    """

    def __init__(self, model: nn.Module, rho: float | None) -> None:
        self.rho = rho
        self.params = [p.detach().clone().float() for p in model.parameters()] if rho else []

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if not self.rho:
            return
        rho = min(self.rho, (1 + step) / (10 + step))
        for e, p in zip(self.params, model.parameters(), strict=True):
            e.lerp_(p.detach().float(), 1 - rho)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        for e, p in zip(self.params, model.parameters(), strict=True):
            tmp = p.detach().clone()
            p.copy_(e)
            e.copy_(tmp)


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------


def noise_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The forward process's randomness of a step: a pure function of (seed, step), like the data."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream + 1)


def segment_roles(
    batch: data_lib.Batch,
    layout: data_lib.Layout,
    p_keep: float,
    p_drop: float,
    g: torch.Generator,
    p_media: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(given, hidden), each (B, L) bool: the pair rows trained conditionally or unconditionally.

    Each pair row is, independently: with probability p_keep *conditional*, one of its two segments
    (chosen at random) given clean; with probability p_drop *unconditional*, one segment hidden;
    otherwise *joint*, both segments under the forward process. A conditional row shows the media
    with probability p_media (it trains captioning / recognition) and the text otherwise (it trains
    text-to-image / text-to-speech); an unconditional row hides either with probability 1/2 (the
    branches guidance needs for both directions). The media segment is its tokens
    between BOS_m and EOS_m; the text segment is everything after BOS_text (caption, EOS_text,
    PAD_text), so a hidden caption does not reveal its length either. These are exactly the
    segments the samplers condition on, and mask for guidance.
    """
    B, L = batch.ids.shape
    given = torch.zeros(B, L, dtype=torch.bool)
    hidden = torch.zeros(B, L, dtype=torch.bool)
    role = torch.rand(B, generator=g)
    u = torch.rand(B, generator=g)
    for i in range(B):
        task = mdm.TASKS[int(batch.task[i])]
        if task == "text" or role[i] >= p_keep + p_drop:
            continue
        keep = bool(role[i] < p_keep)
        media = bool(u[i] < (p_media if keep else 0.5))
        segment = layout.media_slot(task) if media else layout.text_slot(task)
        (given if keep else hidden)[i, segment] = True
    return given, hidden


def corrupt_batch(
    batch: data_lib.Batch, layout: data_lib.Layout, cfg: TrainConfig, step: int, seed: int
) -> mdm.Corrupted:
    """Forward process on the whole global batch (identical on every process); the AR twin's is none."""
    if cfg.objective == "ar":
        return mdm.next_token_batch(batch.ids, batch.pad, layout.vocab)
    g = noise_generator(seed, step)
    c = mdm.corrupt(
        batch.ids,
        batch.pad,
        layout.vocab,
        mdm.Schedule.parse(cfg.schedule),
        t_min=cfg.t_min,
        anti_masking=cfg.anti_masking,
        generator=g,
    )
    if cfg.cond_keep > 0 or cfg.cond_drop > 0:
        rows = data_lib.Batch(*(torch.cat([x, x]) for x in (batch.ids, batch.pad, batch.task, batch.modality)))
        given, hidden = segment_roles(
            rows if cfg.anti_masking else batch, layout, cfg.cond_keep, cfg.cond_drop, g, cfg.cond_media
        )
        c = mdm.drop_segments(mdm.reveal_segments(c, given), hidden, layout.vocab)
        if batch.variants is not None:
            variants = torch.cat([batch.variants, batch.variants]) if cfg.anti_masking else batch.variants
            c = condition_on_copies(c, given, variants, g)
    return c


def condition_on_copies(
    c: mdm.Corrupted, given: torch.Tensor, variants: torch.Tensor, g: torch.Generator
) -> mdm.Corrupted:
    """Each row conditions on its original or one of its K augmented copies, each with probability 1/(K+1).

    variants (B, K, L): the row with its media replaced by each copy (``data.Batch``). Only the
    given (clean, unsupervised) positions change, and a copy differs from its row only in the media,
    so this acts on recognition rows alone: they hear new speaking rates and pitches, while every row
    that must *predict* audio still learns the real clips' distribution.
    """
    B, K, _ = variants.shape
    pick = torch.randint(K + 1, (B,), generator=g)  # 0: the original
    alt = variants[torch.arange(B), (pick - 1).clamp_min(0)]  # (B, L)
    swap = given & (pick > 0)[:, None]
    return mdm.Corrupted(
        torch.where(swap, alt, c.x0), torch.where(swap, alt, c.x_t), c.masked, c.maskable, c.t, c.weight
    )


@dataclass
class StepResult:
    loss: float
    modality_sums: torch.Tensor
    modality_counts: torch.Tensor
    grad_norm: float


def train_step(
    net: nn.Module,
    model: mdm.Denoiser,
    opt: torch.optim.Optimizer,
    c: mdm.Corrupted,
    cfg: TrainConfig,
    d: Dist,
    micro: int,
    lr: float,
) -> StepResult:
    """Gradient of the global batch's NELBO from this process's micro-batches, then one AdamW step.

    Each micro-batch's loss is sum(w * nll) / N_global * world_size: summing over micro-batches and
    averaging over processes (what DDP/FSDP do with gradients) gives d/dtheta sum(w * nll) / N_global.
    """
    rows = c.x0.shape[0] // d.world
    mine = c.rows(slice(d.rank * rows, (d.rank + 1) * rows)).to(d.device)
    n_global = c.maskable.sum().clamp_min(1).to(d.device)
    vocab = model.vocab
    sums = torch.zeros(len(mdm.MODALITIES), dtype=torch.float64, device=d.device)
    counts = torch.zeros(len(mdm.MODALITIES), dtype=torch.long, device=d.device)
    total = torch.zeros((), device=d.device)
    n_micro = rows // micro
    for k in range(n_micro):
        part = mine.rows(slice(k * micro, (k + 1) * micro))
        last = k == n_micro - 1
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
def evaluate_nelbo(
    net: nn.Module, data: data_lib.TriModalData, cfg: TrainConfig, d: Dist, batches: int
) -> dict[str, float]:
    """Validation NELBO per modality (nats per data token), on fixed batches and fixed noise.

    The same rows and masks at every evaluation, stratified t and no anti-masking or dropping, so
    successive evaluations differ only by the weights. Every process evaluates its share of the rows.
    """
    it = data_lib.BatchIterator(data, "val", cfg.batch_size, cfg.ratios, seed=12345)
    schedule = mdm.Schedule.parse(cfg.schedule)
    sums = torch.zeros(len(mdm.MODALITIES), dtype=torch.float64, device=d.device)
    counts = torch.zeros(len(mdm.MODALITIES), dtype=torch.long, device=d.device)
    micro = cfg.micro_batch or cfg.batch_size // d.world
    for k in range(batches):
        batch = it.batch(k)
        if cfg.objective == "ar":
            c = mdm.next_token_batch(batch.ids, batch.pad, data.vocab)
        else:
            c = mdm.corrupt(
                batch.ids, batch.pad, data.vocab, schedule, t_min=cfg.t_min, generator=noise_generator(999, k)
            )
        rows = c.x0.shape[0] // d.world
        mine = c.rows(slice(d.rank * rows, (d.rank + 1) * rows)).to(d.device)
        for j in range(0, rows, micro):
            with autocast(cfg, d.device):
                r = mdm.nelbo(net, mine.rows(slice(j, j + micro)), data.vocab)
            sums += r.modality_sums
            counts += r.modality_counts
    if d.world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    out = mdm.per_modality(sums.cpu(), counts.cpu())
    out["all"] = float(sums.sum() / counts.sum())
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic, complete, and loaded without unpickling arbitrary objects
# ----------------------------------------------------------------------------------------------

CKPT_FORMAT = "trimodal-mdm/1"


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only), with clear errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "rank0.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file type: all mean "not a checkpoint"
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it may be truncated or corrupt. Nothing was restarted: point --resume at an intact checkpoint."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a trimodal-mdm checkpoint (format {CKPT_FORMAT!r} expected)")
    return ckpt


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def save_checkpoint(
    path: Path,
    cfg: TrainConfig,
    model: mdm.Denoiser,
    opt,
    ema: EMA,
    it,
    step: int,
    tokens: int,
    data: data_lib.TriModalData,
    d: Dist,
    fsdp: bool,
) -> None:
    """Everything needed to continue exactly, plus what inference needs (config, vocab, layout, tokenizer).

    Without FSDP, process 0 writes one file. With FSDP each process writes its own shards to
    ``path/rank<r>.pt`` (a sharded checkpoint; resuming needs the same number of processes).
    """
    meta = {
        "format": CKPT_FORMAT,
        "config": asdict(cfg),
        "model_config": asdict(model.cfg),
        "layout": data.layout.to_dict(),
        "text_tokenizer": data.text_tokenizer.to_text(),
        "audio_codec_sha256": data.config.audio_codec_sha256,
        "step": step,
        "tokens": tokens,
        "data": it.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "world": d.world,
        "sharded": fsdp,
    }
    params = dict(model.named_parameters())
    index = {id(p): name for name, p in params.items()}
    state = {
        "model": {k: local(v).detach().cpu() for k, v in model.state_dict().items()},
        "ema": [local(e).cpu() for e in ema.params] if ema.rho else None,
        "optimizer": {
            "state": {index[id(p)]: {k: local(v).cpu() for k, v in st.items()} for p, st in opt.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        },
    }
    if fsdp:
        path.mkdir(parents=True, exist_ok=True)
        atomic_save({**meta, **state}, path / f"rank{d.rank}.pt")
        dist.barrier()
    elif d.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({**meta, **state}, path)


def restore(ckpt: dict, model: mdm.Denoiser, opt, ema: EMA, it, d: Dist) -> tuple[int, int]:
    """Load model, optimizer, EMA, iterator and RNG state in place; return (step, tokens)."""
    with torch.no_grad():
        own = model.state_dict()
        missing = set(own) ^ set(ckpt["model"])
        if missing:
            raise ValueError(f"checkpoint and model disagree on parameters: {sorted(missing)[:5]}")
        for k, v in own.items():
            local(v).copy_(ckpt["model"][k])
        if ema.rho:
            for e, v in zip(ema.params, ckpt["ema"], strict=True):
                local(e).copy_(v)
    params = dict(model.named_parameters())
    for name, st in ckpt["optimizer"]["state"].items():
        p = params[name]
        opt.state[p] = {
            k: (
                torch.distributed.tensor.DTensor.from_local(v.to(local(p).device), p.device_mesh, p.placements)
                if hasattr(p, "device_mesh") and v.dim() > 0
                else v.to(local(p).device)
            )
            for k, v in st.items()
        }
    for g, saved in zip(opt.param_groups, ckpt["optimizer"]["groups"], strict=True):
        g.update(saved)
    it.load_state_dict(ckpt["data"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return int(ckpt["step"]), int(ckpt["tokens"])


def gather_shards(path: str | Path, first: dict) -> dict:
    """Full model and EMA tensors from a sharded (FSDP2) checkpoint folder, for inference on one process.

    fully_shard splits every parameter along dim 0 into one contiguous chunk per rank (torch.chunk
    order), so concatenating the ranks' local shards in rank order rebuilds the full tensor.
    """
    shards = [first] + [read_checkpoint(Path(path) / f"rank{r}.pt") for r in range(1, first["world"])]
    model = {k: torch.cat([s["model"][k] for s in shards]) if v.dim() else v for k, v in first["model"].items()}
    ema = None
    if first["ema"] is not None:
        ema = [
            torch.cat(parts) if parts[0].dim() else parts[0] for parts in zip(*(s["ema"] for s in shards), strict=True)
        ]
    return {**first, "model": model, "ema": ema, "sharded": False}


@dataclass
class Inference:
    """What sampling and evaluation need from a checkpoint."""

    model: mdm.Denoiser
    layout: data_lib.Layout
    text_tokenizer: data_lib.TextTokenizer
    image_tokenizer: data_lib.PixelTokenizer
    audio_codec: object
    config: TrainConfig
    data_config: data_lib.DataConfig  # the run's data (held-out splits for evaluation), its codec vouched for
    step: int


# options added after checkpoints were first written, at the values those runs used
LEGACY_DEFAULTS = {"audio_speeds": "", "cond_media": 0.5, "code_init": False}


def config_from_checkpoint(ckpt: dict) -> TrainConfig:
    """The run's TrainConfig; an option its checkpoint predates takes the value the run had in effect."""
    return TrainConfig(**{**LEGACY_DEFAULTS, **ckpt["config"]})


def codec_voucher(cfg: TrainConfig, recorded: str, named: bool) -> str:
    """The audio codec hash to trust (``fsq.check_sha256``): the file's own if the user ``named`` its path for
    this run, else the hash ``recorded`` in the checkpoint. A named codec must still be the recorded one."""
    if not named:
        return recorded
    path = cfg.data_config().audio_codec
    sha = fsq.file_sha256(path)
    if recorded and sha != recorded:
        raise ValueError(f"the audio codec at {path} is not the one this checkpoint was trained with")
    return sha


def load_for_inference(path: str | Path, use_ema: bool = True, device: str = "cpu", audio_codec: str = "") -> Inference:
    """Rebuild the trained denoiser (EMA weights by default) with its layout and tokenizers.

    The audio codec is the one the checkpoint names, vouched for by the sha256 it recorded, or the
    file ``audio_codec`` if given (the user's own choice: a moved or renamed copy of the same codec).
    """
    ckpt = read_checkpoint(path)
    if ckpt["sharded"]:
        ckpt = gather_shards(path, ckpt)
    cfg = config_from_checkpoint(ckpt)
    layout = data_lib.Layout.from_dict(ckpt["layout"])
    model = mdm.Denoiser(mdm.ModelConfig(**ckpt["model_config"]), layout.vocab)
    model.load_state_dict(ckpt["model"])
    if use_ema and ckpt["ema"] is not None:
        with torch.no_grad():
            for p, e in zip(model.parameters(), ckpt["ema"], strict=True):
                p.copy_(e)
    if audio_codec:
        cfg = replace(cfg, audio_codec=audio_codec)
    data_config = cfg.data_config(
        copies=False, codec_sha256=codec_voucher(cfg, ckpt["audio_codec_sha256"], bool(audio_codec))
    )
    codec = fsq.load_audio_codec(data_config.audio_codec, data_config.audio_codec_sha256)
    tok = data_lib.TextTokenizer.from_text(ckpt["text_tokenizer"], f"{path}:text_tokenizer")
    pixels = data_lib.PixelTokenizer(cfg.image_levels, cfg.image_patch)
    return Inference(model.to(device).eval(), layout, tok, pixels, codec, cfg, data_config, int(ckpt["step"]))


# ----------------------------------------------------------------------------------------------
# Logging: JSONL metrics and a loss-curve figure
# ----------------------------------------------------------------------------------------------


def log_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Training loss and validation NELBO per modality (bits per token) against tokens seen."""
    # Figure + FigureCanvasAgg draw without pyplot's global state (no backend switch for the caller).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        (val if "val" in r else train).append(r)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(
            [r["tokens"] for r in train],
            [r["loss"] / math.log(2) for r in train],
            lw=0.8,
            alpha=0.6,
            label="train (all)",
        )
    for m in (*mdm.MODALITIES, "all"):
        pts = [(r["tokens"], r["val"][m] / math.log(2)) for r in val if math.isfinite(r["val"].get(m, math.nan))]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"val {m}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("NELBO (bits per data token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def startup_report(
    cfg: TrainConfig, model: mdm.Denoiser, data: data_lib.TriModalData, plan, d: Dist, micro: int, fsdp: bool
) -> str:
    accum = cfg.batch_size // (micro * d.world)
    unique = cfg.batch_size // 2 if cfg.anti_masking else cfg.batch_size
    coded = list(data.code_vectors()) if cfg.code_init else []  # tokenizers that say what their codes are
    lines = [
        mdm.model_summary(model),
        f"data: |V| = {data.vocab.size}, L* = {data.layout.seq_len}, image {data.layout.image_len} tokens, "
        f"audio {data.layout.audio_len} tokens; mixing {cfg.ratios}"
        + (f"; recognition rows also hear the training clips at speeds {cfg.audio_speeds}" if cfg.speeds() else "")
        + (f"; {' and '.join(coded)} embeddings started from their codes" if coded else ""),
        f"batch: {cfg.batch_size} rows/step ({unique} sequences{' x2 by anti-masking' if cfg.anti_masking else ''}) "
        f"= {plan.tokens_per_step:,} tokens/step; {d.world} process(es) x {micro} rows x {accum} accumulation step(s)",
        f"device: {d.device}, {'bf16 autocast' if uses_bf16(cfg, d.device) else 'fp32'}, "
        f"{'FSDP2' if fsdp else 'DDP' if d.world > 1 else 'single process'}"
        f"{', compiled blocks' if cfg.compile else ''}",
        f"diffusion: schedule {cfg.schedule}, anti-masking {cfg.anti_masking}, t in [{cfg.t_min}, {1 - cfg.t_min}], "
        f"pair rows: conditional with p = {cfg.cond_keep} (media shown in {cfg.cond_media} of them), "
        f"unconditional with p = {cfg.cond_drop}",
        plan.describe(),
    ]
    warning = sde_batch.critical_batch_warning(plan)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def validate(cfg: TrainConfig, d: Dist) -> int:
    """Check the batch arithmetic up front; return the micro-batch."""
    if not (0 <= cfg.cond_keep and 0 <= cfg.cond_drop and cfg.cond_keep + cfg.cond_drop <= 1):
        raise ValueError(
            f"--cond_keep and --cond_drop are probabilities summing to at most 1; got {cfg.cond_keep}, {cfg.cond_drop}"
        )
    if not 0 <= cfg.cond_media <= 1:
        raise ValueError(f"--cond_media is a probability; got {cfg.cond_media}")
    cfg.speeds()
    if cfg.anti_masking and cfg.batch_size % 2:
        raise ValueError(f"--batch_size={cfg.batch_size} must be even with anti-masking (each sequence appears twice)")
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch_size={cfg.batch_size} must be divisible by the number of processes ({d.world})")
    uses_bf16(cfg, d.device), use_fsdp(cfg, d)  # both check their option
    micro = cfg.micro_batch or cfg.batch_size // d.world
    if (cfg.batch_size // d.world) % micro:
        raise ValueError(
            f"each of the {d.world} process(es) has {cfg.batch_size // d.world} rows per step, "
            f"which --micro_batch={micro} does not divide"
        )
    return micro


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Expected errors (a bad option, an unreadable file, an impossible configuration) as one line, no traceback.

    The functions that read options and files raise ValueError or FileNotFoundError with a message
    that names the culprit; inside this block those become ``SystemExit`` ("train.py: error: ..."
    on stderr, exit status 1). Errors anywhere else keep their traceback.
    """
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: error: {e}") from None


def main(argv: list[str] | None = None) -> dict:
    with user_errors():  # the options and files of the run: a bad one ends it with one line
        argv = sys.argv[1:] if argv is None else argv
        cfg, overrides = parse_config(argv)
        resume = overrides.pop("resume")
        ckpt = None
        if resume:
            ckpt = read_checkpoint(resume)
            # the run's own config; --max_steps belongs to an invocation, not to the run
            cfg = replace(config_from_checkpoint(ckpt), **{"max_steps": 0, **overrides})
        if cfg.objective == "ar":  # nothing is masked: no anti-masked copies, no hidden or given segments
            cfg = replace(cfg, anti_masking=False, cond_drop=0.0, cond_keep=0.0, audio_speeds="")
        d = setup_distributed(cfg.device)
        if ckpt is not None and ckpt["sharded"]:  # FSDP: every process resumes from its own shards
            if ckpt["world"] != d.world:
                raise ValueError(
                    f"this sharded checkpoint was written by {ckpt['world']} processes; resume with as many"
                )
            ckpt = read_checkpoint(Path(resume) / f"rank{d.rank}.pt")
        micro = validate(cfg, d)
        torch.manual_seed(cfg.seed)
        out = Path(cfg.out_dir)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
        recorded = ckpt["audio_codec_sha256"] if ckpt is not None else ""
        named = ckpt is None or "audio_codec" in overrides  # a fresh run's config names its codec itself
        data = data_lib.build_data(cfg.data_config(codec_sha256=codec_voucher(cfg, recorded, named)))
        model = mdm.Denoiser(cfg.model_config(), data.vocab)
        if cfg.code_init and ckpt is None:  # media embeddings start from their tokens' codes (same on every rank)
            g = torch.Generator().manual_seed(cfg.seed)
            for m, codes in data.code_vectors().items():
                mdm.embed_codes(model, m, torch.from_numpy(codes), g)
        model = model.to(d.device)
        unique = cfg.batch_size // 2 if cfg.anti_masking else cfg.batch_size
        reference = sde_batch.Reference(
            batch=cfg.base_batch or cfg.batch_size,
            tokens=cfg.base_tokens or cfg.tokens,
            settings=cfg.optim_settings(),
            gamma=cfg.gamma,
        )
        plan = sde_batch.plan(reference, cfg.batch_size, cfg.tokens, cfg.seq_len, cfg.min_steps)
    fsdp = use_fsdp(cfg, d)
    net = wrap(model, cfg, d)
    opt = make_optimizer(model, cfg, plan.settings, d.device)
    ema = EMA(model, plan.settings.ema)
    it = data_lib.BatchIterator(data, "train", unique, cfg.ratios, seed=cfg.seed)
    step, tokens = 0, 0
    if ckpt is not None:
        step, tokens = restore(ckpt, model, opt, ema, it, d)
    if d.main:
        print(startup_report(cfg, model, data, plan, d, micro, fsdp))
        if resume:
            print(f"resumed from {resume} at step {step} ({tokens:,} tokens)")
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    metrics, ckpt_path = out / "metrics.jsonl", out / ("ckpt" if fsdp else "ckpt.pt")
    last_good = str(ckpt_path) if resume else "none yet"
    stop = plan.steps if not cfg.max_steps else min(plan.steps, step + cfg.max_steps)
    bar = _progress(d, plan.steps, step)
    t0, tokens0 = time.perf_counter(), tokens
    run_sums = torch.zeros(len(mdm.MODALITIES), dtype=torch.float64)
    run_counts = torch.zeros(len(mdm.MODALITIES), dtype=torch.long)
    last_val: dict[str, float] = {}
    if step == 0 and cfg.eval_every:
        last_val = run_eval(net, model, ema, data, cfg, d, step, tokens, metrics, out)  # the untrained baseline
    preempt, stopped_by, failure = Preemption(), None, None
    while step < stop:
        batch = it.batch(step)
        it.step = step + 1
        c = corrupt_batch(batch, data.layout, cfg, step, cfg.seed)
        lr = plan.lr_for_step(step)
        r = train_step(net, model, opt, c, cfg, d, micro, lr)
        if not math.isfinite(r.loss):  # the same on every process (the loss is all-reduced)
            failure = (
                f"non-finite loss ({r.loss}) at step {step}; the last good checkpoint is {last_good}. "
                "Resume from it with a lower --lr (or check the data of this step)."
            )
            break
        ema.update(model, step)
        step += 1
        tokens += plan.tokens_per_step
        run_sums += r.modality_sums
        run_counts += r.modality_counts
        elapsed = time.perf_counter() - t0
        tok_s = (tokens - tokens0) / max(elapsed, 1e-9)
        if d.main:
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
        if d.main and (step % max(1, cfg.log_every) == 0 or step == stop):
            per = mdm.per_modality(run_sums, run_counts)
            log_jsonl(
                metrics,
                {
                    "step": step,
                    "tokens": tokens,
                    "loss": r.loss,
                    "train": per,
                    "lr": lr,
                    "grad_norm": r.grad_norm,
                    "tokens_per_s": tok_s,
                    "elapsed_s": elapsed,
                },
            )
            run_sums.zero_()
            run_counts.zero_()
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == plan.steps:
            last_val = run_eval(net, model, ema, data, cfg, d, step, tokens, metrics, out)
        if preempt.requested(d):
            stopped_by = signal.Signals(preempt.received).name
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == stop or stopped_by:
            save_checkpoint(ckpt_path, cfg, model, opt, ema, it, step, tokens, data, d, fsdp)
            last_good = f"{ckpt_path} (step {step})"
        if stopped_by:
            break
    preempt.restore()
    if d.main:
        bar.close()
        if stopped_by:
            print(f"{stopped_by}: stopped after step {step}, wrote {ckpt_path}; continue with --resume={ckpt_path}")
        seconds = time.perf_counter() - t0
        rate = (tokens - tokens0) / max(seconds, 1e-9)
        print(f"trained {step} steps, {tokens:,} tokens in {seconds / 60:.1f} min ({rate:,.0f} tokens/s)")
        if last_val:
            print(
                "validation NELBO (bits per data token): "
                + ", ".join(f"{m} {v / math.log(2):.3f}" for m, v in last_val.items())
            )
    del net, model, opt, ema  # what holds the process group: DDP's reducer, FSDP's sharded tensors
    teardown(d)
    if failure:
        raise SystemExit(failure)
    if d.main and step == plan.steps and cfg.final_report and not stopped_by:
        write_final_report(ckpt_path, out)
    return {"step": step, "tokens": tokens, "val": last_val, "preempted": stopped_by}


def teardown(d: Dist) -> None:
    """End a distributed run: free the process group on every process while all of them are still alive.

    ``dist.destroy_process_group`` only forgets the group; the group itself (gloo's connections and
    worker threads) is freed when the last object holding it goes, and the DDP wrapper and FSDP's
    sharded tensors hold it. Left to the interpreter's exit, that happens while the interpreter is
    shutting down, and a process that gets there while another one is still using its end of the
    connections (rank 0 still plotting and writing the checkpoint) can abort with "terminate called
    without an active exception". So the caller drops those objects first, and here the garbage
    collector frees them, a barrier waits for every process, and the group is destroyed.
    """
    if d.world > 1:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def run_eval(net, model, ema, data, cfg, d, step, tokens, metrics, out) -> dict[str, float]:
    """Validation NELBO with the EMA weights (what sampling uses) when the EMA is on."""
    model.eval()
    ema.swap(model) if ema.rho else None
    val = evaluate_nelbo(net, data, cfg, d, cfg.eval_batches)
    if hasattr(net, "reshard"):  # FSDP2 leaves the root's parameters unsharded after a forward-only pass
        net.reshard()
    ema.swap(model) if ema.rho else None
    model.train()
    if d.main:
        log_jsonl(metrics, {"step": step, "tokens": tokens, "val": val, "ema": bool(ema.rho)})
        plot_losses(metrics, out / "loss.png")
    return val


def _progress(d: Dist, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not d.main, unit="step", dynamic_ncols=True, file=sys.stdout)


def write_final_report(ckpt_path: Path, out: Path) -> None:
    """Samples of every task and a metrics report (evaluate.py)."""
    import evaluate  # imported here: evaluate imports sample, and training needs neither

    evaluate.final_report(ckpt_path, out)


if __name__ == "__main__":
    result = main()
    if result["preempted"]:  # the conventional status of a process ended by that signal
        sys.exit(128 + signal.Signals[result["preempted"]].value)
