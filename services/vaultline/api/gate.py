"""The gate every RPC passes: who is calling (mTLS identity), may they (policy), and the trace
(audit record, metrics) of what happened — allowed or denied.

One object per server, used by the servicer wrappers. Reveals are audited before the card
leaves the process: if the audit record cannot be made durable, the card is not returned.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Protocol

import grpc

from ..security.access import (
    REVEALING_METHODS,
    TOKENIZING_METHODS,
    Grant,
    Guard,
    QuotaExceeded,
    Unauthenticated,
)
from ..security.answers import AnswerWatch
from ..security.audit import AuditEvent, AuditSink
from ..security.identity import IdentityError, identity_from_auth_context
from .context import CallContext, current_call

log = logging.getLogger(__name__)


class CallMetrics(Protocol):
    def observe_call(self, method: str, code: str, seconds: float) -> None: ...
    def observe_detokenized(self, identity: str, count: int) -> None: ...
    def observe_quota_refusal(self, identity: str, method: str) -> None: ...
    def observe_tokenize_answers(self, identity: str | None, answer: str, n: int) -> None: ...
    def observe_share_jump(self, identity: str | None) -> None: ...


class Gate:
    def __init__(
        self,
        guard: Guard,
        audit: AuditSink,
        metrics: CallMetrics | None = None,
        *,
        max_unary_bytes: int = 1 << 20,
    ) -> None:
        self.guard = guard
        self.audit_sink = audit
        self.metrics = metrics
        self.max_unary_bytes = max_unary_bytes
        self.answers = AnswerWatch()

    def admit(self, call: CallContext, context: grpc.aio.ServicerContext) -> CallContext:
        """Authenticate and authorize the call's method; the admitted context becomes current."""
        try:
            identity = identity_from_auth_context(context.auth_context())
        except IdentityError as exc:
            raise Unauthenticated(exc.reason) from None
        # Current before authorizing, so a refusal is audited under the caller's identity.
        known = CallContext(call.method, call.request_id, call.peer, identity.uri, identity.role)
        current_call.set(known)
        grant = self.guard.authorize(identity.uri, identity.role, call.method)
        admitted = CallContext(
            call.method, call.request_id, call.peer, identity.uri, identity.role, grant
        )
        current_call.set(admitted)
        return admitted

    def check_tenant(self, call: CallContext, tenant: str) -> None:
        assert call.grant is not None
        self.guard.check_tenant(call.grant, tenant)

    def take_quota(self, call: CallContext, count: int) -> None:
        """Spend `count` from the caller's quota for this method: reveals, or cards taken in."""
        grant: Grant | None = call.grant
        tokenize = call.method in TOKENIZING_METHODS
        assert grant is not None and (tokenize or call.method in REVEALING_METHODS)
        try:
            self.guard.take_quota(grant, count, tokenize=tokenize)
        except QuotaExceeded:
            log.warning(
                "%s quota exceeded", "tokenization" if tokenize else "detokenization",
                extra={"identity": grant.uri, "count": count},
            )
            if self.metrics is not None:
                self.metrics.observe_quota_refusal(grant.uri, call.method)
            raise

    def observe_tokenize(
        self, call: CallContext, *, new: int = 0, returning: int = 0, reused: int = 0
    ) -> None:
        """Tokenize answers (a call's one, or a chunk's): counted per identity and kind, and
        a WARNING when an identity's share of answers confirming a known card jumps."""
        if self.metrics is not None:
            for answer, n in (("new", new), ("returning", returning), ("reused", reused)):
                self.metrics.observe_tokenize_answers(call.identity, answer, n)
        jump = self.answers.observe(call.identity or "", new + returning + reused,
                                    returning + reused)
        if jump is not None:
            log.warning(
                "tokenize answers confirming a known card jumped to %.0f%% of %d in a window"
                " (usually %.0f%%): a caller checking card numbers against the vault?",
                100 * jump.share, jump.answers, 100 * jump.usual,
                extra={"identity": call.identity})
            if self.metrics is not None:
                self.metrics.observe_share_jump(call.identity)

    def event(
        self, call: CallContext, outcome: str, *, tenant: str, token: str = "", purpose: str = "",
        tokens: Sequence[str] = (),
    ) -> AuditEvent:
        return AuditEvent(
            identity=call.identity or "",
            role=call.role or "",
            tenant=tenant,
            method=call.method,
            outcome=outcome,
            request_id=call.request_id,
            peer=call.peer,
            token=token,
            purpose=purpose,
            at=dt.datetime.now(dt.UTC),
            tokens=tuple(tokens),
        )

    async def audit(self, events: Sequence[AuditEvent]) -> None:
        await self.audit_sink.record(events)

    async def audit_reveals(
        self, call: CallContext, tenant: str, purpose: str, tokens: Sequence[str]
    ) -> None:
        """One record naming every revealed token, durable before any of them is returned."""
        if not tokens:
            return
        await self.audit_sink.record(
            [self.event(call, "OK", tenant=tenant, purpose=purpose, tokens=tokens)])
        self.count_reveals(call, len(tokens))

    def count_reveals(self, call: CallContext, count: int) -> None:
        if self.metrics is not None and call.identity:
            self.metrics.observe_detokenized(call.identity, count)
