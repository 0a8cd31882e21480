-- Business analytics: pre-aggregated engagement and acquisition, weekly
-- reports, and mergeable distinct-count sketches. Maintained from the raw
-- tables by services/analytics/preagg.py (engagement_daily, session_sources,
-- preagg_days) and services/analytics/distinct.py (distinct_sketches).

-- Per UTC day and identified user: what the engagement score counts.
CREATE TABLE engagement_daily (
    day         date             NOT NULL,
    user_id     text COLLATE "C" NOT NULL,
    events      integer          NOT NULL DEFAULT 0,
    uploads     integer          NOT NULL DEFAULT 0,
    effect_runs integer          NOT NULL DEFAULT 0,
    downloads   integer          NOT NULL DEFAULT 0,
    shares      integer          NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user_id)
);
-- One user's days (the user's own score).
CREATE INDEX engagement_daily_user ON engagement_daily (user_id, day);

-- Per session: its user (any identified event) and its acquisition source,
-- from the properties of its first event (utm_* or the referrer's host).
CREATE TABLE session_sources (
    session_id text COLLATE "C" PRIMARY KEY,
    user_id    text COLLATE "C",
    first_at   timestamptz      NOT NULL,
    source     text             NOT NULL,
    medium     text             NOT NULL,
    campaign   text             NOT NULL
);
CREATE INDEX session_sources_user ON session_sources (user_id, first_at) WHERE user_id IS NOT NULL;
CREATE INDEX session_sources_first ON session_sources (first_at);

-- Which raw days the two tables above were computed from: the day's event and
-- funnel-step counts at that moment (from the ingest's rollups). A day whose
-- counts moved since is recomputed.
CREATE TABLE preagg_days (
    day          date        PRIMARY KEY,
    events       bigint      NOT NULL,
    steps        bigint      NOT NULL,
    refreshed_at timestamptz NOT NULL
);

-- Weekly performance reports, one row per ISO week (the claim that makes a
-- report happen once across replicas).
CREATE TABLE weekly_reports (
    week         text        PRIMARY KEY,
    week_start   timestamptz NOT NULL,
    trigger      text        NOT NULL CHECK (trigger IN ('scheduled', 'on_demand')),
    status       text        NOT NULL CHECK (status IN ('generating', 'ready')),
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    generated_at timestamptz,
    summary      text        NOT NULL DEFAULT '',
    html         text,
    pdf          bytea,
    png          bytea,       -- page one, for the e-mail
    sent_to      text[]      NOT NULL DEFAULT '{}',
    sent_at      timestamptz,
    send_attempted_at timestamptz,
    send_error   text
);
CREATE INDEX weekly_reports_start ON weekly_reports (week_start DESC);

-- HyperLogLog sketches (Apache DataSketches, compact bytes) of the distinct
-- sessions and users of one hour, built from rollup_sessions once the hour is
-- over; `source_rows` is that hour's row count when built (rebuilt if it moves).
CREATE TABLE distinct_sketches (
    hour_start  timestamptz NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('sessions', 'users')),
    source_rows bigint      NOT NULL,
    sketch      bytea       NOT NULL,
    PRIMARY KEY (hour_start, kind)
);
