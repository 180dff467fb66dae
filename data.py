"""Data: tokenizers, the embedded tri-modal default dataset, user datasets and the sequence layout.

Everything here turns real text, images and audio into rows of global token ids over ``mdm.Vocab``
that ``train.py`` feeds to the forward process, and turns generated ids back into text, images and
audio for ``sample.py`` and ``evaluate.py``. Nothing is downloaded: the default data ships with
Python itself (text), with scikit-learn (images) and with this repository (speech, ``assets/``).

Sections, in the order a reader needs them:

1. Tokenizers: a byte-level BPE trained here and used through ``tiktoken`` (text); gray-level
   patches as tokens (8x8 digits: 2x2 patches of 4 levels, or lossless pixels); 8-bit mu-law (an
   exact audio reference). The learned FSQ image
   autoencoder and audio codec live in ``fsq.py``; the default audio path uses its committed codec.
2. The embedded default data: CPython's pydoc topics (text), scikit-learn's handwritten digits with
   caption templates (image-text), spoken digits synthesized with flite (audio-text).
3. User datasets: .txt/.jsonl text, image folders with captions.jsonl, audio folders with transcripts.
4. The sequence layout: a task token, then each segment as BOS_m ... EOS_m; text-only rows packed to
   L*; pairs right-padded with PAD_text to L*.
5. A seeded, resumable batch iterator with per-task mixing ratios that DDP ranks slice.

Run ``python data.py --help`` for the commands (train the BPE, show decoded examples).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import itertools
import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mdm import TASKS, Vocab

ASSETS = Path(__file__).resolve().parent / "assets"

# ----------------------------------------------------------------------------------------------
# 1. Tokenizers
# ----------------------------------------------------------------------------------------------

# The GPT-4 (cl100k) pre-tokenization pattern: contractions, words with one leading non-letter,
# numbers of up to 3 digits, punctuation runs, and whitespace. BPE merges never cross these pieces.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def train_bpe(text: str, vocab_size: int, pattern: str = GPT4_PATTERN) -> dict[bytes, int]:
    """Learn byte-level BPE merge ranks: {token bytes: rank}, the 256 single bytes first.

    The incremental algorithm (seconds for a megabyte, where recounting every pair after every merge
    takes tens of minutes):
    1. split the text with ``pattern`` and count each *unique* piece once (a word list with counts);
    2. keep, for every adjacent pair of tokens, its total count and the set of words containing it;
    3. repeat: pop the most frequent pair from a max-heap (stale entries are skipped lazily), give the
       merged bytes the next rank, and update counts only in the words that contain that pair.
    Ties go to the lexicographically smallest pair of ranks, so training is deterministic.
    """
    import regex

    if vocab_size < 256:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 256, got {vocab_size}")
    if not pattern:
        raise ValueError("an empty pre-tokenization pattern would crash tiktoken; pass a real regex")
    pieces = Counter(regex.findall(pattern, text))
    words = [list(p.encode("utf-8")) for p in pieces]
    counts = list(pieces.values())
    token_bytes = [bytes([i]) for i in range(256)]
    pair_count: Counter[tuple[int, int]] = Counter()
    pair_words: dict[tuple[int, int], set[int]] = {}
    for w, (word, n) in enumerate(zip(words, counts, strict=True)):
        for pair in itertools.pairwise(word):
            pair_count[pair] += n
            pair_words.setdefault(pair, set()).add(w)
    heap = [(-n, pair) for pair, n in pair_count.items()]
    heapq.heapify(heap)
    known = set(token_bytes)
    while len(token_bytes) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or -neg <= 0:
            continue  # stale heap entry: the count changed since it was pushed
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in known:  # the same bytes reached by another merge order: no new token
            del pair_count[pair]
            continue
        new_id = len(token_bytes)
        token_bytes.append(merged)
        known.add(merged)
        changed: Counter[tuple[int, int]] = Counter()
        for w in pair_words.pop(pair, ()):
            word, n = words[w], counts[w]
            for old in itertools.pairwise(word):
                changed[old] -= n
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out
            for new in itertools.pairwise(out):
                changed[new] += n
                pair_words.setdefault(new, set()).add(w)
        for p, delta in changed.items():
            if delta:
                pair_count[p] += delta
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
        pair_count.pop(pair, None)
    return {b: i for i, b in enumerate(token_bytes)}


class TextTokenizer:
    """Byte-level BPE through ``tiktoken.Encoding``: encode, decode, vocab_size, save/load.

    Saved in tiktoken's own file format (one ``base64(token) rank`` line per token) plus a sha256 of
    that file, which ``load`` checks. We parse the file ourselves: ``tiktoken.load.load_tiktoken_bpe``
    caches local files by path and can return a stale copy after the file is rewritten.
    """

    def __init__(self, ranks: dict[bytes, int], pattern: str = GPT4_PATTERN, name: str = "trimodal-bpe") -> None:
        import tiktoken

        if not pattern:
            raise ValueError("an empty pre-tokenization pattern crashes tiktoken; pass a real regex")
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("BPE ranks must be exactly 0 .. n-1")
        self.ranks, self.pattern = ranks, pattern
        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})

    @property
    def vocab_size(self) -> int:
        return len(self.ranks)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def to_text(self) -> str:
        """The ranks in tiktoken's file format: one ``base64(token) rank`` line per token."""
        ordered = sorted(self.ranks.items(), key=lambda kv: kv[1])
        return "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ordered)

    @classmethod
    def from_text(cls, text: str, source: str = "<text>") -> TextTokenizer:
        ranks = {}
        for n, line in enumerate(text.splitlines(), 1):
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{source}:{n}: not a tiktoken rank line ({e})") from None
        return cls(ranks)

    def save(self, path: str | Path) -> str:
        """Write ``path`` (tiktoken format) and ``path.sha256``; return the sha256."""
        blob = self.to_text().encode()
        digest = hashlib.sha256(blob).hexdigest()
        Path(path).write_bytes(blob)
        Path(f"{path}.sha256").write_text(f"{digest}\n")
        return digest

    @classmethod
    def load(cls, path: str | Path, expected_sha256: str | None = None) -> TextTokenizer:
        """Read a tiktoken-format rank file, checking its sha256 (given, or from ``path.sha256``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no BPE rank file at {path}; train one with `python data.py train-bpe`")
        blob = path.read_bytes()
        sha_file = Path(f"{path}.sha256")
        expected = expected_sha256 or (sha_file.read_text().strip() if sha_file.is_file() else None)
        digest = hashlib.sha256(blob).hexdigest()
        if expected is not None and digest != expected:
            raise ValueError(
                f"{path}: sha256 {digest} does not match the expected {expected}; the file is corrupt or stale"
            )
        try:
            text = blob.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a tiktoken rank file (not ASCII)") from None
        return cls.from_text(text, str(path))

    @classmethod
    def from_tiktoken_name(cls, name: str) -> TextTokenizer:
        """A standard tiktoken encoding (e.g. 'r50k_base', 'cl100k_base') for large configs.

        tiktoken fetches these rank files on first use; offline it only finds them in its cache.
        """
        import tiktoken

        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken raises requests/urllib errors offline
            raise RuntimeError(
                f"cannot load the tiktoken encoding {name!r} offline ({type(e).__name__}). Seed its cache: set "
                "TIKTOKEN_CACHE_DIR to a folder and copy the encoding's rank file there under the name "
                "sha1(<its URL in tiktoken_ext/openai_public.py>).hexdigest() (for r50k_base the file is "
                "whisper/assets/gpt2.tiktoken in the openai-whisper sdist), or pass a local .tiktoken file instead."
            ) from e
        tok = cls.__new__(cls)
        tok.ranks, tok.pattern, tok.encoding = enc._mergeable_ranks, enc._pat_str, enc
        return tok


class PixelTokenizer:
    """Gray-level patches as tokens: small grayscale images without any training.

    An image of side x side pixels with integer gray levels 0 .. in_levels-1 is quantized to
    ``levels`` gray levels, q = round(x (levels-1)/(in_levels-1)), and cut into (side/patch)^2
    patches of patch x patch pixels; a patch is one token, its levels read as a number in base
    ``levels`` (row-major): id = sum_j q_j levels^j. Vocabulary: levels^(patch^2) ids.

    * ``PixelTokenizer(levels=17, patch=1)``: one token per pixel, lossless for the 8x8 digits
      (64 tokens of 17 gray levels).
    * The default ``PixelTokenizer(levels=4, patch=2)``: 16 tokens of 256 values per digit; four
      gray levels keep the digit judge's accuracy (0.983 on the test digits, against 0.994 at 17
      levels), and four times fewer image tokens make every image-text row shorter and each token
      more telling, which is what lets the tiny model learn the image-text tasks on a laptop CPU.
    """

    def __init__(self, levels: int = 4, patch: int = 2, side: int = 8, in_levels: int = 17) -> None:
        if side % patch:
            raise ValueError(f"the patch size {patch} must divide the image side {side}")
        if not 2 <= levels <= in_levels:
            raise ValueError(f"levels must lie in [2, {in_levels}], got {levels}")
        self.levels, self.patch, self.side, self.in_levels = levels, patch, side, in_levels

    @property
    def vocab_size(self) -> int:
        return self.levels ** (self.patch * self.patch)

    @property
    def tokens_per_image(self) -> int:
        return (self.side // self.patch) ** 2

    def _patches(self, a: np.ndarray) -> np.ndarray:
        """(side, side) -> (n_patches, patch * patch), patches and their pixels in row-major order."""
        n, p = self.side // self.patch, self.patch
        return a.reshape(n, p, n, p).transpose(0, 2, 1, 3).reshape(n * n, p * p)

    def _image(self, patches: np.ndarray) -> np.ndarray:
        n, p = self.side // self.patch, self.patch
        return patches.reshape(n, n, p, p).transpose(0, 2, 1, 3).reshape(self.side, self.side)

    def encode(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.shape != (self.side, self.side):
            raise ValueError(f"expected a {self.side}x{self.side} image, got shape {image.shape}")
        if image.min() < 0 or image.max() > self.in_levels - 1 or not np.allclose(image, np.rint(image)):
            raise ValueError(f"pixel values must be integers in [0, {self.in_levels}); quantize first (to_gray_levels)")
        q = np.rint(np.rint(image) * (self.levels - 1) / (self.in_levels - 1)).astype(np.int64)
        powers = self.levels ** np.arange(self.patch * self.patch)
        return self._patches(q) @ powers

    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids).astype(np.int64)
        if ids.shape != (self.tokens_per_image,):
            raise ValueError(f"expected {self.tokens_per_image} image tokens, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"image token ids must lie in [0, {self.vocab_size})")
        digits = self._levels(ids)
        return np.rint(self._image(digits) * (self.in_levels - 1) / (self.levels - 1)).astype(np.int64)

    def _levels(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids -> (n, patch * patch) the gray level of each pixel of each patch (the base-levels digits)."""
        return (ids[:, None] // self.levels ** np.arange(self.patch * self.patch)) % self.levels

    def code_vectors(self) -> np.ndarray:
        """(vocab_size, patch * patch): what each token stands for, its pixels' gray levels (``mdm.embed_codes``)."""
        return self._levels(np.arange(self.vocab_size)).astype(np.float32)

    def to_gray_levels(self, image: np.ndarray) -> np.ndarray:
        """Any grayscale/colour image array (H, W[, C]) with values in [0, 255] -> side x side levels.

        Resized by area averaging (PIL) to ``in_levels`` gray levels, bright = ink as in the digits
        data (so dark-on-light images are inverted when their mean is bright).
        """
        from PIL import Image

        img = Image.fromarray(np.asarray(image).astype(np.uint8)).convert("L").resize((self.side, self.side), Image.BOX)
        a = np.asarray(img, dtype=np.float64) / 255.0
        if a.mean() > 0.5:
            a = 1.0 - a
        return np.rint(a * (self.in_levels - 1)).astype(np.int64)

    def to_dict(self) -> dict:
        return {"levels": self.levels, "patch": self.patch, "side": self.side, "in_levels": self.in_levels}


class MuLaw:
    """8-bit mu-law companding: the exact, training-free audio tokenizer (256 tokens per sample).

        y = sign(x) ln(1 + mu |x|) / ln(1 + mu),   token = round((y + 1)/2 (2^bits - 1))

    Decoding inverts both steps; the error is at most half a quantization step in y, i.e.
    |dx| <= (1/(2^bits - 1)) ln(1 + mu) (1 + mu |x|) / mu to first order. Too long for the tiny model
    (8000 tokens per second at 8 kHz) but an exact reference for tests and for large models.
    """

    def __init__(self, bits: int = 8) -> None:
        self.levels = 2**bits
        self.mu = float(self.levels - 1)

    @property
    def vocab_size(self) -> int:
        return self.levels

    def encode(self, wave: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(wave, dtype=np.float64), -1.0, 1.0)
        y = np.sign(x) * np.log1p(self.mu * np.abs(x)) / np.log1p(self.mu)
        return np.rint((y + 1) * ((self.levels - 1) / 2)).astype(np.int64)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.levels):
            raise ValueError(f"mu-law ids must lie in [0, {self.levels})")
        y = ids.astype(np.float64) / (self.levels - 1) * 2 - 1
        return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(self.mu)) / self.mu).astype(np.float32)

    def error_bound(self, wave: np.ndarray) -> np.ndarray:
        """Per-sample bound on |decode(encode(x)) - x| (first order plus a float margin)."""
        x = np.abs(np.clip(np.asarray(wave, dtype=np.float64), -1, 1))
        step = 1.0 / (self.levels - 1)  # half of the step 2/(levels-1) in y
        return step * np.log1p(self.mu) * (1 + self.mu * x) / self.mu * np.exp(step * np.log1p(self.mu)) + 1e-6


# ----------------------------------------------------------------------------------------------
# 2. The embedded default data
# ----------------------------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Captions of the digit images: varied wording, the digit as a word or a numeral. Every caption
# names exactly one digit, so a caption generated by i2t is judged by the digit it names.
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
    """Every caption of digit d."""
    return [t.format(word=DIGIT_WORDS[d], d=d) for t in CAPTION_TEMPLATES]


def digit_named_in(text: str) -> int | None:
    """The digit a caption or transcript names (as a word or a numeral), or None if not exactly one."""
    import regex

    found = set()
    for tok in regex.findall(r"\p{L}+|\p{N}+", text.lower()):
        if tok in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(tok))
        elif tok.isdigit() and len(tok) == 1:
            found.add(int(tok))
    return found.pop() if len(found) == 1 else None


def pydoc_corpus() -> list[str]:
    """CPython's bundled pydoc topics (~465k characters of English technical prose, PSF licence).

    Present on every Python install; its exact text varies a little between Python versions.
    """
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
    """scikit-learn's handwritten digits: images (1797, 8, 8) int64 in 0..16, labels (1797,).

    Read straight from the CSV inside the scikit-learn wheel, as ``sklearn.datasets.load_digits``
    does, without importing scikit-learn (2 s of imports on a laptop).
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default image data are scikit-learn's digits: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1]


def spoken_digits(path: Path = ASSETS / "spoken_digits.npz") -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The committed flite-synthesized spoken digits: float32 waveforms and their metadata.

    The npz (written by assets/make_spoken_digits.py) stores every clip as 8-bit mu-law codes in one
    array ``audio`` cut at ``offsets``, with ``sample_rate``, ``transcripts``, ``labels``, ``voices``,
    ``rates`` and ``pitches`` per clip. Decoding is ``MuLaw.decode``.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"no spoken-digit data at {path}; regenerate it with `python assets/make_spoken_digits.py` "
            "(needs the Debian package flite)"
        )
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
    a = round(fractions[0] * n)
    b = a + round(fractions[1] * n)
    return {"train": np.sort(perm[:a]), "val": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


def split_with_test(is_test: np.ndarray, seed: int = 0, val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """A given test set; val is a seeded ``val_fraction`` of the other examples, train the rest."""
    test, rest = np.flatnonzero(is_test), np.flatnonzero(~is_test)
    perm = np.random.default_rng(seed).permutation(rest)
    n_val = round(val_fraction * len(rest))
    return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val]), "test": test}


# ----------------------------------------------------------------------------------------------
# 3. User datasets
# ----------------------------------------------------------------------------------------------


class Skipped:
    """Counts and names unreadable inputs: skipped with one warning, or fatal with ``strict``."""

    def __init__(self, what: str, strict: bool) -> None:
        self.what, self.strict, self.items = what, strict, []

    def add(self, path: Path | str, reason: str) -> None:
        if self.strict:
            raise ValueError(f"{path}: {reason} (stopping because --strict is set)")
        self.items.append(f"{path}: {reason}")

    def report(self) -> None:
        if self.items:
            shown = "\n  ".join(self.items[:10]) + ("\n  ..." if len(self.items) > 10 else "")
            warnings.warn(f"skipped {len(self.items)} unreadable {self.what}:\n  {shown}", stacklevel=3)


def read_text_files(paths: list[str | Path], strict: bool = False) -> list[str]:
    """Documents from .txt files (one document per file) and .jsonl files (a "text" field per line)."""
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
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError("'text' is not a string")
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    skipped.add(f"{p}:{n}", f"not a JSON object with a 'text' string ({e})")
                    continue
                if text.strip():
                    docs.append(text)
        elif p.suffix == ".txt":
            if raw.strip():
                docs.append(raw)
            else:
                skipped.add(p, "empty file")
        else:
            raise ValueError(f"{p}: text datasets are .txt or .jsonl files")
    skipped.report()
    if not docs:
        raise ValueError(f"no text found in {[str(p) for p in paths]}")
    return docs


def read_jsonl_pairs(path: Path, key: str, skipped: Skipped) -> list[tuple[Path, str]]:
    """(file, text) pairs from a jsonl with one {key: relative path, "text": ...} object per line."""
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rel, text = obj[key], obj["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            skipped.add(f"{path}:{n}", f"expected {{'{key}': ..., 'text': ...}} ({e})")
            continue
        if not isinstance(text, str) or not text.strip():
            skipped.add(f"{path}:{n}", "empty caption")
            continue
        pairs.append((path.parent / rel, text.strip()))
    return pairs


def read_image_folder(folder: str | Path, strict: bool = False) -> tuple[list[np.ndarray], list[str]]:
    """Images and captions from a folder holding images and a captions.jsonl ({"image", "text"})."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    index = folder / "captions.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f'{folder} has no captions.jsonl (one {{"image": file, "text": caption}} per line)')
    skipped = Skipped("images", strict)
    images, captions = [], []
    for path, text in read_jsonl_pairs(index, "image", skipped):
        try:
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("L")))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            skipped.add(path, f"unreadable image ({type(e).__name__}: {e})")
            continue
        captions.append(text)
    skipped.report()
    if not images:
        raise ValueError(f"no readable image-caption pairs in {folder}")
    return images, captions


def read_audio_folder(folder: str | Path, sample_rate: int, strict: bool = False) -> tuple[list[np.ndarray], list[str]]:
    """Clips and transcripts from a folder of .wav/.flac files, resampled to ``sample_rate``.

    Transcripts come from a transcripts.jsonl ({"audio": file, "text": ...}) or, LibriSpeech style,
    from ``*.trans.txt`` files whose lines read "<file stem> <transcript>".
    """
    import soundfile as sf

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"audio folder {folder} does not exist")
    skipped = Skipped("audio clips", strict)
    pairs: list[tuple[Path, str]] = []
    if (folder / "transcripts.jsonl").is_file():
        pairs = read_jsonl_pairs(folder / "transcripts.jsonl", "audio", skipped)
    for trans in sorted(folder.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            stem, _, text = line.partition(" ")
            audio = [trans.parent / f"{stem}{ext}" for ext in (".flac", ".wav")]
            found = [a for a in audio if a.is_file()]
            if not text.strip():
                skipped.add(f"{trans}:{stem}", "empty transcript")
            elif not found:
                skipped.add(f"{trans}:{stem}", "no .flac or .wav file with that name")
            else:
                pairs.append((found[0], text.strip()))
    if not pairs:
        raise ValueError(f"{folder} has no transcripts.jsonl and no *.trans.txt files with transcripts")
    clips, texts = [], []
    for path, text in pairs:
        try:
            wave, sr = sf.read(path, dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError, OSError) as e:
            skipped.add(path, f"unreadable audio ({e})")
            continue
        if len(wave) == 0:
            skipped.add(path, "no samples")
            continue
        clips.append(resample(wave.mean(axis=1), sr, sample_rate))
        texts.append(text)
    skipped.report()
    if not clips:
        raise ValueError(f"no readable audio-transcript pairs in {folder}")
    return clips, texts


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling (scipy) from rate_in to rate_out Hz."""
    if rate_in == rate_out:
        return wave.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(rate_in, rate_out)
    return resample_poly(wave, rate_out // g, rate_in // g).astype(np.float32)


SPEED_RANGE = (0.5, 2.0)  # the speed factors speed_perturb accepts


def speed_perturb(wave: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    """The clip played ``factor`` times faster: duration / factor, every frequency (pitch) x factor.

    Speed perturbation (Ko et al., Interspeech 2015), the standard augmentation of speech
    recognition: read the samples as if recorded at factor x sample_rate and resample to
    sample_rate. Each factor gives every training clip a new (speaking rate, pitch) condition.
    """
    if not SPEED_RANGE[0] <= factor <= SPEED_RANGE[1]:
        raise ValueError(f"speed factors must lie in [{SPEED_RANGE[0]}, {SPEED_RANGE[1]}], got {factor}")
    return resample(wave, round(sample_rate * factor), sample_rate)


# ----------------------------------------------------------------------------------------------
# 4. The sequence layout
# ----------------------------------------------------------------------------------------------

MEDIA = {"image_text": "image", "audio_text": "audio"}  # the non-text modality of each pair task


@dataclass(frozen=True)
class Layout:
    """Where every token of every task sits in a row of ``seq_len`` (L*) ids.

    text rows:   TASK_text  [ BOS_text doc EOS_text BOS_text doc ... ]   a window of the packed stream
    image_text:  TASK_image_text  BOS_image img_1..img_M EOS_image  BOS_text caption EOS_text PAD_text ...
    audio_text:  TASK_audio_text  BOS_audio aud_1..aud_M EOS_audio  BOS_text transcript EOS_text PAD_text ...

    Images and clips have a fixed number of tokens (``image_len``, ``audio_len``), so every segment
    of a pair task sits at fixed positions and any subset of segments can condition the rest.

    Padding: inside a pair the PAD_text after EOS_text is *data*: it is masked and predicted like any
    token, so the model learns how long a caption is, and captioning or speech recognition can
    generate text of any length up to the slot (``sample.py``'s rule: once EOS_text is revealed, the
    positions after it are PAD_text). Only the unfilled tail of a text row (a corpus shorter than one
    row) is padding in the sense of ``mdm``: never masked, not counted in N(x).
    """

    vocab: Vocab
    seq_len: int
    image_len: int
    audio_len: int

    def __post_init__(self) -> None:
        for task in MEDIA:
            if self.text_slot(task).stop - self.text_slot(task).start < 2:
                raise ValueError(f"seq_len {self.seq_len} leaves no room for text in a {task} row")

    def media_len(self, task: str) -> int:
        return {"image_text": self.image_len, "audio_text": self.audio_len}[_pair_task(task)]

    def media_slot(self, task: str) -> slice:
        """Positions of the image or audio tokens of a pair row (between BOS_m and EOS_m)."""
        return slice(2, 2 + self.media_len(task))

    def text_slot(self, task: str) -> slice:
        """Positions after BOS_text: the text tokens, then EOS_text, then PAD_text to the end."""
        if task == "text":
            return slice(1, self.seq_len)
        return slice(self.media_len(task) + 4, self.seq_len)  # TASK BOS_m media EOS_m BOS_text

    def text_capacity(self, task: str) -> int:
        """The most text tokens a row of this task can hold (a pair keeps one slot for EOS_text)."""
        s = self.text_slot(task)
        return s.stop - s.start - (0 if task == "text" else 1)

    def pair_row(self, task: str, media: Tensor, text: Tensor) -> Tensor:
        """(L,) global ids of one pair from local media ids (M,) and local text ids (n,)."""
        v, m = self.vocab, MEDIA[_pair_task(task)]
        if media.shape != (self.media_len(task),):
            raise ValueError(f"a {task} row needs {self.media_len(task)} {m} tokens, got {tuple(media.shape)}")
        if len(text) > self.text_capacity(task):
            raise ValueError(
                f"text of {len(text)} tokens does not fit a {task} row (at most {self.text_capacity(task)} "
                f"with seq_len {self.seq_len}); shorten it or raise seq_len"
            )
        row = torch.full((self.seq_len,), v.pad, dtype=torch.long)
        row[0], row[1] = v.task(task), v.bos(m)
        row[self.media_slot(task)] = v.to_global(media, m)
        s = self.text_slot(task)
        row[s.start - 2], row[s.start - 1] = v.eos(m), v.bos("text")
        row[s.start : s.start + len(text)] = v.to_global(text, "text")
        row[s.start + len(text)] = v.eos("text")
        return row

    def text_stream(self, docs: list[list[int]]) -> Tensor:
        """The packed text stream: BOS_text doc EOS_text for every document, as global ids."""
        v, parts = self.vocab, []
        for ids in docs:
            parts += [torch.tensor([v.bos("text")]), v.to_global(torch.tensor(ids, dtype=torch.long), "text")]
            parts.append(torch.tensor([v.eos("text")]))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def text_row(self, stream: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """(ids, pad) of the text row whose window starts at ``offset`` of the packed stream."""
        window = stream[offset : offset + self.seq_len - 1]
        row = torch.full((self.seq_len,), self.vocab.pad, dtype=torch.long)
        row[0] = self.vocab.task("text")
        row[1 : 1 + len(window)] = window
        pad = torch.arange(self.seq_len) >= 1 + len(window)
        return row, pad

    def to_dict(self) -> dict:
        return {
            "vocab": self.vocab.to_dict(),
            "seq_len": self.seq_len,
            "image_len": self.image_len,
            "audio_len": self.audio_len,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(Vocab.from_dict(d["vocab"]), int(d["seq_len"]), int(d["image_len"]), int(d["audio_len"]))


def _pair_task(task: str) -> str:
    if task not in MEDIA:
        raise ValueError(f"{task!r} is not a pair task; expected one of {tuple(MEDIA)}")
    return task


def decode_text_ids(ids: Tensor, vocab: Vocab, tokenizer: TextTokenizer, stop_at_eos: bool = True) -> str:
    """Text tokens of a generated segment -> str: stops at EOS_text, skips other specials."""
    out = []
    for gid in ids.tolist():
        if gid == vocab.eos("text") and stop_at_eos:
            break
        start = vocab.block_start("text")
        if start <= gid < start + vocab.text:
            out.append(gid - start)
    return tokenizer.decode(out)


# ----------------------------------------------------------------------------------------------
# 5. Datasets, splits and the batch iterator
# ----------------------------------------------------------------------------------------------


@dataclass
class PairData:
    """One split of a pair task: media tokens (N, M) local ids, candidate captions, labels."""

    media: Tensor  # (N, M) local ids of the image / audio tokenizer
    captions: list[list[list[int]]]  # per example, one or more tokenized captions (local text ids)
    labels: Tensor  # (N,) digit label where known, else -1
    raw: list[np.ndarray] = field(default_factory=list)  # the original images / clips (for judges)
    variants: Tensor | None = None  # (N, K, M) media ids of K augmented copies (speed-perturbed training clips)

    def __len__(self) -> int:
        return self.media.shape[0]


@dataclass
class TriModalData:
    """Everything train/sample/evaluate need: tokenizers, layout and the three tasks' splits."""

    layout: Layout
    text_tokenizer: TextTokenizer
    image_tokenizer: PixelTokenizer
    audio_codec: object  # fsq.AudioCodec or an adapter with encode / decode / vocab_size
    text: dict[str, Tensor]  # split -> packed global-id stream
    pairs: dict[str, dict[str, PairData]]  # task -> split -> PairData
    config: DataConfig | None = None  # what it was built from (``build_data``)

    @property
    def vocab(self) -> Vocab:
        return self.layout.vocab

    def code_vectors(self) -> dict[str, np.ndarray]:
        """Per media modality, what each of its tokens stands for (tokenizers that can say; adapters may not)."""
        tokenizers = {"image": self.image_tokenizer, "audio": self.audio_codec}
        return {m: t.code_vectors() for m, t in tokenizers.items() if hasattr(t, "code_vectors")}


@dataclass
class Batch:
    """A batch of rows: ids, pad (B, L), task index into TASKS (B,), modality per position (B, L)."""

    ids: Tensor
    pad: Tensor
    task: Tensor
    modality: Tensor
    variants: Tensor | None = None  # (B, K, L): each row with its media replaced by an augmented copy (or unchanged)

    def rows(self, sl: slice) -> Batch:
        v = None if self.variants is None else self.variants[sl]
        return Batch(self.ids[sl], self.pad[sl], self.task[sl], self.modality[sl], v)


class BatchIterator:
    """Seeded, resumable batches with per-task mixing ratios; DDP ranks take slices.

    The global batch of step k is a pure function of (seed, k): a generator seeded with both draws
    how many rows each task gets (the ratios times the batch size, remainders assigned at random),
    then for each row a text window or a pair example and one of its captions. So resuming needs only
    the step counter (``state_dict``), and every rank builds the same global batch and keeps rows
    [rank * b, (rank + 1) * b): a run on N ranks sees exactly the rows of a one-process run.
    """

    def __init__(
        self,
        data: TriModalData,
        split: str,
        batch_size: int,
        ratios: dict[str, float],
        seed: int = 0,
    ) -> None:
        unknown = set(ratios) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks in the mixing ratios: {sorted(unknown)}; tasks are {TASKS}")
        total = sum(ratios.values())
        if total <= 0 or any(r < 0 for r in ratios.values()):
            raise ValueError(f"mixing ratios must be non-negative with a positive sum, got {ratios}")
        self.data, self.split, self.batch_size, self.seed = data, split, batch_size, seed
        self.ratios = {t: ratios.get(t, 0.0) / total for t in TASKS}
        if self.ratios["text"] > 0 and len(data.text[split]) == 0:
            raise ValueError(f"the text {split} split is empty")
        for task in MEDIA:
            if self.ratios[task] > 0 and len(data.pairs[task][split]) == 0:
                raise ValueError(f"the {task} {split} split is empty")
        self.step = 0

    def counts(self, g: torch.Generator) -> list[int]:
        """Rows per task: floor(ratio * B) each, the remaining rows drawn in proportion to the ratios."""
        r = torch.tensor([self.ratios[t] for t in TASKS], dtype=torch.float64)
        base = torch.floor(r * self.batch_size).long()
        rest = self.batch_size - int(base.sum())
        if rest:
            extra = torch.multinomial(r, rest, replacement=True, generator=g)
            base += torch.bincount(extra, minlength=len(TASKS))
        return base.tolist()

    def batch(self, step: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        layout, ids, pads, tasks, copies = self.data.layout, [], [], [], []
        for task, n in zip(TASKS, self.counts(g), strict=True):
            for _ in range(n):
                if task == "text":
                    stream = self.data.text[self.split]
                    hi = max(1, len(stream) - (layout.seq_len - 1) + 1)
                    row, pad = layout.text_row(stream, int(torch.randint(hi, (), generator=g)))
                else:
                    pairs = self.data.pairs[task][self.split]
                    i = int(torch.randint(len(pairs), (), generator=g))
                    options = pairs.captions[i]
                    caption = options[int(torch.randint(len(options), (), generator=g))]
                    row = layout.pair_row(task, pairs.media[i], torch.tensor(caption, dtype=torch.long))
                    pad = torch.zeros(layout.seq_len, dtype=torch.bool)
                    if pairs.variants is not None:  # (row, task, its example's copies (K, M))
                        copies.append((len(ids), task, pairs.variants[i]))
                ids.append(row)
                pads.append(pad)
                tasks.append(TASKS.index(task))
        order = torch.randperm(self.batch_size, generator=g)
        x = torch.stack(ids)
        alt = self.variants(x, copies)
        alt = None if alt is None else alt[order]
        x = x[order]
        return Batch(x, torch.stack(pads)[order], torch.tensor(tasks)[order], self.data.vocab.modality_of(x), alt)

    def variants(self, x: Tensor, copies: list[tuple[int, str, Tensor]]) -> Tensor | None:
        """(B, K, L): each row K times, with its media replaced by its example's K copies where it has them."""
        if not copies:
            return None
        k = copies[0][2].shape[0]
        alt = x.unsqueeze(1).repeat(1, k, 1)  # rows without copies: the row itself, K times
        layout = self.data.layout
        for r, task, media in copies:
            alt[r, :, layout.media_slot(task)] = layout.vocab.to_global(media, MEDIA[task])
        return alt

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        b = self.batch(self.step)
        self.step += 1
        return b

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "split": self.split, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["split"], state["batch_size"]) != (self.seed, self.split, self.batch_size):
            raise ValueError(
                f"data iterator state is for seed {state['seed']}, split {state['split']!r}, "
                f"batch {state['batch_size']}; this run uses seed {self.seed}, split {self.split!r}, "
                f"batch {self.batch_size}"
            )
        self.step = int(state["step"])


@dataclass(frozen=True)
class DataConfig:
    """What data to build. Defaults: the embedded tri-modal world, tiny-model sizes."""

    seq_len: int = 48  # L*: every row has this many tokens
    text_vocab: int = 1024  # size of the default BPE (a committed rank file exists for 1024)
    text_tokenizer: str = "default"  # "default", a path to a .tiktoken file, or "tiktoken:<name>"
    default_text: bool = True  # include CPython's pydoc topics
    text_files: tuple[str, ...] = ()  # user .txt / .jsonl documents, added to the text task
    image_dir: str | None = None  # a folder with images + captions.jsonl, replacing the digits
    audio_dir: str | None = None  # a folder with clips + transcripts, replacing the spoken digits
    audio_codec: str = str(ASSETS / "audio_codec.pt")
    audio_codec_sha256: str = ""  # the codec's hash the caller vouches for (fsq.check_sha256); "" = none
    image_levels: int = 4  # gray levels per pixel token (17 = lossless digits)
    image_patch: int = 2  # pixels per image token side (1 = one token per pixel)
    strict: bool = False  # stop at the first unreadable input instead of skipping it
    audio_speeds: tuple[float, ...] = ()  # extra copies of each training clip at these speeds (train.py: 0.8-1.2)
    seed: int = 0  # the splits' seed


def default_bpe_corpus(seed: int = 0) -> str:
    """What the default BPE is trained on: the text train split, one caption per training image,
    and the spoken-digit transcripts (so the pair tasks' words tokenize compactly)."""
    chunks = split_documents(pydoc_corpus())
    text = "".join(chunks[i] for i in split_indices(len(chunks), seed)["train"])
    _, labels = digits_images()
    rng = np.random.default_rng(seed)
    captions = [
        digit_captions(int(labels[i]))[rng.integers(len(CAPTION_TEMPLATES))]
        for i in split_indices(len(labels), seed)["train"]
    ]
    return text + "\n".join(captions) + "\n" + " ".join(DIGIT_WORDS) + "\n"


def load_text_tokenizer(cfg: DataConfig) -> TextTokenizer:
    if cfg.text_tokenizer.startswith("tiktoken:"):
        return TextTokenizer.from_tiktoken_name(cfg.text_tokenizer.split(":", 1)[1])
    if cfg.text_tokenizer != "default":
        return TextTokenizer.load(cfg.text_tokenizer)
    path = ASSETS / f"text_bpe_{cfg.text_vocab}.tiktoken"
    if path.is_file():
        return TextTokenizer.load(path)
    return TextTokenizer(train_bpe(default_bpe_corpus(cfg.seed), cfg.text_vocab))


def tokenize_captions(tok: TextTokenizer, captions: list[str], limit: int, source: str) -> list[list[int]]:
    out = []
    for c in captions:
        ids = tok.encode(c)
        if len(ids) > limit:
            raise ValueError(f"{source}: the caption {c[:60]!r} is {len(ids)} tokens; a row holds at most {limit}")
        out.append(ids)
    return out


def loses_sound(wave: np.ndarray, n_samples: int) -> bool:
    """Whether cutting the clip to n_samples drops more than silence (anything above 1% of its peak)."""
    return len(wave) > n_samples and bool(np.abs(wave[n_samples:]).max() > 0.01 * np.abs(wave).max())


def encode_clips(codec, clips: list[np.ndarray]) -> Tensor:
    """Waveforms -> (N, tokens_per_clip) long audio ids, 64 clips at a time (bounded memory)."""
    chunks = [codec.encode_batch(clips[i : i + 64]) for i in range(0, len(clips), 64)]
    return torch.from_numpy(np.concatenate(chunks)).long()


def build_data(cfg: DataConfig = DataConfig()) -> TriModalData:
    """Tokenize every split of every task once (seconds for the default data)."""
    from fsq import load_audio_codec

    tok = load_text_tokenizer(cfg)
    pixels = PixelTokenizer(cfg.image_levels, cfg.image_patch)
    codec = load_audio_codec(cfg.audio_codec, cfg.audio_codec_sha256)
    vocab = Vocab(text=tok.vocab_size, audio=codec.vocab_size, image=pixels.vocab_size)
    layout = Layout(vocab, cfg.seq_len, pixels.tokens_per_image, codec.tokens_per_clip)

    # text: chunks of documents, split by a seeded permutation, packed into one stream per split
    docs = (pydoc_corpus() if cfg.default_text else []) + (
        read_text_files(list(cfg.text_files), cfg.strict) if cfg.text_files else []
    )
    if not docs:
        raise ValueError("no text: keep the default corpus or pass text files")
    chunks = split_documents(docs)
    idx = split_indices(len(chunks), cfg.seed)
    text = {s: layout.text_stream([tok.encode(chunks[i]) for i in idx[s]]) for s in idx}

    # image-text: digits with every caption template, or a user folder
    if cfg.image_dir is None:
        images, labels = digits_images()
        captions = [digit_captions(int(y)) for y in labels]
    else:
        raw, texts = read_image_folder(cfg.image_dir, cfg.strict)
        images = np.stack([pixels.to_gray_levels(im) for im in raw])
        labels = np.array([digit_named_in(t) if digit_named_in(t) is not None else -1 for t in texts])
        captions = [[t] for t in texts]
    limit = layout.text_capacity("image_text")
    image_caps = [tokenize_captions(tok, c, limit, cfg.image_dir or "digit captions") for c in captions]
    image_media = torch.from_numpy(np.stack([pixels.encode(im) for im in images]))

    # audio-text: the committed spoken digits, or a user folder
    if cfg.audio_dir is None:
        waves, meta = spoken_digits()
        clips = [resample(w, int(meta["sample_rate"]), codec.sample_rate) for w in waves]
        transcripts = [str(t) for t in meta["transcripts"]]
        # the file's own test split holds unseen (rate, pitch) conditions of the voices; val comes from the rest
        audio_split = split_with_test(meta["split"] == "test", cfg.seed)
    else:
        clips, transcripts = read_audio_folder(cfg.audio_dir, codec.sample_rate, cfg.strict)
        audio_split = split_indices(len(clips), cfg.seed)
    audio_labels = np.array([digit_named_in(t) if digit_named_in(t) is not None else -1 for t in transcripts])
    limit = layout.text_capacity("audio_text")
    audio_caps = [tokenize_captions(tok, [t], limit, cfg.audio_dir or "spoken digits") for t in transcripts]
    audio_media = encode_clips(codec, clips)

    pairs: dict[str, dict[str, PairData]] = {}
    for task, media, caps, labels_, raw, split in (
        ("image_text", image_media, image_caps, labels, list(images), split_indices(len(image_media), cfg.seed)),
        ("audio_text", audio_media, audio_caps, audio_labels, clips, audio_split),
    ):
        pairs[task] = {
            s: PairData(media[ix], [caps[i] for i in ix], torch.as_tensor(labels_)[ix], [raw[i] for i in ix])
            for s, ix in ((s, torch.from_numpy(i)) for s, i in split.items())
        }
    # speed perturbation of the training clips only (val and test keep their original clips)
    train = pairs["audio_text"]["train"]
    if cfg.audio_speeds and len(train):
        copies, cut = [], 0
        for f in cfg.audio_speeds:
            waves = [speed_perturb(w, f, codec.sample_rate) for w in train.raw]
            cut += sum(loses_sound(w, codec.n_samples) for w in waves)
            copies.append(encode_clips(codec, waves))
        if cut:
            warnings.warn(
                f"{cut} speed-perturbed training clips run past the codec's {codec.n_samples} samples and lose "
                "sound at their end; use factors nearer 1 (--audio_speeds) or shorter clips",
                stacklevel=2,
            )
        train.variants = torch.stack(copies, 1)  # (N, K, M)
    return TriModalData(layout, tok, pixels, codec, text, pairs, cfg)


# ----------------------------------------------------------------------------------------------
# Command line: train the default BPE; show decoded rows of every task
# ----------------------------------------------------------------------------------------------


def bytes_per_token(tok: TextTokenizer, text: str) -> float:
    return len(text.encode("utf-8")) / max(1, len(tok.encode(text)))


def _train_bpe_command(args: argparse.Namespace) -> None:
    import time

    corpus = default_bpe_corpus(args.seed)
    t0 = time.perf_counter()
    tok = TextTokenizer(train_bpe(corpus, args.vocab))
    seconds = time.perf_counter() - t0
    ASSETS.mkdir(exist_ok=True)
    path = ASSETS / f"text_bpe_{args.vocab}.tiktoken"
    digest = tok.save(path)
    chunks = split_documents(pydoc_corpus())
    val = "".join(chunks[i] for i in split_indices(len(chunks), args.seed)["val"])
    mb = len(corpus.encode()) / 1e6
    print(f"trained {args.vocab} tokens on {mb:.2f} MB in {seconds:.2f} s -> {path} (sha256 {digest[:12]}...)")
    train_bpt, val_bpt = bytes_per_token(tok, corpus), bytes_per_token(tok, val)
    print(f"bytes per token: {train_bpt:.2f} on the training text, {val_bpt:.2f} on the validation text")


def _show_command(args: argparse.Namespace) -> None:
    data = build_data(DataConfig(seq_len=args.seq_len))
    v, layout = data.vocab, data.layout
    print(f"vocabulary: {v.size} ids ({v.text} text, {v.audio} audio, {v.image} image, 13 special)")
    print(f"layout: L*={layout.seq_len}, image {layout.image_len} tokens, audio {layout.audio_len} tokens")
    for s in ("train", "val", "test"):
        sizes = ", ".join(f"{t} {len(data.pairs[t][s])}" for t in MEDIA)
        print(f"{s}: text {len(data.text[s])} tokens, {sizes} pairs")
    batch = BatchIterator(data, "train", 6, {"text": 1, "image_text": 1, "audio_text": 1}).batch(0)
    for row in batch.ids:
        print(" ".join(v.name(int(i)) for i in row[:12]), "...")
        task = v.name(int(row[0]))[5:]
        print(f"   text: {decode_text_ids(row[layout.text_slot(task)], v, data.text_tokenizer)!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("train-bpe", help="train the default byte-level BPE and write assets/text_bpe_<V>.tiktoken")
    b.add_argument("--vocab", type=int, default=1024)
    b.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("show", help="decode a few rows of every task")
    s.add_argument("--seq-len", type=int, default=DataConfig.seq_len)
    args = p.parse_args()
    {"train-bpe": _train_bpe_command, "show": _show_command}[args.command](args)


if __name__ == "__main__":
    main()
