"""Tests of studies.py: every study runs at smoke size, the fits recover known answers, finished runs are skipped."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

import sample
import train
from lab import studies

SMOKE = studies.SIZES["smoke"]
N_SEEDS = len(SMOKE.seeds)
N_JUDGED = len(studies.JUDGED_TASKS)
GUIDANCE = {0.0, *(c.guidance for c in studies.STEP_BY_STEP.values())}
# lines each smoke study writes: (training runs, sampler-sweep rows)
EXPECTED = {
    "schedules": (len(SMOKE.schedules) * N_SEEDS, len(SMOKE.schedules) * N_JUDGED * N_SEEDS),
    # every (horizon, batch, rule, seed) except "without" at the reference point, which is the "with" run
    "sde": ((2 * len(SMOKE.sde_horizons) * len(SMOKE.sde_batches) - 1) * N_SEEDS, 0),
    "antimask": (2 * N_SEEDS, 0),
    "scaling": (len(SMOKE.scaling_models) * len(SMOKE.scaling_tokens) * N_SEEDS, 0),
    "mixing": (len(SMOKE.mixtures) * N_SEEDS, 0),
    "inference": (
        1,
        N_JUDGED
        * len(SMOKE.inference_samplers)
        * len(SMOKE.inference_steps)
        * len(SMOKE.inference_temperatures)
        * len(SMOKE.inference_guidance)
        * N_SEEDS,
    ),
    # the preset and each (threshold, guidance 0 or the presets'), on study 6's checkpoint (which study 6 records)
    "parallel": (0, N_JUDGED * (1 + len(SMOKE.parallel_thresholds) * len(GUIDANCE)) * N_SEEDS),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(out, runs): shared by the tests of this module, so that finished smoke runs can be reused."""
    root = tmp_path_factory.mktemp("studies")
    return root / "out", root / "runs"


def run(study: str, dirs: tuple[Path, Path], *extra: str) -> dict:
    out, runs = dirs
    return studies.main([study, "--size=smoke", f"--out={out}", f"--runs={runs}", *extra])


def numbers(value: object) -> list[float]:
    """Every number inside a JSON value."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.mark.parametrize("study", studies.STUDIES)
def test_every_study_runs_at_smoke_size(study: str, dirs: tuple[Path, Path]) -> None:
    run(study, dirs)
    out = dirs[0]
    records = [json.loads(line) for line in (out / f"{study}.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["kind"] == "train"]
    sampled = [r for r in records if r["kind"] == "sample"]
    assert (len(trained), len(sampled)) == EXPECTED[study]
    assert len({(r["id"], r["size"]) for r in records}) == len(records), "ids are unique"
    for r in trained:
        assert "error" not in r, r["error"]
        assert r["tokens"] > 0 and r["seed"] in SMOKE.seeds and r["size"] == "smoke"
        assert set(r["nelbo_bits"]) == set(studies.PARTS)
        values = numbers([r["loss_bits"], r["nelbo_bits"], r["val_bits"], r.get("generation", {}), r.get("curve", {})])
        assert values and all(math.isfinite(v) for v in values), r["id"]
        assert 0 < r["loss_bits"] < 20, "bits per token of a barely trained model: a few, not hundreds"
    for r in sampled:
        assert all(math.isfinite(v) for v in numbers(r["metrics"])) and 0 <= r["metrics"]["accuracy"] <= 1
    figure = out / f"{study}.png"
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / f"{study}_summary.json").read_text())
    assert summary["study"] == study and summary["size"]["name"] == "smoke"


def test_finished_runs_are_not_run_again(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    for study in ("antimask", "inference"):
        run(study, dirs)  # a no-op when the test above already ran them
    before = {s: (dirs[0] / f"{s}.jsonl").read_text() for s in ("antimask", "inference")}
    calls = []
    original = train.main

    def counting(argv: list[str]) -> dict:
        calls.append(argv)
        return original(argv)

    monkeypatch.setattr(train, "main", counting)
    for study in ("antimask", "inference"):
        run(study, dirs)
    assert calls == [], "a second invocation must not train again"
    assert {s: (dirs[0] / f"{s}.jsonl").read_text() for s in before} == before
    run("antimask", dirs, "--force")
    assert len(calls) == EXPECTED["antimask"][0], "--force reruns every run"
    lines = (dirs[0] / "antimask.jsonl").read_text().splitlines()
    assert len(lines) == EXPECTED["antimask"][0], "a forced rerun replaces its lines"


def test_scaling_fit_recovers_known_exponents() -> None:
    law = studies.ScalingFit(E=1.2, A=30.0, alpha=0.4, B=200.0, beta=0.3, rms_log_residual=0.0, points=0)
    n = [3e4, 6e4, 1.1e5, 3.3e5]
    d = [2e5, 4e5, 8e5]
    grid = list(itertools.product(n, d))
    exact = studies.fit_scaling_law(*zip(*[(a, b, law.loss(a, b)) for a, b in grid], strict=True))
    for name in ("E", "A", "alpha", "B", "beta"):
        assert getattr(exact, name) == pytest.approx(getattr(law, name), rel=1e-4), name
    rng = np.random.default_rng(0)
    wide = list(itertools.product(np.geomspace(1e4, 1e6, 5), np.geomspace(1e5, 1e7, 5)))
    noisy = [(a, b, law.loss(a, b) * (1 + 0.002 * rng.standard_normal())) for a, b in wide]
    fit = studies.fit_scaling_law(*zip(*noisy, strict=True))
    assert abs(fit.alpha - 0.4) < 0.05 and abs(fit.beta - 0.3) < 0.05
    assert 0 < fit.rms_log_residual < 0.01


def test_compute_optimal_allocation_minimizes_the_law_at_fixed_compute() -> None:
    law = studies.ScalingFit(E=1.2, A=30.0, alpha=0.4, B=200.0, beta=0.3, rms_log_residual=0.0, points=0)
    compute = 1e13
    n_opt, d_opt = law.compute_optimal(compute)
    assert 6 * n_opt * d_opt == pytest.approx(compute)
    ns = np.geomspace(n_opt / 10, n_opt * 10, 2001)
    brute = ns[np.argmin(law.loss(ns, compute / (6 * ns)))]
    assert brute == pytest.approx(n_opt, rel=0.01)


def test_scaling_fit_refuses_too_few_points() -> None:
    with pytest.raises(studies.FitError, match="at least 6"):
        studies.fit_scaling_law([1e4, 1e4, 1e5, 1e5, 1e6], [1e5, 1e6, 1e5, 1e6, 1e5], [3.0, 2.5, 2.8, 2.2, 2.6])
    with pytest.raises(studies.FitError, match="1 sizes"):
        studies.fit_scaling_law([1e4] * 6, [1e5, 2e5, 4e5, 8e5, 1.6e6, 3.2e6], [3.0, 2.9, 2.8, 2.7, 2.6, 2.5])


def test_critical_batch_estimator_on_synthetic_curves() -> None:
    batches = [8, 16, 32, 64, 128]
    # flat, then +5% per doubling: the 2% threshold is crossed 0.4 of a doubling above 32
    c = studies.estimate_critical_batch(batches, [1.0, 1.0, 1.0, 1.05, 1.10])
    assert c.batch == pytest.approx(32 * 2**0.4) and not c.censored and c.best_loss == 1.0
    # the order of the points does not matter
    assert studies.estimate_critical_batch(batches[::-1], [1.10, 1.05, 1.0, 1.0, 1.0]).batch == pytest.approx(c.batch)
    # a smooth curve with its 2% point at B = 50, sampled at powers of two: within a quarter of a doubling
    smooth = [2.0**k for k in range(2, 10)]
    c = studies.estimate_critical_batch(smooth, [3.0 * (1 + 0.02 * (b / 50) ** 2) for b in smooth])
    assert abs(math.log2(c.batch / 50)) < 0.25 and not c.censored
    # noise below the best batch does not end the band; walking up from the best does
    c = studies.estimate_critical_batch(batches, [1.01, 1.0, 1.005, 1.2, 1.4])
    assert 32 < c.batch < 64
    # no batch leaves the band: censored at the largest batch
    c = studies.estimate_critical_batch(batches, [1.0, 0.999, 1.001, 1.01, 1.015])
    assert c.censored and c.batch == 128
    # a diverged run ends the band at the batch below it
    c = studies.estimate_critical_batch(batches, [1.0, 1.0, 1.0, math.inf, math.nan])
    assert c.batch == 32 and not c.censored
    with pytest.raises(ValueError, match="at least two"):
        studies.estimate_critical_batch([8], [1.0])


def test_horizon_exponent_recovers_a_power_law() -> None:
    horizons = [1e5, 2e5, 4e5, 8e5]
    crit = [studies.CriticalBatch(3.0 * d**0.44, False, 1.0) for d in horizons]
    slope, prefactor = studies.horizon_exponent(horizons, crit)
    assert slope == pytest.approx(0.44) and prefactor == pytest.approx(3.0)
    censored = [*crit[:2], studies.CriticalBatch(1e9, True, 1.0), studies.CriticalBatch(1e9, True, 1.0)]
    assert studies.horizon_exponent(horizons, censored)[0] == pytest.approx(0.44), "censored points are ignored"
    with pytest.raises(studies.FitError, match=">= 2 horizons"):
        studies.horizon_exponent(horizons, [crit[0], *censored[2:], censored[2]])


def test_binned_curve_averages_steps_in_equal_token_bins() -> None:
    steps = [{"tokens": t, "loss": math.log(2) * v} for t, v in ((10, 4.0), (20, 2.0), (60, 1.0), (100, 3.0))]
    curve = studies.binned_curve(steps, horizon=100, bins=4)
    assert curve == {"tokens": [12.5, 62.5, 87.5], "loss_bits": [3.0, 1.0, 3.0]}


def test_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="single seed"):
        dataclasses.replace(studies.SIZES["quick"], seeds=(0,))
    assert all(len(s.seeds) >= 2 for name, s in studies.SIZES.items() if name != "smoke")


def test_sweep_runs_a_grid_and_format_table_prints_it() -> None:
    rows = studies.sweep(lambda cfg: {"nfe": cfg.steps * 2}, {"steps": [2, 8], "sampler": list(sample.SAMPLERS)})
    assert [(r["steps"], r["sampler"]) for r in rows] == list(itertools.product([2, 8], sample.SAMPLERS))
    assert all(r["nfe"] == 2 * r["steps"] for r in rows)
    table = studies.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| sampler | steps |") and table[0].endswith("| nfe |")
    with pytest.raises(ValueError, match="unknown SamplerConfig fields"):
        studies.sweep(lambda cfg: {}, {"stepz": [1]})
