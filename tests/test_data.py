"""Tests of data.py: tokenizers, the layout, the batch iterator and bad user input."""

from __future__ import annotations

import itertools
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bpe
import data
import fsq
from bpe import TextTokenizer
from data import Layout
from mdm import MODALITIES, TASKS, Vocab

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away again and again.\n"
    "Numbers like 12345 and 3.14159 appear, as do tabs\tand unicode: naïve café, Привет, 東京.\n"
) * 5


# ----------------------------------------------------------------------------------------------
# Text tokenizer
# ----------------------------------------------------------------------------------------------


def naive_bpe(text: str, vocab_size: int) -> dict[bytes, int]:
    """Textbook BPE: recount every pair after every merge (slow, obviously right)."""
    import regex

    words = Counter(tuple(p.encode()) for p in regex.findall(bpe.GPT4_PATTERN, text))
    words = {tuple(w): n for w, n in words.items()}
    tokens = [bytes([i]) for i in range(256)]
    while len(tokens) < vocab_size:
        pairs: Counter = Counter()
        for w, n in words.items():
            for p in itertools.pairwise(w):
                pairs[p] += n
        pairs = Counter({p: n for p, n in pairs.items() if tokens[p[0]] + tokens[p[1]] not in tokens})
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new = len(tokens)
        tokens.append(tokens[best[0]] + tokens[best[1]])
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return {t: i for i, t in enumerate(tokens)}


def bytes_per_token(tok: TextTokenizer, text: str) -> float:
    return len(text.encode("utf-8")) / max(1, len(tok.encode(text)))


def test_incremental_bpe_equals_the_textbook_algorithm() -> None:
    assert data.train_bpe(SAMPLE_TEXT, 330) == naive_bpe(SAMPLE_TEXT, 330)


@pytest.fixture(scope="module")
def small_tokenizer() -> TextTokenizer:
    return TextTokenizer(data.train_bpe(SAMPLE_TEXT, 300))


@settings(max_examples=200)
@given(st.text(max_size=300))
def test_text_round_trip_is_exact(small_tokenizer: TextTokenizer, text: str) -> None:
    ids = small_tokenizer.encode(text)
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)
    assert small_tokenizer.decode(ids) == text


def test_bpe_compresses_and_learns_frequent_words(small_tokenizer: TextTokenizer) -> None:
    assert bytes_per_token(small_tokenizer, SAMPLE_TEXT) > 1.5
    assert len(small_tokenizer.encode(" fox")) == 1


def test_tokenizer_save_load_and_corruption(tmp_path: Path, small_tokenizer: TextTokenizer) -> None:
    path = tmp_path / "bpe.tiktoken"
    digest = small_tokenizer.save(path)
    loaded = TextTokenizer.load(path)
    assert loaded.ranks == small_tokenizer.ranks
    assert loaded.encode(SAMPLE_TEXT) == small_tokenizer.encode(SAMPLE_TEXT)
    # Rewriting the file is seen at once (no stale cache) and a wrong hash is rejected.
    TextTokenizer(data.train_bpe(SAMPLE_TEXT, 280)).save(path)
    assert TextTokenizer.load(path).vocab_size == 280
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="does not match"):
        TextTokenizer.load(path)
    with pytest.raises(ValueError, match="not a tiktoken rank line"):
        (tmp_path / "bad.tiktoken").write_text("hello\n")
        TextTokenizer.load(tmp_path / "bad.tiktoken")
    with pytest.raises(FileNotFoundError, match="train-bpe"):
        TextTokenizer.load(tmp_path / "missing.tiktoken")
    assert len(digest) == 64


def test_tokenizer_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="empty pre-tokenization pattern"):
        data.train_bpe("abc", 300, pattern="")
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        data.train_bpe("abc", 100)
    import tiktoken

    def offline(name: str):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        TextTokenizer.from_tiktoken_name("r50k_base")


def test_committed_default_tokenizer_matches_its_hash() -> None:
    tok = TextTokenizer.load(data.ASSETS / "text_bpe_1024.tiktoken")
    assert tok.vocab_size == 1024
    for d in range(10):
        for caption in data.digit_captions(d):
            assert tok.decode(tok.encode(caption)) == caption
    assert bytes_per_token(tok, "".join(data.pydoc_corpus()[:5])) > 2.5


# ----------------------------------------------------------------------------------------------
# Image and audio tokenizers
# ----------------------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 16), min_size=64, max_size=64))
def test_pixel_tokenizer_is_lossless(pixels: list[int]) -> None:
    tok = data.PixelTokenizer(levels=17, patch=1)
    image = np.array(pixels).reshape(8, 8)
    assert tok.vocab_size == 17 and tok.tokens_per_image == 64
    assert np.array_equal(tok.decode(tok.encode(image)), image)


@given(st.lists(st.integers(0, 16), min_size=64, max_size=64), st.sampled_from([(4, 2), (3, 2), (5, 1), (2, 4)]))
def test_patch_tokenizer_quantizes_and_round_trips(pixels: list[int], shape: tuple[int, int]) -> None:
    levels, patch = shape
    tok = data.PixelTokenizer(levels=levels, patch=patch)
    image = np.array(pixels).reshape(8, 8)
    ids = tok.encode(image)
    assert ids.shape == ((8 // patch) ** 2,) and ids.min() >= 0 and ids.max() < levels ** (patch * patch)
    back = tok.decode(ids)
    step = 16 / (levels - 1)
    assert np.abs(back - image).max() <= step / 2 + 0.5, "quantization error at most half a level step"
    assert np.array_equal(tok.encode(back), ids), "decoded images are fixed points"
    # each token holds one patch: changing one pixel changes exactly the token of its patch
    bumped = image.copy()
    bumped[3, 5] = 16 if image[3, 5] < 8 else 0
    changed = np.flatnonzero(tok.encode(bumped) != ids)
    assert changed.tolist() in ([], [(3 // patch) * (8 // patch) + 5 // patch])


def test_pixel_tokenizer_rejects_bad_images() -> None:
    tok = data.PixelTokenizer(levels=17, patch=1)
    with pytest.raises(ValueError, match="8x8"):
        tok.encode(np.zeros((7, 8)))
    with pytest.raises(ValueError, match="integers in"):
        tok.encode(np.full((8, 8), 17))
    with pytest.raises(ValueError, match="must divide"):
        data.PixelTokenizer(levels=4, patch=3)
    with pytest.raises(ValueError, match="token ids must lie in"):
        data.PixelTokenizer(levels=4, patch=2).decode(np.full(16, 256))
    big = np.zeros((32, 32), dtype=np.uint8)
    big[8:24, 12:20] = 255  # a bright bar on black, two 8x8 cells wide
    levels = tok.from_picture(big)
    assert levels.shape == (8, 8) and levels.max() == 16 and levels[0, 0] == 0


def mu_law_error_bound(x: np.ndarray, levels: int = 256) -> np.ndarray:
    """|dx| <= (1/(levels - 1)) ln(1 + mu) (1 + mu |x|) / mu to first order (fsq.MuLaw), plus a float margin."""
    mu, step, x = levels - 1.0, 1.0 / (levels - 1), np.abs(np.clip(x, -1, 1))
    return step * np.log1p(mu) * (1 + mu * x) / mu * np.exp(step * np.log1p(mu)) + 1e-6


@settings(max_examples=50)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=400))
def test_mu_law_error_is_bounded(samples: list[float]) -> None:
    mu = fsq.MuLaw()
    x = np.array(samples)
    ids = mu.encode(x)
    assert ids.min() >= 0 and ids.max() < 256
    assert (np.abs(mu.decode(ids) - x) <= mu_law_error_bound(x)).all()
    # Companding: small amplitudes are coded much more finely than large ones.
    assert mu_law_error_bound(np.array([0.01]))[0] < mu_law_error_bound(np.array([0.9]))[0] / 20


# ----------------------------------------------------------------------------------------------
# Layout and iterator
# ----------------------------------------------------------------------------------------------

VOCAB = Vocab(text=300, audio=40, image=17)
LAYOUT = Layout(VOCAB, seq_len=48, image_len=16, audio_len=12)


def test_a_layout_too_short_for_its_media_names_what_it_needs() -> None:
    with pytest.raises(ValueError, match=r"no room for text in a image_text row of 64 image tokens .* --seq_len"):
        Layout(VOCAB, seq_len=48, image_len=64, audio_len=12)  # a 32x32 picture through an autoencoder: 64 tokens
    assert Layout(VOCAB, seq_len=96, image_len=64, audio_len=12).text_capacity("image_text") > 0


def fake_data(n_text_tokens: int = 500, n_pairs: int = 30, seed: int = 0) -> data.TriModalData:
    g = torch.Generator().manual_seed(seed)
    docs = [
        torch.randint(0, 300, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 40, (n_text_tokens // 20,), generator=g)
    ]
    stream = LAYOUT.text_stream(docs)
    pairs = {}
    for task, m in data.MEDIA.items():

        def split(n: int, task=task, m=m) -> data.PairData:
            media = torch.randint(0, VOCAB.content_size(m), (n, LAYOUT.media_len(task)), generator=g)
            caps = [
                [
                    torch.randint(0, 300, (int(k),), generator=g).tolist()
                    for k in torch.randint(0, 10, (3,), generator=g)
                ]
                for _ in range(n)
            ]
            return data.PairData(media, caps, torch.arange(n) % 10)

        pairs[task] = {s: split(n_pairs) for s in ("train", "val", "test")}
    return data.TriModalData(
        LAYOUT, None, data.PixelTokenizer(), None, {s: stream for s in ("train", "val", "test")}, pairs
    )


def check_row(row: torch.Tensor, pad: torch.Tensor, layout: Layout) -> None:
    v = layout.vocab
    assert row.shape == pad.shape == (layout.seq_len,)
    # padding only at the end
    n_pad = int(pad.sum())
    assert not pad[: layout.seq_len - n_pad].any() and pad[layout.seq_len - n_pad :].all()
    assert (row[pad] == v.pad).all()
    task = TASKS[int(row[0]) - v.task(TASKS[0])]
    assert v.is_task(row[:1]).all() and not v.is_task(row[1:]).any()
    if task == "text":
        body = row[1 : layout.seq_len - n_pad]
        assert (v.modality_of(body) == 0).all()
        return
    m = data.MEDIA[task]
    assert n_pad == 0
    s = layout.media_slot(task)
    assert row[s.start - 1] == v.bos(m) and row[s.stop] == v.eos(m)
    assert (v.modality_of(row[s]) == MODALITIES.index(m)).all()
    v.to_local(row[s], m)  # raises unless every id is a content token of m
    text = row[layout.text_slot(task)]
    assert row[layout.text_slot(task).start - 1] == v.bos("text")
    eos = (text == v.eos("text")).nonzero()[:, 0]
    assert len(eos) == 1, "exactly one EOS_text in a pair"
    assert (text[eos[0] + 1 :] == v.pad).all()
    v.to_local(text[: eos[0]], "text")
    for mm in MODALITIES:  # BOS/EOS balanced
        assert int((row == v.bos(mm)).sum()) == int((row == v.eos(mm)).sum())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 24), st.integers(0, 10_000), st.floats(0, 1), st.floats(0, 1), st.floats(0.01, 1))
def test_every_batch_row_follows_the_layout(
    batch_size: int, seed: int, r_text: float, r_img: float, r_aud: float
) -> None:
    d = fake_data(seed=seed % 7)
    it = data.BatchIterator(
        d, "train", batch_size, {"text": r_text, "image_text": r_img, "audio_text": r_aud}, seed=seed
    )
    b = next(it)
    assert b.ids.shape == (batch_size, LAYOUT.seq_len)
    for row, pad in zip(b.ids, b.pad, strict=True):
        check_row(row, pad, LAYOUT)
    assert torch.equal(b.task, torch.tensor([int(r[0]) - VOCAB.task(TASKS[0]) for r in b.ids]))


def test_text_rows_pack_the_stream_and_pad_only_a_short_tail() -> None:
    stream = LAYOUT.text_stream([[1, 2, 3], [4, 5]])
    assert stream.tolist() == [
        VOCAB.bos("text"),
        1,
        2,
        3,
        VOCAB.eos("text"),
        VOCAB.bos("text"),
        4,
        5,
        VOCAB.eos("text"),
    ]
    row, pad = LAYOUT.text_row(stream, 0)
    assert int(pad.sum()) == LAYOUT.seq_len - 1 - len(stream)
    check_row(row, pad, LAYOUT)


def test_mixing_ratios_are_respected() -> None:
    it = data.BatchIterator(fake_data(), "train", 10, {"text": 0.5, "image_text": 0.3, "audio_text": 0.2})
    counts = Counter()
    for _ in range(200):
        counts.update(next(it).task.tolist())
    assert (
        abs(counts[0] / 2000 - 0.5) < 0.01 and abs(counts[1] / 2000 - 0.3) < 0.01 and abs(counts[2] / 2000 - 0.2) < 0.01
    )
    only_text = data.BatchIterator(fake_data(), "train", 8, {"text": 1})
    assert (next(only_text).task == 0).all()


def test_iterator_is_seeded_resumable_and_sliced_by_rank() -> None:
    d = fake_data()
    ratios = {"text": 1, "image_text": 1, "audio_text": 1}
    a = data.BatchIterator(d, "train", 8, ratios, seed=3)
    first = [next(a).ids for _ in range(5)]
    b = data.BatchIterator(d, "train", 8, ratios, seed=3)
    next(b)
    next(b)
    state = b.state_dict()
    c = data.BatchIterator(d, "train", 8, ratios, seed=3)
    c.load_state_dict(state)
    assert all(torch.equal(next(c).ids, x) for x in first[2:])
    assert not torch.equal(data.BatchIterator(d, "train", 8, ratios, seed=4).batch(0).ids, first[0])
    # Two ranks of 4 rows read exactly the rows of one process with 8.
    g = a.batch(7)
    assert torch.equal(torch.cat([a.batch(7, slice(0, 4)).ids[:4], a.batch(7, slice(4, 8)).ids[4:]]), g.ids)
    with pytest.raises(ValueError, match="this run uses"):
        data.BatchIterator(d, "train", 16, ratios, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="unknown tasks"):
        data.BatchIterator(d, "train", 8, {"video": 1})


def test_caption_longer_than_the_slot_is_a_clear_error() -> None:
    cap = torch.zeros(LAYOUT.text_capacity("image_text") + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit a image_text row"):
        LAYOUT.pair_row("image_text", torch.zeros(16, dtype=torch.long), cap)
    with pytest.raises(ValueError, match="needs 12 audio tokens"):
        LAYOUT.pair_row("audio_text", torch.zeros(16, dtype=torch.long), cap[:2])
    with pytest.raises(ValueError, match="not a pair task"):
        LAYOUT.media_slot("text")
    with pytest.raises(ValueError, match="the caption"):
        data.tokenize_captions(
            TextTokenizer(data.train_bpe(SAMPLE_TEXT, 260)), ["a very long caption " * 10], 5, "captions.jsonl"
        )
    assert Layout.from_dict(LAYOUT.to_dict()) == LAYOUT


def test_digit_named_in() -> None:
    assert data.digit_named_in("a handwritten seven") == 7
    assert data.digit_named_in("the digit 3") == 3
    assert data.digit_named_in("Seven.") == 7
    assert data.digit_named_in("three or four") is None
    assert data.digit_named_in("the number 12") is None
    for d in range(10):
        assert all(data.digit_named_in(c) == d for c in data.digit_captions(d))


# ----------------------------------------------------------------------------------------------
# Bad user input
# ----------------------------------------------------------------------------------------------


def test_bad_text_files(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("a real document\n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    jl = tmp_path / "docs.jsonl"
    jl.write_text('{"text": "one"}\nnot json\n{"title": "no text"}\n\n{"text": "two"}\n')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        docs = data.read_text_files([good, latin, jl])
    assert docs == ["a real document\n", "one", "two"]
    message = str(w[0].message)
    assert "skipped 3 unreadable text inputs" in message and "latin1.txt" in message and "docs.jsonl:2" in message
    with pytest.raises(ValueError, match="not UTF-8"):
        data.read_text_files([latin], strict=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_text_files([tmp_path / "nope.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="no text found"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.read_text_files([empty])


def test_bad_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((16, 16), 200, dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [
        {"image": "ok.png", "text": "a seven"},
        {"image": "corrupt.png", "text": "a three"},
        {"image": "missing.png", "text": "a two"},
        {"image": "ok.png", "text": "   "},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        images, captions = data.read_image_folder(tmp_path)
    assert captions == ["a seven"] and images[0].shape == (16, 16)
    message = str(w[0].message)
    assert "skipped 3 unreadable images" in message and "corrupt.png" in message and "empty caption" in message
    with pytest.raises(ValueError, match="--strict"):
        data.read_image_folder(tmp_path, strict=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_image_folder(tmp_path / "nowhere")
    (tmp_path / "captions.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"captions\.jsonl"):
        data.read_image_folder(tmp_path)


def test_bad_audio_folder(tmp_path: Path) -> None:
    sr = 8000
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)).astype(np.float32)
    sf.write(tmp_path / "a.wav", wave, sr)
    sf.write(tmp_path / "b.flac", np.stack([wave, wave], 1), 16000)
    sf.write(tmp_path / "trunc.wav", wave, sr)
    (tmp_path / "trunc.wav").write_bytes((tmp_path / "trunc.wav").read_bytes()[:30])
    (tmp_path / "speaker.trans.txt").write_text("a seven\nb three\ntrunc nine\nghost one\nsilent \n")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        clips, texts = data.read_audio_folder(tmp_path, 16000)
    assert texts == ["seven", "three"]
    assert len(clips[0]) == 16000 and len(clips[1]) == 8000  # 1 s at 8 kHz resampled; 0.5 s stereo downmixed
    message = str(w[0].message)
    assert "skipped 3 unreadable audio clips" in message and "trunc.wav" in message and "ghost" in message
    with pytest.raises(ValueError, match="--strict"):
        data.read_audio_folder(tmp_path, 16000, strict=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no transcripts"):
        data.read_audio_folder(empty, 16000)


def test_patch_tokenizer_refuses_ids_that_do_not_fit_an_int64() -> None:
    assert data.PixelTokenizer(levels=15, patch=4).vocab_size == 15**16  # < 2^63: ids still exact
    with pytest.raises(ValueError, match="17\\^16 ids"):
        data.PixelTokenizer(levels=17, patch=4)


@pytest.mark.parametrize("levels,patch", [(4, 2), (17, 1), (3, 2)])
def test_pixel_code_vectors_are_the_patches_gray_levels(levels: int, patch: int) -> None:
    tok = data.PixelTokenizer(levels=levels, patch=patch)
    codes = tok.code_vectors()
    assert codes.shape == (tok.vocab_size, patch * patch)
    # an image made of one token repeated decodes to that token's levels in every patch
    for token in (0, tok.vocab_size // 3, tok.vocab_size - 1):
        image = tok.decode(np.full(tok.tokens_per_image, token))
        first_patch = image[:patch, :patch].reshape(-1)
        assert np.allclose(first_patch, codes[token] * (tok.in_levels - 1) / (levels - 1), atol=0.5)


def test_speed_perturbation_scales_pitch_and_duration() -> None:
    sr = 12000
    wave = np.sin(2 * np.pi * 500 * np.arange(sr) / sr).astype(np.float32)
    for factor in (0.9, 1.1):
        out = data.speed_perturb(wave, factor, sr)
        assert abs(len(out) - sr / factor) <= 2, "duration / factor"
        peak = np.argmax(np.abs(np.fft.rfft(out))) * sr / len(out)
        assert abs(peak - 500 * factor) < 3, "pitch x factor"
    with pytest.raises(ValueError, match="speed factors"):
        data.speed_perturb(wave, 3.0, sr)


@pytest.fixture(scope="module")
def speed_data() -> data.TriModalData:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the embedded clips fit the codec at every default speed
        return data.build_data(data.DataConfig(audio_speeds=(0.8, 0.9, 1.1, 1.2)))


def test_only_training_clips_get_speed_perturbed_copies(speed_data: data.TriModalData) -> None:
    plain = data.build_data(data.DataConfig(audio_speeds=())).pairs["audio_text"]
    aug = speed_data.pairs["audio_text"]
    for split in ("train", "val", "test"):  # the examples themselves are unchanged
        assert torch.equal(aug[split].media, plain[split].media)
        assert aug[split].captions == plain[split].captions
    assert aug["val"].variants is None and aug["test"].variants is None and plain["train"].variants is None
    n, m = plain["train"].media.shape
    assert aug["train"].variants.shape == (n, 4, m)
    for k in range(4):  # each copy is a different token sequence of the same clip
        assert (aug["train"].variants[:, k] != plain["train"].media).any(1).float().mean() > 0.9
    for modality, codes in speed_data.code_vectors().items():  # one code per token (embed_codes)
        assert codes.shape[0] == speed_data.vocab.content_size(modality)


def test_recognition_rows_hear_speed_copies_and_no_other_row_does(speed_data: data.TriModalData) -> None:
    it = data.BatchIterator(speed_data, "train", 400, {"audio_text": 1}, 3, cond_keep=0.7, cond_drop=0.1)
    b, layout, v = it.batch(0), speed_data.layout, speed_data.vocab
    pairs, media = speed_data.pairs["audio_text"]["train"], layout.media_slot("audio_text")
    originals = {tuple(m.tolist()) for m in pairs.media}
    copies = {tuple(m.tolist()) for m in pairs.variants.flatten(0, 1)} - originals
    heard = [tuple(v.to_local(row[media], "audio").tolist()) for row in b.ids]
    recognition = b.given[:, media].all(1)
    assert recognition.any() and (~recognition).any()
    assert all(h in originals for h, r in zip(heard, recognition.tolist(), strict=True) if not r), "only real clips"
    assert all(h in originals | copies for h in heard)
    copied = sum(h in copies for h, r in zip(heard, recognition.tolist(), strict=True) if r) / int(recognition.sum())
    assert abs(copied - 4 / 5) < 0.1, "the original and each of the K = 4 copies equally often"


def test_pair_rows_are_conditional_unconditional_or_joint() -> None:
    d = fake_data(n_pairs=50)
    b = data.BatchIterator(d, "train", 3000, {"image_text": 1}, 0, cond_keep=0.5, cond_drop=0.1).batch(0)
    given, hidden = b.given, b.hidden
    assert not (given & hidden).any()
    media, text = LAYOUT.media_slot("image_text"), LAYOUT.text_slot("image_text")
    for mask in (given, hidden):  # a whole segment or nothing
        for seg in (media, text):
            part = mask[:, seg]
            assert (part.all(1) | ~part.any(1)).all()
        assert not mask[:, : media.start].any(), "TASK and BOS_image are never picked"
    assert abs(given.any(1).float().mean() - 0.5) < 0.04 and abs(hidden.any(1).float().mean() - 0.1) < 0.02
    assert abs(given[:, media].all(1).float().mean() - 0.25) < 0.03, "media and text equally often"
    # cond_media: conditional rows show the media (captioning) that often; unconditional rows stay 1/2
    b = data.BatchIterator(d, "train", 3000, {"image_text": 1}, 1, cond_keep=0.5, cond_drop=0.1, cond_media=0.8)
    given, hidden = b.batch(0).given, b.batch(0).hidden
    assert abs(given[:, media].all(1).float().mean() - 0.4) < 0.03
    assert abs(given[:, text].all(1).float().mean() - 0.1) < 0.02
    assert abs(hidden[:, media].all(1).float().mean() - 0.05) < 0.015
    text_rows = data.BatchIterator(d, "train", 50, {"text": 1}, 0, cond_keep=0.5, cond_drop=0.5).batch(0)
    assert not (text_rows.given | text_rows.hidden).any(), "text rows have no roles"
    with pytest.raises(ValueError, match="probabilities"):
        data.BatchIterator(d, "train", 8, {"image_text": 1}, cond_keep=0.8, cond_drop=0.3)
