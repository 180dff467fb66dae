"""The per-module search: its draws stay in their ranges, its options reach train.py's table, and the
smoke search runs end to end (rungs that halve, the default in every rung, a resumed search reruns nothing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import train
from lab import module_search as ms


def test_draws_are_log_uniform_in_their_ranges_and_seeded() -> None:
    configs = ms.draw(400, seed=3)
    assert configs == ms.draw(400, seed=3) and configs != ms.draw(400, seed=4)
    for key, (lo, hi) in ms.SPACE.items():
        logs = [math.log(c[key]) for c in configs]
        assert all(math.log(lo) <= v <= math.log(hi) for v in logs), key
        mid = (math.log(lo) + math.log(hi)) / 2  # log-uniform: half the draws below the log-midpoint
        assert 0.4 < sum(v < mid for v in logs) / len(logs) < 0.6, key


def test_a_configuration_becomes_the_tables_rows_and_the_depth_factor() -> None:
    config = ms.draw(1, seed=0)[0]
    options = ms.settings(config)
    table = train.module_table(options["modules"])
    assert table["embedding"].lr == pytest.approx(config["embedding.lr"], rel=1e-3)
    assert table["mlp_gate"].eps == pytest.approx(config["mlp_gate.eps"], rel=1e-3)
    assert table["norms"].wd == 0.0 and ms.settings({}) == {}, "unsearched entries keep the table's defaults"
    depth = ms.lr_by_depth(config, 4)
    assert depth["attn_out"][-1] == pytest.approx(table["attn_out"].lr * float(options["depth_factor"]), rel=1e-3)


def test_the_smoke_search_halves_its_rungs_and_resumes(tmp_path: Path) -> None:
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--size=smoke", f"--out={out}", f"--runs={runs}"]
    summary = ms.main(argv)
    s = ms.SEARCHES["smoke"]
    sizes = [len(r["loss_bits"]) for r in summary["rungs"]]
    assert sizes == [s.configs + 1, 2], "every draw and the default, then the best third and the default"
    assert all("default" in r["loss_bits"] for r in summary["rungs"])
    assert summary["best"]["name"] in summary["rungs"][-1]["loss_bits"]
    assert set(summary["confirm_loss_bits"]) == {0, *s.confirm_seeds}, "the search's seed and the confirming ones"
    named = {summary["best"]["name"], *ms.FOLLOWUPS}
    assert {n: len(gaps) for n, gaps in summary["minus_default"].items()} == dict.fromkeys(
        named, 1 + len(s.confirm_seeds)
    )
    assert set(summary["sensitivity_first_rung"]) == set(ms.SPACE)
    assert all(-1 <= r <= 1 for r in summary["sensitivity_first_rung"].values())
    assert set(summary["median_sqrt_v_default_first_rung"]) == set(train.MODULE_TABLE)
    lines = (out / "module_search.jsonl").read_text().splitlines()
    n_named = 2 + len(ms.FOLLOWUPS)  # the default, the best and the single changes
    runs = s.configs + 1 + 2 + len(ms.FOLLOWUPS) + n_named * len(s.confirm_seeds) + n_named  # ... and at the transfer
    assert len(lines) == runs
    assert set(summary["transfer_loss_bits"]) == {"default", *named}
    assert (out / "module_search.png").stat().st_size > 10_000
    assert json.loads((out / "module_search_summary.json").read_text())["best"] == summary["best"]
    ms.main(argv)  # every run is done: nothing is trained again
    assert (out / "module_search.jsonl").read_text().splitlines() == lines
