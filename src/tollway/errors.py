"""The one error hierarchy. Each error carries the public HTTP status, type and code.

    TollwayError
    ├── InvalidRequest (400 invalid_request_error)
    │   ├── CatalogError       — the catalog file cannot be used as written
    │   └── IdempotencyConflict — a key reused with different parameters (409)
    ├── AuthenticationError (401)
    │   ├── InvalidApiKey, RevokedApiKey, ExpiredApiKey
    │   └── InvalidAdminToken
    ├── InsufficientBalance (402)
    ├── ModelNotAllowed (403)
    ├── NotFound (404): UnknownAccount, UnknownApiKey, UnknownHold, UnknownModel, UnknownEndpoint
    ├── QuotaExceeded (429)
    ├── HoldClosed (409) — settle/void of a hold another operation already closed
    ├── RequestInProgress (409) — a retry arrived while the first request still runs
    ├── PayloadTooLarge (413)
    ├── UpstreamError (502) — the upstream failed, answered garbage or could not be reached
    │   └── UpstreamTimeout (504)
    ├── StorageUnavailable (503) — the database cannot be reached
    └── Overloaded (503) — this worker has too many requests in flight; shed before any work

The 503s carry ``retry_after_s`` (sent as ``Retry-After``): both go away by themselves.

Callers catch by meaning; the HTTP layer renders any of them as
``{"error": {"type", "code", "message", "request_id"}}`` and the CLI prints the message and
exits non-zero.
"""

from __future__ import annotations


class TollwayError(Exception):
    status = 500
    type = "api_error"
    code = "internal_error"
    retry_after_s: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(TollwayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class CatalogError(InvalidRequest):
    code = "invalid_catalog"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid catalog:\n  " + "\n  ".join(problems))
        self.problems = problems


class IdempotencyConflict(InvalidRequest):
    status = 409
    code = "idempotency_conflict"


class AuthenticationError(TollwayError):
    status = 401
    type = "authentication_error"


class InvalidApiKey(AuthenticationError):
    code = "invalid_api_key"


class RevokedApiKey(AuthenticationError):
    code = "revoked_api_key"


class ExpiredApiKey(AuthenticationError):
    code = "expired_api_key"


class InvalidAdminToken(AuthenticationError):
    code = "invalid_admin_token"


class InsufficientBalance(TollwayError):
    status = 402
    type = "billing_error"
    code = "insufficient_balance"


class ModelNotAllowed(TollwayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(TollwayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class UnknownAccount(NotFound):
    code = "unknown_account"


class UnknownApiKey(NotFound):
    code = "unknown_api_key"


class UnknownHold(NotFound):
    code = "unknown_hold"


class UnknownModel(NotFound):
    code = "unknown_model"


class UnknownEndpoint(NotFound):
    code = "unknown_endpoint"


class QuotaExceeded(TollwayError):
    status = 429
    type = "billing_error"
    code = "quota_exceeded"


class HoldClosed(TollwayError):
    status = 409
    type = "billing_error"
    code = "hold_closed"


class RequestInProgress(TollwayError):
    status = 409
    type = "invalid_request_error"
    code = "request_in_progress"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class UpstreamError(TollwayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class StorageUnavailable(TollwayError):
    status = 503
    type = "api_error"
    code = "storage_unavailable"
    retry_after_s = 2


class Overloaded(TollwayError):
    status = 503
    type = "api_error"
    code = "overloaded"
    retry_after_s = 1
