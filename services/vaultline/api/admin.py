"""KeyService and AuditService servicers (role `admin`): protobuf in, domain call, protobuf out.

Key operations use a separate keys-admin AppRole; a tokenizer started without one answers
FAILED_PRECONDITION rather than borrowing its own, least-privilege credentials.
"""

from __future__ import annotations

from typing import Any

from ..errors import FieldViolation, InvalidInput, InvalidPageToken, KeyAdminNotConfigured
from ..gen.admin.v1 import admin_pb2 as pb
from ..gen.admin.v1 import admin_service_pb2_grpc as pb_grpc
from ..keyring import KekAdmin, Keyring, rewrap_all
from ..security.anchor import CheckpointLedger, verify_anchored
from ..service import validate_tenant
from ..store import Store
from ..vault import run_transit
from .calls import unary
from .gate import Gate

MAX_PAGE = 1000


class KeyServicer(pb_grpc.KeyServiceServicer):
    def __init__(self, store: Store, admin: Any | None, gate: Gate,
                 keyring: Keyring | None = None) -> None:
        self._store = store
        self._admin: KekAdmin | None = admin
        self._gate = gate
        self._keyring = keyring

    def _require_admin(self) -> Any:
        if self._admin is None:
            raise KeyAdminNotConfigured()
        return self._admin

    @unary
    async def GetKeyStatus(
        self, request: pb.GetKeyStatusRequest, context: Any
    ) -> pb.GetKeyStatusResponse:
        admin = self._require_admin()
        status = await run_transit(admin.key_status)
        response = pb.GetKeyStatusResponse(
            kek_name=status.name,
            latest_version=status.latest_version,
            min_decryption_version=status.min_decryption_version,
        )
        for version, purpose, active, retired in await self._store.count_data_keys_by_kek_version():
            response.data_keys.add(
                kek_version=version, purpose=purpose, active=active, retired=retired
            )
        return response

    @unary
    async def RotateKek(self, request: pb.RotateKekRequest, context: Any) -> pb.RotateKekResponse:
        admin = self._require_admin()
        await run_transit(admin.rotate_key)
        latest = (await run_transit(admin.key_status)).latest_version
        report = await rewrap_all(self._store, admin, latest)
        if request.raise_min_decryption_version:
            await run_transit(admin.set_min_decryption_version, latest)
        return pb.RotateKekResponse(
            latest_version=latest, scanned=report.scanned, rewrapped=report.rewrapped
        )


    @unary
    async def ShredTenant(
        self, request: pb.ShredTenantRequest, context: Any
    ) -> pb.ShredTenantResponse:
        # The wrapper has already checked the caller's role and its grant of this tenant
        # (the request names one), and writes the call's audit record.
        tenant = validate_tenant(request.tenant)
        if not request.tenant or request.confirm_tenant != request.tenant:
            raise InvalidInput("CONFIRMATION_MISMATCH", (FieldViolation(
                "confirm_tenant", "must repeat the tenant to shred"),))
        keys, tokens, key_ids = await self._store.shred_tenant(tenant)
        if self._keyring is not None:  # other replicas drop them at restart (issue note)
            self._keyring.forget_tenant(tenant, key_ids)
        return pb.ShredTenantResponse(data_keys_destroyed=keys, tokens_deleted=tokens)


class AuditServicer(pb_grpc.AuditServiceServicer):
    def __init__(self, store: Store, gate: Gate, ledger: CheckpointLedger | None) -> None:
        self._store = store
        self._gate = gate
        self._ledger = ledger

    @unary
    async def ListAuditRecords(
        self, request: pb.ListAuditRecordsRequest, context: Any
    ) -> pb.ListAuditRecordsResponse:
        size = request.page_size or 100
        if not 1 <= size <= MAX_PAGE:
            size = min(max(size, 1), MAX_PAGE)
        before = 2**62
        if request.page_token:
            token = request.page_token
            # ASCII digits only ('²' is a digit to str.isdigit, not to int), and a seq we
            # could have issued: anything else is the caller's, not an INTERNAL error.
            if not (token.isascii() and token.isdigit() and len(token) <= 19):
                raise InvalidPageToken()
            before = int(token)
            if before > 2**62:
                raise InvalidPageToken()
        rows = await self._store.audit_page_before(before, size)
        response = pb.ListAuditRecordsResponse()
        for row in rows:
            record = response.records.add(
                seq=row["seq"], identity=row["identity"], role=row["role"],
                tenant=row["tenant"], method=row["method"], token=row["token"],
                purpose=row["purpose"], outcome=row["outcome"],
                request_id=row["request_id"], peer=row["peer"], hash=bytes(row["hash"]).hex(),
                tokens=row["tokens"],
            )
            record.time.FromDatetime(row["at"])
        if len(rows) == size and rows[-1]["seq"] > 1:
            response.next_page_token = str(rows[-1]["seq"])
        return response

    @unary
    async def VerifyAuditChain(
        self, request: pb.VerifyAuditChainRequest, context: Any
    ) -> pb.VerifyAuditChainResponse:
        report, _ = await verify_anchored(self._store, self._ledger)
        return pb.VerifyAuditChainResponse(
            intact=report.ok,
            checked=report.checked,
            first_broken_seq=report.first_broken_seq or 0,
            problem=report.problem if not report.ok else "",
        )
