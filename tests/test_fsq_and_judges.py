"""Tests of fsq.py (quantizer, audio codec, image autoencoder, loading), the judges of evaluate.py and the
committed spoken-digit data. All offline; the whole file runs in well under a minute on two cores."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import data
import fsq
from evaluate import DIGIT_WORDS, DigitImageJudge, SpeechJudge

ROOT = Path(__file__).resolve().parents[1]
SMALL_AUDIO = fsq.AudioCodecConfig(channels=16, res_blocks=1, griffin_lim_iters=4)


@pytest.fixture(scope="module")
def spoken():
    return data.spoken_digits(ROOT / "assets" / "spoken_digits.npz")


@pytest.fixture(scope="module")
def codec():
    return fsq.load_audio_codec(ROOT / "assets" / "audio_codec.pt")


@pytest.fixture(scope="module")
def judge():
    return SpeechJudge()


# --- FSQ ------------------------------------------------------------------------------------------


@given(st.lists(st.integers(2, 8), min_size=1, max_size=4))
def test_fsq_indices_and_codes_round_trip(levels):
    q = fsq.FSQ(tuple(levels))
    idx = torch.arange(q.codebook_size)
    codes = q.indices_to_codes(idx)
    assert codes.shape == (q.codebook_size, len(levels))
    assert torch.equal(q.codes_to_indices(codes), idx)  # a bijection between the grid and [0, prod L)
    assert codes.abs().max() <= 1.0
    assert len({tuple(c) for c in codes.tolist()}) == q.codebook_size  # distinct codes
    assert np.array_equal(q.code_vectors(), codes.numpy())  # what embed_codes starts from


@given(st.lists(st.integers(2, 8), min_size=1, max_size=4), st.floats(0.1, 20.0))
def test_fsq_quantizes_any_latent_into_range(levels, scale):
    q = fsq.FSQ(tuple(levels))
    z = torch.randn(64, len(levels), generator=torch.Generator().manual_seed(0)) * scale
    codes, idx = q.quantize(z)
    assert idx.min() >= 0 and idx.max() < q.codebook_size
    assert torch.equal(q.indices_to_codes(idx), codes)  # codes are exactly grid points
    per_channel_levels = [len(torch.unique(codes[:, j])) for j in range(len(levels))]
    assert all(n <= L for n, L in zip(per_channel_levels, levels, strict=True))


def test_fsq_straight_through_gradient():
    q = fsq.FSQ((7, 5, 5, 5))
    z = torch.randn(10, 4, requires_grad=True)
    (q(z) * torch.arange(1.0, 5.0)).sum().backward()
    assert z.grad is not None and torch.all(z.grad.abs() > 0)  # rounding did not block the gradient
    # the gradient is that of the bound tanh(.)/half_width: rounding acts as the identity
    z2 = z.detach().clone().requires_grad_(True)
    (q.bound(z2) / q.half_width * torch.arange(1.0, 5.0)).sum().backward()
    assert torch.allclose(z.grad, z2.grad)


# --- audio codec ------------------------------------------------------------------------------------


def test_audio_codec_shapes_and_ranges():
    c = fsq.AudioCodec(SMALL_AUDIO).eval()
    assert c.tokens_per_clip == 32 and c.vocab_size == 875 and c.sample_rate == 12000
    for n in (3000, c.n_samples, c.n_samples + 5000):  # shorter, exact, longer: all give one fixed length
        ids = c.encode(np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1)
        assert ids.shape == (c.tokens_per_clip,) and ids.dtype == np.int64
        assert ids.min() >= 0 and ids.max() < c.vocab_size
    wave = c.decode(ids)
    assert wave.shape == (round(c.clip_seconds * c.sample_rate),) and wave.dtype == np.float32
    with pytest.raises(ValueError, match="must lie in"):
        c.decode(np.full(c.tokens_per_clip, c.vocab_size))
    with pytest.raises(ValueError, match="expected"):
        c.decode(np.zeros(c.tokens_per_clip + 1, dtype=np.int64))


def test_audio_config_rejects_a_window_that_is_not_whole_tokens():
    with pytest.raises(ValueError, match="multiple of hop"):
        fsq.AudioCodecConfig(clip_seconds=1.0)


def test_committed_codec_is_small_and_matches_the_data(codec, spoken):
    waves, meta = spoken
    assert (ROOT / "assets" / "audio_codec.pt").stat().st_size < 1_000_000
    assert codec.sample_rate == int(meta["sample_rate"])
    assert max(len(w) for w in waves) <= codec.n_samples  # no clip is cropped by the fixed window
    assert 500 <= codec.vocab_size <= 1000 and 25 <= codec.tokens_per_clip / codec.clip_seconds <= 35


def test_committed_codec_reconstructions_are_recognized(codec, spoken, judge):
    waves, meta = spoken
    pick = [int(np.nonzero((meta["labels"] == d) & (meta["voices"] == v) & (meta["rates"] == 0.95))[0][1])
            for d, v in ((0, "awb"), (3, "rms"), (5, "kal16"), (7, "slt"), (9, "awb"), (4, "rms"))]  # fmt: skip
    labels = meta["labels"][pick]
    rec = codec.decode_batch(codec.encode_batch([waves[i] for i in pick]))
    said = judge.recognize_all(list(rec), codec.sample_rate)
    assert sum(s == DIGIT_WORDS[y] for s, y in zip(said, labels, strict=True)) >= 5, said


def test_save_load_round_trip_gives_identical_encodings(codec, spoken, tmp_path):
    waves, _ = spoken
    codec.save(tmp_path / "c.pt")
    again = fsq.load_audio_codec(tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["format"] == fsq.FORMAT_AUDIO
    batch = waves[:8]
    assert np.array_equal(codec.encode_batch(batch), again.encode_batch(batch))


# --- adapters ------------------------------------------------------------------------------------------


def test_adapters_explain_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"audio codec file .* not found.*lab.tokenizers"):
        fsq.load_audio_codec(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match=r"image autoencoder file .* not found"):
        fsq.load_image_tokenizer(tmp_path / "nope.pt")


def test_adapters_explain_a_wrong_format(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a checkpoint of an audio codec"):
        fsq.load_audio_codec(text)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="expected a checkpoint of format"):
        fsq.load_audio_codec(other)
    fsq.ImageAutoencoder(fsq.ImageAEConfig(image_size=8, width=4)).save(other)
    with pytest.raises(ValueError, match="audio-codec"):
        fsq.load_audio_codec(other)  # an image checkpoint is not an audio codec
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(ValueError, match="not a checkpoint of an image autoencoder"):
        fsq.load_image_tokenizer(archive)


def test_a_torchscript_file_is_never_loaded_and_a_recorded_hash_must_match(codec, tmp_path, monkeypatch):
    from lab.torchscript import export_torchscript

    export_torchscript(codec, tmp_path / "codec.ts")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load ran")

    monkeypatch.setattr(torch.jit, "load", refuse)
    with pytest.raises(ValueError, match="is a TorchScript program"):
        fsq.load_audio_codec(tmp_path / "codec.ts", fsq.file_sha256(tmp_path / "codec.ts"))
    with pytest.raises(ValueError, match="not the file this run was trained with"):
        fsq.load_audio_codec(ROOT / "assets" / "audio_codec.pt", "0" * 64)
    assert fsq.load_audio_codec(ROOT / "assets" / "audio_codec.pt", fsq.file_sha256(ROOT / "assets" / "audio_codec.pt"))


def test_image_autoencoder_round_trips_and_exports(tmp_path):
    cfg = fsq.ImageAEConfig(image_size=28, width=8)
    model = fsq.ImageAutoencoder(cfg).eval()
    images = np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)
    ids = model.encode_batch(images)
    assert ids.shape == (5, 49) and ids.min() >= 0 and ids.max() < model.vocab_size
    assert model.decode_batch(ids).shape == images.shape
    assert np.array_equal(model.encode(images[2]), ids[2]) and model.decode(ids[2]).shape == (28, 28)
    model.save(tmp_path / "ae.pt")
    assert np.array_equal(fsq.load_image_tokenizer(tmp_path / "ae.pt").encode_batch(images), ids)
    picture = np.zeros((56, 40, 3), dtype=np.uint8)  # any size and mode: resized, made gray, scaled to [0, 1]
    picture[10:40, 10:30] = 200
    x = model.from_picture(picture)
    assert x.shape == (28, 28) and x.dtype == np.float32 and x[0, 0] == 0 and abs(x[12, 14] - 200 / 255) < 1e-6
    assert np.array_equal(model.to_picture(x), np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8))
    assert (model.side, model.patch, len(model.code_vectors())) == (28, 4, model.vocab_size)
    rgb = fsq.ImageAutoencoder(fsq.ImageAEConfig(image_size=8, in_channels=3, width=4)).eval()
    x = rgb.from_picture(np.full((16, 12), 100, dtype=np.uint8))  # a gray picture, read as RGB
    assert x.shape == (8, 8, 3) and rgb.decode(rgb.encode(x)).shape == (8, 8, 3) and rgb.to_picture(x).dtype == np.uint8
    with pytest.raises(ValueError, match="in_channels must be 1"):
        fsq.ImageAEConfig(in_channels=4)


# --- judges ---------------------------------------------------------------------------------------------


def test_speech_judge_recognizes_clean_clips(spoken, judge):
    waves, meta = spoken
    pick = np.nonzero((meta["voices"] == "awb") & (meta["rates"] == 0.95) & (meta["pitches"] == 135.0))[0]
    assert judge.accuracy([waves[i] for i in pick], meta["labels"][pick], int(meta["sample_rate"])) >= 0.9
    assert judge.recognize(np.zeros(6000, dtype=np.float32), 12000) in ("", *DIGIT_WORDS)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    return d.images[perm].astype(np.int64), d.target[perm]


def test_digit_image_judge_accuracy(digits):
    images, labels = digits
    judge = DigitImageJudge().fit(images[:1400], labels[:1400])
    assert judge.accuracy(images[1400:], labels[1400:]) > 0.9
    with pytest.raises(ValueError, match="8x8"):
        judge.predict(np.zeros((2, 7, 7)))


# --- the committed spoken-digit data ---------------------------------------------------------------------


def test_spoken_digits_file_has_the_documented_layout():
    path = ROOT / "assets" / "spoken_digits.npz"
    assert path.stat().st_size < 2_000_000
    with np.load(path, allow_pickle=False) as z:
        keys = {"audio", "offsets", "sample_rate", "mu", "transcripts", "labels", "voices", "rates", "pitches", "split"}
        assert set(z.files) == keys
        n = len(z["labels"])
        assert z["audio"].dtype == np.uint8 and z["offsets"].shape == (n + 1,)
        assert z["offsets"][0] == 0 and z["offsets"][-1] == len(z["audio"]) and np.all(np.diff(z["offsets"]) > 0)
        for k in ("transcripts", "voices", "rates", "pitches", "split"):
            assert z[k].shape == (n,), k
        assert [DIGIT_WORDS[y] for y in z["labels"]] == list(z["transcripts"])
        assert set(np.unique(z["labels"])) == set(range(10)) and set(z["split"]) == {"train", "test"}
        assert {"kal", "kal16", "awb", "rms", "slt"} <= set(z["voices"])
        assert int(z["sample_rate"]) == 12000 and int(z["mu"]) == 255
        assert len(np.unique(z["rates"])) >= 3 and len(np.unique(z["pitches"])) >= 3
