"""The recording vault as `make run` serves it (issue 17): a Gather-mode call and an
agent-assisted call each leave one certified, encrypted recording and no copy at the
simulated Twilio; `vaultline recordings list|export|scan|public-key` work as a listener and an
operator use them; a tampered stored file is refused with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.devstack import VAULTLINE, Stack
from vaultline.recordings.audio import from_wav
from vaultline.recordings.dtmf import detect_tones

pytestmark = pytest.mark.e2e


def _vaultline(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}
    return subprocess.run([*VAULTLINE, "--home", str(home), *args], capture_output=True,
                          text=True, timeout=120, check=False, env=env)


def _sim_recordings(info: dict) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(  # noqa: S310 - the stack's loopback simulator
            info["twilio_api_base_url"] + "/_sim/recordings", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_calls_leave_certified_encrypted_recordings_a_listener_can_play(
    home: Path, tmp_path: Path,
) -> None:
    stack = Stack(home)
    info = stack.up()
    try:
        assert _vaultline(home, "sim", "call", "--flow", "card_capture").returncode == 0
        agent = _vaultline(home, "sim", "agent-call", "--key-delay", "0")
        assert agent.returncode == 0, agent.stdout[-2000:] + agent.stderr[-2000:]
        deadline = time.monotonic() + 30
        while True:
            listing = _vaultline(home, "recordings", "list")
            assert listing.returncode == 0, listing.stderr
            rows = [line.split() for line in listing.stdout.splitlines()[1:]]
            if len(rows) == 2 and all(r[3] == "certified" for r in rows):
                break
            assert time.monotonic() < deadline, listing.stdout
            time.sleep(0.5)
        # No copy left at (the simulated) Twilio; ours are encrypted files.
        assert all(r["deleted"] for r in _sim_recordings(info).values())
        stored = sorted(Path(info["recordings_dir"]).glob("RE*.wav.enc"))
        assert [p.name.split(".")[0] for p in stored] == sorted(r[0] for r in rows)

        sid = rows[0][0]
        out = tmp_path / "listen.wav"
        exported = _vaultline(home, "recordings", "export", sid, "--output", str(out),
                              "--purpose", "e2e review")
        assert exported.returncode == 0, exported.stderr
        assert out.read_bytes()[:4] == b"RIFF" and out.stat().st_mode & 0o077 == 0
        assert detect_tones(from_wav(out.read_bytes())) == []
        # The CRM's and the admin's certificates get no key.
        for who in ("crm", "admin"):
            refused = _vaultline(home, "recordings", "export", sid, "--output",
                                 str(tmp_path / f"{who}.wav"), "--as", who)
            assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
            assert not (tmp_path / f"{who}.wav").exists()

        scan = _vaultline(home, "recordings", "scan")
        assert scan.returncode == 0 and "2 recording(s) scanned, 0 changed" in scan.stdout
        key = _vaultline(home, "recordings", "public-key")
        assert key.stdout.startswith("-----BEGIN PUBLIC KEY-----")

        # A stored file altered on disk: the listener's machine refuses it, clearly.
        path = Path(info["recordings_dir"]) / f"{sid}.wav.enc"
        media = bytearray(path.read_bytes())
        media[100] ^= 0x40
        path.write_bytes(bytes(media))
        tampered = _vaultline(home, "recordings", "export", sid, "--output",
                              str(tmp_path / "tampered.wav"))
        assert tampered.returncode == 1
        assert f"{sid}: the recording is not the one stored" in tampered.stderr
        assert not (tmp_path / "tampered.wav").exists()
    finally:
        assert stack.interrupt() == 0
