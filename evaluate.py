"""Evaluation: how good are a trained model's likelihoods and generations?

This file will hold three things, in this order:

1. **Judges** (this section): small models that run offline and score generated samples, each
   trained or configured from data in the repository, never downloaded.
2. Per-modality NELBO in bits (from ``mdm.nelbo``) on held-out sequences of ``data.py``.
3. Generation metrics (T2I, captioning, T2S, ASR accuracy; a classifier-space Fréchet distance)
   and reports: sample grids and plots.

The judges close the loop of each cross-modal task without a network:

* ``SpeechJudge``          pocketsphinx (its English model ships inside its wheel) restricted by a
  JSGF grammar to the ten digit words: "which digit does this waveform say?". About 98% on clean
  flite clips; it is the judge of text-to-speech samples decoded by ``fsq.AudioCodec``.
* ``AudioClassifierJudge`` a logistic regression on log-spectrogram features, trained on real
  training clips: a second audio judge, strong on the training voices, weak on new voices.
* ``DigitImageJudge``      a logistic regression on scikit-learn's 8x8 digits (17 gray levels), the
  judge of text-to-image samples; its hidden features give ``frechet_distance``, a Fréchet distance
  in a small classifier's feature space that is **not comparable to published FID** (which uses an
  Inception network on natural images).

Heavy imports (pocketsphinx, scikit-learn) happen inside the functions that need them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# 1. Judges
# ----------------------------------------------------------------------------------------------

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_grammar(words: Sequence[str] = DIGIT_WORDS) -> str:
    """A JSGF grammar that accepts exactly one of ``words`` (optionally surrounded by silence)."""
    return "#JSGF V1.0;\ngrammar digits;\npublic <digit> = " + " | ".join(words) + " ;\n"


def resample_linear(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample by linear interpolation (enough for a judge: speech energy is far below Nyquist).

    Down-sampling this way aliases; callers that go down in rate should low-pass first.
    """
    if sr_in == sr_out:
        return np.asarray(wave, dtype=np.float32)
    n_out = round(len(wave) * sr_out / sr_in)
    t_out = np.arange(n_out) * (sr_in / sr_out)
    return np.interp(t_out, np.arange(len(wave)), wave).astype(np.float32)


class SpeechJudge:
    """Offline digit recognition with pocketsphinx and a one-word JSGF grammar.

    ``recognize(wave, sample_rate)`` returns the recognized word ("" when the decoder finds none).
    The waveform is resampled to 16 kHz (the rate of pocketsphinx's en-us model), peak-normalized,
    and padded with ``pad_seconds`` of silence on both sides (the decoder needs some silence to
    find the word boundaries).

    Trap: ``pocketsphinx.Decoder(jsgf=<grammar text>)`` segfaults; the grammar is added with
    ``add_jsgf_string`` and switched on with ``activate_search``.
    """

    MODEL_RATE = 16000

    def __init__(self, words: Sequence[str] = DIGIT_WORDS, pad_seconds: float = 0.25) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("SpeechJudge needs pocketsphinx: pip install pocketsphinx") from e
        self.words = tuple(words)
        self.pad_seconds = pad_seconds
        self.decoder = Decoder(loglevel="FATAL")
        self.decoder.add_jsgf_string("digits", digit_grammar(self.words))
        self.decoder.activate_search("digits")

    def recognize(self, wave: np.ndarray, sample_rate: int) -> str:
        x = resample_linear(np.asarray(wave, dtype=np.float32).reshape(-1), sample_rate, self.MODEL_RATE)
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > 0:
            x = 0.9 * x / peak
        pad = np.zeros(int(self.pad_seconds * self.MODEL_RATE), dtype=np.float32)
        pcm = (np.concatenate([pad, x, pad]) * 32767).astype(np.int16)
        self.decoder.start_utt()
        self.decoder.process_raw(pcm.tobytes(), no_search=False, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    def recognize_all(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        return [self.recognize(w, sample_rate) for w in waves]

    def accuracy(self, waves: Sequence[np.ndarray], labels: Sequence[int], sample_rate: int) -> float:
        """Fraction of waves recognized as the word ``self.words[label]``."""
        if len(waves) != len(labels) or len(waves) == 0:
            raise ValueError(f"need as many labels as waves (and at least one): {len(waves)} vs {len(labels)}")
        said = self.recognize_all(waves, sample_rate)
        return float(np.mean([s == self.words[int(y)] for s, y in zip(said, labels, strict=True)]))


def log_spectrogram_features(
    waves: Sequence[np.ndarray], sample_rate: int, n_frames: int = 24, n_fft: int = 512
) -> np.ndarray:
    """(N, n_frames * (n_fft // 4)) features: log-|STFT| of each wave, resampled to a fixed frame count.

    Each wave is split into n_frames equal windows (zero-padded to n_fft); only the lower half of the
    spectrum (0 .. sample_rate/4) is kept, where speech energy lies. Loudness is normalized
    per clip, so the features compare spectral shapes over time.
    """
    feats = []
    for w in waves:
        x = np.asarray(w, dtype=np.float32).reshape(-1)
        x = x / (np.abs(x).max() + 1e-8)
        nz = np.nonzero(np.abs(x) > 0.02)[0]  # crop leading and trailing silence
        if nz.size:
            x = x[nz[0] : nz[-1] + 1]
        edges = np.linspace(0, len(x), n_frames + 1).astype(int)
        window = np.hanning(n_fft).astype(np.float32)
        rows = []
        for a, b in itertools.pairwise(edges):
            mid = (a + b) // 2
            seg = x[max(0, mid - n_fft // 2) : mid + n_fft // 2]
            seg = np.pad(seg, (0, n_fft - len(seg)))
            rows.append(np.log(np.abs(np.fft.rfft(seg * window))[: n_fft // 4] + 1e-3))
        feats.append(np.concatenate(rows))
    return np.stack(feats).astype(np.float32)


class AudioClassifierJudge:
    """Logistic regression on ``log_spectrogram_features``: a second, local audio judge.

    Trained on real training clips; near perfect on new clips of the training voices, much weaker
    on unseen voices, so use it for in-distribution samples (T2S of the training voices).
    """

    def __init__(self, sample_rate: int, C: float = 0.1) -> None:
        self.sample_rate, self.C = sample_rate, C
        self.model = None

    def fit(self, waves: Sequence[np.ndarray], labels: Sequence[int]) -> AudioClassifierJudge:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=2000))
        self.model.fit(log_spectrogram_features(waves, self.sample_rate), np.asarray(labels))
        return self

    def predict(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("AudioClassifierJudge: call fit(waves, labels) before predict")
        return self.model.predict(log_spectrogram_features(waves, self.sample_rate))

    def accuracy(self, waves: Sequence[np.ndarray], labels: Sequence[int]) -> float:
        return float(np.mean(self.predict(waves) == np.asarray(labels)))


class DigitImageJudge:
    """A digit classifier for 8x8 images with gray levels 0..16 (scikit-learn's digits).

    A small MLP (one hidden layer of ``hidden`` ReLU units; ~0.97-0.98 held out) whose hidden
    activations are the ``features`` for ``frechet_distance``. Images may be given as (N, 8, 8) or
    (N, 64), integer levels or floats in [0, 16].
    """

    def __init__(self, hidden: int = 64, seed: int = 0) -> None:
        self.hidden, self.seed = hidden, seed
        self.model = None

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
        if x.shape[1] != 64:
            raise ValueError(f"DigitImageJudge expects 8x8 images (64 pixels), got {x.shape[1]} pixels")
        return x / 16.0

    def fit(self, images: np.ndarray, labels: np.ndarray) -> DigitImageJudge:
        from sklearn.neural_network import MLPClassifier

        self.model = MLPClassifier(hidden_layer_sizes=(self.hidden,), alpha=1e-3, max_iter=600, random_state=self.seed)
        self.model.fit(self._flat(images), np.asarray(labels))
        return self

    def _check(self) -> None:
        if self.model is None:
            raise RuntimeError("DigitImageJudge: call fit(images, labels) first")

    def predict(self, images: np.ndarray) -> np.ndarray:
        self._check()
        return self.model.predict(self._flat(images))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, hidden) ReLU activations of the hidden layer: the space of ``frechet_distance``."""
        self._check()
        h = self._flat(images) @ self.model.coefs_[0] + self.model.intercepts_[0]
        return np.maximum(h, 0.0)


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (no scipy)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, d) and (N_b, d):

        FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)

    (the symmetric form of tr((S_a S_b)^1/2), computed with eigh only). In a small classifier's
    feature space this is a "classifier-FD": useful for comparing runs of this project, **not
    comparable to published FID**.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N, d) feature arrays with N >= 2 and equal d; got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = sqrtm_psd(s_a)
    cross = sqrtm_psd(r @ s_b @ r)
    return float(max(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross), 0.0))
