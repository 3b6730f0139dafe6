"""Locust scenario for the tokenizer's gRPC API (a card channel and its CRM's traffic mix).

Start the stack (`make run`), then in another terminal:

    .venv/bin/locust -f load/locustfile.py --headless -u 50 -r 10 -t 60s

The address and the mTLS client certificates come from `.vaultline/dev/stack.json` (the intake
identity tokenizes, as a web checkout would; the crm identity reads metadata, as the CRM may
only; the settlement identity detokenizes). Each simulated user tokenizes new and returning
cards, reads token metadata, and now and then detokenizes with a purpose. Card numbers are
synthetic test-range numbers, never real cards.

Unary Detokenize has a daily budget per identity (100 by default, issue 14): once the
settlement identity has spent it, the answer is RESOURCE_EXHAUSTED by design, and the
scenario counts those as "Detokenize (resource_exhausted)" successes, not failures.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task

from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from vaultline.security.tls import load_client_credentials

grpc_gevent.init_gevent()  # grpc's blocking stubs must cooperate with locust's greenlets


def _stack() -> dict:  # type: ignore[type-arg]
    stack = Path(os.environ.get("VAULTLINE_HOME", ".vaultline")) / "dev" / "stack.json"
    return json.loads(stack.read_text())


def _channel(stack: dict, who: str) -> grpc.Channel:  # type: ignore[type-arg]
    """An mTLS channel as one of the stack's client identities (crm, settlement, …)."""
    client = stack["clients"][who]
    return grpc.secure_channel(stack["grpc_address"], load_client_credentials(
        stack["ca"], client["cert"], client["key"]))


def _synthetic_pan(rng: random.Random) -> str:
    body = "4000" + "".join(rng.choices("0123456789", k=11))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


class CrmUser(User):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        stack = _stack()
        self.channel = _channel(stack, "intake")
        self.crm_channel = _channel(stack, "crm")
        self.reveal_channel = _channel(stack, "settlement")
        self.stub = pb_grpc.TokenizationServiceStub(self.channel)
        self.crm = pb_grpc.TokenizationServiceStub(self.crm_channel)
        self.reveal = pb_grpc.TokenizationServiceStub(self.reveal_channel)
        self.rng = random.Random()
        self.tokens: list[str] = []
        self.cards: list[str] = []

    def on_stop(self) -> None:
        self.channel.close()
        self.crm_channel.close()
        self.reveal_channel.close()

    def _call(self, name: str, fn, request, expected=()):  # type: ignore[no-untyped-def]
        """One call, reported to locust; a status code in `expected` is the designed answer
        (reported under its own name, as a success)."""
        start = time.perf_counter()
        exception = None
        response = None
        try:
            response = fn(request, timeout=10)
        except grpc.RpcError as err:
            if err.code() in expected:  # type: ignore[attr-defined]
                name = f"{name} ({err.code().name.lower()})"  # type: ignore[attr-defined]
            else:
                exception = err
        events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=response.ByteSize() if response is not None else 0,
            exception=exception,
            context={},
        )
        return response

    @task(6)
    def tokenize_new_card(self) -> None:
        pan = _synthetic_pan(self.rng)
        response = self._call("Tokenize (new)", self.stub.Tokenize, pb.TokenizeRequest(
            card=pb.Card(pan=pan, expiry_month=12, expiry_year=2031)))
        if response is not None:
            self.tokens.append(response.token.token)
            self.cards.append(pan)

    @task(3)
    def tokenize_returning_card(self) -> None:
        if self.cards:
            self._call("Tokenize (returning)", self.stub.Tokenize, pb.TokenizeRequest(
                card=pb.Card(pan=self.rng.choice(self.cards), expiry_month=12, expiry_year=2031)))

    @task(3)
    def get_token(self) -> None:
        if self.tokens:
            self._call("GetToken", self.crm.GetToken,
                       pb.GetTokenRequest(token=self.rng.choice(self.tokens)))

    @task(1)
    def detokenize(self) -> None:
        if self.tokens:
            self._call("Detokenize", self.reveal.Detokenize, pb.DetokenizeRequest(
                token=self.rng.choice(self.tokens), purpose="load test"),
                expected=(grpc.StatusCode.RESOURCE_EXHAUSTED,))  # the daily budget
