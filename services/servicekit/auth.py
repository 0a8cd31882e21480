"""JWT authentication (HS256, `exp` required; claims `sub` and `role`).

Each service declares an access level per RPC; the auth interceptor enforces
it before the servicer runs and leaves the caller in `current_principal`.
"""

from __future__ import annotations

import contextvars
import enum
import time
from dataclasses import dataclass

import jwt


class Access(enum.Enum):
    PUBLIC = "public"  # a token is optional
    USER = "user"  # any valid token
    ADMIN = "admin"  # a valid token with role admin
    INTERNAL = "internal"  # service-to-service only; never routed by the edge


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)


class AuthError(Exception):
    """`denied` is False for a missing or bad token (401), True for a valid one lacking rights (403)."""

    def __init__(self, message: str, denied: bool = False) -> None:
        super().__init__(message)
        self.denied = denied


def verify(authorization: str | None, secret: str) -> Principal | None:
    """The principal of an `Authorization: Bearer` value; None without one."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("authorization must be 'Bearer <token>'")
    try:
        claims = jwt.decode(token.strip(), secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    role = claims.get("role", "user")
    if role not in ("user", "admin"):
        raise AuthError("invalid token: role must be user or admin")
    return Principal(subject=str(claims["sub"]), role=role)


def authorize(access: Access, principal: Principal | None) -> None:
    if access in (Access.PUBLIC, Access.INTERNAL):
        return
    if principal is None:
        raise AuthError("authentication required")
    if access is Access.ADMIN and not principal.is_admin:
        raise AuthError("admin role required", denied=True)


def issue_token(secret: str, subject: str, role: str = "user", ttl_seconds: int = 3600) -> str:
    """A signed token (development tokens for `make up`, and tests)."""
    now = int(time.time())
    return jwt.encode(
        {"sub": subject, "role": role, "iat": now, "exp": now + ttl_seconds},
        secret,
        algorithm="HS256",
    )
