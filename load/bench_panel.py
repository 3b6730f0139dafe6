"""Agent panel latency: from a keypress in the simulator to its dot in the page.

Starts a fresh stack (as `make run` does), opens the agent panel in headless Chromium (Debian's
chromium + chromedriver) with a signed link, and takes `--captures` cards one after another,
the simulated customer keying with `--key-delay` seconds between keys. For every digit keyed
(card number, expiry, security code) it pairs the simulator's wall-clock time of the press
with the moment the page drew that digit's dot (a MutationObserver the benchmark installs).

Baseline, measured in the same run: a gRPC watcher (WatchCapture, as the crm identity) on the
same capture, timed from the same keypresses to the event's arrival. The ratio is what the
panel's hop (server-sent events, the browser's parsing and drawing) costs on top.

Usage: python load/bench_panel.py [--captures 5] [--key-delay 0.1]
Record the printed figures in load/README.md. A measurement, never a test assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "load"))

from bench import credentials, start_stack  # noqa: E402
from bench_capture import pct, sim  # noqa: E402

from vaultline.cli.panel import read_link_secret  # noqa: E402
from vaultline.gen.capture.v1 import capture_pb2 as pb  # noqa: E402
from vaultline.gen.capture.v1 import capture_service_pb2_grpc as pb_grpc  # noqa: E402
from vaultline.panel.links import sign_link  # noqa: E402
from vaultline.twilio_sim import DEMO_CARD  # noqa: E402

FIELDS = ("card-number", "expiration-date", "security-code")
_OBSERVE = """
window.__dots = [];
for (const li of document.querySelectorAll('.fields li')) {
  const dots = li.querySelector('.dots');
  let last = 0;
  new MutationObserver(() => {
    const n = dots.textContent.length;
    if (n > last) window.__dots.push([li.dataset.field, n, Date.now() / 1000]);
    last = n;
  }).observe(dots, {childList: true, characterData: true, subtree: true});
}
"""


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def take_card(driver: Any, link: str) -> list[tuple[str, int, float]]:
    """Sign in, take the card, wait for the result; the dots as the page drew them."""
    driver.get(link)
    driver.execute_script(_OBSERVE)
    driver.find_element("id", "take").click()
    deadline = time.monotonic() + 60
    while driver.execute_script("return document.getElementById('result').hidden"):
        if time.monotonic() > deadline:
            raise RuntimeError("the capture did not complete in 60 s")
        time.sleep(0.05)
    return [tuple(d) for d in driver.execute_script("return window.__dots")]


async def watch(stub: pb_grpc.CaptureServiceStub, capture_id: str
                ) -> list[tuple[str, int, float]]:
    """The baseline: the same progress as a gRPC watcher receives it."""
    names = {pb.CAPTURE_FIELD_CARD_NUMBER: "card-number",
             pb.CAPTURE_FIELD_EXPIRATION_DATE: "expiration-date",
             pb.CAPTURE_FIELD_SECURITY_CODE: "security-code"}
    seen: list[tuple[str, int, float]] = []
    async for response in stub.WatchCapture(pb.WatchCaptureRequest(capture_id=capture_id)):
        event = response.event
        if event.digits_entered and not event.field_outcome and event.field in names:
            seen.append((names[event.field], event.digits_entered, time.time()))
    return seen


def latencies(presses: list[dict[str, Any]], shown: list[tuple[str, int, float]]
              ) -> list[float]:
    """Pair the k-th digit of each field with the first time k dots (or events) showed."""
    keyed: dict[tuple[str, int], float] = {}
    i = 0
    for field, length in zip(FIELDS, (16, 4, 3), strict=True):
        for k in range(1, length + 1):
            keyed[(field, k)] = presses[i]["wall"]
            i += 1
    first: dict[tuple[str, int], float] = {}
    for field, n, at in shown:
        first.setdefault((field, n), at)
    return [first[key] - at for key, at in keyed.items() if key in first]


async def run(args: argparse.Namespace) -> None:
    expiry = f"12{(time.gmtime().tm_year + 3) % 100:02d}"
    with tempfile.TemporaryDirectory(prefix="vaultline-bench-panel-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o711)
        stack_proc, stack = start_stack(tmp / "home")
        driver = await asyncio.to_thread(browser)
        page: list[float] = []
        grpc_baseline: list[float] = []
        try:
            secret = read_link_secret(Path(stack["panel_link_secret_file"]))
            async with grpc.aio.secure_channel(stack["grpc_address"],
                                               credentials(stack, "crm")) as channel:
                stub = pb_grpc.CaptureServiceStub(channel)
                for i in range(args.captures + 1):  # the first warms every path
                    attempts = {"payment-card-number": [DEMO_CARD],
                                "expiration-date": [expiry], "security-code": ["123"]}
                    placed = await asyncio.to_thread(sim, stack, "/_sim/agent-calls", {
                        "attempts": attempts,
                        "key_delays": {f: args.key_delay for f in attempts}})
                    call_sid = placed["call_sid"]
                    query = sign_link(secret, call_sid, "bench-agent", "default",
                                      int(time.time()) + 300)
                    browsing = asyncio.ensure_future(asyncio.to_thread(
                        take_card, driver, f"{stack['panel_url']}/panel?{query}"))
                    capture_id = await find_capture(stub, stack, call_sid)
                    baseline = await watch(stub, capture_id)
                    result = [await browsing]
                    presses = (await asyncio.to_thread(
                        sim, stack, f"/_sim/calls/{call_sid}"))["presses"]
                    if i and result:
                        page += latencies(presses, result[0])
                        grpc_baseline += latencies(presses, baseline)
        finally:
            await asyncio.to_thread(driver.quit)
            stack_proc.terminate()
            stack_proc.wait(60)
    p50, p99 = pct(page, 50) * 1000, pct(page, 99) * 1000
    b50, b99 = pct(grpc_baseline, 50) * 1000, pct(grpc_baseline, 99) * 1000
    print()
    print(f"{args.captures} captures in the agent panel (headless Chromium), "
          f"{args.key_delay:g} s between keys, {len(page)} digits paired")
    print(f"keypress → dot in the page        p50 {p50:6.1f} ms  p99 {p99:6.1f} ms")
    print(f"keypress → gRPC WatchCapture      p50 {b50:6.1f} ms  p99 {b99:6.1f} ms  (baseline)")
    if b50 and b99:
        print(f"ratio page / baseline             p50 {p50 / b50:5.2f}×    p99 {p99 / b99:5.2f}×")


async def find_capture(stub: pb_grpc.CaptureServiceStub, stack: dict[str, Any],
                       call_sid: str) -> str:
    """The capture the page started on this call: the simulator's Payment on the call names
    it in its StatusCallback URL (/pay/status/<capture id>)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for payment in await asyncio.to_thread(sim, stack, "/_sim/payments"):
            if payment["call_sid"] == call_sid and "/pay/status/" in payment["status_callback"]:
                return str(payment["status_callback"].rsplit("/", 1)[1].split("?")[0])
        await asyncio.sleep(0.02)
    raise RuntimeError("the page did not start a capture in 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=int, default=5)
    parser.add_argument("--key-delay", type=float, default=0.1,
                        help="real seconds between a customer's keys (default 0.1)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
