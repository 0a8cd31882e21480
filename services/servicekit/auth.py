"""JWT authentication (HS256, `exp` required; claims `sub` and `role`).

Each service declares an access level per RPC; the auth interceptor enforces
it before the servicer runs and leaves the caller in `current_principal`.

Roles: `user`, `admin`, and `service` for the suite's own services. A service
mints its own short-lived `service` token from the shared secret
(:class:`ServiceTokens`) and the kit's channels attach it
(:func:`services.servicekit.channels.service_channel`); internal RPCs accept
nothing else.
"""

from __future__ import annotations

import contextvars
import enum
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from .clock import SYSTEM_CLOCK, Clock

ROLES = ("user", "admin", "service")
# Clocks of two replicas differ a little: a token minted by a peer whose clock is ahead
# must not read as "not yet valid" (iat), nor one just expired on a clock behind.
CLOCK_SKEW_SECONDS = 5


class Access(enum.Enum):
    PUBLIC = "public"  # a token is optional
    USER = "user"  # any valid token
    ADMIN = "admin"  # a valid token with role admin
    INTERNAL = "internal"  # a `service` token only; never routed by the edge
    ADMIN_OR_SERVICE = "admin_or_service"  # role admin, or another service's `service` token


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_service(self) -> bool:
        return self.role == "service"


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)


class AuthError(Exception):
    """`denied` is False for a missing or bad token (401), True for a valid one lacking rights (403)."""

    def __init__(self, message: str, denied: bool = False) -> None:
        super().__init__(message)
        self.denied = denied


def _bearer(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("authorization must be 'Bearer <token>'")
    return token.strip()


def _decode(token: str, secret: str) -> tuple[Principal, float]:
    """Signature (HS256 only), required claims and role checked; (principal, exp).

    `exp` is checked by the caller against its clock (`_refuse_expired`), on every use:
    PyJWT's own check would read the system clock, and a cached token must be checked
    again each time anyway."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["exp", "sub"], "verify_exp": False},
            leeway=CLOCK_SKEW_SECONDS,
        )
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float) or exp != exp:  # NaN
        raise AuthError("invalid token: Expiration Time claim (exp) must be a number.")
    role = claims.get("role", "user")
    if role not in ROLES:
        raise AuthError("invalid token: role must be user, admin or service")
    return Principal(subject=str(claims["sub"]), role=role), float(exp)


def _refuse_expired(exp: float, now: float) -> None:
    # PyJWT's rule: expired once exp <= now - leeway.
    if exp <= now - CLOCK_SKEW_SECONDS:
        raise AuthError("invalid token: Signature has expired")


def verify(authorization: str | None, secret: str, clock: Clock = SYSTEM_CLOCK) -> Principal | None:
    """The principal of an `Authorization: Bearer` value; None without one."""
    if not authorization:
        return None
    principal, exp = _decode(_bearer(authorization), secret)
    _refuse_expired(exp, clock.time())
    return principal


class VerifiedTokens:
    """`verify` with a bounded memory of tokens already verified.

    Verifying an HS256 token with PyJWT costs about as much as the rest of a small RPC;
    clients send the same token on every call until it expires. A token whose signature,
    claims and role passed is remembered by its exact text with its principal and `exp`
    (least recently used dropped beyond `max_tokens`). `exp` is checked against the
    clock on every use, cached or not, so an expired token is refused at once; a token
    that fails any check is never remembered, so a forged, wrongly signed or `none`
    token always goes through the full verification.
    """

    def __init__(self, secret: str, max_tokens: int = 4096, clock: Clock = SYSTEM_CLOCK) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self._secret = secret
        self._max = max_tokens
        self._clock = clock
        self._tokens: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def verify(self, authorization: str | None) -> Principal | None:
        if not authorization:
            return None
        token = _bearer(authorization)
        now = self._clock.time()
        known = self._tokens.get(token)
        if known is not None:
            principal, exp = known
            if exp <= now - CLOCK_SKEW_SECONDS:
                del self._tokens[token]
                raise AuthError("invalid token: Signature has expired")
            self._tokens.move_to_end(token)
            self.hits += 1
            return principal
        self.misses += 1
        principal, exp = _decode(token, self._secret)
        _refuse_expired(exp, now)
        self._tokens[token] = (principal, exp)
        if len(self._tokens) > self._max:
            self._tokens.popitem(last=False)
        return principal


def authorize(access: Access, principal: Principal | None) -> None:
    if access is Access.PUBLIC:
        return
    if principal is None:
        raise AuthError("authentication required")
    if access is Access.ADMIN and not principal.is_admin:
        raise AuthError("admin role required", denied=True)
    if access is Access.ADMIN_OR_SERVICE and not (principal.is_admin or principal.is_service):
        raise AuthError("admin role or service token required", denied=True)
    if access is Access.INTERNAL and not principal.is_service:
        raise AuthError("service token required", denied=True)


def issue_token(
    secret: str, subject: str, role: str = "user", ttl_seconds: int = 3600, now: float | None = None
) -> str:
    """A signed token (development tokens for `make up`, service tokens, and tests)."""
    issued = int(time.time() if now is None else now)
    return jwt.encode(
        {"sub": subject, "role": role, "iat": issued, "exp": issued + ttl_seconds},
        secret,
        algorithm="HS256",
    )


class ServiceTokens:
    """The `service` token a service presents to the others, minted by itself.

    `sub` is the service's name. A token lives `ttl_seconds` (5 minutes by
    default) and is re-minted once less than `refresh_before` seconds of it
    remain, so a call never leaves with a token about to expire.
    """

    def __init__(
        self,
        secret: str,
        service: str,
        ttl_seconds: int = 300,
        refresh_before: float = 60.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not 0 <= refresh_before < ttl_seconds:
            raise ValueError("refresh_before must be shorter than ttl_seconds")
        self._secret = secret
        self.service = service
        self._ttl = ttl_seconds
        self._refresh_before = refresh_before
        self._clock = clock
        self._token = ""
        self._expires = 0.0
        self.minted = 0

    def token(self) -> str:
        now = self._clock.time()
        if now >= self._expires - self._refresh_before:
            self._token = issue_token(self._secret, self.service, "service", self._ttl, now=now)
            self._expires = int(now) + self._ttl
            self.minted += 1
        return self._token

    def metadata(self) -> tuple[str, str]:
        """The `authorization` metadata pair to send."""
        return ("authorization", f"Bearer {self.token()}")
