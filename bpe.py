"""Text tokens: a byte-level BPE trained here and run by ``tiktoken``.

Byte-pair encoding (Sennrich et al. 2016; byte-level as in GPT-2) starts from the 256 byte values and
repeatedly merges the most frequent adjacent pair of tokens into a new token, so frequent words become single
tokens and any text (any bytes) still has an encoding. ``train_bpe`` learns the merges; ``TextTokenizer`` runs
them with ``tiktoken`` (a fast Rust implementation) and saves them in tiktoken's file format, so a standard
tiktoken encoding can replace ours at scale. ``python -m lab.tokenizers train-bpe --vocab 1024`` trains one.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import itertools
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken

# The GPT-4 (cl100k) pre-tokenization pattern: contractions, words with one leading non-letter,
# numbers of up to 3 digits, punctuation runs, and whitespace. BPE merges never cross these pieces.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def train_bpe(text: str, vocab_size: int, pattern: str = GPT4_PATTERN) -> dict[bytes, int]:
    """Learn byte-level BPE merge ranks {token bytes: rank} (the 256 single bytes first), incrementally:

    1. split the text with ``pattern`` and count each *unique* piece once (a word list with counts);
    2. keep, for every adjacent pair of tokens, its total count and the set of words containing it;
    3. repeat: pop the most frequent pair from a max-heap (stale entries are skipped lazily), give the
       merged bytes the next rank, and update counts only in the words that contain that pair.
    Ties go to the lexicographically smallest pair of ranks, so training is deterministic.
    """
    if vocab_size < 256:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 256, got {vocab_size}")
    if not pattern:
        raise ValueError("an empty pre-tokenization pattern would crash tiktoken; pass a real regex")
    pieces = Counter(regex.findall(pattern, text))
    words, counts = [list(p.encode("utf-8")) for p in pieces], list(pieces.values())
    ranks = {bytes([i]): i for i in range(256)}
    token_bytes = list(ranks)  # token_bytes[rank]: the inverse of ranks
    pair_count: Counter[tuple[int, int]] = Counter()
    pair_words: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> the words that contain it
    for w, (word, n) in enumerate(zip(words, counts, strict=True)):
        for pair in itertools.pairwise(word):
            pair_count[pair] += n
            pair_words[pair].add(w)
    heap = sorted((-n, pair) for pair, n in pair_count.items())  # a sorted list is a valid min-heap
    while len(token_bytes) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count[pair] != -neg:
            continue  # stale heap entry: the count changed since it was pushed
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in ranks:  # the same bytes reached by another merge order: no new token
            del pair_count[pair]
            continue
        ranks[merged] = new_id = len(token_bytes)
        token_bytes.append(merged)
        changed: Counter[tuple[int, int]] = Counter()
        for w in pair_words.pop(pair, ()):
            word, n = words[w], counts[w]
            for old in itertools.pairwise(word):
                changed[old] -= n
            out: list[int] = []  # the word with every occurrence of pair merged, left to right
            for t in word:
                if out and (out[-1], t) == pair:  # a merged out[-1] (new_id) never matches pair
                    out[-1] = new_id
                else:
                    out.append(t)
            words[w] = out
            for new in itertools.pairwise(out):
                changed[new] += n
                pair_words[new].add(w)
        pair_count.update(changed)  # adds the deltas, negative ones included
        for p, delta in changed.items():
            if delta and pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return ranks


class TextTokenizer:
    """Byte-level BPE through ``tiktoken.Encoding``, saved in tiktoken's file format (``to_text``) plus a sha256
    of that file, which ``load`` checks. We parse the file ourselves: ``tiktoken.load.load_tiktoken_bpe`` caches
    local files by path and can return a stale copy after the file is rewritten.
    """

    def __init__(self, ranks: dict[bytes, int], pattern: str = GPT4_PATTERN, name: str = "trimodal-bpe") -> None:
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
        path, sha_file = Path(path), Path(f"{path}.sha256")
        if not path.is_file():
            raise FileNotFoundError(f"no BPE rank file at {path}; train one with `python -m lab.tokenizers train-bpe`")
        blob = path.read_bytes()
        expected = expected_sha256 or (sha_file.read_text().strip() if sha_file.is_file() else None)
        if expected is not None and (digest := hashlib.sha256(blob).hexdigest()) != expected:
            raise ValueError(
                f"{path}: sha256 {digest} does not match the expected {expected}; the file is corrupt or stale"
            )
        if not blob.isascii():
            raise ValueError(f"{path}: not a tiktoken rank file (not ASCII)")
        return cls.from_text(blob.decode("ascii"), str(path))

    @classmethod
    def from_tiktoken_name(cls, name: str) -> TextTokenizer:
        """A standard tiktoken encoding (e.g. 'r50k_base', 'cl100k_base') for large configs; tiktoken fetches
        its rank file on first use, and offline it only finds the file in its cache (the error says how to seed it).
        """
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken raises requests/urllib errors offline
            raise RuntimeError(
                f"cannot load the tiktoken encoding {name!r} offline ({type(e).__name__}). Seed its cache: set "
                "TIKTOKEN_CACHE_DIR to a folder and copy the encoding's rank file there under the name "
                "sha1(<its URL in tiktoken_ext/openai_public.py>).hexdigest() (for r50k_base the file is "
                "whisper/assets/gpt2.tiktoken in the openai-whisper sdist), or pass a local .tiktoken file instead."
            ) from e
        tok = cls.__new__(cls)  # tiktoken's own Encoding, its special tokens included
        tok.ranks, tok.pattern, tok.encoding = enc._mergeable_ranks, enc._pat_str, enc
        return tok
