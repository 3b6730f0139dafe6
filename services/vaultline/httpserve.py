"""Serving an aiohttp app on a socket, with limits on what one client may hold.

Used by the IVR's webhook service and the agent panel (and the tests' fake CRM).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web

__all__ = ["ConnectionLimits", "serve_app"]

log = logging.getLogger("vaultline.http")


@dataclass
class ConnectionLimits:
    """What one client may hold of a web server: aiohttp has no header or body read
    timeout, so a client sending a header line every few seconds held a socket for minutes
    (issue 14). Every connection closes `lifetime` seconds after it opened, and beyond
    `max_connections` a new one is closed at once."""

    max_connections: int = 512
    lifetime: float = 60.0
    open: int = 0


class _Limited(asyncio.Protocol):
    """aiohttp's protocol for one connection, inside the limits."""

    def __init__(self, inner: asyncio.Protocol, limits: ConnectionLimits) -> None:
        self._inner = inner
        self._limits = limits
        self._admitted = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self._limits
        if limits.open >= limits.max_connections:
            log.warning("connection refused: %d open", limits.open)
            transport.close()
            return
        limits.open += 1
        self._admitted = True
        self._timer = asyncio.get_running_loop().call_later(limits.lifetime, transport.close)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._limits.open -= 1
        if self._timer is not None:
            self._timer.cancel()
        self._inner.connection_lost(exc)


class _LimitedSite(web.BaseSite):
    def __init__(self, runner: web.AppRunner, host: str, port: int,
                 limits: ConnectionLimits, reuse_port: bool = False) -> None:
        super().__init__(runner)
        self._host, self._port, self._limits = host, port, limits
        self._reuse_port = reuse_port
        self.bound = 0

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.bound or self._port}"

    async def start(self) -> None:
        await super().start()
        make = self._runner.server
        assert make is not None
        server = await asyncio.get_running_loop().create_server(
            lambda: _Limited(make(), self._limits), self._host, self._port,
            reuse_address=True, reuse_port=self._reuse_port or None)
        self._server = server
        self.bound = server.sockets[0].getsockname()[1]


async def serve_app(app: web.Application, host: str, port: int,
                    limits: ConnectionLimits | None = None, *,
                    reuse_port: bool = False) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port) within `limits`; (runner, bound port).
    `reuse_port`: share the port with the other workers of a supervisor (SO_REUSEPORT)."""
    runner = web.AppRunner(app, access_log=None)  # access logs would show paths only, but
    await runner.setup()  # request volume makes them noise; the services log what counts
    site = _LimitedSite(runner, host, port, limits or ConnectionLimits(), reuse_port)
    await site.start()
    return runner, site.bound
