"""Worker processes: one server on one port, N processes (`vaultline serve --workers N`,
`vaultline ivr serve --workers N`).

A single Python process uses one core. The supervisor (this module, in the process the
operator starts) spawns N workers that each listen on the same port (SO_REUSEPORT: the kernel
spreads connections over them) with their own database pools and event loops, and:

- restarts a worker that dies (a crash, the OOM killer, kill -9), and gives up — stopping the
  rest, exit 1 — when one keeps dying at start;
- stops them all on Ctrl-C or SIGTERM (SIGTERM to each, then SIGKILL after a grace period);
- serves one Prometheus endpoint: every worker's metrics, each sample labelled
  `worker="<index>"` (sum them in PromQL), fetched from each worker's own local port;
- writes a status file (supervisor and worker pids, addresses) for operators and tests.

Quotas must not multiply with workers — N processes each with their own buckets would grant a
stolen certificate N times its quota — so the buckets live in shared memory (`SharedBuckets`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .security.access import LocalBuckets

__all__ = ["SharedBuckets", "Supervisor", "WorkerReady", "reserve_port"]

log = logging.getLogger(__name__)

GRACE_SECONDS: Final = 10.0
# A worker that dies this soon after it started, this many times in a row, is not restarted
# again: something is wrong with the configuration or a dependency, not with one process.
CRASH_WINDOW_SECONDS: Final = 5.0
CRASH_LOOP_LIMIT: Final = 5
SCRAPE_TIMEOUT: Final = 2.0


class SharedBuckets:
    """Quota buckets in shared memory: (tokens, stamp) per key, one lock. Spending takes a
    few microseconds under the lock; the clock is CLOCK_MONOTONIC, the same in every
    process."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._slots = {key: i for i, key in enumerate(keys)}
        self._values = mp.get_context("spawn").Array("d", [math.nan] * (2 * len(keys)))
        self._local = LocalBuckets()  # a key the policy did not list (none expected)

    def take(self, key: str, burst: float, rate: float, count: int, now: float) -> bool:
        slot = self._slots.get(key)
        if slot is None:
            return self._local.take(key, burst, rate, count, now)
        values = self._values
        with values.get_lock():
            tokens, stamp = values[2 * slot], values[2 * slot + 1]
            if math.isnan(tokens):
                tokens, stamp = burst, now
            tokens = min(burst, tokens + max(0.0, now - stamp) * rate)
            enough = tokens >= count
            if enough:
                tokens -= count
            values[2 * slot], values[2 * slot + 1] = tokens, max(stamp, now)
        return enough


@dataclass
class WorkerReady:
    """What a worker reports once it serves."""

    index: int
    pid: int
    address: str
    metrics: str = ""


def reserve_port(listen: str) -> tuple[str, socket.socket]:
    """`listen` with its port chosen (when 0), and a socket bound to it with SO_REUSEPORT —
    not listening, so it takes no connection — that keeps the port ours while workers come
    and go."""
    host, port = listen.rsplit(":", 1)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), int(port)))
    return f"{host}:{sock.getsockname()[1]}", sock


class _MergedMetrics:
    """A collector yielding every worker's metrics, each sample labelled with its worker."""

    def __init__(self, workers: Callable[[], list[WorkerReady]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker in self._workers():
            if not worker.metrics:
                continue
            try:
                with urllib.request.urlopen(  # noqa: S310 - a local http:// address we made
                        f"http://{worker.metrics}/metrics", timeout=SCRAPE_TIMEOUT) as answer:
                    text = answer.read().decode()
            except OSError:
                continue  # a worker restarting: its samples are missing from this scrape
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "worker": str(worker.index)},
                                    sample.value, sample.timestamp)
        yield from merged.values()


class Supervisor:
    """Runs `target(index, *args, ready)` in `count` spawned processes until stopped; the
    target puts a `WorkerReady` on `ready` once it serves."""

    def __init__(self, name: str, target: Callable[..., None], args: tuple[Any, ...],
                 count: int, *, status_file: Path | None = None,
                 metrics_listen: str | None = None) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        self.name = name
        self._target = target
        self._args = args
        self.count = count
        self._ctx = mp.get_context("spawn")
        self._ready: Any = self._ctx.Queue()
        self._procs: dict[int, Any] = {}
        self._started: dict[int, float] = {}
        self._crashes: dict[int, int] = {}
        self.workers: dict[int, WorkerReady] = {}
        self._status_file = status_file
        self._metrics_listen = metrics_listen
        self.metrics_address = ""
        self._metrics_server: Any = None
        self._stopping = threading.Event()
        self.restarts = 0

    def _spawn(self, index: int) -> None:
        proc = self._ctx.Process(target=self._target, args=(index, *self._args, self._ready),
                                 name=f"{self.name}-worker-{index}", daemon=False)
        proc.start()
        self._procs[index] = proc
        self._started[index] = time.monotonic()
        self.workers.pop(index, None)
        log.info("%s worker %d started (pid %d)", self.name, index, proc.pid)

    def _write_status(self) -> None:
        if self._status_file is None:
            return
        status = {"supervisor_pid": os.getpid(), "name": self.name,
                  "metrics": self.metrics_address, "restarts": self.restarts,
                  "workers": [asdict(self.workers[i]) for i in sorted(self.workers)]}
        tmp = self._status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=2))
        tmp.replace(self._status_file)

    def _drain(self, timeout: float) -> bool:
        """Take ready reports; True when one came."""
        try:
            report: WorkerReady = self._ready.get(timeout=timeout)
        except queue.Empty:
            return False
        proc = self._procs.get(report.index)
        if proc is not None and proc.pid == report.pid:
            self.workers[report.index] = report
            self._write_status()
        return True

    def start(self, timeout: float = 120.0) -> list[WorkerReady]:
        """Spawn every worker and wait until each serves; raises if one dies first."""
        if self._metrics_listen:
            host, port = self._metrics_listen.rsplit(":", 1)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_MergedMetrics(lambda: list(self.workers.values())))
            self._metrics_server, _ = start_http_server(int(port), addr=host, registry=registry)
            self.metrics_address = f"{host}:{self._metrics_server.server_port}"
        for index in range(self.count):
            self._spawn(index)
        deadline = time.monotonic() + timeout
        while len(self.workers) < self.count:
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name}: workers did not start in {timeout:.0f} s")
            for index, proc in self._procs.items():
                if not proc.is_alive() and index not in self.workers:
                    self.stop()
                    raise RuntimeError(f"{self.name} worker {index} exited at start "
                                       f"(code {proc.exitcode}); see its log above")
            self._drain(0.2)
        return [self.workers[i] for i in sorted(self.workers)]

    def watch(self) -> int:
        """Restart workers that die, until `stop_soon()` (or a signal); 0, or 1 when a worker
        kept dying at start."""
        while not self._stopping.is_set():
            self._drain(0.2)
            for index, proc in list(self._procs.items()):
                if proc.is_alive() or self._stopping.is_set():
                    continue
                lived = time.monotonic() - self._started[index]
                self._crashes[index] = (self._crashes.get(index, 0) + 1
                                        if lived < CRASH_WINDOW_SECONDS else 1)
                log.warning("%s worker %d (pid %d) died (exit code %s) after %.1f s; "
                            "restarting it", self.name, index, proc.pid, proc.exitcode, lived)
                if self._crashes[index] >= CRASH_LOOP_LIMIT:
                    log.error("%s worker %d keeps dying at start; stopping", self.name, index)
                    return 1
                self.workers.pop(index, None)
                self.restarts += 1
                self._spawn(index)
                self._write_status()
        return 0

    def stop_soon(self) -> None:
        self._stopping.set()

    def stop(self) -> None:
        """SIGTERM every worker, wait up to GRACE_SECONDS, SIGKILL the rest."""
        self._stopping.set()
        for proc in self._procs.values():
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("%s worker pid %d did not stop in %.0f s; killing it",
                            self.name, proc.pid, GRACE_SECONDS)
                proc.kill()
                proc.join(5)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._status_file is not None:
            with contextlib.suppress(OSError):
                self._status_file.unlink()


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
