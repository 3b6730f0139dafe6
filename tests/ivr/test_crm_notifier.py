"""The CRM notifier against a real HTTP server on loopback: signed events, and no redirects."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio
from aiohttp import web

from vaultline.ivr.crm import CrmNotifier, capture_event

SECRET = b"s" * 32


class Crm:
    """A CRM endpoint at /events and another place at /elsewhere; records what arrives."""

    def __init__(self) -> None:
        self.received: dict[str, list[bytes]] = {"/events": [], "/elsewhere": []}
        self.redirect = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received[request.path].append(await request.read())
        if request.path == "/events" and self.redirect:
            raise web.HTTPTemporaryRedirect("/elsewhere")  # 307 keeps the POST and its body
        return web.Response(status=204)


@pytest_asyncio.fixture
async def crm() -> AsyncIterator[tuple[Crm, str]]:
    endpoint = Crm()
    app = web.Application()
    app.router.add_post("/events", endpoint.handle)
    app.router.add_post("/elsewhere", endpoint.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield endpoint, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _event() -> dict[str, object]:
    return capture_event("s-1", {"outcome": "success", "token": "tok_x"}, 1_700_000_000)


async def test_an_event_is_delivered_signed(crm: tuple[Crm, str]) -> None:
    endpoint, base = crm
    async with aiohttp.ClientSession() as session:
        assert await CrmNotifier(SECRET, session).notify(f"{base}/events", _event())
    (body,) = endpoint.received["/events"]
    assert json.loads(body)["data"]["token"] == "tok_x"


async def test_a_redirect_is_never_followed(crm: tuple[Crm, str]) -> None:
    # Issue 14: the notifier followed redirects with the signed body, to wherever the CRM's
    # host (or whoever took it over) pointed.
    endpoint, base = crm
    endpoint.redirect = True
    async with aiohttp.ClientSession() as session:
        delivered = await CrmNotifier(SECRET, session, attempts=2, backoff=0).notify(
            f"{base}/events", _event())
    assert not delivered
    assert len(endpoint.received["/events"]) == 1  # a 3xx is final, like a 4xx
    assert endpoint.received["/elsewhere"] == []

