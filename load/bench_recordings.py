"""The recording vault: DTMF scan speed, and ingest throughput for 5-minute recordings.

1. Scan speed (in this process, one core): the detector over `--seconds` of 8 kHz call audio
   (speech-like, with keypad tones), as × real time; beside it, in the same run, the two
   other things certification does to the same recording — AES-256-GCM decryption and WAV
   parsing — as the baseline it is compared with.
2. Ingest (a fresh stack, as `make run` starts it): `--recordings` recordings of `--seconds`
   each, encrypted by the simulated Twilio to OpenBao's recording key, announced at once; the
   IVR downloads, stores (fsync), unwraps each key in OpenBao, decrypts, scans and deletes
   Twilio's copy. Reported as recordings per minute, and audio-minutes ingested per minute.

Usage: python load/bench_recordings.py [--recordings 10] [--seconds 300]
Record the printed figures in load/README.md. A measurement, never a test assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "load"))

from bench import start_stack  # noqa: E402
from bench_capture import sim  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from vaultline.recordings.audio import dtmf, from_wav, speech_like, to_wav  # noqa: E402
from vaultline.recordings.dtmf import detect_tones  # noqa: E402


def scan_speed(seconds: float) -> None:
    audio = speech_like(seconds, seed=3)
    for i, at in enumerate(np.linspace(10, seconds - 10, 20)):  # 20 keys along the way
        start = int(at * 8000)
        tone = dtmf("0123456789"[i % 10], 0.08)
        audio[start:start + tone.size] += tone
    wav = to_wav(audio)
    key, iv = AESGCM.generate_key(bit_length=256), os.urandom(12)
    media = AESGCM(key).encrypt(iv, wav, None)
    best: dict[str, float] = {}
    for _ in range(3):
        started = time.perf_counter()
        plain = AESGCM(key).decrypt(iv, media, None)
        samples = from_wav(plain)
        decoded = time.perf_counter()
        spans = detect_tones(samples)
        scanned = time.perf_counter()
        best["decrypt+parse"] = min(best.get("decrypt+parse", 1e9), decoded - started)
        best["scan"] = min(best.get("scan", 1e9), scanned - decoded)
    print(f"scan speed: {seconds:g} s of audio, {len(spans)} of 20 keys found")
    print(f"  DTMF scan            {best['scan'] * 1000:8.1f} ms  = "
          f"{seconds / best['scan']:8,.0f} × real time (one core)")
    print(f"  decrypt + WAV parse  {best['decrypt+parse'] * 1000:8.1f} ms  = "
          f"{seconds / best['decrypt+parse']:8,.0f} × real time (baseline)")
    print(f"  ratio scan / baseline {best['scan'] / best['decrypt+parse']:7.2f}×")


async def ingest(count: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="vaultline-bench-rec-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o711)
        stack_proc, stack = start_stack(tmp / "home")
        try:
            started = time.perf_counter()
            answer = await asyncio.to_thread(sim, stack, "/_sim/recordings", {
                "count": count, "seconds": seconds})
            sids = answer["sids"]
            # The simulator renders and encrypts first, then announces every recording at
            # once; each announcement is answered once its ingest is through.
            announced = started + answer["prepared_seconds"]
            while True:
                state = await asyncio.to_thread(sim, stack, "/_sim/recordings")
                if all(state[s]["deleted"] for s in sids):
                    break
                if time.perf_counter() - started > 600:
                    raise SystemExit("ingest did not finish in 10 minutes")
                await asyncio.sleep(0.2)
            done = time.perf_counter()
            stored = sorted((tmp / "home" / "recordings").glob("RE*.wav.enc"))
            size = sum(p.stat().st_size for p in stored)
        finally:
            stack_proc.terminate()
            stack_proc.wait(60)
    elapsed = done - announced
    print(f"ingest: {count} recordings of {seconds:g} s ({size / count / 1e6:.1f} MB each, "
          f"encrypted), announced at once")
    print(f"  rendering + encrypting (the simulator)  {announced - started:6.1f} s")
    print(f"  downloaded, stored, certified, deleted  {elapsed:6.1f} s  = "
          f"{count / elapsed * 60:6.1f} recordings/minute = "
          f"{count * seconds / 60 / elapsed * 60:6.0f} audio-minutes/minute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recordings", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=300.0)
    args = parser.parse_args()
    scan_speed(args.seconds)
    asyncio.run(ingest(args.recordings, args.seconds))


if __name__ == "__main__":
    main()
