"""The spread of the default run over seeds: ``python train.py`` once per seed, then the mean and the worst.

Each seed runs in a fresh process (``train.py --seed=S --out_dir=OUT/seed<S>`` plus any train.py
options given after ``--``), one after the other, so each has the machine to itself; its wall time
includes start-up, data, training and the final report, and its peak memory is the process's peak
RSS. The table (``OUT/seeds.md``, also printed) gives every seed, the mean and the worst (the lowest
accuracy, the highest NELBO, the longest time, the largest peak). A seed already in ``OUT/seeds.json``
with the same command is read back, so seeds can be added one at a time.

    python -m lab.seeds --seeds 0,1,2 --out runs/seeds
    python -m lab.seeds --seeds 0,1,2 --out runs/seeds_ar -- --objective=ar   # the AR twin's spread
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lab.bench import cpu_model

ROOT = Path(__file__).resolve().parent.parent

# (column, path in report.json, higher is better)
COLUMNS = (
    ("t2i", ("generation", "t2i", "accuracy"), True),
    ("captioning", ("generation", "i2t", "accuracy"), True),
    ("recognition", ("generation", "s2t", "accuracy"), True),
    ("t2s", ("generation", "t2s", "accuracy"), True),
    ("text NELBO (bits/token)", ("likelihood", "text_bits_per_token"), False),
)


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    """train.py in a fresh process; its wall time, peak RSS (GB) and final report."""
    run_dir = out / f"seed{seed}"
    cmd = [sys.executable, "train.py", f"--seed={seed}", f"--out_dir={run_dir}", *extra]
    print(" ".join(cmd), flush=True)
    start = time.time()
    with (out / f"seed{seed}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"seed {seed}: train.py failed (status {status}); see {out / f'seed{seed}.log'}")
    report = json.loads((run_dir / "report" / "report.json").read_text())
    return {"seed": seed, "minutes": (time.time() - start) / 60, "peak_gb": usage.ru_maxrss / 2**20, "report": report}


def value(report: dict, path: tuple[str, ...]) -> float:
    for key in path:
        report = report[key]
    return float(str(report).split(" ")[0])  # likelihoods are stored as "mean ± se"


def table(runs: list[dict]) -> str:
    """Every seed, then the mean and the worst of each column."""
    head = ["seed", *(c for c, _, _ in COLUMNS), "minutes", "peak GB"]
    cols = [[value(r["report"], p) for r in runs] for _, p, _ in COLUMNS]
    cols += [[r["minutes"] for r in runs], [r["peak_gb"] for r in runs]]
    up = [u for _, _, u in COLUMNS] + [False, False]  # time and memory: the worst is the largest
    digits = [3] * len(COLUMNS) + [1, 2]
    rows = [[str(r["seed"]), *(f"{c[i]:.{n}f}" for c, n in zip(cols, digits, strict=True))] for i, r in enumerate(runs)]
    rows.append(["mean", *(f"{sum(c) / len(c):.{n}f}" for c, n in zip(cols, digits, strict=True))])
    worst = [min(c) if u else max(c) for c, u in zip(cols, up, strict=True)]
    rows.append(["worst", *(f"{w:.{n}f}" for w, n in zip(worst, digits, strict=True))])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--out", default="runs/seeds", help="one folder per seed, the logs and the table")
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = (ROOT / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python train.py", *extra])
    saved = out / "seeds.json"
    done = {r["seed"]: r for r in json.loads(saved.read_text()) if r["command"] == command} if saved.exists() else {}
    runs = []
    for seed in map(int, a.seeds.split(",")):  # a seed already run with this command is read back, not rerun
        if seed in done and (report := out / f"seed{seed}" / "report" / "report.json").exists():
            runs.append({**done[seed], "report": json.loads(report.read_text())})
        else:
            runs.append({**run_seed(seed, out, extra), "command": command})
            kept = [r for r in done.values() if r["seed"] not in {x["seed"] for x in runs}]
            saved.write_text(json.dumps(kept + [{k: v for k, v in r.items() if k != "report"} for r in runs]))
    text = f"`{command}` on {cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n\n"
    text += table(runs) + "\n"
    (out / "seeds.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
