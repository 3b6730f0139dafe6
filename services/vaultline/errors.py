"""Domain errors of the vault: what went wrong, in terms a caller can act on.

Every error carries a reason code (UPPER_SNAKE_CASE, stable, part of the API) and, for bad
input, the fields at fault — never the value that was sent. The gRPC layer turns them into
`google.rpc.Status` through one table (`vaultline.api.errors`).

    VaultlineError
     ├── InvalidInput          bad request; reason + field violations      -> INVALID_ARGUMENT
     ├── TokenNotFound         unknown, expired or deleted token            -> NOT_FOUND
     ├── RequestIdReused       same request_id, different card              -> ALREADY_EXISTS
     ├── TokenSpaceExhausted   no free token left for this BIN/last four    -> RESOURCE_EXHAUSTED
     ├── KeyAdminNotConfigured no keys-admin AppRole on this server         -> FAILED_PRECONDITION
     ├── InvalidPageToken      a page_token this service did not issue      -> INVALID_ARGUMENT
     ├── BatchNotFound         no such settlement batch                     -> NOT_FOUND
     ├── BatchStateConflict    the batch is not in a state that allows it   -> FAILED_PRECONDITION
     ├── DualControlRefused    dual control forbids this caller or chunk    -> PERMISSION_DENIED
     ├── DailyBudgetExceeded   the identity's Detokenize budget for today   -> RESOURCE_EXHAUSTED
     ├── CaptureNotFound       no such capture (or not the caller's tenant) -> NOT_FOUND
     ├── CaptureInProgress     the call already has a capture in progress   -> ALREADY_EXISTS
     ├── CaptureEnded          the capture has ended; nothing to change     -> FAILED_PRECONDITION
     ├── SecurityCodeNotFound  none held: redeemed, expired or never taken  -> NOT_FOUND
     ├── RecordingNotFound     no such recording (or not the caller's tenant) -> NOT_FOUND
     ├── RecordingNotPlayable  quarantined, not released, or not ready      -> FAILED_PRECONDITION
     └── DependencyUnavailable OpenBao or PostgreSQL cannot be reached      -> UNAVAILABLE
          ├── KeyServiceUnavailable
          └── DatabaseUnavailable

Card and token validation errors (`card.CardError`, `tokens.TokenError`) are converted to
`InvalidInput` at the service boundary, keeping their reason and field.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class VaultlineError(Exception):
    reason: str = "INTERNAL"
    message: str = "internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message


class InvalidInput(VaultlineError):
    reason = "INVALID_ARGUMENT"
    message = "the request is invalid"

    def __init__(self, reason: str, violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__()
        self.reason = reason
        self.violations = violations

    def with_prefix(self, prefix: str) -> InvalidInput:
        """The same error with field paths below `prefix` (e.g. `items[3].`)."""
        return InvalidInput(
            self.reason,
            tuple(FieldViolation(prefix + v.field, v.description) for v in self.violations),
        )


class TokenNotFound(VaultlineError):
    reason = "TOKEN_NOT_FOUND"
    message = "token not found"


class RequestIdReused(VaultlineError):
    reason = "REQUEST_ID_REUSED"
    message = "request_id was already used for a different card"


class TokenSpaceExhausted(VaultlineError):
    reason = "TOKEN_SPACE_EXHAUSTED"
    message = "no unused token is left for this format; use another token format"


class DependencyUnavailable(VaultlineError):
    reason = "DEPENDENCY_UNAVAILABLE"
    message = "a backing service is unavailable; retry later"


class KeyServiceUnavailable(DependencyUnavailable):
    reason = "KEY_SERVICE_UNAVAILABLE"
    message = "the key service is unavailable; retry later"


class DatabaseUnavailable(DependencyUnavailable):
    reason = "DATABASE_UNAVAILABLE"
    message = "the database is unavailable; retry later"


class KeyAdminNotConfigured(VaultlineError):
    reason = "KEY_ADMIN_NOT_CONFIGURED"
    message = "key administration is not configured on this server"


class InvalidPageToken(VaultlineError):
    reason = "INVALID_PAGE_TOKEN"
    message = "page_token is not one this service issued"


class BatchNotFound(VaultlineError):
    reason = "BATCH_NOT_FOUND"
    message = "no such settlement batch"


class _WithReason(VaultlineError):
    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class BatchStateConflict(_WithReason):
    """The batch's state does not allow this (not awaiting approval, not approved, done, run
    by another process, a run the caller does not hold). The message says which."""

    reason = "BATCH_STATE_CONFLICT"
    message = "the batch is not in a state that allows this"


class DualControlRefused(_WithReason):
    """Dual control forbids it: approving one's own batch, running a batch one approved,
    revealing without a running batch, or tokens that are not rows of the batch."""

    reason = "DUAL_CONTROL"
    message = "dual control forbids this"


class DailyBudgetExceeded(VaultlineError):
    reason = "DETOKENIZE_DAILY_BUDGET_EXCEEDED"
    message = "this identity's Detokenize budget for today is spent; use a settlement batch"


class SecurityCodeNotFound(VaultlineError):
    """No security code is held for the token: already redeemed, expired, never captured, or
    the token is gone. One answer for all, so a caller learns nothing about which."""

    reason = "SECURITY_CODE_NOT_FOUND"
    message = "no security code is held for this token"


class RecordingNotFound(VaultlineError):
    reason = "RECORDING_NOT_FOUND"
    message = "no such recording"


class RecordingNotPlayable(VaultlineError):
    """A recording whose key is not handed out: keypad tones found and no admin released it
    (RECORDING_QUARANTINED), or not stored and certified yet (RECORDING_NOT_READY)."""

    message = "this recording cannot be played"

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class CaptureNotFound(VaultlineError):
    reason = "CAPTURE_NOT_FOUND"
    message = "no such capture"


class CaptureInProgress(VaultlineError):
    reason = "CAPTURE_IN_PROGRESS"
    message = "this call already has a capture in progress"


class CaptureEnded(VaultlineError):
    reason = "CAPTURE_ENDED"
    message = "the capture has ended"
