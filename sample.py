"""Sampling: run the reverse masked-diffusion process of a trained denoiser for every task.

A sample starts from a *template*: a ``data.Layout`` row with the known tokens in place (task token, BOS/EOS,
a prompt, an image to caption) and MASK_m of its modality m at every position to generate. Time runs from t = 1
(all unknown positions masked) to t = 0 in S steps; each step reveals some masked positions with tokens drawn
from p_theta(x_0 | x_t), x_t the row at time t, and known or revealed tokens never change (carry-over). beta_t
is the probability that a position is masked at time t (beta_1 = 1, beta_0 = 0); NFE counts network passes."""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Generator, Tensor

from checkpoint import Inference, load_for_inference
from data import MEDIA, Layout, decode_text_ids, read_clip, read_picture
from mdm import MODALITIES, TASKS, Schedule, Vocab

# --- 1. Templates: what is known, what is generated -----------------------------------------------
GENERATION_TASKS: dict[str, tuple[str, str]] = {  # task -> (its row task, the segment generated: media or text)
    "text": ("text", "text"),
    "t2i": ("image_text", "media"),
    "i2t": ("image_text", "text"),
    "t2s": ("audio_text", "media"),
    "s2t": ("audio_text", "text"),
}


@dataclass
class Template:
    """A batch of rows to complete: fields (B, L) (1-D: one row); the masks are bool, all False by default.
    ids:          known tokens in place; MASK_m at every position to generate (m: its modality).
    known:        the positions that are given and never change: exactly the non-MASK positions.
    cond:         the conditioning segment (within ``known``) that guidance's unconditional pass replaces by
                  MASK_m: a caption for t2i, an image for i2t, a prompt for text; never TASK, BOS or EOS.
    ends:         variable-length text slots (a pair's caption or transcript): ``fill_after_end`` applies.
    content_only: only content tokens may go here (fixed-length media slots: a BOS_m or EOS_m is never data)."""

    ids: Tensor
    known: Tensor
    cond: Tensor | None = None
    ends: Tensor | None = None
    content_only: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("ids", "known", "cond", "ends", "content_only"):
            value = getattr(self, name)
            value = torch.zeros_like(self.known, dtype=torch.bool) if value is None else value
            setattr(self, name, value[None] if value.dim() == 1 else value)

    def validate(self, vocab: Vocab) -> None:
        """Raise a clear ValueError unless this is a well-formed template over ``vocab``."""
        if len(shape := tuple(self.ids.shape)) != 2:
            raise ValueError(f"template ids must be (B, L) or (L,); got shape {shape}")
        for name in ("known", "cond", "ends", "content_only"):
            if (t := getattr(self, name)).shape != shape or t.dtype != torch.bool:
                raise ValueError(f"template.{name} must be a bool tensor of shape {shape}, not {t.dtype} {[*t.shape]}")
        vocab.check_ids(self.ids)
        is_mask, is_text = vocab.is_mask(self.ids), vocab.modality_of(self.ids) == MODALITIES.index("text")
        for wrong, what in (
            (~self.known & ~is_mask, "is to be generated (known=False) but holds {}, not its modality's MASK_m"),
            (self.known & is_mask, "is marked known but holds {}; give its token or mark it unknown"),
            (self.cond & ~self.known, "is in the conditioning segment (cond) but is not known ({})"),
            (self.ends & ~is_text, "is in a variable-length text slot (ends) but is not a text position ({})"),
        ):
            if wrong.any():
                r, c = wrong.nonzero()[0].tolist()
                raise ValueError(f"template row {r}, position {c} " + what.format(vocab.name(int(self.ids[r, c]))))

    def repeat(self, n: int) -> Template:
        """Each row n times in a row (rows r, r, ..., r, r+1, ...): n samples of every condition."""
        if n < 1:
            raise ValueError(f"the number of samples per template must be >= 1, got {n}")
        return Template(*(getattr(self, f.name).repeat_interleave(n, dim=0) for f in fields(self)))

    @staticmethod
    def cat(templates: Sequence[Template]) -> Template:
        """One batch from several templates of the same row length (they may be different tasks)."""
        if not templates:
            raise ValueError("no templates to concatenate")
        return Template(*(torch.cat([getattr(t, f.name) for t in templates]) for f in fields(Template)))


def layout_template(layout: Layout, ids: Tensor, known: Tensor | None = None) -> Template:
    """The general entry point: any row(s) of ``layout`` with known and unknown positions. ids (L,) or
    (B, L) global ids, L = layout.seq_len, each row starting with a task token; unknown positions hold MASK_m.
    Pair rows (TASK BOS_m media EOS_m BOS_text text EOS_text PAD ...): ``cond`` = the known positions of both
    slots (a caption's EOS_text and PAD_text carry its length), ``ends`` = the text slot, ``content_only`` = the
    media slot. Text rows: ``cond`` = the known text content tokens (a prompt; BOS/EOS are structure)."""
    v, tpl = layout.vocab, Template(ids, ~layout.vocab.is_mask(ids) if known is None else known)
    if tpl.ids.dim() != 2 or tpl.ids.shape[1] != layout.seq_len:
        raise ValueError(f"layout rows must have length seq_len = {layout.seq_len}; got shape {tuple(tpl.ids.shape)}")
    v.check_ids(tpl.ids)
    if not (v.is_task(tpl.ids[:, 0]) & tpl.known[:, 0]).all():
        raise ValueError(f"every row must start with a known task token ({', '.join(f'TASK_{t}' for t in TASKS)})")
    text_content = (tpl.ids >= v.block_start("text")) & (tpl.ids < v.block_start("text") + v.text)
    for r, task in enumerate(TASKS[i - v.task(TASKS[0])] for i in tpl.ids[:, 0].tolist()):
        if task == "text":
            tpl.cond[r] = tpl.known[r] & text_content[r]
        else:
            media, text = layout.media_slot(task), layout.text_slot(task)
            tpl.cond[r, media], tpl.cond[r, text] = tpl.known[r, media], tpl.known[r, text]
            tpl.ends[r, text] = tpl.content_only[r, media] = True
    tpl.validate(v)
    return tpl


def text_template(layout: Layout, prompt: Sequence[int] = ()) -> Template:
    """Unconditional text (empty prompt) or continuation of local text ids: TASK_text BOS_text prompt MASK ...
    A window of the packed document stream: a second document may start; ``decode_text`` keeps the first."""
    v, room = layout.vocab, prompt_capacity(layout, "text")  # the row after BOS_text
    if len(prompt) > room:
        raise ValueError(f"the prompt is {len(prompt)} tokens but a text row holds at most {room}; shorten it")
    ids = torch.full((layout.seq_len,), v.mask("text"), dtype=torch.long)
    ids[0], ids[1] = v.task("text"), v.bos("text")
    ids[2 : 2 + len(prompt)] = v.to_global(torch.as_tensor(list(prompt), dtype=torch.long), "text")
    return layout_template(layout, ids)


def task_template(layout: Layout, task: str, *, text: Sequence[int] = (), media: ArrayLike | None = None) -> Template:
    """One row of ``task`` from its condition (local text ids for text, t2i, t2s; local image / audio ids for
    i2t, s2t), all MASK where it generates. Infilling is ``layout_template`` of a row with MASKs inside."""
    if task not in GENERATION_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(GENERATION_TASKS)}")
    row_task, generated = GENERATION_TASKS[task]
    if row_task == "text":
        return text_template(layout, text)
    if generated == "text" and media is None:
        raise ValueError(f"task {task!r} needs the {MEDIA[row_task]} to describe")
    if generated == "media":  # a placeholder image / clip, masked below
        media, slot, m = np.zeros(layout.media_len(row_task)), layout.media_slot(row_task), MEDIA[row_task]
    else:  # no caption
        text, slot, m = (), layout.text_slot(row_task), "text"
    ids = layout.pair_row(row_task, *(torch.as_tensor(np.asarray(xs), dtype=torch.long) for xs in (media, list(text))))
    ids[slot] = layout.vocab.mask(m)
    return layout_template(layout, ids)


def prompt_capacity(layout: Layout, task: str) -> int:
    """The longest prompt (in text tokens) a task's row holds: text after BOS_text, or a pair's caption."""
    row_task = GENERATION_TASKS[task][0]
    return layout.text_capacity("text") - 1 if row_task == "text" else layout.text_capacity(row_task)


# --- 2. One step at a time ------------------------------------------------------------------------
def time_grid(steps: int) -> Tensor:
    """t_0 = 1 > t_1 > ... > t_S = 0, uniform in t (float64, S + 1 points; both ends exact)."""
    return 1 - torch.arange(steps + 1, dtype=torch.float64) / steps


def unmask_probability(beta_s: Tensor, beta_next: Tensor) -> Tensor:
    """P(a position masked at time s is revealed by time s' < s) = (beta_s - beta_s') / beta_s.
    Why: masks are nested (i is masked iff u_i < beta_t, one uniform u_i), so P(masked at s' | masked at s) =
    beta_s' / beta_s, the probability that the reverse step keeps a masked position masked."""
    return (beta_s - beta_next) / beta_s if beta_s > 0 else torch.ones((), dtype=torch.float64)


def remaining_counts(n_start: Tensor, beta_next: Tensor) -> Tensor:
    """How many positions of each row stay masked after a confidence step: round(n_start * beta_s'), n_start (B,)
    counting the positions to generate; n_start * beta_s' is the ancestral sampler's expected count (the same pace)."""
    return torch.round(n_start.double() * beta_next).long()


def guided_logits(cond: Tensor, uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance: logits_g = logits_u + (1 + w) (logits_c - logits_u).
    Equivalently logits_c + w (logits_c - logits_u): w = 0 is conditional sampling, w > 0 pushes away from the
    unconditional model (Ho & Salimans' w, LLaDA's cfg_scale). The -inf entries agree in both passes (masking keeps
    each position's modality): computing on the finite ones only keeps them -inf, with no inf - inf = nan."""
    finite = torch.isfinite(cond)
    return torch.where(finite, cond + w * torch.where(finite, cond - uncond, 0.0), cond)


def token_distribution(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """(n, V) logits -> (n, V) float64 probabilities to draw from: temperature, then top-p.
    p_T(v) ~ exp(logit_v / T), T = 0 greedy; top-p keeps the fewest most probable tokens with mass >= ``top_p``,
    renormalised. In float64: a float32/bf16 softmax or Gumbel draw loses the tail, silently lowering the temperature.
    """
    logits = logits.double()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the strictly more probable tokens' mass < top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, torch.where(keep, sorted_p, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw_categorical(probs: Tensor, u: Tensor) -> Tensor:
    """One token per row by inverse CDF: the v with F(v-1) <= u * F(V) < F(v), F the float64 CDF.
    probs (n, V) float64, u (n,) uniforms in [0, 1). A zero-probability token is never drawn (its CDF step is
    empty); one uniform per position makes the noise a fixed function of the random stream."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True)[:, 0]


def confidence(logits: Tensor, tokens: Tensor) -> Tensor:
    """The confidence of a drawn token: p_theta(x_i = x̂_i | x_t) at temperature 1 (LLaDA's "low_confidence").
    Of the *drawn* x̂_i (not the maximum unless T = 0), after guidance and the content-only restriction, before top-p.
    """
    return torch.softmax(logits.double(), dim=-1).gather(-1, tokens[:, None])[:, 0]


def top_k_per_row(candidates: Tensor, score: Tensor, k: Tensor) -> Tensor:
    """(B, L) bool: in each row b, the k[b] candidate positions with the highest score (ties: leftmost)."""
    order = torch.argsort(score.masked_fill(~candidates, -math.inf), dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1)  # the inverse permutation: rank[b, i] = the place of position i in order[b]
    return candidates & (rank < k[:, None])


def fill_after_end(x: Tensor, ends: Tensor, vocab: Vocab) -> Tensor:
    """The end-of-text rule of a variable-length text slot (a pair's caption or transcript).
    A training slot reads ``text EOS_text PAD_text ... PAD_text``: PAD after EOS is data. Rule: let j be the slot's
    first revealed EOS_text *or* PAD_text; every still masked slot position after j becomes PAD_text at once, those
    before j stay to be generated (they may end the text earlier; ``decode_text`` cuts at the first EOS/PAD). The
    true conditionals put PAD after the end with probability 1: the rule removes a weak model's slips, saving steps."""
    end = ends & ((x == vocab.eos("text")) | (x == vocab.pad))
    after = ends & (end.long().cumsum(1) > 0) & vocab.is_mask(x)
    return torch.where(after, torch.full_like(x, vocab.pad), x)


# --- 3. The samplers ------------------------------------------------------------------------------
class DenoiserLike(Protocol):  # what the samplers need: ``model.Denoiser`` or any oracle with its contract
    vocab: Vocab

    def __call__(self, x_t: Tensor, where: Tensor | None = None) -> Tensor: ...


class Predictor:
    """p_theta(x_0 | x_t) at the masked positions as the samplers use it: guided, restricted, cached, counted.
    Guidance (w != 0) adds a pass with the conditioning segment masked; no BOS_m, EOS_m or PAD_text may go to
    ``content_only`` positions. Rows are independent given x_t, so the network sees only the rows that need it:
    rows with masked positions left and, with caching (MDLM's ddpm_cache, per row), only those that changed since
    the last call; the denoiser has no time input, so an unchanged row's last output is still exact. ``nfe``
    counts network passes, ``row_evals`` the rows they carried."""

    def __init__(self, model: DenoiserLike, template: Template, guidance: float, cache: bool, device: torch.device):
        v, self.model, self.guidance, self.cache, self.nfe, self.row_evals = model.vocab, model, guidance, cache, 0, 0
        self.cond, self.content_only = template.cond.to(device), template.content_only.to(device)
        self.mask_table, self.specials = v.mask_table().to(device), torch.zeros(v.size, dtype=torch.bool, device=device)
        self.specials[[f(m) for m in MODALITIES for f in (v.bos, v.eos)] + [v.pad]] = True  # BOS_m, EOS_m, PAD_text
        self._x, self._masked, self._logits = None, None, None  # the cache: the last input and output

    def __call__(self, x: Tensor, masked: Tensor) -> Tensor:
        """(n, |V|) float32 logits at the n positions where ``masked`` (B, L) is True (row-major)."""
        need = masked.any(1)  # (B,) the rows with positions to predict
        run = need & (x != self._x).any(1) if self.cache and self._x is not None else need  # through the network
        fresh = run[masked.nonzero()[:, 0]]  # (n,) the positions whose logits are computed now
        logits = torch.empty((int(masked.sum()), self.specials.shape[0]), device=x.device)
        if fresh.any():
            logits[fresh] = self.evaluate(x[run], masked[run], run)
        if not fresh.all():  # an unchanged row has the same masked positions: its old logits, in order
            logits[~fresh] = self._logits[(need & ~run)[self._masked.nonzero()[:, 0]]]
        self._x, self._masked, self._logits = x.clone(), masked, logits
        return logits

    def evaluate(self, x: Tensor, masked: Tensor, rows: Tensor) -> Tensor:
        """Guided, restricted logits of the rows ``rows`` (B,) bool selects, x and masked (b, L) those rows."""
        logits, passes = self.model(x, where=masked).float(), 1 if self.guidance == 0 else 2
        if self.guidance != 0:
            x_uncond = torch.where(self.cond[rows], self.mask_table[x], x)  # the conditioning segment -> MASK_m
            logits = guided_logits(logits, self.model(x_uncond, where=masked).float(), self.guidance)
        self.nfe, self.row_evals = self.nfe + passes, self.row_evals + passes * x.shape[0]
        return logits.masked_fill(self.content_only[rows][masked][:, None] & self.specials, -math.inf)


@dataclass
class Sample:
    """The result of ``sample``: ids (B, L), no MASK left; order (B, L) the step that revealed each position
    (-1: known; the end-of-text rule's fills get their end's step, 0 for an end in the template); nfe; seconds."""

    ids: Tensor
    order: Tensor
    nfe: int
    seconds: float
    row_evals: int = 0  # rows carried by the network passes (at most nfe x B)

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / max(1, self.ids.shape[0])


def ancestral_step(
    masked: Tensor, logits: Tensor, p_unmask: Tensor, u_reveal: Tensor, u_token: Tensor, cfg: SamplerConfig
) -> tuple[Tensor, Tensor]:
    """One step s -> s' of the exact reverse process: returns (reveal (B, L) bool, tokens (n_reveal,)).
    A masked position is revealed iff its u_reveal < p_unmask = (beta_s - beta_s')/beta_s, with a token drawn from
    p_theta(x_0 | x_t). Positions revealed in one step are drawn independently given x_t, the only approximation
    of few-step sampling: under the linear grid each of n positions is revealed at a uniformly random step, so
    about C(n, 2)/S pairs share a step (the birthday problem) and the error vanishes only for S >> n^2/2, not S > n."""
    reveal = masked & (u_reveal < p_unmask)
    probs = token_distribution(logits[reveal[masked]], cfg.temperature, cfg.top_p)  # the revealed rows
    return reveal, draw_categorical(probs, u_token[reveal])


def confidence_step(
    masked: Tensor, logits: Tensor, n_keep: Tensor, u_token: Tensor, cfg: SamplerConfig
) -> tuple[Tensor, Tensor]:
    """One MaskGIT / LLaDA step (returns as ``ancestral_step``): draw a token at every masked position, keep the
    most confident: row b keeps its (masked now) - n_keep_b draws of highest ``confidence`` (``remaining_counts``)."""
    tokens = draw_categorical(token_distribution(logits, cfg.temperature, cfg.top_p), u_token[masked])
    score = torch.zeros_like(masked, dtype=torch.float64).masked_scatter(masked, confidence(logits, tokens))
    reveal = top_k_per_row(masked, score, (masked.sum(1) - n_keep).clamp_min(0))
    return reveal, tokens[reveal[masked]]


def threshold_step(
    masked: Tensor, logits: Tensor, threshold: float, u_token: Tensor, cfg: SamplerConfig
) -> tuple[Tensor, Tensor]:
    """One parallel-decoding step (Fast-dLLM's threshold rule; returns as ``ancestral_step``): draw a token at
    every masked position, keep each draw whose ``confidence`` is >= ``threshold`` and, in every row with masked
    positions, at least its most confident one. Confident positions barely depend on each other, so revealing
    them together costs little; the number of steps adapts to the model's certainty instead of a fixed grid."""
    tokens = draw_categorical(token_distribution(logits, cfg.temperature, cfg.top_p), u_token[masked])
    score = torch.zeros_like(masked, dtype=torch.float64).masked_scatter(masked, confidence(logits, tokens))
    reveal = (masked & (score >= threshold)) | top_k_per_row(masked, score, masked.any(1).long())
    return reveal, tokens[reveal[masked]]


def row_generators(generator: Generator | Sequence[Generator] | None, rows: int) -> list[Generator]:
    """One random stream per row, so that a row's sample does not depend on the batch it is drawn in: the given
    sequence (one generator per row), or streams seeded from ``generator`` (None: torch's global one)."""
    if isinstance(generator, Sequence):
        if len(generator) != rows:
            raise ValueError(f"{len(generator)} generators for {rows} rows: give one per row")
        return list(generator)
    return [Generator().manual_seed(int(s)) for s in torch.randint(2**62, (rows,), generator=generator)]


@torch.no_grad()  # not inference_mode: its tensors reject in-place edits later, a trap for users of ids
def sample(
    model: DenoiserLike,
    template: Template,
    cfg: SamplerConfig | None = None,
    generator: Generator | Sequence[Generator] | None = None,
) -> Sample:
    """Complete every row of ``template`` with ``cfg``'s sampler. The loop, for steps i = 0 .. S-1:
    1. draw two float64 uniforms per position, u_reveal and u_token, from the row's own stream
       (``row_generators``), independent of the network and of caching, so cached and uncached runs agree and a
       row gets the same sample alone as in a batch (up to the network's float rounding at another batch size);
    2. reveal tokens drawn from the ``Predictor`` (``ancestral_step``, ``confidence_step``, ``threshold_step``),
       then apply the end-of-text rule (``fill_after_end``). The last step reveals everything still masked."""
    cfg, vocab = cfg or SamplerConfig(), model.vocab
    template.validate(vocab)
    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else []
    device = tensors[0].device if tensors else torch.device("cpu")
    start, ids, ends = time.perf_counter(), template.ids.to(device), template.ends.to(device)
    x = fill_after_end(ids, ends, vocab)  # an end given in the template fills its slot at once
    order = torch.where(x != ids, 0, -1)
    predictor, n_start = Predictor(model, template, cfg.guidance, cfg.cache, device), vocab.is_mask(x).sum(1)
    betas, streams = Schedule.parse(cfg.schedule).beta(time_grid(cfg.steps)), row_generators(generator, x.shape[0])
    for i in range(cfg.steps):
        masked = vocab.is_mask(x)
        if not masked.any():
            break
        u = torch.stack([torch.rand((2, x.shape[1]), generator=g, dtype=torch.float64) for g in streams], 1)
        u_reveal, u_token = u.to(device)  # 2 x (B, L)
        logits = predictor(x, masked)
        if cfg.sampler == "ancestral":
            p = unmask_probability(betas[i], betas[i + 1]).to(device)
            reveal, tokens = ancestral_step(masked, logits, p, u_reveal, u_token, cfg)
        elif cfg.sampler == "threshold":  # the last step reveals all
            reveal, tokens = threshold_step(masked, logits, cfg.threshold if i < cfg.steps - 1 else 0.0, u_token, cfg)
        else:
            n_keep = remaining_counts(n_start, betas[i + 1]).to(device)
            reveal, tokens = confidence_step(masked, logits, n_keep, u_token, cfg)
        x, x_prev = fill_after_end(x.masked_scatter(reveal, tokens), ends, vocab), x
        order[reveal | (x != x_prev)] = i  # revealed, or filled by the end-of-text rule
    assert not vocab.is_mask(x).any(), "sampling finished with MASK tokens left"  # the last step reveals all
    return Sample(x.cpu(), order.cpu(), predictor.nfe, time.perf_counter() - start, predictor.row_evals)


def generate(
    model: DenoiserLike,
    layout: Layout,
    task: str,
    cfg: SamplerConfig | None = None,
    *,
    texts: Sequence[Sequence[int]] = ((),),
    media: Sequence[ArrayLike] = (),
    num: int = 1,
    seed: int = 0,
) -> tuple[Template, Sample]:
    """``num`` samples of ``task`` for each condition, in one batch (rows grouped by condition). texts:
    local text ids of each prompt (text, t2i, t2s; default: one empty prompt); media: local image / audio ids of
    each input (i2t, s2t). cfg defaults to the task's preset; same seed, same samples."""
    key, conditions = ("media", media) if task in ("i2t", "s2t") else ("text", texts)
    rows = [task_template(layout, task, **{key: c}) for c in conditions]
    if not rows:
        raise ValueError(f"task {task!r} needs at least one condition")
    template = Template.cat([r.repeat(num) for r in rows])
    return template, sample(model, template, cfg or PRESETS[task], Generator().manual_seed(seed))


# --- 4. Settings: the sampler config and the per-task presets -------------------------------------
SAMPLERS: tuple[str, ...] = ("ancestral", "confidence", "threshold")


@dataclass(frozen=True)
class SamplerConfig:
    """Everything that decides how a template is completed (seeds aside).
    sampler:     "ancestral" (the exact reverse process), "confidence" (MaskGIT / LLaDA top-k) or "threshold"
                 (parallel decoding: every position at least ``threshold`` confident, >= 1 per row and step).
    steps:       S, the number of steps from t = 1 to t = 0 (for "threshold", the most steps: the last reveals all).
    threshold:   the threshold sampler's confidence to reveal a position, in (0, 1].
    schedule:    beta_t at inference, which may differ from training ("linear", "poly:0.5"; ``Schedule.parse``).
    temperature: T > 0 scales the logits by 1/T; T = 0 is greedy.
    top_p:       nucleus sampling mass in (0, 1]; 1 keeps every token.
    guidance:    classifier-free guidance w (``guided_logits``); w != 0 costs two network passes, not one.
    cache:       reuse the denoiser's output while x_t does not change (identical results, fewer NFE)."""

    sampler: str = "ancestral"
    steps: int = 64
    threshold: float = 0.9
    schedule: str = "linear"
    temperature: float = 1.0
    top_p: float = 1.0
    guidance: float = 0.0
    cache: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {SAMPLERS}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")
        Schedule.parse(self.schedule)  # raises a clear error for an unknown schedule
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"the guidance weight must be finite, got {self.guidance}")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, SamplerConfig] = {  # chosen on the validation split by the lab's studies (lab/STUDIES.md)
    "text": SamplerConfig(sampler="ancestral", steps=96, temperature=0.8),
    "t2i": SamplerConfig(sampler="threshold", threshold=0.1, temperature=0.5, guidance=1.5),
    "i2t": SamplerConfig(sampler="threshold", threshold=0.5, temperature=0.0),
    "t2s": SamplerConfig(sampler="threshold", threshold=0.8, temperature=0.5, guidance=1.5),
    "s2t": SamplerConfig(sampler="threshold", threshold=0.7, temperature=0.0),
}


# --- 5. Outputs: decoding rows, text, image grids, WAV files --------------------------------------
def decode_text(row: Tensor, layout: Layout, task: str, tokenizer: object) -> str:
    """The text of one row (a text row's first document, or a pair's text slot), cut at the first
    EOS_text and, in a pair's slot, at the first PAD_text. ``tokenizer.decode(list[int]) -> str``."""
    v, row_task = layout.vocab, GENERATION_TASKS[task][0] if task in GENERATION_TASKS else task
    ids = row[layout.text_slot(row_task)]
    if row_task == "text":
        ids = ids[1:] if len(ids) and int(ids[0]) == v.bos("text") else ids
    elif len(stops := ((ids == v.eos("text")) | (ids == v.pad)).nonzero()):
        ids = ids[: int(stops[0])]
    return decode_text_ids(ids, v, tokenizer)


def decode_media(row: Tensor, layout: Layout, task: str) -> np.ndarray:
    """The local image / audio ids of a pair row's media slot (for the tokenizer's ``decode``)."""
    row_task = GENERATION_TASKS[task][0] if task in GENERATION_TASKS else task
    return layout.vocab.to_local(row[layout.media_slot(row_task)], MEDIA[row_task]).numpy()


def write_texts(path: Path, texts: Sequence[str], labels: Sequence[str]) -> Path:
    """One block per sample: a header naming its condition, then the text."""
    blocks = [f"### sample {i} ({label})\n{text}\n" for i, (text, label) in enumerate(zip(texts, labels, strict=True))]
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def save_image_grid(path: Path, images: Sequence[np.ndarray], labels: Sequence[str]) -> Path:
    """A PNG grid of pictures (uint8 gray or RGB, the tokenizer's ``to_picture``), each titled with its label."""
    from matplotlib.figure import Figure

    cols, rows = min(8, len(images)), math.ceil(len(images) / 8)
    fig = Figure(figsize=(1.5 * cols, 1.8 * rows))
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(label, 18)[:2]), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def save_wavs(folder: Path, waves: Sequence[np.ndarray], sample_rate: int) -> list[Path]:
    """sample_000.wav, sample_001.wav, ... (16-bit PCM, clipped to [-1, 1])."""
    import soundfile as sf

    paths = [folder / f"sample_{i:03d}.wav" for i in range(len(waves))]
    for path, wave in zip(paths, waves, strict=True):
        sf.write(path, np.clip(np.asarray(wave, dtype=np.float32), -1, 1), sample_rate, subtype="PCM_16")
    return paths


# --- 6. Watching it denoise: a GIF frame per sampler step -----------------------------------------
def reveal_frames(result: Sample, vocab: Vocab) -> Tensor:
    """(S + 1, B, L), S the steps run: frame 0 the template, frame k the rows after step k (later reveals: MASK_m)."""
    k = torch.arange(int(result.order.max()) + 2)[:, None, None]  # the last step run reveals the last MASK
    return torch.where(result.order < k, result.ids, vocab.mask_table()[result.ids])


def text_panel(x: Tensor, inf: Inference, task: str, font: object, width: int = 360) -> np.ndarray:
    """A row's text slot on white, wrapped between tokens (newlines as spaces), each MASK_text a blue block, ending
    as in ``decode_text`` at the first EOS_text (in a pair's slot, or PAD_text)."""
    from PIL import Image, ImageDraw

    v, row_task, px, py = inf.layout.vocab, GENERATION_TASKS[task][0], 4, 4
    ids, start = x[inf.layout.text_slot(row_task)].tolist(), v.block_start("text")
    end = next((i for i, g in enumerate(ids) if g == v.eos("text") or (g == v.pad and row_task != "text")), None)
    draw = ImageDraw.Draw(image := Image.new("RGB", (width, 18 * len(ids) + 8), "white"))
    for g in ids[:end]:
        text = inf.text_tokenizer.decode([g - start]).replace("\n", " ") if start <= g < start + v.text else ""
        w = 11 if g == v.mask("text") else font.getlength(text)  # BOS_text, PAD_text: no text
        px, py = (4, py + 18) if px + w > width - 4 and px > 4 else (px, py)
        draw.text((px, py), text, fill="black", font=font)
        if g == v.mask("text"):
            draw.rectangle((px + 2, py + 3, px + 8, py + 15), fill=(70, 110, 200))
        px += w
    return np.asarray(image)[: py + 22]


def save_animations(out: Path, result: Sample, inf: Inference, task: str, seconds: float = 3.0) -> list[Path]:
    """animation_000.gif, ...: a looping GIF per sample, frame k ``reveal_frames``' frame k and its number (a GIF merges
    equal frames), shown seconds / S (at most 0.75 s; the last 2 s), in one palette (exact to 256 colours). text, i2t,
    s2t: ``text_panel``, Pillow's default font (scaled from 10.1 on). t2i, t2s: the final image (a pixel ceil(128/side)
    px wide) or clip's spectrogram (evaluate.py's, 80 dB; a partly masked clip has no audio), what is not yet revealed
    blue (patches) or gray (its tokens' columns; they tile a clip evenly): revealed tokens never change."""
    from matplotlib import colormaps, mlab
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(14) if hasattr(ImageFont, "load_default_imagefont") else ImageFont.load_default()
    frames, tok, s = reveal_frames(result, inf.layout.vocab), inf.image_tokenizer, -(-128 // inf.image_tokenizer.side)
    paths = [out / f"animation_{b:03d}.gif" for b in range(len(result.ids))]
    for rows, final, path in zip(frames.unbind(1), result.ids, paths, strict=True):
        if task in ("t2i", "t2s"):
            shown = ~inf.layout.vocab.is_mask(rows[:, inf.layout.media_slot(GENERATION_TASKS[task][0])]).numpy()
            if task == "t2i":
                picture = tok.to_picture(tok.decode(decode_media(final, inf.layout, task)))
                full = (picture if picture.ndim == 3 else picture[..., None].repeat(3, -1)).repeat(s, 0).repeat(s, 1)
                shown = np.kron(shown.reshape(len(rows), tok.side // tok.patch, -1), np.ones((1, *[tok.patch * s] * 2)))
            else:
                wave = inf.audio_codec.decode(decode_media(final, inf.layout, task)).astype(np.float64)
                db = 10 * np.log10(mlab.specgram(wave, NFFT=256, noverlap=192)[0][::-1] + 1e-20)
                rgb = colormaps["magma"](np.clip((db - db.max()) / 80 + 1, 0, 1), bytes=True)[..., :3]
                full = np.asarray(Image.fromarray(rgb).resize((8 * shown.shape[1], 128)))  # 8 px a token
                shown = np.repeat(shown, 8, axis=1)[:, None, :]
            panels = list(np.where(shown[..., None] > 0, full, np.uint8([70, 110, 200] if task == "t2i" else 128)))
        else:
            panels = [text_panel(x, inf, task, font) for x in rows]
        h, steps = max(len(p) for p in panels) + 20, len(rows) - 1
        images = [Image.fromarray(np.pad(p, ((0, h - len(p)), (0, 0), (0, 0)), constant_values=255)) for p in panels]
        for k, image in enumerate(images):
            ImageDraw.Draw(image).text((4, h - 17), f"step {k}/{steps}", fill=(90, 90, 90), font=font)
        sheet = Image.fromarray(np.vstack(images)).quantize(dither=Image.Dither.NONE)  # exact up to 256 colours
        images = [sheet.crop((0, k * h, sheet.width, k * h + h)) for k in range(len(images))]
        ms = [min(750, max(20, round(seconds * 100 / max(1, steps)) * 10))] * steps + [2000]  # GIF delays: 10 ms units
        images[0].save(path, save_all=True, append_images=images[1:], duration=ms, loop=0)
    return paths


# --- 7. The command line --------------------------------------------------------------------------
USAGE_EXAMPLES = """examples:
  python sample.py --checkpoint runs/tiny/ckpt.pt --task text --prompt "The" --num 4
  python sample.py --checkpoint runs/tiny/ckpt.pt --task t2i --prompt "a handwritten seven" --num 16
  python sample.py --checkpoint runs/tiny/export --task i2t --image digit.png
  python sample.py --checkpoint runs/tiny/ckpt.pt --task t2s --prompt "seven" --animate
  python sample.py --checkpoint runs/tiny/ckpt.pt --task s2t --audio clip.wav
"""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # an expected error: one line and status 2, no usage dump
        fail(message, self.prog)

    def option(self, name: str, **kw) -> None:  # --name, also with hyphens (--top-p for --top_p) as in every script
        self.add_argument(*dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]), **{"dest": name, **kw})


def fail(message: object, prog: str = "sample.py") -> None:
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="sample.py", epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.description = "Generate text, images and speech with a trained tri-modal MDM."
    p.option("task", required=True, choices=tuple(GENERATION_TASKS), help="what to generate")
    p.option("checkpoint", required=True, help="a checkpoint or export folder written by train.py")
    p.option("prompt", action="append", help="text prompt (text, t2i, t2s); repeat for several")
    p.option("image", action="append", help="image file to caption (i2t); repeat for several")
    p.option("audio", action="append", help="audio file to transcribe (s2t); repeat for several")
    p.option("num", type=int, default=1, help="samples per prompt or input file (default: 1)")
    p.option("seed", type=int, default=0, help="the sampler's seed (default: 0)")
    p.option("out", default="out/samples", help="output folder (default: out/samples)")
    p.option("device", default="cpu", help="cpu or cuda (default: cpu)")
    for f in fields(SamplerConfig):  # each defaults to the task's preset
        if kind := {"int": int, "float": float, "str": str}.get(f.type):
            p.option(f.name, type=kind, help="sampler setting (default: the task's preset, sample.PRESETS)")
    p.option("no_cache", dest="cache", action="store_false", default=None, help="run the network at every step")
    p.option("animate", action="store_true", help="also animation_000.gif, ...: a GIF per sample, a frame per step")
    return p


def read_media(path: str, task: str, inf: Inference) -> np.ndarray:
    """The local ids of an image to caption (i2t) or an audio file to transcribe (s2t)."""
    image, codec = inf.image_tokenizer, inf.audio_codec
    try:
        media = read_picture(path, image.mode) if task == "i2t" else read_clip(path, codec.sample_rate)
    except (RuntimeError, OSError) as e:  # PIL raises OSError, soundfile a LibsndfileError (a RuntimeError)
        what = f"image {path}" if task == "i2t" else f"audio file {path} (expected WAV/FLAC/OGG readable by soundfile)"
        raise ValueError(f"cannot read {what}: {e}") from None
    return image.encode(image.from_picture(media)) if task == "i2t" else codec.encode(media)


def cli_template(args: argparse.Namespace, inf: Inference) -> tuple[Template, list[str]]:
    """The batch template of the command line and one label per row."""
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    flag = {"i2t": "image", "s2t": "audio"}.get(args.task, "prompt")
    labels = getattr(args, flag) or ([""] if args.task == "text" else [])
    if not labels:
        raise ValueError(f"--task {args.task} needs --{flag} {'TEXT' if flag == 'prompt' else 'FILE'}")
    if flag != "prompt":
        rows = [task_template(inf.layout, args.task, media=read_media(f, args.task, inf)) for f in labels]
    else:
        room, rows = prompt_capacity(inf.layout, args.task), []
        for prompt in labels:
            if len(ids := inf.text_tokenizer.encode(prompt)) > room:
                raise ValueError(f"prompt {prompt[:40]!r} is {len(ids)} tokens; {args.task} holds at most {room}")
            rows.append(task_template(inf.layout, args.task, text=ids))
    return Template.cat([r.repeat(args.num) for r in rows]), [label for label in labels for _ in range(args.num)]


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    chosen = {f.name: getattr(args, f.name) for f in fields(SamplerConfig) if getattr(args, f.name) is not None}
    try:  # expected errors: a bad option, a missing or unreadable file (one line, no traceback)
        cfg = replace(PRESETS[args.task], **chosen)
        try:
            inf = load_for_inference(args.checkpoint, device=args.device)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load checkpoint {args.checkpoint}: {e}") from None
        template, labels = cli_template(args, inf)
    except ValueError as e:
        fail(e)
    result, out, task = sample(inf.model, template, cfg, Generator().manual_seed(args.seed)), Path(args.out), args.task
    out.mkdir(parents=True, exist_ok=True)
    if GENERATION_TASKS[task][1] == "text":
        texts = [decode_text(row, inf.layout, task, inf.text_tokenizer) for row in result.ids]
        files, extra = [write_texts(out / "samples.txt", texts, labels)], [{"text": text} for text in texts]
        print("\n".join(f"[{i}] ({labels[i]}) {text}" for i, text in enumerate(texts)))
    elif task == "t2i":
        images = np.stack([inf.image_tokenizer.decode(decode_media(row, inf.layout, task)) for row in result.ids])
        files, extra = [out / "grid.png", out / "images.npy"], [{} for _ in labels]
        np.save(files[1], images)
        save_image_grid(files[0], [inf.image_tokenizer.to_picture(x) for x in images], labels)
    else:
        waves = [inf.audio_codec.decode(decode_media(row, inf.layout, task)) for row in result.ids]
        files = save_wavs(out, waves, inf.audio_codec.sample_rate)
        extra = [{"file": path.name} for path in files]
    files += save_animations(out, result, inf, task) if args.animate else []
    samples = [{"condition": label, **e} for label, e in zip(labels, extra, strict=True)]
    manifest = {"task": task, "checkpoint": args.checkpoint, "config": cfg.to_dict(), "seed": args.seed}
    manifest |= {"num_per_condition": args.num, "samples": samples, "files": [f.name for f in files], "nfe": result.nfe}
    manifest |= {"seconds": round(result.seconds, 4), "seconds_per_sample": round(result.seconds_per_sample, 6)}
    (path := out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"{len(labels)} samples, NFE {result.nfe}, {result.seconds_per_sample:.3f} s/sample -> {path}")


if __name__ == "__main__":
    main()
