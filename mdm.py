"""The math of a tri-modal masked diffusion model (MDM), after Bethune et al. (arXiv 2602.21472, 2026).

Masked diffusion learns a distribution over token sequences by learning to undo a simple
corruption: each token of a clean row x_0 is replaced by a MASK token with probability beta_t, and
a network is trained to predict the original tokens at the masked positions. Generating runs the
corruption backwards, from an all-MASK row to a clean one. This file holds every equation of that,
in the order a reader needs it:

1. ``Vocab``      the shared token space V = V_text ⊔ V_audio ⊔ V_image plus special tokens.
2. ``Schedule``   noise schedules beta(t) with beta'(t) and the ELBO weight w(t) = beta'(t)/beta(t).
3. forward process: ``sample_times``, ``mask_positions``, ``apply_mask``, ``corrupt`` (x_0 -> x_t),
   with stratified t and anti-masking, or ``corrupt_by_count`` (the mask-count form); conditional and
   unconditional rows.
4. loss:          ``nelbo`` (the unbiased Monte-Carlo NELBO) and ``exact_nelbo`` (the same quantity
   by exact enumeration, for tiny problems: tests and notebook 03 use it).

``model.py`` is the network p_theta(x_0 | x_t), ``data.py`` makes rows over ``Vocab``, ``train.py``
minimises ``nelbo``, ``sample.py`` runs the reverse process, ``evaluate.py`` reports ``nelbo`` in bits.

Notation (that of MDLM and MD4, with beta = 1 - alpha): x_0 clean tokens, x_t the row at noise
level t in [0, 1], beta_t the probability that a position is masked at time t, I_t the set of
masked data positions, MASK_m the mask token of modality m, w(t) = beta'(t)/beta(t) the ELBO
weight, N(x) the number of positions of x that the forward process acts on ("data positions": all
but padding and the task token). What this project takes from the paper comes from its abstract
and a published summary of it (the sources are named where each fact is used).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from itertools import combinations

import torch
from torch import Tensor

# --- 1. The unified vocabulary --------------------------------------------------------------------
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
    and MASK and task tokens can never be predicted. Every id has a modality, MASK_m and PAD_text
    included, so a masked position of x_t still says which modality it belongs to.
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

    @functools.cache  # noqa: B019 (a Vocab is frozen and hashable; the data loader asks for these per row)
    def block_start(self, modality: str) -> int:
        """First global id of a modality's block (its content tokens start there)."""
        return sum(self.predict_size(m) for m in MODALITIES[: MODALITIES.index(_check_modality(modality))])

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
    @functools.cache  # noqa: B019
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
        _check_range(local, 0, n, f"{modality} token ids must lie in [0, {n})")
        return local + self.block_start(modality)

    def to_local(self, ids: Tensor, modality: str) -> Tensor:
        """Inverse of ``to_global``; raises if an id is not a content token of ``modality``."""
        start = self.block_start(modality)
        end = start + self.content_size(modality)
        _check_range(ids, start, end, f"ids are not all {modality} content tokens (global range [{start}, {end}))")
        return ids - start

    def modality_table(self) -> Tensor:
        """(V,) int64: the modality index (into MODALITIES) of every id; MASK_m is m's, task tokens are text."""
        table = torch.full((self.size,), MODALITIES.index("text"))
        for i, m in enumerate(MODALITIES):
            table[self.predict_slice(m)] = i
            table[self.mask(m)] = i
        return table

    def mask_table(self) -> Tensor:
        """(V,) int64: the MASK_m id that replaces each id when it is masked."""
        return torch.tensor([self.mask(m) for m in MODALITIES])[self.modality_table()]

    def check_ids(self, ids: Tensor) -> None:
        """Raise a clear error unless every id lies in [0, |V|)."""
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        _check_range(ids, 0, self.size, f"token ids must lie in [0, {self.size}) for this vocabulary")

    def modality_of(self, ids: Tensor) -> Tensor:
        """Modality index of each id (works on x_0 and on x_t alike); rejects out-of-range ids."""
        self.check_ids(ids)
        return self.modality_table().to(ids.device)[ids.long()]

    def is_task(self, ids: Tensor) -> Tensor:
        return (ids >= self.task(TASKS[0])) & (ids < self.size)

    def is_mask(self, ids: Tensor) -> Tensor:
        return (ids >= self.control_start) & (ids < self.task(TASKS[0]))

    def name(self, gid: int) -> str:
        """Human-readable name of a global id, e.g. 'text:17', 'EOS_image', 'MASK_audio'."""
        if not 0 <= gid < self.size:
            raise ValueError(f"id {gid} is outside the vocabulary [0, {self.size})")
        for m in MODALITIES:
            local, n = gid - self.block_start(m), self.content_size(m)
            if local < self.predict_size(m):
                return f"{m}:{local}" if local < n else ("BOS_", "EOS_", "PAD_")[local - n] + m
        k = gid - self.control_start  # past the three blocks: the control block
        return f"MASK_{MODALITIES[k]}" if k < len(MODALITIES) else f"TASK_{TASKS[k - len(MODALITIES)]}"

    # --- storage in checkpoints ---------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        return {m: getattr(self, m) for m in MODALITIES}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        if not isinstance(d, dict) or set(d) != set(MODALITIES):
            raise ValueError(f"a Vocab dict needs exactly the keys {MODALITIES}; got {d!r}")
        return cls(**{m: d[m] for m in MODALITIES})


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    return modality


def _check_range(ids: Tensor, lo: int, hi: int, message: str) -> None:
    if ids.numel() and (int(ids.min()) < lo or int(ids.max()) >= hi):
        raise ValueError(f"{message}; got range [{int(ids.min())}, {int(ids.max())}]")


# --- 2. Noise schedules ---------------------------------------------------------------------------
SCHEDULES: tuple[str, ...] = ("linear", "cosine", "poly")


@dataclass(frozen=True)
class Schedule:
    """A masking schedule beta(t) = P(a position is masked at time t); monotone, beta(0) = 0, beta(1) = 1.

    * linear:     beta(t) = t,                beta'(t) = 1,                     w(t) = 1/t
    * cosine:     beta(t) = 1 - cos(pi t/2),  beta'(t) = (pi/2) sin(pi t/2),    w(t) = (pi/2) cot(pi t/4)
    * poly (p>0): beta(t) = t^p,              beta'(t) = p t^(p-1),             w(t) = p/t

    w(t) = beta'(t)/beta(t) is the ELBO weight of the masked cross-entropy (``nelbo``); for the
    cosine schedule sin(x)/(1 - cos(x)) = cot(x/2) gives the stable form above. The paper's
    published summary reports a polynomial schedule as the best for generation quality. The
    continuous-time NELBO of a fixed denoiser does not depend on the schedule (``exact_nelbo``
    shows why); the variance of its estimator does, and so does training.
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


# --- 3. The forward process q(x_t | x_0) ----------------------------------------------------------
def sample_times(
    n: int, t_min: float = 1e-3, stratified: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """n noise levels t ~ U[t_min, 1 - t_min] (float64).

    stratified: one shared offset u and the n points lo + (hi - lo)(j + u)/n, j = 0 .. n-1 (the
    "low-discrepancy" sampler of MDLM/MD4), dealt to the rows in a random order. The t's cover
    [lo, hi] evenly, which lowers the variance of a batch's loss; the random order makes each row's
    t marginally uniform (its stratum j is uniform, its offset u too), so every row's estimate is
    unbiased on its own, not only the batch mean.

    Why clip at t_min: with w(t) ~ 1/t a single-token mask at small t is rare but weighted ~1/t, so
    the estimator's variance diverges logarithmically as t -> 0; the anti-masked copy has the same
    divergence at t -> 1. Clipping estimates the NELBO restricted to [t_min, 1 - t_min] (``corrupt``
    multiplies by the window length 1 - 2 t_min, the Jacobian of t(u)); the part left out is
    about t_min N E[-log p(x_i | x with one position masked)] at the low end and t_min times the
    all-masked cross-entropy at the high end, i.e. a relative error of order t_min.
    """
    if not 0 <= t_min < 0.5:
        raise ValueError(f"t_min must lie in [0, 0.5), got {t_min}")
    if stratified:
        strata = torch.randperm(n, generator=generator).double()
        u = (strata + torch.rand((), generator=generator, dtype=torch.float64)) / n
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    return t_min + (1 - 2 * t_min) * u


def mask_positions(u: Tensor, maskable: Tensor, beta_t: Tensor, complement: bool = False) -> Tensor:
    """Which positions are masked: (B, L) bool.

    u (B, L): one uniform per position, the coupling. Position i is masked iff u_i < beta_t, so
    for a fixed u the masked set only grows with t (masks are absorbing and nested in t) and each
    position is masked independently with probability beta_t. ``complement`` returns the other
    maskable positions (u_i >= beta_t): a mask at ratio 1 - beta_t. Positions with maskable False
    (padding, the task token) are never masked.
    """
    below = u < beta_t[:, None]
    return (~below if complement else below) & maskable


def apply_mask(x0: Tensor, masked: Tensor, vocab: Vocab) -> Tensor:
    """x_t: x_0 with each masked position replaced by MASK_m of that position's modality m."""
    return torch.where(masked, vocab.mask_table().to(x0.device)[x0], x0)


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
        return Corrupted(*(getattr(self, f.name)[sl] for f in fields(self)))

    def to(self, device: torch.device | str) -> Corrupted:
        return Corrupted(*(getattr(self, f.name).to(device) for f in fields(self)))


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

    Anti-masking: the paper's published summary reports that it improved FID, FAD and text
    benchmarks at no extra cost, without defining it; this project reads it as complementary masks
    (our reading, not the paper's text). The batch holds each of the B sequences twice, once with
    mask M drawn at time t and once with the complement of M on its maskable positions: a mask at
    ratio 1 - beta(t), i.e. the forward process at the time s with beta(s) = 1 - beta(t).
    Substituting b = 1 - beta(t), db = -beta'(t) dt, shows that the complement's weight must be
    beta'(t)/(1 - beta(t)) for its expectation to be the NELBO (for the linear schedule: the mask
    at time 1 - t, weight 1/(1 - t)). Each copy is unbiased on its own; together every token is
    supervised exactly once per pair, which lowers variance at the same compute per row. The
    output has 2B rows: rows [0, B) the masks, rows [B, 2B) their complements.
    """
    if x0.shape != pad.shape or x0.dim() != 2:
        raise ValueError(f"x0 and pad must both be (B, L); got {tuple(x0.shape)} and {tuple(pad.shape)}")
    vocab.check_ids(x0)
    B = x0.shape[0]
    t = (sample_times(B, t_min, stratified, generator) if t is None else t).to(torch.float64)
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


def corrupt_by_count(
    x0: Tensor,
    pad: Tensor,
    vocab: Vocab,
    exclude: Tensor | None = None,
    *,
    stratified: bool = True,
    anti_masking: bool = False,
    generator: torch.Generator | None = None,
) -> Corrupted:
    """The mask-count form of the NELBO: a mask of uniform size instead of a uniform time.

    Grouping the linear schedule's integral by the mask size |I_t| = k, and using
    int_0^1 (1/t) C(N, k) t^k (1 - t)^(N - k) dt = 1/k (every schedule gives the same NELBO: ``exact_nelbo``),

        NELBO(x) = sum_{k=1..N} (1/k) E_{|M|=k} sum_{i in M} -log p(x_i | x_{-M}).

    So k uniform on {1..N}, M a uniform k-subset (the k positions of smallest u_i) and the weight N/k give an
    unbiased estimate (the lambda-DCE form of Ou et al. 2024) with weights bounded by N and no t near 0 to
    clip. Per data token it is the mean cross-entropy over M: dividing by |M| is exact here, where |M| is
    uniform, and biased in the time form, where |I_t| is binomial (``nelbo``).

    Anti-masking: the second copy masks the N + 1 - k positions of largest u, weight N/(N + 1 - k). Its size
    is uniform on {1..N} too (k -> N + 1 - k permutes {1..N}) and its positions are a uniform subset, so each
    copy is unbiased on its own; the two share exactly one position, because the complement proper (size N - k)
    is empty when k = N. exclude (B, L): positions left out of the draw and of N (the segments a conditional
    row shows clean or an unconditional one hides: ``reveal_segments``, ``drop_segments``), so k counts the
    generated part only. ``t`` records the mask ratio k/N; stratified: the rows' k/N spread evenly, as t.
    """
    vocab.check_ids(x0)
    maskable = maskable_positions(x0, pad, vocab)
    maskable = maskable if exclude is None else maskable & ~exclude
    n = maskable.sum(-1)  # (B,) N per row
    v = sample_times(x0.shape[0], 0.0, stratified, generator).to(x0.device)  # uniform on [0, 1)
    k = torch.minimum((v * n).long() + 1, n.clamp_min(1))  # uniform on {1..N}
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(x0.device).masked_fill(~maskable, 2.0)
    rank = u.argsort(-1).argsort(-1)  # (B, L) the place of u_i in its row, smallest first
    n, k = n.double(), k.double()  # the weights in float64, as the time form's
    masked, weight, ratio = maskable & (rank < k[:, None]), n / k, k / n.clamp_min(1)
    if anti_masking:
        masked = torch.cat([masked, maskable & (rank >= k[:, None] - 1)])
        weight = torch.cat([weight, n / (n + 1 - k).clamp_min(1)])
        ratio = torch.cat([ratio, (n + 1 - k) / n.clamp_min(1)])
        x0, maskable = torch.cat([x0, x0]), torch.cat([maskable, maskable])
    return Corrupted(x0, apply_mask(x0, masked, vocab), masked, maskable, ratio, weight)


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
    return replace(c, x_t=x_t, masked=c.masked & ~drop, maskable=c.maskable & ~drop)


def reveal_segments(c: Corrupted, given: Tensor) -> Corrupted:
    """Show whole segments clean and take them out of the loss: a conditional NELBO.

    given (B, L) bool: positions to condition on, e.g. the caption of an image-text row. They keep
    their clean tokens, are not supervised and do not count in N(x), so the row estimates
    -log p(rest | given segment): the situation of text-to-image or captioning at sampling time,
    which the joint forward process reaches only rarely (a whole caption unmasked while most of
    the image is masked needs every caption token to survive at a large t).
    """
    x_t = torch.where(given, c.x0, c.x_t)
    return replace(c, x_t=x_t, masked=c.masked & ~given, maskable=c.maskable & ~given)


# --- 4. The loss: an unbiased estimate of the negative ELBO ---------------------------------------
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
    per_row: (B,) each row's own estimate L(x)/N(x) (detached, float64; unbiased row by row, since
    each row's t is marginally uniform, see ``sample_times``).
    """

    loss: Tensor
    modality_sums: Tensor
    modality_counts: Tensor
    per_row: Tensor


def per_modality(sums: Tensor, counts: Tensor) -> dict[str, float]:
    """{modality: nats per data token of that modality} from ``NELBO.modality_sums`` and counts (nan: none)."""
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
    detached = weighted.detach().double()
    per_row = nll.new_zeros(len(n_data), dtype=torch.float64).index_add_(0, rows, detached) / n_data.clamp_min(1)
    modality = vocab.modality_of(c.x0)  # (B, L)
    sums = nll.new_zeros(len(MODALITIES), dtype=torch.float64).index_add_(0, modality[c.masked], detached)
    counts = torch.bincount(modality[c.maskable], minlength=len(MODALITIES))
    return NELBO(weighted.sum() / n_data.sum().clamp_min(1), sums, counts, per_row)


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
        subsets = torch.tensor(list(combinations(idx, k)))  # (C(N,k), k)
        where = torch.zeros(len(subsets), x0.shape[0], dtype=torch.bool).scatter_(1, subsets, True)
        xs = x0.expand(len(subsets), -1)
        A[k] = float(nll_fn(apply_mask(xs, where, vocab), xs, where).double().sum()) / len(subsets)
    if (b_lo, b_hi) == (0.0, 1.0):
        return sum(A[k] / k for k in range(1, N + 1))
    import numpy as np

    nodes, weights = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(N + 1))
    b = b_lo + (b_hi - b_lo) * (nodes + 1) / 2
    integrand = sum(math.comb(N, k) * A[k] * b ** (k - 1) * (1 - b) ** (N - k) for k in range(1, N + 1))
    return float((weights * integrand).sum() * (b_hi - b_lo) / 2)
