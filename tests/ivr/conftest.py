"""IVR end to end: the simulator calls the real webhook service, which talks to the real
tokenizer (gRPC), PostgreSQL and a CRM callback receiver, all on loopback."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio
from aiohttp import web

from tests.fixtures.infra import PostgresHandle
from vaultline.devstack import free_port
from vaultline.httpserve import serve_app
from vaultline.ivr import signing
from vaultline.ivr.app import IvrConfig, RunningIvr, start_ivr
from vaultline.twilio_sim import SimCall, TwilioSim

FLOWS = Path(__file__).resolve().parents[2] / "ivr_flows"
PUBLIC = "https://ivr.vaultline.test"  # what the simulator signs: the proxy case


class CrmReceiver:
    """A CRM endpoint: verifies Vaultline-Signature, records events, fails on demand."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.events: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.attempts = 0
        self.fail_with: list[int] = []  # statuses to answer, in order, before succeeding
        self.always_fail = False
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        self.bodies.append(body)
        signing.verify(self.secret, request.headers.get(signing.HEADER), body,
                       now=int(time.time()))
        if self.always_fail:
            return web.Response(status=503)
        if self.fail_with:
            return web.Response(status=self.fail_with.pop(0))
        event = json.loads(body)
        if all(e["id"] != event["id"] for e in self.events):  # deduplicate by event id
            self.events.append(event)
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.post("/crm/captures", self._handle)])
        self._runner, port = await serve_app(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}/crm/captures"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class IvrEnv:
    sim: TwilioSim
    ivr: RunningIvr
    crm: CrmReceiver
    config: IvrConfig
    started: list[RunningIvr] = field(default_factory=list)

    def url(self, path: str) -> str:
        return PUBLIC + path

    async def call(self, flow: str, script: Any, **kwargs: Any) -> SimCall:
        return await self.sim.call(self.url(f"/voice/{flow}"), script,
                                   status_callback=self.url("/voice/status"), **kwargs)

    async def sessions(self, call_sid: str) -> list[Any]:
        assert self.ivr.service.store is not None
        return await self.ivr.service.store.find_sessions_by_call_sid(call_sid)


@pytest_asyncio.fixture
async def make_ivr(migrated: PostgresHandle, tokenizer: Any
                   ) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await make_ivr(channel=..., **config overrides)` -> IvrEnv (all stopped)."""
    envs: list[IvrEnv] = []
    channels: list[grpc.aio.Channel] = []

    async def make(channel: grpc.aio.Channel | None = None, **overrides: Any) -> IvrEnv:
        sim = TwilioSim()
        await sim.start()
        crm = CrmReceiver(os.urandom(32))
        await crm.start()
        port = free_port()
        config = IvrConfig(
            public_base_url=PUBLIC, account_sid=sim.account_sid, auth_token=sim.auth_token,
            database_url=migrated.ivr_dsn, session_secret=os.urandom(32),
            crm_secret=crm.secret, flows_dir=FLOWS, twilio_api_base_url=sim.rest_base_url,
            crm_callback_urls={"card_capture": crm.url, "agent_handoff": crm.url,
                               "card_capture_pay": crm.url},
            crm_backoff=0.01, crm_timeout=1.0, twilio_timeout=2.0, tokenizer_timeout=2.0,
            db_pool_size=4, capture_crm_callback_url=crm.url,
        )
        config = replace(config, **overrides)
        ivr = await start_ivr(config, channel or tokenizer.channel("ivr/ivr-1"), port=port)
        sim.route[PUBLIC] = ivr.address
        env = IvrEnv(sim, ivr, crm, config)
        envs.append(env)
        return env

    yield make
    for env in envs:
        for extra in env.started:
            await extra.stop()
        await env.ivr.stop()
        await env.sim.stop()
        await env.crm.stop()
    for ch in channels:
        await ch.close()


@pytest_asyncio.fixture
async def env(make_ivr: Callable[..., Any]) -> IvrEnv:
    return await make_ivr()


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()
