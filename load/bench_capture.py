"""Agent-assisted capture benchmark: N concurrent captures through the simulator, end to end.

Starts a fresh stack (as `make run` does), places N conferences in its Twilio simulator, starts
a capture on each over gRPC as the crm identity (CaptureService, as a CRM or the agent panel
would), and watches each to its end. The simulated customers key their cards with
`--key-delay` seconds between keys. Reports:

- event latency: from the moment the IVR appended an event (its `time`, set when the
  StatusCallback that caused it was handled) to the moment the watcher received it, p50/p99;
- Pay Connector latency: the simulator's round trip to /pay/connector (tokenize), p50/p99;
- captures per minute, and failures (must be 0).

Usage: python load/bench_capture.py [--captures 50] [--key-delay 0.05]
Record the printed figures in load/README.md. A measurement, never a test assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "load"))

from bench import credentials, start_stack  # noqa: E402

from vaultline.gen.capture.v1 import capture_pb2 as pb  # noqa: E402
from vaultline.gen.capture.v1 import capture_service_pb2_grpc as pb_grpc  # noqa: E402
from vaultline.twilio_sim import DEMO_CARD  # noqa: E402


def sim(stack: dict[str, Any], path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(  # noqa: S310 - the stack's loopback simulator
        stack["twilio_api_base_url"].rstrip("/") + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        return json.loads(response.read())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


async def one_capture(stub: pb_grpc.CaptureServiceStub, stack: dict[str, Any], i: int,
                      key_delay: float, latencies: list[float]) -> str:
    expiry = f"12{(time.gmtime().tm_year + 3) % 100:02d}"
    attempts = {"payment-card-number": [DEMO_CARD], "expiration-date": [expiry],
                "security-code": ["123"]}
    placed = await asyncio.to_thread(sim, stack, "/_sim/agent-calls", {
        "attempts": attempts, "key_delays": {f: key_delay for f in attempts}})
    capture = (await stub.StartCapture(pb.StartCaptureRequest(
        call_sid=placed["call_sid"], agent_id=f"bench-agent-{chr(97 + i % 26)}",
        request_id=f"bench-{i}-{chr(97 + i % 26)}",
        fields=pb.CaptureFields(security_code=True)))).capture
    state = pb.CAPTURE_STATE_STARTED
    async for response in stub.WatchCapture(pb.WatchCaptureRequest(
            capture_id=capture.capture_id)):
        event = response.event
        latencies.append(time.time() - (event.time.seconds + event.time.nanos / 1e9))
        state = event.state
    return pb.CaptureState.Name(state)


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="vaultline-bench-capture-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o711)
        stack_proc, stack = start_stack(tmp / "home")
        try:
            latencies: list[float] = []
            async with grpc.aio.secure_channel(stack["grpc_address"],
                                               credentials(stack, "crm")) as channel:
                stub = pb_grpc.CaptureServiceStub(channel)
                await one_capture(stub, stack, 1000, 0.0, [])  # warm every path once
                started = time.perf_counter()
                outcomes = await asyncio.gather(*(
                    one_capture(stub, stack, i, args.key_delay, latencies)
                    for i in range(args.captures)), return_exceptions=True)
                elapsed = time.perf_counter() - started
            connector = [p for p in await asyncio.to_thread(sim, stack, "/_sim/payments")
                         if p["connector_seconds"] is not None]
        finally:
            stack_proc.terminate()
            stack_proc.wait(60)
    completed = sum(1 for o in outcomes if o == "CAPTURE_STATE_COMPLETED")
    failures = [o for o in outcomes if o != "CAPTURE_STATE_COMPLETED"]
    seconds = [p["connector_seconds"] for p in connector]
    print()
    print(f"{args.captures} concurrent agent-assisted captures, card + expiry + security code,"
          f" {args.key_delay:g} s between keys")
    print(f"completed                 {completed} in {elapsed:.1f} s"
          f"  = {completed / elapsed * 60:,.0f} captures/minute")
    print(f"failures                  {len(failures)} {failures[:3] if failures else ''}")
    print(f"events delivered          {len(latencies):,}")
    print(f"event latency (append → watcher)  p50 {pct(latencies, 50) * 1000:6.1f} ms"
          f"  p99 {pct(latencies, 99) * 1000:6.1f} ms"
          f"  mean {statistics.fmean(latencies) * 1000 if latencies else 0:6.1f} ms")
    print(f"Pay Connector round trip          p50 {pct(seconds, 50) * 1000:6.1f} ms"
          f"  p99 {pct(seconds, 99) * 1000:6.1f} ms  ({len(seconds)} tokenizations)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=int, default=50)
    parser.add_argument("--key-delay", type=float, default=0.05,
                        help="real seconds between a customer's keys (default 0.05)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
