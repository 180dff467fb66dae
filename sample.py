"""Sampling: run the reverse masked-diffusion process of a trained denoiser for every task.

A sample starts from a *template*: a row laid out by ``data.Layout`` in which the tokens we know sit
in place (the task token, the structural BOS/EOS tokens, a prompt, an image to caption) and every
position to generate holds MASK_m of its modality m. Time moves from t = 1 (everything unknown is
masked) to t = 0 (nothing is) over S steps; at each step some masked positions are revealed with
tokens drawn from p_theta(x_0 | x_t); revealed and known tokens never change again (carry-over).
A finished sample holds zero MASK tokens.

1. Templates     ``Template``, ``layout_template`` (any row with known and unknown positions) and one
   builder per task (``task_template``: text, t2i, i2t, t2s, s2t).
2. One step at a time: ``time_grid``, ``unmask_probability``, ``remaining_counts``, ``guided_logits``,
   ``token_distribution``, ``draw_categorical``, ``confidence``, ``top_k_per_row``, ``fill_after_end``.
3. The samplers  ``ancestral_step`` (the exact reverse of the forward process), ``confidence_step``
   (MaskGIT / LLaDA), and ``sample``, the loop around them, with a ``Predictor`` that caches the
   denoiser's output while the state does not change and counts network evaluations (NFE).
4. Settings      ``SamplerConfig`` and the per-task ``PRESETS``.
5. Outputs and the command line: ``python sample.py --checkpoint CKPT --task t2i --prompt "a seven"``.

Notation: x_t the row at time t, beta_t the probability that a position is masked at time t
(beta_1 = 1, beta_0 = 0), S the number of steps, NFE the number of network evaluations (one
forward pass over the whole batch counts one). The denoiser has no time input, which is what makes
caching exact; ``checkpoint.load_for_inference`` loads a trained one.
"""

from __future__ import annotations

import argparse
import itertools
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
import torch.nn as nn
from torch import Tensor

from checkpoint import Inference, load_for_inference
from data import MEDIA, Layout, decode_text_ids, resample
from mdm import MODALITIES, TASKS, Schedule, Vocab

# ----------------------------------------------------------------------------------------------
# 1. Templates: what is known, what is generated
# ----------------------------------------------------------------------------------------------

# The generation tasks of the command line and of ``generate``: which row task each one uses and
# which segment of a pair row it generates ("media" or "text"); "text" generates text rows.
GENERATION_TASKS: dict[str, tuple[str, str]] = {
    "text": ("text", "text"),
    "t2i": ("image_text", "media"),
    "i2t": ("image_text", "text"),
    "t2s": ("audio_text", "media"),
    "s2t": ("audio_text", "text"),
}


@dataclass
class Template:
    """A batch of rows to complete. Every field is (B, L); the four masks are bool.

    ids:          known tokens in place; MASK_m at every position to generate (m: its modality).
    known:        the positions that are given and never change. Exactly the non-MASK positions.
    cond:         the conditioning segment (a subset of ``known``): what the unconditional pass of
                  classifier-free guidance replaces by MASK_m (a caption for t2i, an image for i2t,
                  a prompt for text). Structural tokens (TASK, BOS/EOS of segments) are never in it.
    ends:         variable-length text slots (a pair's caption or transcript): the end-of-text rule
                  of ``fill_after_end`` applies there.
    content_only: positions that may only take their modality's content tokens (fixed-length media
                  slots: a BOS_m or EOS_m there is never data).

    Build one with ``layout_template`` or a task builder; ``Template(ids, known)`` with the last three
    masks all False is the bare general form.
    """

    ids: Tensor
    known: Tensor
    cond: Tensor | None = None
    ends: Tensor | None = None
    content_only: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.dim() == 1:
            self.ids, self.known = self.ids[None], self.known[None]
        for name in ("cond", "ends", "content_only"):
            value = getattr(self, name)
            if value is None:
                value = torch.zeros_like(self.known, dtype=torch.bool)
            setattr(self, name, value[None] if value.dim() == 1 else value)

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    def validate(self, vocab: Vocab) -> None:
        """Raise a clear ValueError unless this is a well-formed template over ``vocab``."""
        if self.ids.dim() != 2:
            raise ValueError(f"template ids must be (B, L) or (L,); got shape {tuple(self.ids.shape)}")
        for name in ("known", "cond", "ends", "content_only"):
            value = getattr(self, name)
            if value.shape != self.ids.shape or value.dtype != torch.bool:
                raise ValueError(
                    f"template.{name} must be a bool tensor of the ids' shape {tuple(self.ids.shape)}; "
                    f"got {value.dtype} {tuple(value.shape)}"
                )
        vocab.check_ids(self.ids)
        is_mask = vocab.is_mask(self.ids)
        for wrong, what in (
            (
                ~self.known & ~is_mask,
                "is to be generated (known=False) but holds {tok}; such positions must hold "
                "the MASK of the modality to generate (MASK_text, MASK_audio or MASK_image)",
            ),
            (self.known & is_mask, "is marked known but holds {tok}; give its token or mark it unknown"),
            (self.cond & ~self.known, "is in the conditioning segment (cond) but is not known ({tok})"),
            (
                self.ends & (vocab.modality_of(self.ids) != MODALITIES.index("text")),
                "is in a variable-length text slot (ends) but is not a text position ({tok})",
            ),
        ):
            if wrong.any():
                r, c = (int(i) for i in wrong.nonzero()[0])
                raise ValueError(f"template row {r}, position {c} " + what.format(tok=vocab.name(int(self.ids[r, c]))))

    def repeat(self, n: int) -> Template:
        """Each row n times in a row (rows r, r, ..., r, r+1, ...): n samples of every condition."""
        if n < 1:
            raise ValueError(f"the number of samples per template must be >= 1, got {n}")
        return Template(*(t.repeat_interleave(n, dim=0) for t in self._tensors()))

    @staticmethod
    def cat(templates: Sequence[Template]) -> Template:
        """One batch from several templates of the same row length (they may be different tasks)."""
        if not templates:
            raise ValueError("no templates to concatenate")
        return Template(*(torch.cat(ts) for ts in zip(*(t._tensors() for t in templates), strict=True)))

    def _tensors(self) -> tuple[Tensor, ...]:
        return self.ids, self.known, self.cond, self.ends, self.content_only


def layout_template(layout: Layout, ids: Tensor, known: Tensor | None = None) -> Template:
    """The general entry point: any row(s) of ``layout`` with known and unknown positions.

    ids (L,) or (B, L) global ids with L = layout.seq_len whose first token is a task token; unknown
    positions hold MASK_m (``known`` defaults to "every non-MASK position"). The other masks follow
    from each row's task:

    * pair rows (TASK BOS_m media EOS_m BOS_text text EOS_text PAD ...): ``cond`` = the known
      positions of the media slot and of the text slot (caption, its EOS_text and PAD_text, which
      carry the caption's length); ``ends`` = the text slot; ``content_only`` = the media slot.
    * text rows: ``cond`` = the known text content tokens (a prompt; BOS/EOS are structure).
    """
    v = layout.vocab
    ids = ids[None] if ids.dim() == 1 else ids
    known = ~v.is_mask(ids) if known is None else (known[None] if known.dim() == 1 else known)
    if ids.dim() != 2 or ids.shape[1] != layout.seq_len:
        raise ValueError(f"layout rows must have length seq_len = {layout.seq_len}; got shape {tuple(ids.shape)}")
    v.check_ids(ids)
    if not (v.is_task(ids[:, 0]) & known[:, 0]).all():
        raise ValueError(f"every row must start with a known task token ({', '.join(f'TASK_{t}' for t in TASKS)})")
    cond, ends, content_only = (torch.zeros_like(known) for _ in range(3))
    text_content = (ids >= v.block_start("text")) & (ids < v.block_start("text") + v.text)
    for r in range(ids.shape[0]):
        task = TASKS[int(ids[r, 0]) - v.task(TASKS[0])]
        if task == "text":
            cond[r] = known[r] & text_content[r]
            continue
        media, text = layout.media_slot(task), layout.text_slot(task)
        cond[r, media], cond[r, text] = known[r, media], known[r, text]
        ends[r, text] = True
        content_only[r, media] = True
    template = Template(ids, known, cond, ends, content_only)
    template.validate(v)
    return template


def text_template(layout: Layout, prompt: Sequence[int] = ()) -> Template:
    """Unconditional text (empty prompt) or prompt continuation: TASK_text BOS_text prompt MASK ...

    ``prompt`` holds local text ids. A text row is a window of the packed stream of documents
    (BOS_text doc EOS_text BOS_text ...), so the model may end the document and start another one;
    ``decode_text`` keeps the first document.
    """
    v, room = layout.vocab, prompt_capacity(layout, "text")  # the row after BOS_text
    if len(prompt) > room:
        raise ValueError(
            f"the prompt is {len(prompt)} tokens but a text row holds at most {room} after BOS_text "
            f"(seq_len {layout.seq_len}); shorten it"
        )
    ids = torch.full((layout.seq_len,), v.mask("text"), dtype=torch.long)
    ids[0], ids[1] = v.task("text"), v.bos("text")
    ids[2 : 2 + len(prompt)] = v.to_global(torch.as_tensor(list(prompt), dtype=torch.long), "text")
    return layout_template(layout, ids)


def task_template(
    layout: Layout, task: str, *, text: Sequence[int] = (), media: Sequence[int] | np.ndarray | None = None
) -> Template:
    """One row of a generation task ("text", "t2i", "i2t", "t2s", "s2t") from its condition.

    text, t2i, t2s: ``text`` holds the prompt's local text ids, and the text row (or the pair row's
    media slot) is all MASK. i2t, s2t: ``media`` holds the local image / audio ids, and the pair
    row's text slot is all MASK_text. Infilling is ``layout_template`` of a row with MASKs inside.
    """
    if task not in GENERATION_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(GENERATION_TASKS)}")
    row_task, generated = GENERATION_TASKS[task]
    if row_task == "text":
        return text_template(layout, text)
    if generated == "media":
        ids = layout.pair_row(
            row_task,
            torch.zeros(layout.media_len(row_task), dtype=torch.long),
            torch.as_tensor(list(text), dtype=torch.long),
        )
        ids[layout.media_slot(row_task)] = layout.vocab.mask(MEDIA[row_task])
    elif media is None:
        raise ValueError(f"task {task!r} needs the {MEDIA[row_task]} to describe")
    else:
        ids = layout.pair_row(
            row_task, torch.as_tensor(np.asarray(media), dtype=torch.long), torch.zeros(0, dtype=torch.long)
        )
        ids[layout.text_slot(row_task)] = layout.vocab.mask("text")
    return layout_template(layout, ids)


def prompt_capacity(layout: Layout, task: str) -> int:
    """The longest prompt (in text tokens) a task's row holds: text after BOS_text, or a pair's caption."""
    row_task = GENERATION_TASKS[task][0]
    return layout.text_capacity("text") - 1 if row_task == "text" else layout.text_capacity(row_task)


# ----------------------------------------------------------------------------------------------
# 2. One step at a time
# ----------------------------------------------------------------------------------------------


def time_grid(steps: int) -> Tensor:
    """t_0 = 1 > t_1 > ... > t_S = 0, uniform in t (float64, S + 1 points; both ends exact)."""
    return 1 - torch.arange(steps + 1, dtype=torch.float64) / steps


def unmask_probability(beta_s: Tensor, beta_next: Tensor) -> Tensor:
    """P(a position masked at time s is revealed by time s' < s) = (beta_s - beta_s') / beta_s.

    Why: the forward process masks position i iff u_i < beta_t for one uniform u_i, so the masked
    sets are nested and P(masked at s' | masked at s) = beta_s' / beta_s. The reverse step keeps a
    masked position masked with that probability and reveals it otherwise. At the last step
    beta_0 = 0, so the probability is 1 and nothing stays masked.
    """
    if beta_s <= 0:
        return torch.ones((), dtype=torch.float64)
    return (beta_s - beta_next) / beta_s


def remaining_counts(n_start: Tensor, beta_next: Tensor) -> Tensor:
    """How many positions of each row stay masked after a confidence step: round(n_start * beta_s').

    n_start (B,) counts the positions to generate. These are the ancestral sampler's expected counts,
    n_start * beta_s' (a position is still masked at s' with probability beta_s'), so both samplers
    reveal tokens at the same average pace along the inference schedule; beta_0 = 0 ends at zero.
    """
    return torch.round(n_start.double() * beta_next).long()


def guided_logits(cond: Tensor, uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance: logits_g = logits_u + (1 + w) (logits_c - logits_u).

    Equivalently logits_c + w (logits_c - logits_u): w = 0 is plain conditional sampling, w > 0
    pushes away from the unconditional model (Ho & Salimans' w; LLaDA's cfg_scale). In the other
    common form logits_u + w' (logits_c - logits_u) this is w' = 1 + w. Computed on the finite
    entries only: masking the conditioning segment keeps every position's modality, so the -inf
    entries (other modalities, MASK, task tokens) coincide in both passes and stay -inf, with no
    inf - inf = nan.
    """
    finite = torch.isfinite(cond)
    diff = torch.where(finite, cond - uncond, torch.zeros_like(cond))
    return torch.where(finite, cond + w * diff, cond)


def token_distribution(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """(n, V) logits -> (n, V) float64 probabilities to draw from: temperature, then top-p.

    p_T(v) ~ exp(logit_v / T); T = 0 means greedy (all mass on the argmax). Top-p (nucleus) keeps
    the smallest set of most probable tokens whose mass reaches ``top_p`` (always at least one) and
    renormalises. Everything in float64: a float32/bf16 softmax or Gumbel draw loses the tail and
    silently lowers the effective temperature (LLaDA's generate.py documents this).
    """
    logits = logits.double()
    if temperature == 0:
        probs = torch.zeros_like(logits)
        return probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more probable tokens
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw_categorical(probs: Tensor, u: Tensor) -> Tensor:
    """One token per row by inverse CDF: the v with F(v-1) <= u * F(V) < F(v), F the float64 CDF.

    probs (n, V) float64, u (n,) uniforms in [0, 1). A zero-probability token can never be drawn
    (its CDF step is empty), and one uniform per position makes the noise a fixed function of the
    random stream.
    """
    cdf = probs.cumsum(-1)
    target = (u.to(cdf) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def confidence(logits: Tensor, tokens: Tensor) -> Tensor:
    """The confidence of a drawn token: p_theta(x_i = x̂_i | x_t) at temperature 1.

    Precisely: the probability of the token x̂_i that was *drawn* at position i (with the sampler's
    temperature and top-p), under the denoiser's distribution after guidance and the content-only
    restriction but *before* temperature and top-p. It is not the maximum probability (unless
    T = 0, when x̂_i is the argmax) and it does not change with the temperature. This is LLaDA's
    "low_confidence" remasking: draw a token everywhere, keep the k most confident, re-mask the rest.
    """
    return torch.softmax(logits.double(), dim=-1).gather(-1, tokens[:, None])[:, 0]


def top_k_per_row(candidates: Tensor, score: Tensor, k: Tensor) -> Tensor:
    """(B, L) bool: in each row b, the k[b] candidate positions with the highest score.

    Ties go to the leftmost position (a stable sort), so the choice is a deterministic function of
    the scores.
    """
    B, L = candidates.shape
    score = torch.where(candidates, score, torch.full_like(score, -math.inf))
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=order.device).expand(B, L))
    return candidates & (rank < k[:, None])


def fill_after_end(x: Tensor, ends: Tensor, vocab: Vocab) -> Tensor:
    """The end-of-text rule of a variable-length text slot (a pair's caption or transcript).

    In the training layout the text slot reads ``text EOS_text PAD_text ... PAD_text``: PAD after
    EOS is data, predicted like any token. Rule: let j be the first position of the slot holding a
    revealed EOS_text *or* PAD_text (the first end); every still-masked slot position after j becomes
    PAD_text at once, and the masked positions before j stay to be generated (they may end the text
    earlier, which moves j left). Tokens revealed after j before the end appeared keep their value
    (carry-over) and are dropped by ``decode_text``, which also cuts at the first EOS/PAD: a PAD
    revealed before any EOS is treated as the end, just as an EOS. For the true conditionals this
    is what the model would sample anyway (PAD follows the end with probability 1); the rule removes
    a weak model's slips and saves the steps those positions would take.
    """
    end = ends & ((x == vocab.eos("text")) | (x == vocab.pad))
    after = ends & (end.long().cumsum(1) > 0) & vocab.is_mask(x)
    return torch.where(after, torch.full_like(x, vocab.pad), x)


# ----------------------------------------------------------------------------------------------
# 3. The samplers
# ----------------------------------------------------------------------------------------------


class DenoiserLike(Protocol):
    """What the samplers need of a model: ``mdm.Denoiser`` or any oracle with the same contract."""

    vocab: Vocab

    def __call__(self, x_t: Tensor, where: Tensor | None = None) -> Tensor: ...


class Predictor:
    """p_theta(x_0 | x_t) at the masked positions as the samplers use it: guided, restricted, cached, counted.

    Guidance: with w != 0 a second pass sees x_t with the template's conditioning segment replaced by
    MASK_m (``guided_logits``). Restriction: at ``content_only`` positions BOS_m, EOS_m and PAD_text
    get probability 0. Caching (MDLM's ddpm_cache): the denoiser has no time input, so its output depends on x_t only;
    when no position changed since the last call, the last output is returned without running the
    network. The check is on the whole batch (bit-exact reuse, the same tensor shapes as without
    caching, so cached and uncached runs are identical on any device); it pays off when the steps
    outnumber the tokens each row reveals, and with small batches. ``nfe`` counts network passes:
    two per evaluation with guidance (conditional, then unconditional).
    """

    def __init__(
        self, model: DenoiserLike, template: Template, guidance: float, cache: bool, device: torch.device
    ) -> None:
        v = model.vocab
        self.model, self.guidance, self.cache = model, guidance, cache
        self.cond = template.cond.to(device)
        self.content_only = template.content_only.to(device)
        self.mask_table = v.mask_table().to(device)
        self.specials = torch.zeros(v.size, dtype=torch.bool, device=device)  # BOS_m, EOS_m, PAD_text
        self.specials[[f(m) for m in MODALITIES for f in (v.bos, v.eos)] + [v.pad]] = True
        self.nfe = 0
        self._x: Tensor | None = None
        self._logits: Tensor | None = None

    def __call__(self, x: Tensor, masked: Tensor) -> Tensor:
        """(n, |V|) float32 logits at the n positions where ``masked`` is True (row-major)."""
        if self.cache and self._x is not None and torch.equal(x, self._x):
            return self._logits
        logits = self.model(x, where=masked).float()
        self.nfe += 1
        if self.guidance != 0:
            x_uncond = torch.where(self.cond, self.mask_table[x], x)  # the conditioning segment -> MASK_m
            logits = guided_logits(logits, self.model(x_uncond, where=masked).float(), self.guidance)
            self.nfe += 1
        restrict = self.content_only[masked]  # (n,) positions that may take content tokens only
        logits = logits.masked_fill(restrict[:, None] & self.specials, -math.inf)
        self._x, self._logits = x.clone(), logits
        return logits


@dataclass
class Sample:
    """The result of ``sample``: finished rows and what it cost.

    ids (B, L) with zero MASK tokens; order (B, L) the step at which each position was revealed
    (-1 for known positions; positions filled by the end-of-text rule get the step that revealed
    their end, 0 for an end given in the template); nfe network passes; seconds of wall-clock time for the whole batch.
    """

    ids: Tensor
    order: Tensor
    nfe: int
    seconds: float
    config: SamplerConfig

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / max(1, self.ids.shape[0])


def ancestral_step(
    masked: Tensor, logits: Tensor, p_unmask: Tensor, u_reveal: Tensor, u_token: Tensor, cfg: SamplerConfig
) -> tuple[Tensor, Tensor]:
    """One step s -> s' of the exact reverse process: returns (reveal (B, L) bool, tokens (n_reveal,)).

    Each masked position is revealed independently with probability (beta_s - beta_s')/beta_s
    (``unmask_probability``), i.e. iff its uniform u < that probability; a revealed position takes
    x̂ ~ p_theta(x_0 | x_t) (with temperature and top-p). Positions revealed in the same step are
    drawn independently given x_t: the only approximation of few-step sampling. Under the linear
    grid each of n positions is revealed at a uniformly random one of the S steps, so about
    C(n, 2)/S pairs share a step (the birthday problem): the error vanishes only for S >> n^2/2,
    not as soon as the steps outnumber the tokens.
    """
    reveal = masked & (u_reveal < p_unmask)
    rows = reveal[masked]  # which of the logits' rows are revealed
    probs = token_distribution(logits[rows], cfg.temperature, cfg.top_p)
    return reveal, draw_categorical(probs, u_token[reveal])


def confidence_step(
    masked: Tensor, logits: Tensor, n_keep: Tensor, u_token: Tensor, cfg: SamplerConfig
) -> tuple[Tensor, Tensor]:
    """One MaskGIT / LLaDA step: draw a token at every masked position, keep the most confident.

    Row b keeps k_b = (masked now) - n_keep_b of its draws, the ones with the highest ``confidence``
    (the probability of the drawn token; see that function), and discards the others (they stay
    masked, i.e. they are "re-masked"). n_keep comes from ``remaining_counts``, so the counts follow
    the inference schedule. Returns (reveal (B, L) bool, tokens (n_reveal,)).
    """
    tokens = draw_categorical(token_distribution(logits, cfg.temperature, cfg.top_p), u_token[masked])
    score = torch.zeros(masked.shape, dtype=torch.float64, device=masked.device)
    score[masked] = confidence(logits, tokens)
    k = (masked.sum(1) - n_keep).clamp_min(0)
    reveal = top_k_per_row(masked, score, k)
    return reveal, tokens[reveal[masked]]


@torch.no_grad()  # not inference_mode: its tensors reject in-place edits later, a trap for users of ids
def sample(
    model: DenoiserLike,
    template: Template,
    cfg: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
) -> Sample:
    """Complete every row of ``template`` with ``cfg``'s sampler. The loop, for steps i = 0 .. S-1:

    1. draw two float64 uniforms per position, u_reveal and u_token, from ``generator`` (a CPU
       generator; None means torch's global one). The draws never depend on the network or on
       caching, so a cached and an uncached run consume the same random stream and agree exactly;
    2. ask the ``Predictor`` for p_theta(x_0 | x_t) at the masked positions (the network runs only if
       x_t changed since its last call, or always with ``cache=False``);
    3. reveal tokens (``ancestral_step`` or ``confidence_step``); known and revealed tokens are never
       touched again (carry-over);
    4. apply the end-of-text rule (``fill_after_end``) to variable-length text slots.

    The last step reveals everything still masked, so the result holds zero MASK tokens.
    """
    cfg = cfg or SamplerConfig()
    vocab = model.vocab
    template.validate(vocab)
    device = _device_of(model)
    start = time.perf_counter()
    x = template.ids.to(device).clone()
    ends = template.ends.to(device)
    B, L = x.shape
    predictor = Predictor(model, template, cfg.guidance, cfg.cache, device)
    order = torch.full((B, L), -1, dtype=torch.long, device=device)
    x = _apply_end_rule(x, ends, order, 0, vocab)
    n_start = vocab.is_mask(x).sum(1)
    betas = Schedule.parse(cfg.schedule).beta(time_grid(cfg.steps))
    for i in range(cfg.steps):
        masked = vocab.is_mask(x)
        if not masked.any():
            break
        u_reveal = torch.rand((B, L), generator=generator, dtype=torch.float64).to(device)
        u_token = torch.rand((B, L), generator=generator, dtype=torch.float64).to(device)
        logits = predictor(x, masked)
        if cfg.sampler == "ancestral":
            p = unmask_probability(betas[i], betas[i + 1]).to(device)
            reveal, tokens = ancestral_step(masked, logits, p, u_reveal, u_token, cfg)
        else:
            n_keep = remaining_counts(n_start, betas[i + 1]).to(device)
            reveal, tokens = confidence_step(masked, logits, n_keep, u_token, cfg)
        x = x.masked_scatter(reveal, tokens)
        order[reveal] = i
        x = _apply_end_rule(x, ends, order, i, vocab)
    if vocab.is_mask(x).any():  # unreachable by construction: the last step reveals everything
        raise AssertionError("sampling finished with MASK tokens left")
    return Sample(x.cpu(), order.cpu(), predictor.nfe, time.perf_counter() - start, cfg)


def _apply_end_rule(x: Tensor, ends: Tensor, order: Tensor, step: int, vocab: Vocab) -> Tensor:
    filled = fill_after_end(x, ends, vocab)
    order[filled != x] = step
    return filled


def _device_of(model: object) -> torch.device:
    if isinstance(model, nn.Module):
        for p in itertools.chain(model.parameters(), model.buffers()):
            return p.device
    return torch.device("cpu")


def generate(
    model: DenoiserLike,
    layout: Layout,
    task: str,
    cfg: SamplerConfig | None = None,
    *,
    texts: Sequence[Sequence[int]] = ((),),
    media: Sequence[Sequence[int] | np.ndarray] = (),
    num: int = 1,
    seed: int = 0,
) -> tuple[Template, Sample]:
    """``num`` samples of ``task`` for each condition, in one batch (rows grouped by condition).

    texts: local text ids of each prompt (text, t2i, t2s; the default is one empty prompt, i.e.
    unconditional text). media: local image / audio ids of each input (i2t, s2t). cfg defaults to
    the task's preset. The seed fixes the result: same seed, same samples.
    """
    if task not in GENERATION_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(GENERATION_TASKS)}")
    cfg = cfg or PRESETS[task]
    if GENERATION_TASKS[task][1] == "text" and task != "text":
        rows = [task_template(layout, task, media=m) for m in media]
    else:
        rows = [task_template(layout, task, text=t) for t in texts]
    if not rows:
        raise ValueError(f"task {task!r} needs at least one condition")
    template = Template.cat([r.repeat(num) for r in rows])
    return template, sample(model, template, cfg, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# 4. Settings: the sampler config and the per-task presets
# ----------------------------------------------------------------------------------------------

SAMPLERS: tuple[str, ...] = ("ancestral", "confidence")


@dataclass(frozen=True)
class SamplerConfig:
    """Everything that decides how a template is completed (seeds aside).

    sampler:     "ancestral" (the exact reverse process) or "confidence" (MaskGIT / LLaDA top-k).
    steps:       S, the number of steps from t = 1 to t = 0.
    schedule:    the inference schedule beta_t ("linear", "cosine", "poly2", "poly:0.5"; see
                 ``mdm.Schedule.parse``). It need not be the training schedule.
    temperature: T > 0 scales the logits by 1/T; T = 0 is greedy.
    top_p:       nucleus sampling mass in (0, 1]; 1 keeps every token.
    guidance:    classifier-free guidance w (``guided_logits``): 0 is conditional sampling and costs
                 one network pass per evaluation, w != 0 two.
    cache:       reuse the denoiser's output while x_t does not change (identical results, fewer NFE).
    """

    sampler: str = "ancestral"
    steps: int = 64
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
        Schedule.parse(self.schedule)  # raises a clear error for an unknown schedule
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"the guidance weight must be finite, got {self.guidance}")

    def to_dict(self) -> dict:
        return asdict(self)


# Per-task defaults, chosen on the validation split by the lab's inference study (lab/STUDIES.md).
PRESETS: dict[str, SamplerConfig] = {
    "text": SamplerConfig(sampler="ancestral", steps=96, temperature=0.8),
    "t2i": SamplerConfig(sampler="ancestral", steps=32, temperature=0.5, guidance=1.5),
    "i2t": SamplerConfig(sampler="confidence", steps=32, temperature=0.0),
    "t2s": SamplerConfig(sampler="confidence", steps=32, temperature=0.5, guidance=1.5),
    "s2t": SamplerConfig(sampler="confidence", steps=32, temperature=0.0),
}


# ----------------------------------------------------------------------------------------------
# 5. Outputs: decoding rows, text, image grids, WAV files, a manifest
# ----------------------------------------------------------------------------------------------


def decode_text(row: Tensor, layout: Layout, task: str, tokenizer: object) -> str:
    """The generated (or given) text of one row: a text row's first document, or a pair's text slot.

    The text is cut at the first EOS_text, and in a pair's slot also at the first PAD_text (the
    end-of-text rule's reading). ``tokenizer.decode(list[int]) -> str`` takes local text ids.
    """
    v = layout.vocab
    row_task = GENERATION_TASKS[task][0] if task in GENERATION_TASKS else task
    ids = row[layout.text_slot(row_task)]
    if row_task == "text":
        ids = ids[1:] if len(ids) and int(ids[0]) == v.bos("text") else ids
    else:
        stops = ((ids == v.eos("text")) | (ids == v.pad)).nonzero()
        ids = ids[: int(stops[0]) if len(stops) else len(ids)]
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


def save_image_grid(path: Path, images: Sequence[np.ndarray], labels: Sequence[str], levels: int = 17) -> Path:
    """A PNG grid of gray-level images (0 .. levels-1, bright = ink), each titled with its label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.5 * cols, 1.8 * rows))
    FigureCanvasAgg(fig)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=levels - 1, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(label, 18)[:2]), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def save_wavs(folder: Path, waves: Sequence[np.ndarray], sample_rate: int) -> list[Path]:
    """sample_000.wav, sample_001.wav, ... (16-bit PCM, clipped to [-1, 1])."""
    import soundfile as sf

    paths = []
    for i, wave in enumerate(waves):
        path = folder / f"sample_{i:03d}.wav"
        sf.write(path, np.clip(np.asarray(wave, dtype=np.float32), -1, 1), sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# 6. The command line
# ----------------------------------------------------------------------------------------------

USAGE_EXAMPLES = """examples:
  python sample.py --checkpoint runs/tiny/ckpt.pt --task text --prompt "The" --num 4
  python sample.py --checkpoint runs/tiny/ckpt.pt --task t2i --prompt "a handwritten seven" --num 16
  python sample.py --checkpoint runs/tiny/export --task i2t --image digit.png
  python sample.py --checkpoint runs/tiny/ckpt.pt --task t2s --prompt "seven"
  python sample.py --checkpoint runs/tiny/ckpt.pt --task s2t --audio clip.wav
"""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # an expected error: one line and status 2, no usage dump
        fail(message, self.prog)

    def option(self, name: str, **kw) -> None:
        """``--name``, also spelled with hyphens (``--top-p`` for ``--top_p``), as in every script here."""
        self.add_argument(*dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]), dest=name, **kw)


def fail(message: object, prog: str = "sample.py") -> None:
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="sample.py",
        description="Generate text, images and speech with a trained tri-modal MDM.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        kind = {"int": int, "float": float, "str": str, "bool": None}[f.type]
        if kind is not None:
            p.option(f.name, type=kind, help="sampler setting (default: the task's preset, sample.PRESETS)")
    p.option("no_cache", action="store_true", help="run the network at every step")
    return p


def read_image(path: str, inf: Inference) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L"))
    except OSError as e:  # missing file, or not an image PIL can read
        raise ValueError(f"cannot read image {path}: {e}") from None
    return inf.image_tokenizer.encode(inf.image_tokenizer.to_gray_levels(pixels))


def read_audio(path: str, inf: Inference) -> np.ndarray:
    import soundfile as sf

    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as e:  # sf.LibsndfileError is a RuntimeError
        raise ValueError(f"cannot read audio file {path} (expected WAV/FLAC/OGG readable by soundfile): {e}") from None
    if len(wave) == 0:
        raise ValueError(f"audio file {path} holds no samples")
    return inf.audio_codec.encode(resample(wave.mean(axis=1), rate, inf.audio_codec.sample_rate))


def cli_template(args: argparse.Namespace, inf: Inference) -> tuple[Template, list[str]]:
    """The batch template of the command line and one label per row."""
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.task in ("i2t", "s2t"):
        files = args.image if args.task == "i2t" else args.audio
        if not files:
            raise ValueError(f"--task {args.task} needs {'--image' if args.task == 'i2t' else '--audio'} FILE")
        read = read_image if args.task == "i2t" else read_audio
        rows, labels = [task_template(inf.layout, args.task, media=read(f, inf)) for f in files], list(files)
    else:
        labels = args.prompt or ([""] if args.task == "text" else [])
        if not labels:
            raise ValueError(f"--task {args.task} needs --prompt TEXT")
        room = prompt_capacity(inf.layout, args.task)
        rows = []
        for prompt in labels:
            ids = inf.text_tokenizer.encode(prompt)
            if len(ids) > room:
                raise ValueError(
                    f"the prompt {prompt[:40]!r} is {len(ids)} tokens but task {args.task} holds at most {room} "
                    f"with this checkpoint's layout (seq_len {inf.layout.seq_len}); shorten it"
                )
            rows.append(task_template(inf.layout, args.task, text=ids))
    return Template.cat([r.repeat(args.num) for r in rows]), [label for label in labels for _ in range(args.num)]


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    chosen = {f.name: getattr(args, f.name) for f in fields(SamplerConfig) if getattr(args, f.name, None) is not None}
    try:  # expected errors: a bad option, a missing or unreadable file (one line, no traceback)
        cfg = replace(PRESETS[args.task], **chosen, **({"cache": False} if args.no_cache else {}))
    except ValueError as e:
        fail(e)
    try:
        inf = load_for_inference(args.checkpoint, device=args.device)
    except (OSError, ValueError) as e:
        fail(f"cannot load checkpoint {args.checkpoint}: {e}")
    try:
        template, labels = cli_template(args, inf)
    except ValueError as e:
        fail(e)
    result = sample(inf.model, template, cfg, torch.Generator().manual_seed(args.seed))
    out, task = Path(args.out), args.task
    out.mkdir(parents=True, exist_ok=True)
    samples = [{"condition": label} for label in labels]
    if GENERATION_TASKS[task][1] == "text":
        texts = [decode_text(row, inf.layout, task, inf.text_tokenizer) for row in result.ids]
        files = [write_texts(out / "samples.txt", texts, labels)]
        for i, (text, sample_) in enumerate(zip(texts, samples, strict=True)):
            sample_["text"] = text
            print(f"[{i}] ({labels[i]}) {text}")
    elif task == "t2i":
        images = np.stack([inf.image_tokenizer.decode(decode_media(row, inf.layout, task)) for row in result.ids])
        np.save(out / "images.npy", images)
        files = [
            save_image_grid(out / "grid.png", list(images), labels, inf.image_tokenizer.levels),
            out / "images.npy",
        ]
    else:
        waves = [inf.audio_codec.decode(decode_media(row, inf.layout, task)) for row in result.ids]
        files = save_wavs(out, waves, inf.audio_codec.sample_rate)
        for path, sample_ in zip(files, samples, strict=True):
            sample_["file"] = path.name
    manifest = {
        "task": task,
        "checkpoint": args.checkpoint,
        "config": cfg.to_dict(),
        "seed": args.seed,
        "num_per_condition": args.num,
        "samples": samples,
        "files": [f.name for f in files],
        "nfe": result.nfe,
        "seconds": round(result.seconds, 4),
        "seconds_per_sample": round(result.seconds_per_sample, 6),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(
        f"{len(labels)} samples, NFE {result.nfe}, {result.seconds_per_sample:.3f} s/sample -> {out / 'manifest.json'}"
    )


if __name__ == "__main__":
    main()
