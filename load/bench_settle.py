"""Settlement benchmark: `vaultline settle` end to end on N tokens, with rows/s and peak RSS.

Starts a fresh stack (as `make run` does) in a temp dir, tokenizes N synthetic PANs as the intake
identity, writes the capture CSV, makes a throwaway processor OpenPGP key, then times the real
commands as subprocesses: `settle create` (as settlement), `settle approve` (as settlement-2)
and `settle run` (as settlement), each with its peak RSS (/proc VmHWM). For context it also times a
bare BatchDetokenize of the same tokens from this process, as rows of a second batch (the
tokenizer's ceiling for `run`), and the dual-control membership query alone on the same chunks
(what the check costs each chunk). With --verify the output is decrypted with gpg and checked
record by record (trailer totals). --no-checkpoints starts the stack with the audit checkpoints
(issue 14) effectively off, to measure what they cost.

Usage: python load/bench_settle.py [--rows 1000000] [--chunk N (default: settle run's)] [--verify]
                                   [--no-checkpoints]
Record the printed figures in load/README.md. A measurement, never a test assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "load"))

from bench import (  # noqa: E402
    bench_batch_detokenize,
    credentials,
    start_batch,
    start_stack,
    unique_pans,
)

from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb  # noqa: E402
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc  # noqa: E402
from vaultline.settlement import DEFAULT_CHUNK  # noqa: E402
from vaultline.settlement.fileformat import parse_file  # noqa: E402
from vaultline.store import Store  # noqa: E402


def _hwm_kib(pid: int) -> int:
    """Peak RSS (VmHWM) of a process since its exec, in KiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(seconds, peak RSS in MiB of the command or of any child it ran, e.g. gpg; output).

    Sampled from /proc VmHWM every 50 ms: wait4's ru_maxrss would count the pages of this
    (large) benchmark process that the child shared between fork and exec."""
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            for pid in (proc.pid, *_children(proc.pid)):
                peak = max(peak, _hwm_kib(pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    stop.set()
    sampler.join()
    proc.wait()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[3:6])} failed:\n{out[-3000:]}")
    return elapsed, peak // 1024, out


async def tokenize(address: str, creds: grpc.ChannelCredentials, pans: list[str]) -> list[str]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.secure_channel(address, creds, options=options) as channel:
        stub = pb_grpc.TokenizationServiceStub(channel)

        def chunks():  # type: ignore[no-untyped-def]
            for i in range(0, len(pans), 1000):
                yield pb.BatchTokenizeRequest(items=[
                    pb.BatchTokenizeRequest.Item(reference=str(j), card=pb.Card(
                        pan=p, expiry_month=12, expiry_year=2030))
                    for j, p in enumerate(pans[i:i + 1000])])

        tokens: list[str] = []
        async for response in stub.BatchTokenize(chunks()):
            tokens.extend(r.token.token for r in response.results)
        return tokens


async def reveal_baseline(stack: dict, tokens: list[str], chunk: int  # type: ignore[type-arg]
                          ) -> tuple[float, float]:
    """(BatchDetokenize tokens/s of a second batch of the same tokens, seconds the membership
    query alone takes over the same chunks, run against PostgreSQL directly)."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    address = stack["grpc_address"]
    async with grpc.aio.secure_channel(address, credentials(stack, "settlement"),
                                       options=options) as channel, \
            grpc.aio.secure_channel(address, credentials(stack, "settlement-2")) as approver:
        batch_id = await start_batch(channel, approver, tokens)
        rate = await bench_batch_detokenize(pb_grpc.TokenizationServiceStub(channel), tokens,
                                            chunk, batch_id)
    store = await Store.connect(stack["owner_dsn"], min_size=1, max_size=1)
    try:
        start = time.perf_counter()
        for i in range(0, len(tokens), chunk):
            part = tokens[i:i + chunk]
            row = await store.settlement_reveal_check(
                batch_id, [f"r{i + j}" for j in range(len(part))], part)
            assert row is not None and row["matched"] == len(part)
        check_s = time.perf_counter() - start
    finally:
        await store.close()
    return rate, check_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--verify", action="store_true", help="decrypt and check every record")
    parser.add_argument("--no-baseline", action="store_true", help="skip bare BatchDetokenize")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="start the stack with audit checkpoints effectively off")
    args = parser.parse_args()
    if args.no_checkpoints:
        os.environ["VAULTLINE_AUDIT_CHECKPOINT_SECONDS"] = str(10**9)
        os.environ["VAULTLINE_AUDIT_CHECKPOINT_RECORDS"] = str(10**9)
    with tempfile.TemporaryDirectory(prefix="vaultline-bench-settle-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o711)
        home = tmp / "home"
        print(f"generating {args.rows:,} synthetic PANs…", flush=True)
        pans = unique_pans(args.rows, seed=3)
        stack_proc, stack = start_stack(home)
        gnupg = tmp / "processor-gnupg"
        gnupg.mkdir(mode=0o700)
        try:
            t0 = time.perf_counter()
            tokens = asyncio.run(
                tokenize(stack["grpc_address"], credentials(stack, "intake"), pans))
            print(f"tokenized {len(tokens):,} in {time.perf_counter() - t0:.1f} s", flush=True)
            captures = tmp / "captures.csv"
            with captures.open("w") as fh:
                fh.write("reference,token,amount_minor,currency\n")
                for i, token in enumerate(tokens):
                    fh.write(f"r{i},{token},{100 + i % 9900},{'EUR' if i % 4 else 'USD'}\n")
            gpg = [shutil.which("gpg") or "/usr/bin/gpg", "--homedir", str(gnupg), "--batch"]
            subprocess.run([*gpg, "--passphrase", "", "--quick-gen-key",
                            "Bench Processor <bench@processor.example>", "default", "default",
                            "never"], check=True, capture_output=True)
            recipient = tmp / "processor.asc"
            recipient.write_bytes(subprocess.run([*gpg, "--armor", "--export"], check=True,
                                                 capture_output=True).stdout)
            env = {**os.environ, "PYTHONPATH": str(ROOT / "services")}
            env = {k: v for k, v in env.items()
                   if not k.startswith("VAULTLINE_") or k == "VAULTLINE_GPG"}
            cli = [sys.executable, "-m", "vaultline.cli", "--home", str(home),
                   "settle"]
            c_s, c_rss, out = timed([*cli, "create", "--input", str(captures)], env)
            # stderr (progress lines) is merged into `out`: find the batch id in its own line.
            created = next(ln for ln in out.splitlines() if ln.startswith("created batch "))
            batch = created.split()[2].rstrip(":")
            a_s, _, _ = timed([*cli, "approve", batch, "--input", str(captures),
                               "--as", "settlement-2"], env)
            output = tmp / "out"
            r_s, r_rss, out = timed([*cli, "run", batch, "--recipient", str(recipient),
                                     "--output", str(output), "--chunk", str(args.chunk)], env)
            size = (output / f"{batch}.vlsf.gpg").stat().st_size
            print(out.strip().splitlines()[-1])
            base = None
            if not args.no_baseline:
                base, check_s = asyncio.run(reveal_baseline(stack, tokens, args.chunk))
            print()
            print(f"rows                      {args.rows:,}")
            print(f"settle create             {c_s:6.1f} s  {args.rows / c_s:10,.0f} rows/s"
                  f"  peak RSS {c_rss} MiB")
            print(f"settle approve            {a_s:6.1f} s")
            print(f"settle run                {r_s:6.1f} s  {args.rows / r_s:10,.0f} rows/s"
                  f"  peak RSS {r_rss} MiB  (file {size / 2**20:.1f} MiB)")
            if base is not None:
                print(f"bare BatchDetokenize               {base:10,.0f} tokens/s"
                      f"  (run = {args.rows / r_s / base:.0%} of it)")
                chunks = -(-args.rows // args.chunk)
                print(f"membership query alone    {check_s:6.2f} s  {check_s / chunks * 1e3:6.1f}"
                      f" ms a chunk of {args.chunk} = {check_s / (args.rows / base):.0%} of"
                      " the bare reveal's time")
            checkpoints = "off" if args.no_checkpoints else "on (60 s / 1000 records)"
            print(f"audit checkpoints         {checkpoints}")
            if args.verify:
                plain = subprocess.run([*gpg, "--quiet", "--decrypt",
                                        str(output / f"{batch}.vlsf.gpg")],
                                       check=True, capture_output=True).stdout
                parsed = parse_file(plain)
                assert len(parsed.details) == args.rows
                assert all(d.pan == p for d, p in zip(parsed.details, pans, strict=True))
                print("verified: every record decrypted and matched; trailer totals check")
        finally:
            subprocess.run([shutil.which("gpgconf") or "/usr/bin/gpgconf", "--homedir", str(gnupg),
                            "--kill", "all"], check=False)
            stack_proc.terminate()
            try:
                stack_proc.wait(60)
            except subprocess.TimeoutExpired:
                stack_proc.kill()


if __name__ == "__main__":
    main()
