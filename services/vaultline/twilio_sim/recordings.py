"""The simulator's call recordings: real 8 kHz audio, Twilio's Voice Recording Encryption, the
Recording resource and the recording status callback.

A finished recorded call is rendered from its timeline: speech-like audio for every prompt
heard and silence between, and for every key pressed while the recording ran, the key's
standard DTMF tone pair (100 ms). Paused intervals are left out (`PauseBehavior=skip`) or
silent (`silence`). So a flow that forgets to pause during card entry leaves real tones in the
recording, for the detector to find.

With a public key registered (`POST /v1/Credentials/PublicKeys`, as Twilio's accounts API),
the media is encrypted as Twilio does: a fresh AES-256-GCM content key and 96-bit IV, the tag
appended, no associated data; the key wrapped with RSAES-OAEP (SHA-256, MGF1-SHA-256);
`EncryptionDetails` carries `public_key_sid`, `encrypted_cek` and `iv` (base64).

REST (HTTP Basic):

    POST /v1/Credentials/PublicKeys                                  register a public key
    GET  /2010-04-01/Accounts/{AccountSid}/Recordings/{Sid}.json     the Recording resource
    GET  /2010-04-01/Accounts/{AccountSid}/Recordings/{Sid}[.wav]    the (encrypted) media
    DELETE /2010-04-01/Accounts/{AccountSid}/Recordings/{Sid}.json   204, then 404
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..recordings.audio import KEYS, dtmf, silence, speech_like, to_wav
from .payments import twilio_error, twilio_time

__all__ = ["SimRecording", "SimRecordings", "render"]

TONE_SECONDS = 0.1
MAX_GAP_SECONDS = 3.0  # long silences are shortened: the audio stays small, tones stay


@dataclass
class SimRecording:
    sid: str
    call_sid: str
    media: bytes = field(repr=False)
    duration: int
    encryption: dict[str, str] | None = None
    deleted: bool = False
    created: str = ""


def render(call: Any) -> np.ndarray:
    """The call's audio as its recording captured it (see the module doc)."""
    parts: list[np.ndarray] = []
    events = [e for e in call.timeline if e.kind in ("heard", "pressed", "recording", "hangup")]
    for event, following in zip(events, [*events[1:], None], strict=True):
        gap = max(0.0, min((following.t if following is not None else event.t) - event.t,
                           MAX_GAP_SECONDS))
        state = event.recording
        if state == "paused" and call.pause_behavior != "silence":
            continue  # skipped while paused
        if state not in ("in-progress", "paused"):
            continue
        if state == "paused" or event.kind not in ("heard", "pressed"):
            parts.append(silence(gap))
        elif event.kind == "heard":
            seed = int.from_bytes(hashlib.sha256(event.detail.encode()).digest()[:4], "big")
            parts.append(speech_like(max(gap, 0.3), seed=seed))
        elif event.detail in KEYS:
            parts.append(np.concatenate([dtmf(event.detail, TONE_SECONDS),
                                         silence(max(gap - TONE_SECONDS, 0.05))]))
    return np.concatenate(parts) if parts else silence(0.5)


class SimRecordings:
    """Owned by a `TwilioSim`; its REST handlers are registered there."""

    def __init__(self, sim: Any) -> None:
        self._sim = sim
        self.recordings: dict[str, SimRecording] = {}
        self.public_keys: dict[str, rsa.RSAPublicKey] = {}  # by CR… sid
        self.current_key: str | None = None
        self.status_callback: str | None = None  # the account's recording status callback
        self.callbacks: list[dict[str, str]] = []
        self.delete_fault: int | None = None  # answer DELETE with this status (tests)

    # ---- finishing a call's recording -----------------------------------------------------------

    async def finish(self, call: Any) -> SimRecording | None:
        """Render, encrypt and keep the call's recording, then post the status callback."""
        if call.recording_sid is None or call.recording_sid in self.recordings:
            return None
        return await self._keep(call.recording_sid, call.sid, to_wav(render(call)))

    async def synthetic(self, count: int, seconds: float) -> tuple[list[str], float]:
        """`count` recordings of `seconds` of speech (one rendering, encrypted one by one),
        announced together as calls ending at once would be (benchmarks); with the seconds
        the rendering and encryption took, before the first announcement."""
        started = time.perf_counter()
        wav = to_wav(speech_like(seconds, seed=7))
        kept = [await self._keep("RE" + secrets.token_hex(16), "CA" + secrets.token_hex(16),
                                 wav, announce=False) for _ in range(count)]
        prepared = time.perf_counter() - started
        await asyncio.gather(*(self._post_callback(r) for r in kept if r is not None))
        return [r.sid for r in kept if r is not None], prepared

    async def _keep(self, sid: str, call_sid: str, wav: bytes, *, announce: bool = True
                    ) -> SimRecording | None:
        duration = max(1, round((len(wav) - 44) / 2 / 8000))
        encryption = None
        if self.current_key is not None:
            cek, iv = AESGCM.generate_key(bit_length=256), os.urandom(12)
            media = AESGCM(cek).encrypt(iv, wav, None)
            wrapped = self.public_keys[self.current_key].encrypt(cek, padding.OAEP(
                mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
            encryption = {"public_key_sid": self.current_key, "type": "rsa-oaep-sha256",
                          "encrypted_cek": base64.b64encode(wrapped).decode(),
                          "iv": base64.b64encode(iv).decode()}
        else:
            media = wav
        recording = SimRecording(sid, call_sid, media, duration, encryption, created=twilio_time())
        self.recordings[recording.sid] = recording
        if self.status_callback and announce:
            await self._post_callback(recording)
        return recording

    async def control_synthetic(self, request: web.Request) -> web.Response:
        """Control path (not Twilio): `{"count": N, "seconds": S}` → synthetic recordings."""
        if request.remote not in ("127.0.0.1", "::1"):
            return web.Response(status=403)
        spec = await request.json()
        count, seconds = int(spec.get("count", 1)), float(spec.get("seconds", 60))
        if not (1 <= count <= 1000 and 1 <= seconds <= 3600):
            return web.Response(status=400)
        sids, prepared = await self.synthetic(count, seconds)
        return web.json_response({"sids": sids, "prepared_seconds": prepared})

    async def control_state(self, request: web.Request) -> web.Response:
        """Control path (not Twilio): which recordings Twilio still holds."""
        if request.remote not in ("127.0.0.1", "::1"):
            return web.Response(status=403)
        return web.json_response({sid: {"deleted": r.deleted, "bytes": len(r.media)}
                                  for sid, r in self.recordings.items()})

    async def _post_callback(self, recording: SimRecording) -> None:
        base = self._sim.rest_base_url
        params = {
            "AccountSid": self._sim.account_sid, "CallSid": recording.call_sid,
            "RecordingSid": recording.sid,
            "RecordingUrl": f"{base}/2010-04-01/Accounts/{self._sim.account_sid}/Recordings/"
                            f"{recording.sid}",
            "RecordingStatus": "completed", "RecordingDuration": str(recording.duration),
            "RecordingChannels": "1", "RecordingStartTime": recording.created,
            "RecordingSource": "StartCallRecordingAPI", "RecordingTrack": "both",
        }
        if recording.encryption is not None:
            params["EncryptionDetails"] = json.dumps(recording.encryption)
        self.callbacks.append(params)
        try:
            await self._sim.post(self.status_callback, params)
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass  # as Twilio: the callback is not retried here; tests retry by hand

    async def resend_callback(self, sid: str) -> None:
        """Post a recording's status callback again (Twilio's retries, for tests)."""
        await self._post_callback(self.recordings[sid])

    # ---- REST -----------------------------------------------------------------------------------

    async def register_key(self, request: web.Request) -> web.Response:
        if not self._sim._authorised(request):
            return twilio_error(401, 20003, "Authenticate")
        form = await request.post()
        try:
            key = serialization.load_pem_public_key(str(form.get("PublicKey", "")).encode())
        except ValueError:
            return twilio_error(400, 20001, "PublicKey must be a PEM public key")
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            return twilio_error(400, 20001, "PublicKey must be an RSA key of 2048 bits or more")
        sid = "CR" + secrets.token_hex(16)
        self.public_keys[sid] = key
        self.current_key = sid
        return web.json_response({"sid": sid, "account_sid": self._sim.account_sid,
                                  "friendly_name": str(form.get("FriendlyName", "")),
                                  "date_created": twilio_time(), "date_updated": twilio_time(),
                                  "url": f"https://accounts.twilio.com/v1/Credentials/"
                                         f"PublicKeys/{sid}"}, status=201)

    def _find(self, request: web.Request) -> SimRecording | web.Response:
        if not self._sim._authorised(request):
            return twilio_error(401, 20003, "Authenticate")
        sid = request.match_info["rec"].split(".", 1)[0]
        recording = self.recordings.get(sid)
        if recording is None or recording.deleted:
            return twilio_error(404, 20404, "The requested resource was not found")
        return recording

    async def get(self, request: web.Request) -> web.Response:
        found = self._find(request)
        if isinstance(found, web.Response):
            return found
        if request.match_info["rec"].endswith(".json"):
            return web.json_response({
                "sid": found.sid, "call_sid": found.call_sid,
                "account_sid": self._sim.account_sid, "duration": str(found.duration),
                "status": "completed", "channels": 1, "date_created": found.created,
                "encryption_details": found.encryption, "media_url": None,
            })
        return web.Response(body=found.media, content_type="audio/x-wav")

    async def delete(self, request: web.Request) -> web.Response:
        found = self._find(request)
        if isinstance(found, web.Response):
            return found
        if self.delete_fault is not None:
            return twilio_error(self.delete_fault, 20500, "Internal Server Error")
        found.deleted = True
        found.media = b""
        return web.Response(status=204)
