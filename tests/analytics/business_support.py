"""Shared by the business-analytics tests: a real analytics service and hand-built data."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from types import ModuleType
from typing import Any

import grpc
import pytest

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.servicekit.auth import issue_token
from services.servicekit.server import ServiceApp
from tests.support import JWT_SECRET

Metadata = tuple[tuple[str, str], ...]
_ids = itertools.count()


def analytics_app() -> ModuleType:
    return importlib.import_module("services.analytics.app")


def auth(subject: str, role: str = "user") -> Metadata:
    return (("authorization", f"Bearer {issue_token(JWT_SECRET, subject, role=role)}"),)


ADMIN = auth("admin-1", "admin")


def day_at(day: date, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=UTC)


def today() -> date:
    return datetime.now(UTC).date()


@dataclass
class Client:
    app: ServiceApp
    stub: analytics_pb2_grpc.AnalyticsServiceStub

    async def events(
        self,
        user: str | None,
        at: datetime,
        n: int = 1,
        session: str = "",
        properties: dict[str, Any] | None = None,
    ) -> None:
        request = analytics_pb2.RecordEventsRequest()
        for _ in range(n):
            i = next(_ids)
            e = request.events.add(
                event_id=f"e{i}",
                session_id=session or f"s-{user or 'anon'}-{at:%Y%m%d}",
                user_id=user or "",
                event_type="page_view",
            )
            if properties:
                e.properties.update(properties)
            e.timestamp.FromDatetime(at)
        reply = await self.stub.RecordEvents(request, timeout=10)
        assert reply.accepted == n

    async def steps(self, user: str, at: datetime, step: str, n: int = 1, effect: str = "fx") -> None:
        request = analytics_pb2.RecordFunnelStepsRequest()
        for _ in range(n):
            i = next(_ids)
            s = request.steps.add(
                step_id=f"f{i}", session_id=f"s-{user}-{at:%Y%m%d}", user_id=user, step=step, effect_id=effect
            )
            s.timestamp.FromDatetime(at)
        reply = await self.stub.RecordFunnelSteps(request, timeout=10)
        assert reply.accepted == n


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[ServiceApp], Client]]:
    channels: list[grpc.aio.Channel] = []

    def make(app: ServiceApp) -> Client:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        channels.append(channel)
        return Client(app, analytics_pb2_grpc.AnalyticsServiceStub(channel))

    yield make
    for channel in channels:
        await channel.close()


# Fresh answers in tests: no report cache, every changed day re-aggregated at once.
FRESH = {"analytics_business_ttl_seconds": 0, "analytics_preagg_min_age_seconds": 0}


def rel(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def date_range(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]
