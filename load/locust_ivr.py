"""Locust: concurrent simulated calls against the IVR webhook service of a running dev stack.

Each user places card_capture calls back to back, signing every form post as Twilio does and
following the Gather actions in the TwiML (card, expiry, security code, confirm). Webhook
latency is reported per step; a finished capture fires a `capture` event so locust's table
shows completed captures (divide by run minutes for captures/min).

    make run                                   # in another terminal
    .venv/bin/locust -f load/locust_ivr.py --headless -u 50 -r 10 -t 2m

The webhook service's address comes from the stack's `stack.json` (no `--host` needed).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

from locust import HttpUser, between, task

from vaultline.twilio_sim import sign

STACK = Path(os.environ.get("VAULTLINE_HOME", ".vaultline")) / "dev" / "stack.json"
INFO = json.loads(STACK.read_text())
BASE = INFO["ivr_base_url"].rstrip("/")
TOKEN = Path(INFO["twilio_auth_token_file"]).read_text().strip()
ACCOUNT = INFO["twilio_account_sid"]
ACTION = re.compile(r'<Gather action="([^"]+)"')
CARDS = ["4111111111111111", "5555555555554444", "4012888888881881", "6011111111111117"]


class Caller(HttpUser):
    host = BASE  # the running stack's webhook service; `--host` would override it
    wait_time = between(0.1, 0.5)

    def _post(self, url: str, params: dict[str, str], name: str) -> str:
        signature = sign(TOKEN, url, params.items())
        with self.client.post(url, data=params, headers={"X-Twilio-Signature": signature},
                              name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return ""
            return response.text

    @task
    def card_capture(self) -> None:
        started = time.perf_counter()
        params = {"AccountSid": ACCOUNT, "CallSid": "CA" + secrets.token_hex(16),
                  "From": "+14155550100", "To": "+18005550199", "Caller": "+14155550100",
                  "Called": "+18005550199", "CallStatus": "in-progress",
                  "Direction": "inbound", "ApiVersion": "2010-04-01"}
        body = self._post(f"{BASE}/voice/card_capture", params, "start")
        card = CARDS[secrets.randbelow(len(CARDS))]
        for name, digits, key in (("card", card, "#"), ("expiry", "1230", ""),
                                  ("cvv", "123", ""), ("confirm", "1", "")):
            match = ACTION.search(body)
            if not match:
                return
            url = match.group(1).replace("&amp;", "&")
            body = self._post(url, {**params, "Digits": digits, "FinishedOnKey": key}, name)
        ok = "saved securely" in body
        self.environment.events.request.fire(
            request_type="IVR", name="capture", response_time=(time.perf_counter() - started)
            * 1000, response_length=0, exception=None if ok else RuntimeError("not captured"),
            context={})
