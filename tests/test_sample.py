"""Tests of sample.py: the samplers' invariants, exactness of the ancestral sampler, caching, guidance,
the end-of-text rule, the generation API, the outputs, the command line's handling of bad input and
the animations of the reverse process.

Two kinds of denoiser are used: a tiny randomly initialised ``Denoiser`` (its unembedding is
randomised so that its predictions depend on x_t), and *oracles* whose predictions are known: a
``FixedDenoiser`` that ignores x_t (the reverse process's timing and the final token law are then
known in closed form) and a ``JointOracle`` that returns the true conditionals of a small joint law.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFont, ImageSequence
from scipy.stats import chi2
from torch import Tensor

import mdm
import sample as S
from data import MEDIA, Layout, PixelTokenizer
from mdm import MODALITIES, Schedule, Vocab
from model import Denoiser, ModelConfig
from sample import SamplerConfig, Template

VOCAB = Vocab(text=20, audio=12, image=17)
LAYOUT = Layout(VOCAB, seq_len=24, image_len=9, audio_len=6)  # image_text text slot: 11, audio_text: 14


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed: int = 0) -> Denoiser:
    with torch.random.fork_rng():  # leave the global random state alone
        torch.manual_seed(seed)
        model = Denoiser(ModelConfig(d_model=32, n_layers=2, n_heads=4, max_len=LAYOUT.seq_len), VOCAB)
        torch.nn.init.normal_(model.unembed.weight, std=0.5)  # zero at init: make predictions depend on x_t
    return model.eval()


MODEL = tiny_model()


class FixedDenoiser:
    """An oracle whose prediction ignores x_t: position i predicts softmax(table[i]) over its modality."""

    def __init__(self, vocab: Vocab, length: int, seed: int = 0, scale: float = 1.0) -> None:
        self.vocab = vocab
        self.table = torch.randn(length, vocab.size, generator=torch.Generator().manual_seed(seed)) * scale
        self.logit_mask = torch.full((len(MODALITIES), vocab.size), -math.inf)
        for m, name in enumerate(MODALITIES):
            self.logit_mask[m, vocab.predict_slice(name)] = 0.0
        self.inputs: list[Tensor] = []

    def __call__(self, x_t: Tensor, where: Tensor | None = None) -> Tensor:
        self.inputs.append(x_t.clone())
        logits = self.table + self.logit_mask[self.vocab.modality_of(x_t)]  # (B, L, V)
        return logits if where is None else logits[where]

    def probs(self, modality: str) -> np.ndarray:
        """(L, V) the law each position of ``modality`` samples from at temperature 1."""
        m = MODALITIES.index(modality)
        return torch.softmax(self.table.double() + self.logit_mask[m].double(), -1).numpy()


def check_finished(template: Template, result: S.Sample, vocab: Vocab = VOCAB) -> None:
    """The invariants of every finished sample."""
    out, ids = result.ids, template.ids
    assert not vocab.is_mask(out).any(), "a finished sample holds zero MASK tokens"
    assert torch.equal(out[template.known], ids[template.known]), "known tokens never change"
    assert torch.equal(vocab.modality_of(out), vocab.modality_of(ids)), "each position keeps its modality"
    control = ~template.known & (out >= vocab.control_start)
    assert not control.any(), "MASK and task tokens are never generated"
    for m, name in enumerate(MODALITIES):
        s = vocab.predict_slice(name)
        at = ~template.known & (vocab.modality_of(ids) == m)
        assert ((out[at] >= s.start) & (out[at] < s.stop)).all(), f"{name} positions take {name} tokens"
        content = template.content_only & (vocab.modality_of(ids) == m)
        assert (out[content] < vocab.bos(name)).all() and (out[content] >= s.start).all(), "content-only slots"
    assert ((result.order >= 0) == ~template.known).all(), "every unknown position was revealed at some step"
    check_end_rule(template, result, vocab)


def check_end_rule(template: Template, result: S.Sample, vocab: Vocab = VOCAB) -> None:
    """After the first EOS/PAD j of a text slot, a position is PAD unless revealed no later than j."""
    out, order = result.ids, result.order
    for r in range(out.shape[0]):
        slot = template.ends[r].nonzero()[:, 0]
        if not len(slot):
            continue
        ids = out[r, slot]
        stops = ((ids == vocab.eos("text")) | (ids == vocab.pad)).nonzero()[:, 0]
        if not len(stops):
            continue
        j = slot[stops[0]]
        for p in slot[slot > j]:
            assert out[r, p] == vocab.pad or order[r, p] <= order[r, j], (r, int(p), out[r].tolist())


# ----------------------------------------------------------------------------------------------
# Templates drawn by hypothesis
# ----------------------------------------------------------------------------------------------

local_text = st.lists(st.integers(0, VOCAB.text - 1), max_size=10)


@st.composite
def task_templates(draw: st.DrawFn) -> Template:
    """A batch of 1-4 rows of random generation tasks with random conditions."""
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        task = draw(st.sampled_from(tuple(S.GENERATION_TASKS)))
        row_task, generated = S.GENERATION_TASKS[task]
        if generated == "text" and row_task != "text":
            size = getattr(VOCAB, MEDIA[row_task])
            media = draw(st.lists(st.integers(0, size - 1), min_size=LAYOUT.media_len(row_task),
                                  max_size=LAYOUT.media_len(row_task)))  # fmt: skip
            rows.append(S.task_template(LAYOUT, task, media=media))
        else:
            rows.append(S.task_template(LAYOUT, task, text=draw(local_text)))
    return Template.cat(rows)


@st.composite
def general_templates(draw: st.DrawFn) -> Template:
    """The general entry point: a random clean row of any task, with a random set of known positions."""
    task = draw(st.sampled_from(mdm.TASKS))
    if task == "text":
        body = draw(st.lists(st.integers(0, VOCAB.predict_size("text") - 1), min_size=23, max_size=23))
        row = torch.tensor([VOCAB.task("text"), *body])
    else:
        m = MEDIA[task]
        media = draw(st.lists(st.integers(0, getattr(VOCAB, m) - 1), min_size=LAYOUT.media_len(task),
                              max_size=LAYOUT.media_len(task)))  # fmt: skip
        row = LAYOUT.pair_row(task, torch.tensor(media), torch.tensor(draw(local_text)))
    known = torch.tensor([True, *draw(st.lists(st.booleans(), min_size=23, max_size=23))])
    ids = torch.where(known, row, VOCAB.mask_table()[row])
    return S.layout_template(LAYOUT, ids, known)


configs = st.builds(
    SamplerConfig,
    sampler=st.sampled_from(S.SAMPLERS),
    steps=st.integers(1, 12),
    threshold=st.sampled_from([0.3, 0.9, 1.0]),
    schedule=st.sampled_from(["linear", "cosine", "poly2", "poly:0.5"]),
    temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]),
    top_p=st.sampled_from([0.3, 0.9, 1.0]),
    guidance=st.sampled_from([0.0, 0.0, 2.0]),
    cache=st.booleans(),
)


# ----------------------------------------------------------------------------------------------
# Invariants of finished samples
# ----------------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(task_templates(), configs, st.integers(0, 2**31))
def test_finished_samples_every_task(template: Template, cfg: SamplerConfig, seed: int) -> None:
    result = S.sample(MODEL, template, cfg, torch.Generator().manual_seed(seed))
    check_finished(template, result)


@settings(max_examples=40)
@given(general_templates(), configs, st.integers(0, 2**31))
def test_finished_samples_general_entry_point(template: Template, cfg: SamplerConfig, seed: int) -> None:
    result = S.sample(MODEL, template, cfg, torch.Generator().manual_seed(seed))
    check_finished(template, result)


def test_a_batch_of_64_mixed_tasks() -> None:
    rows = [S.task_template(LAYOUT, "text", text=[1, 2]), S.task_template(LAYOUT, "t2i", text=[3, 4, 5])]
    rows += [S.task_template(LAYOUT, "i2t", media=list(range(9))), S.task_template(LAYOUT, "s2t", media=[0] * 6)]
    template = Template.cat([r.repeat(16) for r in rows])
    assert template.ids.shape[0] == 64
    for sampler in S.SAMPLERS:
        result = S.sample(MODEL, template, SamplerConfig(sampler=sampler, steps=16), torch.Generator().manual_seed(0))
        check_finished(template, result)
        result.ids[0, 1] = result.ids[0, 1]  # an ordinary tensor (not an inference-mode one)


def test_generate_groups_samples_by_condition_and_decodes() -> None:
    template, result = S.generate(MODEL, LAYOUT, "t2s", texts=[[1, 2], [3]], num=3, seed=5)
    assert result.ids.shape == (6, LAYOUT.seq_len)
    check_finished(template, result)
    assert torch.equal(template.ids[0], template.ids[2]) and not torch.equal(template.ids[2], template.ids[3])
    assert all(S.decode_media(row, LAYOUT, "t2s").shape == (6,) for row in result.ids)
    template, result = S.generate(MODEL, LAYOUT, "i2t", media=[np.arange(9)], num=2)
    tok = FakeTokenizer()
    assert all(isinstance(S.decode_text(row, LAYOUT, "i2t", tok), str) for row in result.ids)


def test_infilling_is_a_layout_template_with_masks_inside() -> None:
    v = VOCAB
    ids = torch.full((LAYOUT.seq_len,), v.mask("text"))
    given = {0: v.task("text"), 1: v.bos("text"), 2: 4, 5: 7, 7: 2, 8: v.eos("text")}  # holes at 3, 4 and 6
    for i, tok in given.items():
        ids[i] = tok
    template = S.layout_template(LAYOUT, ids).repeat(8)
    result = S.sample(MODEL, template, SamplerConfig(steps=8), torch.Generator().manual_seed(0))
    check_finished(template, result)
    assert all((result.ids[:, i] == tok).all() for i, tok in given.items()), "the given text stays"


# ----------------------------------------------------------------------------------------------
# Determinism, caching and guidance
# ----------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(task_templates(), configs, st.integers(0, 2**31))
def test_cached_and_uncached_samplers_agree_exactly(template: Template, cfg: SamplerConfig, seed: int) -> None:
    runs = [
        S.sample(MODEL, template, replace(cfg, cache=cache), torch.Generator().manual_seed(seed))
        for cache in (True, False)
    ]
    assert torch.equal(runs[0].ids, runs[1].ids) and torch.equal(runs[0].order, runs[1].order)
    assert runs[0].nfe <= runs[1].nfe


def test_caching_saves_network_evaluations() -> None:
    """One row at the default 64 steps: the network runs only when a reveal changed the row."""
    for task, media in (("t2i", None), ("s2t", [1, 2, 3, 4, 5, 0])):
        template = S.task_template(LAYOUT, task, text=[1, 2], media=media)
        n = int((~template.known).sum())
        nfe = {}
        for cache in (True, False):
            cfg = SamplerConfig(steps=64, cache=cache)
            nfe[cache] = S.sample(MODEL, template, cfg, torch.Generator().manual_seed(0)).nfe
        assert n < nfe[False] <= 64, "one evaluation per step until nothing is left to reveal"
        assert nfe[True] <= n, "at most one evaluation per generated token"
        assert nfe[False] / nfe[True] >= 2, nfe
        # guidance: two passes per evaluation, cached alike
        cfg = SamplerConfig(steps=64, guidance=1.0)
        assert S.sample(MODEL, template, cfg, torch.Generator().manual_seed(0)).nfe <= 2 * n


def one_row(template: Template, b: int) -> Template:
    return Template(*(getattr(template, f.name)[b : b + 1] for f in dataclasses.fields(Template)))


def mixed_batch() -> Template:
    """64 rows: 16 conditions of each of four tasks (text prompts and media of varying content)."""
    rows = []
    for k in range(16):
        rows += [S.task_template(LAYOUT, "text", text=[k % 20, 3]), S.task_template(LAYOUT, "t2i", text=[k, 1, 2])]
        rows += [S.task_template(LAYOUT, "i2t", media=[(k + j) % 17 for j in range(9)])]
        rows += [S.task_template(LAYOUT, "s2t", media=[(k * j) % 12 for j in range(6)])]
    return Template.cat(rows)


def test_a_row_samples_the_same_alone_as_in_a_batch_of_64() -> None:
    """Each row draws from its own random stream and the network sees the rows independently, so a batch of 64
    mixed tasks gives exactly the tokens of 64 single-row runs. The one difference is float rounding: the network's
    output for a row at batch size 64 and at batch size 1 agree to within 1e-5 (checked below), and no draw of
    these runs falls that close to a boundary between two tokens."""
    template = mixed_batch()
    alone = torch.cat([MODEL(one_row(template, b).ids) for b in range(64)])
    assert torch.allclose(MODEL(template.ids), alone, atol=1e-5, rtol=0, equal_nan=True)
    for cfg in (SamplerConfig(steps=16), SamplerConfig(sampler="confidence", steps=12, guidance=1.0),
                SamplerConfig(sampler="threshold", steps=16, threshold=0.5, temperature=0.5)):  # fmt: skip
        batch = S.sample(MODEL, template, cfg, [torch.Generator().manual_seed(100 + b) for b in range(64)])
        for b in range(64):
            single = S.sample(MODEL, one_row(template, b), cfg, [torch.Generator().manual_seed(100 + b)])
            assert torch.equal(single.ids[0], batch.ids[b]) and torch.equal(single.order[0], batch.order[b]), (cfg, b)
        assert batch.row_evals < batch.nfe * 64, "rows that did not change (or are finished) skip the network"


def test_the_threshold_sampler_reveals_the_confident_positions_together() -> None:
    template = S.task_template(LAYOUT, "t2i", text=[1, 2])
    n = int((~template.known).sum())
    oracle = FixedDenoiser(VOCAB, LAYOUT.seq_len, seed=2)
    one_by_one = S.sample(oracle, template, SamplerConfig(sampler="threshold", steps=64, threshold=1.0))
    assert one_by_one.nfe == n and sorted(one_by_one.order[~template.known].tolist()) == list(range(n))
    at_once = S.sample(oracle, template, SamplerConfig(sampler="threshold", steps=64, threshold=1e-9))
    assert at_once.nfe == 1 and (at_once.order[~template.known] == 0).all()
    capped = S.sample(oracle, template, SamplerConfig(sampler="threshold", steps=3, threshold=1.0))
    assert capped.nfe == 3 and (capped.order[~template.known] == 2).sum() == n - 2, "the last step reveals all"
    logits = oracle.table.double() + oracle.logit_mask[MODALITIES.index("image")].double()
    logits[:, [VOCAB.bos("image"), VOCAB.eos("image")]] = -math.inf  # image slots take content tokens only
    tau, probs = 0.2, torch.softmax(logits, -1)
    result = S.sample(oracle, template, SamplerConfig(sampler="threshold", steps=64, threshold=tau))
    ids, order = result.ids[0], result.order[0]
    for step in range(result.nfe):
        revealed = (order == step).nonzero()[:, 0]
        conf = torch.tensor([probs[i, ids[i]] for i in revealed])
        assert len(revealed) >= 1 and (conf < tau).sum() <= 1, "below the threshold: only the row's best draw"
        if (conf < tau).any():
            assert len(revealed) == 1, "the most confident draw is kept alone when none passes"


def test_same_seed_same_output_and_another_seed_differs() -> None:
    template = Template.cat([S.task_template(LAYOUT, "text"), S.task_template(LAYOUT, "t2i", text=[1])]).repeat(2)
    for sampler in S.SAMPLERS:
        cfg = SamplerConfig(sampler=sampler, steps=10)
        a, b, c = (S.sample(MODEL, template, cfg, torch.Generator().manual_seed(s)).ids for s in (7, 7, 8))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_guided_logits_formula_and_infinities() -> None:
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    cond[:, 8:], uncond[:, 8:] = -math.inf, -math.inf  # the other modalities: -inf in both passes
    for w in (0.0, 0.5, 3.0):
        out = S.guided_logits(cond, uncond, w)
        assert not out.isnan().any()
        assert torch.equal(out[:, 8:], cond[:, 8:])
        assert torch.allclose(out[:, :8], uncond[:, :8] + (1 + w) * (cond[:, :8] - uncond[:, :8]))
    assert torch.equal(S.guided_logits(cond, uncond, 0.0), cond), "w = 0 is exactly the conditional logits"


def test_guidance_zero_is_plain_conditional_sampling() -> None:
    template = Template.cat(
        [S.task_template(LAYOUT, "t2i", text=[1, 2, 3]), S.task_template(LAYOUT, "i2t", media=range(9))]
    )
    template = template.repeat(3)
    run = {
        w: S.sample(MODEL, template, SamplerConfig(steps=12, guidance=w), torch.Generator().manual_seed(3))
        for w in (0.0, 2.0)
    }
    # with nothing to drop the unconditional pass sees the same row: the guided path reduces exactly
    # to the conditional one, at twice the NFE
    bare = Template(template.ids, template.known, ends=template.ends, content_only=template.content_only)
    same = S.sample(MODEL, bare, SamplerConfig(steps=12, guidance=2.0), torch.Generator().manual_seed(3))
    assert torch.equal(same.ids, run[0.0].ids)
    assert same.nfe == 2 * run[0.0].nfe
    assert not torch.equal(run[2.0].ids, run[0.0].ids), "guidance changes the samples"


def test_the_unconditional_pass_masks_the_conditioning_segment_only() -> None:
    oracle = FixedDenoiser(VOCAB, LAYOUT.seq_len)
    template = S.task_template(LAYOUT, "t2i", text=[5, 6])
    S.sample(oracle, template, SamplerConfig(steps=1, guidance=1.0), torch.Generator().manual_seed(0))
    cond_input, uncond_input = oracle.inputs
    assert torch.equal(cond_input, template.ids)
    text = LAYOUT.text_slot("image_text")
    assert (uncond_input[0, text] == VOCAB.mask("text")).all(), "caption, EOS_text and PAD masked"
    keep = torch.ones(LAYOUT.seq_len, dtype=torch.bool)
    keep[text] = False
    assert torch.equal(uncond_input[0, keep], template.ids[0, keep]), "TASK, BOS/EOS and the image slot kept"
    oracle.inputs.clear()
    template = S.task_template(LAYOUT, "s2t", media=[1] * 6)
    S.sample(oracle, template, SamplerConfig(steps=1, guidance=1.0), torch.Generator().manual_seed(0))
    assert (oracle.inputs[1][0, LAYOUT.media_slot("audio_text")] == VOCAB.mask("audio")).all()
    assert oracle.inputs[1][0, 1] == VOCAB.bos("audio") and oracle.inputs[1][0, 8] == VOCAB.eos("audio")


# ----------------------------------------------------------------------------------------------
# The ancestral sampler is the exact reverse process
# ----------------------------------------------------------------------------------------------

SMALL = Vocab(text=4, audio=3, image=3)  # a 7-token text block: every token frequent enough to count


def all_masked_text_rows(n_rows: int, length: int, vocab: Vocab = SMALL) -> Template:
    ids = torch.full((n_rows, length), vocab.mask("text"))
    ids[:, 0] = vocab.task("text")
    return Template(ids, ids == vocab.task("text"))


@pytest.mark.parametrize("schedule", ["linear", "poly2", "cosine"])
def test_ancestral_unmasking_times_follow_the_schedule(schedule: str) -> None:
    """With a denoiser that ignores x_t, a position is still masked after k of S steps with probability
    beta(t_k): the product of the keep probabilities beta_s'/beta_s telescopes."""
    steps, rows, length = 8, 3000, 9
    template = all_masked_text_rows(rows, length)
    result = S.sample(FixedDenoiser(SMALL, length), template, SamplerConfig(steps=steps, schedule=schedule),
                      torch.Generator().manual_seed(1))  # fmt: skip
    order = result.order[:, 1:].double()  # step at which each generated position was revealed
    n = order.numel()
    beta = Schedule.parse(schedule).beta(S.time_grid(steps))
    # two plausible mistakes: p = beta_s - beta_s' (unnormalised), and p = 1/(steps left) (schedule-blind)
    wrong_a = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), 1 - (beta[:-1] - beta[1:])]), 0)
    wrong_b = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    far_from_a = far_from_b = False
    for k in range(1, steps):
        measured = float((order >= k).double().mean())  # still masked after k steps
        se = math.sqrt(float(beta[k]) * (1 - float(beta[k])) / n)
        assert abs(measured - float(beta[k])) < 4 * se + 1e-12, (k, measured, float(beta[k]))
        far_from_a |= abs(measured - float(wrong_a[k])) > 8 * se
        far_from_b |= abs(measured - float(wrong_b[k])) > 8 * se
    assert far_from_a and (far_from_b or schedule == "linear"), "the test tells the right formula from wrong ones"
    assert (order == steps - 1).any() and (order <= steps - 1).all()


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.5, 1.0), (1.0, 0.6), (2.0, 0.8)])
def test_ancestral_final_tokens_follow_the_model(temperature: float, top_p: float) -> None:
    """Each position's final token ~ p_T restricted to the top-p nucleus, computed here independently."""
    rows, length = 3000, 4
    oracle = FixedDenoiser(SMALL, length, seed=2)
    cfg = SamplerConfig(steps=4, temperature=temperature, top_p=top_p)
    result = S.sample(oracle, all_masked_text_rows(rows, length), cfg, torch.Generator().manual_seed(0))
    text, tested = SMALL.predict_slice("text"), 0
    for i in range(1, length):
        logits = oracle.table[i, text].double().numpy() / temperature
        p = np.exp(logits - logits.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, dtype=bool)
        keep[order[before < top_p]] = True
        expected = np.where(keep, p, 0) / p[keep].sum()
        counts = np.bincount(result.ids[:, i].numpy() - text.start, minlength=len(p))
        assert (counts[~keep] == 0).all(), "tokens outside the nucleus are never drawn"
        stat = ((counts[keep] - rows * expected[keep]) ** 2 / (rows * expected[keep])).sum()
        assert keep.sum() == 1 or chi2.sf(stat, keep.sum() - 1) > 1e-3, (i, counts, rows * expected)
        tested += keep.sum() > 1 and (top_p == 1 or (~keep).any())
    assert tested, "some position has a nucleus of several tokens (and excluded tokens when top_p < 1)"


class JointOracle:
    """The true conditionals p(x_i | revealed positions) of a joint law over K^N (text tokens 0..K-1)."""

    def __init__(self, joint: np.ndarray, vocab: Vocab = SMALL) -> None:
        self.vocab, (self.K, self.N) = vocab, (joint.shape[0], joint.ndim)
        self.configs = torch.tensor(list(np.ndindex(joint.shape)))  # (C, N)
        self.p = torch.tensor(joint.reshape(-1), dtype=torch.float64)

    def __call__(self, x_t: Tensor, where: Tensor | None = None) -> Tensor:
        B, L = x_t.shape
        body = x_t[:, 1:]  # (B, N) global ids; MASK where unknown
        fits = ((body[:, None, :] == self.configs[None]) | self.vocab.is_mask(body)[:, None, :]).all(-1)  # (B, C)
        w = fits * self.p  # (B, C) posterior weights of each full configuration
        marg = torch.zeros(B, self.N, self.K, dtype=torch.float64)
        for k in range(self.K):
            marg[:, :, k] = (w[:, :, None] * (self.configs == k)[None]).sum(1)
        logits = torch.full((B, L, self.vocab.size), -math.inf)
        logits[:, 1:, : self.K] = (marg / marg.sum(-1, keepdim=True)).log().float()
        return logits if where is None else logits[where]


def test_ancestral_sampling_with_true_conditionals_recovers_the_joint() -> None:
    """With exact conditionals, revealing one token at a time samples the joint exactly; many steps
    per token approach that (a collision of two reveals in one step has probability ~N/S), while one
    step draws every position from its marginal, which misses the dependence."""
    joint = np.full((2, 2, 2), 0.2 / 6)
    joint[0, 0, 0] = joint[1, 1, 1] = 0.4
    oracle, rows = JointOracle(joint), 4000
    template = all_masked_text_rows(rows, 4)
    p_value = {}
    for steps in (1, 200):
        ids = S.sample(oracle, template, SamplerConfig(steps=steps), torch.Generator().manual_seed(0)).ids
        flat = ((ids[:, 1:] - SMALL.block_start("text")) * torch.tensor([4, 2, 1])).sum(1)
        counts = np.bincount(flat.numpy(), minlength=8)
        expected = rows * joint.reshape(-1)
        p_value[steps] = chi2.sf(((counts - expected) ** 2 / expected).sum(), 7)
    assert p_value[200] > 1e-3 and p_value[1] < 1e-12, p_value


def test_confidence_counts_follow_the_schedule_and_order_follows_confidence() -> None:
    steps, rows, length = 6, 5, 13
    oracle = FixedDenoiser(SMALL, length, seed=4, scale=2.0)
    template = all_masked_text_rows(rows, length)
    for schedule in ("linear", "cosine"):
        cfg = SamplerConfig(sampler="confidence", steps=steps, schedule=schedule, temperature=0.0)
        result = S.sample(oracle, template, cfg, torch.Generator().manual_seed(0))
        beta = Schedule.parse(schedule).beta(S.time_grid(steps))
        for k in range(1, steps + 1):
            still = (result.order[:, 1:] >= k).sum(1)
            assert (still == round(12 * float(beta[k]))).all(), (schedule, k, still)
        # greedy: confidence is each position's maximum probability, fixed here: reveals go by it
        top = torch.tensor(oracle.probs("text")).max(-1).values[1:]
        order = result.order[0, 1:]
        for i in range(12):
            for j in range(12):
                if top[i] > top[j]:
                    assert order[i] <= order[j]


def test_confidence_is_the_probability_of_the_drawn_token() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), -math.inf]])
    assert torch.allclose(S.confidence(logits, torch.tensor([0])), torch.tensor([0.25], dtype=torch.float64))
    assert torch.allclose(S.confidence(logits, torch.tensor([1])), torch.tensor([0.75], dtype=torch.float64))


def test_draw_categorical_never_draws_zero_probability_tokens() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64).expand(7, -1)
    u = torch.tensor([0.0, 0.1, 0.4999, 0.5, 0.7, 0.9999999, 1 - 2**-53], dtype=torch.float64)
    assert S.draw_categorical(probs, u).tolist() == [1, 1, 1, 3, 3, 3, 3]


# ----------------------------------------------------------------------------------------------
# Variable-length text: the end-of-text rule
# ----------------------------------------------------------------------------------------------


def test_fill_after_end_rule() -> None:
    v, M, E, P, a, b = VOCAB, VOCAB.mask("text"), VOCAB.eos("text"), VOCAB.pad, 3, 4
    x = torch.tensor([[a, M, M, E, M, b, M], [M, P, M, M, E, M, M], [M, a, M, M, M, M, M], [M, M, E, M, M, M, M]])
    ends = torch.ones_like(x, dtype=torch.bool)
    ends[3, 5:] = False  # positions outside a slot are never touched
    out = S.fill_after_end(x, ends, v)
    assert out.tolist() == [
        [a, M, M, E, P, b, P],  # masked after EOS -> PAD; a token revealed earlier keeps its value
        [M, P, P, P, E, P, P],  # a PAD revealed first is the end; what lies before stays to generate
        [M, a, M, M, M, M, M],  # no end yet: nothing happens
        [M, M, E, P, P, M, M],
    ]


@pytest.mark.parametrize("end", ["eos", "pad"])
def test_revealing_the_end_pads_the_rest_of_a_caption(end: str) -> None:
    """A denoiser sure of an EOS (or PAD) at one caption position: everything after it is PAD at once."""
    oracle = FixedDenoiser(VOCAB, LAYOUT.seq_len, seed=1)
    slot = LAYOUT.text_slot("image_text")
    j = slot.start + 4
    oracle.table[slot, VOCAB.eos("text")] = -30.0
    oracle.table[slot, VOCAB.pad] = -30.0
    oracle.table[j, VOCAB.eos("text") if end == "eos" else VOCAB.pad] = 30.0  # the most confident position
    template = S.task_template(LAYOUT, "i2t", media=list(range(9)))
    cfg = SamplerConfig(sampler="confidence", steps=11, temperature=0.0)
    result = S.sample(oracle, template, cfg, torch.Generator().manual_seed(0))
    check_finished(template, result)
    row = result.ids[0]
    assert (row[j + 1 :] == VOCAB.pad).all() and (result.order[0, j + 1 :] == 0).all(), "filled at the first step"
    assert (row[slot.start : j] < VOCAB.text).all(), "before the end: generated content"
    assert result.nfe <= 5, "the filled positions cost no steps"
    text = S.decode_text(row, LAYOUT, "i2t", FakeTokenizer())
    assert len(text) == 4


# ----------------------------------------------------------------------------------------------
# Configs, presets, outputs
# ----------------------------------------------------------------------------------------------


def test_presets_cover_every_task() -> None:
    assert set(S.PRESETS) == set(S.GENERATION_TASKS)
    template = S.task_template(LAYOUT, "t2i", text=[1, 2])
    for cfg in S.PRESETS.values():
        check_finished(template, S.sample(MODEL, template, replace(cfg, steps=4), torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "gibbs"}, "unknown sampler"),
        ({"steps": 0}, "steps must be"),
        ({"schedule": "sigmoid"}, "unknown schedule"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"guidance": math.inf}, "guidance"),
    ],
)
def test_bad_sampler_configs_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_bad_templates_are_rejected_clearly() -> None:
    good = S.task_template(LAYOUT, "t2i", text=[1])
    ids = good.ids.clone()
    ids[0, 3] = VOCAB.block_start("image")  # an unknown position that is not MASK
    with pytest.raises(ValueError, match=r"row 0, position 3 is to be generated .* holds image:0"):
        S.sample(MODEL, Template(ids, good.known))
    with pytest.raises(ValueError, match="is marked known but holds MASK_image"):
        S.sample(MODEL, Template(good.ids, torch.ones_like(good.known)))
    with pytest.raises(ValueError, match="must be a bool tensor"):
        S.sample(MODEL, Template(good.ids, good.known[:, :5]))
    with pytest.raises(ValueError, match="seq_len"):
        S.layout_template(LAYOUT, good.ids[:, :10])
    with pytest.raises(ValueError, match="task token"):
        S.layout_template(LAYOUT, torch.full((LAYOUT.seq_len,), VOCAB.mask("text")))
    with pytest.raises(ValueError, match="shorten"):
        S.text_template(LAYOUT, [1] * 23)
    with pytest.raises(ValueError, match="does not fit"):
        S.task_template(LAYOUT, "t2i", text=[1] * 11)
    with pytest.raises(ValueError, match="unknown task"):
        S.task_template(LAYOUT, "t2v")
    assert S.prompt_capacity(LAYOUT, "text") == 22 and S.prompt_capacity(LAYOUT, "t2i") == 10
    S.text_template(LAYOUT, [1] * 22)  # exactly full is fine
    S.task_template(LAYOUT, "t2i", text=[1] * 10)


# ----------------------------------------------------------------------------------------------
# The command line (checkpoint loading replaced by a fake that returns a tiny model)
# ----------------------------------------------------------------------------------------------


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB.text for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


class FakeCodec:
    """A trivial audio codec: 6 tokens per clip, each token a 100-sample tone."""

    sample_rate = 8000

    def encode(self, wave: np.ndarray) -> np.ndarray:
        chunks = np.array_split(np.abs(np.asarray(wave, dtype=np.float64)), LAYOUT.audio_len)
        return np.array([min(VOCAB.audio - 1, int(c.mean() * VOCAB.audio)) for c in chunks])

    def decode(self, ids: np.ndarray) -> np.ndarray:
        t = np.arange(100) / self.sample_rate
        return np.concatenate([0.5 * np.sin(2 * np.pi * (200 + 50 * i) * t) for i in ids]).astype(np.float32)


def fake_checkpoint(monkeypatch: pytest.MonkeyPatch, error: Exception | None = None, image_tokenizer=None) -> None:
    def load_for_inference(path: str, use_ema: bool = True, device: str = "cpu") -> types.SimpleNamespace:
        if error is not None:
            raise error
        return types.SimpleNamespace(
            model=MODEL,
            layout=LAYOUT,
            text_tokenizer=FakeTokenizer(),
            image_tokenizer=image_tokenizer or PixelTokenizer(levels=17, side=3, patch=1),
            audio_codec=FakeCodec(),
        )

    monkeypatch.setattr(S, "load_for_inference", load_for_inference)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        S.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("task", list(S.GENERATION_TASKS))
def test_cli_writes_samples_and_a_manifest(task: str, tmp_path: Path, monkeypatch, capsys) -> None:
    coarse = PixelTokenizer(levels=3, side=6, patch=2)  # 3 of the 17 gray levels in 9 tokens (ids < 81)
    fake_checkpoint(monkeypatch, image_tokenizer=coarse if task == "t2i" else None)
    grids, real = [], S.save_image_grid
    monkeypatch.setattr(
        S,
        "save_image_grid",
        lambda path, images, labels: grids.append(np.stack(images)) or real(path, images, labels),
    )
    args = ["--task", task, "--checkpoint", "ckpt.pt", "--num", "2", "--steps", "6", "--out", str(tmp_path / "o")]
    if task in ("i2t", "s2t"):
        if task == "i2t":
            Image.fromarray((np.eye(8) * 255).astype(np.uint8)).save(tmp_path / "in.png")
            args += ["--image", str(tmp_path / "in.png")]
        else:
            sf.write(tmp_path / "in.wav", np.random.default_rng(0).uniform(-1, 1, (16000, 2)), 16000)
            args += ["--audio", str(tmp_path / "in.wav")]
    elif task != "text":
        args += ["--prompt", "seven", "--prompt", "two", "--guidance", "1.0"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    n = 4 if task in ("t2i", "t2s") else 2
    assert len(manifest["samples"]) == n and manifest["seed"] == 0 and manifest["nfe"] >= 1
    assert manifest["config"]["steps"] == 6 and manifest["seconds_per_sample"] >= 0
    for name in manifest["files"]:
        assert (tmp_path / "o" / name).is_file()
    if task == "t2i":
        assert (tmp_path / "o" / "grid.png").read_bytes()[:4] == b"\x89PNG"
        images = np.load(tmp_path / "o" / "images.npy", allow_pickle=False)
        assert images.shape == (4, 6, 6) and set(np.unique(images)) <= {0, 8, 16}, "3 levels drawn on 0 .. 16"
        assert set(np.unique(grids[0])) <= {0, 127, 255}, "the grid shows the decoded 0 .. 16 as 0 .. 255 pictures"
    elif task == "t2s":
        wave, rate = sf.read(tmp_path / "o" / "sample_003.wav")
        assert rate == 8000 and wave.shape == (600,)
    else:
        assert out.count("\n") == n + 1 and "samples.txt" in manifest["files"]
        assert all("text" in s for s in manifest["samples"])


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("sample.py: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_cli_unknown_task(monkeypatch, capsys) -> None:
    fake_checkpoint(monkeypatch)
    code, _, err = run_cli(capsys, "--task", "t2v", "--checkpoint", "x.pt")
    one_line_error(code, err, "invalid choice", "t2v")


def test_cli_missing_or_incompatible_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    fake_checkpoint(monkeypatch, FileNotFoundError(f"no checkpoint at {tmp_path / 'nope.pt'}"))
    code, _, err = run_cli(capsys, "--task", "text", "--checkpoint", str(tmp_path / "nope.pt"))
    one_line_error(code, err, "cannot load checkpoint", "nope.pt")
    fake_checkpoint(monkeypatch, ValueError("checkpoint\nwas written by another version"))
    code, _, err = run_cli(capsys, "--task", "text", "--checkpoint", "old.pt")
    one_line_error(code, err, "another version")


def test_cli_prompt_longer_than_the_layout(monkeypatch, capsys) -> None:
    fake_checkpoint(monkeypatch)
    code, _, err = run_cli(capsys, "--task", "t2i", "--checkpoint", "c.pt", "--prompt", "x" * 11)
    one_line_error(code, err, "11 tokens", "at most 10")
    code, _, err = run_cli(capsys, "--task", "text", "--checkpoint", "c.pt", "--prompt", "x" * 23)
    one_line_error(code, err, "at most 22")


def test_cli_bad_input_files(tmp_path: Path, monkeypatch, capsys) -> None:
    fake_checkpoint(monkeypatch)
    (tmp_path / "bad.wav").write_bytes(b"RIFF-not-really-a-wave-file")
    code, _, err = run_cli(capsys, "--task", "s2t", "--checkpoint", "c.pt", "--audio", str(tmp_path / "bad.wav"))
    one_line_error(code, err, "cannot read audio file", "bad.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 8000)
    code, _, err = run_cli(capsys, "--task", "s2t", "--checkpoint", "c.pt", "--audio", str(tmp_path / "empty.wav"))
    one_line_error(code, err, "cannot read audio file", "no samples")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    code, _, err = run_cli(capsys, "--task", "i2t", "--checkpoint", "c.pt", "--image", str(tmp_path / "bad.png"))
    one_line_error(code, err, "cannot read image", "bad.png")
    code, _, err = run_cli(capsys, "--task", "s2t", "--checkpoint", "c.pt")
    one_line_error(code, err, "needs --audio")
    code, _, err = run_cli(capsys, "--task", "t2s", "--checkpoint", "c.pt")
    one_line_error(code, err, "needs --prompt")
    code, _, err = run_cli(capsys, "--task", "text", "--checkpoint", "c.pt", "--top-p", "1.5")
    one_line_error(code, err, "top_p")


# ----------------------------------------------------------------------------------------------
# Watching it denoise: the frames of the reverse process, and their GIFs
# ----------------------------------------------------------------------------------------------


@settings(max_examples=30)
@given(general_templates(), configs, st.integers(0, 2**31))
def test_reveal_frames_run_from_the_template_to_the_sample(template: Template, cfg: SamplerConfig, seed: int) -> None:
    result = S.sample(MODEL, template, replace(cfg, cache=False), torch.Generator().manual_seed(seed))
    frames = S.reveal_frames(result, VOCAB)
    steps = result.nfe // (1 if cfg.guidance == 0 else 2)  # uncached: one network pass per step (guided: two)
    given_end_fills_all = steps == 0 and len(frames) == 2  # the end-of-text rule completes the template at once
    assert frames.shape[1:] == result.ids.shape and (len(frames) == steps + 1 or given_end_fills_all)
    assert torch.equal(frames[0], template.ids), "frame 0 is the template"
    assert torch.equal(frames[-1], result.ids), "the last frame is the sample"
    shown = ~VOCAB.is_mask(frames)
    assert (shown[1:] >= shown[:-1]).all(), "a revealed position stays revealed"
    assert (frames[1:] == frames[:-1])[shown[:-1]].all(), "and keeps its token"


def read_gif(path: Path) -> tuple[list[np.ndarray], list[int]]:
    """The frames of a looping GIF as RGB arrays, and their durations in ms."""
    with Image.open(path) as gif:
        assert gif.info["loop"] == 0, "the animation loops"
        frames = [(np.asarray(f.convert("RGB")).astype(int), f.info["duration"]) for f in ImageSequence.Iterator(gif)]
    return [f for f, _ in frames], [d for _, d in frames]


@pytest.mark.parametrize("task", list(S.GENERATION_TASKS))
def test_cli_animates_every_sample_a_frame_per_step(task: str, tmp_path: Path, monkeypatch, capsys) -> None:
    fake_checkpoint(monkeypatch)
    results, real = [], S.sample
    monkeypatch.setattr(S, "sample", lambda *a: results.append(real(*a)) or results[-1])
    out, args = tmp_path / "o", ["--checkpoint", "c.pt", "--num", "2", "--steps", "8", "--no_cache", "--guidance", "0"]
    if task == "i2t":
        Image.fromarray((np.eye(8) * 255).astype(np.uint8)).save(tmp_path / "in.png")
        args += ["--image", str(tmp_path / "in.png")]
    elif task == "s2t":
        sf.write(tmp_path / "in.wav", np.random.default_rng(0).uniform(-1, 1, 16000), 16000)
        args += ["--audio", str(tmp_path / "in.wav")]
    elif task != "text":
        args += ["--prompt", "seven"]
    code, _, err = run_cli(capsys, "--task", task, *args, "--out", str(out), "--animate")
    assert code == 0, err
    (result,), manifest = results, json.loads((out / "manifest.json").read_text())
    blue, tok = np.array([70, 110, 200]), PixelTokenizer(levels=17, side=3, patch=1)  # the fake's image tokenizer
    for b, row in enumerate(result.ids):
        assert f"animation_{b:03d}.gif" in manifest["files"]
        frames, durations = read_gif(out / f"animation_{b:03d}.gif")
        assert len(frames) == manifest["nfe"] + 1, "uncached and unguided, a network pass is a step: S + 1 frames"
        assert 3000 <= sum(durations) <= 6000 and durations[-1] > max(durations[:-1]), "3-6 s, the last frame held"
        first, last = frames[0][:-20], frames[-1][:-20]  # above the step number
        if task == "t2i":  # a pixel is 43 x 43 px
            assert (first == blue).all(), "frame 0: every patch masked"
            image = np.kron(tok.decode(S.decode_media(row, LAYOUT, task)), np.ones((43, 43), dtype=int))[..., None]
            assert np.array_equal(last, (image * 255 // 16).repeat(3, -1)), "the sample, in gray levels"
        elif task == "t2s":
            assert (first == 128).all(), "frame 0: every token's columns gray"
            assert not (last == 128).all(axis=(0, 2)).any(), "the last frame: the whole spectrogram"
        else:  # the text slot: all MASK blocks at first, then the text as ``text_panel`` draws the sample
            generated = int((result.order[b, LAYOUT.text_slot(S.GENERATION_TASKS[task][0])] >= 0).sum())
            assert (first == blue).all(-1).sum() == 7 * 13 * generated, "frame 0: a 7 x 13 px block per MASK"
            assert not (first.max(-1) < 100).any(), "and no text yet"
            inf = types.SimpleNamespace(layout=LAYOUT, text_tokenizer=FakeTokenizer())
            panel = S.text_panel(row, inf, task, ImageFont.load_default(size=14))
            assert np.array_equal(last[: len(panel)], panel) and (last[len(panel) :] == 255).all()
            assert not (last == blue).all(-1).any(), "the last frame: no MASK left"
