"""Tokenizer throughput benchmark: every figure beside the bare baselines of the same run.

Starts a fresh stack (OpenBao + PostgreSQL + tokenizer, as `make run` does) in a temporary
directory, plus a bare grpc.aio echo server on the same mTLS, each in its own process; then
measures from this process, as the stack's intake (and, to reveal, settlement) identities,
in this order (every unary run before the bulk load, which leaves the machine slower):

  echo      bare grpc.aio unary calls/s with a Tokenize-sized payload (the gRPC ceiling)
  null      the generated TokenizationService with a Tokenize that does no work, called with
            the real Tokenize messages (the gRPC + protobuf floor under any servicer)
  tokenize  unary Tokenize calls/s, p50/p99 latency, and the ratio to echo
  copy      PostgreSQL COPY rows/s into a table shaped like `tokens` (the database ceiling)
  batch-tok BatchTokenize new PANs/s (chunks of --chunk), and the ratio to COPY
  batch-det BatchDetokenize tokens/s, and the ratio to COPY

Usage: python load/bench.py [--pans 200000] [--seconds 10] [--concurrency 64] [--chunk 1000]
Record the printed table in load/README.md. This is a measurement, never a test assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from vaultline.batches import RowsDigest  # noqa: E402
from vaultline.gen.settlement.v1 import settlement_pb2 as spb  # noqa: E402
from vaultline.gen.settlement.v1 import settlement_service_pb2_grpc as spb_grpc  # noqa: E402
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb  # noqa: E402
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc  # noqa: E402
from vaultline.security.tls import (  # noqa: E402
    load_client_credentials,
    load_server_credentials,
)

ECHO_METHOD = "/bench.Echo/Echo"


# ---- test data -----------------------------------------------------------------------------


def luhn_complete(prefix: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(prefix)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return prefix + str((10 - total % 10) % 10)


def unique_pans(n: int, seed: int) -> list[str]:
    """n distinct Luhn-valid 16-digit Visa-range numbers (synthetic, never real cards)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < n:
        seen.add(luhn_complete("4" + "".join(rng.choices("0123456789", k=14))))
    return list(seen)


# ---- the bare baselines ------------------------------------------------------------------------


class NullTokenizer(pb_grpc.TokenizationServiceServicer):
    """Tokenize answers a fixed, fully filled token: protobuf in and out, nothing else."""

    def __init__(self) -> None:
        self._response = pb.TokenizeResponse(created=True, token=pb.CardToken(
            token="4111110000001112",  # noqa: S106 - a fixed token shape, not a secret
            tenant="default", brand=pb.CARD_BRAND_VISA, bin="411111",
            last4="1111", expiry_month=12, expiry_year=2030, format=pb.TOKEN_FORMAT_NUMERIC))
        self._response.token.create_time.GetCurrentTime()

    async def Tokenize(self, request: pb.TokenizeRequest, context: object) -> pb.TokenizeResponse:
        return self._response


def echo_server_main(kind: str, port_file: str, pki_dir: str) -> None:
    """A grpc.aio server that returns its request bytes ("echo": the floor under any unary
    RPC) or the generated TokenizationService with a no-work Tokenize ("null").

    It speaks the same mTLS as the tokenizer (same server certificate, client certificates
    required), so the comparison isolates the vault's own work."""

    async def serve() -> None:
        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        server = grpc.aio.server()
        if kind == "null":
            pb_grpc.add_TokenizationServiceServicer_to_server(NullTokenizer(), server)
        else:
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
        pki = Path(pki_dir)
        port = server.add_secure_port("127.0.0.1:0", load_server_credentials(
            pki / "ca.crt", pki / "server.crt", pki / "server.key"))
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(serve())


async def closed_loop(
    call, seconds: float, concurrency: int
) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    """Run `call()` from `concurrency` workers for `seconds`; (calls/s, latencies in s)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while (start := time.perf_counter()) < deadline:
            await call()
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - began), latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def commit_delay_state(metrics_address: str) -> dict[str, float]:
    """The tokenizer's group-commit wait as its /metrics exports it (vaultline.commit_delay)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    state: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vaultline_commit_delay_"):
                choice = sample.labels.get("choice")
                state[sample.name + (f":{choice}" if choice else "")] = sample.value
    return state


def describe_commit_delay(before: dict[str, float], after: dict[str, float]) -> str:
    if not after:
        return "commit delay: not exported"
    key = "vaultline_commit_delay_decisions_total:"
    moves = {c: after.get(key + c, 0) - before.get(key + c, 0)
             for c in ("longer", "shorter", "kept")}
    return (f"commit delay during Tokenize: {sum(moves.values()):.0f} probes"
            f" ({moves['longer']:.0f} longer, {moves['shorter']:.0f} shorter,"
            f" {moves['kept']:.0f} kept); waiting"
            f" {after.get('vaultline_commit_delay_seconds', 0) * 1000:.0f} ms at the end")


def credentials(stack: dict, who: str) -> grpc.ChannelCredentials:  # type: ignore[type-arg]
    client = stack["clients"][who]
    return load_client_credentials(stack["ca"], client["cert"], client["key"])


WARMUP_S = 3.0  # connections, pools and caches fill before anything is measured


async def bench_echo(address: str, creds: grpc.ChannelCredentials, payload: bytes,
                     seconds: float, concurrency: int):  # type: ignore[no-untyped-def]
    async with grpc.aio.secure_channel(address, creds) as channel:
        echo = channel.unary_unary(ECHO_METHOD)
        await closed_loop(lambda: echo(payload), WARMUP_S, concurrency)
        return await closed_loop(lambda: echo(payload), seconds, concurrency)


async def bench_copy(dsn: str, rows: int) -> float:
    """COPY rows shaped like `tokens` into a scratch table: the database's bulk ceiling."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TEMP TABLE bench_copy (tenant text, token text, fingerprint bytea,"
            " format int2, brand int2, bin text, last4 text, expiry_month int2,"
            " expiry_year int2, data_key_id int8, ciphertext bytea,"
            " created_at timestamptz DEFAULT now(), PRIMARY KEY (tenant, token))"
        )
        await conn.execute("CREATE UNIQUE INDEX ON bench_copy (tenant, fingerprint, format)")
        records = [
            ("default", f"{i:016d}", os.urandom(32), 1, 1, "411111", "1111", 12, 2030, 1,
             os.urandom(60))
            for i in range(rows)
        ]
        columns = ["tenant", "token", "fingerprint", "format", "brand", "bin", "last4",
                   "expiry_month", "expiry_year", "data_key_id", "ciphertext"]
        start = time.perf_counter()
        for i in range(0, rows, 10_000):
            await conn.copy_records_to_table("bench_copy", records=records[i:i + 10_000],
                                             columns=columns)
        return rows / (time.perf_counter() - start)
    finally:
        await conn.close()


# ---- the tokenizer -------------------------------------------------------------------------


async def bench_tokenize(
    stub: pb_grpc.TokenizationServiceStub, pans: list[str], seconds: float, concurrency: int
):  # type: ignore[no-untyped-def]
    it = iter(pans)

    async def call() -> None:
        await stub.Tokenize(pb.TokenizeRequest(
            card=pb.Card(pan=next(it), expiry_month=12, expiry_year=2030)))

    await closed_loop(call, WARMUP_S, concurrency)
    return await closed_loop(call, seconds, concurrency)


async def bench_batch_tokenize(
    stub: pb_grpc.TokenizationServiceStub, pans: list[str], chunk: int
) -> tuple[float, list[str]]:
    chunks = [
        pb.BatchTokenizeRequest(items=[
            pb.BatchTokenizeRequest.Item(
                reference=str(i + j), card=pb.Card(pan=p, expiry_month=12, expiry_year=2030))
            for j, p in enumerate(pans[i:i + chunk])
        ])
        for i in range(0, len(pans), chunk)
    ]
    tokens: list[str] = []
    created = 0
    start = time.perf_counter()
    async for response in stub.BatchTokenize(iter(chunks)):
        for result in response.results:
            if result.HasField("error"):
                raise SystemExit(f"item failed: {result.error.message}")
            tokens.append(result.token.token)
            created += result.created
    elapsed = time.perf_counter() - start
    assert created == len(pans), f"only {created} of {len(pans)} were new"
    return len(pans) / elapsed, tokens


async def start_batch(creator: grpc.aio.Channel, approver: grpc.aio.Channel,
                      tokens: list[str]) -> str:
    """A settlement batch of `tokens` (references r0, r1, …), created, approved by a second
    identity and started: bulk reveals need one (dual control, issue 14)."""
    rows = [spb.BatchRow(line=i + 2, reference=f"r{i}", token=t, amount_minor=100,
                         currency="EUR") for i, t in enumerate(tokens)]
    digest = RowsDigest()
    for r in rows:
        digest.update(r.reference, r.token, r.amount_minor, r.currency, r.auth_code)
    stub = spb_grpc.SettlementServiceStub(creator)
    created = await stub.CreateBatch(iter([
        spb.CreateBatchRequest(input_name="bench.csv", input_sha256="0" * 64,
                               rows=rows[i:i + 5000]) for i in range(0, len(rows), 5000)]))
    batch_id = created.batch.batch_id
    await spb_grpc.SettlementServiceStub(approver).ApproveBatch(spb.ApproveBatchRequest(
        batch_id=batch_id, rows_sha256=digest.hexdigest()))
    await stub.StartRun(spb.StartRunRequest(batch_id=batch_id))
    return batch_id


async def bench_batch_detokenize(
    stub: pb_grpc.TokenizationServiceStub, tokens: list[str], chunk: int, batch_id: str
) -> float:
    """Reveal `tokens` (rows r0, r1, … of the running batch `batch_id`) in chunks."""
    chunks = [
        pb.BatchDetokenizeRequest(batch_id=batch_id, items=[
            pb.BatchDetokenizeRequest.Item(reference=f"r{i + j}", token=t)
            for j, t in enumerate(tokens[i:i + chunk])
        ])
        for i in range(0, len(tokens), chunk)
    ]
    revealed = 0
    start = time.perf_counter()
    async for response in stub.BatchDetokenize(iter(chunks)):
        for result in response.results:
            if result.HasField("error"):
                raise SystemExit(f"item failed: {result.error.message}")
            revealed += 1
    elapsed = time.perf_counter() - start
    assert revealed == len(tokens)
    return len(tokens) / elapsed


# ---- orchestration -------------------------------------------------------------------------


def start_echo(tmp: Path, pki_dir: str, kind: str = "echo") -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / f"{kind}.port"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--echo-server", kind, str(port_file), pki_dir],
    )
    for _ in range(200):
        if port_file.exists() and port_file.read_text():
            return proc, f"127.0.0.1:{port_file.read_text()}"
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{kind} server did not start")


def start_stack(home: Path) -> tuple[subprocess.Popen[bytes], dict]:  # type: ignore[type-arg]
    import json

    stack_file = home / "dev" / "stack.json"
    log = open(home.parent / "stack.log", "wb")  # noqa: SIM115 - lives as long as the stack
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaultline.cli", "--home", str(home), "dev", "up",
         "--grpc-port", "0"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "services")},
    )
    for _ in range(1200):
        if stack_file.exists():
            return proc, json.loads(stack_file.read_text())
        if proc.poll() is not None:
            tail = (home.parent / "stack.log").read_text()[-3000:]
            raise SystemExit(f"the stack failed to start:\n{tail}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("stack did not start in 120 s")


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="vaultline-bench-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o711)  # PostgreSQL's server account must be able to reach its data dir
        print(f"generating {args.pans:,} synthetic PANs…", flush=True)
        batch_pans = unique_pans(args.pans, seed=1)
        unary_pans = unique_pans(int(args.seconds + WARMUP_S) * 20_000, seed=2)
        stack_proc, stack = start_stack(tmp / "home")
        try:
            echo_proc, echo_addr = start_echo(tmp, str(Path(stack["ca"]).parent))
        except BaseException:
            stack_proc.kill()
            raise
        try:
            payload = pb.TokenizeRequest(
                card=pb.Card(pan=unary_pans[0], expiry_month=12, expiry_year=2030)
            ).SerializeToString()
            cpu0 = cpu_seconds(echo_proc.pid)
            echo_rate, echo_lat = await bench_echo(echo_addr, credentials(stack, "intake"),
                                                   payload, args.seconds, args.concurrency)
            echo_cpu = (cpu_seconds(echo_proc.pid) - cpu0) / (
                echo_rate * args.seconds + echo_rate * WARMUP_S)
            echo_proc.terminate()
            echo_proc.wait(10)
            echo_proc, null_addr = start_echo(tmp, str(Path(stack["ca"]).parent), "null")
            async with grpc.aio.secure_channel(null_addr, credentials(stack, "intake")) as channel:
                null_rate, null_lat = await bench_tokenize(
                    pb_grpc.TokenizationServiceStub(channel), unary_pans, args.seconds,
                    args.concurrency)
            options = [("grpc.max_receive_message_length", 64 << 20)]
            async with grpc.aio.secure_channel(
                stack["grpc_address"], credentials(stack, "intake"), options=options
            ) as channel, grpc.aio.secure_channel(
                stack["grpc_address"], credentials(stack, "settlement"), options=options
            ) as reveal_channel, grpc.aio.secure_channel(
                stack["grpc_address"], credentials(stack, "settlement-2"), options=options
            ) as approver_channel:
                stub = pb_grpc.TokenizationServiceStub(channel)
                reveal = pb_grpc.TokenizationServiceStub(reveal_channel)
                await stub.Tokenize(pb.TokenizeRequest(  # warm the keys
                    card=pb.Card(pan="4111111111111111", expiry_month=12, expiry_year=2030)))
                cpu0 = cpu_seconds(stack_proc.pid)
                delay0 = commit_delay_state(stack["metrics_address"])
                tok_rate, tok_lat = await bench_tokenize(stub, unary_pans, args.seconds,
                                                         args.concurrency)
                tok_cpu = (cpu_seconds(stack_proc.pid) - cpu0) / (
                    tok_rate * args.seconds + tok_rate * WARMUP_S)
                delay_note = describe_commit_delay(
                    delay0, commit_delay_state(stack["metrics_address"]))
                # After the unary runs: a bulk load leaves the machine slower for a while
                # (Tokenize measured right after a 200k-row COPY: 62-65% of echo; with the
                # COPY after it, 85-91%), and COPY is only the batch runs' baseline.
                copy_rate = await bench_copy(stack["owner_dsn"], args.pans)
                bt_rate, tokens = await bench_batch_tokenize(stub, batch_pans, args.chunk)
                batch_id = await start_batch(reveal_channel, approver_channel, tokens)
                bd_rate = await bench_batch_detokenize(reveal, tokens, args.chunk, batch_id)
        finally:
            stack_proc.terminate()
            echo_proc.terminate()
            stack_proc.wait(60)
            echo_proc.wait(10)

    cpus = os.cpu_count()
    print()
    print(f"machine: {cpus} CPUs, Python {sys.version.split()[0]}, grpcio {grpc.__version__}")
    print(f"unary concurrency {args.concurrency}, {args.seconds}s per unary run,"
          f" {args.pans:,} PANs per batch run in chunks of {args.chunk}")
    print()
    print(f"{'measure':<34}{'rate':>14}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>22}")
    print(f"{'bare grpc.aio echo (calls/s)':<34}{echo_rate:>14,.0f}"
          f"{pct(echo_lat, 50):>9.2f}{pct(echo_lat, 99):>9.2f}")
    print(f"{'no-work Tokenize servicer (calls/s)':<34}{null_rate:>14,.0f}"
          f"{pct(null_lat, 50):>9.2f}{pct(null_lat, 99):>9.2f}"
          f"{null_rate / echo_rate:>13.0%} of echo")
    print(f"{'PostgreSQL COPY (rows/s)':<34}{copy_rate:>14,.0f}")
    print(f"server CPU per call: echo {echo_cpu * 1e6:,.0f} µs, Tokenize {tok_cpu * 1e6:,.0f} µs")
    print(f"{'Tokenize unary (calls/s)':<34}{tok_rate:>14,.0f}"
          f"{pct(tok_lat, 50):>9.2f}{pct(tok_lat, 99):>9.2f}"
          f"{tok_rate / echo_rate:>13.0%} of echo")
    print(f"{'':<66}{tok_rate / null_rate:>13.0%} of no-work")
    print(delay_note)
    print(f"{'BatchTokenize (new PANs/s)':<34}{bt_rate:>14,.0f}{'':>18}"
          f"{bt_rate / copy_rate:>13.0%} of COPY")
    print(f"{'BatchDetokenize (tokens/s)':<34}{bd_rate:>14,.0f}{'':>18}"
          f"{bd_rate / copy_rate:>13.0%} of COPY")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--echo-server":
        echo_server_main(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pans", type=int, default=200_000, help="PANs per batch run")
    parser.add_argument("--seconds", type=int, default=10, help="length of each unary run")
    parser.add_argument("--concurrency", type=int, default=64, help="unary calls in flight")
    parser.add_argument("--chunk", type=int, default=1000, help="items per batch chunk")
    parser.add_argument("--workers", metavar="N,M", help="instead: `vaultline serve "
                        "--workers N` and `--workers M` side by side in one run "
                        "(load/bench_workers.py), e.g. --workers 1,2")
    args = parser.parse_args()
    if args.workers:
        import bench_workers

        counts = tuple(int(n) for n in args.workers.split(","))
        asyncio.run(bench_workers.run(argparse.Namespace(
            seconds=float(args.seconds), pans=args.pans // 2, concurrency=args.concurrency,
            counts=counts)))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
