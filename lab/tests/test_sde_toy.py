"""The SDE rule, shown: loss-versus-tokens curves of the toy regression collapse with it and not without.

Curves at B_base/4 and 4·B_base track the reference run with the rule and do not without it, and two
wrong rules (SGD's linear lr scaling, an unscaled weight EMA) fail the same comparison.
"""

from __future__ import annotations

import dataclasses

import pytest

import sde_batch as sb
from lab import sde_toy as toy
from sde_batch import OptimSettings


def test_bad_toy_input_raises_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match="batch"):
        toy.toy_problem_curves(OptimSettings(), 0)


@pytest.fixture(scope="module")
def collapse() -> list[toy.Collapse]:
    return toy.collapse_distances()  # reference batch 32; physical batches 8 and 128; EMA on


@pytest.fixture(scope="module")
def reference() -> toy.ToyCurves:
    return toy.toy_problem_curves(toy.TOY_SETTINGS, toy.TOY_BATCH)


def test_curves_collapse_with_the_rule_and_not_without(collapse: list[toy.Collapse]) -> None:
    assert [c.batch for c in collapse] == [8, 128]
    for c in collapse:
        assert c.with_rule < 0.25 * c.without, c
        assert c.with_rule < 0.06, c  # a few times the noise between two seeds
        assert c.ema_with_rule < 0.25 * c.ema_without, c  # the same for the EMA weights


def test_sgd_linear_lr_rule_does_not_collapse_adam(reference: toy.ToyCurves, collapse: list[toy.Collapse]) -> None:
    """Negative control: lr·kappa (SGD's rule) with everything else as the rule says is clearly worse."""
    k = 4.0
    linear = dataclasses.replace(sb.rescale(toy.TOY_SETTINGS, k), lr=toy.TOY_SETTINGS.lr * k)
    d = toy.curve_distance(toy.toy_problem_curves(linear, 128), reference)
    assert d > 2 * collapse[1].with_rule, (d, collapse[1])


def test_unscaled_weight_ema_does_not_collapse(reference: toy.ToyCurves, collapse: list[toy.Collapse]) -> None:
    """Negative control for rho^kappa: keep the reference EMA factor, rescale everything else."""
    no_ema_rule = dataclasses.replace(sb.rescale(toy.TOY_SETTINGS, 4.0), ema=toy.TOY_SETTINGS.ema)
    d = toy.curve_distance(toy.toy_problem_curves(no_ema_rule, 128), reference, ema=True)
    assert d > 4 * collapse[1].ema_with_rule, (d, collapse[1])


def test_toy_curves_are_deterministic_and_well_formed() -> None:
    s = dataclasses.replace(toy.TOY_SETTINGS, warmup_tokens=64)
    a = toy.toy_problem_curves(s, 16, 640, seeds=8)
    b = toy.toy_problem_curves(s, 16, 640, seeds=8)
    assert a.tokens.tolist() == [16 * (k + 1) for k in range(40)]
    assert a.loss.equal(b.loss) and a.ema_loss is not None and a.ema_loss.equal(b.ema_loss)
    assert toy.curve_distance(a, b) == 0.0
    assert float(a.loss[-1]) < float(a.loss[0])  # it learns
    c = toy.toy_problem_curves(dataclasses.replace(s, ema=None), 16, 640, seeds=8)
    assert c.ema_loss is None
    with pytest.raises(ValueError, match="without a weight EMA"):
        toy.curve_distance(c, c, ema=True)
