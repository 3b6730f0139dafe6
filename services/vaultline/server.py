"""The tokenizer process: wires store, key service, keyring and servicers into a gRPC server.

Start-up never waits for PostgreSQL or OpenBao: calls answer UNAVAILABLE while either is
down and succeed again as soon as it is back (the pool reconnects, the AppRole client logs in
again). A background probe keeps the standard gRPC health status truthful.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api.admin import AuditServicer, KeyServicer
from .api.capture import CaptureServicer
from .api.gate import Gate
from .api.recordings import RecordingServicer
from .api.settlement import SettlementServicer
from .api.tokenization import TokenizationServicer
from .captures import CaptureHub, CaptureService
from .commit_delay import CommitDelay
from .config import TokenizerConfig
from .dual_control import BatchService, DailyRevealBudget
from .errors import DependencyUnavailable
from .gen.admin.v1 import admin_service_pb2 as admin_svc_pb
from .gen.admin.v1 import admin_service_pb2_grpc as admin_grpc
from .gen.capture.v1 import capture_service_pb2 as capture_svc_pb
from .gen.capture.v1 import capture_service_pb2_grpc as capture_grpc
from .gen.recordings.v1 import recordings_service_pb2 as recordings_svc_pb
from .gen.recordings.v1 import recordings_service_pb2_grpc as recordings_grpc
from .gen.settlement.v1 import settlement_service_pb2 as settlement_svc_pb
from .gen.settlement.v1 import settlement_service_pb2_grpc as settlement_grpc
from .gen.tokenization.v1 import tokenization_service_pb2 as svc_pb
from .gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from .keyring import Keyring
from .observability import Metrics, start_metrics_server, stop_metrics_server
from .recordings.files import RecordingFiles
from .recordings.library import RecordingLibrary
from .retention import Purger
from .security.access import Guard, QuotaBuckets, load_policy
from .security.anchor import AuditCheckpointer
from .security.audit import AuditWriter
from .security.tls import load_server_credentials
from .security_codes import SecurityCodes
from .service import TokenService
from .store import Store
from .vault import RECORDINGS_KEY, TransitClient

log = logging.getLogger(__name__)

SERVICE_NAME = svc_pb.DESCRIPTOR.services_by_name["TokenizationService"].full_name
ADMIN_SERVICES = tuple(s.full_name for s in admin_svc_pb.DESCRIPTOR.services_by_name.values())
SETTLEMENT_SERVICE = settlement_svc_pb.DESCRIPTOR.services_by_name["SettlementService"].full_name
CAPTURE_SERVICE = capture_svc_pb.DESCRIPTOR.services_by_name["CaptureService"].full_name
RECORDING_SERVICE = (
    recordings_svc_pb.DESCRIPTOR.services_by_name["RecordingService"].full_name)
HEALTH_PERIOD_S = 5.0
# What we send is bounded by the chunk limit (20,000 items; a few MB even if every item is an
# error); what we receive by the configured limits.
MAX_SEND_BYTES = 16 << 20


class TokenizerServer:
    """A running tokenizer; `address` is host:port actually bound."""

    def __init__(self, config: TokenizerConfig, *, quota_buckets: QuotaBuckets | None = None,
                 background_jobs: bool = True) -> None:
        """`quota_buckets`: shared by the workers of `vaultline serve --workers N` (this
        process's own otherwise); `background_jobs`: the periodic jobs (audit checkpoints,
        purges, sweeps, retention) run in one worker only."""
        self.config = config
        self._quota_buckets = quota_buckets
        self._background_jobs = background_jobs
        self.address = ""
        self.store: Store | None = None
        self.keyring: Keyring | None = None
        self.service: TokenService | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._probe: asyncio.Task[None] | None = None
        self._vault: TransitClient | None = None
        self.checkpointer: AuditCheckpointer | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self.purger: Purger | None = None
        self._purging: asyncio.Task[None] | None = None
        self.metrics = Metrics()
        self.capture_hub = CaptureHub()
        self.captures: CaptureService | None = None
        self._capture_deadlines: asyncio.Task[None] | None = None
        self.security_codes: SecurityCodes | None = None
        self._code_sweeps: asyncio.Task[None] | None = None
        self.recordings: RecordingLibrary | None = None
        self._recording_keys: TransitClient | None = None
        self._recording_retention: asyncio.Task[None] | None = None
        self.metrics_address = ""
        self._metrics_server: object | None = None

    async def start(self) -> str:
        config = self.config
        # Refuse to start on a bad policy or unreadable TLS material, before touching anything.
        guard = Guard(load_policy(config.policy_path), buckets=self._quota_buckets)
        credentials = load_server_credentials(config.tls.ca, config.tls.cert, config.tls.key)
        # min_size=0: no connection is needed to start; the pool dials on first use.
        self.store = await Store.connect(
            config.database_url, min_size=0, max_size=config.db_pool_size
        )
        self._vault = TransitClient(
            config.vault_addr, config.vault_credentials, key_name=config.vault_key_name,
            audit_chain=config.audit_chain,
        )
        self.keyring = Keyring(self.store, self._vault, config.key_policy)
        audit = AuditWriter(self.store)
        commit_delay = CommitDelay(config.commit_delay_ms / 1000)  # 0: never waits
        self.security_codes = SecurityCodes(
            self.store, self.keyring, hold=config.security_code_hold,
            sweep_every_seconds=config.security_code_sweep_seconds)
        self.service = TokenService(
            self.store, self.keyring, audit=audit, commit_delay=commit_delay,
            security_codes=self.security_codes,
        )
        server = grpc.aio.server(
            options=[
                # Every message, streamed or not; unary requests are held to the smaller
                # max_unary_message_bytes by the call wrapper (api.calls).
                ("grpc.max_receive_message_length", max(
                    config.max_stream_message_bytes, config.max_unary_message_bytes)),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                ("grpc.so_reuseport", 1),
            ],
        )
        self.metrics.observe_keyring(self.keyring)
        self.metrics.observe_commit_delay(commit_delay)
        gate = Gate(guard, audit, self.metrics,
                    max_unary_bytes=config.max_unary_message_bytes)
        batches = BatchService(self.store, self._vault)
        pb_grpc.add_TokenizationServiceServicer_to_server(
            TokenizationServicer(self.service, gate, batches, DailyRevealBudget(self.store)),
            server,
        )
        settlement_grpc.add_SettlementServiceServicer_to_server(
            SettlementServicer(batches, gate), server)
        self._recording_keys = TransitClient(
            config.vault_addr, config.vault_credentials, key_name=RECORDINGS_KEY)
        self.recordings = RecordingLibrary(
            self.store,
            RecordingFiles(config.recordings_dir) if config.recordings_dir is not None else None,
            self._recording_keys, retention=config.recording_retention)
        recordings_grpc.add_RecordingServiceServicer_to_server(
            RecordingServicer(self.recordings, gate), server)
        self.captures = CaptureService(self.store, self.capture_hub)
        capture_grpc.add_CaptureServiceServicer_to_server(
            CaptureServicer(self.captures, gate), server)
        admin = (
            TransitClient(config.vault_addr, config.keys_admin_credentials,
                          key_name=config.vault_key_name)
            if config.keys_admin_credentials is not None
            else None
        )
        admin_grpc.add_KeyServiceServicer_to_server(
            KeyServicer(self.store, admin, gate, self.keyring), server)
        admin_grpc.add_AuditServiceServicer_to_server(
            AuditServicer(self.store, gate, self._vault), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                *ADMIN_SERVICES,
                SETTLEMENT_SERVICE,
                CAPTURE_SERVICE,
                RECORDING_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        port = server.add_secure_port(config.grpc_listen, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {config.grpc_listen}")
        host = config.grpc_listen.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        await server.start()
        self._server = server
        await self.capture_hub.start(self.store)
        self._probe = asyncio.create_task(self._probe_health())
        self.checkpointer = AuditCheckpointer(
            self.store, self._vault, every_seconds=config.audit_checkpoint_seconds,
            every_records=config.audit_checkpoint_records)
        self.purger = Purger(self.store, every_seconds=config.purge_interval_seconds,
                             request_retention=config.tokenize_request_retention)
        if self._background_jobs:
            self._checkpointing = asyncio.create_task(self.checkpointer.run())
            self._purging = asyncio.create_task(self.purger.run())
            self._capture_deadlines = asyncio.create_task(self.captures.run_deadlines())
            self._code_sweeps = asyncio.create_task(self.security_codes.run())
            self._recording_retention = asyncio.create_task(self.recordings.run())
        if config.metrics_listen:
            mhost, mport = config.metrics_listen.rsplit(":", 1)
            self._metrics_server, bound = start_metrics_server(self.metrics, mhost, int(mport))
            self.metrics_address = f"{mhost}:{bound}"
        log.info("tokenizer listening on %s (mTLS)", self.address)
        return self.address

    async def _probe_health(self) -> None:
        assert self._health is not None and self.store is not None and self._vault is not None
        last = None
        while True:
            try:
                await self.store.ping()
                ok = await asyncio.to_thread(self._vault.health)
            except DependencyUnavailable:
                ok = False
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            if status != last:
                log.info("health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
                last = status
            for name in ("", SERVICE_NAME):
                await self._health.set(name, status)
            await asyncio.sleep(HEALTH_PERIOD_S)

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        for task in (self._checkpointing, self._purging, self._capture_deadlines,
                     self._code_sweeps, self._recording_retention):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._checkpointing = self._purging = self._capture_deadlines = None
        self._code_sweeps = self._recording_retention = None
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
            log.info("tokenizer stopped")
        await self.capture_hub.stop()
        if self._background_jobs and self.checkpointer is not None and self.store is not None:
            # The records of the last moments get their checkpoint too, if OpenBao answers.
            try:
                await asyncio.wait_for(self.checkpointer.checkpoint(), timeout=5)
            except Exception:  # noqa: BLE001 - shutting down either way
                log.warning("no final audit checkpoint", exc_info=True)
            self.checkpointer = None
        if self._metrics_server is not None:
            stop_metrics_server(self._metrics_server)  # type: ignore[arg-type]
            self._metrics_server = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.keyring is not None:
            self.keyring.clear()  # plaintext keys do not outlive the server
