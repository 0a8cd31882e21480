"""The effect catalog: the repository's `catalog.json` loaded into the schema, and
each effect's parameters from its webapp's RunningHub config (`apiCallDemo`).

Webapp configs are cached per region in the multi-level cache for hours. A
config older than `refresh_after` is refreshed in the background (one refresh
per webapp across replicas, by a Redis lease) while the cached copy is served;
while RunningHub is down the cached copy keeps being served, and when both
cache levels are empty the last good copy comes from the `webapp_configs`
table. Concurrent first requests share one fetch (the cache's single-flight).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from cosnap.effects.v1 import effects_pb2
from services.servicekit.cache import MultiLevelCache
from services.servicekit.errors import FieldViolations, not_found, unavailable
from services.servicekit.redis_client import RedisClient

from .parameters import Parameter, from_config
from .runninghub import BusinessError, Regions, UpstreamError

log = logging.getLogger(__name__)

REGIONS = ("cn", "global")
EFFECT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
WEBAPP_ID = re.compile(r"^\d{1,32}$")
DEFAULT_PAGE = 50
MAX_PAGE = 100


@dataclass(frozen=True)
class EffectRow:
    effect_id: str
    name: str
    description: str
    category: str
    region: str
    webapp_id: str
    cover_url: str
    labels: dict[str, str]


def load_file(path: Path) -> list[EffectRow]:
    """The catalog file's effects; a malformed file stops the start-up, naming the entry."""
    data = json.loads(path.read_text())
    rows: list[EffectRow] = []
    seen: set[str] = set()
    for i, item in enumerate(data.get("effects", [])):
        where = f"{path.name}: effects[{i}]"
        try:
            row = EffectRow(
                effect_id=str(item["id"]),
                name=str(item["name"]),
                description=str(item.get("description", "")),
                category=str(item.get("category", "")),
                region=str(item["region"]),
                webapp_id=str(item["webappId"]),
                cover_url=str(item.get("cover", "")),
                labels={str(k): str(v) for k, v in dict(item.get("labels", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc!r}") from None
        if not EFFECT_ID.match(row.effect_id) or row.effect_id in seen:
            raise ValueError(f"{where}: id must be a unique lowercase slug")
        if row.region not in REGIONS:
            raise ValueError(f"{where}: region must be cn or global")
        if not WEBAPP_ID.match(row.webapp_id):
            raise ValueError(f"{where}: webappId must be digits")
        seen.add(row.effect_id)
        rows.append(row)
    return rows


async def sync(pool: asyncpg.Pool, rows: list[EffectRow]) -> None:
    """Make the effects table equal to the file (in one transaction)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE effects IN SHARE ROW EXCLUSIVE MODE")
        await conn.executemany(
            "INSERT INTO effects (effect_id, name, description, category, region, webapp_id, cover_url,"
            " labels, position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9)"
            " ON CONFLICT (effect_id) DO UPDATE SET name = $2, description = $3, category = $4,"
            " region = $5, webapp_id = $6, cover_url = $7, labels = $8::jsonb, position = $9,"
            " updated_at = now()",
            [
                (r.effect_id, r.name, r.description, r.category, r.region, r.webapp_id, r.cover_url,
                 json.dumps(r.labels), i)
                for i, r in enumerate(rows)
            ],
        )  # fmt: skip
        await conn.execute(
            "DELETE FROM effects WHERE NOT (effect_id = ANY($1::text[]))", [r.effect_id for r in rows]
        )


class Catalog:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: RedisClient,
        redis_prefix: str,
        regions: Regions,
        effects_cache: MultiLevelCache[Any],
        webapp_cache: MultiLevelCache[Any],
        *,
        fresh_seconds: float,
        stale_seconds: float,
        refresh_retry_seconds: float = 30.0,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._lease_prefix = f"{redis_prefix}:webapp-refresh:"
        self._regions = regions
        self._effects = effects_cache
        self._webapps = webapp_cache
        self._fresh = fresh_seconds
        self._stale = max(stale_seconds, fresh_seconds)
        self._retry = refresh_retry_seconds
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    # -- effects -------------------------------------------------------------
    async def _all(self) -> list[EffectRow]:
        async def load() -> list[dict[str, Any]]:
            rows = await self._pool.fetch(
                "SELECT effect_id, name, description, category, region, webapp_id, cover_url, labels"
                " FROM effects ORDER BY position, effect_id"
            )
            return [{**dict(r), "labels": json.loads(r["labels"])} for r in rows]

        return [EffectRow(**d) for d in await self._effects.get_or_load("all", load, 60.0)]

    async def effect(self, effect_id: str) -> EffectRow:
        for row in await self._all():
            if row.effect_id == effect_id:
                return row
        raise not_found("no such effect")

    async def list_effects(self, request: effects_pb2.ListEffectsRequest) -> effects_pb2.ListEffectsResponse:
        violations = FieldViolations()
        if request.region not in ("", *REGIONS):
            violations.add("region", "must be cn or global")
        if len(request.category) > 64 or "\x00" in request.category:
            violations.add("category", "at most 64 characters, no NUL")
        if not 0 <= request.page_size <= 1000:
            violations.add("pageSize", "must be between 0 and 1000")
        offset = 0
        if request.page_token:
            try:
                offset = int(base64.urlsafe_b64decode(request.page_token.encode()).decode())
                if not 0 <= offset < 10**6:
                    raise ValueError
            except ValueError:
                violations.add("pageToken", "not a token this service gave")
        violations.raise_if_any("invalid effects query")
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        rows = [
            r
            for r in await self._all()
            if (not request.region or r.region == request.region)
            and (not request.category or r.category == request.category)
        ]
        page = rows[offset : offset + size]
        effects = await asyncio.gather(*(self.describe(r, strict=False) for r in page))
        token = ""
        if offset + size < len(rows):
            token = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
        return effects_pb2.ListEffectsResponse(effects=effects, next_page_token=token)

    async def describe(self, row: EffectRow, *, strict: bool) -> effects_pb2.Effect:
        """The effect with its parameters; without them (logged) when RunningHub
        cannot be read and nothing is cached, unless `strict`."""
        try:
            params = await self.parameters(row.region, row.webapp_id)
        except Exception:
            if strict:
                raise
            params = []
        effect = effects_pb2.Effect(
            effect_id=row.effect_id,
            name=row.name,
            description=row.description,
            category=row.category,
            region=row.region,
            webapp_id=row.webapp_id,
            cover_url=row.cover_url,
        )
        for p in params:
            label = row.labels.get(p.key) or row.labels.get(p.field_name) or p.description
            effect.parameters.add(
                node_id=p.node_id,
                field_name=p.field_name,
                type=p.type,
                options=p.options,
                default_value=p.default,
                description=label,
            )
        return effect

    # -- webapp configs ------------------------------------------------------
    async def parameters(self, region: str, webapp_id: str) -> list[Parameter]:
        """The webapp's parameters; raises ServiceError UNAVAILABLE when RunningHub
        cannot be read and no copy was ever stored."""
        key = f"{region}:{webapp_id}"
        entry = await self._webapps.get_or_load(key, lambda: self._load(region, webapp_id), self._stale)
        if time.time() - float(entry["fetched"]) > self._fresh * 0.8:
            self._refresh_ahead(key, region, webapp_id)
        return [Parameter.from_json(p) for p in entry["params"]]

    async def _fetch(self, region: str, webapp_id: str) -> dict[str, Any]:
        config = await self._regions[region].webapp_config(webapp_id)
        params = [p.to_json() for p in from_config(config)]
        entry = {"fetched": time.time(), "params": params}
        await self._pool.execute(
            "INSERT INTO webapp_configs (region, webapp_id, parameters, fetched_at)"
            " VALUES ($1, $2, $3::jsonb, to_timestamp($4))"
            " ON CONFLICT (region, webapp_id) DO UPDATE SET parameters = $3::jsonb, fetched_at = to_timestamp($4)",
            region,
            webapp_id,
            json.dumps(params),
            entry["fetched"],
        )
        return entry

    async def _load(self, region: str, webapp_id: str) -> dict[str, Any]:
        try:
            return await self._fetch(region, webapp_id)
        except (UpstreamError, BusinessError) as exc:
            row = await self._pool.fetchrow(
                "SELECT parameters, extract(epoch FROM fetched_at) AS fetched FROM webapp_configs"
                " WHERE region = $1 AND webapp_id = $2",
                region,
                webapp_id,
            )
            if row is None:
                raise unavailable(f"the effect's RunningHub config cannot be read: {exc}") from None
            log.warning(
                "webapp config served stale from the database",
                extra={"region": region, "webapp_id": webapp_id, "error": str(exc)},
            )
            return {"fetched": float(row["fetched"]), "params": json.loads(row["parameters"])}

    async def forget(self, region: str, webapp_id: str) -> None:
        """Drop a config RunningHub no longer matches (803): the next read fetches it."""
        await self._webapps.invalidate(f"{region}:{webapp_id}")

    def _refresh_ahead(self, key: str, region: str, webapp_id: str) -> None:
        if key in self._refreshing:
            return

        async def refresh() -> None:
            try:
                leased = await self._redis.set(
                    self._lease_prefix + key, b"1", nx=True, px=int(self._retry * 1000)
                )
            except Exception:
                leased = True  # Redis down: refresh from this replica
            if not leased:
                return
            try:
                entry = await self._fetch(region, webapp_id)
            except (UpstreamError, BusinessError) as exc:
                log.warning(
                    "webapp config refresh failed; serving the cached copy", extra={"error": str(exc)}
                )
                return
            await self._webapps.set(key, entry, self._stale)

        task = asyncio.create_task(refresh())
        self._refreshing[key] = task
        task.add_done_callback(lambda _t: self._refreshing.pop(key, None))

    async def close(self) -> None:
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
