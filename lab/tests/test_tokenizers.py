"""Tests of the lab's tokenizer tools: TorchScript export and vouched loading, image autoencoder training."""

import warnings

import numpy as np
import pytest
import torch

import fsq
from lab import tokenizers
from lab.torchscript import (
    ScriptedAudioCodec,
    ScriptedImageTokenizer,
    export_torchscript,
    load_scripted_audio_codec,
    load_scripted_image_tokenizer,
)


@pytest.fixture(scope="module")
def codec():
    return fsq.load_audio_codec()


@pytest.fixture(scope="module")
def spoken():
    import data

    return data.spoken_digits()


def test_torchscript_export_of_our_codec_loads_when_vouched_for(codec, spoken, tmp_path):
    waves, _ = spoken
    export_torchscript(codec, tmp_path / "codec.ts")
    scripted = load_scripted_audio_codec(tmp_path / "codec.ts", fsq.file_sha256(tmp_path / "codec.ts"))
    assert isinstance(scripted, ScriptedAudioCodec)
    assert (scripted.vocab_size, scripted.tokens_per_clip) == (codec.vocab_size, codec.tokens_per_clip)
    assert (scripted.sample_rate, scripted.clip_seconds) == (codec.sample_rate, codec.clip_seconds)
    ids = scripted.encode_batch(waves[:4])
    assert np.array_equal(ids, codec.encode_batch(waves[:4]))
    assert np.allclose(scripted.decode(ids[0]), codec.decode(ids[0]), atol=1e-4)


def test_a_torchscript_file_nobody_vouches_for_is_never_run(codec, tmp_path, monkeypatch):
    export_torchscript(codec, tmp_path / "codec.ts")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load ran on an unvouched file")

    monkeypatch.setattr(torch.jit, "load", refuse)
    with pytest.raises(ValueError, match="nothing vouches for it"):
        load_scripted_audio_codec(tmp_path / "codec.ts", "")
    with pytest.raises(ValueError, match=r"not the .* vouched for"):
        load_scripted_audio_codec(tmp_path / "codec.ts", "0" * 64)


def test_torchscript_module_without_the_contract_is_rejected(tmp_path):
    with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "lin.ts"))
    with pytest.raises(ValueError, match="lacks encode, decode"):
        load_scripted_audio_codec(tmp_path / "lin.ts", fsq.file_sha256(tmp_path / "lin.ts"))


def test_image_autoencoder_exports_to_torchscript(tmp_path):
    model = fsq.ImageAutoencoder(fsq.ImageAEConfig(image_size=28, width=8)).eval()
    images = np.random.default_rng(0).random((5, 28, 28)).astype(np.float32)
    ids = model.encode_batch(images)
    export_torchscript(model, tmp_path / "ae.ts")
    scripted = load_scripted_image_tokenizer(tmp_path / "ae.ts", fsq.file_sha256(tmp_path / "ae.ts"))
    assert isinstance(scripted, ScriptedImageTokenizer)
    assert np.array_equal(scripted.encode(images), ids)
    assert np.allclose(scripted.decode(ids), model.decode_batch(ids), atol=1e-5)


def test_image_autoencoder_learns_a_little():
    images, _, _ = tokenizers.default_images(size=16)
    cfg = fsq.ImageAEConfig(image_size=16, width=16)
    tc = tokenizers.TrainConfig(steps=300, batch=16, lr=3e-3, warmup=10, log_every=1000)
    model = tokenizers.train_image_autoencoder(images[:256], cfg, tc, log=lambda s: None)
    x = images[256:320]
    mse = np.mean((model.decode_batch(model.encode_batch(x)) - x) ** 2)
    # 300 steps reach about 0.2 of the mean image's error; 150 steps sat at 0.49-0.50 and failed on one CPU
    assert mse < 0.5 * np.mean((x - images[:256].mean(0)) ** 2)


def test_user_image_arrays_are_read_without_pickles(tmp_path):
    evil = tmp_path / "images.npz"
    np.savez(evil, images=np.array([object()], dtype=object))  # an object array is stored as a pickle
    with pytest.raises(ValueError, match="allow_pickle"):
        tokenizers.load_images(str(evil), 8)


def test_a_run_trains_on_32x32_images_through_a_trained_image_tokenizer_and_decodes_samples(tmp_path):
    """32x32 pictures -> ``train-image`` -> ``--image_tokenizer``: prepare, train, sample, export and evaluate all
    tokenize and decode through the autoencoder; a moved copy of it resumes the run; another autoencoder at its path
    is refused by the shard set, the resume and the inference loader."""
    import dataclasses
    import json

    from PIL import Image

    import checkpoint
    import data
    import evaluate
    import sample
    import shards
    import train

    folder = tmp_path / "pictures"
    folder.mkdir()
    digits, labels = data.digits_images()
    lines = []
    for i in range(120):  # bright ink on black, upsampled to 32x32
        Image.fromarray((digits[i] * 255 // 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR).save(
            folder / f"{i}.png"
        )
        lines.append(json.dumps({"image": f"{i}.png", "text": data.digit_captions(int(labels[i]))[i % 10]}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    ae = tmp_path / "ae.pt"
    tokenizers.main(["train-image", f"--images={folder}", "--size=32", "--width=8", "--steps=60", f"--out={ae}"])
    (tmp_path / "text.txt").write_text(
        "\n\n".join(f"paragraph {i}: a few words to learn from. " * 6 for i in range(80))
    )
    out, shard_set = tmp_path / "run", tmp_path / "set"
    options = [
        f"--image_dir={folder}", f"--image_tokenizer={ae}", f"--text_files={tmp_path / 'text.txt'}",
        "--default_text=false", "--seq_len=96", "--d_model=32", "--n_layers=2", "--n_heads=2", "--batch_size=8",
        "--dtype=fp32", "--eval_every=0", "--final_report=false", "--warmup_tokens=1000", f"--tokens={4 * 8 * 96}",
    ]  # fmt: skip
    train.main([*options, f"--data={shard_set}", f"--out_dir={out}", "--max_steps=2"])
    manifest = json.loads((shard_set / "manifest.json").read_text())
    assert manifest["tokenizers"]["image"] == f"autoencoder {fsq.file_sha256(ae)}"
    assert manifest["layout"]["image_len"] == 64, "32x32 pictures -> an 8x8 grid of tokens"
    moved = tmp_path / "elsewhere" / "ae.pt"
    moved.parent.mkdir()
    ae.rename(moved)  # the same file, moved: the run resumes from the same set with it
    train.main([f"--resume={out / 'ckpt.pt'}", f"--image_tokenizer={moved}"])
    assert checkpoint.read_checkpoint(out / "ckpt.pt")["step"] == 4
    inf = checkpoint.load_for_inference(out / "ckpt.pt")
    assert isinstance(inf.image_tokenizer, fsq.ImageAutoencoder) and inf.image_tokenizer.side == 32

    run = [f"--checkpoint={out / 'ckpt.pt'}", "--steps=4", f"--out={tmp_path / 's'}", "--animate"]
    sample.main(["--task=t2i", "--prompt=a handwritten seven", "--num=2", *run])
    images = np.load(tmp_path / "s" / "images.npy", allow_pickle=False)
    assert images.shape == (2, 32, 32) and 0 <= images.min() and images.max() <= 1, "decoded through the autoencoder"
    assert Image.open(tmp_path / "s" / "grid.png").size[0] > 0 and (tmp_path / "s" / "animation_001.gif").is_file()
    Image.fromarray((digits[500] * 255 // 16).astype(np.uint8)).save(tmp_path / "digit.png")  # 8x8: resized up
    exported = checkpoint.export(inf, tmp_path / "export")
    assert (exported / "image_tokenizer.pt").read_bytes() == moved.read_bytes()
    sample.main(["--task=i2t", f"--checkpoint={exported}", f"--image={tmp_path / 'digit.png'}", *run[1:3]])
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["samples"][0]["text"] is not None

    corpus = shards.open_shards(shard_set, files=inf.data_config)  # the set names the old path: the run's copy
    judges = evaluate.fit_judges(corpus)
    t2i = evaluate.text_to_image(inf, judges, dataclasses.replace(sample.PRESETS["t2i"], steps=4), per_digit=1)
    view = evaluate.judge_view(inf.image_tokenizer, t2i["images"])
    assert t2i["images"].shape == (10, 32, 32) and view.shape == (10, 8, 8) and view.max() <= 16
    test = corpus.pairs["image_text"]["test"]
    assert test.raw.shape == (12, 32, 32), "the held-out pictures, in the autoencoder's form"
    assert 0 <= t2i["accuracy"] <= 1
    assert 0 <= judges.image.accuracy(evaluate.judge_view(inf.image_tokenizer, test.raw), test.labels.numpy()) <= 1

    fsq.ImageAutoencoder(fsq.ImageAEConfig(image_size=32, width=8)).save(moved)  # replaced by another autoencoder
    with pytest.raises(ValueError, match=r"image tokenizer of the shard set .* has changed"):
        shards.open_shards(shard_set, files=inf.data_config)
    with pytest.raises(SystemExit, match="is not the one this checkpoint was trained with"):
        train.main([f"--resume={out / 'ckpt.pt'}", "--max_steps=5"])
    with pytest.raises(ValueError, match="not the file this run was trained with"):
        checkpoint.load_for_inference(out / "ckpt.pt")
