"""The core of a tri-modal masked diffusion model (MDM), after Bethune et al. (arXiv 2602.21472, 2026).

This file holds every piece of the model's math and nothing else, in the order a reader needs it:

1. ``Vocab``      the shared token space V = V_text ⊔ V_audio ⊔ V_image plus special tokens.
2. ``Schedule``   noise schedules beta(t) with beta'(t) and the ELBO weight w(t) = beta'(t)/beta(t).
3. forward process: ``sample_times``, ``mask_positions``, ``apply_mask``, ``corrupt`` (x_0 -> x_t),
   with stratified t and anti-masking.
4. loss:          ``nelbo`` (the unbiased Monte-Carlo NELBO) and ``exact_nelbo`` (the same quantity
   by exact enumeration, for tiny problems: tests and notebook 3 use it).
5. ``Denoiser``   a bidirectional pre-norm transformer p_theta(x_0 | x_t) with size presets.

``data.py`` turns real text, images and audio into sequences over ``Vocab``; ``train.py`` minimises
``nelbo`` of a ``Denoiser``; ``sample.py`` runs the reverse process with the same ``Schedule`` and
``Denoiser``; ``evaluate.py`` reports ``nelbo`` in bits.

Notation (the paper's): x_0 clean tokens, x_t the sequence at noise level t in [0, 1], beta_t the
probability that a position is masked at time t, I_t the set of masked non-pad positions, MASK_m the
mask token of modality m, w(t) = beta'(t)/beta(t) the ELBO weight, N(x) the number of positions of x
that the forward process acts on ("data positions": all but padding and the task token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import combinations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# 1. The unified vocabulary
# ----------------------------------------------------------------------------------------------

MODALITIES: tuple[str, ...] = ("text", "audio", "image")
TASKS: tuple[str, ...] = ("text", "image_text", "audio_text")


@dataclass(frozen=True)
class Vocab:
    """The shared token space: one id range per modality, each followed by its BOS and EOS.

    Layout (global ids, every special id is derived here and nowhere else)::

        [ text content | BOS_text EOS_text PAD_text ]            text block    (predictable at text positions)
        [ audio content | BOS_audio EOS_audio ]                  audio block   (predictable at audio positions)
        [ image content | BOS_image EOS_image ]                  image block   (predictable at image positions)
        [ MASK_text MASK_audio MASK_image TASK_text TASK_image_text TASK_audio_text ]   control block

    Each modality's predictable tokens form one contiguous slice (``predict_slice``), so restricting
    the logits at a position to its modality's sub-vocabulary is a slice of the unembedding matrix,
    and MASK and task tokens (the control block) can never be predicted. The modality of *any* id is
    defined, MASK_m and PAD_text included, so the modality of every position of x_t can be read off
    x_t itself: a masked position still says which modality it belongs to.
    """

    text: int
    audio: int
    image: int

    def __post_init__(self) -> None:
        for m in MODALITIES:
            n = getattr(self, m)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"Vocab: the {m} vocabulary size must be a positive int, got {n!r}")

    # --- layout -----------------------------------------------------------------------------
    def content_size(self, modality: str) -> int:
        return getattr(self, _check_modality(modality))

    def block_start(self, modality: str) -> int:
        """First global id of a modality's block (its content tokens start there)."""
        start = 0
        for m in MODALITIES:
            if m == _check_modality(modality):
                return start
            start += self.predict_size(m)
        raise AssertionError("unreachable")

    def predict_size(self, modality: str) -> int:
        """Content tokens + BOS + EOS (+ PAD for text): what a position of this modality may be."""
        return self.content_size(modality) + (3 if modality == "text" else 2)

    def predict_slice(self, modality: str) -> slice:
        start = self.block_start(modality)
        return slice(start, start + self.predict_size(modality))

    def bos(self, modality: str) -> int:
        return self.block_start(modality) + self.content_size(modality)

    def eos(self, modality: str) -> int:
        return self.bos(modality) + 1

    @property
    def pad(self) -> int:
        """PAD_text: right-padding of sequences (see data.py for when it is data and when padding)."""
        return self.eos("text") + 1

    @property
    def control_start(self) -> int:
        return sum(self.predict_size(m) for m in MODALITIES)

    def mask(self, modality: str) -> int:
        return self.control_start + MODALITIES.index(_check_modality(modality))

    def task(self, task: str) -> int:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        return self.control_start + len(MODALITIES) + TASKS.index(task)

    @property
    def size(self) -> int:
        """Total number of ids |V|."""
        return self.control_start + len(MODALITIES) + len(TASKS)

    # --- id <-> modality, local <-> global ----------------------------------------------------
    def to_global(self, local: Tensor, modality: str) -> Tensor:
        """Map a tokenizer's local ids (0 .. size_m - 1) of one modality to global ids."""
        n = self.content_size(modality)
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= n):
            raise ValueError(
                f"{modality} token ids must lie in [0, {n}); got range [{int(local.min())}, {int(local.max())}]"
            )
        return local + self.block_start(modality)

    def to_local(self, ids: Tensor, modality: str) -> Tensor:
        """Inverse of ``to_global``; raises if an id is not a content token of ``modality``."""
        start, n = self.block_start(modality), self.content_size(modality)
        if ids.numel() and (int(ids.min()) < start or int(ids.max()) >= start + n):
            raise ValueError(
                f"ids are not all {modality} content tokens (global range [{start}, {start + n})); "
                f"got range [{int(ids.min())}, {int(ids.max())}]"
            )
        return ids - start

    def modality_table(self) -> Tensor:
        """(V,) int64: the modality index (into MODALITIES) of every id, specials included.

        Control tokens: MASK_m belongs to m; task tokens count as text (they are never predicted).
        """
        table = torch.empty(self.size, dtype=torch.long)
        for i, m in enumerate(MODALITIES):
            table[self.predict_slice(m)] = i
            table[self.mask(m)] = i
        for task in TASKS:
            table[self.task(task)] = MODALITIES.index("text")
        return table

    def mask_table(self) -> Tensor:
        """(V,) int64: the MASK_m id that replaces each id when it is masked."""
        masks = torch.tensor([self.mask(m) for m in MODALITIES])
        return masks[self.modality_table()]

    def check_ids(self, ids: Tensor) -> None:
        """Raise a clear error unless every id lies in [0, |V|)."""
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.size):
            raise ValueError(
                f"token ids must lie in [0, {self.size}) for this vocabulary; "
                f"got range [{int(ids.min())}, {int(ids.max())}]"
            )

    def modality_of(self, ids: Tensor) -> Tensor:
        """Modality index of each id (works on x_0 and on x_t alike); rejects out-of-range ids."""
        self.check_ids(ids)
        return self.modality_table().to(ids.device)[ids.long()]

    def is_task(self, ids: Tensor) -> Tensor:
        first = self.task(TASKS[0])
        return (ids >= first) & (ids < first + len(TASKS))

    def is_mask(self, ids: Tensor) -> Tensor:
        first = self.mask(MODALITIES[0])
        return (ids >= first) & (ids < first + len(MODALITIES))

    def name(self, gid: int) -> str:
        """Human-readable name of a global id, e.g. 'text:17', 'EOS_image', 'MASK_audio'."""
        if not 0 <= gid < self.size:
            raise ValueError(f"id {gid} is outside the vocabulary [0, {self.size})")
        for m in MODALITIES:
            if gid == self.bos(m):
                return f"BOS_{m}"
            if gid == self.eos(m):
                return f"EOS_{m}"
            if gid == self.mask(m):
                return f"MASK_{m}"
            s = self.block_start(m)
            if s <= gid < s + self.content_size(m):
                return f"{m}:{gid - s}"
        if gid == self.pad:
            return "PAD_text"
        return f"TASK_{TASKS[gid - self.task(TASKS[0])]}"

    # --- storage in checkpoints ---------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        return {"text": self.text, "audio": self.audio, "image": self.image}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        if not isinstance(d, dict) or set(d) != set(MODALITIES):
            raise ValueError(f"a Vocab dict needs exactly the keys {MODALITIES}; got {d!r}")
        return cls(**{m: d[m] for m in MODALITIES})


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    return modality


# ----------------------------------------------------------------------------------------------
# 2. Noise schedules
# ----------------------------------------------------------------------------------------------

SCHEDULES: tuple[str, ...] = ("linear", "cosine", "poly")


@dataclass(frozen=True)
class Schedule:
    """A masking schedule beta(t): the probability that a position is masked at time t.

    Every schedule is monotone with beta(0) = 0 and beta(1) = 1.

    * linear:     beta(t) = t,                beta'(t) = 1,                     w(t) = 1/t
    * cosine:     beta(t) = 1 - cos(pi t/2),  beta'(t) = (pi/2) sin(pi t/2),    w(t) = (pi/2) cot(pi t/4)
    * poly (p>0): beta(t) = t^p,              beta'(t) = p t^(p-1),             w(t) = p/t

    w(t) = beta'(t)/beta(t) is the ELBO weight of the masked cross-entropy (``nelbo``). For the
    cosine schedule sin(x)/(1 - cos(x)) = cot(x/2) gives the stable form above. The paper found a
    polynomial schedule best for generation; the continuous-time NELBO itself does not depend on
    the schedule (substitute b = beta(t): integral of w(t) F(beta(t)) dt = integral of F(b)/b db).
    """

    kind: str = "linear"
    p: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; expected one of {SCHEDULES}")
        if self.kind == "poly" and not self.p > 0:
            raise ValueError(f"the polynomial schedule needs an exponent p > 0, got {self.p}")

    def beta(self, t: Tensor) -> Tensor:
        if self.kind == "linear":
            return t.clone()
        if self.kind == "cosine":
            return 1 - torch.cos(math.pi / 2 * t)
        return t**self.p

    def dbeta(self, t: Tensor) -> Tensor:
        """beta'(t)."""
        if self.kind == "linear":
            return torch.ones_like(t)
        if self.kind == "cosine":
            return math.pi / 2 * torch.sin(math.pi / 2 * t)
        return self.p * t ** (self.p - 1)

    def weight(self, t: Tensor) -> Tensor:
        """w(t) = beta'(t)/beta(t), the weight of masked tokens in the NELBO."""
        if self.kind == "linear":
            return 1 / t
        if self.kind == "cosine":
            return math.pi / 2 / torch.tan(math.pi / 4 * t)
        return self.p / t

    def complement_weight(self, t: Tensor) -> Tensor:
        """beta'(t)/(1 - beta(t)): the weight of the anti-masked copy (see ``corrupt``)."""
        return self.dbeta(t) / (1 - self.beta(t))

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """'linear', 'cosine', 'poly2' or 'poly:0.5' -> Schedule."""
        if spec.startswith("poly"):
            rest = spec[4:].lstrip(":")
            try:
                return cls("poly", float(rest) if rest else 1.0)
            except ValueError:
                raise ValueError(f"bad polynomial schedule {spec!r}; write e.g. 'poly2' or 'poly:0.5'") from None
        return cls(spec)

    def __str__(self) -> str:
        return f"poly{self.p:g}" if self.kind == "poly" else self.kind


# ----------------------------------------------------------------------------------------------
# 3. The forward process q(x_t | x_0)
# ----------------------------------------------------------------------------------------------


def sample_times(
    n: int, t_min: float = 1e-3, stratified: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """n noise levels t ~ U[t_min, 1 - t_min] (float64).

    stratified: one shared offset u and t_i = lo + (hi - lo)(i + u)/n (the "low-discrepancy" or
    antithetic sampler of MDLM/MD4): the t's cover [lo, hi] evenly, which lowers the variance of a
    batch's loss, and each t_i is still marginally uniform, so the estimator stays unbiased.

    Why clip at t_min: with w(t) ~ 1/t a single-token mask at small t is rare but weighted ~1/t, so
    the estimator's variance diverges logarithmically as t -> 0; the anti-masked copy has the same
    divergence at t -> 1. Clipping estimates the NELBO restricted to [t_min, 1 - t_min] (``nelbo``
    multiplies by the window length 1 - 2 t_min, the Jacobian of t(u)); the part left out is
    about t_min N E[-log p(x_i | x with one position masked)] at the low end and t_min times the
    all-masked cross-entropy at the high end, i.e. a relative error of order t_min.
    """
    if not 0 <= t_min < 0.5:
        raise ValueError(f"t_min must lie in [0, 0.5), got {t_min}")
    if stratified:
        u = (torch.arange(n, dtype=torch.float64) + torch.rand((), generator=generator, dtype=torch.float64)) / n
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    return t_min + (1 - 2 * t_min) * u


def mask_positions(u: Tensor, maskable: Tensor, beta_t: Tensor, complement: bool = False) -> Tensor:
    """Which positions are masked: (B, L) bool.

    u (B, L): one uniform per position, the coupling. Position i is masked iff u_i < beta_t, so
    for a fixed u the masked set only grows with t (masks are absorbing and nested in t) and each
    position is masked independently with probability beta_t. ``complement`` returns the other
    positions (u_i >= beta_t): a mask at ratio 1 - beta_t. Positions with maskable False (padding,
    the task token) are never masked.
    """
    below = u < beta_t[:, None]
    return (~below if complement else below) & maskable


def apply_mask(x0: Tensor, masked: Tensor, vocab: Vocab) -> Tensor:
    """x_t: x_0 with each masked position replaced by MASK_m of that position's modality m."""
    mask_ids = vocab.mask_table().to(x0.device)[x0]
    return torch.where(masked, mask_ids, x0)


def maskable_positions(x0: Tensor, pad: Tensor, vocab: Vocab) -> Tensor:
    """(B, L) bool: the data positions the forward process acts on (not padding, not a task token).

    The task token is a given header, like the prompt of an instruction; the NELBO is therefore of
    the sequence given its task, and N(x) = maskable_positions(...).sum(-1).
    """
    return ~pad & ~vocab.is_task(x0)


@dataclass
class Corrupted:
    """One draw of the forward process for a batch (rows may be duplicated by anti-masking).

    x0, x_t, masked, maskable: (B, L); t, weight: (B,) float64 where weight is the NELBO weight of
    each row including the window length (w(t)(1 - 2 t_min), or the anti-masked weight).
    """

    x0: Tensor
    x_t: Tensor
    masked: Tensor
    maskable: Tensor
    t: Tensor
    weight: Tensor

    def rows(self, sl: slice) -> Corrupted:
        """The rows ``sl`` (a data-parallel rank's share, or one micro-batch)."""
        return Corrupted(*(getattr(self, f)[sl] for f in ("x0", "x_t", "masked", "maskable", "t", "weight")))

    def to(self, device: torch.device | str) -> Corrupted:
        return Corrupted(*(getattr(self, f).to(device) for f in ("x0", "x_t", "masked", "maskable", "t", "weight")))


def corrupt(
    x0: Tensor,
    pad: Tensor,
    vocab: Vocab,
    schedule: Schedule,
    t: Tensor | None = None,
    *,
    t_min: float = 1e-3,
    stratified: bool = True,
    anti_masking: bool = False,
    generator: torch.Generator | None = None,
) -> Corrupted:
    """Draw x_t ~ q(x_t | x_0) for a batch, optionally with anti-masking.

    x0 (B, L) clean ids, pad (B, L) bool. t (B,) may be given (then t_min only sets the window
    length used in the weight); otherwise it is drawn by ``sample_times``.

    Anti-masking (our reading of the paper's term, documented as such): the batch holds each of the
    B sequences twice, once with mask M drawn at time t and once with the complement of M on its
    maskable positions. The complement is a mask at ratio 1 - beta(t), i.e. distributed as the
    forward process at the time s with beta(s) = 1 - beta(t). Substituting b = 1 - beta(t),
    db = -beta'(t) dt, shows that the complement's weight must be beta'(t)/(1 - beta(t)) for its
    expectation to be the NELBO (for the linear schedule: the mask at time 1 - t, weight
    1/(1 - t)). Each copy is unbiased on its own; together every token is supervised exactly once
    per pair, which lowers variance at the same compute per row. The output then has 2B rows:
    rows [0, B) the masks, rows [B, 2B) their complements.
    """
    if x0.shape != pad.shape or x0.dim() != 2:
        raise ValueError(f"x0 and pad must both be (B, L); got {tuple(x0.shape)} and {tuple(pad.shape)}")
    vocab.check_ids(x0)
    B = x0.shape[0]
    if t is None:
        t = sample_times(B, t_min, stratified, generator)
    t = t.to(torch.float64)
    if t.shape != (B,):
        raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
    maskable = maskable_positions(x0, pad, vocab)
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    beta_t = schedule.beta(t).to(x0.device)
    window = 1 - 2 * t_min
    masked = mask_positions(u, maskable, beta_t)
    weight = window * schedule.weight(t)
    if anti_masking:
        masked = torch.cat([masked, mask_positions(u, maskable, beta_t, complement=True)])
        weight = torch.cat([weight, window * schedule.complement_weight(t)])
        x0, maskable, t = torch.cat([x0, x0]), torch.cat([maskable, maskable]), torch.cat([t, t])
    return Corrupted(x0, apply_mask(x0, masked, vocab), masked, maskable, t, weight.to(x0.device))


def next_token_batch(x0: Tensor, pad: Tensor, vocab: Vocab) -> Corrupted:
    """The autoregressive twin's "forward process": nothing is masked, every data position is predicted.

    With a causal ``Denoiser`` (``ModelConfig(causal=True)``), ``nelbo`` of this batch is the
    next-token NLL per data token, -1/N sum_i log p(x_i | x_<i): the baseline that masked diffusion
    is compared with at equal compute (evaluate.py, bench.py). Position 0 (the task token) is given.
    """
    maskable = maskable_positions(x0, pad, vocab)
    ones = torch.ones(x0.shape[0], dtype=torch.float64, device=x0.device)
    return Corrupted(x0, x0, maskable, maskable, ones, ones)


def drop_segments(c: Corrupted, drop: Tensor, vocab: Vocab) -> Corrupted:
    """Mask whole conditioning segments and take them out of the loss (classifier-free guidance).

    drop (B, L) bool: positions to hide, e.g. the caption of an image-text row. They become MASK_m,
    are not supervised and do not count in N(x), so the row estimates the NELBO of the rest of the
    sequence *without* that segment: the unconditional model that guidance contrasts with the
    conditional one (``sample.py``). Rows without dropped positions are unchanged.
    """
    x_t = torch.where(drop, vocab.mask_table().to(c.x0.device)[c.x0], c.x_t)
    return Corrupted(c.x0, x_t, c.masked & ~drop, c.maskable & ~drop, c.t, c.weight)


def reveal_segments(c: Corrupted, given: Tensor) -> Corrupted:
    """Show whole segments clean and take them out of the loss: a conditional NELBO.

    given (B, L) bool: positions to condition on, e.g. the caption of an image-text row. They keep
    their clean tokens, are not supervised and do not count in N(x), so the row estimates
    -log p(rest | given segment): exactly the situation of text-to-image or captioning at sampling
    time, which the joint forward process reaches only rarely (a whole caption unmasked while most
    of the image is masked needs every caption token to survive at a large t).
    """
    x_t = torch.where(given, c.x0, c.x_t)
    return Corrupted(c.x0, x_t, c.masked & ~given, c.maskable & ~given, c.t, c.weight)


# ----------------------------------------------------------------------------------------------
# 4. The loss: an unbiased estimate of the negative ELBO
# ----------------------------------------------------------------------------------------------

# nll_fn(x_t, x0, where) -> (n,) float: -log p_theta(x0_i | x_t) at the n positions where (B, L) is
# True, in row-major order. ``Denoiser.nll_at`` is one; the tests pass exact "oracle" ones.
NllFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class NELBO:
    """A batch's NELBO estimate in nats per data token.

    loss: scalar, sum over rows of w(t) * sum_{i in I_t} -log p(x0_i | x_t), divided by the sum
    over rows of N(x) (differentiable; what training minimises).
    modality_sums, modality_counts: (3,) the same numerator restricted to the masked positions of
    each modality, and that modality's number of data positions (detached; ``per_modality`` divides
    them, which waits for the device, so training loops accumulate the tensors and divide at logging).
    per_row: (B,) each row's own estimate L(x)/N(x) (detached, float64).
    """

    loss: Tensor
    modality_sums: Tensor
    modality_counts: Tensor
    per_row: Tensor

    @property
    def per_modality(self) -> dict[str, float]:
        """{modality: nats per data token of that modality} (nan where the batch has none)."""
        return per_modality(self.modality_sums, self.modality_counts)


def per_modality(sums: Tensor, counts: Tensor) -> dict[str, float]:
    values = (sums.double() / counts.double()).tolist()
    return {m: (v if c > 0 else float("nan")) for m, v, c in zip(MODALITIES, values, counts.tolist(), strict=True)}


def nelbo(nll_fn: NllFn, c: Corrupted, vocab: Vocab) -> NELBO:
    """The per-token NELBO estimate from one forward-process draw ``c``.

        L(x) = w(t) * sum_{i in I_t} -log p_theta(x_i | x_t),        reported as L(x) / N(x)

    I_t are the masked positions, N(x) the number of data positions. Dividing by N(x), a constant of
    the sequence, keeps the estimate unbiased; dividing by |I_t| instead (as some code does) is not
    an estimate of the NELBO at all (tests/test_mdm.py shows the bias). Logits are computed only at
    masked positions: nothing else enters the loss.
    """
    nll = nll_fn(c.x_t, c.x0, c.masked)  # (n,) at the masked positions, row-major
    if nll.dim() != 1 or nll.shape[0] != c.masked.sum():
        raise ValueError(f"nll_fn must return one value per masked position; got shape {tuple(nll.shape)}")
    rows = c.masked.nonzero()[:, 0]
    weighted = c.weight[rows].to(nll.dtype) * nll  # (n,) w(t_row) * -log p
    n_data = c.maskable.sum(-1)  # (B,) N(x)
    loss = weighted.sum() / n_data.sum().clamp_min(1)
    per_row = torch.zeros(c.x0.shape[0], dtype=torch.float64, device=nll.device)
    per_row.index_add_(0, rows, weighted.detach().double())
    per_row = per_row / n_data.clamp_min(1)
    modality = vocab.modality_of(c.x0)  # (B, L)
    sums = torch.zeros(len(MODALITIES), dtype=torch.float64, device=nll.device)
    sums.index_add_(0, modality[c.masked], weighted.detach().double())
    counts = torch.bincount(modality[c.maskable], minlength=len(MODALITIES))
    return NELBO(loss, sums, counts, per_row)


def exact_nelbo(
    nll_fn: NllFn, x0: Tensor, maskable: Tensor, vocab: Vocab, b_lo: float = 0.0, b_hi: float = 1.0
) -> float:
    """The NELBO of one sequence by exact enumeration of all masks (tiny N only: 2^N model calls).

    For a mask ratio b, let F(b) = E_{M ~ Bernoulli(b)^N} sum_{i in M} -log p(x_i | x with M masked)
    = sum_k C(N,k) b^k (1-b)^(N-k) A_k, where A_k averages sum_{i in M} -log p(...) over the C(N,k)
    masks of size k. The continuous-time NELBO is, for any schedule (substitute b = beta(t)),

        NELBO = int_0^1 w(t) F(beta(t)) dt = int_0^1 F(b)/b db = sum_{k=1}^N A_k / k,

    since int_0^1 b^(k-1)(1-b)^(N-k) db = (k-1)!(N-k)!/N!. With a window, the integral over
    b in [b_lo, b_hi] is returned instead (computed by Gauss-Legendre quadrature, exact for this
    polynomial integrand). This is what a clipped Monte-Carlo estimator converges to:
    t in [t_lo, t_hi] covers b in [beta(t_lo), beta(t_hi)], and its anti-masked copies cover
    [1 - beta(t_hi), 1 - beta(t_lo)].

    x0: (L,) ids; maskable: (L,) bool. Returns nats for the whole sequence (not per token).
    """
    idx = maskable.nonzero()[:, 0].tolist()
    N = len(idx)
    if N > 16:
        raise ValueError(f"exact_nelbo enumerates 2^N masks; N = {N} is too large (at most 16)")
    A = [0.0] * (N + 1)
    for k in range(1, N + 1):
        subsets = list(combinations(idx, k))
        where = torch.zeros(len(subsets), x0.shape[0], dtype=torch.bool)
        for r, s in enumerate(subsets):
            where[r, list(s)] = True
        xs = x0.expand(len(subsets), -1)
        nll = nll_fn(apply_mask(xs, where, vocab), xs, where)
        A[k] = float(nll.double().sum()) / len(subsets)
    if (b_lo, b_hi) == (0.0, 1.0):
        return sum(A[k] / k for k in range(1, N + 1))
    nodes, weights = _gauss_legendre(N + 1)
    b = b_lo + (b_hi - b_lo) * (nodes + 1) / 2
    integrand = sum(math.comb(N, k) * A[k] * b ** (k - 1) * (1 - b) ** (N - k) for k in range(1, N + 1))
    return float((weights * integrand).sum() * (b_hi - b_lo) / 2)


def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


# ----------------------------------------------------------------------------------------------
# 5. The denoiser: a bidirectional pre-norm transformer p_theta(x_0 | x_t)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the denoiser. Presets in ``PRESETS``; parameter counts also depend on the Vocab."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 256
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = mlp_ratio * d_model (rounded up to a multiple of 64)
    rope_base: float = 10_000.0
    causal: bool = False  # True only for the autoregressive twin used as a baseline (bench, evaluate)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("the head dimension must be even for rotary embeddings")

    @property
    def mlp_hidden(self) -> int:
        return 64 * math.ceil(self.mlp_ratio * self.d_model / 64)


# Width, depth and heads of each named size. The size in each name counts the transformer body
# (about 12 d^2 per layer, the "non-embedding" count of scaling-law papers); the embedding and
# unembedding add 2 |V| d on top (0.8M for tiny's default vocabulary, 77M at d=768 with a 50k one).
# The paper's largest model is ~3B.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4, max_len=256),  # 0.8M body, ~1.6M total; CPU minutes
    "small": ModelConfig(d_model=512, n_layers=8, n_heads=8, max_len=256),  # 25M
    "base": ModelConfig(d_model=768, n_layers=18, n_heads=12, max_len=1024),  # 127M
    "medium": ModelConfig(d_model=1024, n_layers=28, n_heads=16, max_len=1024),  # 353M
    "large": ModelConfig(d_model=2048, n_layers=20, n_heads=16, max_len=2048),  # 1.0B
    "xl": ModelConfig(d_model=2560, n_layers=38, n_heads=20, max_len=2048),  # 3.0B
}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rotary_tables(max_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_len, head_dim/2): angle(p, j) = p * base^(-2j/head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_j, x_{j+d/2}) of x (B, H, L, d) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm and rotary positions; bidirectional unless causal."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.causal = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.causal
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B,H,L,hd)
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, hd)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    """MLP(x) = W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.d_model), SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Denoiser(nn.Module):
    """p_theta(x_0 | x_t): a bidirectional pre-norm transformer over the shared vocabulary.

    No time input: the pattern of MASK tokens in x_t carries all the information about t that the
    optimal denoiser needs (the true conditionals of masked positions do not depend on t).

    Output restriction ("zero-masking" plus modality restriction): at a position of modality m the
    logits cover only ``vocab.predict_slice(m)`` (m's content tokens, BOS_m, EOS_m and, for text,
    PAD_text). MASK and task tokens and other modalities' tokens get probability exactly 0.

    Initialization (documented because it matters for small runs):
    * token embeddings and all linear layers ~ N(0, 0.02^2);
    * the two residual-output projections of each block (attention out, MLP down) ~
      N(0, (0.02 / sqrt(2 n_layers))^2), so the residual stream's variance does not grow with depth;
    * RMSNorm gains = 1;
    * the unembedding is zero, so at initialization every position predicts the uniform distribution
      over its modality's sub-vocabulary and the loss per masked token is exactly log |slice_m|.
    """

    def __init__(self, cfg: ModelConfig, vocab: Vocab) -> None:
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        self.embed = nn.Embedding(vocab.size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, vocab.control_start, bias=False)  # only predictable ids
        cos, sin = rotary_tables(cfg.max_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("modality_ids", vocab.modality_table(), persistent=False)
        self.slices = [vocab.predict_slice(m) for m in MODALITIES]
        logit_mask = torch.full((len(MODALITIES), vocab.size), -math.inf)  # (3, |V|): 0 on slice_m
        for m, s in enumerate(self.slices):
            logit_mask[m, s] = 0.0
        self.register_buffer("logit_mask", logit_mask, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            elif name == "unembed.weight":
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02)

    def num_parameters(self, body_only: bool = False) -> int:
        """All parameters, or those of the transformer body (without embedding and unembedding)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() - self.unembed.weight.numel() if body_only else total

    def hidden(self, x_t: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, d) final normalized hidden states."""
        L = x_t.shape[1]
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} exceeds the model's max_len {self.cfg.max_len}")
        h = self.embed(x_t)
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.final_norm(h)

    def modality_logits(self, h: Tensor, m: int) -> Tensor:
        """(n, d) hidden states of positions of modality MODALITIES[m] -> (n, |slice_m|) logits."""
        s = self.slices[m]
        return h @ self.unembed.weight[s].T

    def nll_at(self, x_t: Tensor, x0: Tensor, where: Tensor) -> Tensor:
        """-log p_theta(x0_i | x_t) at the positions where (B, L) is True -> (n,), row-major.

        Only the selected positions are unembedded, each against its own modality's slice: the
        logits at the other positions are never computed. For the causal twin (``cfg.causal``, the
        autoregressive baseline) x_t is the clean row and position i is predicted from the hidden
        state at i - 1: -log p(x_i | x_<i), next-token prediction (see ``next_token_batch``).
        """
        h = self.hidden(x_t)  # (B, L, d)
        if self.cfg.causal:
            h = F.pad(h[:, :-1], (0, 0, 1, 0))  # the state at i - 1 predicts position i
        h = h[where]  # (n, d)
        mod = self.modality_ids[x_t[where]]  # (n,) modality of each selected position
        target = x0[where]
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for m, s in enumerate(self.slices):
            rows = (mod == m).nonzero()[:, 0]
            if rows.numel():
                logits = self.modality_logits(h[rows], m).float()
                out[rows] = F.cross_entropy(logits, target[rows] - s.start, reduction="none")
        return out

    def forward(self, x_t: Tensor, where: Tensor | None = None) -> Tensor:
        """Logits over the whole vocabulary, -inf outside each position's sub-vocabulary (float32).

        x_t (B, L) ids. Without ``where``: (B, L, |V|). With a bool ``where`` (B, L): (n, |V|) at
        those positions only, row-major (the samplers ask only for still-masked positions).
        """
        h = self.hidden(x_t)
        mod = self.modality_ids[x_t]  # (B, L)
        if where is not None:
            h, mod = h[where], mod[where]
        logits = h @ self.unembed.weight.T  # (..., |predictable|)
        logits = F.pad(logits.float(), (0, self.vocab.size - logits.shape[-1]), value=-math.inf)
        return logits + self.logit_mask[mod]


@torch.no_grad()
def embed_codes(model: Denoiser, modality: str, codes: Tensor, generator: torch.Generator | None = None) -> None:
    """Start a media block's input embeddings from what its tokens stand for (call before training).

    A media token is a code c in R^k: the gray levels of a patch's pixels (``data.PixelTokenizer``)
    or an FSQ code (``fsq``), and near codes mean near content. A randomly initialized embedding
    table knows none of this: each of the |V_m| ids must learn its meaning separately, from the few
    rows that contain it. Adding a random linear image of the standardized code,

        E[id] <- E[id] + z(c_id) R,   z = (c - mean) / std per code dimension,   R ~ N(0, 0.02^2)^(k x d),

    gives the transformer, from step 0, a view of each image / clip that is linear in its content
    (a linear read-out of the 64 pixels already tells most digits apart). The table stays an ordinary
    trained parameter. Two 8M-token runs of train.py that differ only in this (``--code_init=false``
    against true, both with ``--audio_speeds=0.9,1.1``; test split): held-out NELBO of text 7.67
    against 7.21 bits per token, image 3.41 against 3.21, audio 3.34 against 3.12; speech
    recognition 0.78 against 0.87. Captioning stayed low in both (0.21 against 0.18; it varies
    from 0.18 to 0.40 across runs at that budget, README *Results*). train.py turns it on.
    codes: (|V_m|, k), one row per content token of the modality, in id order.
    """
    if modality not in ("image", "audio"):
        raise ValueError(f"embed_codes starts media embeddings (image, audio), not {modality!r}")
    n = model.vocab.content_size(modality)
    if codes.ndim != 2 or codes.shape[0] != n:
        raise ValueError(f"{modality} codes must have shape ({n}, k), one row per token; got {tuple(codes.shape)}")
    z = (codes - codes.mean(0)) / codes.std(0).clamp_min(1e-6)
    R = torch.randn(codes.shape[1], model.cfg.d_model, generator=generator, dtype=torch.float64) * 0.02
    start = model.vocab.block_start(modality)
    model.embed.weight[start : start + n] += (z.double() @ R).to(model.embed.weight)


def model_summary(model: Denoiser) -> str:
    """One line: preset shape and parameter count (embedding, body, unembedding)."""
    cfg = model.cfg
    total, body = model.num_parameters(), model.num_parameters(body_only=True)
    return (
        f"Denoiser d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} |V|={model.vocab.size}: "
        f"{total / 1e6:.2f}M parameters ({body / 1e6:.2f}M body, {(total - body) / 1e6:.2f}M embedding + unembedding)"
    )


def config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)


if __name__ == "__main__":
    # A two-second tour: the forward process on the bytes of a sentence, and an untrained model's loss.
    vocab = Vocab(text=256, audio=64, image=17)
    sentence = "Masked diffusion forgets a sentence one token at a time."
    x0 = vocab.to_global(torch.tensor([list(sentence.encode())]), "text")
    pad = torch.zeros_like(x0, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(x0.shape, generator=g, dtype=torch.float64)
    for sched in (Schedule("linear"), Schedule("cosine"), Schedule("poly", 2.0)):
        print(f"schedule {sched}:")
        for t in (0.1, 0.5, 0.9):
            masked = mask_positions(u, ~pad, sched.beta(torch.tensor([t], dtype=torch.float64)))
            shown = "".join("_" if m else chr(c) for m, c in zip(masked[0], sentence.encode(), strict=True))
            print(f"  t={t:.1f} beta={float(sched.beta(torch.tensor(t))):.2f}  {shown}")
    model = Denoiser(PRESETS["tiny"], vocab)
    print(model_summary(model))
    c = corrupt(x0.expand(8, -1), pad.expand(8, -1), vocab, Schedule("linear"), generator=g)
    with torch.no_grad():
        result = nelbo(model.nll_at, c, vocab)
    n = vocab.predict_size("text")
    print(f"untrained NELBO, one draw of 8 rows: {result.loss.item():.3f} nats/token")
    print(f"(a zero-initialised unembedding is uniform over the text block: expectation log {n} = {math.log(n):.3f})")
