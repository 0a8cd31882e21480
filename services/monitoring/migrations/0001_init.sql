-- Monitoring storage: every service's RPC timings (raw, partitioned by day)
-- and their per-minute rollups, replica stats, alert rule state, alerts
-- (rule and client) and the notification outbox. Unqualified names: the
-- migration runs with search_path set to the service's schema.

-- Raw RPC timings as the services' reporters send them. Daily partitions
-- are created ahead and dropped after MONITORING_RAW_RETENTION_DAYS.
CREATE TABLE api_timings (
    service     text COLLATE "C" NOT NULL,
    endpoint    text COLLATE "C" NOT NULL,
    status_code text             NOT NULL,
    duration_ms double precision NOT NULL,
    instance    text             NOT NULL DEFAULT '',
    observed_at timestamptz      NOT NULL,
    received_at timestamptz      NOT NULL DEFAULT now()
) PARTITION BY RANGE (observed_at);
CREATE INDEX api_timings_observed_brin ON api_timings USING brin (observed_at);

-- Per minute, service and endpoint: requests, server errors, duration sum and
-- max, and a fixed histogram (services/monitoring/histogram.py: the counts per
-- bucket, bucket edges at the 2.5 s, 3 s, 4 s and 5 s alert thresholds).
-- Histograms add up, so any window's percentiles come from summed rows.
CREATE TABLE api_rollup_minute (
    bucket_start timestamptz      NOT NULL,
    service      text COLLATE "C" NOT NULL,
    endpoint     text COLLATE "C" NOT NULL,
    requests     bigint           NOT NULL,
    errors       bigint           NOT NULL,
    sum_ms       double precision NOT NULL,
    max_ms       double precision NOT NULL,
    buckets      bigint[]         NOT NULL,
    PRIMARY KEY (bucket_start, service, endpoint)
);

-- Per minute and replica: memory (used against the limit) and in-flight RPCs.
CREATE TABLE instance_stats_minute (
    bucket_start    timestamptz      NOT NULL,
    service         text COLLATE "C" NOT NULL,
    instance        text COLLATE "C" NOT NULL,
    samples         integer          NOT NULL,
    memory_ratio_sum double precision NOT NULL,
    heap_used_max   bigint           NOT NULL,
    heap_limit      bigint           NOT NULL,
    in_flight_max   bigint           NOT NULL,
    PRIMARY KEY (bucket_start, service, instance)
);

-- Per minute, service and named cache: hits and misses (summed over replicas).
CREATE TABLE cache_rollup_minute (
    bucket_start timestamptz      NOT NULL,
    service      text COLLATE "C" NOT NULL,
    cache        text COLLATE "C" NOT NULL,
    hits         bigint           NOT NULL,
    misses       bigint           NOT NULL,
    PRIMARY KEY (bucket_start, service, cache)
);

-- Alerts, from rules and from clients. seq orders the list (keyset
-- pagination: newest first); a fingerprint has at most one open alert.
CREATE TABLE alerts (
    seq             bigserial PRIMARY KEY,
    alert_id        text COLLATE "C" NOT NULL UNIQUE,
    fingerprint     text COLLATE "C" NOT NULL,
    source          text             NOT NULL,
    metric          text             NOT NULL,
    severity        text             NOT NULL CHECK (severity IN ('warning', 'error', 'critical')),
    page            text             NOT NULL DEFAULT '',
    labels          jsonb            NOT NULL DEFAULT '{}',
    summary         text             NOT NULL DEFAULT '',
    session_id      text             NOT NULL DEFAULT '',
    user_id         text             NOT NULL DEFAULT '',
    threshold       double precision NOT NULL DEFAULT 0,
    actual_value    double precision NOT NULL DEFAULT 0,
    context         jsonb,
    state           text             NOT NULL CHECK (state IN ('open', 'resolved')),
    occurrences     bigint           NOT NULL DEFAULT 1,
    first_seen_at   timestamptz      NOT NULL,
    last_seen_at    timestamptz      NOT NULL,
    resolved_at     timestamptz,
    resolution_note text             NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX alerts_open_fingerprint ON alerts (fingerprint) WHERE state = 'open';
CREATE INDEX alerts_state_seq ON alerts (state, seq);

-- Client alert ids already received (deduplication), and the alert they joined.
CREATE TABLE client_alert_keys (
    alert_id    text COLLATE "C" PRIMARY KEY,
    group_id    text COLLATE "C" NOT NULL,
    received_at timestamptz      NOT NULL DEFAULT now()
);

-- The rule evaluator's state per alert (pending or firing), so that a new
-- leader carries on where the old one stopped.
CREATE TABLE rule_states (
    fingerprint   text COLLATE "C" PRIMARY KEY,
    rule          text             NOT NULL,
    alertname     text             NOT NULL,
    severity      text             NOT NULL,
    labels        jsonb            NOT NULL,
    state         text             NOT NULL CHECK (state IN ('pending', 'firing')),
    active_since  timestamptz      NOT NULL,
    firing_since  timestamptz,
    clear_since   timestamptz,
    value         double precision NOT NULL,
    notified      boolean          NOT NULL DEFAULT false,
    alert_id      text
);

-- Notifications to deliver (the outbox): written in the transaction that
-- changed the alert, delivered by the leader's sender, one row per receiver.
CREATE TABLE notifications (
    id            bigserial PRIMARY KEY,
    receiver      text        NOT NULL,
    url           text        NOT NULL,
    fingerprint   text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('firing', 'resolved')),
    body          jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    attempts      integer     NOT NULL DEFAULT 0,
    claimed_until timestamptz,
    sent_at       timestamptz,
    failed_at     timestamptz
);
CREATE INDEX notifications_pending ON notifications (id) WHERE sent_at IS NULL AND failed_at IS NULL;
