"""The webhook server's connection limits (issue 14, finding 6): a client sending one header
line every few seconds held a socket for minutes, and nothing capped connections."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from typing import Any

from tests.ivr.conftest import IvrEnv


async def _connect(env: IvrEnv) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = urllib.parse.urlsplit(env.ivr.address)
    return await asyncio.open_connection(address.hostname, address.port)


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1024), within) == b""
    except TimeoutError:
        return False


async def test_a_slow_client_is_cut_off_at_the_connection_lifetime(
    make_ivr: Callable[..., Any],
) -> None:
    env = await make_ivr(connection_lifetime=1.0)
    reader, writer = await _connect(env)
    writer.write(b"POST /voice/card_capture HTTP/1.1\r\nHost: x\r\n")
    sent = 0
    closed = False
    for _ in range(20):  # one header line every 0.25 s: five seconds, if allowed
        writer.write(b"X-Slow: 1\r\n")
        sent += 1
        if await _closed_by_server(reader, 0.25):
            closed = True
            break
    writer.close()
    assert closed and sent < 20, "the server let a slow client hold the connection"


async def test_connections_beyond_the_cap_are_closed_at_once(
    make_ivr: Callable[..., Any],
) -> None:
    env = await make_ivr(max_connections=2)
    held = [await _connect(env) for _ in range(2)]
    await asyncio.sleep(0.1)
    extra_reader, extra_writer = await _connect(env)
    assert await _closed_by_server(extra_reader, 2.0)
    extra_writer.close()
    for reader, _ in held:  # the first two are still served
        assert not await _closed_by_server(reader, 0.2)
    held[0][1].close()
    await asyncio.sleep(0.1)
    reader, writer = await _connect(env)  # a place is free again
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 200")
    writer.close()
    held[1][1].close()
