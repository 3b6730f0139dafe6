"""Call audio as Twilio records it (8 kHz, 16-bit PCM, mono WAV), pure: reading and writing
WAV bytes, and synthesising what a call sounds like — speech-like audio for prompts and voices,
and the standard DTMF pairs for keys — for the simulator's recordings and the detector's tests.
"""

from __future__ import annotations

import io
import wave
from typing import Final

import numpy as np
import numpy.typing as npt

from .dtmf import HIGH, LOW, RATE

__all__ = ["KEYS", "WavError", "channels_of_wav", "dtmf", "from_wav", "silence", "speech_like",
           "to_wav"]

KEYS: Final = "123A456B789C*0#D"  # row by row: low tone = row, high tone = column
Samples = npt.NDArray[np.float64]


class WavError(ValueError):
    """Bytes that are not 8 kHz 16-bit mono PCM WAV."""


def silence(seconds: float) -> Samples:
    return np.zeros(int(round(seconds * RATE)))


def dtmf(key: str, seconds: float = 0.1, level_db: float = -10.0, twist_db: float = 0.0,
         offset: float = 0.0) -> Samples:
    """One key's tone pair: each tone at `level_db` dBFS (peak), the high tone `twist_db`
    louder than the low; `offset` shifts both frequencies by that fraction (e.g. 0.015)."""
    index = KEYS.index(key)
    low, high = LOW[index // 4] * (1 + offset), HIGH[index % 4] * (1 + offset)
    t = np.arange(int(round(seconds * RATE))) / RATE
    amp = 10 ** (level_db / 20)
    return (amp * np.sin(2 * np.pi * low * t)
            + amp * 10 ** (twist_db / 20) * np.sin(2 * np.pi * high * t))


def speech_like(seconds: float, seed: int = 0, level_db: float = -14.0) -> Samples:
    """Voice-like audio: syllables of a wandering fundamental (90-220 Hz) with every harmonic
    up to 3.4 kHz shaped by vowel formants, unvoiced noise between them. Harmonic-rich and
    spread in frequency, as speech is — and sometimes strong right at the DTMF frequencies."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * RATE))
    out = np.zeros(n)
    pos = 0
    vowels = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
              (660, 1720, 2410), (570, 840, 2410), (440, 1020, 2240))
    while pos < n:
        length = int(rng.uniform(0.08, 0.3) * RATE)
        t = np.arange(min(length, n - pos)) / RATE
        if rng.random() < 0.8:  # voiced syllable
            f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
            phase = 2 * np.pi * np.cumsum(f0) / RATE
            formants = vowels[rng.integers(len(vowels))]
            syllable = np.zeros(t.size)
            for h in range(1, int(3400 / 90) + 1):
                freq = f0 * h
                gain = sum(1 / (1 + ((freq - f) / 120) ** 2) for f in formants) / h ** 0.5
                syllable += np.where(freq < 3400, gain, 0.0) * np.sin(h * phase)
        else:  # unvoiced: fricative-like noise
            syllable = rng.normal(0, 0.5, t.size)
        envelope = np.sin(np.pi * np.arange(t.size) / max(t.size, 1)) ** 2
        out[pos:pos + t.size] = syllable * envelope
        pos += t.size + int(rng.uniform(0.0, 0.08) * RATE)
    peak = np.max(np.abs(out)) or 1.0
    return out / peak * 10 ** (level_db / 20)


def to_wav(samples: Samples) -> bytes:
    """16-bit PCM mono WAV at 8 kHz (clipped to full scale)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def channels_of_wav(data: bytes) -> list[Samples]:
    """Every channel of an 8 kHz 16-bit PCM WAV (a dual-channel recording has one per leg:
    a keypad tone on either must be found)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            if wav.getsampwidth() != 2 or wav.getframerate() != RATE:
                raise WavError("not 8 kHz 16-bit PCM")
            channels = wav.getnchannels()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    except (wave.Error, EOFError) as exc:
        raise WavError("not a WAV file") from exc
    return [pcm[c::channels].astype(np.float64) / 32768.0 for c in range(channels)]


def from_wav(data: bytes) -> Samples:
    """The samples of a mono WAV (the first channel of a multi-channel one)."""
    return channels_of_wav(data)[0]
