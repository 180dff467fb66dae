"""The paper's design-space studies, rerun on the tiny tri-modal setting: one subcommand per study.

    python studies.py schedules --size quick   # 1. training and inference noise schedules
    python studies.py sde --size quick         # 2. SDE batch reparameterization, critical batch
    python studies.py antimask --size quick    # 3. anti-masking against plain masking at equal compute
    python studies.py scaling --size quick     # 4. L(N, D) over model sizes and token budgets
    python studies.py mixing --size quick      # 5. modality mixing ratios
    python studies.py inference --size quick   # 6. sampler steps, temperature, guidance per task
    python studies.py all --size smoke --out /tmp/studies   # every study in turn (smoke: seconds each)

What one study does: it lists its runs (``RunSpec``: a variant of the training config and a seed),
trains each with ``train.main`` into ``<runs>/<study>/<size>/<variant>_s<seed>/`` (its stdout goes to
``train.log`` there), reads the run's ``metrics.jsonl``, evaluates the checkpoint, and appends one
JSON line per run to ``<out>/<study>.jsonl``. It then writes ``<out>/<study>.png`` (matplotlib
``Figure`` + ``FigureCanvasAgg``, no pyplot state) and ``<out>/<study>_summary.json`` (means and
spreads over seeds, fits), and prints the summary. A run whose line already exists (same id and
size) is not run again, so an interrupted study resumes where it stopped; ``--force`` reruns.

How each run is judged, identically in every study (``evaluate_checkpoint``):
* NELBO in bits per token from ``evaluate.nelbo_bits`` on the run's *validation* split, per task and
  modality (text rows; image and caption of image-text rows; audio and transcript of audio-text
  rows), with the EMA weights, fixed rows and fixed stratified masks under the linear schedule. The
  run's own validation record in metrics.jsonl is kept too (``val_bits``), but its rows depend on the
  run's batch size and mixing ratios, so the studies compare the fixed-protocol numbers.
  ``loss_bits`` is the mean over the three tasks of their NELBO per data token.
* Generation (where a study asks for it) with the offline judges of ``evaluate.py`` on the
  validation split: text-to-image (digit judge accuracy, classifier-space Fréchet distance),
  captioning and speech recognition (the text names the digit), text-to-speech (pocketsphinx with a
  digit grammar). Unconditional text has no judge; it is left out.
* Sampler sweeps (studies 1 and 6) go through ``sweep`` with one metric callback per task.

Seeds: a run's seed is ``train.py``'s ``--seed``, which fixes the initialization, the batches and the
noise, and also the train/val/test split of the data (``data.DataConfig.seed``). The spread over
seeds therefore includes the split. Sizes (``Size``, presets in ``SIZES``): ``smoke`` (seconds per
study on one thread, one seed: the tests run it so this file never rots), ``quick`` (minutes per
study on 2 cores: the figures in lab/STUDIES.md) and ``full`` (about an hour per study).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import data as data_lib
import evaluate
import mdm
import sample as sample_lib
import sde_batch
import train
from checkpoint import Inference, load_for_inference
from model import Denoiser

STUDIES: tuple[str, ...] = ("schedules", "sde", "antimask", "scaling", "mixing", "inference", "parallel")
JUDGED_TASKS: tuple[str, ...] = ("t2i", "i2t", "s2t", "t2s")  # generation tasks with an offline judge
PARTS: dict[str, tuple[str, str]] = {  # reported part -> (row task, modality inside the row)
    "text": ("text", "text"),
    "image": ("image_text", "image"),
    "caption": ("image_text", "text"),
    "audio": ("audio_text", "audio"),
    "transcript": ("audio_text", "text"),
}
LN2 = math.log(2)
TRAIN_EVAL_BATCHES = 2  # train.py's own final validation (kept as val_bits); the studies judge with nelbo_bits
CURVE_BINS = 24  # study 2: training loss averaged in this many equal token bins of the horizon
CRITICAL_TOLERANCE = 0.02  # study 2: B_crit = the largest batch within 2% of the best loss at a horizon


# ----------------------------------------------------------------------------------------------
# 1. Sizes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """A denoiser shape (train.py's --d_model, --n_layers, --n_heads)."""

    d_model: int
    n_layers: int
    n_heads: int

    @property
    def label(self) -> str:
        return f"d{self.d_model}l{self.n_layers}"

    def settings(self) -> dict[str, int]:
        return {"d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads}


@dataclass(frozen=True)
class Size:
    """Everything that makes a study bigger or smaller. Use a preset: ``SIZES[name]``.

    Token counts are positions (padding included) as train.py counts them; batches are rows per
    optimizer step (train.py's --batch_size; with anti-masking half of them are complements).
    """

    name: str
    seeds: tuple[int, ...]
    # the run of studies 1, 3, 5 (and 6's checkpoint)
    model: Model
    batch: int
    tokens: float
    warmup_tokens: float  # every run's linear warmup; below the shortest horizon of every study
    # judging
    eval_batches: int  # held-out NELBO: eval_batches x eval_rows rows of each task
    eval_rows: int
    per_digit: int  # generation: prompts per digit (t2i, t2s)
    media_limit: int  # generation: held-out images / clips to caption or transcribe (i2t, s2t)
    gen_steps: int  # sampler steps of the generation metrics; 0 = sample.PRESETS' per task
    # 1. schedules (training, then inference on the linear-trained checkpoints)
    schedules: tuple[str, ...]
    # 2. SDE batch reparameterization: the reference run is (sde_base_batch, shortest horizon)
    sde_model: Model
    sde_horizons: tuple[float, ...]
    sde_batches: tuple[int, ...]
    sde_base_batch: int
    # 4. scaling
    scaling_models: tuple[Model, ...]
    scaling_tokens: tuple[float, ...]
    # 5. mixing: (text, image-text, audio-text) weights, normalised by train.py; the first is the reference
    mixtures: tuple[tuple[float, float, float], ...]
    # 6. inference defaults
    inference_tokens: float
    inference_samplers: tuple[str, ...]
    inference_steps: tuple[int, ...]
    inference_temperatures: tuple[float, ...]
    inference_guidance: tuple[float, ...]
    # 7. parallel decoding: the threshold sampler's thresholds (on study 6's checkpoint)
    parallel_thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("a size needs at least one seed")
        if self.name != "smoke" and len(self.seeds) < 2:
            raise ValueError(f"size {self.name!r}: only the smoke size may use a single seed")
        shortest = min(self.tokens, self.inference_tokens, *self.sde_horizons, *self.scaling_tokens)
        if self.warmup_tokens >= shortest:
            raise ValueError(f"size {self.name!r}: warmup_tokens must be below the shortest horizon ({shortest:g})")
        if "linear" not in self.schedules:
            raise ValueError("the schedules study needs 'linear' (its inference part uses the linear-trained runs)")
        if self.sde_base_batch not in self.sde_batches:
            raise ValueError("sde_base_batch must be one of sde_batches")


SMALL_MODEL = Model(32, 2, 2)
DEFAULT_MIX = (0.15, 0.45, 0.40)  # the mixture every study runs with: train.py's default when they were made
SIZES: dict[str, Size] = {
    "smoke": Size(
        name="smoke",
        seeds=(0,),
        model=SMALL_MODEL,
        batch=16,
        tokens=3000,
        warmup_tokens=300,
        eval_batches=2,
        eval_rows=8,
        per_digit=1,
        media_limit=10,
        gen_steps=4,
        schedules=("linear", "cosine", "poly2"),
        sde_model=SMALL_MODEL,
        sde_horizons=(1500, 3000),
        sde_batches=(8, 16, 32),
        sde_base_batch=16,
        scaling_models=(Model(32, 1, 2), SMALL_MODEL, Model(48, 2, 2)),
        scaling_tokens=(1500, 3000),
        mixtures=((1, 1, 1), (3, 1, 1), DEFAULT_MIX),
        inference_tokens=3000,
        inference_samplers=("ancestral", "confidence"),
        inference_steps=(2, 4),
        inference_temperatures=(1.0,),
        inference_guidance=(0.0, 1.0),
        parallel_thresholds=(0.5, 0.9),
    ),
    "quick": Size(
        name="quick",
        seeds=(0, 1),
        model=Model(64, 2, 2),
        batch=32,
        tokens=8e5,
        warmup_tokens=2e4,
        eval_batches=8,
        eval_rows=32,
        per_digit=3,
        media_limit=60,
        gen_steps=0,
        schedules=("linear", "cosine", "poly0.5", "poly2", "poly3"),
        sde_model=SMALL_MODEL,
        sde_horizons=(1.5e5, 3e5, 6e5),
        sde_batches=(8, 16, 32, 64, 128),
        sde_base_batch=16,
        scaling_models=(SMALL_MODEL, Model(48, 2, 2), Model(64, 2, 2), Model(96, 3, 3)),
        scaling_tokens=(2e5, 4e5, 8e5),
        mixtures=((1, 1, 1), DEFAULT_MIX, (3, 1, 1), (1, 3, 1), (1, 1, 3)),
        inference_tokens=1.6e6,
        inference_samplers=("ancestral", "confidence"),
        inference_steps=(8, 16, 32, 64),
        inference_temperatures=(0.0, 0.5, 1.0),
        inference_guidance=(0.0, 1.5),
        parallel_thresholds=(0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
    ),
    "full": Size(
        name="full",
        seeds=(0, 1, 2),
        model=Model(96, 3, 3),
        batch=32,
        tokens=3e6,
        warmup_tokens=5e4,
        eval_batches=16,
        eval_rows=64,
        per_digit=10,
        media_limit=200,
        gen_steps=0,
        schedules=("linear", "cosine", "poly0.5", "poly2", "poly3", "poly4"),
        sde_model=SMALL_MODEL,
        sde_horizons=(1.5e5, 3e5, 6e5, 1.2e6),
        sde_batches=(8, 16, 32, 64, 128, 256),
        sde_base_batch=16,
        scaling_models=(SMALL_MODEL, Model(48, 2, 2), Model(64, 2, 2), Model(96, 3, 3), Model(128, 4, 4)),
        scaling_tokens=(2.5e5, 5e5, 1e6, 2e6),
        mixtures=((1, 1, 1), DEFAULT_MIX, (3, 1, 1), (1, 3, 1), (1, 1, 3)),
        inference_tokens=4e6,
        inference_samplers=("ancestral", "confidence"),
        inference_steps=(4, 8, 16, 32, 64, 128),
        inference_temperatures=(0.0, 0.5, 0.7, 1.0),
        inference_guidance=(0.0, 1.0, 2.0, 4.0),
        parallel_thresholds=(0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
    ),
}


# ----------------------------------------------------------------------------------------------
# 2. Runs: specs, the results file, shared data and judges, training and judging one run
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study: train.py settings on top of the size's, a seed, what to judge."""

    study: str
    variant: str  # a file-name-safe label, unique within the study
    seed: int
    settings: Mapping[str, object] = field(default_factory=dict)  # train.py --key=value overrides
    generation: bool = False  # also judge generations of every task
    curve: bool = False  # also keep the binned training-loss curve (study 2)
    info: Mapping[str, object] = field(default_factory=dict)  # what the figure groups by

    @property
    def id(self) -> str:
        return f"{self.variant}_s{self.seed}"


class Results:
    """``<out>/<study>.jsonl``: one JSON object per line; a line is identified by (id, size)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def records(self, size: str, kind: str | None = None) -> list[dict]:
        return [r for r in self.load() if r["size"] == size and (kind is None or r["kind"] == kind)]

    def done(self, run_id: str, size: str, **match: object) -> bool:
        return any(
            r["id"] == run_id and r["size"] == size and all(r.get(k) == v for k, v in match.items())
            for r in self.load()
        )

    def add(self, record: dict) -> None:
        """Append the line, or replace the line of the same (id, size) (a forced rerun)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = self.load()
        line = json.dumps(record, default=_json_default)
        if not any(r["id"] == record["id"] and r["size"] == record["size"] for r in old):
            with self.path.open("a") as f:
                f.write(line + "\n")
            return
        kept = [json.dumps(r) for r in old if not (r["id"] == record["id"] and r["size"] == record["size"])]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("\n".join([*kept, line]) + "\n")
        tmp.replace(self.path)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


_BUILD_DATA = data_lib.build_data
_DATA: dict[data_lib.DataConfig, data_lib.TriModalData] = {}
_JUDGES: dict[data_lib.DataConfig, evaluate.Judges] = {}


def shared_data(cfg: data_lib.DataConfig) -> data_lib.TriModalData:
    """The data of ``cfg``, built once per process (train.py rebuilds it on every call: ~1 s)."""
    if cfg not in _DATA:
        _DATA[cfg] = _BUILD_DATA(cfg)
    return _DATA[cfg]


def shared_judges(cfg: data_lib.DataConfig) -> evaluate.Judges:
    """The offline judges, fitted once per data config (a few seconds)."""
    if cfg not in _JUDGES:
        _JUDGES[cfg] = evaluate.fit_judges(shared_data(cfg))
    return _JUDGES[cfg]


@contextlib.contextmanager
def data_built_once() -> Iterator[None]:
    """While open, ``train.load_data`` returns the shared data, built in memory once per config.

    The data is a pure function of its frozen ``DataConfig`` and nothing mutates it, so sharing it
    changes no result; it saves about a second per run, most of a smoke run.
    """

    def load(cfg: data_lib.DataConfig, codec_sha256: str = "", *_) -> data_lib.TriModalData:
        return shared_data(cfg)

    saved, train.load_data = train.load_data, load
    try:
        yield
    finally:
        train.load_data = saved


def train_args(size: Size, spec: RunSpec, run_dir: Path) -> list[str]:
    """train.py arguments: the size's run, then the spec's settings. Only the final validation runs."""
    values: dict[str, object] = {
        **size.model.settings(),
        "batch_size": size.batch,
        "tokens": size.tokens,
        "warmup_tokens": size.warmup_tokens,
        "eval_every": 0,
        "eval_batches": TRAIN_EVAL_BATCHES,
        "ckpt_every": 0,
        "log_every": 10,
        "final_report": False,
        **dict(zip(("mix_text", "mix_image_text", "mix_audio_text"), DEFAULT_MIX, strict=True)),
        "seed": spec.seed,
        "out_dir": str(run_dir),
        **spec.settings,
    }
    return [f"--{k}={_arg(v)}" for k, v in values.items()]


def _arg(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training-step records, validation records) of a run's metrics.jsonl."""
    steps, vals = [], []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        (vals if "val" in r else steps).append(r)
    return steps, vals


def binned_curve(steps: Sequence[dict], horizon: float, bins: int = CURVE_BINS) -> dict[str, list[float]]:
    """Training loss (bits per token) averaged over equal token bins of [0, horizon]; empty bins dropped.

    Runs at different batches log different numbers of steps; averaging over the same token bins
    makes their curves comparable point by point (and averages out the per-step noise).
    """
    tokens = np.array([r["tokens"] for r in steps], dtype=float)
    loss = np.array([r["loss"] for r in steps], dtype=float) / LN2
    which = np.clip(np.ceil(tokens / horizon * bins).astype(int) - 1, 0, bins - 1)
    centers = (np.arange(bins) + 0.5) * horizon / bins
    keep = [b for b in range(bins) if (which == b).any()]
    return {"tokens": [float(centers[b]) for b in keep], "loss_bits": [float(loss[which == b].mean()) for b in keep]}


def nelbo_parts(model: Denoiser, data: data_lib.TriModalData, size: Size) -> dict:
    """Fixed-protocol NELBO (bits per token, validation split) of each part, its standard error, and loss_bits."""
    means, ses, totals = {}, {}, []
    for task in mdm.TASKS:
        est = evaluate.nelbo_bits(model, data, task, "val", size.eval_batches, size.eval_rows)
        totals.append(est["all"].mean)
        for part, (row_task, modality) in PARTS.items():
            if row_task == task:
                means[part], ses[part] = est[modality].mean, est[modality].se
    return {"nelbo_bits": means, "nelbo_se": ses, "loss_bits": float(np.mean(totals))}


def sweep(
    metric: Callable[[sample_lib.SamplerConfig], Mapping[str, float]],
    grid: Mapping[str, Sequence],
    base: sample_lib.SamplerConfig | None = None,
) -> list[dict]:
    """Run ``metric`` on every config of a grid of SamplerConfig fields; one row (config + metrics) each.

    grid maps field names to the values to try, e.g. ``{"steps": [16, 32], "temperature": [0.5, 1.0]}``
    (the Cartesian product, starting from ``base``). ``metric(cfg)`` generates with ``cfg`` and returns
    named numbers, e.g. ``{"accuracy": 0.9, "nfe": 40}``.
    """
    names = {f.name for f in dataclasses.fields(sample_lib.SamplerConfig)}
    if set(grid) - names:
        raise ValueError(f"unknown SamplerConfig fields in the grid: {sorted(set(grid) - names)}")
    base = base or sample_lib.SamplerConfig()
    rows = []
    for values in itertools.product(*grid.values()):
        cfg = dataclasses.replace(base, **dict(zip(grid, values, strict=True)))
        rows.append({**cfg.to_dict(), **metric(cfg)})
    return rows


def format_table(rows: Sequence[Mapping[str, object]]) -> str:
    """A Markdown table of rows of numbers and names (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows])


def study_sampler(size: Size, task: str, presets: Mapping[str, sample_lib.SamplerConfig] | None = None):
    """The sampler of the generation metrics: the task's preset, with ``size.gen_steps`` steps if set."""
    preset = (presets or sample_lib.PRESETS)[task]
    return dataclasses.replace(preset, steps=size.gen_steps or preset.steps)


# Study 6's choice of a step-by-step sampler per judged task (lab/STUDIES.md): study 7's reference
STEP_BY_STEP: dict[str, sample_lib.SamplerConfig] = {
    "t2i": sample_lib.SamplerConfig(sampler="ancestral", steps=32, temperature=0.5, guidance=1.5),
    "i2t": sample_lib.SamplerConfig(sampler="confidence", steps=32, temperature=0.0),
    "t2s": sample_lib.SamplerConfig(sampler="confidence", steps=32, temperature=0.5, guidance=1.5),
    "s2t": sample_lib.SamplerConfig(sampler="confidence", steps=32, temperature=0.0),
}


def task_metric(
    task: str, inf: Inference, data: data_lib.TriModalData, judges: evaluate.Judges, size: Size, seed: int
) -> Callable[[sample_lib.SamplerConfig], dict[str, float]]:
    """The ``sample.sweep`` callback of one judged task: generate with a config, return its numbers."""
    images, clips = data.pairs["image_text"]["val"], data.pairs["audio_text"]["val"]

    def metric(cfg: sample_lib.SamplerConfig) -> dict[str, float]:
        if task == "t2i":
            r = evaluate.text_to_image(inf, judges, cfg, size.per_digit, seed)
        elif task in ("i2t", "s2t"):
            pairs = images if task == "i2t" else clips
            r = evaluate.media_to_text(inf, pairs, task, cfg, seed, size.media_limit)
        elif task == "t2s":
            r = evaluate.text_to_speech(inf, judges, cfg, size.per_digit, seed)
        else:
            raise ValueError(f"no judge for task {task!r}; judged tasks are {JUDGED_TASKS}")
        speed = {k: r[k] for k in ("nfe", "row_nfe", "tokens", "seconds_per_sample")}
        return {"accuracy": float(r["accuracy"]), **speed}

    return metric


def evaluate_checkpoint(ckpt: Path, size: Size, generation: bool, seed: int) -> dict:
    """Parameter counts, fixed-protocol NELBO and, if asked, the judged generations of one checkpoint."""
    inf = load_for_inference(ckpt)
    cfg = inf.data_config
    data = shared_data(cfg)
    out = {
        "params_total": inf.model.num_parameters(),
        "params_body": inf.model.num_parameters(body_only=True),
        **nelbo_parts(inf.model, data, size),
    }
    if generation:
        judges = shared_judges(cfg)
        gen = {}
        for task in JUDGED_TASKS:
            r = task_metric(task, inf, data, judges, size, seed)(study_sampler(size, task))
            gen[f"{task}_accuracy"] = r["accuracy"]
        out["generation"] = gen
    return out


def _bits(val: Mapping[str, float]) -> dict[str, float]:
    return {k: v / LN2 for k, v in val.items()}


# ----------------------------------------------------------------------------------------------
# 3. The study context: where things go, running specs with skip-if-done, sampler sweeps
# ----------------------------------------------------------------------------------------------


@dataclass
class Context:
    size: Size
    out: Path
    runs: Path
    force: bool = False
    checkpoint: str | None = None  # study 6: sweep this checkpoint instead of training one

    def results(self, study: str) -> Results:
        return Results(self.out / f"{study}.jsonl")

    def run_dir(self, spec: RunSpec) -> Path:
        return self.runs / spec.study / self.size.name / spec.id

    def execute(self, specs: Sequence[RunSpec]) -> list[dict]:
        """Train and judge every spec not yet in the results file; return the records of all of them."""
        for i, spec in enumerate(specs, 1):
            results = self.results(spec.study)
            label = f"[{spec.study} {i}/{len(specs)}] {spec.id}"
            if not self.force and results.done(spec.id, self.size.name):
                say(f"{label}: done earlier, skipped")
                continue
            record = self.train_and_judge(spec)
            results.add(record)
            if "error" in record:
                say(f"{label}: FAILED ({record['error'][:120]})")
            else:
                say(
                    f"{label}: {record['loss_bits']:.3f} bits/token, {record['tokens']:,} tokens, "
                    f"{record['wall_s']:.1f} s training + {record['eval_s']:.1f} s judging"
                )
        ids = {s.id for s in specs}
        return [r for r in self.results(specs[0].study).records(self.size.name, "train") if r["id"] in ids]

    def train_and_judge(self, spec: RunSpec) -> dict:
        run_dir = self.run_dir(spec)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run: no stale metrics or checkpoint of an interrupted one
        run_dir.mkdir(parents=True)
        args = train_args(self.size, spec, run_dir)
        record: dict = {
            "study": spec.study,
            "id": spec.id,
            "kind": "train",
            "size": self.size.name,
            "seed": spec.seed,
            "variant": spec.variant,
            **spec.info,
            "args": args,
        }
        t0 = time.perf_counter()
        with (run_dir / "train.log").open("w") as log, contextlib.redirect_stdout(log), data_built_once():
            try:
                result = train.main(args)
            except SystemExit as e:
                if "non-finite loss" not in str(e):
                    raise
                return {**record, "error": str(e), "wall_s": time.perf_counter() - t0}
        record["wall_s"] = time.perf_counter() - t0
        steps, vals = read_metrics(run_dir / "metrics.jsonl")
        record.update(steps=result["step"], tokens=result["tokens"], val_bits=_bits(vals[-1]["val"]))
        if spec.curve:
            record["curve"] = binned_curve(steps, float(spec.settings.get("tokens", self.size.tokens)))
        t1 = time.perf_counter()
        record.update(evaluate_checkpoint(run_dir / "ckpt.pt", self.size, spec.generation, spec.seed))
        record["eval_s"] = time.perf_counter() - t1
        return record

    def checkpoint_of(self, spec: RunSpec) -> Path:
        """The spec's checkpoint, training it again if its file is gone (e.g. runs/ was cleaned)."""
        path = self.run_dir(spec) / "ckpt.pt"
        if not path.is_file():
            say(f"[{spec.study}] {spec.id}: checkpoint missing, training it again")
            self.results(spec.study).add(self.train_and_judge(spec))
        return path

    def sweep(
        self,
        study: str,
        checkpoint: Path,
        grid: Mapping[str, Sequence],
        seeds: Sequence[int],
        prefix: str = "",
        presets: Mapping[str, sample_lib.SamplerConfig] | None = None,
    ) -> list[dict]:
        """``sample.sweep`` of ``grid`` for every judged task and sampler seed; one line per (task, config, seed).

        Each task starts from its ``study_sampler`` (of ``presets``, default ``sample.PRESETS``). A (task, seed)
        whose lines all exist is skipped.
        """
        results, size = self.results(study), self.size.name
        bundle: tuple | None = None
        for seed, task in itertools.product(seeds, JUDGED_TASKS):
            configs = [dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values())]
            ids = [sweep_id(prefix, task, c, seed) for c in configs]
            if not self.force and all(results.done(i, size, checkpoint=str(checkpoint)) for i in ids):
                say(f"[{study}] sweep {prefix}{task} seed {seed}: done earlier, skipped")
                continue
            if bundle is None:
                inf = load_for_inference(checkpoint)
                cfg = inf.data_config
                bundle = (inf, shared_data(cfg), shared_judges(cfg))
            t0 = time.perf_counter()
            base = study_sampler(self.size, task, presets)
            rows = sweep(task_metric(task, *bundle, self.size, seed), grid, base)
            for row in rows:
                sampler = {k: row[k] for k in sample_lib.SamplerConfig().to_dict()}
                metrics = {k: v for k, v in row.items() if k not in sampler}
                run_id = sweep_id(prefix, task, {k: row[k] for k in grid}, seed)
                results.add(
                    {
                        "study": study,
                        "id": run_id,
                        "kind": "sample",
                        "size": size,
                        "seed": seed,
                        "task": task,
                        "checkpoint": str(checkpoint),
                        "sampler": sampler,
                        "metrics": metrics,
                    }
                )
            say(f"[{study}] sweep {prefix}{task} seed {seed}: {len(rows)} configs in {time.perf_counter() - t0:.1f} s")
        return [r for r in results.records(size, "sample") if r["checkpoint"] == str(checkpoint)]


def sweep_id(prefix: str, task: str, values: Mapping[str, object], seed: int) -> str:
    return prefix + task + "".join(f"_{k}{v}" for k, v in values.items()) + f"_s{seed}"


def say(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# 4. Statistics and fits
# ----------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (std 0 for one value; nan, nan for none finite)."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def spread(records: Sequence[dict], value: Callable[[dict], float]) -> dict:
    """{mean, std, seeds, values} of ``value`` over records (one per seed)."""
    vals = [value(r) for r in records]
    m, s = mean_std(vals)
    return {"mean": m, "std": s, "seeds": [r["seed"] for r in records], "values": vals}


def by(records: Sequence[dict], key: str | Callable[[dict], object]) -> dict[object, list[dict]]:
    """Records grouped by ``record[key]`` (or ``key(record)``), in first-seen order."""
    out: dict[object, list[dict]] = {}
    for r in records:
        out.setdefault(key(r) if callable(key) else r[key], []).append(r)
    return out


class FitError(ValueError):
    """A fit that the data cannot support (too few points, too little spread)."""


@dataclass(frozen=True)
class ScalingFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, fitted in log space (``fit_scaling_law``)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rms_log_residual: float
    points: int

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def compute_optimal(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimizing L on C = 6 N D.

        With D = C / (6N), dL/dN = 0 gives N^(alpha+beta) = (alpha A / (beta B)) (C/6)^beta, so
        N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)), D_opt = C / (6 N_opt).
        """
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (compute / 6) ** (self.beta / (self.alpha + self.beta))
        return n, compute / (6 * n)


MIN_SCALING_POINTS = 6  # five parameters and at least one degree of freedom


def fit_scaling_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float]) -> ScalingFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta: a grid over (alpha, beta), then least squares on log L.

    For fixed exponents the law is linear in (E, A, B) >= 0, so every point of a grid of exponents in
    [0.02, 2] gets its best (E, A, B) from a non-negative least squares on relative errors; the best
    grid point starts a bounded least-squares fit of all five parameters on log L. Raises FitError
    when the points cannot determine five parameters: fewer than MIN_SCALING_POINTS finite points, or
    fewer than two model sizes or two token budgets.
    """
    from scipy.optimize import least_squares, nnls

    pts = [(a, b, c) for a, b, c in zip(n, d, loss, strict=True) if all(math.isfinite(x) and x > 0 for x in (a, b, c))]
    sizes, budgets = len({p[0] for p in pts}), len({p[1] for p in pts})
    if len(pts) < MIN_SCALING_POINTS or sizes < 2 or budgets < 2:
        raise FitError(
            f"L(N, D) = E + A/N^alpha + B/D^beta has 5 parameters: it needs at least {MIN_SCALING_POINTS} finite "
            f"runs spanning >= 2 model sizes and >= 2 token budgets; got {len(pts)} runs, {sizes} sizes, "
            f"{budgets} budgets. Use a bigger --size or add models/budgets to the grid."
        )
    nn, dd, ll = (np.array(col, dtype=float) for col in zip(*pts, strict=True))
    # scale N and D to ~1 so that A and B stay moderate numbers during the search
    n0, d0 = float(np.exp(np.log(nn).mean())), float(np.exp(np.log(dd).mean()))
    u, v = nn / n0, dd / d0
    best = (math.inf, 0.0, 0.0, np.zeros(3))
    for alpha, beta in itertools.product(np.linspace(0.02, 2, 45), np.linspace(0.02, 2, 45)):
        design = np.stack([np.ones_like(u), u**-alpha, v**-beta], axis=1) / ll[:, None]
        coef, residual = nnls(design, np.ones_like(ll))
        if residual < best[0]:
            best = (residual, alpha, beta, coef)
    _, alpha0, beta0, coef = best
    floor = 1e-9 * ll.min()
    x0 = [math.log(max(c, floor)) for c in coef]
    lu, lv, target = np.log(u), np.log(v), np.log(ll)

    def residual(x: np.ndarray) -> np.ndarray:
        e, a, alpha, b, beta = x
        return np.log(np.exp(e) + np.exp(a - alpha * lu) + np.exp(b - beta * lv)) - target

    top = math.log(ll.max())
    lower, upper = (
        [math.log(floor) - 1, math.log(floor) - 1, 1e-3, math.log(floor) - 1, 1e-3],
        [top, top + 10, 3, top + 10, 3],
    )
    start = np.clip([x0[0], x0[1], alpha0, x0[2], beta0], np.array(lower) + 1e-9, np.array(upper) - 1e-9)
    fit = least_squares(residual, start, bounds=(lower, upper), x_scale="jac")
    e, a, alpha, b, beta = fit.x
    rms = float(np.sqrt(np.mean(fit.fun**2)))
    # undo the scaling: A / (N/n0)^alpha = (A n0^alpha) / N^alpha
    return ScalingFit(
        math.exp(e),
        float(math.exp(a) * n0**alpha),
        float(alpha),
        float(math.exp(b) * d0**beta),
        float(beta),
        rms,
        len(pts),
    )


@dataclass(frozen=True)
class CriticalBatch:
    """B_crit at one horizon: where the final loss leaves ``tolerance`` of the best loss (``estimate_critical_batch``).

    censored: no batch tried left the band, so B_crit is at least ``batch`` (the largest tried).
    """

    batch: float
    censored: bool
    best_loss: float


def estimate_critical_batch(
    batches: Sequence[float], losses: Sequence[float], tolerance: float = CRITICAL_TOLERANCE
) -> CriticalBatch:
    """The largest batch whose loss is within ``tolerance`` (relative) of the best loss over the batches.

    Walking up from the best batch, the first loss above best·(1 + tolerance) ends the band; B_crit
    is where the loss, interpolated linearly in log B between that batch and the one below, crosses
    the threshold (a diverged run, loss inf or nan, ends the band at the batch below it). Losses must
    be positive (bits per token).
    """
    if len(batches) != len(losses) or len(batches) < 2:
        raise ValueError(f"need at least two (batch, loss) pairs of equal length; got {len(batches)}, {len(losses)}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    order = np.argsort(batches)
    b = np.array(batches, dtype=float)[order]
    y = np.array([v if v is not None and math.isfinite(v) else math.inf for v in losses], dtype=float)[order]
    if not np.isfinite(y).any():
        raise ValueError("every loss is non-finite: no band to measure")
    i = int(np.argmin(y))
    best = float(y[i])
    threshold = best * (1 + tolerance)
    for j in range(i + 1, len(b)):
        if y[j] > threshold:
            if not math.isfinite(y[j]):
                return CriticalBatch(float(b[j - 1]), False, best)
            frac = (threshold - y[j - 1]) / (y[j] - y[j - 1])
            return CriticalBatch(float(math.exp(math.log(b[j - 1]) + frac * math.log(b[j] / b[j - 1]))), False, best)
    return CriticalBatch(float(b[-1]), True, best)


def horizon_exponent(horizons: Sequence[float], critical: Sequence[CriticalBatch]) -> tuple[float, float]:
    """(exponent, prefactor) of B_crit = prefactor · D^exponent, least squares on log-log, censored points dropped."""
    pts = [(d, c.batch) for d, c in zip(horizons, critical, strict=True) if not c.censored]
    if len({d for d, _ in pts}) < 2:
        raise FitError(
            f"the horizon exponent needs B_crit at >= 2 horizons; {len(pts)} of {len(critical)} horizons had a "
            "batch leave the tolerance band (try larger batches or shorter horizons)"
        )
    slope, intercept = np.polyfit(np.log([d for d, _ in pts]), np.log([c for _, c in pts]), 1)
    return float(slope), float(math.exp(intercept))


# ----------------------------------------------------------------------------------------------
# 5. Figures
# ----------------------------------------------------------------------------------------------


def new_figure(panels: int, width: float = 4.8, height: float = 3.7) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def save_figure(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def grouped_bars(ax: Axes, groups: Sequence[str], series: Mapping[str, Sequence[tuple[float, float]]]) -> None:
    """Bars of (mean, std) per group (x) and series (colour), std as error bars."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for k, (name, values) in enumerate(series.items()):
        means = [m for m, _ in values]
        stds = [s for _, s in values]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(x, groups, fontsize=8)
    ax.axhline(0, color="k", lw=0.6)
    ax.grid(axis="y", alpha=0.3)


def seeds_label(records: Sequence[dict]) -> str:
    seeds = sorted({r["seed"] for r in records})
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def relative_parts(groups: Mapping[object, list[dict]], reference: object) -> dict[str, list[tuple[float, float]]]:
    """Per variant, per part: NELBO relative to the reference variant, in % (mean, std over seeds)."""
    ref = {p: mean_std([r["nelbo_bits"][p] for r in groups[reference]])[0] for p in PARTS}
    return {
        str(v): [mean_std([100 * (r["nelbo_bits"][p] / ref[p] - 1) for r in recs]) for p in PARTS]
        for v, recs in groups.items()
    }


def generation_bars(ax: Axes, groups: Mapping[object, list[dict]], title: str) -> None:
    """Judged accuracy per task (x) and variant (colour)."""
    series = {
        str(v): [mean_std([r["generation"][f"{t}_accuracy"] for r in recs]) for t in JUDGED_TASKS]
        for v, recs in groups.items()
    }
    grouped_bars(ax, JUDGED_TASKS, series)
    ax.set_ylim(0, 1)
    ax.set_ylabel("judged accuracy (validation)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def part_table(groups: Mapping[object, list[dict]]) -> dict:
    """Summary rows: per variant, every part's NELBO, loss_bits and generation, each as mean/std/seeds."""
    out = {}
    for v, recs in groups.items():
        row = {p: spread(recs, lambda r, p=p: r["nelbo_bits"][p]) for p in PARTS}
        row["loss_bits"] = spread(recs, lambda r: r["loss_bits"])
        for key in recs[0].get("generation", {}):
            row[key] = spread(recs, lambda r, k=key: r["generation"][k])
        out[str(v)] = row
    return out


def print_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
    """Print {variant: {metric: {mean, std}}} as a markdown table (``sample.format_table``)."""
    rows = [
        {"variant": v, **{k: f"{m['mean']:.4g} ± {m['std']:.2g}" for k, m in metrics.items()}}
        for v, metrics in summary.items()
    ]
    say(format_table(rows))


def write_summary(ctx: Context, study: str, summary: dict) -> None:
    path = ctx.out / f"{study}_summary.json"
    body = strict_json({"study": study, "size": asdict(ctx.size), **summary})
    path.write_text(json.dumps(body, indent=1, allow_nan=False) + "\n")
    say(f"[{study}] wrote {ctx.out / (study + '.jsonl')}, {ctx.out / (study + '.png')}, {path}")


def strict_json(value: object) -> object:
    """``value`` with nan and inf floats as None and tuples as lists: standard JSON for the summary."""
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def ok(records: Sequence[dict]) -> list[dict]:
    """The records of runs that finished (no ``error``)."""
    return [r for r in records if "error" not in r]


# ----------------------------------------------------------------------------------------------
# 6. The studies
# ----------------------------------------------------------------------------------------------


def study_schedules(ctx: Context) -> dict:
    """1. Noise schedules: beta_t for training (per-part NELBO, generation) and, separately, for inference."""
    size = ctx.size
    specs = [
        RunSpec("schedules", f"train-{s}", seed, {"schedule": s}, generation=True, info={"schedule": s})
        for s in size.schedules
        for seed in size.seeds
    ]
    runs = ok(ctx.execute(specs))
    sampled = []
    for seed in size.seeds:  # inference schedules on the runs trained with the linear schedule
        ckpt = ctx.checkpoint_of(next(s for s in specs if s.variant == "train-linear" and s.seed == seed))
        sampled += ctx.sweep("schedules", ckpt, {"schedule": list(size.schedules)}, [seed], prefix="infer-")
    groups = by(runs, "schedule")
    fig, (a, b, c) = new_figure(3)
    if "linear" in groups:
        grouped_bars(a, list(PARTS), relative_parts(groups, "linear"))
    a.set_ylabel("NELBO vs linear-trained (%)")
    a.set_title(f"training schedule: held-out NELBO ({seeds_label(runs)})", fontsize=9)
    a.legend(fontsize=7)
    generation_bars(b, groups, "training schedule: generation (fixed sampler)")
    inference = {
        s: [
            mean_std([r["metrics"]["accuracy"] for r in sampled if r["task"] == t and r["sampler"]["schedule"] == s])
            for t in JUDGED_TASKS
        ]
        for s in size.schedules
    }
    grouped_bars(c, JUDGED_TASKS, inference)
    c.set_ylim(0, 1)
    c.set_ylabel("judged accuracy (validation)")
    c.set_title(f"inference schedule, linear-trained model ({seeds_label(sampled)})", fontsize=9)
    c.legend(fontsize=7)
    save_figure(fig, ctx.out / "schedules.png")
    summary = {
        "training": part_table(groups),
        "inference": {
            s: {
                t: spread(
                    [r for r in sampled if r["task"] == t and r["sampler"]["schedule"] == s],
                    lambda r: r["metrics"]["accuracy"],
                )
                for t in JUDGED_TASKS
            }
            for s in size.schedules
        },
    }
    print_table(summary["training"])
    print_table(summary["inference"])
    return summary


def study_sde(ctx: Context) -> dict:
    """2. SDE batch reparameterization: final loss and loss curves over physical batches, with and without the rule.

    The reference run is (sde_base_batch, shortest horizon) with train.py's settings. "with": the
    run passes --base_batch/--base_tokens, so train.py rescales lr, betas, eps, weight decay and EMA
    by kappa = (B/B_base)(D_base/D)^0.44. "without": the reference settings unchanged (kappa = 1),
    only the batch and horizon differ. At the reference point both are the same run, trained once.
    """
    size = ctx.size
    base_b, base_d = size.sde_base_batch, min(size.sde_horizons)
    seq_len = data_lib.DataConfig.seq_len
    specs = []
    for d, b, rule, seed in itertools.product(size.sde_horizons, size.sde_batches, ("with", "without"), size.seeds):
        if rule == "without" and (b, d) == (base_b, base_d):
            continue
        settings: dict[str, object] = {**size.sde_model.settings(), "batch_size": b, "tokens": d, "log_every": 1}
        kappa = 1.0
        if rule == "with":
            settings |= {"base_batch": base_b, "base_tokens": base_d}  # gamma: sde_batch.GAMMA
            kappa = sde_batch.kappa_of(b, d, base_b, base_d, sde_batch.GAMMA)
        info = {
            "horizon": d,
            "batch": b,
            "rule": rule,
            "kappa": kappa,
            "optimizer_steps": sde_batch.optimizer_steps(d, b, seq_len),
        }
        specs.append(RunSpec("sde", f"D{d:g}_B{b}_{rule}", seed, settings, curve=True, info=info))
    records = ctx.execute(specs)

    def rows(d: float, rule: str) -> list[dict]:
        """Runs at horizon d under ``rule``; the reference run counts for both rules."""
        return [r for r in records if r["horizon"] == d and (r["rule"] == rule or (r["batch"], d) == (base_b, base_d))]

    def loss_by_batch(d: float, rule: str) -> tuple[list[int], list[float], list[float]]:
        groups = by(sorted(rows(d, rule), key=lambda r: r["batch"]), "batch")
        stats = [mean_std([r.get("loss_bits", math.inf) for r in g]) for g in groups.values()]
        diverged = [any("error" in r for r in g) for g in groups.values()]  # one diverged seed: the batch diverged
        means = [math.inf if bad else m for (m, _), bad in zip(stats, diverged, strict=True)]
        return list(groups), means, [s for _, s in stats]

    critical: dict[str, dict[float, CriticalBatch]] = {"with": {}, "without": {}}
    for rule, d in itertools.product(critical, size.sde_horizons):
        bs, means, _ = loss_by_batch(d, rule)
        if np.isfinite(means).any():
            critical[rule][d] = estimate_critical_batch(bs, means)
    exponents: dict[str, object] = {}
    for rule, crit in critical.items():
        try:
            slope, pre = horizon_exponent(list(crit), list(crit.values()))
            exponents[rule] = {"exponent": slope, "prefactor": pre}
        except FitError as e:
            exponents[rule] = {"error": str(e)}
            say(f"[sde] {rule} the rule: {e}")
    distances = collapse_distances(records, size)

    fig, (a, b, c) = new_figure(3)
    plot_sde_curves(a, records, max(size.sde_horizons), size)
    for k, d in enumerate(size.sde_horizons):
        for rule, style in (("with", "-o"), ("without", "--s")):
            bs, means, stds = loss_by_batch(d, rule)
            means = [m if math.isfinite(m) else math.nan for m in means]  # diverged: a gap
            b.errorbar(
                bs, means, yerr=stds, fmt=style, color=f"C{k}", ms=4, capsize=2, label=f"D = {d:.3g}, {rule} rule"
            )
        if d in critical["with"]:
            b.axvline(critical["with"][d].batch, color=f"C{k}", ls=":", lw=1)
    b.set_xscale("log", base=2)
    b.set_xlabel("physical batch B (rows per step)")
    b.set_ylabel("held-out NELBO (bits/token)")
    b.set_title(f"final loss; dotted: B_crit (with rule, {CRITICAL_TOLERANCE:.0%} band)", fontsize=9)
    b.legend(fontsize=6)
    plot_critical(c, critical, exponents)
    fig.suptitle(f"SDE batch rule, reference B = {base_b}, D = {base_d:.3g} ({seeds_label(records)})", fontsize=10)
    save_figure(fig, ctx.out / "sde.png")
    summary = {
        "reference": {"batch": base_b, "tokens": base_d, "gamma": sde_batch.GAMMA},
        "tolerance": CRITICAL_TOLERANCE,
        "critical_batch": {rule: {f"{d:g}": asdict(c) for d, c in crit.items()} for rule, crit in critical.items()},
        "horizon_exponent": exponents,
        "paper_gamma": sde_batch.GAMMA,
        "curve_distance": distances,
        "final_loss": {
            f"D{d:g}_{rule}": dict(zip(map(str, loss_by_batch(d, rule)[0]), loss_by_batch(d, rule)[1], strict=True))
            for d in size.sde_horizons
            for rule in ("with", "without")
        },
    }
    say(
        "[sde] critical batch (with the rule): "
        + ", ".join(f"D={d:g}: {c.batch:.3g}{'+' if c.censored else ''}" for d, c in critical["with"].items())
    )
    for rule, fit in exponents.items():
        slope = f"{fit['exponent']:.3f}" if "exponent" in fit else "no fit"
        say(f"[sde] B_crit ~ D^slope {rule} the rule: slope {slope} (paper: gamma ~ {sde_batch.GAMMA})")
    return summary


def mean_curve(records: Sequence[dict]) -> dict[float, float]:
    """Bin centre -> loss averaged over the records (seeds) that have that bin."""
    acc: dict[float, list[float]] = {}
    for r in records:
        for t, v in zip(r["curve"]["tokens"], r["curve"]["loss_bits"], strict=True):
            acc.setdefault(round(t, 6), []).append(v)
    return {t: float(np.mean(v)) for t, v in sorted(acc.items())}


def collapse_distances(records: Sequence[dict], size: Size) -> dict[str, dict[str, float]]:
    """Mean |log2 loss - log2 loss_ref| over shared token bins; the reference is the smallest batch with the rule."""
    out: dict[str, dict[str, float]] = {}
    done = [r for r in records if "curve" in r]
    small = min(size.sde_batches)
    for d in size.sde_horizons:
        at_d = [r for r in done if r["horizon"] == d]
        ref = mean_curve([r for r in at_d if r["batch"] == small and r["rule"] == "with"])
        for (b, rule), recs in by(at_d, lambda r: (r["batch"], r["rule"])).items():
            curve = mean_curve(recs)
            shared = [t for t in curve if t in ref]
            if shared and (b, rule) != (small, "with"):
                dist = float(np.mean([abs(math.log2(curve[t] / ref[t])) for t in shared]))
                out.setdefault(f"D{d:g}", {})[f"B{b}_{rule}"] = dist
    return out


def plot_sde_curves(ax: Axes, records: Sequence[dict], horizon: float, size: Size) -> None:
    """Training loss against tokens at one horizon: solid with the rule, dashed without, colour = batch."""
    at_d = [r for r in records if r["horizon"] == horizon and "curve" in r]
    for k, b in enumerate(size.sde_batches):
        for rule, style in (("with", "-"), ("without", "--")):
            curve = mean_curve([r for r in at_d if r["batch"] == b and r["rule"] == rule])
            if curve:
                ax.plot(
                    list(curve),
                    list(curve.values()),
                    style,
                    color=f"C{k}",
                    lw=1.2,
                    label=f"B = {b}" if rule == "with" else None,
                )
    ax.set_xlabel("tokens")
    ax.set_ylabel("training NELBO (bits/token, binned)")
    ax.set_title(f"loss vs tokens at D = {horizon:.3g}: solid with rule, dashed without", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_critical(ax: Axes, critical: Mapping[str, Mapping[float, CriticalBatch]], exponents: Mapping) -> None:
    """B_crit against the horizon, log-log, with the fitted exponent and the paper's 0.44 for slope."""
    for k, (rule, crit) in enumerate(critical.items()):
        if not crit:
            continue
        ds = list(crit)
        for d in ds:
            c = crit[d]
            ax.plot([d], [c.batch], "^" if c.censored else "o", color=f"C{k}", ms=6)
        fit = exponents.get(rule, {})
        label = f"{rule} rule: " + (f"slope {fit['exponent']:.2f}" if "exponent" in fit else "no fit")
        if "exponent" in fit:
            grid = np.geomspace(min(ds), max(ds), 20)
            ax.plot(grid, fit["prefactor"] * grid ** fit["exponent"], "-", color=f"C{k}", label=label)
        else:
            ax.plot([], [], "o", color=f"C{k}", label=label)
    pts = [(d, c.batch) for d, c in critical.get("with", {}).items()]
    if pts:
        d0, b0 = pts[0]
        grid = np.geomspace(min(d for d, _ in pts), max(d for d, _ in pts), 20)
        ax.plot(grid, b0 * (grid / d0) ** sde_batch.GAMMA, "k:", label=f"slope {sde_batch.GAMMA} (paper)")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("horizon D (tokens)")
    ax.set_ylabel("critical batch B_crit (rows)")
    ax.set_title("B_crit vs horizon (triangles: censored, >= largest B)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


def study_antimask(ctx: Context) -> dict:
    """3. Anti-masking against plain masking at equal compute: same rows per step, same tokens, same model.

    With anti-masking half of a step's rows are the complements of the other half (half as many
    distinct sequences, every token supervised once per pair); without it every row is a new sequence.
    """
    size = ctx.size
    specs = [
        RunSpec("antimask", name, seed, {"anti_masking": flag}, generation=True, info={"anti_masking": flag})
        for name, flag in (("anti", True), ("plain", False))
        for seed in size.seeds
    ]
    runs = ok(ctx.execute(specs))
    groups = {("anti-masking" if k else "plain masking"): v for k, v in by(runs, "anti_masking").items()}
    plain = {r["seed"]: r for r in groups.get("plain masking", [])}
    paired = [(r, plain[r["seed"]]) for r in groups.get("anti-masking", []) if r["seed"] in plain]
    fig, (a, b) = new_figure(2)
    for k, part in enumerate(PARTS):
        diffs = [x["nelbo_bits"][part] - y["nelbo_bits"][part] for x, y in paired]
        m, s = mean_std(diffs)
        a.bar(k, m, 0.6, yerr=s, capsize=3, color="C0", alpha=0.6)
        a.plot([k] * len(diffs), diffs, "k.", ms=5)
    a.set_xticks(range(len(PARTS)), list(PARTS), fontsize=8)
    a.axhline(0, color="k", lw=0.6)
    a.set_ylabel("NELBO anti - plain (bits/token; < 0: anti better)")
    a.set_title(f"held-out NELBO, paired by seed (dots: {seeds_label(runs)})", fontsize=9)
    a.grid(axis="y", alpha=0.3)
    generation_bars(b, groups, "generation (fixed sampler)")
    save_figure(fig, ctx.out / "antimask.png")
    summary = {
        "parts": part_table(groups),
        "paired_difference_bits": {
            p: spread([x for x, _ in paired], lambda r, p=p: r["nelbo_bits"][p] - plain[r["seed"]]["nelbo_bits"][p])
            for p in PARTS
        },
    }
    print_table(summary["parts"])
    return summary


def study_scaling(ctx: Context) -> dict:
    """4. Scaling: fit L(N, D) over a grid of model sizes and token budgets; the compute-optimal D/N.

    N counts the body's parameters (the transformer without embedding and unembedding, as Kaplan et
    al.); L is loss_bits; each point is the mean over seeds. C = 6 N D.
    """
    size = ctx.size
    specs = [
        RunSpec(
            "scaling", f"{m.label}_D{d:g}", seed, {**m.settings(), "tokens": d}, info={"model": m.label, "horizon": d}
        )
        for m in size.scaling_models
        for d in size.scaling_tokens
        for seed in size.seeds
    ]
    runs = ok(ctx.execute(specs))
    points = []
    for (model, d), recs in by(runs, lambda r: (r["model"], r["horizon"])).items():
        m, s = mean_std([r["loss_bits"] for r in recs])
        points.append(
            {
                "model": model,
                "N": recs[0]["params_body"],
                "N_total": recs[0]["params_total"],
                "D": d,
                "loss_bits": m,
                "std": s,
                "seeds": [r["seed"] for r in recs],
            }
        )
    summary: dict = {"points": points}
    fit = None
    try:
        fit = fit_scaling_law([p["N"] for p in points], [p["D"] for p in points], [p["loss_bits"] for p in points])
        compute = max(6 * p["N"] * p["D"] for p in points)
        n_opt, d_opt = fit.compute_optimal(compute)
        summary["fit"] = {
            **asdict(fit),
            "compute": compute,
            "N_opt": n_opt,
            "D_opt": d_opt,
            "tokens_per_parameter": d_opt / n_opt,
        }
        say(
            f"[scaling] L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f} "
            f"(rms log residual {fit.rms_log_residual:.3g}); at C = {compute:.3g}: N_opt = {n_opt:.3g}, "
            f"D_opt = {d_opt:.3g}, D/N = {d_opt / n_opt:.3g}"
        )
    except FitError as e:
        summary["fit_error"] = str(e)
        say(f"[scaling] {e}")
    plot_scaling(ctx, points, fit, summary, seeds_label(runs))
    return summary


def scaling_series(ax: Axes, pts: Sequence[dict], x: str, marker: str, color: str, label: str, line) -> None:
    """One series of the scaling figure: seed means with their spread against ``x``, and the fit's line."""
    ax.errorbar(
        [p[x] for p in pts],
        [p["loss_bits"] for p in pts],
        yerr=[p["std"] for p in pts],
        fmt=marker,
        color=color,
        ms=4,
        capsize=2,
        label=label,
    )
    if line is not None:
        ax.plot(*line, "-", color=color, lw=1)


def plot_scaling(ctx: Context, points: Sequence[dict], fit: ScalingFit | None, summary: Mapping, seeds: str) -> None:
    """Loss against D per model and against N per budget, points with seed spreads, lines from the fit."""
    fig, (a, b) = new_figure(2)
    models = list(dict.fromkeys(p["model"] for p in points))
    budgets = sorted({p["D"] for p in points})
    n_range = np.geomspace(min(p["N"] for p in points), max(p["N"] for p in points), 30)
    d_range = np.geomspace(min(budgets), max(budgets), 30)
    for k, model in enumerate(models):
        pts = sorted((p for p in points if p["model"] == model), key=lambda p: p["D"])
        n = pts[0]["N"]
        line = (d_range, fit.loss(n, d_range)) if fit is not None else None
        scaling_series(a, pts, "D", "o", f"C{k}", f"{model} (N = {n:.3g})", line)
    for k, d in enumerate(budgets):
        pts = sorted((p for p in points if p["D"] == d), key=lambda p: p["N"])
        line = (n_range, fit.loss(n_range, d)) if fit is not None else None
        scaling_series(b, pts, "N", "s", f"C{k}", f"D = {d:.3g}", line)
    for ax, xlabel in ((a, "tokens D"), (b, "body parameters N")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out NELBO (bits/token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if fit is not None:
        f = summary["fit"]
        text = (
            f"L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.2f} + {fit.B:.3g}/D^{fit.beta:.2f}\n"
            f"rms log residual {fit.rms_log_residual:.3f}, {fit.points} points\n"
            f"at C = {f['compute']:.2g}: D/N = {f['tokens_per_parameter']:.3g}"
        )
    else:
        text = "no fit: " + summary.get("fit_error", "")[:90]
    b.set_title(text, fontsize=8)
    a.set_title(f"scaling grid ({seeds}); lines: the fit", fontsize=9)
    save_figure(fig, ctx.out / "scaling.png")


def mixture_label(mix: Sequence[float]) -> str:
    total = sum(mix)
    return "t{:.2f}-i{:.2f}-a{:.2f}".format(*(m / total for m in mix))


def study_mixing(ctx: Context) -> dict:
    """5. Modality mixing ratios: the share of text / image-text / audio-text rows, and each modality."""
    size = ctx.size
    specs = [
        RunSpec(
            "mixing",
            mixture_label(mix),
            seed,
            {"mix_text": mix[0], "mix_image_text": mix[1], "mix_audio_text": mix[2]},
            generation=True,
            info={"mixture": mixture_label(mix)},
        )
        for mix in size.mixtures
        for seed in size.seeds
    ]
    runs = ok(ctx.execute(specs))
    groups = by(runs, "mixture")
    reference = mixture_label(size.mixtures[0])
    fig, (a, b) = new_figure(2, width=5.4)
    if reference in groups:
        grouped_bars(a, list(PARTS), relative_parts(groups, reference))
    a.set_ylabel(f"NELBO vs mixture {reference} (%)")
    a.set_title(f"held-out NELBO by mixture (text-image-audio shares; {seeds_label(runs)})", fontsize=9)
    a.legend(fontsize=7)
    generation_bars(b, groups, "generation (fixed sampler)")
    save_figure(fig, ctx.out / "mixing.png")
    summary = {"reference": reference, "parts": part_table(groups)}
    print_table(summary["parts"])
    return summary


def study_inference(ctx: Context) -> dict:
    """6. Inference defaults: steps x temperature x guidance per judged task, through ``sample.sweep``.

    The checkpoint is --checkpoint, or a run of the size's model trained here for inference_tokens.
    The seeds are the sampler's (one model): the spread is sampling noise, not training noise.
    """
    size, ckpt = ctx.size, inference_checkpoint(ctx)
    grid = {
        "sampler": list(size.inference_samplers),
        "steps": list(size.inference_steps),
        "temperature": list(size.inference_temperatures),
        "guidance": list(size.inference_guidance),
    }
    rows = ctx.sweep("inference", ckpt, grid, size.seeds)
    fig, axes = new_figure(len(JUDGED_TASKS), width=4.0)
    best: dict[str, dict] = {}
    for ax, task in zip(axes, JUDGED_TASKS, strict=True):
        task_rows = [r for r in rows if r["task"] == task]
        configs = by(
            task_rows, lambda r: (r["sampler"]["sampler"], r["sampler"]["temperature"], r["sampler"]["guidance"])
        )
        for k, ((kind, temp, w), recs) in enumerate(configs.items()):
            per_steps = by(sorted(recs, key=lambda r: r["sampler"]["steps"]), lambda r: r["sampler"]["steps"])
            steps = list(per_steps)
            stats = [mean_std([r["metrics"]["accuracy"] for r in g]) for g in per_steps.values()]
            ax.errorbar(
                steps,
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                ms=3,
                capsize=2,
                color=f"C{k % 10}",
                ls="-" if kind == "ancestral" else "--",
                label=f"{kind}, T = {temp:g}, w = {w:g}",
            )
            for st, (m, s) in zip(steps, stats, strict=True):
                nfe = float(np.mean([r["metrics"]["nfe"] for r in per_steps[st]]))
                cand = {
                    "sampler": kind,
                    "steps": st,
                    "temperature": temp,
                    "guidance": w,
                    "accuracy": m,
                    "std": s,
                    "nfe": nfe,
                }
                if task not in best or (m, -nfe) > (best[task]["accuracy"], -best[task]["nfe"]):
                    best[task] = cand
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1)
        ax.set_xlabel("sampler steps")
        ax.set_ylabel("judged accuracy (validation)")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"inference sweep of {ckpt} (sampler {seeds_label(rows)}; linear schedule)", fontsize=9)
    save_figure(fig, ctx.out / "inference.png")
    say("[inference] best config per task (max mean accuracy, then fewest network evaluations):")
    say(format_table([{"task": t, **b} for t, b in best.items()]))
    return {"checkpoint": str(ckpt), "grid": grid, "best": best}


def inference_checkpoint(ctx: Context) -> Path:
    """--checkpoint, or the run of the size's model that study 6 trains (trained here if missing)."""
    if ctx.checkpoint:
        ckpt = Path(ctx.checkpoint)
        if not ckpt.is_file():
            raise FileNotFoundError(f"--checkpoint {ckpt} does not exist")
        return ckpt
    spec = RunSpec("inference", "train", ctx.size.seeds[0], {"tokens": ctx.size.inference_tokens})
    ctx.execute([spec])
    return ctx.checkpoint_of(spec)


def study_parallel(ctx: Context) -> dict:
    """7. Parallel decoding: judged quality against network evaluations per task, for the threshold sampler
    (``sample.threshold_step``) at each threshold, with and without guidance, next to the task's step-by-step
    sampler (``STEP_BY_STEP``, study 6's choice).

    The threshold runs keep that sampler's temperature, with a cap of 64 steps that no row reaches; guidance is 0
    or its weight (w != 0 doubles the passes of a step). Cost is per row: ``row_nfe`` counts the passes
    that carried a row, so the rows a batch finished early do not count; ``tokens`` are the positions a row
    generated. The chosen setting of a task is the one with the fewest row NFE whose mean accuracy is within
    1 point (0.01) of the step-by-step sampler's.
    """
    size, ckpt = ctx.size, inference_checkpoint(ctx)
    preset = ctx.sweep("parallel", ckpt, {}, size.seeds, prefix="preset-", presets=STEP_BY_STEP)
    weights = sorted({0.0, *(STEP_BY_STEP[t].guidance for t in JUDGED_TASKS)})
    grid = {"sampler": ["threshold"], "threshold": list(size.parallel_thresholds), "guidance": weights, "steps": [64]}
    rows = ctx.sweep("parallel", ckpt, grid, size.seeds, prefix="threshold-", presets=STEP_BY_STEP)
    fig, axes = new_figure(len(JUDGED_TASKS), width=4.0)
    chosen: dict[str, dict] = {}
    for ax, task in zip(axes, JUDGED_TASKS, strict=True):
        base = [r["metrics"] for r in preset if r["task"] == task and r["id"].startswith("preset-")]
        ref = {k: float(np.mean([m[k] for m in base])) for k in ("accuracy", "row_nfe", "tokens")}
        points = []
        mine = [r for r in rows if r["task"] == task and r["id"].startswith("threshold-")]
        for (w, tau), recs in sorted(by(mine, lambda r: (r["sampler"]["guidance"], r["sampler"]["threshold"])).items()):
            acc, std = mean_std([r["metrics"]["accuracy"] for r in recs])
            nfe = float(np.mean([r["metrics"]["row_nfe"] for r in recs]))
            points.append({"threshold": tau, "guidance": w, "accuracy": acc, "std": std, "row_nfe": nfe})
        for w in weights:
            line = [p for p in points if p["guidance"] == w]
            xs, ys, errs = ([p[k] for p in line] for k in ("row_nfe", "accuracy", "std"))
            ax.errorbar(xs, ys, yerr=errs, marker="o", ms=3, capsize=2, label=f"threshold sampler, guidance {w:g}")
            for p in line:
                ax.annotate(f"{p['threshold']:g}", (p["row_nfe"], p["accuracy"]), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")  # fmt: skip
        ax.scatter([ref["row_nfe"]], [ref["accuracy"]], marker="*", s=80, color="C3", label="step-by-step sampler")
        ax.axvline(ref["tokens"] / 3, color="gray", ls=":", lw=1, label="3 tokens per NFE")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1)
        ax.set_xlabel("network evaluations per row (log)")
        ax.set_ylabel("judged accuracy (validation)")
        ax.set_title(f"{task} ({ref['tokens']:.0f} generated positions)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        good = [p for p in points if p["accuracy"] >= ref["accuracy"] - 0.01 - 1e-9]
        pick = min(good, key=lambda p: p["row_nfe"]) if good else max(points, key=lambda p: p["accuracy"])
        chosen[task] = {**pick, "within_1_point": bool(good), "step_accuracy": ref["accuracy"],
                        "step_row_nfe": ref["row_nfe"], "tokens": ref["tokens"],
                        "tokens_per_nfe": ref["tokens"] / pick["row_nfe"]}  # fmt: skip
    fig.suptitle(f"parallel decoding on {ckpt} (sampler {seeds_label(rows)}): quality against NFE", fontsize=9)
    save_figure(fig, ctx.out / "parallel.png")
    say("[parallel] chosen setting per task (fewest row NFE within 1 point of the step-by-step accuracy):")
    say(format_table([{"task": t, **c} for t, c in chosen.items()]))
    return {"checkpoint": str(ckpt), "thresholds": list(size.parallel_thresholds), "guidance": weights,
            "chosen": chosen}  # fmt: skip


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "schedules": study_schedules,
    "sde": study_sde,
    "antimask": study_antimask,
    "scaling": study_scaling,
    "mixing": study_mixing,
    "inference": study_inference,
    "parallel": study_parallel,
}


# ----------------------------------------------------------------------------------------------
# 7. Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="studies.py",
        description="Run the design-space studies on the tiny tri-modal setting (results: JSONL, PNG, summary).",
    )
    p.add_argument("study", choices=(*STUDIES, "all"), help="which study; 'all' runs every study in turn")
    p.add_argument("--size", choices=tuple(SIZES), default="quick", help="smoke (CI, seconds), quick, full")
    p.add_argument("--out", default="lab/studies", help="where <study>.jsonl, .png and _summary.json go")
    p.add_argument("--runs", default="runs/studies", help="where the training runs go")
    p.add_argument("--force", action="store_true", help="rerun runs whose results already exist")
    p.add_argument("--checkpoint", default=None, help="inference, parallel: sweep this checkpoint, not a new run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ctx = Context(SIZES[args.size], Path(args.out), Path(args.runs), args.force, args.checkpoint)
    ctx.out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for study in STUDIES if args.study == "all" else (args.study,):
        t0 = time.perf_counter()
        say(f"== study {study} (size {args.size}) ==")
        summaries[study] = RUNNERS[study](ctx)
        write_summary(ctx, study, summaries[study])
        say(f"== study {study} finished in {time.perf_counter() - t0:.1f} s ==")
    return summaries


if __name__ == "__main__":
    main()
