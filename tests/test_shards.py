"""Pre-tokenized shards (shards.py): the same batches as the in-memory path, each process reading only its rows,
exact resumption from a shard set, a preparation that resumes, and shard sets refused for other tokenizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import ROOT, SMALL, STEP_TOKENS, losses

import data
import shards
import train
from distributed import Dist

RATIOS = {"text": 0.3, "image_text": 0.4, "audio_text": 0.3}


def text_files(folder: Path, n: int = 3) -> tuple[str, ...]:
    """n small text sources (one .jsonl), enough chunks for three splits."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n - 1):
        para = f"Paragraph {{k}} of file {i}: the quick brown fox jumps over the lazy dog {i} times.\n\n"
        (p := folder / f"doc{i}.txt").write_text("".join(para.format(k=k) * 3 for k in range(60)))
        paths.append(str(p))
    lines = [json.dumps({"text": f"Record {k}. " * (40 + k) + "\n\nThe end."}) for k in range(30)]
    (p := folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    return (*paths, str(p))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> data.DataConfig:
    files = text_files(tmp_path_factory.mktemp("texts"))
    return data.DataConfig(default_text=False, text_files=files, audio_speeds=(0.9,), prepare_workers=2)


@pytest.fixture(scope="module")
def prepared(config: data.DataConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shards.prepare(config, tmp_path_factory.mktemp("set") / "shards", progress=False)


def test_batches_from_shards_equal_batches_in_memory(config: data.DataConfig, prepared: Path) -> None:
    """Three text sources tokenized by two worker processes, split and packed: the very arrays and batches of
    ``data.build_data``, for every split and every role of the pair rows."""
    memory, disk = data.build_data(config), shards.open_shards(prepared)
    assert isinstance(disk.text["train"], shards.OnDisk) and isinstance(
        disk.pairs["audio_text"]["train"].media, shards.OnDisk
    )
    for split in shards.SPLITS:
        assert np.array_equal(disk.text[split][:], memory.text[split].numpy()), split
        for task in ("image_text", "audio_text"):
            a, b = memory.pairs[task][split], disk.pairs[task][split]
            assert np.array_equal(np.asarray(a.media), np.asarray(b.media[:])) and torch.equal(a.labels, b.labels)
            assert [b.captions[i] for i in range(len(b))] == a.captions
    for split in ("train", "val"):
        its = [data.BatchIterator(d, split, 24, RATIOS, 3, 0.6, 0.2) for d in (memory, disk)]
        for step in range(12):
            x, y = (it.batch(step) for it in its)
            for f in ("ids", "pad", "task", "given", "hidden"):
                assert torch.equal(getattr(x, f), getattr(y, f)), (split, step, f)


class CountingReads:
    """A media array that counts the rows read from it."""

    def __init__(self, array: shards.OnDisk) -> None:
        self.array, self.reads, self.shape = array, 0, array.shape

    def __getitem__(self, i):
        self.reads += 1
        return self.array[i]

    def __len__(self) -> int:
        return len(self.array)


def test_each_process_reads_only_its_rows_and_corrupts_them_as_one_process(prepared: Path) -> None:
    """Two processes' batches: each reads the media of its own pair rows only (placeholders elsewhere), and the
    forward process gives every process's rows exactly the masks and weights of the one-process batch."""
    disk = shards.open_shards(prepared)
    cfg = train.TrainConfig(batch_size=32, seed=5, cond_keep=0.6, cond_drop=0.2)
    one = Dist(0, 1, 0, torch.device("cpu"))
    its = [data.BatchIterator(disk, "train", 16, RATIOS, 5, 0.6, 0.2) for _ in range(2)]
    for step in range(6):
        whole = its[0].batch(step)
        full = train.own_rows(train.corrupt_batch(whole, disk.vocab, cfg, step), one, True)
        for rank in (0, 1):
            d = Dist(rank, 2, rank, torch.device("cpu"))
            arrays = [(p, k) for t in ("image_text", "audio_text") for k in ("media", "variants")
                      if getattr(p := disk.pairs[t]["train"], k) is not None]  # fmt: skip
            for p, k in arrays:
                setattr(p, k, CountingReads(getattr(p, k)))
            try:
                b = its[1].batch(step, train.own_sequences(16, d))
            finally:
                reads = sum(getattr(p, k).reads for p, k in arrays)
                for p, k in arrays:
                    setattr(p, k, getattr(p, k).array)
            mine = train.own_sequences(16, d)
            assert reads == int((whole.task[mine] != data.TASKS.index("text")).sum()), "one read per own pair row"
            assert torch.equal(b.ids[mine], whole.ids[mine]), "its own rows are the real ones"
            others = torch.ones(16, dtype=torch.bool)
            others[mine] = False
            assert not torch.equal(b.ids[others], whole.ids[others]), "the others' rows were not read"
            assert torch.equal(b.pad, whole.pad) and torch.equal(b.given, whole.given)
            c = train.own_rows(train.corrupt_batch(b, disk.vocab, cfg, step), d, True)
            idx = torch.cat([torch.arange(16)[mine], torch.arange(16)[mine] + 16])
            for f in ("x0", "x_t", "masked", "maskable", "t", "weight"):
                assert torch.equal(getattr(c, f), getattr(full, f)[idx]), (step, rank, f)


def test_a_run_from_a_shard_set_resumes_exactly(config: data.DataConfig, tmp_path: Path) -> None:
    """--prepare_only, then a run from --data killed after 3 steps and resumed: the losses of one whole run."""
    folder = tmp_path / "set"
    files = ",".join(config.text_files)
    done = train.main([f"--data={folder}", f"--text_files={files}", "--default_text=false", "--prepare_only"])
    assert done["step"] == 0 and (folder / "manifest.json").is_file()
    horizon, whole, part = f"--tokens={8 * STEP_TOKENS}", tmp_path / "whole", tmp_path / "part"
    train.main([*SMALL, horizon, f"--data={folder}", f"--out_dir={whole}", "--eval_every=0"])
    train.main([*SMALL, horizon, f"--data={folder}", f"--out_dir={part}", "--eval_every=0", "--max_steps=3"])
    train.main([f"--resume={part / 'ckpt.pt'}"])
    a, b = losses(whole), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 9)) and all(a[s] == b[s] for s in a), (a, b)


def test_an_interrupted_preparation_resumes(config: data.DataConfig, prepared: Path, tmp_path: Path) -> None:
    """A preparation that dies on its third text source leaves no manifest (the folder cannot be opened); run
    again, it tokenizes only the missing source, ignores the half-written file, and gives the same shard set."""
    folder, cfg = tmp_path / "set", replace(config, prepare_workers=1)
    calls, real = [], shards.tokenize_source

    def dies_on_the_third(job: tuple) -> None:
        calls.append(job[0])
        if len(calls) == 3:
            job[1].with_name(job[1].name + ".tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real(job)

    shards.tokenize_source = dies_on_the_third
    try:
        with pytest.raises(KeyboardInterrupt):
            shards.prepare(cfg, folder, progress=False)
        with pytest.raises(FileNotFoundError, match="no prepared shard set"):
            shards.open_shards(folder)
        calls.clear()
        shards.prepare(cfg, folder, progress=False)
    finally:
        shards.tokenize_source = real
    assert calls == [config.text_files[2]], calls
    for split in shards.SPLITS:
        a, b = shards.open_shards(folder), shards.open_shards(prepared)
        assert np.array_equal(a.text[split], b.text[split])


def test_a_shard_set_made_with_other_tokenizers_is_refused(prepared: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "train.py"), f"--data={prepared}", "--text_vocab=4096", "--max_steps=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], "one line"
    assert "prepared with other data options: --text_vocab=4096 (the set's: 1024)" in done.stderr
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(prepared), str(copy)], check=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizers"]["audio"] = "0" * 64  # as if the codec file had been replaced since
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"the audio tokenizer of the shard set .* has changed"):
        shards.open_shards(copy)
