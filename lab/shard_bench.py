"""Training from a large shard set: peak memory independent of the data's size, and a loader far faster
than the step it feeds.

    python -m lab.shard_bench                     # a 2 GB set under /tmp (~5 min on 2 CPU cores, 2.2 GB of disk)
    python -m lab.shard_bench --gb 0.01 --steps 3 # the same on a small set (what the tests run)
    python -m lab.shard_bench --markdown          # also write the table into lab/BENCHMARKS.md

What it does, in order:

1. ``python train.py --data=DIR --prepare_only``: the embedded default data prepared as a shard set.
2. The text task's training stream (``text/train.npy``) replicated end to end until the set holds ``--gb``
   gigabytes: a real set of that size has the same layout, and the batches draw windows from all of it.
3. The loader alone: ``data.BatchIterator.batch`` of the default run reading the set, sequences per second.
4. ``python train.py --data=DIR --max_steps=S`` under ``/usr/bin/time -v``, twice: from the small set prepared in
   step 1 and from the replicated one; the peak resident memory of each, and the rows per second the step consumes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import shards  # noqa: E402
import train  # noqa: E402
from data import BatchIterator  # noqa: E402
from lab.bench import cpu_model  # noqa: E402

BEGIN, END = "<!-- shard_bench.py -->", "<!-- end of shard_bench.py -->"


def prepare(folder: Path) -> float:
    """The default data as a shard set at ``folder``; the seconds it took."""
    t0 = time.perf_counter()
    run([sys.executable, str(ROOT / "train.py"), f"--data={folder}", "--prepare_only"])
    return time.perf_counter() - t0


def replicate_text(small: Path, big: Path, gb: float) -> int:
    """A copy of the shard set ``small`` at ``big`` whose text training stream is repeated to ``gb`` GB in all."""
    shutil.copytree(small, big)
    stream = np.load(small / "text" / "train.npy", mmap_mode="r", allow_pickle=False)
    others = sum(f.stat().st_size for f in big.rglob("*") if f.is_file()) - stream.nbytes
    copies = max(1, int(np.ceil((gb * 1e9 - others) / stream.nbytes)))
    path = big / "text" / "train.npy"
    out = np.lib.format.open_memmap(path.with_name("train.npy.tmp"), "w+", stream.dtype, (copies * len(stream),))
    for i in range(copies):
        out[i * len(stream) : (i + 1) * len(stream)] = stream
    out.flush()
    del out
    path.with_name("train.npy.tmp").replace(path)
    return sum(f.stat().st_size for f in big.rglob("*") if f.is_file())


def loader_rows_per_s(folder: Path, steps: int) -> float:
    """Sequences per second that ``BatchIterator.batch`` of the default run delivers from the set."""
    cfg = train.TrainConfig()
    data = shards.open_shards(folder)
    rows = cfg.batch_size // (2 if cfg.anti_masking else 1)
    it = BatchIterator(data, "train", rows, cfg.ratios, cfg.seed, cfg.cond_keep, cfg.cond_drop, cfg.cond_media)
    it.batch(0)  # the first touch of the maps
    t0 = time.perf_counter()
    for k in range(1, steps + 1):
        it.batch(k)
    return steps * rows / (time.perf_counter() - t0)


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def train_run(folder: Path, out: Path, steps: int) -> dict:
    """Peak RSS (MB) of ``train.py`` from the set, and the sequences per second its steps consume."""
    cmd = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "train.py"), f"--data={folder}", f"--out_dir={out}"]
    log = run([*cmd, f"--max_steps={steps}", "--eval_every=0", "--final_report=false", f"--log_every={steps}"])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1))
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    cfg = train.TrainConfig()
    sequences = cfg.batch_size // (2 if cfg.anti_masking else 1)
    seq_len = json.loads((out / "config.json").read_text())["data"]["seq_len"]
    steps_per_s = last["tokens_per_s"] / (cfg.batch_size * seq_len)
    return {"rss_mb": rss_kb / 1024, "rows_per_s": steps_per_s * sequences}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0, help="size of the replicated shard set, in GB")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (after start-up)")
    p.add_argument("--loader_steps", type=int, default=300, help="batches the loader draws for its timing")
    p.add_argument("--work", default="/tmp/trimodal-shard-bench", help="a scratch folder (removed first)")
    p.add_argument("--markdown", action="store_true", help="write the table into lab/BENCHMARKS.md")
    a = p.parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    small, big = work / "small", work / "big"
    seconds = prepare(small)
    small_bytes = sum(f.stat().st_size for f in small.rglob("*") if f.is_file())
    big_bytes = replicate_text(small, big, a.gb)
    loader = loader_rows_per_s(big, a.loader_steps)
    runs = {"small": train_run(small, work / "run-small", a.steps), "big": train_run(big, work / "run-big", a.steps)}
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "command": "python -m lab.shard_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "prepare_s": seconds,
        "small_gb": small_bytes / 1e9,
        "big_gb": big_bytes / 1e9,
        "loader_rows_per_s": loader,
        "runs": runs,
    }
    table = markdown(result)
    print(table)
    if a.markdown:
        path = ROOT / "lab" / "BENCHMARKS.md"
        text = path.read_text()
        block = f"{BEGIN}\n{table}{END}\n"
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n", block, text, flags=re.S)
        path.write_text(text if BEGIN in text else text.rstrip("\n") + "\n\n" + block)
    shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(r: dict) -> str:
    small, big = r["runs"]["small"], r["runs"]["big"]
    ratio = r["loader_rows_per_s"] / big["rows_per_s"]
    return (
        "## Training from a large shard set\n\n"
        f"{r['date']}, {r['cpu']}, `{r['command']}`. The default data prepared as a shard set in "
        f"{r['prepare_s']:.0f} s ({r['small_gb'] * 1e3:.0f} MB), then its text training stream replicated to "
        f"{r['big_gb']:.2f} GB; `train.py --data` (the tiny default run) from each, under `/usr/bin/time -v`.\n\n"
        "| shard set | size on disk | peak RSS of train.py | sequences/s the step consumes |\n|---|---|---|---|\n"
        f"| prepared default | {r['small_gb'] * 1e3:.0f} MB | {small['rss_mb']:.0f} MB | {small['rows_per_s']:,.0f} |\n"
        f"| replicated | {r['big_gb']:.2f} GB | {big['rss_mb']:.0f} MB | {big['rows_per_s']:,.0f} |\n\n"
        "| target | measured | status |\n|---|---|---|\n"
        f"| peak RSS < 1.5 GB from a >= 2 GB set | {big['rss_mb']:.0f} MB from {r['big_gb']:.2f} GB | "
        f"{'pass' if big['rss_mb'] < 1536 and r['big_gb'] >= 2 else 'miss'} |\n"
        f"| loader >= 20x the rows/s the step consumes | {r['loader_rows_per_s']:,.0f} sequences/s, "
        f"{ratio:.0f}x | {'pass' if ratio >= 20 else 'miss'} |\n\n"
    )


if __name__ == "__main__":
    main()
