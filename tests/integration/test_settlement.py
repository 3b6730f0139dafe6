"""Settlement batches end to end: real OpenBao, PostgreSQL and tokenizer over mTLS, the
`settle` commands as subprocesses, and the output decrypted with the real `gpg`."""

from __future__ import annotations

import asyncio
import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.fixtures import tokenizer as fx
from tests.fixtures.infra import PostgresHandle
from tests.fixtures.tokenizer import Running
from tests.helpers import synthetic_pans
from tests.testcards import TEST_CARDS
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.settlement.batch import check_captures
from vaultline.settlement.fileformat import parse_file
from vaultline.settlement.job import SettlementError, create_batch

PYTHON = sys.executable
GPG = shutil.which("gpg") or "/usr/bin/gpg"
GPGCONF = shutil.which("gpgconf") or "/usr/bin/gpgconf"
UNKNOWN_TOKEN = "tok_" + "Q" * 22  # the right shape, never issued


@dataclass
class Processor:
    home: Path  # the processor's GNUPGHOME (holds its secret key)
    public_key: Path

    def decrypt(self, path: Path) -> bytes:
        out = subprocess.run(
            [GPG, "--homedir", str(self.home), "--batch", "--quiet", "--decrypt", str(path)],
            capture_output=True, check=True, timeout=120)
        return out.stdout


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processor]:
    home = tmp_path_factory.mktemp("processor-gnupg")
    os.chmod(home, 0o700)
    gpg = [GPG, "--homedir", str(home), "--batch"]
    subprocess.run([*gpg, "--passphrase", "", "--quick-gen-key",
                    "Test Processor <settlement@processor.example>", "default", "default",
                    "never"], capture_output=True, check=True, timeout=120)
    public = home / "processor.asc"
    exported = subprocess.run([*gpg, "--armor", "--export", "settlement@processor.example"],
                              capture_output=True, check=True, timeout=60)
    public.write_bytes(exported.stdout)
    yield Processor(home, public)
    subprocess.run([GPGCONF, "--homedir", str(home), "--kill", "all"], check=False)


@pytest.fixture
def home(tmp_path: Path, tokenizer: Running, migrated: PostgresHandle,
         test_pki: fx.TestPki) -> Path:
    """A `--home` whose dev/stack.json points the commands at the test stack."""
    clients = {}
    for key, who in (("settlement", "settlement/settlement-1"),
                     ("settlement-2", "settlement/settlement-2"), ("crm", "crm/crm-1")):
        cert = test_pki.certs[who]
        (tmp_path / f"{key}.crt").write_bytes(cert.cert_pem)
        (tmp_path / f"{key}.key").write_bytes(cert.key_pem)
        clients[key] = {"cert": str(tmp_path / f"{key}.crt"), "key": str(tmp_path / f"{key}.key")}
    # No database_url: the commands are clients of the tokenizer and nothing else.
    stack = {"grpc_address": tokenizer.server.address, "ca": str(test_pki.ca),
             "clients": clients}
    (tmp_path / "home" / "dev").mkdir(parents=True)
    (tmp_path / "home" / "dev" / "stack.json").write_text(json.dumps(stack))
    return tmp_path / "home"


@dataclass
class Result:
    code: int
    out: str
    err: str


LOG: list[str] = []  # every command's output, for the leak scan


def settle_argv(home: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "vaultline.cli", "--home", str(home), "settle", *args]


def settle_env() -> dict[str, str]:
    """This environment without VAULTLINE_* overrides: the commands use the test home's stack."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}


async def settle(home: Path, *args: str) -> Result:
    """Run `settle …` in a subprocess; async, since the tokenizer serves from this loop."""
    proc = await asyncio.create_subprocess_exec(
        *settle_argv(home, *args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=settle_env())
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    result = Result(proc.returncode or 0, out.decode(), err.decode())
    LOG.append(result.out + result.err)
    return result


async def tokenize(tokenizer: Running, pans: list[str]) -> list[str]:
    items = [pb.BatchTokenizeRequest.Item(reference=str(i), card=pb.Card(
        pan=pan, expiry_month=1 + i % 12, expiry_year=2030 + i % 5))
        for i, pan in enumerate(pans)]
    chunks = [pb.BatchTokenizeRequest(items=items[o:o + 500]) for o in range(0, len(items), 500)]
    tokens = []
    async for response in tokenizer.stub.BatchTokenize(iter(chunks)):
        for result in response.results:
            assert result.WhichOneof("outcome") == "token"
            tokens.append(result.token.token)
    return tokens


async def approved_batch(home: Path, tmp_path: Path, tokens: list[str], *, prefix: str,
                         currency: str) -> str:
    """A batch of `tokens` (references prefix0…, amounts 1, 2, …), created and approved."""
    captures = tmp_path / "captures.csv"
    captures.write_text("reference,token,amount_minor,currency\n" + "".join(
        f"{prefix}{i},{t},{i + 1},{currency}\n" for i, t in enumerate(tokens)))
    batch = batch_id_of(await settle(home, "create", "--input", str(captures)))
    approved = await settle(home, "approve", batch, "--input", str(captures))
    assert approved.code == 0, approved.err
    return batch


def batch_id_of(result: Result) -> str:
    assert result.code == 0, result.err
    return result.out.split()[2].rstrip(":")


async def audit_rows(dsn: str, batch_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT identity, method, outcome, token, tokens FROM audit_log"
                                " WHERE purpose = $1 ORDER BY seq", batch_id)
    finally:
        await conn.close()


async def test_create_approve_run_decrypt_and_verify(
    home: Path, tokenizer: Running, processor: Processor, migrated: PostgresHandle,
    tmp_path: Path,
) -> None:
    pans = [p for brand in ("VISA", "MASTERCARD", "AMEX", "DISCOVER") for p in TEST_CARDS[brand]]
    tokens = await tokenize(tokenizer, pans)
    deleted = tokens[1]
    await tokenizer.stub.DeleteToken(pb.DeleteTokenRequest(token=deleted))
    lines = ["reference,token,amount_minor,currency,auth_code"]
    expected = {}
    for i, (pan, token) in enumerate(zip(pans, tokens, strict=True)):
        currency = "EUR" if i % 3 else "USD"
        lines.append(f"ref-{i},{token},{100 + i},{currency},AC{i}")
        expected[f"ref-{i}"] = (pan, 100 + i, currency, f"AC{i}", 1 + i % 12, (2030 + i % 5) % 100)
    lines.append(f"ref-unknown,{UNKNOWN_TOKEN},999,EUR,")
    captures = tmp_path / "captures.csv"
    captures.write_text("\n".join(lines) + "\n")

    # A file with problems creates nothing and names every bad line.
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([*lines[:3], f"ref-0,{tokens[3]},5,EUR,", f"x,{pans[0]},0,EUR,"])
                   + "\n")
    refused = await settle(home, "create", "--input", str(bad))
    assert refused.code == 1
    assert "line 4: reference: duplicate of line 2" in refused.err
    assert "line 5: token" in refused.err and "line 5: amount_minor" in refused.err

    batch = batch_id_of(await settle(home, "create", "--input", str(captures)))
    out = tmp_path / "out"

    # Not approved yet: no run. The creator cannot approve.
    early = await settle(home, "run", batch, "--recipient", str(processor.public_key),
                   "--output", str(out))
    assert early.code == 1 and "not approved" in early.err
    assert not out.exists() or not any(out.iterdir())
    reviewed = ("--input", str(captures))
    own = await settle(home, "approve", batch, *reviewed, "--as", "settlement")
    assert own.code == 1 and "PERMISSION_DENIED (OWN_BATCH)" in own.err
    crm = await settle(home, "approve", batch, *reviewed, "--as", "crm")
    assert crm.code == 1 and "METHOD_NOT_ALLOWED" in crm.err
    # Approving names what was reviewed: another file's rows are refused.
    wrong = await settle(home, "approve", batch, "--input", str(bad_but_valid(tmp_path, lines)),
                         "--as", "settlement-2")
    assert wrong.code == 1 and "ROWS_DIGEST_MISMATCH" in wrong.err
    ok = await settle(home, "approve", batch, *reviewed, "--as", "settlement-2")
    assert ok.code == 0, ok.err
    again = await settle(home, "approve", batch, *reviewed, "--as", "settlement-2")
    assert again.code == 1 and "BATCH_NOT_AWAITING_APPROVAL" in again.err

    run = await settle(home, "run", batch, "--recipient", str(processor.public_key),
                 "--output", str(out), "--chunk", "5")
    assert run.code == 0, run.err
    assert "progress:" in run.err  # plain lines when not on a terminal
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{batch}.rejects.csv", f"{batch}.summary.json", f"{batch}.vlsf.gpg"]
    encrypted = out / f"{batch}.vlsf.gpg"
    assert not any(pan.encode() in encrypted.read_bytes() for pan in pans)

    parsed = parse_file(processor.decrypt(encrypted))  # verifies checks, sequence, trailer
    assert parsed.batch_id == batch and parsed.input_rows == len(pans) + 1
    want = {ref: e for ref, e in expected.items() if ref != "ref-1"}
    assert [d.reference for d in parsed.details] == list(want)
    for d in parsed.details:
        pan, amount, currency, auth, month, year = want[d.reference]
        # Expiry: the vault keeps the newest seen for a card in the tenant, and other tests
        # tokenize these test cards in "default" too.
        assert (d.pan, d.amount_minor, d.currency, d.auth_code) == (pan, amount, currency, auth)
        assert (d.expiry[2:], d.expiry[:2]) >= (f"{year:02d}", f"{month:02d}")
    totals: dict[str, int] = {}
    for _pan, amount, currency, *_ in want.values():
        totals[currency] = totals.get(currency, 0) + amount
    assert parsed.totals == totals

    rejects = list(csv.reader(io.StringIO((out / f"{batch}.rejects.csv").read_text())))
    assert rejects[0] == ["reference", "token", "reason"]
    assert sorted(r[0] for r in rejects[1:]) == ["ref-1", "ref-unknown"]
    assert {r[2] for r in rejects[1:]} == {"TOKEN_NOT_FOUND"}

    summary = json.loads((out / f"{batch}.summary.json").read_text())
    assert summary["records"] == len(want) and summary["rejected"] == 2
    assert summary["reconciled"] is True
    assert summary["file_sha256"] == hashlib.sha256(encrypted.read_bytes()).hexdigest()
    eur = summary["currencies"]["EUR"]
    assert eur["written"]["amount_minor"] == totals["EUR"]
    assert eur["rejected"]["amount_minor"] + eur["written"]["amount_minor"] == \
        eur["input"]["amount_minor"]

    # A done batch is not run again.
    rerun = await settle(home, "run", batch, "--recipient", str(processor.public_key),
                   "--output", str(out))
    assert rerun.code == 0 and "already done" in rerun.out
    assert encrypted.read_bytes() and sorted(p.name for p in out.iterdir()) == files
    status = await settle(home, "status", batch, "--json")
    info = json.loads(status.out)
    assert info["state"] == "done" and info["approved_by"].endswith("settlement-2")
    assert info["created_by"].endswith("settlement-1")
    assert batch in (await settle(home, "list")).out

    # Audit, by the tokenizer: creation, refusals, approval, the run, and one reveal per
    # resolved token.
    rows = await audit_rows(_superuser(migrated), batch)
    changes = {"CreateBatch", "ApproveBatch", "StartRun", "FinishRun", "AbandonRun"}
    events = [(r["method"], r["outcome"], r["identity"].rsplit("/", 1)[1]) for r in rows
              if r["method"] in changes]
    assert events == [
        ("CreateBatch", "OK", "settlement-1"),
        ("ApproveBatch", "PERMISSION_DENIED", "settlement-1"),
        ("ApproveBatch", "PERMISSION_DENIED", "crm-1"),
        ("ApproveBatch", "INVALID_ARGUMENT", "settlement-2"),
        ("ApproveBatch", "OK", "settlement-2"),
        ("ApproveBatch", "FAILED_PRECONDITION", "settlement-2"),
        ("StartRun", "OK", "settlement-1"), ("FinishRun", "OK", "settlement-1"),
    ]
    # Each chunk's reveal is one record listing every token it revealed, in order.
    revealed = [t for r in rows if r["method"] == "BatchDetokenize" for t in r["tokens"]]
    assert sorted(revealed) == sorted(t for t in tokens if t != deleted)

    # Leak scan: no PAN in any command output, nor in any output file but the encrypted one.
    for pan in pans:
        for text in LOG:
            assert pan not in text
        for path in out.iterdir():
            if path != encrypted:
                assert pan.encode() not in path.read_bytes()


def bad_but_valid(tmp_path: Path, lines: list[str]) -> Path:
    """A valid capture file with other rows than `lines` (its first row's amount changed)."""
    other = tmp_path / "other.csv"
    first = lines[1].split(",")
    first[2] = str(int(first[2]) + 1)
    other.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    return other


def _superuser(pg: PostgresHandle) -> str:
    import urllib.parse

    parts = urllib.parse.urlsplit(pg.superuser_dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/vaultline"))


async def test_killed_run_leaves_no_output_and_rerun_gives_one_complete_file(
    home: Path, tokenizer: Running, processor: Processor, tmp_path: Path,
) -> None:
    n = 3000
    tokens = await tokenize(tokenizer, synthetic_pans(n, start=700_000))
    batch = await approved_batch(home, tmp_path, tokens, prefix="k", currency="GBP")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        settle_argv(home, "run", batch, "--recipient", str(processor.public_key),
                    "--output", str(out), "--chunk", "10"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=settle_env())
    deadline = time.monotonic() + 60
    # Kill it once the encrypted temp file has grown (rows are being written).
    while time.monotonic() < deadline:
        temps = list(out.glob(f".{batch}.vlsf.gpg.*.tmp")) if out.exists() else []
        if temps and temps[0].stat().st_size > 8192:
            break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / f"{batch}.vlsf.gpg").exists()
    assert not (out / f"{batch}.summary.json").exists()
    status = json.loads((await settle(home, "status", batch, "--json")).out)
    assert status["state"] == "running"

    rerun = await settle(home, "run", batch, "--recipient", str(processor.public_key),
                   "--output", str(out), "--chunk", "500")
    assert rerun.code == 0, rerun.err
    assert sorted(p.name for p in out.iterdir()) == [
        f"{batch}.rejects.csv", f"{batch}.summary.json", f"{batch}.vlsf.gpg"]
    parsed = parse_file(processor.decrypt(out / f"{batch}.vlsf.gpg"))
    assert len(parsed.details) == n
    assert [d.reference for d in parsed.details] == [f"k{i}" for i in range(n)]
    assert parsed.totals == {"GBP": n * (n + 1) // 2}
    summary = json.loads((out / f"{batch}.summary.json").read_text())
    assert summary["reconciled"] and summary["rejected"] == 0
    assert json.loads((await settle(home, "status", batch, "--json")).out)["runs"] == 2


async def test_signed_file_verifies_with_the_senders_key(
    home: Path, tokenizer: Running, processor: Processor, tmp_path: Path,
) -> None:
    sender = tmp_path / "sender-gnupg"
    sender.mkdir(mode=0o700)
    gpg = [GPG, "--homedir", str(sender), "--batch"]
    subprocess.run([*gpg, "--passphrase", "", "--quick-gen-key", "Vaultline Sender <s@v.example>",
                    "default", "default", "never"], capture_output=True, check=True, timeout=120)
    secret = tmp_path / "sender-secret.asc"
    secret.write_bytes(subprocess.run([*gpg, "--armor", "--export-secret-keys"],
                                      capture_output=True, check=True).stdout)
    public = subprocess.run([*gpg, "--armor", "--export"], capture_output=True,
                            check=True).stdout
    subprocess.run([GPGCONF, "--homedir", str(sender), "--kill", "all"], check=False)
    subprocess.run([GPG, "--homedir", str(processor.home), "--batch", "--import"],
                   input=public, capture_output=True, check=True)

    (token,) = await tokenize(tokenizer, [TEST_CARDS["VISA"][2]])
    captures = tmp_path / "captures.csv"
    captures.write_text(f"reference,token,amount_minor,currency\ns1,{token},42,CHF\n")
    batch = batch_id_of(await settle(home, "create", "--input", str(captures)))
    assert (await settle(home, "approve", batch, "--input", str(captures))).code == 0
    out = tmp_path / "out"
    run = await settle(home, "run", batch, "--recipient", str(processor.public_key),
                       "--output", str(out), "--sign-key", str(secret))
    assert run.code == 0, run.err
    verified = subprocess.run(
        [GPG, "--homedir", str(processor.home), "--batch", "--status-fd", "2", "--decrypt",
         str(out / f"{batch}.vlsf.gpg")], capture_output=True, check=True, timeout=60)
    assert b"[GNUPG:] GOODSIG" in verified.stderr
    parsed = parse_file(verified.stdout)
    assert [(d.reference, d.pan) for d in parsed.details] == [("s1", TEST_CARDS["VISA"][2])]
    assert json.loads((out / f"{batch}.summary.json").read_text())["signed"] is True


async def settle_on_terminal(home: Path, *args: str) -> Result:
    """Run `settle …` with its stderr on a pseudo-terminal, as in an interactive shell; `err`
    is what the terminal received."""
    master, slave = os.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            *settle_argv(home, *args), stdout=asyncio.subprocess.PIPE, stderr=slave,
            env=settle_env())
    finally:
        os.close(slave)

    def terminal() -> bytes:
        received = bytearray()
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process closed its end of the terminal
                break
            if not data:
                break
            received += data
        return bytes(received)

    try:
        err, (out, _) = await asyncio.wait_for(
            asyncio.gather(asyncio.to_thread(terminal), proc.communicate()), 300)
    finally:
        if proc.returncode is None:
            proc.kill()
        os.close(master)
    result = Result(proc.returncode or 0, out.decode(), err.decode())
    LOG.append(result.out + result.err)
    return result


async def test_run_on_a_terminal_shows_a_progress_bar(
    home: Path, tokenizer: Running, processor: Processor, tmp_path: Path,
) -> None:
    pans = synthetic_pans(60, start=800_000)
    tokens = await tokenize(tokenizer, pans)
    batch = await approved_batch(home, tmp_path, tokens, prefix="t", currency="EUR")
    run = await settle_on_terminal(home, "run", batch, "--recipient", str(processor.public_key),
                                   "--output", str(tmp_path / "out"), "--chunk", "5")
    assert run.code == 0, run.err
    assert run.out.startswith("done: 60 records")
    # One line redrawn in place: each state starts with a carriage return, and the first chunk
    # is drawn before the last one is.
    bars = [part for part in run.err.split("\r") if part.startswith("[")]
    assert len(bars) >= 2, run.err
    assert all(re.search(r"rows [\d,]+ rows/s ETA \d+:\d\d:\d\d", bar) for bar in bars), bars
    assert re.match(r"\[#*\.+\] +\d+\.\d% \d+/60 rows", bars[0]), bars[0]
    assert re.match(r"\[#{30}\] 100\.0% 60/60 rows [\d,]+ rows/s ETA 0:00:00 *$", bars[-1])
    assert re.search(r"ETA 0:00:00 *\r\n", run.err)  # done: the line ends (\n is \r\n on a tty)
    assert "progress:" not in run.err  # plain lines are for logs, not terminals
    for secret in (*pans, *tokens):
        assert secret not in run.err


async def test_create_streams_every_row_into_the_batch(
    home: Path, superuser_db: str, tmp_path: Path,
) -> None:
    """20,000 rows through both passes (BOM, CRLF, a blank line, a numeric token written with
    spaces): the database holds exactly the rows, lines and totals of the file."""
    run = os.urandom(3).hex()
    expected = []
    lines = ["\ufeffreference,token,amount_minor,currency,auth_code"]
    for i in range(20_000):
        if i == 7:
            lines.append("")  # a blank line still counts as a line
        token = f"tok_{i:021d}A" if i % 10 else "4000 0000 0000 0001"  # numeric, fails Luhn
        currency = ("EUR", "USD", "GBP")[i % 3]
        lines.append(f"{run}-{i},{token},{i + 1},{currency},{'AC' + str(i) if i % 2 else ''}")
        expected.append((len(lines), f"{run}-{i}", token.replace(" ", ""), i + 1, currency,
                         "AC" + str(i) if i % 2 else ""))
    captures = tmp_path / "captures.csv"
    captures.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    created = await settle(home, "create", "--input", str(captures))
    batch = batch_id_of(created)
    assert f"created batch {batch}: 20000 rows (" in created.out
    conn = await asyncpg.connect(superuser_db)
    try:
        stored = await conn.fetch(
            "SELECT line, reference, token, amount_minor, currency, auth_code"
            " FROM settlement_rows WHERE batch_id = $1 ORDER BY line", batch)
        info = await conn.fetchrow("SELECT row_count, totals, input_sha256, input_name, state"
                                   " FROM settlement_batches WHERE id = $1", batch)
    finally:
        await conn.close()
    assert [tuple(r) for r in stored] == expected
    totals: dict[str, dict[str, int]] = {}
    for *_, amount, currency, _auth in expected:
        entry = totals.setdefault(currency, {"count": 0, "amount_minor": 0})
        entry["count"] += 1
        entry["amount_minor"] += amount
    assert info["row_count"] == 20_000 and json.loads(info["totals"]) == totals
    assert info["input_sha256"] == hashlib.sha256(captures.read_bytes()).hexdigest()
    assert (info["input_name"], info["state"]) == ("captures.csv", "created")


async def test_create_refuses_an_input_that_changed_after_the_check(
    tokenizer: Running, superuser_db: str,
) -> None:
    """Pass 2 re-reads the file into the CreateBatch stream; other bytes than pass 1 checked
    cancel the stream, and the tokenizer rolls it all back."""
    run = os.urandom(3).hex()
    raw = ("reference,token,amount_minor,currency\n" + "".join(
        f"{run}-{i},tok_{i:021d}A,{i + 1},EUR\n" for i in range(3000))).encode()

    def source(content: bytes) -> Callable[[], Iterator[bytes]]:
        return lambda: (content[o:o + 4096] for o in range(0, len(content), 4096))

    def unreadable() -> Iterator[bytes]:
        yield raw[:4096]
        raise OSError(errno.EIO, "Input/output error")

    checked = check_captures(source(raw))
    assert checked.ok
    stub = tokenizer.settlement_as("settlement/settlement-1")
    changed = [
        raw.replace(f"{run}-5,".encode(), f"{run}-5x,".encode()),  # other bytes
        raw.replace(f"{run}-2999,".encode(), f"{run}-3,".encode()),  # now a duplicate
        raw[:-30],  # truncated
        raw + f"{run}-x,tok_{0:021d}A,1,EUR\n".encode(),  # a row more
    ]
    for content in changed:
        with pytest.raises(SettlementError, match="changed while it was being read"):
            await create_batch(stub, checked, source(content))
    with pytest.raises(SettlementError, match="could not be read again"):
        await create_batch(stub, checked, unreadable)
    conn = await asyncpg.connect(superuser_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM settlement_batches"
                                   " WHERE input_sha256 = $1", checked.sha256) == 0
        assert await conn.fetchval("SELECT count(*) FROM settlement_rows"
                                   " WHERE reference LIKE $1", f"{run}-%") == 0
        # The unchanged input goes in, all of it.
        batch = await create_batch(stub, checked, source(raw))
        assert await conn.fetchval("SELECT count(*) FROM settlement_rows"
                                   " WHERE batch_id = $1", batch.batch_id) == 3000
        assert batch.rows_sha256 == checked.rows_sha256
    finally:
        await conn.close()
