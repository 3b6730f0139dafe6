"""A DTMF (keypad tone) detector for call recordings, pure: samples in, tone offsets out.

Each key is one low tone (697, 770, 852, 941 Hz) plus one high tone (1209, 1336, 1477,
1633 Hz). The audio (8 kHz, as Twilio records voice) is cut into 205-sample frames (25.6 ms,
the classic Goertzel length for 8 kHz) every 51 samples; the power at the eight tone
frequencies and at their second harmonics is computed for every frame at once (one matrix
product, the Goertzel bins as a DFT at exactly those frequencies). A frame holds a key when,
as in ITU-T Q.24 receivers:

- the strongest low and the strongest high tone are both above the level floor;
- their levels differ by at most 8 dB either way (twist);
- each beats the other tones of its group by 8 dB or more;
- together they carry most of the frame's energy (speech and noise spread theirs);
- their second harmonics are at least 10 dB down, and the low tone's third at least 22 dB
  (a voice is a comb of harmonics, so a vowel whose formants sit on two DTMF frequencies
  still has energy three times up; a tone pair has none; a low tone's second harmonic that
  falls next to the key's own high tone is not counted).

A key is reported when the same key holds in five consecutive frames or more: every 40 ms
tone passes and no 23 ms one does (ITU-T Q.24's accept and reject durations). Only where a
tone is, never which key: the result carries offsets, so nothing downstream can log a digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["FRAME", "HOP", "RATE", "ToneSpan", "detect_tones"]

RATE: Final = 8000
FRAME: Final = 205
HOP: Final = 51
LOW: Final = (697.0, 770.0, 852.0, 941.0)
HIGH: Final = (1209.0, 1336.0, 1477.0, 1633.0)
_FREQS: Final = (*LOW, *HIGH, *(2 * f for f in LOW), *(2 * f for f in HIGH),
                 *(3 * f for f in LOW))
# Thresholds (powers are mean-square amplitudes of full-scale = 1.0 audio).
_MIN_TONE_POWER: Final = 10 ** (-45 / 10)  # each tone at least -45 dBFS (mean square)
_MAX_TWIST_DB: Final = 9.0  # 8 dB, plus what ±1.5 % off-frequency costs in the window
_GROUP_MARGIN: Final = 10 ** (8 / 10)  # the chosen tone vs the rest of its group
_MIN_SHARE: Final = 0.55  # of the frame's energy in the two tones
_HARMONIC_FLOOR: Final = 10 ** (-10 / 10)  # second harmonic vs its fundamental
_THIRD_FLOOR: Final = 10 ** (-22 / 10)  # the low tone's third harmonic vs the low tone
_MIN_FRAMES: Final = 5  # 5 frames 51 samples apart: 40 ms tones pass, 23 ms never
# A low tone's second harmonic within the window's main lobe of the key's high tone (770 Hz
# → 1540 Hz beside 1477 Hz, 697 → 1394 beside 1336 …) cannot be told from that tone: for
# those pairs only the high tone's harmonic is checked.
_HIDDEN_HARMONIC: Final = np.array([[abs(2 * lo - hi) < 100 for hi in HIGH] for lo in LOW])


@dataclass(frozen=True, slots=True)
class ToneSpan:
    """Where a keypad tone sounds, in seconds from the start of the audio."""

    start: float
    end: float


def _basis() -> npt.NDArray[np.float64]:
    n = np.arange(FRAME)
    angles = 2 * np.pi * np.outer(n, np.asarray(_FREQS)) / RATE
    # Hann window: keeps a strong tone's sidelobes out of its neighbours' bins.
    window = np.hanning(FRAME)[:, None]
    return np.concatenate([np.cos(angles) * window, np.sin(angles) * window], axis=1)


_BASIS: Final = _basis()
# Mean-square amplitude of a unit sine seen through the window: scales bins to tone powers.
_GAIN: Final = float(np.sum(np.hanning(FRAME)) ** 2 / 2)


def _frames(samples: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    if samples.size < FRAME:
        return np.empty((0, FRAME))
    view = np.lib.stride_tricks.sliding_window_view(samples, FRAME)
    return np.asarray(view[::HOP])


def tone_frames(samples: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Per frame, the key index (0-15) it holds, or -1."""
    frames = _frames(samples)
    if not frames.size:
        return np.empty(0, dtype=np.int64)
    bins = frames @ _BASIS
    k = len(_FREQS)
    power = (bins[:, :k] ** 2 + bins[:, k:] ** 2) / _GAIN  # mean-square power of each tone
    energy = np.mean(frames ** 2, axis=1) + 1e-12
    low, high = power[:, 0:4], power[:, 4:8]
    lo_i, hi_i = np.argmax(low, axis=1), np.argmax(high, axis=1)
    rows = np.arange(len(frames))
    lo_p, hi_p = low[rows, lo_i], high[rows, hi_i]
    lo_rest = np.sort(low, axis=1)[:, -2]
    hi_rest = np.sort(high, axis=1)[:, -2]
    twist = 10 * np.log10((lo_p + 1e-15) / (hi_p + 1e-15))
    ok = (
        (lo_p >= _MIN_TONE_POWER) & (hi_p >= _MIN_TONE_POWER)
        & (np.abs(twist) <= _MAX_TWIST_DB)
        & (lo_p >= _GROUP_MARGIN * lo_rest) & (hi_p >= _GROUP_MARGIN * hi_rest)
        & ((lo_p + hi_p) >= _MIN_SHARE * energy)
        & ((power[rows, 8 + lo_i] <= _HARMONIC_FLOOR * lo_p) | _HIDDEN_HARMONIC[lo_i, hi_i])
        & (power[rows, 12 + hi_i] <= _HARMONIC_FLOOR * hi_p)
        & (power[rows, 16 + lo_i] <= _THIRD_FLOOR * lo_p)
    )
    return np.where(ok, lo_i * 4 + hi_i, -1).astype(np.int64)


def detect_tones(samples: npt.NDArray[np.float64]) -> list[ToneSpan]:
    """Every keypad tone in `samples` (8 kHz mono, full scale = 1.0), merged per key press."""
    keys = tone_frames(samples)
    spans: list[ToneSpan] = []
    run_key, run_start, run_len = -1, 0, 0
    for i, key in enumerate([*keys.tolist(), -1]):
        if key == run_key and key >= 0:
            run_len += 1
            continue
        if run_key >= 0 and run_len >= _MIN_FRAMES:
            spans.append(ToneSpan(run_start * HOP / RATE,
                                  ((run_start + run_len - 1) * HOP + FRAME) / RATE))
        run_key, run_start, run_len = key, i, 1
    return spans
