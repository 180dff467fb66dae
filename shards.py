"""Pre-tokenized data: tokenize once, then train from token shards on disk.

At scale nobody tokenizes at start-up: the data is tokenized once into flat arrays of token ids, and
training reads the rows it needs from them (nanoGPT's ``train.bin``, Megatron's indexed datasets).
``data.build_data`` builds the arrays of a ``data.TriModalData`` in memory; this file writes the same
arrays to a folder once (``prepare``) and reads rows from them as needed (``open_shards``), so a process's
memory holds the indexes and the rows of its batches, never the dataset. Every run goes through here:

    python train.py --data=DIR --text_files=a.txt,b.jsonl --prepare_only   # tokenize once into DIR
    python train.py --data=DIR                                              # train from it (or torchrun ...)
    python train.py                # the embedded default: prepared on first use into the cache (``cache_dir``)

A shard set (``DIR``), every array a ``.npy`` file (read by ``OnDisk`` or memory-mapped, never pickles):

    manifest.json                 written last: the DataConfig, the layout, the tokenizers' fingerprints
    text_tokenizer.tiktoken       the text tokenizer's ranks
    text/<split>.npy              the packed text stream of a split (global ids, ``Layout.text_stream``)
    <task>/<split>/media.npy      (N, M) media ids; variants.npy (N, K, M) speed-perturbed copies (train)
    <task>/<split>/captions.npy   every caption's text ids back to back; caption_starts.npy (C + 1,) where each
                                  begins; example_starts.npy (N + 1,): example i owns captions [s_i, s_i+1)
    <task>/<split>/labels.npy     (N,) the digit named, or -1; raw.npy: the images a judge reads (held-out
                                  splits, and the training digits the image judge is fitted on)
    <task>/<split>/clip_*.npy     the held-out waveforms (for the speech judge), back to back with their starts
    parts/text-<i>.npy            the text of source i tokenized, with its chunk lengths: ``prepare``'s unit of work

Preparing is resumable: every file is written to a temporary name and renamed, a text source whose part
exists is not tokenized again, and a folder without ``manifest.json`` is never opened. The text sources
are tokenized by ``workers`` processes in parallel; the chunks are then split and packed exactly as
``build_data`` does, so the shards hold the very arrays of the in-memory path (tested).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import shutil
import sys
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import fsq
from bpe import TextTokenizer
from data import (
    DataConfig,
    PairData,
    TriModalData,
    build_pairs,
    pydoc_corpus,
    read_text_files,
    split_documents,
    split_indices,
    tokenizers,
)
from mdm import Vocab

FORMAT = "trimodal-mdm-shards/1"
SPLITS = ("train", "val", "test")
NOT_CONTENT = ("data", "strict", "prepare_workers")  # DataConfig fields that do not change the arrays


# --- Arrays on disk --------------------------------------------------------------------------------
def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name, then rename: a half-written array never has the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def load_array(path: Path) -> np.ndarray:
    """A read-only memory map of a .npy file (for the small index arrays), with random access: no read-ahead."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if isinstance(array, np.memmap) and array.size:
        array._mmap.madvise(mmap.MADV_RANDOM)
    return array.view(np.ndarray)  # the same pages; a plain view slices without np.memmap's per-slice overhead


class OnDisk:
    """A .npy array left on disk, its rows read with ``os.pread`` when indexed (``a[i]``, ``a[i, j]``, ``a[i:j]``).

    A memory map would do as well, but every page it touches stays in the process's resident memory (and the
    kernel maps pages around each one touched): over a long run that is the whole file. A read copies only the
    bytes asked for, so a process holds its batch, never the dataset."""

    def __init__(self, path: Path) -> None:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            self.shape, fortran, self.dtype = read_header(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered array is not a shard")
        self.path, self.row = path, int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) as an array of shape (b - a, *shape[1:])."""
        data = os.pread(self.fd, (b - a) * self.row, self.offset + a * self.row)
        return np.frombuffer(data, self.dtype).reshape(b - a, *self.shape[1:])

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, slice):
            a, b, step = first.indices(len(self))
            if step != 1:
                raise IndexError("OnDisk reads contiguous rows only")
            out = self.rows(a, max(a, b))
            return out[(slice(None), *rest)] if rest else out
        i = int(first) + (len(self) if int(first) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"row {first} of {len(self)} in {self.path}")
        return self.rows(i, i + 1)[(0, *rest)]

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    def __getstate__(self) -> dict:  # a copy for another process opens the file anew
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def id_dtype(size: int) -> type:
    """The smallest unsigned type that holds ids below ``size``."""
    return np.uint16 if size <= 2**16 else np.uint32


class Captions:
    """Per example, its captions as lists of local text ids, read from the flat arrays only when asked."""

    def __init__(self, ids: np.ndarray, caption_starts: np.ndarray, example_starts: np.ndarray) -> None:
        self.ids, self.caption_starts, self.example_starts = ids, caption_starts, example_starts

    def __len__(self) -> int:
        return len(self.example_starts) - 1

    def count_of(self, i: int) -> int:
        return int(self.example_starts[i + 1] - self.example_starts[i])

    def caption(self, i: int, j: int) -> list[int]:
        """Caption j of example i, the only one read."""
        a = self.caption_starts[self.example_starts[i] + j]
        return self.ids[a : self.caption_starts[self.example_starts[i] + j + 1]].tolist()

    def __getitem__(self, i: int) -> list[list[int]]:
        a, b = self.example_starts[i], self.example_starts[i + 1]
        return [self.ids[self.caption_starts[j] : self.caption_starts[j + 1]].tolist() for j in range(a, b)]


def flatten(lists: list, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Ragged lists back to back, and the (len + 1,) offsets where each begins."""
    starts = np.zeros(len(lists) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([len(x) for x in lists])
    flat = np.concatenate([np.asarray(x, dtype=dtype) for x in lists]) if lists else np.zeros(0, dtype)
    return flat, starts


# --- Writing a shard set ---------------------------------------------------------------------------
def fingerprints(cfg: DataConfig, tok: TextTokenizer) -> dict[str, str]:
    """What identifies each tokenizer: a shard set is read only by a run with the same three."""
    return {
        "text": hashlib.sha256(tok.to_text().encode()).hexdigest(),
        "image": f"autoencoder {fsq.file_sha256(cfg.image_tokenizer)}"
        if cfg.image_tokenizer
        else f"pixels levels={cfg.image_levels} patch={cfg.image_patch}",
        "audio": fsq.file_sha256(cfg.audio_codec),
    }


def write_pairs(folder: Path, task: str, split: str, p: PairData, media_size: int, text_size: int) -> None:
    """One split of a pair task as arrays (see the module docstring)."""
    out = folder / task / split
    save_array(out / "media.npy", np.asarray(p.media).astype(id_dtype(media_size)))
    if p.variants is not None:
        save_array(out / "variants.npy", np.asarray(p.variants).astype(id_dtype(media_size)))
    ids, caption_starts = flatten([c for caps in p.captions for c in caps], id_dtype(text_size))
    save_array(out / "captions.npy", ids)
    save_array(out / "caption_starts.npy", caption_starts)
    save_array(out / "example_starts.npy", np.concatenate([[0], np.cumsum([len(c) for c in p.captions])]))
    save_array(out / "labels.npy", np.asarray(p.labels, dtype=np.int64))
    if p.raw is None:
        return
    if task == "image_text":  # the images: the held-out ones, and the training ones the image judge learns from
        save_array(out / "raw.npy", np.stack(p.raw))
    elif split != "train":  # the held-out clips, for the speech judge
        waves, starts = flatten([np.asarray(w, dtype=np.float32) for w in p.raw], np.float32)
        save_array(out / "clip_waves.npy", waves)
        save_array(out / "clip_starts.npy", starts)


def tokenize_source(job: tuple) -> None:
    """A worker's unit: one text source (``"pydoc"`` or a file) cut into chunks, each tokenized and packed as
    BOS_text chunk EOS_text (global ids); the part and its chunk lengths, written atomically."""
    source, part, ranks, vocab, strict = job
    tok, v = TextTokenizer.from_text(ranks), Vocab.from_dict(vocab)
    docs = pydoc_corpus() if source == "pydoc" else read_text_files([source], strict, require=False)
    bos, eos = torch.tensor([v.bos("text")]), torch.tensor([v.eos("text")])
    chunks = [
        torch.cat([bos, v.to_global(torch.tensor(tok.encode(c), dtype=torch.long), "text"), eos])
        for c in split_documents(docs)
    ]
    ids, starts = flatten(chunks, id_dtype(v.size))
    save_array(part.with_name(part.stem + ".lengths.npy"), np.diff(starts))
    save_array(part, ids)  # last: its presence marks the part done


def pack_text(folder: Path, parts: list[Path], seed: int, dtype: type) -> None:
    """Every chunk of every part, split as ``build_data`` splits them (``split_indices`` over all the chunks, in
    source order) and packed per split in the split's order, streamed into ``text/<split>.npy``."""
    arrays, lens = [load_array(p) for p in parts], [load_array(p.with_name(p.stem + ".lengths.npy")) for p in parts]
    lengths = np.concatenate(lens)  # every chunk's length, in source order
    if not len(lengths):
        raise ValueError("no text: keep the default corpus or pass text files")
    part_of = np.repeat(np.arange(len(parts)), [len(x) for x in lens])  # the part that holds each chunk
    begins = np.concatenate([np.cumsum(x) - x for x in lens])  # where each chunk begins in its part
    for split, chunks in split_indices(len(lengths), seed).items():
        path = folder / "text" / f"{split}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(int(lengths[chunks].sum()),))
        at = 0
        for c in chunks:
            out[at : at + lengths[c]] = arrays[part_of[c]][begins[c] : begins[c] + lengths[c]]
            at += lengths[c]
        out.flush()
        del out
        os.replace(tmp, path)


def prepare(cfg: DataConfig, folder: str | Path, codec_sha256: str = "", progress: bool = True) -> Path:
    """Tokenize the sources ``cfg`` names into a shard set at ``folder``; resumes a preparation that stopped."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return folder
    tok, pixels, codec, layout = tokenizers(cfg, codec_sha256)
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    tok.save(folder / "text_tokenizer.tiktoken")
    for f in cfg.text_files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"text file {f} does not exist")
    sources = (["pydoc"] if cfg.default_text else []) + [str(Path(f).resolve()) for f in cfg.text_files]
    parts = [folder / "parts" / f"text-{i:05d}.npy" for i in range(len(sources))]
    jobs = [
        (s, p, tok.to_text(), layout.vocab.to_dict(), cfg.strict)
        for s, p in zip(sources, parts, strict=True)
        if not p.is_file()
    ]
    n = len(sources)
    bar = tqdm(total=n, initial=n - len(jobs), unit="source", desc="text", disable=not progress, file=sys.stdout)
    parallel = cfg.prepare_workers > 1 and len(jobs) > 1
    if parallel:
        with get_context("spawn").Pool(min(cfg.prepare_workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(tokenize_source, jobs):
                bar.update(1)
    for job in [] if parallel else jobs:
        tokenize_source(job)
        bar.update(1)
    bar.close()
    pack_text(folder, parts, cfg.split_seed, id_dtype(layout.vocab.size))
    pairs = build_pairs(cfg, tok, pixels, codec, layout)
    for task, splits in pairs.items():
        size = pixels.vocab_size if task == "image_text" else codec.vocab_size
        for split, p in splits.items():
            write_pairs(folder, task, split, p, size, tok.vocab_size)
    manifest = {
        "format": FORMAT,
        "data_config": {k: v for k, v in asdict(cfg).items() if k not in NOT_CONTENT},
        "layout": layout.to_dict(),
        "tokenizers": fingerprints(cfg, tok),
    }
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / "manifest.json")  # last: the set is complete
    return folder


# --- Opening a shard set ---------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no prepared shard set (no manifest.json): prepare it with "
            f"python train.py --data={folder} --prepare_only [your data options]"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a shard set of this version (format {FORMAT!r} expected)")
    return manifest


def manifest_config(folder: str | Path) -> DataConfig:
    """The DataConfig a shard set was prepared from (tuples were stored as lists)."""
    return replace(DataConfig.from_dict(read_manifest(folder)["data_config"]), data=str(folder))


def check_same_data(cfg: DataConfig, folder: str | Path, given: set[str]) -> None:
    """The options of the run that shape the tokens (``given``: those named on the command line, or by the
    checkpoint resumed) must be the shard set's own: a set made with other tokenizers or sources is refused."""
    saved = manifest_config(folder)
    same = (*NOT_CONTENT, "audio_codec", "image_tokenizer")  # compared by their hashes, not paths (``open_shards``)
    differ = [k for k in sorted(given) if k not in same and getattr(cfg, k) != getattr(saved, k)]
    if differ:
        shown = ", ".join(f"--{k}={getattr(cfg, k)!r} (the set's: {getattr(saved, k)!r})" for k in differ)
        raise ValueError(f"the shard set {folder} was prepared with other data options: {shown}; prepare a new set")


def adopt(cfg: DataConfig, given: set[str]) -> DataConfig:
    """The options of the shard set at an existing ``cfg.data`` (those ``given`` must agree), else ``cfg`` itself."""
    if not (cfg.data and (Path(cfg.data) / "manifest.json").is_file()):
        return cfg
    check_same_data(cfg, cfg.data, given)
    saved = manifest_config(cfg.data)
    image = cfg.image_tokenizer if "image_tokenizer" in given else saved.image_tokenizer  # a moved copy, if named
    return replace(saved, strict=cfg.strict, audio_codec=cfg.audio_codec, image_tokenizer=image)


def open_pairs(folder: Path, split: str, image: bool) -> PairData:
    """One split of a pair task, left on disk (the held-out media in memory: evaluation indexes them often)."""
    media = OnDisk(folder / "media.npy")
    media = media if split == "train" else torch.from_numpy(media[:].astype(np.int64))
    captions = Captions(
        OnDisk(folder / "captions.npy"), *(load_array(folder / f"{n}_starts.npy") for n in ("caption", "example"))
    )
    labels = torch.from_numpy(np.load(folder / "labels.npy", allow_pickle=False))
    raw = None
    if image and (folder / "raw.npy").is_file():
        raw = load_array(folder / "raw.npy")
    elif (folder / "clip_waves.npy").is_file():
        waves, starts = (np.load(folder / f"clip_{n}.npy", allow_pickle=False) for n in ("waves", "starts"))
        raw = [waves[a:b] for a, b in itertools.pairwise(starts)]
    variants = OnDisk(folder / "variants.npy") if (folder / "variants.npy").is_file() else None
    return PairData(media, captions, labels, raw, variants)


def open_shards(folder: str | Path, codec_sha256: str = "", files: DataConfig | None = None) -> TriModalData:
    """A prepared shard set as a ``TriModalData`` whose arrays stay on disk; its tokenizers must be unchanged
    (``files``: a run's options naming the codec and image tokenizer files to use instead of those the set names,
    moved copies, say; their hashes must be the same)."""
    folder, cfg = Path(folder), manifest_config(folder)
    cfg = replace(cfg, audio_codec=files.audio_codec, image_tokenizer=files.image_tokenizer) if files else cfg
    manifest = read_manifest(folder)
    tok, pixels, codec, layout = tokenizers(
        replace(cfg, text_tokenizer=str(folder / "text_tokenizer.tiktoken")), codec_sha256
    )
    if (found := fingerprints(cfg, tok)) != manifest["tokenizers"]:
        changed = [k for k in found if found[k] != manifest["tokenizers"][k]]
        raise ValueError(
            f"the {', '.join(changed)} tokenizer of the shard set {folder} has changed since it was prepared"
        )
    if layout.to_dict() != manifest["layout"]:
        raise ValueError(f"the shard set {folder} was prepared for another layout: {manifest['layout']}")
    text = {s: OnDisk(folder / "text" / f"{s}.npy") for s in SPLITS}
    pairs = {
        t: {s: open_pairs(folder / t / s, s, t == "image_text") for s in SPLITS} for t in ("image_text", "audio_text")
    }
    return TriModalData(layout, tok, pixels, codec, text, pairs, cfg)


# --- The one data path of a run ----------------------------------------------------------------------
def cache_dir(cfg: DataConfig, codec_sha256: str = "") -> Path:
    """Where the shards of ``cfg``'s sources live when no --data folder is named: a folder per content, under
    $TRIMODAL_MDM_CACHE (default ~/.cache/trimodal-mdm)."""
    content = {k: v for k, v in asdict(cfg).items() if k not in NOT_CONTENT}
    content["image_tokenizer_sha256"] = fsq.file_sha256(cfg.image_tokenizer)  # a retrained one: a new set
    key = hashlib.sha256(json.dumps([FORMAT, content, codec_sha256], sort_keys=True).encode()).hexdigest()[:16]
    return Path(os.environ.get("TRIMODAL_MDM_CACHE", Path.home() / ".cache" / "trimodal-mdm")) / key


def prepared(cfg: DataConfig, codec_sha256: str = "", progress: bool = True) -> Path:
    """The shard set of ``cfg``: its --data folder, prepared there if it is not yet; or the cache's, prepared into
    a private folder and renamed into place (two processes preparing the same cache never see half of one)."""
    if cfg.data:
        return prepare(cfg, cfg.data, codec_sha256, progress)
    folder = cache_dir(cfg, codec_sha256)
    if not (folder / "manifest.json").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        prepare(cfg, tmp, codec_sha256, progress)
        shutil.rmtree(tmp / "parts")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its copy first: keep that one
            if not (folder / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp)
    return folder
