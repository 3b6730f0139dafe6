"""Leak scan (PCI DSS 3.3, 3.5.1): drive the stack as `make run` starts it with every network
test card — successes, refusals and errors — then look for card numbers everywhere a PAN must
not be: every log line, every PostgreSQL table (all columns but the ciphertexts), every gRPC
response other than a reveal, and every file under the state directory.

Zero hits: none of the test PANs, byte for byte, anywhere; and in every text source (logs,
responses, the rows of every table, every file outside PostgreSQL's binary data directory) no
Luhn-valid 13-19 digit run standing on its own that Vaultline itself would accept as a card
number (a known network's range and length). "Standing on its own" (no letter or digit next
to it) keeps hex digests and request ids from counting; raw PostgreSQL pages put tokens next to
binary length bytes, so only the exact test PANs are searched there.

Security codes (issue 15): every card keyed or handed over carries one, and the tokenizer holds
it sealed until the payment service redeems it. American Express codes are the scan's
distinctive `AMEX_CODE`, searched for standing on its own in every text source; any code
following a field name (`cvv`, `security code`…) is a hit too. Redemptions are reveals, and
excluded like them.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import asyncpg
import grpc
import pytest

from tests.fixtures.devstack import VAULTLINE, Stack, stack_channel
from tests.fixtures.infra import PostgresHandle
from tests.helpers import luhn_valid, unique_name
from tests.testcards import ALL_TEST_PANS
from vaultline.batches import RowsDigest
from vaultline.card import CardError, Pan
from vaultline.gen.settlement.v1 import settlement_pb2 as spb
from vaultline.gen.settlement.v1 import settlement_service_pb2_grpc as spb_grpc
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

DIGIT_RUN = re.compile(rb"(?<![0-9A-Za-z])[0-9]{13,19}(?![0-9A-Za-z])")
AMEX_CODE, CODE = "0739", "739"  # every card's security code in this scan (a leading 0:
# no process id, port, count or year looks like it)


def code_for(pan: str) -> str:
    return AMEX_CODE if pan[:2] in ("34", "37") else CODE


# Standing on its own: not inside a number, word, hex digest, UUID, time or decimal.
CODE_ALONE = re.compile(rb"(?<![0-9A-Za-z.:,_-])" + AMEX_CODE.encode() + rb"(?![0-9A-Za-z.:,_-])")
CODE_NAMED = re.compile(rb"(?i)(cvv|cvc|cid|security.?code)[^0-9\n]{0,12}("
                        + AMEX_CODE.encode() + rb"|" + CODE.encode() + rb")(?![0-9])")
# Columns that hold ciphertext by design (AES-GCM card data, transit-wrapped keys) or hashes.
OPAQUE_COLUMNS = {"ciphertext", "wrapped_key", "fingerprint", "content_hash", "prev_hash",
                  "hash", "sealed"}


def _card_like(run: str) -> bool:
    try:
        Pan.parse(run)
    except CardError:
        return False
    return True


def hits(blob: bytes, *, text: bool = True) -> list[str]:
    """Test PANs, and (in text) card-like digit runs, found in `blob`, masked for the report."""
    found = [p[:6] + "…" + p[-4:] + " (test PAN)" for p in ALL_TEST_PANS if p.encode() in blob]
    if text and (CODE_ALONE.search(blob) or CODE_NAMED.search(blob)):
        found.append("a test security code")
    for m in DIGIT_RUN.finditer(blob) if text else ():
        run = m.group().decode()
        if luhn_valid(run) and _card_like(run):
            # Where it is, with every digit of the context hidden, so the report leaks nothing.
            before = re.sub(rb"[0-9]", b"#", blob[max(0, m.start() - 40):m.start()])
            after = re.sub(rb"[0-9]", b"#", blob[m.end():m.end() + 20])
            found.append(f"{run[:6]}…{run[-4:]} ({len(run)} digits) in {before!r}…{after!r}")
    return sorted(set(found))




def _exercise(info: dict) -> list[bytes]:  # type: ignore[type-arg]
    """Every flow with every test card; returns what came back, reveals excluded."""
    seen: list[bytes] = []

    def keep(message: object) -> None:
        seen.append(message.SerializeToString())  # type: ignore[attr-defined]
        seen.append(str(message).encode())

    def refused(call) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(grpc.RpcError) as err:
            call()
        seen.append(f"{err.value.code()} {err.value.details()}".encode())
        seen.append(repr(err.value.trailing_metadata()).encode())

    with stack_channel(info, "intake") as intake, stack_channel(info, "crm") as crm, \
            stack_channel(info, "settlement") as settlement, \
            stack_channel(info, "settlement-2") as approver, \
            stack_channel(info, "admin") as admin:
        tok = pb_grpc.TokenizationServiceStub(intake)
        crm_stub = pb_grpc.TokenizationServiceStub(crm)
        rev = pb_grpc.TokenizationServiceStub(settlement)
        adm = pb_grpc.TokenizationServiceStub(admin)
        tokens = []
        for pan in ALL_TEST_PANS:
            response = tok.Tokenize(pb.TokenizeRequest(card=pb.Card(
                pan=pan, expiry_month=10, expiry_year=2033, cardholder_name="Leak Scan")))
            keep(response)
            tokens.append(response.token.token)
            keep(crm_stub.GetToken(pb.GetTokenRequest(token=response.token.token)))
            # The CRM may not tokenize at all (it would be a card-number oracle).
            refused(lambda p=pan: crm_stub.Tokenize(pb.TokenizeRequest(card=pb.Card(
                pan=p, expiry_month=10, expiry_year=2033))))
            # Errors that carry a PAN in the request: expired card, PAN sent as a token,
            # PAN pasted into a purpose, a role that may not reveal, a wrong tenant.
            refused(lambda p=pan: tok.Tokenize(pb.TokenizeRequest(card=pb.Card(
                pan=p, expiry_month=1, expiry_year=2020))))
            refused(lambda p=pan: tok.GetToken(pb.GetTokenRequest(token=p)))
            refused(lambda p=pan, t=response.token.token: rev.Detokenize(pb.DetokenizeRequest(
                token=t, purpose=f"refund {p}")))
            refused(lambda t=response.token.token: adm.Detokenize(pb.DetokenizeRequest(
                token=t, purpose="x")))
            refused(lambda p=pan: tok.Tokenize(pb.TokenizeRequest(tenant="Bad Tenant", card=pb.Card(
                pan=p, expiry_month=10, expiry_year=2033))))
            # A card number where none belongs: as the tenant, and as the request id.
            refused(lambda p=pan: crm_stub.GetToken(pb.GetTokenRequest(tenant=p, token="tok_x")))
            keep(crm_stub.GetToken(pb.GetTokenRequest(token=response.token.token),
                              metadata=(("x-request-id", pan),)))
        chunk = pb.BatchTokenizeRequest(items=[
            pb.BatchTokenizeRequest.Item(reference=f"r{i}", card=pb.Card(
                pan=pan, expiry_month=10, expiry_year=2033 if i % 2 else 2019))
            for i, pan in enumerate(ALL_TEST_PANS)])
        for response in tok.BatchTokenize(iter([chunk])):
            keep(response)
        # Reveals are the one place a PAN may appear; they still get audited and logged. In
        # bulk only under dual control: a batch created, approved by a second identity, run.
        batch_id = _settle(settlement, approver, tokens, keep)
        request = pb.BatchDetokenizeRequest(batch_id=batch_id, items=[
            pb.BatchDetokenizeRequest.Item(reference=f"leak-{i}", token=t)
            for i, t in enumerate(tokens)])
        revealed = [r.card.card.pan for resp in rev.BatchDetokenize(iter([request]))
                    for r in resp.results]
        assert revealed == ALL_TEST_PANS
        for token in tokens[:3]:
            keep(crm_stub.DeleteToken(pb.DeleteTokenRequest(token=token)))
    return seen


def _settle(settlement: grpc.Channel, approver: grpc.Channel, tokens: list[str],
            keep: Callable[[object], None]) -> str:
    """A settlement batch of `tokens` (references leak-0…), approved and started."""
    rows = [spb.BatchRow(line=i + 2, reference=f"leak-{i}", token=t, amount_minor=100,
                         currency="EUR") for i, t in enumerate(tokens)]
    digest = RowsDigest()
    for r in rows:
        digest.update(r.reference, r.token, r.amount_minor, r.currency, r.auth_code)
    creator = spb_grpc.SettlementServiceStub(settlement)
    created = creator.CreateBatch(iter([spb.CreateBatchRequest(
        input_name="leak.csv", input_sha256="0" * 64, rows=rows)]))
    keep(created)
    keep(spb_grpc.SettlementServiceStub(approver).ApproveBatch(spb.ApproveBatchRequest(
        batch_id=created.batch.batch_id, rows_sha256=digest.hexdigest())))
    keep(creator.StartRun(spb.StartRunRequest(batch_id=created.batch.batch_id)))
    keep(creator.ListBatchRows(spb.ListBatchRowsRequest(batch_id=created.batch.batch_id)))
    return created.batch.batch_id


def _pay_connector(info: dict) -> list[bytes]:  # type: ignore[type-arg]
    """Every test card through the dev stack's Pay Connector endpoint, each sent twice (a
    retry), plus one expired: the answers, for the scan."""
    creds = json.loads(Path(info["pay_connector_credentials_file"]).read_text())
    basic = base64.b64encode(f"{creds['username']}:{creds['password']}".encode()).decode()
    answers = []
    redeemed: list[tuple[str, str]] = []
    for i, pan in enumerate([*ALL_TEST_PANS, ALL_TEST_PANS[0]]):
        expired = i == len(ALL_TEST_PANS)
        body = json.dumps({"method": "tokenize", "transaction_id": f"PKleak{i}",
                           "cardnumber": pan, "cvv": code_for(pan), "expiry_month": "10",
                           "expiry_year": "19" if expired else "33", "postal_code": "94111",
                           "parameters": {}}).encode()
        for _ in range(2):
            request = urllib.request.Request(  # noqa: S310 - the stack's own http:// URL
                info["pay_connector_url"], data=body, headers={
                    "Authorization": f"Basic {basic}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                answer = response.read()
            token = json.loads(answer)["token_id"]
            assert bool(token) is not expired, answer
            answers.append(answer)
        if token and i % 2:
            redeemed.append((token, pan))
    # The payment service redeems half of the held codes (a reveal: not scanned); the other
    # half are still held, sealed, when the database is dumped.
    with stack_channel(info, "payments") as payments:
        stub = pb_grpc.TokenizationServiceStub(payments)
        for token, pan in redeemed:
            got = stub.RedeemSecurityCode(pb.RedeemSecurityCodeRequest(token=token))
            assert got.security_code == code_for(pan)
    return answers


async def _database_dump(info: dict) -> bytes:  # type: ignore[type-arg]
    conn = await asyncpg.connect(info["owner_dsn"])
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        out = []
        for table in tables:
            columns = [r["attname"] for r in await conn.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass"
                " AND attnum > 0 AND NOT attisdropped", table)]
            kept = [c for c in columns if c not in OPAQUE_COLUMNS]
            if not kept:
                continue
            select = ", ".join(f'"{c}"::text' for c in kept)
            for row in await conn.fetch(f'SELECT {select} FROM "{table}"'):  # noqa: S608
                out.append(f"{table}: {tuple(row)}")
        assert any(line.startswith("tokens:") for line in out)
        assert any(line.startswith("audit_log:") for line in out)
        return "\n".join(out).encode()
    finally:
        await conn.close()


def _scan_files(home: Path) -> dict[str, list[str]]:
    report: dict[str, list[str]] = {}
    files = [p for p in home.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "dev-up.log" for p in files)
    assert any("audit" in p.name for p in files), "OpenBao's audit log is scanned too"
    for path in files:
        blob = path.read_bytes()
        relative = path.relative_to(home)
        if found := hits(blob, text=relative.parts[:2] != ("postgres", "pgdata")):
            report[str(relative)] = found
    return report


async def _descope(home: Path, postgres: PostgresHandle, tmp: Path) -> list[bytes]:
    """De-scoping (issue 18) through the stack as an operator runs it: a CRM database (in the
    tests' own PostgreSQL, outside the stack's state: its pages hold the cards by design until
    they are rewritten) and a CSV export, planned, rewritten, verified. Its outputs are
    scanned; the vault's tables, logs and the audit trail are scanned with everything else."""
    name = unique_name("crmleak", 8)
    admin = await asyncpg.connect(postgres.superuser_dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = urllib.parse.urlunsplit(
        urllib.parse.urlsplit(postgres.superuser_dsn)._replace(path=f"/{name}"))
    cards = ALL_TEST_PANS[:12]
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
            await conn.executemany("INSERT INTO notes VALUES ($1, $2)", [
                (i, f"Customer paid with {pan} by phone") for i, pan in enumerate(cards)])
        finally:
            await conn.close()
        export = tmp / "export.csv"
        export.write_text("id,card\n" + "".join(f"{i},{pan}\n" for i, pan in enumerate(cards)))
        plan = tmp / "plan.yaml"
        outputs = []
        for args in (["plan", dsn, "--output", str(plan)],
                     ["run", str(plan), "--dsn", dsn, "--dry-run"],
                     ["run", str(plan), "--dsn", dsn],
                     ["verify", str(plan), "--dsn", dsn],
                     ["csv", str(export), str(tmp / "export.tokens.csv")]):
            done = subprocess.run([*VAULTLINE, "--home", str(home), "descope", *args],
                                  capture_output=True, timeout=120, check=False)
            assert done.returncode == 0, (args[0], done.stdout, done.stderr)
            outputs.append(done.stdout + done.stderr)
        outputs.append(plan.read_bytes())
        outputs.append((tmp / "export.tokens.csv").read_bytes())
        return outputs
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_no_pan_anywhere(home: Path, postgres: PostgresHandle, tmp_path: Path) -> None:
    stack = Stack(home)
    info = stack.up()
    try:
        responses = _exercise(info)
        # Cards keyed in on the phone too: the IVR's sessions, TwiML, logs and CRM events.
        for pan in ("5555555555554444", "378282246310005"):
            call = subprocess.run(
                [*VAULTLINE, "--home", str(home), "sim", "call", "--flow", "card_capture",
                 "--card", pan, "--cvv", code_for(pan)],
                capture_output=True, timeout=120, check=False)
            assert call.returncode == 0, call.stdout.decode()[-2000:]
            responses.append(call.stdout + call.stderr)
        # ... and taken by Twilio's <Pay> in a self-service flow, through the Pay Connector.
        for pan in ("4111111111111111", "371449635398431"):
            call = subprocess.run(
                [*VAULTLINE, "--home", str(home), "sim", "call", "--flow", "card_capture_pay",
                 "--card", pan, "--cvv", code_for(pan), "--no-confirm"],
                capture_output=True, timeout=120, check=False)
            assert call.returncode == 0, call.stdout.decode()[-2000:]
            assert b"outcome success" in call.stdout
            responses.append(call.stdout + call.stderr)
        # And handed over by Twilio's Generic Pay Connector (good, refused and retried).
        responses += _pay_connector(info)
        # An agent-assisted capture: the agent's view, the events, the CRM payload.
        agent = subprocess.run(
            [*VAULTLINE, "--home", str(home), "sim", "agent-call", "--card", "371449635398431",
             "--cvv", AMEX_CODE, "--postal", "94105", "--key-delay", "0"],
            capture_output=True, timeout=120, check=False)
        assert agent.returncode == 0, agent.stdout.decode()[-2000:] + agent.stderr.decode()
        assert b"tones heard by the agent: 0" in agent.stdout
        assert b"card digits keyed while recording: 0" in agent.stdout
        responses.append(agent.stdout + agent.stderr)
        responses += await _descope(home, postgres, tmp_path)
        db = await _database_dump(info)
        # The recording vault holds every call's recording, encrypted: no file is audio
        # (no WAV header, no PCM), and its listing holds no card data either.
        stored = sorted(Path(info["recordings_dir"]).glob("RE*.wav.enc"))
        assert len(stored) >= 4, stored
        for path in stored:
            media = path.read_bytes()
            assert b"RIFF" not in media[:64] and b"WAVEfmt" not in media, path.name
        listing = subprocess.run(
            [*VAULTLINE, "--home", str(home), "recordings", "list"],
            capture_output=True, timeout=60, check=False)
        assert listing.returncode == 0 and b"certified" in listing.stdout, listing.stderr
        responses.append(listing.stdout + listing.stderr)
    finally:
        assert stack.interrupt() == 0
    report: dict[str, list[str]] = {}
    for i, blob in enumerate(responses):
        if found := hits(blob):
            report[f"gRPC response #{i}"] = found
    if found := hits(db):
        report["database"] = found
    report.update(_scan_files(home))
    assert report == {}, f"card numbers found: {report}"


def test_the_scan_finds_a_security_code_and_ignores_look_alikes() -> None:
    for leak in (b"got 0739 from twilio", b'{"cvv": "739"}', b"SecurityCode=0739&x=1",
                 b"security code: 739\n"):
        assert hits(leak) == ["a test security code"], leak
    for benign in (b"ab0739cd", b"uuid 1b2c-0739-aa", b"at 19:07:39,073", b"0.0739 s",
                   b"port 50739", b"cvv: ***", b"security code: 7391"):
        assert hits(benign) == [], benign
