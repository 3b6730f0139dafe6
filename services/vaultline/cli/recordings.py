"""`vaultline recordings …`: the recording vault from the command line.

    public-key   the PEM to register with Twilio (Voice Recording Encryption)
    list         recordings: SID, call, duration, state          (RecordingService, --as qa)
    play SID     fetch, decrypt here, play through a local player (--as qa)
    export SID   fetch, decrypt here, write a WAV to --output      (--as qa)
    release SID  release a quarantined recording, with a reason   (--as admin)
    purge        delete recordings older than --older-than days   (--as admin)
    scan         re-check every stored recording for keypad tones (inside the zone: the
                 recording AppRole and the IVR's database role)

Listening never writes plaintext audio anywhere but the explicit --output of `export`; `play`
pipes it to the player. The server never decrypts audio for a client: it hands over the
encrypted media and, to an allowed identity with a stated purpose, the content key.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, env_or_stack, stack_value
from .common import add_identity_option, tokenizer_channel

__all__ = ["add_recordings_commands"]

_STATES = {1: "received", 2: "stored", 3: "certified", 4: "quarantined", 5: "unencrypted",
           6: "corrupt"}
# Players that read a WAV on standard input, in order of preference.
_PLAYERS = (["aplay", "-q", "-"], ["paplay"], ["ffplay", "-nodisp", "-autoexit", "-loglevel",
                                                   "quiet", "-"])


def _recording_keys(home: str) -> Any:
    from ..vault import RECORDINGS_KEY, AppRoleCredentials, TransitClient

    addr = env_or_stack("VAULTLINE_VAULT_ADDR", home, "vault_addr")
    approle = os.environ.get("VAULTLINE_RECORDINGS_APPROLE_FILE") or stack_value(
        home, "credentials.recordings_approle")
    if not approle:
        raise ConfigError("VAULTLINE_RECORDINGS_APPROLE_FILE is not set (the recording "
                          "AppRole), and no dev stack names one")
    return TransitClient(addr, AppRoleCredentials.from_file(approle), key_name=RECORDINGS_KEY)


def cmd_public_key(args: argparse.Namespace) -> int:
    with _recording_keys(args.home) as keys:
        version, pem = keys.public_key_pem()
    print(pem.strip())
    print(f"# vaultline-recordings key version {version}: register it with Twilio "
          "(Console → Voice → Settings → Voice Recording Encryption, or POST "
          "https://accounts.twilio.com/v1/Credentials/PublicKeys)", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..gen.recordings.v1 import recordings_pb2 as pb
    from ..gen.recordings.v1 import recordings_service_pb2_grpc as pb_grpc

    async def main() -> int:
        async with tokenizer_channel(args.home, args.as_) as channel:
            stub = pb_grpc.RecordingServiceStub(channel)
            token, shown = "", 0
            print(f"{'RECORDING':34}  {'CALL':34}  {'LENGTH':>6}  STATE")
            while True:
                page = await stub.ListRecordings(pb.ListRecordingsRequest(
                    tenant=args.tenant, page_size=200, page_token=token))
                for r in page.recordings:
                    state = _STATES.get(r.state, "?")
                    if r.state == pb.RECORDING_STATE_QUARANTINED:
                        state += f" ({len(r.tones)} tones" + (", released)" if r.released
                                                               else ")")
                    print(f"{r.recording_sid:34}  {r.call_sid:34}  {r.duration_seconds:5}s  "
                          f"{state}")
                    shown += 1
                token = page.next_page_token
                if not token or shown >= args.limit:
                    break
            print(f"{shown} recording(s)", file=sys.stderr)
        return 0

    return asyncio.run(main())


async def _fetch_and_open(args: argparse.Namespace) -> bytes:
    """The recording's plaintext WAV, decrypted here: key and media from the service."""
    from ..gen.recordings.v1 import recordings_pb2 as pb
    from ..gen.recordings.v1 import recordings_service_pb2_grpc as pb_grpc
    from ..recordings.envelope import MediaMismatch, open_media

    async with tokenizer_channel(args.home, args.as_) as channel:
        stub = pb_grpc.RecordingServiceStub(channel)
        key = await stub.GetRecordingKey(pb.GetRecordingKeyRequest(
            tenant=args.tenant, recording_sid=args.sid, purpose=args.purpose))
        media = bytearray()
        async for chunk in stub.GetRecordingMedia(pb.GetRecordingMediaRequest(
                tenant=args.tenant, recording_sid=args.sid)):
            media += chunk.chunk
            print(f"\rfetched {len(media) / 1024:,.0f} KiB", end="", file=sys.stderr)
        print(file=sys.stderr)
    if hashlib.sha256(media).hexdigest() != key.media_sha256:
        raise MediaMismatch()
    return open_media(key.content_key, key.iv, bytes(media))


def cmd_export(args: argparse.Namespace) -> int:
    from ..recordings.envelope import MediaTampered

    output = Path(args.output)
    if output.exists() and not args.force:
        raise ConfigError(f"{output} exists (--force replaces it)")
    try:
        wav = asyncio.run(_fetch_and_open(args))
    except MediaTampered as exc:
        print(f"vaultline: {args.sid}: {exc}", file=sys.stderr)
        return 1
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(wav)
    print(f"wrote {output} ({len(wav):,} bytes, decrypted on this machine)", file=sys.stderr)
    return 0


def cmd_play(args: argparse.Namespace) -> int:
    from ..recordings.envelope import MediaTampered

    player = next((p for p in _PLAYERS if shutil.which(p[0])), None)
    if player is None:
        raise ConfigError("no audio player found (aplay, paplay or ffplay); use "
                          "`vaultline recordings export SID --output FILE.wav`")
    try:
        wav = asyncio.run(_fetch_and_open(args))
    except MediaTampered as exc:
        print(f"vaultline: {args.sid}: {exc}", file=sys.stderr)
        return 1
    # Piped: the plaintext never touches the disk.
    return subprocess.run(player, input=wav, check=False).returncode  # noqa: S603


def cmd_release(args: argparse.Namespace) -> int:
    from ..gen.recordings.v1 import recordings_pb2 as pb
    from ..gen.recordings.v1 import recordings_service_pb2_grpc as pb_grpc

    async def main() -> int:
        async with tokenizer_channel(args.home, args.as_) as channel:
            answer = await pb_grpc.RecordingServiceStub(channel).ReleaseRecording(
                pb.ReleaseRecordingRequest(tenant=args.tenant, recording_sid=args.sid,
                                           reason=args.reason))
        print(f"{answer.recording.recording_sid} released for listening (audited)")
        return 0

    return asyncio.run(main())


def cmd_purge(args: argparse.Namespace) -> int:
    from ..gen.recordings.v1 import recordings_pb2 as pb
    from ..gen.recordings.v1 import recordings_service_pb2_grpc as pb_grpc

    days = args.older_than or int(os.environ.get("VAULTLINE_RECORDING_RETENTION_DAYS", "365"))

    async def main() -> int:
        async with tokenizer_channel(args.home, args.as_) as channel:
            answer = await pb_grpc.RecordingServiceStub(channel).PurgeRecordings(
                pb.PurgeRecordingsRequest(older_than_days=days))
        print(f"purged {answer.purged} recording(s) older than {days} days")
        return 0

    return asyncio.run(main())


def cmd_scan(args: argparse.Namespace) -> int:
    from ..ivr_store import IvrStore
    from ..recordings.files import RecordingFiles
    from ..recordings.ingest import ScanFailed, scan_media, sign_certification

    directory = env_or_stack("VAULTLINE_RECORDINGS_DIR", args.home, "recordings_dir")
    dsn = env_or_stack("VAULTLINE_IVR_DATABASE_URL", args.home, "ivr_database_url")
    files = RecordingFiles(Path(directory))

    async def main() -> int:
        store = await IvrStore.connect(dsn, max_size=2)
        changed = failed = 0
        try:
            with _recording_keys(args.home) as keys:
                rows = await store.scannable_recordings()
                for i, row in enumerate(rows, 1):
                    try:
                        media = await asyncio.to_thread(files.get, row["media_file"])
                        tones, wrapped = await scan_media(
                            keys, row["encrypted_cek"], base64.b64decode(row["iv"]), media)
                        state = "quarantined" if tones else "certified"
                        spans = [[round(t.start, 2), round(t.end, 2)] for t in tones]
                    except (ScanFailed, OSError) as exc:
                        state, spans, wrapped = "corrupt", [], row["encrypted_cek"]
                        failed += 1
                        print(f"  {row['sid']}: {exc}", file=sys.stderr)
                    # Every scan is signed afresh: a state written around the ingest (a
                    # database password alone) is corrected and signed here.
                    signature = "" if state == "corrupt" else await sign_certification(
                        keys, row["sid"], state, bytes(row["media_sha256"]), spans)
                    await store.recording_scanned(row["sid"], state, spans, wrapped,
                                                  signature)
                    if state != row["state"] or spans != json.loads(row["tones"]):
                        changed += 1
                        print(f"  {row['sid']}: {row['state']} -> {state}", file=sys.stderr)
                    print(f"\rscanned {i}/{len(rows)}", end="", file=sys.stderr)
                print(file=sys.stderr)
        finally:
            await store.close()
        print(f"{len(rows)} recording(s) scanned, {changed} changed, {failed} unreadable")
        return 1 if failed else 0

    return asyncio.run(main())


def add_recordings_commands(subparsers: Any) -> None:
    rec = subparsers.add_parser("recordings", help="the recording vault (encrypted call "
                                "recordings, certified free of keypad tones)")
    sub = rec.add_subparsers(dest="recordings_command", required=True, metavar="SUBCOMMAND")

    def client(p: Any, default: str) -> None:
        add_identity_option(p, default)
        p.add_argument("--tenant", default="default", help="the tenant (default: default)")

    key = sub.add_parser("public-key", help="print the public key to register with Twilio",
                         description="Print the PEM of OpenBao's recording key (RSA-4096; the "
                         "private half never leaves OpenBao), to register with Twilio for "
                         "Voice Recording Encryption.")
    key.set_defaults(func=cmd_public_key)

    listing = sub.add_parser("list", help="list recordings (metadata only)")
    client(listing, "qa")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many")
    listing.set_defaults(func=cmd_list)

    for name, func, what in (("play", cmd_play, "play a recording (decrypted here, piped to "
                              "aplay, paplay or ffplay; nothing written to disk)"),
                             ("export", cmd_export, "write a recording as a WAV file "
                              "(decrypted here)")):
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        p.add_argument("sid", help="the recording SID (RE…)")
        p.add_argument("--purpose", default="quality review",
                       help="why you listen (audited; default: quality review)")
        client(p, "qa")
        if name == "export":
            p.add_argument("--output", required=True, help="the WAV file to write")
            p.add_argument("--force", action="store_true", help="replace --output")
        p.set_defaults(func=func)

    release = sub.add_parser("release", help="release a quarantined recording (audited)")
    release.add_argument("sid", help="the recording SID (RE…)")
    release.add_argument("--reason", required=True, help="why it may be listened to")
    client(release, "admin")
    release.set_defaults(func=cmd_release)

    purge = sub.add_parser("purge", help="delete old recordings (files and rows)",
                           description="Delete recordings older than --older-than days "
                           "(default VAULTLINE_RECORDING_RETENTION_DAYS, else 365), audited.")
    purge.add_argument("--older-than", type=int, default=0, metavar="DAYS")
    client(purge, "admin")
    purge.set_defaults(func=cmd_purge)

    scan = sub.add_parser("scan", help="re-check stored recordings for keypad tones",
                          description="Decrypt every stored recording in memory and run the "
                          "DTMF detector again, updating certified/quarantined. Runs inside "
                          "the zone: the recording AppRole (VAULTLINE_RECORDINGS_APPROLE_FILE) "
                          "and the IVR's database role (VAULTLINE_IVR_DATABASE_URL), else the "
                          "dev stack's.")
    scan.set_defaults(func=cmd_scan)
