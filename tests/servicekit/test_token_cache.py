"""The kit remembers tokens it verified (PyJWT costs about as much as the rest of a
small RPC), and the memory never lets through what verification would refuse: `exp` is
checked against the kit's clock on every use, failures are never remembered, and the
memory is bounded."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import grpc
import jwt
import pytest

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.monitoring import app as monitoring_app
from services.servicekit.auth import (
    CLOCK_SKEW_SECONDS,
    AuthError,
    Principal,
    VerifiedTokens,
    issue_token,
    verify,
)
from services.servicekit.clock import ManualClock
from services.servicekit.server import ServiceApp
from tests.servicekit.test_internal_auth import OTHER_SECRET, Recorder, bearer, module
from tests.support import JWT_SECRET

pytestmark = pytest.mark.timeout(60)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any]) -> str:
    """A token with `"alg": "none"` and no signature."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def forged(token: str, **claims: Any) -> str:
    """`token`'s header and signature around a payload changed to `claims`."""
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{_b64(json.dumps({**body, **claims}).encode())}.{signature}"


def flipped(token: str) -> str:
    """`token` with its signature's first character changed (the bits that count)."""
    head, _, signature = token.rpartition(".")
    return f"{head}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"


def refused(tokens: VerifiedTokens, token: str) -> bool:
    try:
        tokens.verify(f"Bearer {token}")
    except AuthError:
        return True
    return False


def test_a_verified_token_is_remembered_and_bad_ones_never_are() -> None:
    clock = ManualClock(time.time())
    tokens = VerifiedTokens(JWT_SECRET, clock=clock)
    good = issue_token(JWT_SECRET, "alice", "user", ttl_seconds=60, now=clock.time())
    assert tokens.verify(f"Bearer {good}") == Principal("alice", "user")
    assert tokens.verify(f"Bearer {good}") == Principal("alice", "user")
    assert (tokens.hits, tokens.misses, len(tokens)) == (1, 1, 1)
    now = clock.time()
    claims = {"sub": "alice", "role": "admin", "iat": int(now), "exp": int(now) + 60}
    bad = [
        flipped(good),  # forged signature
        forged(good, role="admin"),  # the good signature over other claims
        issue_token(OTHER_SECRET, "alice", "admin", ttl_seconds=60, now=now),  # wrong secret
        unsigned(claims),  # `none` algorithm
        unsigned(claims)[:-1] + good.rpartition(".")[2],  # `none` header with a real signature
        issue_token(JWT_SECRET, "alice", "user", ttl_seconds=-60, now=now),  # expired
        issue_token(JWT_SECRET, "alice", "root", ttl_seconds=60, now=now),  # no such role
    ]
    for token in bad:
        for _ in range(2):  # the second try must not find it remembered
            assert refused(tokens, token), token
    assert (tokens.hits, len(tokens)) == (1, 1)
    assert tokens.verify(f"Bearer {good}") == Principal("alice", "user")  # still the good one


def test_exp_is_checked_on_every_use_of_a_remembered_token() -> None:
    clock = ManualClock(time.time())
    tokens = VerifiedTokens(JWT_SECRET, clock=clock)
    good = issue_token(JWT_SECRET, "alice", "user", ttl_seconds=60, now=clock.time())
    assert tokens.verify(f"Bearer {good}") is not None
    clock.advance(60 + CLOCK_SKEW_SECONDS - 1)  # within the skew allowed for clocks
    assert tokens.verify(f"Bearer {good}") is not None
    assert tokens.hits == 1
    clock.advance(1)  # exp <= now - skew: expired, as PyJWT decides
    for _ in range(3):  # replayed after expiry: refused every time, and forgotten
        with pytest.raises(AuthError, match="expired"):
            tokens.verify(f"Bearer {good}")
    assert len(tokens) == 0
    # The module-level verify decides the same on the same clock.
    with pytest.raises(AuthError, match="expired"):
        verify(f"Bearer {good}", JWT_SECRET, clock)


def test_the_memory_is_bounded_least_recently_used_first() -> None:
    clock = ManualClock(time.time())
    tokens = VerifiedTokens(JWT_SECRET, max_tokens=3, clock=clock)
    minted = [issue_token(JWT_SECRET, f"u{i}", ttl_seconds=60, now=clock.time()) for i in range(5)]
    for token in minted[:3]:
        tokens.verify(f"Bearer {token}")
    tokens.verify(f"Bearer {minted[0]}")  # u0 used again: u1 is now the oldest
    for token in minted[3:]:
        tokens.verify(f"Bearer {token}")
    assert len(tokens) == 3
    hits = tokens.hits
    tokens.verify(f"Bearer {minted[0]}")
    assert tokens.hits == hits + 1  # kept
    tokens.verify(f"Bearer {minted[1]}")
    assert tokens.hits == hits + 1  # dropped: verified again
    with pytest.raises(ValueError):
        VerifiedTokens(JWT_SECRET, max_tokens=0)


def test_exp_must_be_a_number() -> None:
    now = int(time.time())
    for exp in ("99999999999", True, None):
        token = jwt.encode({"sub": "a", "iat": now, "exp": exp}, JWT_SECRET, algorithm="HS256")
        assert refused(VerifiedTokens(JWT_SECRET), token), exp


@pytest.fixture
async def recorder_on_clock(start_service: Any) -> tuple[ServiceApp, ManualClock]:
    servicer = Recorder()
    clock = ManualClock(time.time())

    async def wire(app: ServiceApp) -> None:
        app.add_service(
            monitoring_app.SERVICE,
            servicer,
            monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server,
            monitoring_app.ACCESS,
        )

    return await start_service(module("monitoring", wire), auth_clock=clock), clock


async def test_through_the_interceptor_nothing_bad_passes_once_a_good_token_is_cached(
    recorder_on_clock: Any,
) -> None:
    app, clock = recorder_on_clock
    now = clock.time()
    good = issue_token(JWT_SECRET, "effects", "service", ttl_seconds=60, now=now)
    claims = {"sub": "effects", "role": "service", "iat": int(now), "exp": int(now) + 60}
    request = monitoring_pb2.RecordApiTimingsRequest(timings=[monitoring_pb2.ApiTiming()])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(ch)

        async def code(token: str) -> grpc.StatusCode:
            try:
                await stub.RecordApiTimings(request, metadata=bearer(token), timeout=5)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        assert await code(good) == grpc.StatusCode.OK
        assert await code(good) == grpc.StatusCode.OK
        cache = app._interceptor.tokens if app._interceptor is not None else None
        assert cache is not None and cache.hits >= 1
        for token in (
            flipped(good),
            issue_token(OTHER_SECRET, "effects", "service", ttl_seconds=60, now=now),
            unsigned(claims),
            forged(issue_token(JWT_SECRET, "effects", "user", ttl_seconds=60, now=now), role="service"),
        ):
            assert await code(token) == grpc.StatusCode.UNAUTHENTICATED, token
        clock.advance(60 + CLOCK_SKEW_SECONDS)
        for _ in range(2):  # the cached token, replayed after its expiry
            assert await code(good) == grpc.StatusCode.UNAUTHENTICATED
