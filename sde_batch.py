"""The SDE batch reparameterization: how to change batch size and token horizon without re-tuning AdamW.

A reference run was tuned at physical batch B_base and token horizon D_base. This file says which
AdamW settings a run at physical batch B and horizon D should use, why, and when that stops working.

Units, used everywhere in this file: a batch B counts *sequences per optimizer step* (the global
batch: micro-batch x gradient-accumulation steps x data-parallel processes), every sequence has L
tokens (positions, padding included), and horizons D and warmup W count *tokens*. One step therefore
consumes B·L tokens and a run of D tokens takes S = ceil(D / (B·L)) steps. The reference and the run
share L; to compare runs at different lengths, express B_base in sequences of the run's L.

The rule (Bethune et al., arXiv 2602.21472, 2026; the paper's full text was not available, so the
rule and its constants come from readers' notes of it)::

    kappa   = (B / B_base) · (D_base / D)^gamma,        gamma ≈ 0.44
            = B / B_log(D),      B_log(D) = B_base · (D / D_base)^gamma    (the *logical* batch)
    lr      = lr_base · sqrt(kappa)                    betas = betas_base^kappa
    eps     = eps_base / sqrt(kappa)                   weight decay lambda = lambda_base · sqrt(kappa)
    EMA rho = rho_base^kappa                           warmup and decay: fixed in tokens

valid while B <= B_crit, i.e. while the run takes at least S_crit optimizer steps.

Derivation (why these and not others)
-------------------------------------
1. Adam as an SDE (Malladi, Lyu, Panigrahi, Arora 2022, "On the SDEs and Scaling Rules for Adaptive
   Gradient Algorithms", NeurIPS). The minibatch gradient is g = ∇L(θ) + ξ with Cov ξ = Σ/B, and
   AdamW (PyTorch's convention, weight decay multiplied by the learning rate) steps

       m ← β1 m + (1 − β1) g,    v ← β2 v + (1 − β2) g², θ ← θ − η m / (sqrt(v) + ε) − η λ θ.

   When the gradient noise dominates (σ² = diag Σ, σ²/B ≫ (∇L)² per coordinate), v ≈ σ²/B, so one
   step (ignore momentum and ε for the moment) is

       Δθ ≈ −(η sqrt(B) / σ) ∇L − η ζ,      ζ ~ N(0, I) per coordinate,

   an Euler-Maruyama step of length dt = η² of the SDE  dΘ = −(sqrt(B) / (η σ)) ∇L(Θ) dt − dW.
   The SDE is unchanged when η / sqrt(B) is: scaling B by kappa asks for η·sqrt(kappa). One step
   then advances SDE time by kappa·η² but consumes kappa·B·L tokens, so the SDE time *per token*,
   η² / (B·L), is unchanged and so is the loss-versus-tokens curve. That is the square-root rule;
   Malladi et al. prove the SDE approximation (weakly, for small η) and state the rule for η, the
   betas and eps below; the weight-decay, EMA and schedule rules are the same argument, extended here.
2. Every other setting is a time constant of the optimizer; keep each fixed in SDE time, which by
   (1) is the same as fixed in tokens, i.e. one new step must act like kappa reference steps:
   * betas. An EMA with factor β keeps a memory of 1/(1 − β) steps = B·L/(1 − β) tokens. kappa
     reference steps shrink old gradients by β^kappa, hence β ↦ β^kappa: exact for how fast the EMA
     forgets. Malladi et al. write 1 − β ↦ kappa(1 − β), the same to first order in (1 − β):
     1 − β^kappa = kappa(1 − β) − kappa(kappa − 1)(1 − β)²/2 + ... We use β^kappa because it stays
     in (0, 1) for every kappa > 0 (the linear form is negative once kappa > 1/(1 − β)) and composes
     exactly (rescaling by k1 then k2 equals rescaling by k1·k2). Neither form is exact for what the
     EMA *averages*: one step holds one gradient of kappa·B samples where kappa reference steps hold
     kappa decaying ones; that difference is second order in kappa(1 − β).
   * eps is added to sqrt(v) ≈ σ / sqrt(B), which shrinks by sqrt(kappa): ε ↦ ε / sqrt(kappa) keeps
     ε / sqrt(v) fixed (equivalently Malladi et al.'s ε·η fixed).
   * weight decay. AdamW shrinks θ by (1 − η λ) per step, a decay of −log(1 − ηλ)/(B·L) ≈ ηλ/(B·L)
     per token. With η ↦ sqrt(kappa) η and B ↦ kappa B, λ ↦ sqrt(kappa) λ keeps ηλ/(B·L) fixed, and
     with it the total shrink factor exp(−Σ_k η_k λ) over any token interval, to first order in ηλ
     per step (one new step shrinks by 1 − kappa·ηλ, kappa reference steps by (1 − ηλ)^kappa); so
     are λ/η (the drift −(λ/η) θ dt of the decay term −ηλθ in SDE time) and the timescale of AdamW's
     implicit weight average, B·L/(ηλ) tokens (Wang & Aitchison 2024). An optimizer whose decay does
     not multiply η (θ ← (1 − λ')θ) would need λ' ↦ kappa·λ' instead; this file scales PyTorch's λ.
   * weight EMA ρ (θ_ema ← ρ θ_ema + (1 − ρ) θ) is an EMA like β: ρ ↦ ρ^kappa.
   * warmup and decay. The SDE time per token is fixed, so a schedule is a function of tokens seen,
     never of steps (``lr_factor``), taken at each step's middle token (``BatchPlan.lr_for_step``).
3. The horizon term is not from the SDE: per the readers' notes, the batch at which the reference
   settings are right grows with the horizon as B_log(D) = B_base (D / D_base)^gamma (gamma ≈ 0.44).
   A run at horizon D is the logical run at B_log(D), moved to physical batch B by (1)-(2) with
   kappa = B / B_log(D). At D = D_base this is plain batch scaling, kappa = B / B_base.
4. Where it fails. (1) needs noise-dominated gradients and many small SDE steps. Past a critical
   batch B_crit each step is a large slice of the run (kappa(1 − β2) is no longer small, few steps
   remain) and more tokens per step stop buying proportional progress: curves no longer collapse.
   The paper's published summary reports a critical batch independent of model size that grows
   sub-linearly with D.
   We express it as a minimum number of optimizer steps S_crit, B_crit = D / (L·S_crit), and warn
   when B > B_crit (``critical_batch_warning``). Caveat: a fixed S_crit makes B_crit grow linearly
   in D, faster than the paper's sub-linear growth, so at horizons far beyond the one where S_crit
   was calibrated the check is lenient. ``DEFAULT_MIN_STEPS`` is our placeholder, not the paper's.

Notebook 06 and ``lab/sde_toy.py`` (tested) put the rule to work on a toy regression at several batches.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

GAMMA: float = 0.44  # horizon exponent of the logical batch (readers' notes of the paper)
DEFAULT_MIN_STEPS: int = 1000  # S_crit: our placeholder; calibrate it with a batch sweep


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_gamma(gamma: float) -> float:
    """gamma in [0, 1]: 0 = the logical batch ignores the horizon, 1 = it grows like D (fixed steps)."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 <= gamma <= 1:
        raise ValueError(f"gamma must lie in [0, 1] (the paper's readers' notes give about 0.44), got {gamma!r}")
    return float(gamma)


# --- 1. Optimizer settings and their rescaling by kappa -------------------------------------------
@dataclass(frozen=True)
class OptimSettings:
    """AdamW settings plus the token-based schedule: everything ``rescale`` acts on.

    lr: peak learning rate eta; betas: Adam's (beta1, beta2); eps: Adam's epsilon; weight_decay:
    PyTorch AdamW's lambda (the step shrinks theta by lr·lambda); ema: the weight-EMA factor rho, or
    None for no EMA; warmup_tokens: W, the linear warmup length in tokens; final_lr_frac: the cosine
    decay ends at final_lr_frac·lr at the horizon D.
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    ema: float | None = None
    warmup_tokens: float = 0.0
    final_lr_frac: float = 0.1

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))  # a list -> a tuple
        for name in ("eps", "weight_decay", "warmup_tokens"):
            if not (math.isfinite(value := getattr(self, name)) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if self.ema is not None and not 0 <= self.ema < 1:
            raise ValueError(f"ema must be None (no EMA) or lie in [0, 1), got {self.ema!r}")
        if not 0 <= self.final_lr_frac <= 1:
            raise ValueError(f"final_lr_frac must lie in [0, 1], got {self.final_lr_frac!r}")


def _decay_power(name: str, rho: float, kappa: float) -> float:
    """rho^kappa for an EMA factor rho in [0, 1), refusing results that round to 0 or 1."""
    out = rho**kappa
    if rho > 0 and not 0 < out < 1:
        raise ValueError(
            f"kappa = {kappa:g} turns {name} = {rho!r} into {out!r}, outside (0, 1) in floating point; "
            "a rescaling this extreme is far outside the range where the SDE rule holds"
        )
    return out


def rescale(settings: OptimSettings, kappa: float) -> OptimSettings:
    """The settings for kappa times the batch at the same SDE time per token (module docstring, 1-2).

        lr·sqrt(kappa),  betas^kappa,  eps/sqrt(kappa),  weight_decay·sqrt(kappa),  ema^kappa

    warmup_tokens and final_lr_frac are unchanged (they live in tokens). kappa = 1 is the identity and
    rescale(rescale(s, k1), k2) equals rescale(s, k1·k2) up to rounding.
    """
    _positive("kappa", kappa)
    root = math.sqrt(kappa)
    return replace(
        settings,
        lr=settings.lr * root,
        betas=(_decay_power("beta1", settings.betas[0], kappa), _decay_power("beta2", settings.betas[1], kappa)),
        eps=settings.eps / root,
        weight_decay=settings.weight_decay * root,
        ema=None if settings.ema is None else _decay_power("ema", settings.ema, kappa),
    )


# --- 2. kappa, the logical batch, steps and the critical batch ------------------------------------
def logical_batch(tokens: float, base_batch: float, base_tokens: float, gamma: float = GAMMA) -> float:
    """B_log(D) = B_base · (D / D_base)^gamma: the batch at which the reference settings suit horizon D."""
    _positive("tokens (D)", tokens)
    _positive("base_batch (B_base)", base_batch)
    _positive("base_tokens (D_base)", base_tokens)
    return base_batch * (tokens / base_tokens) ** _check_gamma(gamma)


def kappa_of(batch: float, tokens: float, base_batch: float, base_tokens: float, gamma: float = GAMMA) -> float:
    """kappa = (B / B_base) · (D_base / D)^gamma = B / B_log(D), the SDE time-rescaling factor."""
    return _positive("batch (B)", batch) / logical_batch(tokens, base_batch, base_tokens, gamma)


def optimizer_steps(tokens: float, batch: int, seq_len: int) -> int:
    """S = ceil(D / (B·L)): the steps a run of D tokens takes at B sequences of L tokens per step."""
    _positive("tokens (D)", tokens)
    return math.ceil(tokens / (_positive_int("batch (B)", batch) * _positive_int("seq_len (L)", seq_len)))


def critical_batch(tokens: float, seq_len: int, min_steps: int) -> float:
    """B_crit = D / (L · S_crit): the largest batch (sequences) whose run of D tokens has S_crit full steps."""
    _positive("tokens (D)", tokens)
    return tokens / (_positive_int("seq_len (L)", seq_len) * _positive_int("min_steps (S_crit)", min_steps))


# --- 3. The learning-rate schedule, in tokens -----------------------------------------------------
def lr_factor(tokens_seen: float, settings: OptimSettings, horizon: float) -> float:
    """s(τ) in [final_lr_frac, 1]: the schedule as a fraction of the peak lr after τ tokens.

        s(τ) = τ / W                                                  for τ < W (linear warmup)
        s(τ) = f + (1 − f) · (1 + cos(π · min(1, (τ − W) / (D − W)))) / 2    otherwise (cosine to f)

    with W = warmup_tokens, f = final_lr_frac, D = horizon. Per-group learning-rate multipliers can
    multiply this factor; decoupled weight decay follows it automatically (AdamW decays by lr·λ).
    """
    if not (math.isfinite(tokens_seen) and tokens_seen >= 0):
        raise ValueError(f"tokens_seen must be finite and >= 0, got {tokens_seen!r}")
    _positive("horizon (D)", horizon)
    warmup = settings.warmup_tokens
    if warmup >= horizon:
        raise ValueError(f"warmup_tokens ({warmup:g}) must be shorter than the horizon D ({horizon:g})")
    if tokens_seen < warmup:
        return tokens_seen / warmup
    progress = min(1.0, (tokens_seen - warmup) / (horizon - warmup))
    f = settings.final_lr_frac
    return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(tokens_seen: float, settings: OptimSettings, horizon: float) -> float:
    """The learning rate after ``tokens_seen`` tokens: settings.lr · lr_factor(...). Batch-invariant."""
    return settings.lr * lr_factor(tokens_seen, settings, horizon)


# --- 4. The plan train.py prints and follows ------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """The tuned reference run: settings found at batch B_base (sequences) and horizon D_base (tokens)."""

    batch: int
    tokens: float
    settings: OptimSettings
    gamma: float = GAMMA

    def __post_init__(self) -> None:
        _positive_int("reference batch (B_base)", self.batch)
        _positive("reference tokens (D_base)", self.tokens)
        _check_gamma(self.gamma)


@dataclass(frozen=True)
class BatchPlan:
    """Every derived setting of one run; build it with ``plan``, print it with ``describe()``.

    batch: B (sequences per optimizer step); seq_len: L; tokens: the horizon D; logical_batch:
    B_log(D); kappa = B / B_log(D); steps: S = ceil(D / (B·L)); critical_batch: B_crit = D / (L·S_crit);
    settings: the reference settings rescaled by kappa (what the optimizer uses).
    """

    reference: Reference
    batch: int
    seq_len: int
    tokens: float
    min_steps: int
    logical_batch: float
    kappa: float
    steps: int
    critical_batch: float
    settings: OptimSettings

    @property
    def tokens_per_step(self) -> int:
        """B·L, the tokens one optimizer step consumes."""
        return self.batch * self.seq_len

    @property
    def warmup_steps(self) -> int:
        """Steps whose midpoint lies inside the warmup: ceil(W / (B·L) - 1/2)."""
        return max(0, math.ceil(self.settings.warmup_tokens / self.tokens_per_step - 0.5))

    def lr_for_step(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): the schedule at the step's middle token.

        Step k covers tokens [k·B·L, (k+1)·B·L); evaluating the schedule at (k + 1/2)·B·L is the
        midpoint rule over the step, so the first warmup step is not wasted at lr = 0.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        return lr_at((step + 0.5) * self.tokens_per_step, self.settings, self.tokens)

    def describe(self) -> str:
        """A multi-line table of the reference and the derived settings (train.py prints it at start-up)."""
        ref, s, r = self.reference, self.settings, self.reference.settings
        ema = ["off" if rho is None else f"{rho:.6g}" for rho in (r.ema, s.ema)]
        decay = f"{self.tokens - s.warmup_tokens:.4g} tokens / {max(0, self.steps - self.warmup_steps):,} steps"
        crit = f"{self.critical_batch:.4g}   ({'OK' if critical_batch_warning(self) is None else 'EXCEEDED'})"
        rows = [
            ("batch B (rows/step)", f"{ref.batch:g}", f"{self.batch:g}"),
            ("tokens per step B·L", f"{ref.batch * self.seq_len:,}", f"{self.tokens_per_step:,}"),
            ("horizon D (tokens)", f"{ref.tokens:.4g}", f"{self.tokens:.4g}"),
            ("optimizer steps", f"{optimizer_steps(ref.tokens, ref.batch, self.seq_len):,}", f"{self.steps:,}"),
            ("logical batch B_log(D)", "", f"{self.logical_batch:.4g}   = B_base (D/D_base)^{ref.gamma:g}"),
            ("kappa = B / B_log(D)", "1", f"{self.kappa:.4g}"),
            ("lr (peak)", f"{r.lr:.4g}", f"{s.lr:.4g}   x sqrt(kappa)"),
            ("betas", f"({r.betas[0]:.6g}, {r.betas[1]:.6g})", f"({s.betas[0]:.6g}, {s.betas[1]:.6g})   ^kappa"),
            ("eps", f"{r.eps:.4g}", f"{s.eps:.4g}   / sqrt(kappa)"),
            ("weight decay (x lr)", f"{r.weight_decay:.4g}", f"{s.weight_decay:.4g}   x sqrt(kappa)"),
            ("weight EMA", ema[0], ema[1] + ("" if s.ema is None else "   ^kappa")),
            ("warmup (tokens / steps)", f"{s.warmup_tokens:.4g}", f"{s.warmup_tokens:.4g} / {self.warmup_steps:,}"),
            (f"cosine decay to {s.final_lr_frac:g}·lr", "to D", decay),
            (f"critical batch D/(L·{self.min_steps})", "", crit),
        ]
        width, ref_width = (max(len(row[j]) for row in rows) for j in (0, 1))
        lines = [f"SDE batch reparameterization (seq_len L = {self.seq_len}, gamma = {ref.gamma:g})"]
        lines += [f"{name:<{width}}  {a:<{ref_width}}  {b}" for name, a, b in [("", "reference", "this run"), *rows]]
        return "\n".join(lines)

    __str__ = describe


def plan(
    reference: Reference, batch: int, tokens: float, seq_len: int, min_steps: int = DEFAULT_MIN_STEPS
) -> BatchPlan:
    """Derive every setting of a run at physical batch B (sequences of L tokens) and horizon D tokens."""
    k = kappa_of(batch, tokens, reference.batch, reference.tokens, reference.gamma)  # checks B > 0 and D
    if (warmup := reference.settings.warmup_tokens) >= tokens:
        raise ValueError(f"warmup_tokens ({warmup:g}) must be shorter than the horizon D ({tokens:g})")
    return BatchPlan(  # optimizer_steps and critical_batch check that B, L and S_crit are positive ints
        reference=reference,
        batch=batch,
        seq_len=seq_len,
        tokens=float(tokens),
        min_steps=min_steps,
        logical_batch=logical_batch(tokens, reference.batch, reference.tokens, reference.gamma),
        kappa=k,
        steps=optimizer_steps(tokens, batch, seq_len),
        critical_batch=critical_batch(tokens, seq_len, min_steps),
        settings=rescale(reference.settings, k),
    )


def critical_batch_warning(p: BatchPlan) -> str | None:
    """A warning to print at start-up when B > B_crit, i.e. D/(B·L) < S_crit steps' worth of tokens; else None.

    The test is B·L·S_crit > D, one product (exact for integer inputs), so a run of exactly S_crit
    full steps passes. ``BatchPlan.steps`` rounds D/(B·L) up (a partial last step), which is why the
    message quotes the unrounded D/(B·L).
    """
    if p.batch * p.seq_len * p.min_steps <= p.tokens:
        return None
    return (
        f"WARNING: physical batch B = {p.batch} exceeds the critical batch B_crit = D/(L·S_crit) = "
        f"{p.critical_batch:.4g} sequences: D/(B·L) = {p.tokens / p.tokens_per_step:.4g} optimizer steps "
        f"< S_crit = {p.min_steps}. The SDE rule (kappa = {p.kappa:.4g}) is outside its range here: expect a "
        f"worse loss per token than the logical run at B_log(D) = {p.logical_batch:.4g}. "
        "Use a smaller batch or a longer horizon."
    )
