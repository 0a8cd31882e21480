-- Revenue and server facts (issue 11). Both are written only through the
-- group commit, like events, and both are small next to them: unpartitioned,
-- one row per idempotency key, kept (no retention drop: the money of past
-- weeks stays reportable).

-- Revenue from the payment side (RecordRevenue: admin or service token, never
-- the browser). order_id is the idempotency key: a re-sent order is a
-- duplicate, the first report stays. amount is exact: numeric, normalised to
-- the currency's ISO 4217 minor units (scale 2 for USD "9.90", 0 for JPY "500",
-- 3 for KWD "1.250"; so scale(amount) is the currency's exponent). Never sum
-- across currencies.
CREATE TABLE revenue (
    order_id    text COLLATE "C" PRIMARY KEY,
    user_id     text COLLATE "C" NOT NULL,
    session_id  text COLLATE "C",
    amount      numeric     NOT NULL CHECK (amount > 0 AND scale(amount) <= 4),
    currency    text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    effect_id   text COLLATE "C",
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX revenue_occurred ON revenue (occurred_at);
CREATE INDEX revenue_user ON revenue (user_id, occurred_at);

-- Server facts: effect tasks that ended, reported by the effects service
-- through the internal RecordTaskEnds RPC (service token only, no REST path),
-- so no browser can write or forge one. task_id is the idempotency key.
-- cost_seconds is RunningHub's run time (milliseconds kept), cost_coins the
-- RunningHub coins consumed (NULL when the provider did not say).
CREATE TABLE task_ends (
    task_id      text COLLATE "C" PRIMARY KEY,
    effect_id    text COLLATE "C" NOT NULL,
    user_id      text COLLATE "C" NOT NULL,
    status       text           NOT NULL CHECK (status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')),
    cost_seconds numeric(12, 3) NOT NULL DEFAULT 0 CHECK (cost_seconds >= 0),
    cost_coins   numeric(20, 4) CHECK (cost_coins >= 0),
    region       text,
    occurred_at  timestamptz    NOT NULL,
    received_at  timestamptz    NOT NULL DEFAULT now()
);
CREATE INDEX task_ends_occurred ON task_ends (occurred_at);
CREATE INDEX task_ends_user ON task_ends (user_id, occurred_at);
