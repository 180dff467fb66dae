"""Data: the embedded tri-modal world, your own files, and the rows the model trains on.

Turns text, images and audio into rows of global token ids over ``mdm.Vocab``, one batch per step for ``train.py``.
Tokenizers: ``bpe.py`` (text; ``python -m lab.tokenizers train-bpe`` retrains the default), ``fsq.py`` (images, audio).

1. The embedded default data, nothing downloaded: CPython's pydoc topics (text), scikit-learn's handwritten digits
   with caption templates (image-text), spoken digits synthesized with flite (audio-text, in ``assets/``).
2. Your own data: .txt/.jsonl text, image folders with captions.jsonl, audio folders with transcripts.
3. The sequence layout (``Layout``): a task token, then each segment as BOS_m ... EOS_m.
4. ``build_data`` (tokenize every split once) and ``BatchIterator`` (the rows of step k, a pure function of (seed, k)).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bpe import TextTokenizer, train_bpe
from fsq import ImageAutoencoder, MuLaw, PixelTokenizer, load_audio_codec, load_image_tokenizer
from mdm import TASKS, Vocab

ASSETS = Path(__file__).resolve().parent / "assets"


# --- 1. The embedded default data -----------------------------------------------------------------
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {d}",
    "a picture of the number {word}",
    "{word}",
    "an image of a {word}",
    "the number {d}, written by hand",
    "a scanned {word}",
    "digit {d}",
    "a small drawing of {word}",
    "handwritten {d}",
)


def digit_captions(d: int) -> list[str]:
    """Every caption of digit d; each names exactly one digit (word or numeral), so an i2t caption is judged by it."""
    return [t.format(word=DIGIT_WORDS[d], d=d) for t in CAPTION_TEMPLATES]


def digit_named_in(text: str) -> int | None:
    """The digit a caption or transcript names (as a word or a numeral), or None if not exactly one."""
    import regex

    tokens = regex.findall(r"\p{L}+|\p{N}+", text.lower())
    found = {DIGIT_WORDS.index(t) for t in tokens if t in DIGIT_WORDS}
    found |= {int(t) for t in tokens if t.isdigit() and len(t) == 1}
    return found.pop() if len(found) == 1 else None


def pydoc_corpus() -> list[str]:
    """CPython's bundled pydoc topics (~465k characters of English technical prose, PSF licence), present on every
    Python install; the exact text varies a little between Python versions."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def split_documents(docs: list[str], chunk_chars: int = 2000) -> list[str]:
    """Cut documents into chunks of about ``chunk_chars`` at blank lines (the unit of the text split)."""
    chunks = []
    for doc in docs:
        current = ""
        for para in doc.split("\n\n"):
            if current and len(current) + len(para) > chunk_chars:
                chunks.append(current)
                current = ""
            current += para + "\n\n"
        if current.strip():
            chunks.append(current)
    return chunks


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: images (1797, 8, 8) int64 in 0..16, labels (1797,), read
    from the CSV in the scikit-learn wheel like ``sklearn.datasets.load_digits``, without its slow import."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default image data are scikit-learn's digits: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # numpy decompresses .gz itself
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1]


def spoken_digits(path: Path = ASSETS / "spoken_digits.npz") -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The committed flite-synthesized spoken digits: float32 waveforms and their metadata. The npz (written by
    lab/make_spoken_digits.py) holds all clips as 8-bit mu-law codes in one array ``audio`` cut at ``offsets``, plus
    ``mu``, ``sample_rate`` and per clip ``transcripts``, ``labels``, ``voices``, ``rates``, ``pitches``, ``split``."""
    if not path.is_file():
        raise FileNotFoundError(f"no spoken-digit data at {path}: run `python -m lab.make_spoken_digits` (needs flite)")
    with np.load(path, allow_pickle=False) as z:
        meta = {k: z[k] for k in z.files if k not in ("audio", "offsets")}
        codes, offsets = z["audio"], z["offsets"]
    if int(meta["mu"]) != 255:
        raise ValueError(f"{path}: expected 8-bit mu-law (mu = 255), found mu = {int(meta['mu'])}")
    wave = MuLaw(8).decode(codes)
    return [wave[a:b] for a, b in itertools.pairwise(offsets)], meta


def split_indices(n: int, seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, np.ndarray]:
    """A fixed seeded split of range(n) into train / val / test (the rest)."""
    perm = np.random.default_rng(seed).permutation(n)
    a, b = np.cumsum([round(f * n) for f in fractions])
    return {"train": np.sort(perm[:a]), "val": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


def split_with_test(is_test: np.ndarray, seed: int = 0, val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """A given test set; val is a seeded ``val_fraction`` of the other examples, train the rest."""
    test, rest = np.flatnonzero(is_test), np.flatnonzero(~is_test)
    perm = np.random.default_rng(seed).permutation(rest)
    n_val = round(val_fraction * len(rest))
    return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val]), "test": test}


# --- 2. Your own data -----------------------------------------------------------------------------
class Skipped:
    """Counts and names unreadable inputs: skipped with one warning, or fatal with ``strict``."""

    def __init__(self, what: str, strict: bool) -> None:
        self.what, self.strict, self.items = what, strict, []

    def add(self, path: Path | str, reason: str) -> None:
        if self.strict:
            raise ValueError(f"{path}: {reason} (stopping because --strict is set)")
        self.items.append(f"{path}: {reason}")

    def report(self, found: list, nothing: str) -> None:
        """One warning naming the skipped inputs; the error ``nothing`` if ``found`` is empty."""
        if self.items:
            shown = "\n  ".join(self.items[:10]) + ("\n  ..." if len(self.items) > 10 else "")
            warnings.warn(f"skipped {len(self.items)} unreadable {self.what}:\n  {shown}", stacklevel=3)
        if not found:
            raise ValueError(nothing)


def read_text_files(paths: list[str | Path], strict: bool = False, require: bool = True) -> list[str]:
    """Documents from .txt files (one document per file) and .jsonl files (a "text" field per line);
    ``require``: finding no text at all is an error."""
    docs, skipped = [], Skipped("text inputs", strict)
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist")
        try:
            raw = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            skipped.add(p, f"not UTF-8 text ({e.reason} at byte {e.start})")
            continue
        if p.suffix == ".jsonl":
            docs += read_jsonl(p, raw, skipped)
        elif p.suffix != ".txt":
            raise ValueError(f"{p}: text datasets are .txt or .jsonl files")
        elif raw.strip():
            docs.append(raw)
        else:
            skipped.add(p, "empty file")
    skipped.report(docs if require else [None], f"no text found in {[str(p) for p in paths]}")
    return docs


def read_jsonl(path: Path, raw: str, skipped: Skipped, key: str = "") -> list:
    """The "text" strings of a jsonl's objects, one per line of ``raw`` (the contents of ``path``), blank ones left out;
    with a ``key``, (file named by ``key``, relative to the jsonl; stripped text) pairs, and a blank text reported."""
    out, shape = [], f'{{"{key}": file, "text": string}}' if key else '{"text": string}'
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rel, text = (obj[key] if key else ""), obj["text"]
            if not (isinstance(rel, str) and isinstance(text, str)):
                raise TypeError("a value is not a string")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            skipped.add(f"{path}:{n}", f"not a JSON object {shape} ({e})")
            continue
        if text.strip():
            out.append((path.parent / rel, text.strip()) if key else text)
        elif key:
            skipped.add(f"{path}:{n}", "empty caption")
    return out


def read_image_folder(folder: str | Path, strict: bool = False, mode: str = "L") -> tuple[list[np.ndarray], list[str]]:
    """Images (as PIL ``mode`` arrays) and captions from a folder holding images and a captions.jsonl."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    index = folder / "captions.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f'{folder} has no captions.jsonl (one {{"image": file, "text": caption}} per line)')
    skipped, images, captions = Skipped("images", strict), [], []
    for path, text in read_jsonl(index, index.read_text(encoding="utf-8"), skipped, "image"):
        try:
            images.append(read_picture(path, mode))
            captions.append(text)
        except OSError as e:  # a missing file, or PIL's UnidentifiedImageError (an OSError)
            skipped.add(path, f"unreadable image ({type(e).__name__}: {e})")
    skipped.report(images, f"no readable image-caption pairs in {folder}")
    return images, captions


def read_audio_folder(folder: str | Path, sample_rate: int, strict: bool = False) -> tuple[list[np.ndarray], list[str]]:
    """Clips (.wav/.flac, resampled to ``sample_rate``) and transcripts from a folder with a transcripts.jsonl
    ({"audio": file, "text": ...}) or, LibriSpeech style, ``*.trans.txt`` files of lines "<file stem> <transcript>"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"audio folder {folder} does not exist")
    skipped, index, clips, texts = Skipped("audio clips", strict), folder / "transcripts.jsonl", [], []
    pairs = read_jsonl(index, index.read_text(encoding="utf-8"), skipped, "audio") if index.is_file() else []
    for trans in sorted(folder.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            stem, _, text = line.partition(" ")
            found = [a for a in (trans.parent / f"{stem}{ext}" for ext in (".flac", ".wav")) if a.is_file()]
            if not text.strip():
                skipped.add(f"{trans}:{stem}", "empty transcript")
            elif not found:
                skipped.add(f"{trans}:{stem}", "no .flac or .wav file with that name")
            else:
                pairs.append((found[0], text.strip()))
    if not pairs:
        raise ValueError(f"{folder} has no transcripts.jsonl and no *.trans.txt files with transcripts")
    for path, text in pairs:
        try:
            clips.append(read_clip(path, sample_rate))
            texts.append(text)
        except (RuntimeError, OSError) as e:  # soundfile's errors are RuntimeErrors
            skipped.add(path, f"unreadable audio ({e})")
    skipped.report(clips, f"no readable audio-transcript pairs in {folder}")
    return clips, texts


def read_picture(path: str | Path, mode: str = "L") -> np.ndarray:
    """An image file as a PIL ``mode`` array ("L" gray, "RGB"); OSError if it cannot be read."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert(mode))


def read_clip(path: str | Path, sample_rate: int) -> np.ndarray:
    """An audio file (WAV, FLAC, OGG) as mono float32 at ``sample_rate``; RuntimeError or OSError if unreadable."""
    import soundfile as sf

    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    if not len(wave):
        raise OSError("no samples")
    return resample(wave.mean(axis=1), rate, sample_rate)


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling (scipy) from rate_in to rate_out Hz."""
    if rate_in == rate_out:
        return wave.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(rate_in, rate_out)
    return resample_poly(wave, rate_out // g, rate_in // g).astype(np.float32)


def speed_perturb(wave: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    """The clip ``factor`` times faster (duration / factor, every frequency x factor): its samples read as if recorded
    at factor x sample_rate, resampled to sample_rate. Speed perturbation (Ko et al., Interspeech 2015), the standard
    augmentation of speech recognition: each factor gives every training clip a new (speaking rate, pitch) condition."""
    if not 0.5 <= factor <= 2.0:
        raise ValueError(f"speed factors must lie in [0.5, 2.0], got {factor}")
    return resample(wave, round(sample_rate * factor), sample_rate)


# --- 3. The sequence layout -----------------------------------------------------------------------
MEDIA = {"image_text": "image", "audio_text": "audio"}  # the non-text modality of each pair task


@dataclass(frozen=True)
class Layout:
    """Where every token of every task sits in a row of ``seq_len`` (L*) ids.

    text rows:   TASK_text  [ BOS_text doc EOS_text BOS_text doc ... ]   a window of the packed stream
    image_text:  TASK_image_text  BOS_image img_1..img_M EOS_image  BOS_text caption EOS_text PAD_text ...
    audio_text:  TASK_audio_text  BOS_audio aud_1..aud_M EOS_audio  BOS_text transcript EOS_text PAD_text ...

    Images and clips have a fixed number of tokens (``image_len``, ``audio_len``), so every segment of a pair task
    sits at fixed positions and any subset of segments can condition the rest.

    Padding: inside a pair the PAD_text after EOS_text is *data*, masked and predicted like any token: the model
    learns how long a caption is, and captioning or speech recognition can generate text of any length up to the slot
    (``sample.py``'s rule: once EOS_text is revealed, the positions after it are PAD_text). Only the unfilled tail of a
    text row (a corpus shorter than one row) is padding in the sense of ``mdm``: never masked, not counted in N(x)."""

    vocab: Vocab
    seq_len: int
    image_len: int
    audio_len: int

    def __post_init__(self) -> None:
        for task in MEDIA:
            if self.text_capacity(task) < 1:
                need = f"{self.media_len(task)} {MEDIA[task]} tokens and their specials: raise --seq_len"
                raise ValueError(f"seq_len {self.seq_len} leaves no room for text in a {task} row of {need}")

    def media_len(self, task: str) -> int:
        if task not in MEDIA:
            raise ValueError(f"{task!r} is not a pair task; expected one of {tuple(MEDIA)}")
        return self.image_len if task == "image_text" else self.audio_len

    def media_slot(self, task: str) -> slice:
        """Positions of the image or audio tokens of a pair row (between BOS_m and EOS_m)."""
        return slice(2, 2 + self.media_len(task))

    def text_slot(self, task: str) -> slice:
        """Positions after BOS_text: the text tokens, then EOS_text, then PAD_text to the end."""
        start = 1 if task == "text" else self.media_len(task) + 4  # TASK BOS_m media EOS_m BOS_text
        return slice(start, self.seq_len)

    def text_capacity(self, task: str) -> int:
        """The most text tokens a row of this task can hold (a pair keeps one slot for EOS_text)."""
        return self.seq_len - self.text_slot(task).start - (0 if task == "text" else 1)

    def pair_row(self, task: str, media: Tensor, text: Tensor) -> Tensor:
        """(L,) global ids of one pair from local media ids (M,) and local text ids (n,)."""
        v, n, m = self.vocab, self.media_len(task), MEDIA[task]
        if media.shape != (n,):
            raise ValueError(f"a {task} row needs {n} {m} tokens, got {tuple(media.shape)}")
        if len(text) > (cap := self.text_capacity(task)):
            raise ValueError(f"text of {len(text)} tokens does not fit a {task} row (at most {cap}); raise seq_len")
        row = torch.full((self.seq_len,), v.pad, dtype=torch.long)
        row[0], row[1] = v.task(task), v.bos(m)
        row[self.media_slot(task)] = v.to_global(media, m)
        s = self.text_slot(task).start
        row[s - 2], row[s - 1], row[s + len(text)] = v.eos(m), v.bos("text"), v.eos("text")
        row[s : s + len(text)] = v.to_global(text, "text")
        return row

    def text_stream(self, docs: list[list[int]]) -> Tensor:
        """The packed text stream: BOS_text doc EOS_text for every document, as global ids."""
        v = self.vocab
        bos, eos = torch.tensor([v.bos("text")]), torch.tensor([v.eos("text")])
        parts = [t for ids in docs for t in (bos, v.to_global(torch.tensor(ids, dtype=torch.long), "text"), eos)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def text_row(self, stream: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """(ids, pad) of the text row whose window starts at ``offset`` of the packed stream."""
        window = stream[offset : offset + self.seq_len - 1]
        row = torch.full((self.seq_len,), self.vocab.pad, dtype=torch.long)
        row[0] = self.vocab.task("text")
        row[1 : 1 + len(window)] = window
        return row, torch.arange(self.seq_len) >= 1 + len(window)

    def to_dict(self) -> dict:
        return {"vocab": self.vocab.to_dict(), **{k: getattr(self, k) for k in ("seq_len", "image_len", "audio_len")}}

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(Vocab.from_dict(d["vocab"]), int(d["seq_len"]), int(d["image_len"]), int(d["audio_len"]))


def decode_text_ids(ids: Tensor, vocab: Vocab, tokenizer: TextTokenizer, stop_at_eos: bool = True) -> str:
    """Text tokens of a generated segment -> str: stops at EOS_text, skips other specials."""
    start, gids = vocab.block_start("text"), ids.tolist()
    if stop_at_eos and vocab.eos("text") in gids:
        gids = gids[: gids.index(vocab.eos("text"))]
    return tokenizer.decode([g - start for g in gids if start <= g < start + vocab.text])


# --- 4. Building the data, and the batches of every step ------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """What data to build. The defaults are the embedded tri-modal world at the tiny model's sizes."""

    seq_len: int = 48  # L*: every row has this many tokens
    text_vocab: int = 1024  # size of the default BPE (committed rank files exist for 1024 and 4096)
    text_tokenizer: str = "default"  # "default", a .tiktoken rank file, or "tiktoken:<name>" (e.g. r50k_base)
    default_text: bool = True  # include CPython's pydoc topics in the text task
    text_files: tuple[str, ...] = ()  # your .txt / .jsonl documents, added to the text task
    image_dir: str = ""  # a folder with images and captions.jsonl, instead of the digits
    audio_dir: str = ""  # a folder with clips and transcripts, instead of the spoken digits
    audio_codec: str = str(ASSETS / "audio_codec.pt")  # the audio tokenizer (fsq.AudioCodec checkpoint)
    image_levels: int = 4  # image tokens: gray levels per pixel (17 = the digits' own, lossless)
    image_patch: int = 2  # image tokens: pixels per token side (1 = one token per pixel)
    image_tokenizer: str = ""  # a trained fsq.ImageAutoencoder instead of gray-level patches (lab.tokenizers)
    audio_speeds: tuple[float, ...] = (0.8, 0.9, 1.1, 1.2)  # speeds of extra training clips (recognition only)
    strict: bool = False  # stop at the first unreadable input instead of skipping it
    split_seed: int = 0  # the seed of the train / val / test splits
    data: str = ""  # a shard set folder (shards.py), prepared there from these options if it is not yet; "" = cache
    prepare_workers: int = 2  # processes that tokenize the text sources in parallel while preparing shards

    @classmethod
    def from_dict(cls, record: dict) -> DataConfig:
        """The config a checkpoint, an export or a shard set's manifest recorded (JSON stores tuples as lists)."""
        kinds = {f.name: f.type for f in fields(cls)}
        return cls(**{k: tuple(v) if kinds[k].startswith("tuple") else v for k, v in record.items()})


@dataclass
class PairData:
    """One split of a pair task: media tokens (N, M) local ids, candidate captions, labels."""

    media: Tensor  # (N, M) local ids of the image / audio tokenizer
    captions: list[list[list[int]]]  # per example, one or more tokenized captions (local text ids)
    labels: Tensor  # (N,) digit label where known, else -1
    raw: list[np.ndarray] | None = None  # the original images / clips (for judges)
    variants: Tensor | None = None  # (N, K, M) media ids of K augmented copies (speed-perturbed clips)

    def __len__(self) -> int:
        return self.media.shape[0]


@dataclass
class TriModalData:
    """Everything train/sample/evaluate need: tokenizers, layout and the three tasks' splits."""

    layout: Layout
    text_tokenizer: TextTokenizer
    image_tokenizer: PixelTokenizer | ImageAutoencoder
    audio_codec: object  # fsq.AudioCodec
    text: dict[str, Tensor]  # split -> packed global-id stream
    pairs: dict[str, dict[str, PairData]]  # task -> split -> PairData
    config: DataConfig | None = None  # what it was built from

    @property
    def vocab(self) -> Vocab:
        return self.layout.vocab

    def code_vectors(self) -> dict[str, np.ndarray]:
        """Per media modality, what each of its tokens stands for (``model.embed_codes``)."""
        return {"image": self.image_tokenizer.code_vectors(), "audio": self.audio_codec.code_vectors()}


def default_bpe_corpus(seed: int = 0) -> str:
    """What the default BPE is trained on: the text train split, one caption per training image,
    and the spoken-digit transcripts (so the pair tasks' words tokenize compactly)."""
    chunks = split_documents(pydoc_corpus())
    text = "".join(chunks[i] for i in split_indices(len(chunks), seed)["train"])
    _, labels = digits_images()
    rng, train = np.random.default_rng(seed), split_indices(len(labels), seed)["train"]
    captions = [digit_captions(int(labels[i]))[rng.integers(len(CAPTION_TEMPLATES))] for i in train]
    return text + "\n".join(captions) + "\n" + " ".join(DIGIT_WORDS) + "\n"


def load_text_tokenizer(cfg: DataConfig) -> TextTokenizer:
    if cfg.text_tokenizer.startswith("tiktoken:"):
        return TextTokenizer.from_tiktoken_name(cfg.text_tokenizer.split(":", 1)[1])
    if cfg.text_tokenizer != "default":
        return TextTokenizer.load(cfg.text_tokenizer)
    if (path := ASSETS / f"text_bpe_{cfg.text_vocab}.tiktoken").is_file():
        return TextTokenizer.load(path)
    return TextTokenizer(train_bpe(default_bpe_corpus(cfg.split_seed), cfg.text_vocab))


def tokenize_captions(tok: TextTokenizer, captions: list[str], limit: int, source: str) -> list[list[int]]:
    out = [tok.encode(c) for c in captions]
    for c, ids in zip(captions, out, strict=True):
        if len(ids) > limit:
            raise ValueError(f"{source}: the caption {c[:60]!r} is {len(ids)} tokens; a row holds at most {limit}")
    return out


def encode_all(tokenizer, items: list[np.ndarray]) -> Tensor:
    """Clips or images -> (N, M) long ids of their tokenizer, 64 at a time (bounded memory)."""
    chunks = [tokenizer.encode_batch(items[i : i + 64]) for i in range(0, len(items), 64)]
    return torch.from_numpy(np.concatenate(chunks)).long()


def pair_splits(media: Tensor, captions: list, labels: np.ndarray, raw: list, split: dict) -> dict[str, PairData]:
    """The examples of a pair task, cut into the splits (split name -> example indices)."""
    labels, ix = torch.as_tensor(labels), {s: torch.from_numpy(i) for s, i in split.items()}
    return {s: PairData(media[i], [captions[j] for j in i], labels[i], [raw[j] for j in i]) for s, i in ix.items()}


def load_image_tokens(cfg: DataConfig, sha256: str = "") -> PixelTokenizer | ImageAutoencoder:
    """The image tokenizer a DataConfig names (``sha256``: its recorded hash, checked if given)."""
    if cfg.image_tokenizer:
        return load_image_tokenizer(cfg.image_tokenizer, sha256)
    return PixelTokenizer(cfg.image_levels, cfg.image_patch)


def tokenizers(cfg: DataConfig, codec_sha256: str = "") -> tuple[TextTokenizer, object, object, Layout]:
    """The text, image and audio tokenizers a DataConfig names, and the layout of their rows."""
    tok = load_text_tokenizer(cfg)
    pixels, codec = load_image_tokens(cfg), load_audio_codec(cfg.audio_codec, codec_sha256)
    vocab = Vocab(text=tok.vocab_size, audio=codec.vocab_size, image=pixels.vocab_size)
    return tok, pixels, codec, Layout(vocab, cfg.seq_len, pixels.tokens_per_image, codec.tokens_per_clip)


def build_data(cfg: DataConfig = DataConfig(), codec_sha256: str = "") -> TriModalData:
    """Tokenize every split of every task once, in memory; ``codec_sha256`` is the audio codec's hash the caller
    vouches for. ``shards.py`` writes the same arrays to disk once and trains from them."""
    tok, pixels, codec, layout = tokenizers(cfg, codec_sha256)
    docs = pydoc_corpus() if cfg.default_text else []  # text: chunks of documents, split, packed into one stream each
    docs += read_text_files(list(cfg.text_files), cfg.strict) if cfg.text_files else []
    if not docs:
        raise ValueError("no text: keep the default corpus or pass text files")
    chunks = split_documents(docs)
    idx = split_indices(len(chunks), cfg.split_seed)
    text = {s: layout.text_stream([tok.encode(chunks[i]) for i in idx[s]]) for s in idx}
    return TriModalData(layout, tok, pixels, codec, text, build_pairs(cfg, tok, pixels, codec, layout), cfg)


def build_pairs(cfg: DataConfig, tok: TextTokenizer, pixels, codec, layout: Layout) -> dict[str, dict[str, PairData]]:
    """The two pair tasks, every split tokenized: task -> split -> PairData."""
    if not cfg.image_dir:  # image-text: the digits with every caption template, or a user folder
        images, labels = digits_images()  # 8x8 gray levels 0..16: the pixel tokenizer's input; else pictures
        images = images if isinstance(pixels, PixelTokenizer) else [pixels.from_picture(x * 255 // 16) for x in images]
        captions = [digit_captions(int(y)) for y in labels]
    else:
        raw, texts = read_image_folder(cfg.image_dir, cfg.strict, pixels.mode)
        images = np.stack([pixels.from_picture(im) for im in raw])
        labels = np.array([-1 if (d := digit_named_in(t)) is None else d for t in texts])
        captions = [[t] for t in texts]
    limit = layout.text_capacity("image_text")
    image_caps = [tokenize_captions(tok, c, limit, cfg.image_dir or "digit captions") for c in captions]
    image_media = encode_all(pixels, list(images))
    image_pairs = pair_splits(image_media, image_caps, labels, list(images), split_indices(len(images), cfg.split_seed))

    if not cfg.audio_dir:  # audio-text: the committed spoken digits, or a user folder
        waves, meta = spoken_digits()
        clips = [resample(w, int(meta["sample_rate"]), codec.sample_rate) for w in waves]
        transcripts = [str(t) for t in meta["transcripts"]]
        # the file's own test split holds unseen (rate, pitch) conditions of the voices; val comes from the rest
        audio_split = split_with_test(meta["split"] == "test", cfg.split_seed)
    else:
        clips, transcripts = read_audio_folder(cfg.audio_dir, codec.sample_rate, cfg.strict)
        audio_split = split_indices(len(clips), cfg.split_seed)
    audio_labels = np.array([-1 if (d := digit_named_in(t)) is None else d for t in transcripts])
    limit = layout.text_capacity("audio_text")
    audio_caps = [tokenize_captions(tok, [t], limit, cfg.audio_dir or "spoken digits") for t in transcripts]
    audio_pairs = pair_splits(encode_all(codec, clips), audio_caps, audio_labels, clips, audio_split)
    train = audio_pairs["train"]  # only the training clips get speed-perturbed copies
    if cfg.audio_speeds and len(train):
        copies = [[speed_perturb(w, f, codec.sample_rate) for w in train.raw] for f in cfg.audio_speeds]
        train.variants = torch.stack([encode_all(codec, c) for c in copies], 1)  # (N, K, M)
    return {"image_text": image_pairs, "audio_text": audio_pairs}


def token_ids(x) -> Tensor:
    """Token ids as int64, from a tensor or a (read-only) numpy array of any integer type."""
    if isinstance(x, Tensor):
        return x.long()
    return torch.from_numpy(np.array(x, dtype=np.int64))  # a copy: a memmap's pages stay read-only


def caption_count(captions, i: int) -> int:
    """How many captions example i has, without reading them (``shards.Captions``) or from the lists in memory."""
    return captions.count_of(i) if hasattr(captions, "count_of") else len(captions[i])


@dataclass
class Batch:
    """A batch of B rows of L tokens; the roles of the rows are drawn by ``BatchIterator``."""

    ids: Tensor  # (B, L) global ids
    pad: Tensor  # (B, L) bool: padding in the sense of mdm (never masked)
    task: Tensor  # (B,) index into TASKS
    given: Tensor  # (B, L) bool: the segment a conditional pair row shows clean
    hidden: Tensor  # (B, L) bool: the segment an unconditional pair row hides


class BatchIterator:
    """Seeded, resumable batches: the tasks mixed by ratio, and each pair row's role.

    The batch of step k is a pure function of (seed, k): a generator seeded with both draws the rows per task
    (``counts``), then per row a text window or a pair example, caption and role. Resuming needs only the step counter
    (``state_dict``); every process builds the same batch and keeps its own rows, exactly those of a one-process run.

    Roles of a pair row, independently: with probability ``cond_keep`` *conditional*, one segment given clean, the
    media with probability ``cond_media`` (captioning, speech recognition) and otherwise the text (text-to-image,
    text-to-speech); with probability ``cond_drop`` *unconditional*, one segment hidden, either with probability 1/2
    (the branch that classifier-free guidance contrasts with); otherwise *joint*, both segments under the forward
    process. The segments are ``Layout.media_slot`` and ``Layout.text_slot`` (all after BOS_text: caption, EOS_text,
    PAD_text, so a hidden caption does not reveal its length either), exactly those the samplers condition on and mask
    for guidance. A row given a clip with speed-perturbed copies (``PairData.variants``) hears the original or one of
    its K copies, each with probability 1/(K + 1); rows that must generate audio hear only real clips."""

    def __init__(
        self,
        data: TriModalData,
        split: str,
        batch_size: int,
        ratios: dict[str, float],
        seed: int = 0,
        cond_keep: float = 0.0,
        cond_drop: float = 0.0,
        cond_media: float = 0.5,
    ) -> None:
        if unknown := set(ratios) - set(TASKS):
            raise ValueError(f"unknown tasks in the mixing ratios: {sorted(unknown)}; tasks are {TASKS}")
        total = sum(ratios.values())
        if total <= 0 or any(r < 0 for r in ratios.values()):
            raise ValueError(f"mixing ratios must be non-negative with a positive sum, got {ratios}")
        self.roles = (cond_keep, cond_drop, cond_media)
        if not (0 <= cond_keep and 0 <= cond_drop and cond_keep + cond_drop <= 1 and 0 <= cond_media <= 1):
            raise ValueError(f"cond_keep, cond_drop, cond_media {self.roles} must be probabilities, keep + drop <= 1")
        self.data, self.split, self.batch_size, self.seed = data, split, batch_size, seed
        self.ratios = {t: ratios.get(t, 0.0) / total for t in TASKS}
        for task in TASKS:
            if self.ratios[task] > 0 and len(data.text[split] if task == "text" else data.pairs[task][split]) == 0:
                raise ValueError(f"the {task} {split} split is empty")
        self.step = 0

    def counts(self, g: torch.Generator) -> list[int]:
        """Rows per task: floor(ratio * B) each, the remaining rows drawn in proportion to the ratios."""
        r = torch.tensor([self.ratios[t] for t in TASKS], dtype=torch.float64)
        base = torch.floor(r * self.batch_size).long()
        if rest := self.batch_size - int(base.sum()):
            base += torch.bincount(torch.multinomial(r, rest, replacement=True, generator=g), minlength=len(TASKS))
        return base.tolist()

    def batch(self, step: int, own: slice = slice(None)) -> Batch:
        """The B rows of step ``step``; only the rows ``own`` (this process's, ``train.own_sequences``) are read.

        Every draw comes first and depends on no token (only on lengths and counts), so each process draws the
        whole batch and reads only its own rows; the others are placeholders (``placeholder``) with the task, pad,
        given and hidden of the real row, on which the forward process draws the very same masks."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        tasks = [k for k, n in enumerate(self.counts(g)) for _ in range(n)]
        plans = [self.draw(TASKS[k], g) for k in tasks]
        order = torch.randperm(self.batch_size, generator=g).tolist()
        mine = set(range(self.batch_size)[own])
        rows = [self.read(TASKS[tasks[j]], plans[j], p in mine) for p, j in enumerate(order)]
        ids, pad, given, hidden = (torch.stack(column) for column in zip(*rows, strict=True))
        return Batch(ids, pad, torch.tensor(tasks)[order], given, hidden)

    def draw(self, task: str, g: torch.Generator) -> tuple:
        """The random choices of one row of ``task``: (text offset,), or (example, caption, given, hidden, copy)."""
        layout, L = self.data.layout, self.data.layout.seq_len
        if task == "text":
            return (int(torch.randint(max(1, len(self.data.text[self.split]) - (L - 1) + 1), (), generator=g)),)
        given, hidden = torch.zeros(L, dtype=torch.bool), torch.zeros(L, dtype=torch.bool)
        pairs, (keep, drop, media_share) = self.data.pairs[task][self.split], self.roles
        i = int(torch.randint(len(pairs), (), generator=g))
        caption = int(torch.randint(caption_count(pairs.captions, i), (), generator=g))
        role, u, pick = *torch.rand(2, generator=g, dtype=torch.float64).tolist(), 0
        if role < keep + drop:
            conditional = role < keep
            show_media = u < (media_share if conditional else 0.5)
            segment = layout.media_slot(task) if show_media else layout.text_slot(task)
            (given if conditional else hidden)[segment] = True
            if conditional and show_media and pairs.variants is not None:
                pick = int(torch.randint(pairs.variants.shape[1] + 1, (), generator=g))
        return i, caption, given, hidden, pick

    def read(self, task: str, plan: tuple, read: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ids, pad, given, hidden) of the row ``plan`` drew; without ``read``, its placeholder: the task token, then
        PAD ids, with the row's own pad, given and hidden (all the forward process looks at besides the ids)."""
        L = self.data.layout.seq_len
        if task == "text":
            stream, offset = self.data.text[self.split], plan[0]
            n = min(L - 1, len(stream) - offset)
            window = token_ids(stream[offset : offset + n]) if read else torch.full((n,), self.data.vocab.pad)
            no = torch.zeros(L, dtype=torch.bool)
            return (*self.data.layout.text_row(window, 0), no, no)
        i, caption, given, hidden = plan[:4]
        if not read:
            row = torch.full((L,), self.data.vocab.pad, dtype=torch.long)
            row[0] = self.data.vocab.task(task)
            return row, torch.zeros(L, dtype=torch.bool), given, hidden
        pairs, pick = self.data.pairs[task][self.split], plan[4]
        media = token_ids(pairs.variants[i, pick - 1] if pick else pairs.media[i])
        text = pairs.captions.caption(i, caption) if hasattr(pairs.captions, "caption") else pairs.captions[i][caption]
        row = self.data.layout.pair_row(task, media, torch.tensor(text, dtype=torch.long))
        return row, torch.zeros(L, dtype=torch.bool), given, hidden

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        b = self.batch(self.step)
        self.step += 1
        return b

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "split": self.split, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        saved, ours = (state["seed"], state["split"], state["batch_size"]), (self.seed, self.split, self.batch_size)
        if saved != ours:
            raise ValueError(f"data iterator state is for (seed, split, batch size) {saved}; this run uses {ours}")
        self.step = int(state["step"])
