"""Tests of sde_batch.py: every formula of the reparameterization, its errors, and the collapse it claims.

Formulas are checked against literal values and by property tests (identity at kappa = 1, exact
composition, betas in (0, 1), the two forms of kappa, what each rule holds fixed per token). The
rule itself is shown on a toy regression by the lab's tests (lab/tests/test_sde_toy.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import sde_batch as sb
from sde_batch import OptimSettings, Reference

# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------


def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


settings_st = st.builds(
    OptimSettings,
    lr=log_uniform(1e-6, 1.0),
    betas=st.tuples(st.floats(0.5, 0.9999), st.floats(0.5, 0.9999)),
    eps=log_uniform(1e-12, 1e-4),
    weight_decay=st.floats(0.0, 1.0),
    ema=st.one_of(st.none(), st.floats(0.5, 0.9999)),
    warmup_tokens=st.floats(0.0, 1e6),
    final_lr_frac=st.floats(0.0, 1.0),
)


def close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def settings_close(a: OptimSettings, b: OptimSettings, rel: float = 1e-12) -> bool:
    """Field-wise equality up to rounding; betas and ema compared through log (their exponent form)."""
    same_schedule = a.warmup_tokens == b.warmup_tokens and a.final_lr_frac == b.final_lr_frac
    decays = [*zip(a.betas, b.betas, strict=True)] + ([(a.ema, b.ema)] if a.ema is not None else [])
    return (
        same_schedule
        and (a.ema is None) == (b.ema is None)
        and close(a.lr, b.lr, rel)
        and close(a.eps, b.eps, rel)
        and close(a.weight_decay, b.weight_decay, rel)
        and all(close(math.log(x), math.log(y), rel) for x, y in decays)
    )


# ----------------------------------------------------------------------------------------------
# rescale: the per-kappa rules
# ----------------------------------------------------------------------------------------------


def test_rescale_literal_values() -> None:
    s = OptimSettings(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, ema=0.999, warmup_tokens=5e6)
    r = sb.rescale(s, 4.0)
    assert r.lr == pytest.approx(2e-3, rel=1e-15)
    assert r.betas == pytest.approx((0.6561, 0.81450625), rel=1e-14)  # 0.9^4, 0.95^4
    assert r.eps == pytest.approx(5e-9, rel=1e-15)
    assert r.weight_decay == pytest.approx(0.2, rel=1e-15)
    assert r.ema == pytest.approx(0.999**4, rel=1e-15)
    assert (r.warmup_tokens, r.final_lr_frac) == (5e6, 0.1)  # token quantities do not move


@given(settings_st)
def test_kappa_one_is_the_identity(s: OptimSettings) -> None:
    assert sb.rescale(s, 1.0) == s


@given(settings_st, log_uniform(0.1, 10.0), log_uniform(0.1, 10.0))
def test_rescalings_compose(s: OptimSettings, k1: float, k2: float) -> None:
    assert settings_close(sb.rescale(sb.rescale(s, k1), k2), sb.rescale(s, k1 * k2))


@given(st.floats(0.0, 0.999999), log_uniform(1e-8, 1e8))
def test_betas_stay_in_the_unit_interval(beta: float, kappa: float) -> None:
    s = OptimSettings(betas=(beta, 0.95))
    try:
        b = sb.rescale(s, kappa).betas[0]
    except ValueError as e:  # only where beta^kappa rounds to 0 or 1 in floating point
        assert "outside (0, 1) in floating point" in str(e)
        assert beta**kappa in (0.0, 1.0)
        return
    if beta == 0:
        assert b == 0
    else:
        assert 0 < b < 1
        assert (b <= beta) if kappa >= 1 else (b >= beta)  # bigger batch: shorter memory in steps
        if abs(math.log(kappa)) > 1e-3 and beta ** (1 / kappa) < 1:
            assert b != beta


@given(st.floats(1e-6, 0.2), log_uniform(1e-3, 1e3))
def test_beta_power_is_the_linear_rule_to_first_order(delta: float, kappa: float) -> None:
    """1 − β^kappa vs Malladi et al.'s kappa(1 − β): ratio r = (1 − (1 − δ)^kappa)/(kappa δ).

    1 − (1 − δ)^kappa is concave in kappa and 0 at 0, so r >= 1 for kappa <= 1 and r <= 1 for
    kappa >= 1; the bounds below show |r − 1| = O(kappa δ) or O(δ), i.e. agreement to first order.
    """
    r = -math.expm1(kappa * math.log1p(-delta)) / (kappa * delta)
    if kappa <= 1:
        assert 1 - 1e-12 <= r <= -math.log1p(-delta) / delta + 1e-12  # <= 1 + δ/2 + O(δ²)
    else:
        assert 1 - kappa * delta / 2 - 1e-12 <= r <= 1 + 1e-12


# ----------------------------------------------------------------------------------------------
# kappa, the logical batch, steps, the critical batch
# ----------------------------------------------------------------------------------------------


def test_kappa_literal_value() -> None:
    # (64/256) · (1e9/1e8)^0.44 = 0.25 · 10^0.44
    assert sb.kappa_of(64, 1e8, 256, 1e9) == pytest.approx(0.25 * 2.7542287033381663, rel=1e-12)
    assert sb.logical_batch(1e8, 256, 1e9) == pytest.approx(256 / 2.7542287033381663, rel=1e-12)


@given(log_uniform(1, 1e5), log_uniform(1e6, 1e13), log_uniform(1, 1e5), log_uniform(1e6, 1e13), st.floats(0.0, 1.0))
def test_the_two_forms_of_kappa_agree(B: float, D: float, B_base: float, D_base: float, gamma: float) -> None:
    k = sb.kappa_of(B, D, B_base, D_base, gamma)
    assert close(k, B / sb.logical_batch(D, B_base, D_base, gamma), 1e-12)
    assert close(sb.kappa_of(B, D_base, B_base, D_base, gamma), B / B_base, 1e-12)  # same horizon: B / B_base
    assert close(sb.kappa_of(B, D, B_base, D_base, 0.0), B / B_base, 1e-12)  # gamma = 0 ignores the horizon


@given(
    st.integers(1, 4096), st.integers(1, 4096), st.integers(1, 10**6), st.sampled_from([-1, 0, 1]), st.integers(1, 5000)
)
def test_warning_appears_exactly_below_the_critical_batch(B: int, L: int, n: int, off: int, min_steps: int) -> None:
    D = float(B * L * n + off)  # exactly n full steps, or one token less or more
    assume(D >= 1)
    ref = Reference(batch=256, tokens=1e9, settings=OptimSettings())
    p = sb.plan(ref, B, D, L, min_steps)
    below = D / (B * L) < min_steps
    assert (sb.critical_batch_warning(p) is not None) == below
    assert (B > p.critical_batch) == below or math.isclose(B, p.critical_batch, rel_tol=1e-12)
    assert p.steps == math.ceil(D / (B * L))


def test_warning_boundary_and_text() -> None:
    ref = Reference(batch=256, tokens=1e9, settings=OptimSettings())
    assert sb.critical_batch_warning(sb.plan(ref, 64, 64 * 1024 * 1000, 1024, 1000)) is None  # exactly S_crit steps
    p = sb.plan(ref, 64, 64 * 1024 * 1000 - 1, 1024, 1000)  # one token short
    w = sb.critical_batch_warning(p)
    assert w is not None and "critical batch" in w and "S_crit = 1000" in w and f"{p.critical_batch:.4g}" in w
    assert "EXCEEDED" in p.describe()


# ----------------------------------------------------------------------------------------------
# What the plan holds fixed per token
# ----------------------------------------------------------------------------------------------


def _plan(B: int, D: float = 2**26, L: int = 128, warmup: float = 2**22, ema: float | None = 0.999) -> sb.BatchPlan:
    base = OptimSettings(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, ema=ema, warmup_tokens=warmup)
    return sb.plan(Reference(batch=64, tokens=2**28, settings=base), B, D, L, min_steps=1)


@pytest.mark.parametrize("B", [16, 32, 128, 256])
def test_sde_time_decay_and_memory_per_token_do_not_depend_on_the_batch(B: int) -> None:
    """Same horizon, different physical batch: the run's total SDE time sum_k lr_k², total decay
    sum_k lr_k·lambda, and the EMAs' forgetting per token agree (up to the midpoint rule's error)."""
    a, b = _plan(64), _plan(B)

    def sde_time(p: sb.BatchPlan) -> float:
        return sum(p.lr_for_step(k) ** 2 for k in range(p.steps))

    def total_decay(p: sb.BatchPlan) -> float:
        return sum(p.lr_for_step(k) * p.settings.weight_decay for k in range(p.steps))

    assert close(sde_time(a), sde_time(b), 1e-4)
    assert close(total_decay(a), total_decay(b), 1e-4)
    for x, y in zip((*a.settings.betas, a.settings.ema), (*b.settings.betas, b.settings.ema), strict=True):
        assert close(math.log(x) / a.tokens_per_step, math.log(y) / b.tokens_per_step, 1e-12)


def test_without_the_rule_sde_time_does_move() -> None:
    """The check above can fail: at the reference lr, a 4x batch covers 1/4 of the SDE time."""
    a, b = _plan(64), _plan(256)
    t_a = sum(a.lr_for_step(k) ** 2 for k in range(a.steps)) / a.settings.lr**2
    t_b = sum(b.lr_for_step(k) ** 2 for k in range(b.steps)) / b.settings.lr**2
    assert t_b == pytest.approx(t_a / 4, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# The learning-rate schedule in tokens
# ----------------------------------------------------------------------------------------------


@given(settings_st, log_uniform(1e6, 1e12), st.floats(0.0, 2.0))
def test_lr_schedule_shape(s: OptimSettings, D: float, where: float) -> None:
    W, f = s.warmup_tokens, s.final_lr_frac
    if W >= D:
        with pytest.raises(ValueError, match="shorter than the horizon"):
            sb.lr_factor(0.0, s, D)
        return
    tau = where * D
    x = sb.lr_factor(tau, s, D)
    assert sb.lr_at(tau, s, D) == pytest.approx(s.lr * x, rel=1e-15)
    if tau < W:
        assert x == pytest.approx(tau / W)
    else:
        assert f - 1e-12 <= x <= 1 + 1e-12
        assert sb.lr_factor(min(tau * 1.01 + 1, 2 * D), s, D) <= x + 1e-12  # non-increasing after warmup
    assert sb.lr_factor(W, s, D) == pytest.approx(1.0)  # continuous at the end of warmup
    assert sb.lr_factor(D, s, D) == pytest.approx(f) and sb.lr_factor(3 * D, s, D) == pytest.approx(f)


def test_step_lrs_use_the_middle_token_of_each_step() -> None:
    p = _plan(64)
    tps = p.tokens_per_step
    assert p.lr_for_step(0) == pytest.approx(p.settings.lr * 0.5 * tps / p.settings.warmup_tokens)
    assert p.lr_for_step(p.warmup_steps) == pytest.approx(sb.lr_at((p.warmup_steps + 0.5) * tps, p.settings, p.tokens))
    assert (p.warmup_steps - 0.5) * tps < p.settings.warmup_tokens <= (p.warmup_steps + 0.5) * tps
    assert p.lr_for_step(p.steps - 1) > p.settings.lr * p.settings.final_lr_frac


# ----------------------------------------------------------------------------------------------
# The plan and its table
# ----------------------------------------------------------------------------------------------


def test_plan_fields_and_table() -> None:
    ref = Reference(batch=256, tokens=1e9, settings=OptimSettings(warmup_tokens=1e7, ema=0.999))
    p = sb.plan(ref, 64, 1e8, 1024)
    assert p.kappa == pytest.approx(0.25 * 10**0.44) and p.logical_batch == pytest.approx(256 / 10**0.44)
    assert p.settings == sb.rescale(ref.settings, p.kappa)
    assert p.steps == math.ceil(1e8 / (64 * 1024)) and p.critical_batch == pytest.approx(1e8 / (1024 * 1000))
    assert sb.critical_batch_warning(p) is None
    table = p.describe()
    assert str(p) == table
    for text in ("kappa = B / B_log(D)", f"{p.kappa:.4g}", f"{p.settings.lr:.4g}", f"{p.settings.eps:.4g}", "(OK)"):
        assert text in table
    assert f"{p.settings.betas[1]:.6g}" in table and f"{p.settings.ema:.6g}" in table


def test_table_and_warning_past_the_critical_batch() -> None:
    p = sb.plan(Reference(batch=256, tokens=1e9, settings=OptimSettings()), 4096, 1e9, 1024)
    warning = sb.critical_batch_warning(p)
    assert "EXCEEDED" in p.describe() and warning is not None and warning.startswith("WARNING: physical batch B = 4096")


# ----------------------------------------------------------------------------------------------
# Bad input fails fast with a clear message
# ----------------------------------------------------------------------------------------------

BASE = OptimSettings()
REF = Reference(batch=256, tokens=1e9, settings=BASE)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sb.kappa_of(0, 1e8, 256, 1e9), "batch"),
        (lambda: sb.kappa_of(-64, 1e8, 256, 1e9), "batch"),
        (lambda: sb.kappa_of(64, 0, 256, 1e9), "tokens"),
        (lambda: sb.kappa_of(64, math.nan, 256, 1e9), "tokens"),
        (lambda: sb.kappa_of(64, 1e8, 256, math.inf), "base_tokens"),
        (lambda: sb.kappa_of(64, 1e8, 0, 1e9), "base_batch"),
        (lambda: sb.kappa_of(64, 1e8, 256, 1e9, gamma=-0.1), "gamma"),
        (lambda: sb.kappa_of(64, 1e8, 256, 1e9, gamma=1.5), "gamma"),
        (lambda: sb.logical_batch(1e8, 256, 1e9, gamma=math.nan), "gamma"),
        (lambda: sb.rescale(BASE, 0.0), "kappa"),
        (lambda: sb.rescale(BASE, -2.0), "kappa"),
        (lambda: sb.rescale(BASE, math.inf), "kappa"),
        (lambda: sb.rescale(BASE, 1e6), "outside \\(0, 1\\)"),  # 0.9^1e6 underflows to 0
        (lambda: OptimSettings(lr=0.0), "lr"),
        (lambda: OptimSettings(betas=(1.0, 0.95)), "betas"),
        (lambda: OptimSettings(betas=(0.9, -0.1)), "betas"),
        (lambda: OptimSettings(eps=-1e-8), "eps"),
        (lambda: OptimSettings(weight_decay=-0.1), "weight_decay"),
        (lambda: OptimSettings(ema=1.0), "ema"),
        (lambda: OptimSettings(warmup_tokens=-1.0), "warmup_tokens"),
        (lambda: OptimSettings(final_lr_frac=1.5), "final_lr_frac"),
        (lambda: Reference(batch=0, tokens=1e9, settings=BASE), "B_base"),
        (lambda: Reference(batch=256, tokens=1e9, settings=BASE, gamma=2.0), "gamma"),
        (lambda: sb.plan(REF, 0, 1e8, 1024), "batch"),
        (lambda: sb.plan(REF, 2.5, 1e8, 1024), "batch"),
        (lambda: sb.plan(REF, 64, -1e8, 1024), "tokens"),
        (lambda: sb.plan(REF, 64, 1e8, 0), "seq_len"),
        (lambda: sb.plan(REF, 64, 1e8, 1024, min_steps=0), "min_steps"),
        (lambda: sb.plan(dataclasses.replace(REF, settings=OptimSettings(warmup_tokens=2e8)), 64, 1e8, 1024), "warmup"),
        (lambda: sb.lr_factor(-1.0, BASE, 1e8), "tokens_seen"),
        (lambda: sb.plan(REF, 64, 1e8, 1024).lr_for_step(-1), "step"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
