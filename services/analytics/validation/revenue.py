"""Revenue and task ends (`RecordRevenue`, `RecordTaskEnds`): the business records
the payment flow and the effects service send, a few a minute, so the checked path
only. Money is exact: decimal strings at the currency's ISO 4217 minor units.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from iso4217 import Currency

from cosnap.analytics.v1 import analytics_pb2
from services.servicekit.errors import FieldViolations

from ..ingest.rows import Row
from .common import BatchClock, Limits, check_batch, check_id, checked_timestamp

# Revenue: at most 10^12 major units an order; task costs: at most a week, 10^9 coins.
MAX_AMOUNT = Decimal(10) ** 12
MAX_COST_SECONDS = 7 * 86400.0
MAX_COINS = Decimal(10) ** 9
TASK_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
REGIONS = frozenset({"cn", "global"})
DECIMAL = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,8})?")


def minor_units(currency: str) -> int | None:
    """ISO 4217 minor units (the exponent) of an active currency code; None when the code
    is unknown or has no minor unit defined (XAU, XDR: not money we take)."""
    if len(currency) != 3 or not currency.isascii() or not currency.isupper():
        return None
    try:
        exponent: int | None = Currency(currency).exponent
    except ValueError:
        return None
    return exponent


def _decimal(text: str) -> Decimal | None:
    """A plain decimal string ("12", "9.99") as a Decimal; None for anything else
    (exponents, signs, spaces, NaN, more than 20 integer or 8 fraction digits)."""
    if not DECIMAL.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def _places(number: Decimal) -> int:
    """Decimal places of a finite Decimal as _decimal makes them ("9.90": 2, "500": 0)."""
    exponent = number.as_tuple().exponent
    # Only NaN and infinities have a letter for an exponent; DECIMAL lets neither through.
    return -exponent if isinstance(exponent, int) else 0


def _amount(text: str, currency: str, violations: FieldViolations, path: str) -> Decimal | None:
    if not text:
        violations.add(path, "is required")
        return None
    amount = _decimal(text)
    if amount is None:
        violations.add(path, 'must be a decimal string like "9.99" (no sign, exponent or spaces)')
        return None
    if not 0 < amount < MAX_AMOUNT:
        violations.add(path, f"must be greater than 0 and less than {MAX_AMOUNT:,}")
        return None
    exponent = minor_units(currency)
    if exponent is None:
        return None  # the currency's own violation says why
    if _places(amount) > exponent:
        violations.add(path, f"{currency} has {exponent} decimal places at most")
        return None
    # Stored at the currency's minor units: "9.9" USD is 9.90, "500" JPY is 500.
    return amount.quantize(Decimal(1).scaleb(-exponent))


def validate_revenue(request: analytics_pb2.RecordRevenueRequest, now: float, limits: Limits) -> list[Row]:
    violations = FieldViolations()
    items = request.revenue
    if not check_batch("revenue", len(items), limits, violations):
        violations.raise_if_any("invalid revenue")
    clock = BatchClock(now, limits.retention_days)
    rows: list[Row] = []
    for i, r in enumerate(items):
        order_id = check_id(r.order_id, violations, "revenue", i, "orderId")
        user_id = check_id(r.user_id, violations, "revenue", i, "userId")
        session_id = check_id(r.session_id, violations, "revenue", i, "sessionId", False)
        effect_id = check_id(r.effect_id, violations, "revenue", i, "effectId", False)
        currency = r.currency
        if not currency:
            violations.add(f"revenue[{i}].currency", "is required")
        elif minor_units(currency) is None:
            violations.add(f"revenue[{i}].currency", "must be an ISO 4217 currency code like USD")
        amount = _amount(r.amount, currency, violations, f"revenue[{i}].amount")
        occurred_at = checked_timestamp(r, clock, violations, "revenue", i)
        rows.append((order_id, user_id, session_id, amount, currency, effect_id, occurred_at))
    violations.raise_if_any("invalid revenue")
    return rows


def validate_task_ends(request: analytics_pb2.RecordTaskEndsRequest, now: float, limits: Limits) -> list[Row]:
    violations = FieldViolations()
    items = request.task_ends
    if not check_batch("taskEnds", len(items), limits, violations):
        violations.raise_if_any("invalid task ends")
    clock = BatchClock(now, limits.retention_days)
    rows: list[Row] = []
    for i, t in enumerate(items):
        task_id = check_id(t.task_id, violations, "taskEnds", i, "taskId")
        effect_id = check_id(t.effect_id, violations, "taskEnds", i, "effectId")
        user_id = check_id(t.user_id, violations, "taskEnds", i, "userId")
        if t.status not in TASK_STATUSES:
            violations.add(f"taskEnds[{i}].status", "must be one of " + ", ".join(sorted(TASK_STATUSES)))
        seconds = t.cost_seconds
        cost_seconds = Decimal(0)
        if not 0.0 <= seconds <= MAX_COST_SECONDS:  # false for nan
            violations.add(f"taskEnds[{i}].costSeconds", f"must be a number from 0 to {MAX_COST_SECONDS:g}")
        else:
            cost_seconds = Decimal(f"{seconds:.3f}")  # milliseconds kept, exactly as printed
        cost_coins: Decimal | None = None
        if t.cost_coins:
            cost_coins = _decimal(t.cost_coins)
            if cost_coins is None or cost_coins >= MAX_COINS or _places(cost_coins) > 4:
                violations.add(
                    f"taskEnds[{i}].costCoins",
                    f'must be a decimal string like "0.75", at most 4 decimal places, below {MAX_COINS:,}',
                )
                cost_coins = None
        region = t.region or None
        if region is not None and region not in REGIONS:
            violations.add(f"taskEnds[{i}].region", "must be one of " + ", ".join(sorted(REGIONS)))
        occurred_at = checked_timestamp(t, clock, violations, "taskEnds", i)
        rows.append((task_id, effect_id, user_id, t.status, cost_seconds, cost_coins, region, occurred_at))
    violations.raise_if_any("invalid task ends")
    return rows
