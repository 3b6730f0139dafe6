"""The IVR's tokenizer client: `TokenizationService/Tokenize` over a channel the caller builds.

Taking a ready `grpc.aio.Channel` keeps transport security out of here: the caller builds it
with mTLS and the `ivr` client certificate (`vaultline ivr serve`, the dev stack).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from ..gen.tokenization.v1 import tokenization_pb2 as pb
from ..gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc
from ..rpc_reasons import call_reason
from .interpreter import Secrets

__all__ = ["IvrTokenizer", "TokenizeRefused", "TokenizeResult", "TokenizerUnavailable"]

_FORMATS = {
    "numeric": pb.TOKEN_FORMAT_NUMERIC,
    "numeric_keep_bin": pb.TOKEN_FORMAT_NUMERIC_KEEP_BIN,
    "opaque": pb.TOKEN_FORMAT_OPAQUE,
}


class TokenizerUnavailable(Exception):
    """Tokenize failed; carries the gRPC status code name only."""

    def __init__(self, code: str, reason: str = "") -> None:
        super().__init__(f"tokenize failed: {code}")
        self.code = code
        self.reason = reason  # the tokenizer's ErrorInfo reason, e.g. INVALID_PAN


class TokenizeRefused(TokenizerUnavailable):
    """The tokenizer refused this card or request (INVALID_ARGUMENT, ALREADY_EXISTS): retrying
    the same request will not help; `reason` says why."""


_REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS})


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    token: str
    brand: str
    last4: str
    expiry_month: int
    expiry_year: int


class IvrTokenizer:
    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 5.0) -> None:
        self._stub = pb_grpc.TokenizationServiceStub(channel)
        self._timeout = timeout

    async def tokenize(self, tenant: str, secrets: Secrets, token_format: str,
                       request_id: str) -> TokenizeResult:
        """`request_id` makes a retry (another replica, a replay) return the same token; a
        security code in `secrets` goes along, to be held until authorisation."""
        request = pb.TokenizeRequest(
            tenant=tenant,
            card=pb.Card(pan=secrets.pan, expiry_month=int(secrets.expiry[:2]),
                         expiry_year=2000 + int(secrets.expiry[2:])),
            format=_FORMATS[token_format],
            request_id=request_id,
            # Held sealed by the tokenizer until the payment service redeems it, never stored
            # with the card (PCI DSS 3.3.2).
            security_code=secrets.security_code,
        )
        return await self._call(self._stub.Tokenize, request)

    async def get_token(self, tenant: str, token: str) -> TokenizeResult:
        """A token's metadata (brand, last four, expiry), as GetToken shows it."""
        return await self._call(self._stub.GetToken,
                                pb.GetTokenRequest(tenant=tenant, token=token))

    async def _call(self, method: Any, request: Any) -> TokenizeResult:
        """One call; its answer's token, or TokenizeRefused / TokenizerUnavailable."""
        try:
            response = await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            cls = TokenizeRefused if exc.code() in _REFUSALS else TokenizerUnavailable
            raise cls(exc.code().name, call_reason(exc)) from None
        token = response.token
        return TokenizeResult(token.token, pb.CardBrand.Name(token.brand).removeprefix(
            "CARD_BRAND_"), token.last4, token.expiry_month, token.expiry_year)
