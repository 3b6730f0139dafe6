"""The DTMF detector on generated audio: true and false positive rates across levels, twists,
frequency offsets and a speech-like background; Q.24's durations; speech without tones."""

from __future__ import annotations

import numpy as np
import pytest

from vaultline.recordings.audio import KEYS, dtmf, from_wav, silence, speech_like, to_wav
from vaultline.recordings.dtmf import ToneSpan, detect_tones


def _with_speech(tone: np.ndarray, seed: int, snr_db: float) -> np.ndarray:
    x = np.concatenate([silence(0.05), tone, silence(0.05)])
    level = 20 * np.log10(np.max(np.abs(tone)))
    return x + speech_like(x.size / 8000, seed=seed, level_db=level - snr_db)


def test_tones_are_found_across_levels_twists_and_offsets_over_speech() -> None:
    """Every key, 50 ms, at -6 to -33 dBFS, twist ±7 dB, ±1.5 % off frequency, over a voice
    15 dB down: at least 97 % found, each exactly once."""
    found = total = 0
    for level in (-6, -15, -25, -33):
        for twist in (-7, -4, 0, 4, 7):
            for offset in (-0.015, 0.0, 0.015):
                for key in KEYS:
                    total += 1
                    spans = detect_tones(_with_speech(dtmf(key, 0.05, level, twist, offset),
                                                      total, 15))
                    assert len(spans) <= 1
                    found += len(spans)
    assert found / total >= 0.97, f"{found}/{total}"


def test_speech_without_tones_is_never_a_tone() -> None:
    """400 s of voice-like audio — vowels whose formants sit on DTMF frequencies included —
    and not one detection."""
    assert sum(len(detect_tones(speech_like(10, seed=1000 + s, level_db=-10)))
               for s in range(40)) == 0


@pytest.mark.parametrize(("seconds", "detected"), [(0.023, 0), (0.040, 1), (0.1, 1)])
def test_q24_durations(seconds: float, detected: int) -> None:
    for key in KEYS:
        audio = np.concatenate([silence(0.05), dtmf(key, seconds), silence(0.05)])
        assert len(detect_tones(audio)) == detected, key


def test_spans_say_where_and_never_which_key() -> None:
    audio = np.concatenate([silence(1.0), dtmf("5", 0.1), silence(0.5), dtmf("9", 0.08),
                            silence(0.3)])
    first, second = detect_tones(audio)
    assert abs(first.start - 1.0) < 0.03 and abs(first.end - 1.1) < 0.03
    assert abs(second.start - 1.6) < 0.03 and abs(second.end - 1.68) < 0.03
    assert set(ToneSpan.__slots__) == {"start", "end"}


def test_tones_far_off_frequency_or_badly_twisted_are_not_keys() -> None:
    for key in KEYS:
        assert detect_tones(dtmf(key, 0.1, twist_db=14)) == []
        assert detect_tones(dtmf(key, 0.1, offset=0.06)) == []


def test_silence_and_short_audio() -> None:
    assert detect_tones(silence(2)) == [] and detect_tones(silence(0.01)) == []


def test_wav_round_trip() -> None:
    audio = np.concatenate([speech_like(0.5, seed=3), dtmf("1", 0.1)])
    back = from_wav(to_wav(audio))
    assert back.size == audio.size and np.max(np.abs(back - audio)) < 1e-4
    assert len(detect_tones(back)) == 1


def test_a_tone_on_either_leg_of_a_dual_channel_recording_is_found() -> None:
    """Twilio's dual-channel recordings put each leg on its own channel: the customer's keys
    may be on the second one only."""
    import io
    import wave

    from vaultline.recordings.audio import channels_of_wav
    from vaultline.recordings.ingest import _tones_in_any

    agent = speech_like(1.0, seed=9)
    customer = np.concatenate([silence(0.4), dtmf("7", 0.1), silence(0.5)])
    pcm = np.empty(agent.size * 2, dtype="<i2")
    pcm[0::2] = (agent * 32767).astype("<i2")
    pcm[1::2] = (customer * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(pcm.tobytes())
    channels = channels_of_wav(buffer.getvalue())
    assert len(channels) == 2 and detect_tones(channels[0]) == []
    (span,) = _tones_in_any(channels)
    assert abs(span.start - 0.4) < 0.03
