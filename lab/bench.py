"""Speed and memory benchmarks: how close the model runs to what the machine can do, and where it loses.

    python -m lab.bench                      # everything, "full" size (~10-15 min on 2 CPU cores)
    python -m lab.bench --quick              # the same sections on tiny shapes (seconds; what the tests run)
    python -m lab.bench --only train,profile # some sections: matmul, train, logits, antimask, profile, sampling, memory
    python -m lab.bench --threads 1          # on a machine shared with other jobs (2 threads each thrash 2 cores)
    python -m lab.bench --only train --repeats 12   # more interleaved rounds when the machine is noisy
    python -m lab.bench --json out.json      # also write the raw results
    python -m lab.bench --markdown           # print the block that BENCHMARKS.md holds, ready to paste
    python -m lab.bench --checkpoint runs/tiny/ckpt.pt --only sampling   # sample from a trained model

Every figure is a median over repeats, and every ratio compares variants measured *in the same run*,
interleaved round by round (variant A, variant B, A, B, ...), because a shared machine's speed drifts
by more than the differences we look for.

The sections, in the order they run:

1. ``matmul``    the machine's limit: dense matmul GFLOP/s (fp32, and bf16 where it exists) at large
   square sizes and at the exact GEMM shapes of the model (tokens x d -> 3d, d -> hidden (twice),
   hidden -> d, d -> text slice of the vocabulary). The best of these is the "limit" that MFU divides by.
2. ``train``     one training step exactly as ``train.main`` takes it (``data.BatchIterator.batch`` ->
   ``train.corrupt_batch`` -> ``train.train_step`` -> ``train.EMA.update``), per shape and per mode
   (eager fp32, bf16 autocast, ``torch.compile`` of each block as ``train.wrap`` does it, and the
   autoregressive twin): tokens/s, achieved FLOP/s, MFU, the forward / backward / optimizer split,
   the share of data loading, the first-step (compile) overhead, the MDM / AR step ratio, and the
   reference row: a plain nanoGPT-style transformer (``PlainTransformer``) on the same batches.
3. ``logits``    the saving of computing logits only at masked positions (``Denoiser.nll_at``) against
   the textbook way (full-vocabulary logits at every position, then gather), at the default
   vocabulary and at a 50k-token text vocabulary.
4. ``antimask``  anti-masking at equal compute: the same number of rows per step, with and without.
5. ``profile``   ``torch.profiler`` of one step of the tiny and small shapes: the top operators (with
   their input shapes) and the share of time in matmuls, attention and everything else.
6. ``sampling``  seconds per sample and network evaluations (NFE) of ``sample.generate`` per task,
   sampler, caching on/off and batch size, and whether cached and uncached outputs are identical.
7. ``memory``    peak memory of training, measured (peak RSS of a fresh process per measurement, or
   ``torch.cuda.max_memory_allocated``) for tiny and small, and by arithmetic for every preset:
   weights + gradients + AdamW state + EMA + activations, single process, DDP and FSDP over N GPUs.

FLOP accounting (model FLOPs of one training step; forward + backward = 3 x forward; matmuls only)::

    F_step = 6 · N_lin · T                       the blocks' linear layers, N_lin = n_layers (4 d^2 + 3 d h)
           + 12 · n_layers · d · L · T           attention: QK^T and AV, 2 · 2 L d flops per token each, x3
           + 6 · d · sum_i |slice(i)|            the unembedding, over the positions that are predicted

T = rows x L is every position of the batch (padding included: the body computes it), h the SwiGLU
hidden width, |slice(i)| the size of position i's modality sub-vocabulary. Predicted positions are
the masked ones for MDM (about half) and every data position for the autoregressive twin. The
causal twin is charged the full attention term too (the usual convention), and the embedding
lookup, norms, softmax and optimizer are charged nothing. MFU = F_step / step time / limit, with the
limit of the dtype the matmuls run in (fp32 steps against the fp32 limit, bf16 against bf16; on a
GPU against ``--gpu-peak-tflops``, by default the H100's dense bf16 peak of 989 TFLOP/s).

Which machine: the header of the output names the CPU, cores, torch threads, torch version and the
load average before and after (other processes on the machine show up there; a load above the core
count means the figures are pessimistic). On a CUDA machine the training and sampling sections run
on the GPU in bf16 autocast with flash attention, compiled and eager.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import data as data_lib
import mdm
import train
from checkpoint import load_for_inference
from distributed import Dist, wrap
from model import PRESETS, Denoiser, ModelConfig

SECTIONS: tuple[str, ...] = ("matmul", "train", "logits", "antimask", "profile", "sampling", "memory")
ROOT = Path(__file__).resolve().parents[1]  # the repository root, where the lab runs from

# ----------------------------------------------------------------------------------------------
# 1. Timing
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def progress(message: str) -> None:
    """Progress goes to stderr, tables to stdout (so --markdown output pastes cleanly)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# 2. Options and the machine
# ----------------------------------------------------------------------------------------------


@dataclass
class Options:
    """The command line, parsed (``parse_args``)."""

    quick: bool = False
    only: tuple[str, ...] = SECTIONS
    json_path: str = ""
    markdown: bool = False
    checkpoint: str = ""
    device: str = "auto"
    threads: int = 0
    gpu_peak_tflops: float = 989.0
    compile: str = "auto"  # auto: on in the full run, off with --quick (a cold compile takes ~20 s per graph)
    gpus: int = 8  # N of the DDP / FSDP arithmetic
    repeats: int = 0  # timed rounds per training shape (0: each shape's own default)
    shapes: tuple[str, ...] = ()  # only these training shapes (empty: all of the run's size)
    command: str = ""
    memory_child: str = ""  # internal: the JSON spec of a memory measurement run in a fresh process

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def use_compile(self) -> bool:
        return self.compile == "on" or (self.compile == "auto" and not self.quick)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware (AVX512-BF16 / AMX on CPU; any recent GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine_info(opts: Options) -> dict:
    device = opts.torch_device
    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "bf16_native": native_bf16(device),
        "command": opts.command,
        "quick": opts.quick,
        "load_before": load_average(),
    }
    return info


# ----------------------------------------------------------------------------------------------
# 3. Shapes, FLOPs and the data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A training-step shape: a preset (optionally reshaped) on the real data of (seq_len, text_vocab).

    ``batch`` counts rows per step, as ``TrainConfig.batch_size`` does (with anti-masking, batch/2
    sequences each appear twice). ``synthetic_text`` replaces the data by uniform random text rows over
    a text vocabulary of that size (for a 50k-vocabulary config: no such tokenizer is bundled).
    """

    name: str
    preset: str
    seq_len: int
    text_vocab: int
    batch: int
    d_model: int = 0
    n_layers: int = 0
    n_heads: int = 0
    repeats: int = 3
    synthetic_text: int = 0
    note: str = ""

    def train_config(self, **overrides: object) -> train.TrainConfig:
        cfg = train.TrainConfig(
            preset=self.preset,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            batch_size=self.batch,
            **overrides,
        )
        if cfg.objective == "ar":  # as train.main does: nothing is masked, no anti-masked copies
            cfg = replace(cfg, anti_masking=False, cond_drop=0.0, cond_keep=0.0)
        return cfg

    def data_config(self) -> data_lib.DataConfig:
        return data_lib.DataConfig(seq_len=self.seq_len, text_vocab=min(self.text_vocab, 4096))

    def model_config(self) -> ModelConfig:
        return self.train_config().model_config(self.seq_len)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def describe(self) -> str:
        c = self.model_config()
        v = f"text vocab {self.text_vocab}" + (" (synthetic rows)" if self.synthetic_text else "")
        return f"d={c.d_model} L={c.n_layers} H={c.n_heads}, {v}, seq {self.seq_len} x batch {self.batch}"


def full_shapes(device: torch.device) -> list[Shape]:
    """The full run's shapes: the default step, two planning shapes (~1M, ~6M parameters), the small preset."""
    tiny = default_shape(repeats=10 if device.type == "cuda" else 7)
    if device.type == "cuda":
        return [
            tiny,
            Shape("small", "small", 256, 4096, 64, repeats=10),
            Shape("base", "base", 1024, 4096, 16, repeats=10),
        ]
    return [
        tiny,
        Shape("plan1M", "tiny", 256, 1024, 16, repeats=5, note="planning shape, ~1M params"),
        Shape("plan6M", "tiny", 256, 4096, 16, d_model=256, n_layers=6, n_heads=4, repeats=4, note="planning, ~6M"),
        Shape("small", "small", 256, 4096, 8, repeats=3, note="the small preset (25M body)"),
    ]


def default_shape(repeats: int, batch: int = 0) -> Shape:
    """The step of ``python train.py`` with no arguments (its TrainConfig defaults), optionally with fewer rows."""
    d, dc = train.TrainConfig(), data_lib.DataConfig()
    note = "`python train.py` default step" if not batch else f"`python train.py` defaults, batch {batch} (quick)"
    return Shape("tiny", d.preset, dc.seq_len, dc.text_vocab, batch or d.batch_size, repeats=repeats, note=note)


def quick_shapes() -> list[Shape]:
    seq = data_lib.DataConfig().seq_len
    return [
        default_shape(repeats=2, batch=8),
        Shape("small", "tiny", seq, 1024, 4, d_model=64, n_layers=2, n_heads=2, repeats=2, note="stand-in (quick)"),
    ]


def linear_weights_per_layer(cfg: ModelConfig) -> int:
    """Matmul weights of one block: qkv 3d^2, attention out d^2, gate and up 2dh, down hd."""
    d, h = cfg.d_model, cfg.mlp_hidden
    return 4 * d * d + 3 * d * h


def step_flops(cfg: ModelConfig, tokens: int, seq_len: int, unembed_columns: float) -> float:
    """Model FLOPs of one training step (see the module docstring for the formula)."""
    body = 6 * cfg.n_layers * linear_weights_per_layer(cfg) * tokens
    attention = 12 * cfg.n_layers * cfg.d_model * seq_len * tokens
    return float(body + attention + 6 * cfg.d_model * unembed_columns)


def unembed_columns(c: mdm.Corrupted, vocab: mdm.Vocab) -> float:
    """sum over the predicted (masked) positions of |slice(i)|: the unembedding's output columns."""
    sizes = torch.tensor([vocab.predict_size(m) for m in mdm.MODALITIES])
    return float(sizes[vocab.modality_of(c.x0)[c.masked]].sum())


_DATA: dict[data_lib.DataConfig, data_lib.TriModalData] = {}


def load_data(cfg: data_lib.DataConfig) -> data_lib.TriModalData:
    """``data.build_data``, once per process and config (it spends seconds encoding the audio clips)."""
    if cfg not in _DATA:
        start = time.perf_counter()
        _DATA[cfg] = data_lib.build_data(cfg)
        progress(f"built data seq_len={cfg.seq_len} text_vocab={cfg.text_vocab} in {time.perf_counter() - start:.1f} s")
    return _DATA[cfg]


class SyntheticText:
    """Text rows of uniform random tokens: TASK_text then seq_len - 1 text ids, no padding."""

    def __init__(self, text_vocab: int, seq_len: int, rows: int, seed: int = 0) -> None:
        vocab = mdm.Vocab(text=text_vocab, audio=875, image=17)
        self.layout = data_lib.Layout(vocab, seq_len, image_len=1, audio_len=1)
        self.rows, self.seed = rows, seed

    def batch(self, step: int) -> data_lib.Batch:
        v, L = self.layout.vocab, self.layout.seq_len
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        local = torch.randint(v.text, (self.rows, L - 1), generator=g)
        ids = torch.cat([torch.full((self.rows, 1), v.task("text")), v.to_global(local, "text")], dim=1)
        task = torch.full((self.rows,), mdm.TASKS.index("text"))
        none = torch.zeros_like(ids, dtype=torch.bool)
        return data_lib.Batch(ids, none, task, none, none)


# ----------------------------------------------------------------------------------------------
# 4. The matmul limit
# ----------------------------------------------------------------------------------------------


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int, budget_s: float):
    """(best, median) GFLOP/s of F.linear((m, k), (n, k)): the op every nn.Linear of the model runs.

    One warm-up call, then samples of enough back-to-back calls to last ~20 ms each (so timer and
    launch overheads vanish), at least 2 samples and up to ``repeats`` while within ``budget_s``.
    """
    a = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)
    first, _ = timed(lambda: F.linear(a, w), device)
    inner = max(1, int(0.02 / max(first, 1e-7)))

    def calls() -> None:
        for _ in range(inner):
            F.linear(a, w)

    n_samples = max(2, min(repeats, int(budget_s / max(first * inner, 1e-9))))
    times = [timed(calls, device)[0] / inner for _ in range(n_samples)]
    flops = 2.0 * m * k * n
    return flops / min(times) / 1e9, flops / median(times) / 1e9


def gemm_shapes(shape: Shape) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) of the model's GEMMs at one step of ``shape`` (forward; backward has the same sizes)."""
    c = shape.model_config()
    T, d, h = shape.tokens, c.d_model, c.mlp_hidden
    text_slice = min(shape.text_vocab, 4096) + 3 if not shape.synthetic_text else shape.synthetic_text + 3
    return [
        (f"{shape.name} qkv", T, d, 3 * d),
        (f"{shape.name} attn out", T, d, d),
        (f"{shape.name} mlp gate, up", T, d, h),
        (f"{shape.name} mlp down", T, h, d),
        (f"{shape.name} unembed (text, masked half)", T // 2, d, text_slice),
    ]


def section_matmul(opts: Options, shapes: list[Shape]) -> dict:
    device, native = opts.torch_device, native_bf16(opts.torch_device)
    if device.type == "cuda":
        squares = [4096, 8192]
    else:
        squares = [256, 512] if opts.quick else [1024, 2048]
    repeats, budget = (3, 0.5) if opts.quick else (7, 3.0)
    rows, limits = [], {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # without bf16 hardware bf16 matmuls are emulated (~5 GFLOP/s on AVX2, down to ~0.3 for large squares)
        full = native or dtype_name == "fp32"
        cases = [(f"square {n}", n, n, n) for n in (squares if full else [min(squares[0], 512)])]
        for s in [s for s in shapes if s.name in ("tiny", "small")][: 2 if full else 1]:
            cases += gemm_shapes(s)
        best = 0.0
        for name, m, k, n in cases:
            top, med = matmul_gflops(m, k, n, dtype, device, repeats, budget)
            rows.append({"dtype": dtype_name, "gemm": name, "m": m, "k": k, "n": n, "gflops": med, "best_gflops": top})
            best = max(best, top)
        limits[dtype_name] = best
        progress(f"matmul {dtype_name}: limit {best:.1f} GFLOP/s")
    out = {"rows": rows, "limit_gflops": limits, "bf16_native": native}
    if device.type == "cuda":
        out["gpu_peak_gflops"] = opts.gpu_peak_tflops * 1e3
    return out


# ----------------------------------------------------------------------------------------------
# 5. A training workload, stepped as train.main steps it
# ----------------------------------------------------------------------------------------------


class NaiveNLL(nn.Module):
    """The textbook loss head: full-vocabulary logits at *every* position (``Denoiser.forward``), then
    the cross-entropy gathered at the masked ones. Same value as ``Denoiser.nll_at``, more work."""

    def __init__(self, model: Denoiser) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: Tensor, x0: Tensor, where: Tensor) -> Tensor:
        logits = self.model(x_t)  # (B, L, |V|) float32, -inf outside each position's slice
        nll = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none")
        return nll.view(x0.shape)[where]


class PlainTransformer(nn.Module):
    """The reference row: a plain bidirectional transformer of the nanoGPT kind at the same shape.

    LayerNorm, learned positions, a 4x GELU MLP, no QK-norm and no rotary embedding; logits over the whole
    vocabulary, at the masked positions only. It takes the MDM's batches (``forward`` as ``NaiveNLL``), so
    the two steps differ only in the network: what this project's features (rotary, QK-norm, SwiGLU,
    modality-restricted logits) cost.
    """

    def __init__(self, cfg: ModelConfig, vocab: mdm.Vocab) -> None:
        super().__init__()
        d, self.cfg, self.vocab, self.heads = cfg.d_model, cfg, vocab, cfg.n_heads
        self.embed, self.pos = nn.Embedding(vocab.size, d), nn.Embedding(cfg.max_len, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d),
                    "qkv": nn.Linear(d, 3 * d, bias=False),
                    "out": nn.Linear(d, d, bias=False),
                    "ln2": nn.LayerNorm(d),
                    "fc": nn.Linear(d, 4 * d, bias=False),
                    "proj": nn.Linear(4 * d, d, bias=False),
                }
            )
            for _ in range(cfg.n_layers)
        )
        self.final_norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab.size, bias=False)

    def forward(self, x_t: Tensor, x0: Tensor, where: Tensor) -> Tensor:
        B, L = x_t.shape
        h = self.embed(x_t) + self.pos.weight[:L]
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](h)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            h = h + b["out"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1))
            h = h + b["proj"](F.gelu(b["fc"](b["ln2"](h))))
        return F.cross_entropy(self.head(self.final_norm(h)[where]).float(), x0[where], reduction="none")


def attention_context(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """On a GPU, force the flash-attention SDPA kernel; elsewhere PyTorch's default choice."""
    if device.type != "cuda":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])


@dataclass
class StepTiming:
    data_s: float  # BatchIterator.batch + corrupt_batch
    compute_s: float  # train_step (forward, backward, clip, AdamW) + EMA update
    flops: float
    masked: float  # predicted positions per row

    @property
    def total_s(self) -> float:
        return self.data_s + self.compute_s


class Workload:
    """One training configuration on one shape: model, optimizer, EMA and batches, as in ``train.main``."""

    def __init__(
        self, shape: Shape, device: torch.device, naive_logits: bool = False, plain: bool = False, **overrides: object
    ) -> None:
        cfg = shape.train_config(device=device.type, **overrides)
        self.shape, self.cfg, self.device = shape, cfg, device
        if shape.synthetic_text:
            source = SyntheticText(shape.synthetic_text, shape.seq_len, shape.batch // (2 if cfg.anti_masking else 1))
            self.layout, self.batch_fn = source.layout, source.batch
        else:
            data = load_data(shape.data_config())
            unique = cfg.batch_size // 2 if cfg.anti_masking else cfg.batch_size
            roles = (cfg.cond_keep, cfg.cond_drop, cfg.cond_media)
            it = data_lib.BatchIterator(data, "train", unique, cfg.ratios, cfg.seed, *roles)
            self.layout, self.batch_fn = data.layout, it.batch
        torch.manual_seed(cfg.seed)
        self.model = Denoiser(cfg.model_config(shape.seq_len), self.layout.vocab).to(device)
        self.attention, self.attention_note = attention_context(device), "PyTorch's default SDPA kernel"
        if device.type == "cuda":
            self.attention_note = self.probe_flash()
        self.dist = Dist(0, 1, 0, device)
        net = wrap(self.model, self.dist, fsdp=False, compile=cfg.compile == "true")  # compiles blocks in place
        self.net = NaiveNLL(self.model) if naive_logits else net
        settings = cfg.settings()
        groups = train.param_groups(self.model, cfg, settings)
        if plain:  # the reference network in place of the Denoiser: same batches, one AdamW group
            self.model = self.net = PlainTransformer(self.model.cfg, self.layout.vocab).to(device)
            groups = [{"params": list(self.model.parameters()), "lr_mult": 1.0}]
        self.opt = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, fused=True)
        self.ema = train.EMA(self.model, settings.ema)
        self.lr = settings.lr
        self.k = 0

    def probe_flash(self) -> str:
        """Check that the flash kernel accepts this model's attention; fall back to the default if not."""
        x = self.batch_fn(0).ids[:1].to(self.device)
        try:
            with self.attention(), train.autocast(self.cfg, self.device), torch.no_grad():
                self.model.hidden(x)
            return "flash attention (forced)"
        except RuntimeError as e:
            self.attention = contextlib.nullcontext
            return f"default SDPA: flash refused ({str(e).splitlines()[0][:80]})"

    def prepare(self, k: int) -> mdm.Corrupted:
        return train.corrupt_batch(self.batch_fn(k), self.layout.vocab, self.cfg, k)

    def compute(self, c: mdm.Corrupted, k: int) -> train.StepResult:
        with self.attention():
            r = train.train_step(
                self.net, self.opt, c, self.model.vocab, self.cfg, self.dist, self.cfg.batch_size, self.lr
            )
        self.ema.update(self.model, k)
        return r

    def flops(self, c: mdm.Corrupted) -> float:
        vocab = self.layout.vocab
        cols = c.masked.sum() * vocab.size if isinstance(self.net, PlainTransformer) else unembed_columns(c, vocab)
        cols = c.x0.numel() * vocab.control_start if isinstance(self.net, NaiveNLL) else cols
        return step_flops(self.model.cfg, c.x0.numel(), c.x0.shape[1], cols)

    def step(self) -> StepTiming:
        k, self.k = self.k, self.k + 1
        data_s, c = timed(lambda: self.prepare(k), self.device)
        compute_s, _ = timed(lambda: self.compute(c, k), self.device)
        return StepTiming(data_s, compute_s, self.flops(c), float(c.masked.sum()) / c.x0.shape[0])

    def split_step(self) -> dict[str, float]:
        """One step timed part by part; the same computation as ``train.train_step`` with one micro-batch."""
        k, self.k = self.k, self.k + 1
        out = {}
        out["data"], c = timed(lambda: self.prepare(k), self.device)
        with self.attention(), train.autocast(self.cfg, self.device):
            out["forward"], r = timed(lambda: mdm.nelbo(self.net, c.to(self.device), self.model.vocab), self.device)
        out["backward"], _ = timed(lambda: r.loss.backward(), self.device)
        out["optimizer"], _ = timed(lambda: self.optimizer_step(k), self.device)
        return out

    def optimizer_step(self, k: int) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        for g in self.opt.param_groups:
            g["lr"] = self.lr * g["lr_mult"]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model, k)


def interleaved(
    steps: dict[str, Callable[[], StepTiming]], repeats: int, warmup: int = 1
) -> tuple[dict[str, list[StepTiming]], dict[str, list[StepTiming]]]:
    """(warm-up timings, timed rounds): each round calls every variant once, in turn."""
    first = {name: [fn() for _ in range(warmup)] for name, fn in steps.items()}
    runs: dict[str, list[StepTiming]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            runs[name].append(fn())
    return first, runs


def summarize(shape: Shape, mode: str, first: list[StepTiming], runs: list[StepTiming], limit: float) -> dict:
    """Medians of a mode's timed steps, with tokens/s, GFLOP/s and MFU against ``limit`` (GFLOP/s)."""
    step_s = median([r.total_s for r in runs])
    flops = statistics.fmean(r.flops for r in runs)
    gflops = flops / step_s / 1e9
    return {
        "shape": shape.name,
        "mode": mode,
        "step_s": step_s,
        "compute_s": median([r.compute_s for r in runs]),
        "data_s": median([r.data_s for r in runs]),
        "tokens_per_s": shape.tokens / step_s,
        "gflop_per_step": flops / 1e9,
        "gflops": gflops,
        "mfu": gflops / limit if limit > 0 else math.nan,
        "limit_gflops": limit,
        "first_step_s": first[0].total_s if first else math.nan,
        "masked_per_row": statistics.fmean(r.masked for r in runs),
        "steps": len(runs),
    }


# ----------------------------------------------------------------------------------------------
# 6. The training sections: modes, the AR twin, logits at masked positions, anti-masking
# ----------------------------------------------------------------------------------------------


def train_modes(opts: Options, shape: Shape) -> dict[str, dict]:
    """The modes measured on a shape: name -> TrainConfig overrides (the name says the matmuls' dtype)."""
    device, native = opts.torch_device, native_bf16(opts.torch_device)
    if device.type == "cuda":
        modes = {"eager bf16": {"dtype": "bf16"}, "AR eager bf16": {"dtype": "bf16", "objective": "ar"}}
        modes["plain eager bf16"] = {"dtype": "bf16", "plain": True}
        if opts.use_compile:
            modes["compile bf16"] = {"dtype": "bf16", "compile": "true"}
        return modes
    modes = {"eager fp32": {"dtype": "fp32"}, "AR eager fp32": {"dtype": "fp32", "objective": "ar"}}
    modes["plain eager fp32"] = {"dtype": "fp32", "plain": True}
    # bf16 without hardware support runs ~5x slower than fp32: measure it on the smallest shapes only
    if native or (shape.name in ("small",) if opts.quick else shape.name in ("tiny", "plan1M")):
        modes["eager bf16"] = {"dtype": "bf16"}
    if opts.use_compile and shape.name in ("tiny", "plan1M", "plan6M", "small"):
        modes["compile fp32"] = {"dtype": "fp32", "compile": "true"}
        if native:
            modes["compile bf16"] = {"dtype": "bf16", "compile": "true"}
    return modes


def base_mode(opts: Options) -> str:
    return "eager bf16" if opts.torch_device.type == "cuda" else "eager fp32"


def limit_for(mode: str, limits: dict[str, float], opts: Options) -> float:
    if opts.torch_device.type == "cuda":
        return opts.gpu_peak_tflops * 1e3
    return limits.get("bf16" if "bf16" in mode else "fp32", math.nan)


def section_train(opts: Options, shapes: list[Shape], limits: dict[str, float]) -> dict:
    device = opts.torch_device
    rows, splits, ratios, ratios_plain = [], [], [], []
    for shape in shapes:
        modes = train_modes(opts, shape)
        progress(f"train {shape.name} ({shape.describe()}): modes {', '.join(modes)}")
        workloads = {m: Workload(shape, device, **kw) for m, kw in modes.items()}
        warmup = 2 if device.type == "cuda" else 1
        first, runs = interleaved({m: w.step for m, w in workloads.items()}, shape.repeats, warmup)
        summaries = {m: summarize(shape, m, first[m], runs[m], limit_for(m, limits, opts)) for m in modes}
        for m, s in summaries.items():
            if "compile" in m:
                s["compile_s"] = s["first_step_s"] - s["step_s"]
            s["attention"] = workloads[m].attention_note
            rows.append(s)
        base = base_mode(opts)
        split_runs = [workloads[base].split_step() for _ in range(max(2, shape.repeats // 2 + 1))]
        split = {part: median([s[part] for s in split_runs]) for part in split_runs[0]}
        split_total = sum(split.values())
        splits.append(
            {
                "shape": shape.name,
                **{f"{p}_s": v for p, v in split.items()},
                **{f"{p}_share": v / split_total for p, v in split.items()},
                "data_share_of_step": summaries[base]["data_s"] / summaries[base]["step_s"],
            }
        )
        ar = f"AR {base}"
        mdm_runs, ar_runs = runs[base], runs[ar]
        ratios.append(
            {
                "shape": shape.name,
                "mdm_step_s": summaries[base]["step_s"],
                "ar_step_s": summaries[ar]["step_s"],
                "ratio_step": summaries[base]["step_s"] / summaries[ar]["step_s"],
                "ratio_compute": summaries[base]["compute_s"] / summaries[ar]["compute_s"],
                # per-round ratios (each pair measured back to back) are the least noisy estimate
                "ratio_paired": median([a.total_s / b.total_s for a, b in zip(mdm_runs, ar_runs, strict=True)]),
                "mdm_masked_per_row": summaries[base]["masked_per_row"],
                "ar_predicted_per_row": summaries[ar]["masked_per_row"],
            }
        )
        plain = f"plain {base}"
        for m in [m for m in modes if m in (base, "eager bf16", "compile fp32", "compile bf16")]:
            pairs = zip(runs[plain], runs[m], strict=True)  # > 1: the MDM step is faster than the plain one
            ratios_plain.append(
                {
                    "shape": shape.name,
                    "mode": m,
                    "plain_tokens_per_s": summaries[plain]["tokens_per_s"],
                    "mdm_tokens_per_s": summaries[m]["tokens_per_s"],
                    "speed_vs_plain": median([p.total_s / q.total_s for p, q in pairs]),
                }
            )
        for m in modes:
            s = summaries[m]
            progress(f"  {m:>14}: {s['step_s']:.3f} s/step, {s['tokens_per_s']:,.0f} tok/s, MFU {s['mfu']:.2f}")
        del workloads
    return {
        "shapes": [asdict(s) | {"describe": s.describe()} for s in shapes],
        "rows": rows,
        "split": splits,
        "ar": ratios,
        "plain": ratios_plain,
    }


def logits_shapes(opts: Options, shapes: list[Shape]) -> list[Shape]:
    """The default vocabulary (the first shape) and a 50k-token text vocabulary."""
    if opts.quick:
        big = Shape(
            "50k vocab", "tiny", 32, 50257, 4, d_model=32, n_layers=1, n_heads=2, repeats=2, synthetic_text=50257
        )
    elif opts.torch_device.type == "cuda":
        big = Shape("50k vocab", "small", 256, 50257, 64, repeats=10, synthetic_text=50257)
    else:
        big = Shape(
            "50k vocab", "tiny", 256, 50257, 8, d_model=256, n_layers=6, n_heads=4, repeats=3, synthetic_text=50257
        )
    return [shapes[0], big]


def section_logits(opts: Options, shapes: list[Shape], limits: dict[str, float]) -> dict:
    device, mode = opts.torch_device, base_mode(opts)
    dtype = {"dtype": "bf16" if "bf16" in mode else "fp32"}
    rows = []
    for shape in logits_shapes(opts, shapes):
        progress(f"logits {shape.name} ({shape.describe()})")
        w = {
            "masked only": Workload(shape, device, **dtype),
            "naive": Workload(shape, device, naive_logits=True, **dtype),
        }
        first, runs = interleaved({k: v.step for k, v in w.items()}, shape.repeats)
        s = {k: summarize(shape, k, first[k], runs[k], limit_for(mode, limits, opts)) for k in w}
        vocab = w["naive"].layout.vocab
        rows.append(
            {
                "shape": shape.name,
                "describe": shape.describe(),
                "vocab": vocab.size,
                "masked_step_s": s["masked only"]["step_s"],
                "naive_step_s": s["naive"]["step_s"],
                "saving": 1 - s["masked only"]["step_s"] / s["naive"]["step_s"],
                "saving_paired": 1 - median([a.total_s / b.total_s for a, b in zip(*runs.values(), strict=True)]),
                "flop_saving": 1 - s["masked only"]["gflop_per_step"] / s["naive"]["gflop_per_step"],
            }
        )
        progress(f"  saving {rows[-1]['saving']:.1%} (FLOPs {rows[-1]['flop_saving']:.1%})")
    return {"rows": rows}


def section_antimask(opts: Options, shapes: list[Shape], limits: dict[str, float]) -> dict:
    shape, device, mode = shapes[0], opts.torch_device, base_mode(opts)
    dtype = {"dtype": "bf16" if "bf16" in mode else "fp32"}
    progress(f"anti-masking on {shape.name}: same {shape.batch} rows per step with and without")
    w = {
        "anti-masking": Workload(shape, device, anti_masking=True, **dtype),
        "independent masks": Workload(shape, device, anti_masking=False, **dtype),
    }
    first, runs = interleaved({k: v.step for k, v in w.items()}, shape.repeats)
    s = {k: summarize(shape, k, first[k], runs[k], limit_for(mode, limits, opts)) for k in w}
    return {
        "shape": shape.name,
        "rows_per_step": shape.batch,
        "rows": list(s.values()),
        "ratio": s["anti-masking"]["step_s"] / s["independent masks"]["step_s"],
        "ratio_paired": median([a.total_s / b.total_s for a, b in zip(*runs.values(), strict=True)]),
    }


# ----------------------------------------------------------------------------------------------
# 7. Profile: where the time of one step goes
# ----------------------------------------------------------------------------------------------

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_weight_int")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention")


def section_profile(opts: Options, shapes: list[Shape], top: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile

    device, out = opts.torch_device, {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for shape in shapes[:1] + [s for s in shapes[1:] if s.name == "small"]:
        progress(f"profile {shape.name}")
        w = Workload(shape, device, dtype="bf16" if "bf16" in base_mode(opts) else "fp32")
        w.step()  # warm-up
        with profile(activities=activities, record_shapes=True) as prof:
            w.step()
        events = prof.key_averages(group_by_input_shape=True)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in events) or 1.0
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)
        share = {"matmul": 0.0, "attention": 0.0}
        for e in events:
            if e.key.startswith(MATMUL_OPS):
                share["matmul"] += getattr(e, key) / total
            elif any(a in e.key for a in ATTENTION_OPS):
                share["attention"] += getattr(e, key) / total
        share["other"] = 1 - share["matmul"] - share["attention"]
        others = [e for e in ranked if not e.key.startswith(MATMUL_OPS) and not any(a in e.key for a in ATTENTION_OPS)]
        out[shape.name] = {
            "top_other": [
                {"op": e.key, "shapes": str(e.input_shapes)[:80], "share": getattr(e, key) / total} for e in others[:6]
            ],
            "top": [
                {
                    "op": e.key,
                    "shapes": str(e.input_shapes)[:120],
                    "calls": e.count,
                    "self_ms": getattr(e, key) / 1e3,
                    "share": getattr(e, key) / total,
                }
                for e in ranked[:top]
            ],
            "share": share,
            "total_self_ms": total / 1e3,
        }
    return out


# ----------------------------------------------------------------------------------------------
# 8. Sampling
# ----------------------------------------------------------------------------------------------


def sampling_model(opts: Options) -> tuple[nn.Module, data_lib.Layout, data_lib.TriModalData, str]:
    """A trained model (``--checkpoint``) or a randomly initialised tiny one on the default data layout."""
    device = opts.torch_device
    if opts.checkpoint:
        inf = load_for_inference(opts.checkpoint, device=str(device))
        data = load_data(inf.data_config)
        return inf.model, inf.layout, data, f"checkpoint {opts.checkpoint} (step {inf.step}, EMA weights)"
    data = load_data(data_lib.DataConfig())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Denoiser(PRESETS["tiny"], data.vocab).to(device).eval()
    return model, data.layout, data, "randomly initialised tiny Denoiser (no --checkpoint), default data layout"


def sampling_conditions(data: data_lib.TriModalData, task: str) -> dict:
    """generate()'s condition for a task: a validation caption, image or clip (none for text)."""
    import sample

    row_task, generated = sample.GENERATION_TASKS[task]
    if row_task == "text":
        return {}
    pairs = data.pairs[row_task]["val"]
    if generated == "media":
        return {"texts": [pairs.captions[0][0]]}
    return {"media": [pairs.media[0]]}


def section_sampling(opts: Options) -> dict:
    import sample

    model, layout, data, source = sampling_model(opts)
    batches = (1, 2) if opts.quick else (1, 64)
    rows = []
    for task in sample.GENERATION_TASKS:
        cond = sampling_conditions(data, task)
        preset = sample.PRESETS[task]
        steps = min(preset.steps, 8) if opts.quick else preset.steps
        for sampler in sample.SAMPLERS:
            for b in batches:
                result = {}
                for cache in (True, False):
                    cfg = replace(preset, sampler=sampler, steps=steps, cache=cache)
                    _, s = sample.generate(model, layout, task, cfg, num=b, seed=0, **cond)
                    result[cache] = s
                on, off = result[True], result[False]
                rows.append(
                    {
                        "task": task,
                        "sampler": sampler,
                        "batch": b,
                        "steps": steps,
                        "guidance": preset.guidance,  # w != 0: two network passes per evaluation
                        "nfe_cached": on.nfe,
                        "nfe_uncached": off.nfe,
                        "nfe_ratio": off.nfe / max(1, on.nfe),
                        # rows carried through the network: a batch skips its unchanged and finished rows
                        "row_evals_cached": on.row_evals,
                        "row_share": on.row_evals / max(1, on.nfe * b),
                        "tokens_per_nfe": float((on.order >= 0).sum()) / b / max(1, on.nfe),
                        "s_per_sample_cached": on.seconds_per_sample,
                        "s_per_sample_uncached": off.seconds_per_sample,
                        "identical": bool(torch.equal(on.ids, off.ids)),
                    }
                )
            progress(f"sampling {task} {sampler}: NFE cached/uncached {on.nfe}/{off.nfe} at batch {b}")
    return {"model": source, "rows": rows}


# ----------------------------------------------------------------------------------------------
# 9. Memory: measured peaks and arithmetic
# ----------------------------------------------------------------------------------------------


def data_vocab(text_vocab: int) -> mdm.Vocab:
    """The vocabulary ``build_data`` makes for a text vocabulary (default image tokenizer, committed codec)."""
    cfg = data_lib.DataConfig()
    return mdm.Vocab(
        text=text_vocab, audio=875, image=data_lib.PixelTokenizer(cfg.image_levels, cfg.image_patch).vocab_size
    )


def param_count(cfg: ModelConfig, vocab: mdm.Vocab) -> int:
    """Parameters of a Denoiser without building it: embedding, blocks (linears and norms), unembedding."""
    d, hd = cfg.d_model, cfg.d_model // cfg.n_heads
    block = linear_weights_per_layer(cfg) + 2 * d + 2 * hd
    return vocab.size * d + cfg.n_layers * block + d + vocab.control_start * d


def saved_bytes(cfg: ModelConfig, tokens: tuple[int, int], dtype: str) -> int:
    """Bytes of the activations autograd saves in the forward of the blocks (weights and their casts excluded)."""
    vocab = mdm.Vocab(text=16, audio=4, image=4)
    model = Denoiser(cfg, vocab)
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in known and tuple(t.shape) not in shapes:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(vocab.text, tokens)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"),
    ):
        model.hidden(x)
    return sum(seen.values())


def activation_model(dtype: str) -> dict[str, float]:
    """Bytes saved for backward per token per block, fitted as a·d + b·h + c·H + e.

    Measured with ``saved_tensors_hooks`` (storages counted once, weights excluded) on four small
    blocks that vary d, the SwiGLU width h and the heads H one at a time, each as the difference
    between a 2-layer and a 1-layer model at 3 x 40 tokens. The saved tensors are linear in d, h, H
    per token, so the fit is exact; the result is checked against direct measurements in the table.
    """

    def per_layer(d: int, h: int, heads: int) -> float:
        cfg = ModelConfig(d_model=d, n_layers=1, n_heads=heads, max_len=64, mlp_ratio=h / d)
        one = saved_bytes(cfg, (3, 40), dtype)
        two = saved_bytes(replace(cfg, n_layers=2), (3, 40), dtype)
        return (two - one) / 120

    base = per_layer(64, 128, 2)
    a = (per_layer(128, 128, 2) - base) / 64
    b = (per_layer(64, 256, 2) - base) / 128
    c = (per_layer(64, 128, 4) - base) / 2
    return {"a": a, "b": b, "c": c, "e": base - 64 * a - 128 * b - 2 * c}


def activation_bytes(cfg: ModelConfig, coef: dict[str, float]) -> float:
    return coef["a"] * cfg.d_model + coef["b"] * cfg.mlp_hidden + coef["c"] * cfg.n_heads + coef["e"]


def memory_arithmetic(
    name: str, cfg: ModelConfig, vocab: mdm.Vocab, rows: int, seq: int, coef: dict, gpus: int, act_dtype: str
) -> dict:
    """Bytes of training: fp32 weights, gradients, AdamW (2 moments), EMA, and one micro-batch's activations.

    Activations = n_layers x (a·d + b·h + c·H + e) x rows·seq (fitted per dtype, ``activation_model``)
    + the loss head: about half the positions masked, each with fp32 logits and log-softmax over its
    slice (8 bytes x |text slice| as the upper case). DDP keeps everything on every GPU plus one
    gradient-bucket copy (4P); FSDP shards weights, gradients, AdamW and EMA over N GPUs and holds,
    besides, two blocks of unsharded bf16 weights (the one computing and the one prefetched).
    """
    P = param_count(cfg, vocab)
    T = rows * seq
    states = {"weights": 4 * P, "gradients": 4 * P, "adamw": 8 * P, "ema": 4 * P}
    act = cfg.n_layers * activation_bytes(cfg, coef) * T + 8 * (T // 2) * vocab.predict_size("text")
    block = linear_weights_per_layer(cfg)
    single = sum(states.values()) + act
    return {
        "preset": name,
        "params_M": P / 1e6,
        "vocab": vocab.size,
        "micro_batch": f"{rows} x {seq}",
        "activation_dtype": act_dtype,
        **{f"{k}_GB": v / 1e9 for k, v in states.items()},
        "activations_GB": act / 1e9,
        "single_GB": single / 1e9,
        "ddp_per_gpu_GB": (single + 4 * P) / 1e9,
        "fsdp_per_gpu_GB": (sum(states.values()) / gpus + 2 * 2 * block + act) / 1e9,
        "gpus": gpus,
    }


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB.

    Not ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the high-water mark of the
    parent's memory image across fork + exec into it, so a child started by a 1 GB parent reports
    at least 1 GB whatever it does. VmHWM belongs to the process's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(spec: dict) -> dict:
    """Run in a fresh process: peak RSS (MB) after imports, then after some training steps."""
    torch.set_num_threads(spec["threads"])
    baseline = peak_rss_mb()
    if spec["kind"] == "train":
        with tempfile.TemporaryDirectory() as tmp:
            train.main([*spec["args"], f"--out_dir={tmp}"])
    else:
        w = Workload(Shape(**spec["shape"]), torch.device("cpu"), dtype="fp32")
        for _ in range(spec["steps"]):
            w.step()
    return {"baseline_mb": baseline, "peak_mb": peak_rss_mb()}


def run_memory_child(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "lab.bench", "--memory-child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_MEMORY "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"memory measurement failed ({proc.returncode}): {proc.stderr[-2000:]}")


def measured_memory(opts: Options, shapes: list[Shape]) -> list[dict]:
    """Peak memory of training per measured shape: a fresh process each on CPU, the allocator's peak on GPU."""
    device, out = opts.torch_device, []
    wanted = [s for s in shapes if s.name in (("tiny",) if opts.quick else ("tiny", "small"))]
    for shape in wanted:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            w = Workload(shape, device)
            for _ in range(2):
                w.step()
            out.append(
                {
                    "shape": shape.name,
                    "what": "2 steps, bf16, in process",
                    "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                    "baseline_mb": 0.0,
                }
            )
            del w
            continue
        if opts.quick:
            synthetic = replace(shape, synthetic_text=shape.text_vocab)
            spec = {"kind": "workload", "shape": asdict(synthetic), "steps": 2, "threads": torch.get_num_threads()}
            what = "2 steps of the shape on synthetic text rows"
        else:
            args = ["--max_steps=3", "--final_report=false"]  # the tiny shape is train.py's default
            what = "data build, evaluation at step 0, 3 steps, checkpoint"
            if shape.name != "tiny":
                what = "data build, 2 steps, checkpoint"
                args = [
                    "--max_steps=2",
                    "--final_report=false",
                    "--eval_every=0",
                    f"--preset={shape.preset}",
                    f"--seq_len={shape.seq_len}",
                    f"--text_vocab={shape.text_vocab}",
                    f"--batch_size={shape.batch}",
                ]
            spec = {"kind": "train", "args": args, "threads": torch.get_num_threads()}
            what = f"`python train.py {' '.join(args)}` ({what})"
        progress(f"memory {shape.name}: {what}")
        out.append({"shape": shape.name, "what": what, **run_memory_child(spec)})
    return out


def section_memory(opts: Options, shapes: list[Shape]) -> dict:
    device = opts.torch_device
    act_dtype = "bf16" if device.type == "cuda" else "fp32"
    coef = {dt: activation_model(dt) for dt in ("fp32", "bf16")}
    measured = measured_memory(opts, shapes)
    default_vocab = data_vocab(1024)
    arithmetic, checks = [], []
    for s in shapes:  # the measured shapes, predicted with the same rows and sequence length
        if s.name in ("tiny", "small"):
            vocab = data_vocab(s.text_vocab)
            arithmetic.append(
                memory_arithmetic(
                    s.name, s.model_config(), vocab, s.batch, s.seq_len, coef[act_dtype], opts.gpus, act_dtype
                )
            )
            direct = saved_bytes(replace(s.model_config(), n_layers=1), (3, 40), act_dtype) - saved_bytes(
                replace(s.model_config(), n_layers=0), (3, 40), act_dtype
            )
            checks.append(
                {
                    "shape": s.name,
                    "fitted_bytes_per_token_layer": activation_bytes(s.model_config(), coef[act_dtype]),
                    "direct_bytes_per_token_layer": direct / 120,
                }
            )
    for r in measured:  # the arithmetic of the same shape, next to the measurement
        r["predicted_mb"] = next(a["single_GB"] * 1e3 for a in arithmetic if a["preset"] == r["shape"])
        r["increase_mb"] = r["peak_mb"] - r["baseline_mb"]
    # presets base and up are GPU presets: bf16 activations, and an assumed full-size vocabulary of a
    # GPT-2 text BPE (50257) plus 4096 audio and 8192 image codes
    for name, cfg in PRESETS.items():
        small = name in ("tiny", "small")
        vocab = default_vocab if small else mdm.Vocab(text=50257, audio=4096, image=8192)
        dt = act_dtype if small else "bf16"
        arithmetic.append(memory_arithmetic(f"{name} (preset)", cfg, vocab, 8, cfg.max_len, coef[dt], opts.gpus, dt))
    return {"measured": measured, "arithmetic": arithmetic, "activation_coefficients": coef, "checks": checks}


# ----------------------------------------------------------------------------------------------
# 10. Targets and reporting
# ----------------------------------------------------------------------------------------------


@dataclass
class Target:
    goal: str
    measured: str
    status: str  # pass | miss | n/a


def _row(rows: list[dict], **match: object) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def evaluate_targets(results: dict) -> list[Target]:
    out: list[Target] = []
    tr = results.get("train", {})
    rows, ar, split = tr.get("rows", []), tr.get("ar", []), tr.get("split", [])

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("pass" if ok else "miss")

    if ar:
        worst = max(ar, key=lambda r: r["ratio_paired"])
        text = ", ".join(f"{r['shape']} {r['ratio_paired']:.3f}" for r in ar)
        out.append(Target("MDM step <= 1.05 x AR step (paired ratio)", text, verdict(worst["ratio_paired"] <= 1.05)))
    # train.py's default mode: on a GPU bf16, compiled; on a CPU eager, in bf16 where bf16 is native (--dtype=auto
    # times both at start-up; bf16 won on every shape measured here where it is native)
    machine = results.get("machine", {})
    on_gpu, native = str(machine.get("device", "")).startswith("cuda"), machine.get("bf16_native")
    default = "compile bf16" if on_gpu else "eager bf16" if native else "eager fp32"
    for mode, goal in (("eager bf16" if on_gpu else "eager fp32", 1.0), (default, 1.1)):
        vs = [r for r in tr.get("plain", []) if r["mode"] == mode and r["shape"] in ("plan1M", "plan6M")]
        if vs:
            text = ", ".join(f"{r['shape']} {r['speed_vs_plain']:.2f}x" for r in vs)
            ok = min(r["speed_vs_plain"] for r in vs) >= goal
            what = "" if mode != default else "train.py's default mode, "
            goal_text = f"MDM {what}{mode} step >= {goal}x the plain transformer's eager step (plan1M, plan6M)"
            out.append(Target(goal_text, text, verdict(ok)))
    plan = [
        ("plan6M", "eager fp32", "tokens_per_s", 3400, "plan6M eager fp32 >= 3.4k tokens/s"),
        ("plan6M", "eager fp32", "mfu", 0.68, "plan6M eager fp32 >= 68% of the fp32 limit"),
        ("plan6M", "compile bf16", "tokens_per_s", 5200, "plan6M compile + bf16 >= 5.2k tokens/s"),
        ("plan1M", "eager fp32", "tokens_per_s", 16000, "plan1M eager fp32 >= 16k tokens/s"),
        ("plan1M", "eager bf16", "tokens_per_s", 21000, "plan1M bf16 >= 21k tokens/s"),
    ]
    for shape, mode, key, goal, name in plan if rows else []:
        r = _row(rows, shape=shape, mode=mode)
        if r is None and mode == "compile bf16":  # no bf16 hardware: the fastest compiled or bf16 mode instead
            cands = [x for x in rows if x["shape"] == shape and ("compile" in x["mode"] or "bf16" in x["mode"])]
            r = max(cands, key=lambda x: x["tokens_per_s"]) if cands else None
            name += f" (compile bf16 not run; best of {', '.join(x['mode'] for x in cands)})" if cands else ""
        value = None if r is None else r[key]
        shown = "not run" if r is None else (f"{value:,.0f}" if key == "tokens_per_s" else f"{value:.0%}")
        out.append(
            Target(
                name, shown + ("" if r is None else f" ({r['mode']})"), verdict(None if r is None else value >= goal)
            )
        )
    small = [r for r in rows if r["shape"] == "small" and "AR" not in r["mode"] and "plain" not in r["mode"]]
    if small and results["machine"]["device"] == "cpu":
        best = max(small, key=lambda r: r["gflops"])
        out.append(
            Target(
                "small preset, fastest CPU mode >= 200 GFLOP/s",
                f"{best['gflops']:.0f} ({best['mode']})",
                verdict(best["gflops"] >= 200),
            )
        )
    fp32 = [r for r in rows if r["mode"] == "eager fp32" and r["shape"] in ("small", "plan6M")]
    if fp32:
        text = ", ".join(f"{r['shape']} {r['mfu']:.0%}" for r in fp32)
        out.append(Target("eager fp32 >= 65% MFU (plan6M, small)", text, verdict(min(r["mfu"] for r in fp32) >= 0.65)))
    if split:
        text = ", ".join(f"{r['shape']} {r['data_share_of_step']:.1%}" for r in split)
        out.append(
            Target("data loading < 5% of the step", text, verdict(max(r["data_share_of_step"] for r in split) < 0.05))
        )
    # the threshold sampler reveals in every row at every step: nothing to skip, so not counted here
    samp = [r for r in results.get("sampling", {}).get("rows", []) if r["batch"] == 1 and r["sampler"] != "threshold"]
    if samp:
        ok = [r for r in samp if r["nfe_ratio"] >= 2]
        same = all(r["identical"] for r in results["sampling"]["rows"])
        text = (
            f"{len(ok)}/{len(samp)} (task, sampler) pairs at batch 1 reach 2x "
            f"(ratios {min(r['nfe_ratio'] for r in samp):.2f}-{max(r['nfe_ratio'] for r in samp):.2f}); "
            f"outputs identical: {same}"
        )
        out.append(
            Target(
                "caching >= 2x fewer NFE at the default steps (grid samplers), identical outputs",
                text,
                verdict(len(ok) == len(samp) and same),
            )
        )
    on_gpu = results["machine"]["device"].startswith("cuda")
    gpu = [r for r in rows if on_gpu and not r["mode"].startswith(("AR", "plain"))]
    if gpu:
        text = ", ".join(f"{r['shape']} {r['mode']} {r['mfu']:.0%}" for r in gpu)
        out.append(Target("GPU MFU against --gpu-peak-tflops (reported, no target)", text, "n/a"))
    mem = _row(results.get("memory", {}).get("measured", []), shape="tiny")
    if mem and mem.get("what", "").startswith("`python train.py"):
        out.append(
            Target(
                "`python train.py` default run < 2 GB",
                f"peak RSS {mem['peak_mb']:,.0f} MB",
                verdict(mem["peak_mb"] < 2048),
            )
        )
    return out


def fmt(x: object) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3g}"
    return str(x)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with (key, header) columns."""
    if not rows:
        return "(no rows)"
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def percent(rows: list[dict], keys: Sequence[str]) -> list[dict]:
    return [{**r, **{k: f"{100 * r[k]:.1f}%" for k in keys if isinstance(r.get(k), float)}} for r in rows]


def report(results: dict, opts: Options) -> str:
    m = results["machine"]
    parts = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores; torch threads: {m['threads']}"
        + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f"), torch {m['torch']} ({m['cpu_capability']}; bf16 in hardware: {m['bf16_native']}), "
        f"Python {m['python']}.",
        f"Command: `{m['command']}`. Load average (1/5/15 min) before: {m['load_before']}, "
        f"after: {m.get('load_after', 'n/a')}.",
    ]
    if "matmul" in results:
        mm = results["matmul"]
        parts += [
            "",
            "### Matmul limit (GFLOP/s, F.linear; median and best of the repeats)",
            "",
            table(
                mm["rows"],
                [
                    ("dtype", "dtype"),
                    ("gemm", "GEMM"),
                    ("m", "m"),
                    ("k", "k"),
                    ("n", "n"),
                    ("gflops", "median"),
                    ("best_gflops", "best"),
                ],
            ),
            "",
            "Limit (best of the above): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in mm["limit_gflops"].items()),
        ]
    if "train" in results:
        tr = results["train"]
        parts += [
            "",
            "### Training step (medians; tokens = rows x seq, padding included)",
            "",
            table(tr["shapes"], [("name", "shape"), ("describe", "model and batch"), ("note", "note")]),
            "",
            table(
                percent(tr["rows"], ["mfu"]),
                [
                    ("shape", "shape"),
                    ("mode", "mode"),
                    ("step_s", "s/step"),
                    ("tokens_per_s", "tokens/s"),
                    ("gflop_per_step", "GFLOP/step"),
                    ("gflops", "GFLOP/s"),
                    ("mfu", "MFU"),
                    ("data_s", "data s"),
                    ("first_step_s", "1st step s"),
                    ("compile_s", "compile s"),
                ],
            ),
            "",
            "Split of one step (timed part by part, base mode):",
            "",
            table(
                percent(
                    tr["split"],
                    ["data_share", "forward_share", "backward_share", "optimizer_share", "data_share_of_step"],
                ),
                [
                    ("shape", "shape"),
                    ("data_s", "data s"),
                    ("forward_s", "forward s"),
                    ("backward_s", "backward s"),
                    ("optimizer_s", "optimizer s"),
                    ("forward_share", "fwd"),
                    ("backward_share", "bwd"),
                    ("optimizer_share", "opt"),
                    ("data_share_of_step", "data share of step"),
                ],
            ),
            "",
            "MDM step / autoregressive-twin step (same shape and rows; base mode):",
            "",
            table(
                tr["ar"],
                [
                    ("shape", "shape"),
                    ("mdm_step_s", "MDM s"),
                    ("ar_step_s", "AR s"),
                    ("ratio_step", "ratio of medians"),
                    ("ratio_paired", "paired ratio"),
                    ("ratio_compute", "ratio (compute only)"),
                    ("mdm_masked_per_row", "MDM predicted/row"),
                    ("ar_predicted_per_row", "AR predicted/row"),
                ],
            ),
            "",
            "MDM step against the plain transformer (nanoGPT kind: LayerNorm, learned positions, GELU MLP, no QK-norm,"
            " full-vocabulary logits at the masked positions), same batches, interleaved; speed > 1: MDM faster:",
            "",
            table(
                tr.get("plain", []),
                [
                    ("shape", "shape"),
                    ("mode", "MDM mode"),
                    ("mdm_tokens_per_s", "MDM tokens/s"),
                    ("plain_tokens_per_s", "plain tokens/s (eager)"),
                    ("speed_vs_plain", "speed vs plain (paired)"),
                ],
            ),
        ]
    if "logits" in results:
        parts += [
            "",
            "### Logits only at masked positions vs full-vocabulary logits everywhere",
            "",
            table(
                percent(results["logits"]["rows"], ["saving", "saving_paired", "flop_saving"]),
                [
                    ("shape", "shape"),
                    ("describe", "model and batch"),
                    ("vocab", "vocab"),
                    ("masked_step_s", "masked-only s"),
                    ("naive_step_s", "naive s"),
                    ("saving", "time saved"),
                    ("saving_paired", "paired"),
                    ("flop_saving", "FLOPs saved"),
                ],
            ),
        ]
    if "antimask" in results:
        a = results["antimask"]
        parts += [
            "",
            f"### Anti-masking at equal compute ({a['shape']}, {a['rows_per_step']} rows per step)",
            "",
            table(a["rows"], [("mode", "masks"), ("step_s", "s/step"), ("masked_per_row", "masked/row")]),
            "",
            f"Step ratio anti-masking / independent: {a['ratio']:.3f} (paired {a['ratio_paired']:.3f}).",
        ]
    if "profile" in results:
        for name, p in results["profile"].items():
            s = p["share"]
            parts += [
                "",
                f"### Profile of one {name} step (self time {p['total_self_ms']:.0f} ms: "
                f"matmul {s['matmul']:.0%}, attention {s['attention']:.0%}, other {s['other']:.0%})",
                "",
                "Largest non-matmul, non-attention ops: "
                + "; ".join(f"{o['op']} {o['shapes']} {100 * o['share']:.1f}%" for o in p["top_other"])
                + ".",
                "",
                table(
                    percent(p["top"], ["share"]),
                    [
                        ("op", "op"),
                        ("shapes", "input shapes"),
                        ("calls", "calls"),
                        ("self_ms", "self ms"),
                        ("share", "share"),
                    ],
                ),
            ]
    if "sampling" in results:
        sp = results["sampling"]
        parts += [
            "",
            f"### Sampling ({sp['model']})",
            "",
            table(
                sp["rows"],
                [
                    ("task", "task"),
                    ("sampler", "sampler"),
                    ("batch", "batch"),
                    ("steps", "steps"),
                    ("nfe_cached", "NFE cached"),
                    ("nfe_uncached", "NFE uncached"),
                    ("nfe_ratio", "ratio"),
                    ("row_share", "rows per pass / batch"),
                    ("tokens_per_nfe", "tokens/NFE per row"),
                    ("s_per_sample_cached", "s/sample cached"),
                    ("s_per_sample_uncached", "s/sample uncached"),
                    ("identical", "identical"),
                ],
            ),
        ]
    if "memory" in results:
        me = results["memory"]
        coef = me["activation_coefficients"]
        parts += [
            "",
            "### Peak memory of training, measured",
            "",
            table(
                me["measured"],
                [
                    ("shape", "shape"),
                    ("what", "what ran"),
                    ("baseline_mb", "MB after imports"),
                    ("peak_mb", "peak MB"),
                    ("increase_mb", "increase MB"),
                    ("predicted_mb", "arithmetic MB (1 process)"),
                ],
            ),
            "",
            "### Memory arithmetic (GB; fp32 weights, gradients, AdamW moments and EMA)",
            "",
            "Activations per token per block, fitted bytes = a·d + b·h + c·H + e: "
            + "; ".join(
                f"{dt}: a={c['a']:.2f}, b={c['b']:.2f}, c={c['c']:.2f}, e={c['e']:.1f}" for dt, c in coef.items()
            )
            + " (check against direct measurement: "
            + ", ".join(
                f"{c['shape']} {c['fitted_bytes_per_token_layer']:.0f} vs {c['direct_bytes_per_token_layer']:.0f}"
                for c in me["checks"]
            )
            + ").",
            "",
            table(
                me["arithmetic"],
                [
                    ("preset", "preset"),
                    ("params_M", "params M"),
                    ("vocab", "vocab"),
                    ("micro_batch", "micro-batch"),
                    ("weights_GB", "weights"),
                    ("gradients_GB", "grads"),
                    ("adamw_GB", "AdamW"),
                    ("ema_GB", "EMA"),
                    ("activation_dtype", "act. dtype"),
                    ("activations_GB", "activations"),
                    ("single_GB", "1 process"),
                    ("ddp_per_gpu_GB", "DDP/GPU"),
                    ("fsdp_per_gpu_GB", f"FSDP/GPU (N={opts.gpus})"),
                ],
            ),
        ]
    targets = results.get("targets", [])
    if targets:
        parts += [
            "",
            "### Targets",
            "",
            table(targets, [("goal", "target"), ("measured", "measured"), ("status", "status")]),
        ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# 11. The command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (seconds)")
    p.add_argument("--only", default="", help=f"comma-separated sections among {', '.join(SECTIONS)}")
    p.add_argument("--json", default="", help="write the raw results to this file")
    p.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md block (header, tables, targets)")
    p.add_argument("--checkpoint", default="", help="sample from this checkpoint instead of a random tiny model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch.get_num_threads())")
    p.add_argument(
        "--gpu-peak-tflops",
        "--gpu_peak_tflops",
        type=float,
        default=989.0,
        help="the GPU's dense bf16 peak (H100: 989)",
    )
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="auto: on unless --quick")
    p.add_argument("--gpus", type=int, default=8, help="N for the DDP / FSDP memory arithmetic")
    p.add_argument("--repeats", type=int, default=0, help="timed rounds per training shape (0: per-shape default)")
    p.add_argument("--shapes", default="", help="comma-separated training shapes (e.g. plan1M,plan6M; default all)")
    p.add_argument("--memory-child", "--memory_child", default="", help=argparse.SUPPRESS)
    a = p.parse_args(list(argv))
    only = tuple(s for s in a.only.split(",") if s) or SECTIONS
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose among {', '.join(SECTIONS)}")
    return Options(
        quick=a.quick,
        only=only,
        json_path=a.json,
        markdown=a.markdown,
        checkpoint=a.checkpoint,
        device=a.device,
        threads=a.threads,
        gpu_peak_tflops=a.gpu_peak_tflops,
        compile=a.compile,
        gpus=a.gpus,
        repeats=a.repeats,
        shapes=tuple(s for s in a.shapes.split(",") if s),
        command="python -m lab.bench " + " ".join(argv),
        memory_child=a.memory_child,
    )


@contextlib.contextmanager
def fresh_inductor_cache() -> Iterator[None]:
    """Compile times measured cold: a new TorchInductor cache directory for this run (unless one is set)."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def run(opts: Options) -> dict:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    results: dict = {"machine": machine_info(opts)}
    device = opts.torch_device
    shapes = quick_shapes() if opts.quick else full_shapes(device)
    if opts.repeats:
        shapes = [replace(s, repeats=opts.repeats) for s in shapes]
    if opts.shapes:
        unknown = set(opts.shapes) - {s.name for s in shapes}
        if unknown:
            raise SystemExit(f"unknown shapes {sorted(unknown)}; this run has {', '.join(s.name for s in shapes)}")
        shapes = [s for s in shapes if s.name in opts.shapes]
    progress(
        f"{results['machine']['cpu']}, {torch.get_num_threads()} threads, device {device}, "
        f"load {results['machine']['load_before']}; sections {', '.join(opts.only)}"
    )
    needs_limit = {"matmul", "train", "logits", "antimask"} & set(opts.only)
    with fresh_inductor_cache():
        if needs_limit:
            results["matmul"] = section_matmul(opts, shapes)
        limits = results.get("matmul", {}).get("limit_gflops", {})
        if "train" in opts.only:
            results["train"] = section_train(opts, shapes, limits)
        if "logits" in opts.only:
            results["logits"] = section_logits(opts, shapes, limits)
        if "antimask" in opts.only:
            results["antimask"] = section_antimask(opts, shapes, limits)
        if "profile" in opts.only:
            results["profile"] = section_profile(opts, shapes)
        if "sampling" in opts.only:
            results["sampling"] = section_sampling(opts)
        if "memory" in opts.only:
            results["memory"] = section_memory(opts, shapes)
    results["machine"]["load_after"] = load_average()
    results["targets"] = [asdict(t) for t in evaluate_targets(results)]
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.memory_child:
        print("BENCH_MEMORY " + json.dumps(memory_child(json.loads(opts.memory_child))), flush=True)
        return {}
    results = run(opts)
    text = report(results, opts)
    if opts.markdown:
        print("<!-- bench.py --markdown: paste between these markers -->\n" + text + "\n<!-- end of bench.py -->")
    else:
        print(text)
    if opts.json_path:
        Path(opts.json_path).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
