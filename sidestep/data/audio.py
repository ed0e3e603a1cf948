"""Read audio files for preprocessing: decode, make stereo, resample, split into chunks.

Decoding is libsndfile through `soundfile` (wav, flac, ogg/vorbis/opus, mp3, aiff, ...). AAC in `.m4a`
has no libsndfile decoder, so such files fail with an AudioError that says how to convert them.
Resampling is `scipy.signal.resample_poly` (polyphase FIR with a Kaiser window; torchaudio is not a
dependency). Every failure is one AudioError sentence naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from sidestep.errors import AudioError

__all__ = ["AUDIO_SUFFIXES", "Audio", "find_audio_files", "load_audio", "split_audio", "resample"]

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aif", ".aiff")
_NO_LIBSNDFILE_DECODER = (".m4a",)
# Peak below -80 dBFS: nothing a VAE could learn from (digital silence, or a dead recording).
SILENCE_PEAK = 1e-4


@dataclass(frozen=True)
class Audio:
    """Decoded audio: `samples` is float32 `[2, n]` (stereo) at `sample_rate`; `offset` is seconds into the file."""

    source: Path
    samples: np.ndarray
    sample_rate: int
    offset: float = 0.0

    @property
    def duration(self) -> float:
        return self.samples.shape[1] / self.sample_rate


def find_audio_files(folder: Path) -> list[Path]:
    """Audio files under `folder` (recursively, hidden folders skipped), sorted by relative path."""
    folder = Path(folder)
    found = [
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def load_audio(path: Path, sample_rate: int, min_samples: int = 1) -> Audio:
    """Decode `path` to stereo float32 at `sample_rate`.

    Raises AudioError when the file cannot be decoded, is empty or shorter than `min_samples` (after
    resampling), contains NaN/Inf, or is silent.
    """
    path = Path(path)
    data, rate = _decode(path)
    if data.shape[0] == 0:
        raise AudioError(f"{path.name}: the file holds no audio samples (empty).")
    if not np.isfinite(data).all():
        raise AudioError(f"{path.name}: the decoded audio contains NaN or Inf values (corrupt file).")
    stereo = _to_stereo(data)
    stereo = resample(stereo, rate, sample_rate)
    if stereo.shape[1] < min_samples:
        raise AudioError(f"{path.name}: {stereo.shape[1] / sample_rate:.3f} s is too short to encode "
                         f"(at least {min_samples / sample_rate:.3f} s needed).")
    peak = float(np.abs(stereo).max())
    if peak < SILENCE_PEAK:
        raise AudioError(f"{path.name}: the audio is silent (peak {_dbfs(peak)}); nothing to learn from it.")
    return Audio(path, stereo, sample_rate)


def split_audio(audio: Audio, max_duration: float | None, align: int = 1) -> list[Audio]:
    """Split into equal chunks no longer than `max_duration` seconds, each a multiple of `align` samples.

    Equal chunks (rather than fixed-size ones plus a remainder) never leave a tiny tail. `align` is the
    VAE hop so chunk borders fall on latent frames. Without `max_duration` the audio is returned whole.
    """
    total = audio.samples.shape[1]
    if max_duration is None or total <= max_duration * audio.sample_rate:
        return [audio]
    limit = max(align, int(max_duration * audio.sample_rate) // align * align)
    count = math.ceil(total / limit)
    size = math.ceil(total / count / align) * align
    chunks = []
    for start in range(0, total, size):
        piece = audio.samples[:, start : start + size]
        chunks.append(Audio(audio.source, piece, audio.sample_rate, audio.offset + start / audio.sample_rate))
    return chunks


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample `[channels, n]` float32 audio from `rate_in` to `rate_out` Hz (polyphase, anti-aliased)."""
    if rate_in == rate_out:
        return np.ascontiguousarray(samples, dtype=np.float32)
    ratio = Fraction(rate_out, rate_in)
    out = resample_poly(samples, ratio.numerator, ratio.denominator, axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """`[n, channels]` float32 and the file's sample rate."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as err:
        if path.suffix.lower() in _NO_LIBSNDFILE_DECODER:
            raise AudioError(f"{path.name}: {path.suffix} (AAC) cannot be decoded here; convert it to flac or wav "
                             f"(e.g. `ffmpeg -i '{path.name}' '{path.stem}.flac'`).") from err
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise AudioError(f"{path.name}: cannot decode this audio file (corrupt or unsupported: {reason}).") from err
    if data.ndim != 2 or data.shape[1] == 0:
        raise AudioError(f"{path.name}: the file has no audio channels.")
    return data, int(rate)


def _to_stereo(data: np.ndarray) -> np.ndarray:
    """`[n, channels]` -> `[2, n]`: mono is duplicated, channels beyond the first two are dropped."""
    if data.shape[1] == 1:
        data = np.repeat(data, 2, axis=1)
    return np.ascontiguousarray(data[:, :2].T)


def _dbfs(peak: float) -> str:
    return "-inf dBFS" if peak <= 0 else f"{20 * math.log10(peak):.0f} dBFS"
