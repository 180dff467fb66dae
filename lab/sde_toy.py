"""The SDE batch rule shown on a toy problem: loss-versus-tokens curves collapse with it, not without.

``toy_problem_curves`` trains a noisy linear regression with torch's own AdamW at a physical batch,
``collapse_distances`` compares each batch's curve with the reference run's, with the settings
rescaled by ``sde_batch.rescale`` and without. The tests (``lab/tests/test_sde_toy.py``) check that
the rule collapses the curves and that two wrong rules (SGD's linear lr scaling, an unscaled
weight EMA) do not; notebook 06 runs the same experiment in its own words.

    python -m lab.sde_toy          # the distances at batches 8 and 128 around the reference 32
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sde_batch import OptimSettings, _positive, _positive_int, lr_at, optimizer_steps, rescale

TOY_SETTINGS = OptimSettings(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, ema=0.99, warmup_tokens=1600)
TOY_BATCH, TOY_TOKENS = 32, 32 * 512  # the toy's reference batch and horizon (samples)


@dataclass(frozen=True)
class ToyCurves:
    """Loss-versus-tokens curves of ``toy_problem_curves``, one entry per optimizer step k: tokens[k] the
    samples seen after step k, loss[k] the population excess loss then, averaged over the independent
    runs (seeds), and ema_loss the same for the EMA weights (None without an EMA)."""

    tokens: torch.Tensor
    loss: torch.Tensor
    ema_loss: torch.Tensor | None

    def log_loss_at(self, tokens: torch.Tensor, ema: bool = False) -> torch.Tensor:
        """log(loss) at the given token counts, interpolated linearly in tokens between steps."""
        curve = self.ema_loss if ema else self.loss
        if curve is None:
            raise ValueError("these curves were computed without a weight EMA (settings.ema is None)")
        x, lo, hi = self.tokens, float(self.tokens[0]), float(self.tokens[-1])
        if float(tokens.min()) < lo or float(tokens.max()) > hi:
            raise ValueError(f"token counts must lie in [{lo:g}, {hi:g}], the range of this curve")
        i = torch.searchsorted(x, tokens).clamp(1, len(x) - 1)
        y0, y1 = curve[i - 1].log(), curve[i].log()
        return y0 + (tokens - x[i - 1]) / (x[i] - x[i - 1]) * (y1 - y0)


def toy_problem_curves(
    settings: OptimSettings,
    batch: int,
    tokens: int = TOY_TOKENS,
    *,
    seeds: int = 128,
    dim: int = 16,
    noise: float = 10.0,
    seed: int = 0,
) -> ToyCurves:
    """Train a noisy linear regression with torch's AdamW and ``settings``; return loss versus samples.

    x ~ N(0, H) in R^dim with H = diag(1, 1/2, ..., 1/dim), y = x·w* + noise·z, w* ~ N(0, I) fixed;
    the loss is the mean squared error over a minibatch of ``batch`` samples (one sample plays one
    token, L = 1), from w = 0. The population excess loss (w − w*)ᵀ H (w − w*) is exact, so only the
    minibatches are random. ``seeds`` independent runs train as the rows of one tensor (Adam acts
    coordinate-wise: rows never interact); the curve is their mean. With the default noise the
    gradient noise scale tr(Σ)/|∇L|² starts near 200 samples and grows as the loss falls, so batches
    up to ~128 are noise-dominated, the SDE's regime. Each step uses the schedule at its middle
    sample (as ``BatchPlan.lr_for_step``): all batches follow one schedule in tokens. Single-threaded.
    """
    for name, value in (("batch", batch), ("tokens", tokens), ("seeds", seeds), ("dim", dim)):
        _positive_int(name, value)
    _positive("noise", noise)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small gain nothing from threads, and lose 10x on a busy CPU
    try:
        gen = torch.Generator().manual_seed(seed)
        h = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64)
        w_star = torch.randn(dim, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
        w = torch.zeros(seeds, dim, dtype=torch.float64, requires_grad=True)
        w_ema = None if settings.ema is None else w.detach().clone()
        opt = torch.optim.AdamW([w], **{k: getattr(settings, k) for k in ("lr", "betas", "eps", "weight_decay")})
        loss, ema_loss = [], []
        for k in range(optimizer_steps(tokens, batch, 1)):
            opt.param_groups[0]["lr"] = lr_at((k + 0.5) * batch, settings, tokens)
            z = torch.randn(seeds, batch, dim + 1, generator=gen).double()  # float32 draws: 5x faster on CPU
            x = z[..., :dim] * h.sqrt()
            y = x @ w_star + noise * z[..., dim]
            residual = (x * w.detach()[:, None]).sum(-1) - y  # (seeds, batch)
            w.grad = 2 * (residual[..., None] * x).sum(1) / batch  # gradient of the minibatch mean squared error
            opt.step()
            loss.append(float((((w.detach() - w_star) ** 2) * h).sum(1).mean()))  # (w − w*)ᵀ H (w − w*)
            if w_ema is not None:
                w_ema.mul_(settings.ema).add_(w.detach(), alpha=1 - settings.ema)
                ema_loss.append(float((((w_ema - w_star) ** 2) * h).sum(1).mean()))
    finally:
        torch.set_num_threads(threads)
    seen = torch.arange(1, len(loss) + 1, dtype=torch.float64) * batch
    loss, ema_loss = torch.tensor(loss, dtype=torch.float64), torch.tensor(ema_loss, dtype=torch.float64)
    return ToyCurves(seen, loss, None if w_ema is None else ema_loss)


def curve_distance(run: ToyCurves, reference: ToyCurves, points: int = 32, ema: bool = False) -> float:
    """Mean |log loss_run − log loss_ref| at ``points`` token counts spread evenly over the common range."""
    lo, hi = max(run.tokens[0], reference.tokens[0]), min(run.tokens[-1], reference.tokens[-1])
    grid = torch.linspace(float(lo), float(hi), _positive_int("points", points), dtype=torch.float64)
    return float((run.log_loss_at(grid, ema) - reference.log_loss_at(grid, ema)).abs().mean())


@dataclass(frozen=True)
class Collapse:
    """``curve_distance`` from one physical batch's curves to the reference run's: with_rule with the
    settings rescaled by kappa = batch / base_batch, without with them as they are; ema_* the same for
    the EMA weights (nan without an EMA)."""

    batch: int
    kappa: float
    with_rule: float
    without: float
    ema_with_rule: float
    ema_without: float


def collapse_distances(
    settings: OptimSettings = TOY_SETTINGS,
    base_batch: int = TOY_BATCH,
    batches: tuple[int, ...] = (TOY_BATCH // 4, TOY_BATCH * 4),
    tokens: int = TOY_TOKENS,
    **toy: float,
) -> list[Collapse]:
    """Train the toy at base_batch and at each physical batch with and without the rule; compare curves.

    "Without" is a fair baseline: the same tuned settings, only the batch differs. Every run has the
    same token budget, so gamma plays no part: kappa = B / base_batch. Here eps is far below sqrt(v)
    and both momentum memories are short next to the run, so betas^kappa and eps barely move the
    curves: the toy tests the lr, weight-decay and EMA parts of the rule.
    """
    reference = toy_problem_curves(settings, base_batch, tokens, **toy)

    def dist(run: ToyCurves, ema: bool) -> float:
        """``curve_distance`` to the reference, nan for EMA curves that were not computed."""
        return math.nan if ema and settings.ema is None else curve_distance(run, reference, ema=ema)

    out = []
    for b in batches:
        kappa = b / base_batch
        rule, same = (toy_problem_curves(s, b, tokens, **toy) for s in (rescale(settings, kappa), settings))
        out.append(Collapse(b, kappa, dist(rule, False), dist(same, False), dist(rule, True), dist(same, True)))
    return out


if __name__ == "__main__":
    print(f"toy regression, reference batch {TOY_BATCH}, {TOY_TOKENS} samples; mean |log loss - reference|:")
    for c in collapse_distances():
        print(
            f"  B = {c.batch:4d} (kappa {c.kappa:g}): with the rule {c.with_rule:.3f}, without {c.without:.3f}; "
            f"EMA weights: with {c.ema_with_rule:.3f}, without {c.ema_without:.3f}"
        )
