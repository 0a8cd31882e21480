-- Analytics storage: raw rows partitioned by day, idempotency keys, and the
-- rollups the dashboard reads instead of raw rows. Unqualified names: the
-- migration runs with search_path set to the service's schema.
--
-- Ids are opaque: id columns that are indexed, sorted or grouped use the "C"
-- collation (byte order), which keeps B-tree inserts and sorts cheap.

-- Raw engagement events (the product's UserEvent).
CREATE TABLE events (
    event_id    text        NOT NULL,
    session_id  text COLLATE "C" NOT NULL,
    user_id     text,
    event_type  text        NOT NULL,
    page        text,
    properties  jsonb,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (occurred_at);
-- Time-range scans on append-only data: BRIN costs next to nothing on insert.
CREATE INDEX events_occurred_brin ON events USING brin (occurred_at);

-- Raw performance metrics (the product's PerformanceMetric). One row per
-- (name, metric_id): a later report updates the row in place, in the
-- partition of the first report (metric_keys remembers where it is).
CREATE TABLE metrics (
    name            text COLLATE "C" NOT NULL,
    metric_id       text COLLATE "C" NOT NULL,
    session_id      text             NOT NULL,
    user_id         text,
    value           double precision NOT NULL,
    delta           double precision NOT NULL DEFAULT 0,
    rating          text,
    navigation_type text,
    page            text,
    attributes      jsonb,
    occurred_at     timestamptz      NOT NULL,
    received_at     timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (name, metric_id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX metrics_occurred_brin ON metrics USING brin (occurred_at);

-- Raw funnel steps (the product's ConversionFunnel). step is 1..9.
CREATE TABLE funnel_steps (
    step_id     text        NOT NULL,
    session_id  text COLLATE "C" NOT NULL,
    user_id     text,
    step        smallint    NOT NULL CHECK (step BETWEEN 1 AND 9),
    effect_id   text,
    properties  jsonb,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (occurred_at);
CREATE INDEX funnel_steps_occurred_brin ON funnel_steps USING brin (occurred_at);
-- The funnel report walks each session's steps in time order.
CREATE INDEX funnel_steps_session ON funnel_steps (session_id, occurred_at);

-- Idempotency keys. Not partitioned: a key is unique whatever its timestamp
-- (a re-sent event without a timestamp gets a new server time). Rows older
-- than the retention are deleted by the partition maintenance.
CREATE TABLE event_keys (
    event_id    text COLLATE "C" PRIMARY KEY,
    occurred_at timestamptz NOT NULL
);
CREATE TABLE step_keys (
    step_id     text COLLATE "C" PRIMARY KEY,
    occurred_at timestamptz NOT NULL
);
-- metric_keys holds the current value of each (name, metric_id) and where its
-- rollup contribution sits (bucket from occurred_at, page, sketch bin, rating),
-- so that a later report can move that contribution.
CREATE TABLE metric_keys (
    name        text COLLATE "C" NOT NULL,
    metric_id   text COLLATE "C" NOT NULL,
    occurred_at timestamptz      NOT NULL,
    value       double precision NOT NULL,
    page        text             NOT NULL DEFAULT '',
    bin         integer          NOT NULL,
    rating      text,
    PRIMARY KEY (name, metric_id)
);
CREATE INDEX metric_keys_occurred ON metric_keys (occurred_at);
CREATE INDEX event_keys_occurred ON event_keys (occurred_at);
CREATE INDEX step_keys_occurred ON step_keys (occurred_at);

-- Rollups, maintained in the same transaction as the raw rows.
-- bucket_start is the start of a 5-minute bucket.
-- Metric value sketch: counts per log-spaced bin (services/analytics/sketch.py),
-- mergeable across buckets; p75 comes from the merged bins.
CREATE TABLE rollup_metric_bins (
    bucket_start timestamptz NOT NULL,
    name         text        NOT NULL,
    page         text        NOT NULL DEFAULT '',
    bin          integer     NOT NULL,
    count        bigint      NOT NULL,
    PRIMARY KEY (bucket_start, name, page, bin)
);
-- The same sketch per hour, without the page: what the dashboard reads for
-- windows of 24h and more (trend buckets of an hour or more). Per page and
-- 5 minutes the sketch has ~80x more rows (4.9 M against 61 k at 10 M metric
-- rows a day). hour_start = date_bin('1 hour', occurred_at, epoch), and every
-- hour's row equals the sum of its 5-minute rows over all pages: both tables
-- are upserted from the same contributions in the same transaction.
CREATE TABLE rollup_metric_bins_hourly (
    hour_start timestamptz NOT NULL,
    name       text        NOT NULL,
    bin        integer     NOT NULL,
    count      bigint      NOT NULL,
    PRIMARY KEY (hour_start, name, bin)
);
-- Count, sum and rating shares per metric.
CREATE TABLE rollup_metrics (
    bucket_start      timestamptz      NOT NULL,
    name              text             NOT NULL,
    page              text             NOT NULL DEFAULT '',
    count             bigint           NOT NULL,
    sum               double precision NOT NULL,
    good              bigint           NOT NULL DEFAULT 0,
    needs_improvement bigint           NOT NULL DEFAULT 0,
    poor              bigint           NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket_start, name, page)
);
-- Engagement: events per type and page.
CREATE TABLE rollup_events (
    bucket_start timestamptz NOT NULL,
    event_type   text        NOT NULL,
    page         text        NOT NULL DEFAULT '',
    count        bigint      NOT NULL,
    PRIMARY KEY (bucket_start, event_type, page)
);
-- Distinct sessions and users per hour (sessions are counted exactly over a
-- window from these much smaller rows, not from raw events).
CREATE TABLE rollup_sessions (
    hour_start timestamptz NOT NULL,
    session_id text COLLATE "C" NOT NULL,
    user_id    text,
    PRIMARY KEY (hour_start, session_id)
);
-- Funnel steps per bucket, step and effect.
CREATE TABLE rollup_funnel (
    bucket_start timestamptz NOT NULL,
    step         smallint    NOT NULL,
    effect_id    text        NOT NULL DEFAULT '',
    count        bigint      NOT NULL,
    PRIMARY KEY (bucket_start, step, effect_id)
);
