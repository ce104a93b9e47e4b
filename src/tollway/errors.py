"""The one error hierarchy. Each error carries the public HTTP status, type and code.

    TollwayError
    ├── InvalidRequest (400 invalid_request_error)
    │   ├── InvalidSignature   — a payment webhook whose signature is forged or stale
    │   ├── PaymentMismatch    — a paid session that does not match its order (not credited)
    │   ├── CatalogError       — the catalog file cannot be used as written
    │   └── IdempotencyConflict — a key reused with different parameters (409)
    ├── AuthenticationError (401)
    │   ├── InvalidApiKey, RevokedApiKey, ExpiredApiKey
    │   └── InvalidAdminToken
    ├── InsufficientBalance (402)
    ├── ModelNotAllowed (403)
    ├── IpNotAllowed (403) — the key's IP allowlist does not include the client
    ├── AccountDisabled (403) — the operator disabled the key's account
    ├── CsrfFailed (403) — a console form without its session's CSRF token
    ├── NotFound (404): UnknownAccount, UnknownApiKey, UnknownHold, UnknownModel, UnknownEndpoint,
    │                   UnknownCode (a redemption code nobody minted)
    ├── LimitExceeded (429, may carry Retry-After)
    │   ├── QuotaExceeded — the key's total quota or a period spend cap
    │   └── RateLimited   — requests or tokens per minute, or requests in flight
    ├── HoldClosed (409) — settle/void of a hold another operation already closed
    ├── RequestInProgress (409) — a retry arrived while the first request still runs
    ├── CodeRedeemed (409) — a redemption code was already used
    ├── CodeExpired (410) — a redemption code past its expiry, or revoked (CodeRevoked)
    ├── PayloadTooLarge (413)
    ├── UpstreamError (502) — the upstream failed, answered garbage or could not be reached
    │   ├── UpstreamTimeout (504)
    │   └── PaymentProviderError — the payment provider refused or could not be reached
    ├── StorageUnavailable (503) — the database cannot be reached
    ├── PaymentsUnavailable (503) — card top-ups are not configured on this server
    └── Overloaded (503) — this worker has too many requests in flight; shed before any work

The 503s carry ``retry_after_s`` (sent as ``Retry-After``): both go away by themselves.

Callers catch by meaning; the HTTP layer renders any of them as
``{"error": {"type", "code", "message", "param", "request_id"}}`` (Anthropic's shape on
``/v1/messages``) and the CLI prints the message and
exits non-zero.
"""

from __future__ import annotations


class TollwayError(Exception):
    status = 500
    type = "api_error"
    code = "internal_error"
    retry_after_s: int | None = None
    #: The request field the error is about (OpenAI's ``param``), when there is one.
    param: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        #: Extra response headers (the gateway's rate-limit headers of a refused request).
        self.headers: list[tuple[bytes, bytes]] = []

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """Every header an HTTP answer of this error carries: its own, and ``Retry-After``
        when it goes away by itself (a limit's reset, a 503). The one place for both."""
        if self.retry_after_s is None:
            return self.headers
        return [*self.headers, (b"retry-after", str(self.retry_after_s).encode())]


class InvalidRequest(TollwayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class CatalogError(InvalidRequest):
    code = "invalid_catalog"

    def __init__(self, problems: list[str]) -> None:
        # one problem (a YAML syntax error, a missing file) reads on one line
        super().__init__("invalid catalog: " + problems[0] if len(problems) == 1 else
                         "invalid catalog:\n  " + "\n  ".join(problems))
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


class AccountDisabled(TollwayError):
    status = 403
    type = "permission_error"
    code = "account_disabled"


class CsrfFailed(TollwayError):
    status = 403
    type = "permission_error"
    code = "invalid_csrf_token"


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


class UnknownResponse(NotFound):
    """A ``previous_response_id`` or ``conversation`` that is not the caller's."""

    code = "unknown_response"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownCode(NotFound):
    code = "unknown_code"


class LimitExceeded(TollwayError):
    """A limit refused the request before anything was forwarded or held. ``retry_after_s``
    (whole seconds) is when the limit that refused it resets, if it resets by itself."""

    status = 429

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QuotaExceeded(LimitExceeded):
    type = "billing_error"
    code = "quota_exceeded"


class RateLimited(LimitExceeded):
    type = "rate_limit_error"
    code = "rate_limited"


class IpNotAllowed(TollwayError):
    status = 403
    type = "permission_error"
    code = "ip_not_allowed"


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


class CodeRedeemed(TollwayError):
    status = 409
    type = "billing_error"
    code = "code_redeemed"


class CodeExpired(TollwayError):
    status = 410
    type = "billing_error"
    code = "code_expired"


class CodeRevoked(CodeExpired):
    code = "code_revoked"


class NoChannelAvailable(UpstreamError):
    """Every channel of the item is disabled or its circuit is open: nothing was forwarded.
    ``retry_after_s``: when the first open circuit lets a probe through."""

    status = 503
    code = "no_channel_available"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

class InvalidSignature(InvalidRequest):
    code = "invalid_signature"


class PaymentMismatch(InvalidRequest):
    code = "payment_mismatch"


class PaymentProviderError(UpstreamError):
    code = "payment_provider_error"


class PaymentsUnavailable(TollwayError):
    status = 503
    type = "api_error"
    code = "payments_unavailable"
