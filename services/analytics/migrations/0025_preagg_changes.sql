-- Incremental pre-aggregation (services/analytics/preagg.py). The ingest appends,
-- in the flush's own transaction, what its new rows change (one statement per
-- kind): per UTC day, session and user, the counts the pass adds to
-- engagement_daily and preagg_days, and per session the first event (for
-- session_sources); the pass consumes the rows it can see (DELETE ... RETURNING
-- in its REPEATABLE READ transaction, so exactly the rows whose raw rows it
-- reads) and deletes them. No index: the table only holds what arrived since
-- the last pass, and is read whole.
CREATE TABLE preagg_changes (
    -- the UTC day, as its midnight: date_bin('1 day', occurred_at, epoch), cheaper
    -- per row than (occurred_at AT TIME ZONE 'UTC')::date
    day_start    timestamptz      NOT NULL,
    session_id   text COLLATE "C",           -- events, funnel steps
    user_id      text COLLATE "C" NOT NULL,  -- '' anonymous
    events       integer          NOT NULL DEFAULT 0,
    steps        integer          NOT NULL DEFAULT 0,
    uploads      integer          NOT NULL DEFAULT 0,
    browser_runs integer          NOT NULL DEFAULT 0,  -- processing_completed steps
    downloads    integer          NOT NULL DEFAULT 0,
    shares       integer          NOT NULL DEFAULT 0,
    task_ends    integer          NOT NULL DEFAULT 0,
    server_runs  integer          NOT NULL DEFAULT 0,  -- task ends SUCCEEDED
    -- events: the group's first event (occurred_at, then event_id) and its properties
    first_at     timestamptz,
    first_id     text COLLATE "C",
    properties   jsonb
);

-- The parts effect_runs is made of, so that counts can be added to a day's row:
-- effect_runs = server_runs when server_ends > 0, else browser_runs.
ALTER TABLE engagement_daily
    ADD COLUMN browser_runs integer NOT NULL DEFAULT 0,
    ADD COLUMN server_ends  integer NOT NULL DEFAULT 0,
    ADD COLUMN server_runs  integer NOT NULL DEFAULT 0;

-- The keys that order a session's candidates for its first event and its first
-- identified event (occurred_at, then event_id), so that new events merge in
-- exactly: the smaller key wins (event ids in byte order).
ALTER TABLE session_sources
    ADD COLUMN first_id      text COLLATE "C" NOT NULL DEFAULT '',
    ADD COLUMN user_at       timestamptz,
    ADD COLUMN user_event_id text COLLATE "C";


-- Rebuilt from the raw rows by the next pass (every day with rows is unbuilt):
-- the new columns have no values for the rows computed before.
TRUNCATE engagement_daily, session_sources, funnel_walks, preagg_days;
DELETE FROM engagement_scores_as_of;

-- A day whose stored counts differ from the ingest's (rows that came without a
-- change row: written before this migration, or by an older replica) and whose
-- recomputation was put off (min_age): checked again by every pass. No default,
-- on purpose: the pass of an older replica (still running during a rolling
-- deploy) cannot store a day any more, so it cannot write rows the change log
-- would then be added to twice; its transaction fails and leaves nothing.
ALTER TABLE preagg_days ADD COLUMN stale boolean NOT NULL;
