"""Workers: `vaultline serve --workers 1` and `--workers 2` side by side, in one run.

Starts a fresh stack (as `make run` does) for its OpenBao and PostgreSQL, then, for each worker
count, starts `vaultline serve --workers N` on them (the stack's own in-process tokenizer stays
idle) and measures from this process, as the stack's `intake` identity:

- unary Tokenize, closed loop: `--concurrency` calls in flight over 8 connections (the kernel
  spreads connections, not calls, over the workers), new cards;
- BatchTokenize: 4 streams at once, one per connection, new cards.

Reports calls/s and cards/s per worker count and the ratio 2 workers / 1. On this 2-core
machine the load generator shares the cores with the workers, PostgreSQL and OpenBao: the
ratio is what two cores allow here, not what two dedicated cores would give.

Usage: python load/bench_workers.py [--seconds 10] [--pans 100000]
   or: python load/bench.py --workers 1,2
Record the printed figures in load/README.md. A measurement, never a test assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "load"))

from bench import closed_loop, credentials, pct, start_stack, unique_pans  # noqa: E402

from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb  # noqa: E402
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc  # noqa: E402

CONNECTIONS = 8
STREAMS = 4
CHUNK = 1000


def serve(stack: dict, home: Path, workers: int, status: Path) -> subprocess.Popen[bytes]:  # type: ignore[type-arg]
    pki = home / "pki"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}
    env.update(
        PYTHONPATH=str(ROOT / "services"),
        VAULTLINE_DATABASE_URL=stack["database_url"], VAULTLINE_VAULT_ADDR=stack["vault_addr"],
        VAULTLINE_VAULT_APPROLE_FILE=stack["credentials"]["tokenizer_approle"],
        VAULTLINE_TLS_CA=stack["ca"], VAULTLINE_TLS_CERT=str(pki / "server.crt"),
        VAULTLINE_TLS_KEY=str(pki / "server.key"), VAULTLINE_GRPC_LISTEN="127.0.0.1:0",
        VAULTLINE_METRICS_LISTEN="off")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaultline.cli", "serve", "--workers", str(workers),
         "--status-file", str(status)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (status.exists() and len(json.loads(status.read_text())["workers"]) == workers):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"serve --workers {workers} did not start")
        time.sleep(0.1)
    return proc


async def measure(address: str, creds: grpc.ChannelCredentials, seconds: float,
                  concurrency: int, unary_pans: list[str], batch_pans: list[str]
                  ) -> tuple[float, float, float, float]:
    channels = [grpc.aio.secure_channel(address, creds) for _ in range(CONNECTIONS)]
    try:
        stubs = [pb_grpc.TokenizationServiceStub(c) for c in channels]
        pans = iter(unary_pans)
        turn = iter(range(10**9))

        async def call() -> None:
            stub = stubs[next(turn) % CONNECTIONS]
            await stub.Tokenize(pb.TokenizeRequest(
                card=pb.Card(pan=next(pans), expiry_month=12, expiry_year=2030)))

        await closed_loop(call, 2.0, concurrency)  # warm-up
        rate, latencies = await closed_loop(call, seconds, concurrency)

        async def stream(stub: pb_grpc.TokenizationServiceStub, part: list[str]) -> None:
            chunks = [pb.BatchTokenizeRequest(items=[
                pb.BatchTokenizeRequest.Item(reference=str(j), card=pb.Card(
                    pan=p, expiry_month=12, expiry_year=2030))
                for j, p in enumerate(part[i:i + CHUNK])]) for i in range(0, len(part), CHUNK)]
            async for response in stub.BatchTokenize(iter(chunks)):
                assert not any(r.HasField("error") for r in response.results)

        share = len(batch_pans) // STREAMS
        started = time.perf_counter()
        await asyncio.gather(*(stream(stubs[i], batch_pans[i * share:(i + 1) * share])
                               for i in range(STREAMS)))
        batch = share * STREAMS / (time.perf_counter() - started)
        return rate, pct(latencies, 50), pct(latencies, 99), batch
    finally:
        for channel in channels:
            await channel.close()


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="vaultline-bench-workers-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o711)
        home = tmp / "home"
        stack_proc, stack = start_stack(home)
        results = {}
        try:
            creds = credentials(stack, "intake")
            for n, workers in enumerate(getattr(args, "counts", (1, 2))):
                unary = unique_pans(int(args.seconds + 2) * 6000, seed=10 + n)
                batch = unique_pans(args.pans, seed=20 + n)
                status = tmp / f"workers-{workers}.json"
                proc = serve(stack, home, workers, status)
                try:
                    address = json.loads(status.read_text())["workers"][0]["address"]
                    results[workers] = await measure(address, creds, args.seconds,
                                                     args.concurrency, unary, batch)
                finally:
                    proc.terminate()
                    proc.wait(60)
        finally:
            stack_proc.terminate()
            stack_proc.wait(60)
    print(f"machine: {os.cpu_count()} CPUs; unary {args.concurrency} in flight over "
          f"{CONNECTIONS} connections, {args.seconds:.0f} s; BatchTokenize {STREAMS} streams, "
          f"{args.pans:,} new cards")
    print(f"{'workers':>8} {'Tokenize/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'Batch cards/s':>14}")
    for workers, (rate, p50, p99, batch) in results.items():
        print(f"{workers:>8} {rate:>12,.0f} {p50:>8.1f} {p99:>8.1f} {batch:>14,.0f}")
    (low, one), *_, (high, two) = sorted(results.items())
    print(f"{f'{high} / {low}':>8} {two[0] / one[0]:>11.2f}× {'':>8} {'':>8} "
          f"{two[3] / one[3]:>13.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pans", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
