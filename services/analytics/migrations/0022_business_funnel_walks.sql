-- Pre-aggregated funnel walks (services/analytics/funnel_walks.py): per session,
-- effect scope ('' = every effect, else one effect id) and step-1 occurrence
-- (start), the greedy ordered walk without a conversion limit, as offsets in
-- microseconds from start of the earliest step k at or after step k-1 (NULL
-- from the first step not reached). prev_start is the session's previous
-- step-1 occurrence in that scope (NULL for the first): the attempt a report
-- window [since, until] counts is the walk with since <= start <= until and
-- prev_start < since (or NULL).
CREATE TABLE funnel_walks (
    session_id text COLLATE "C" NOT NULL,
    scope      text COLLATE "C" NOT NULL,
    start      timestamptz      NOT NULL,
    prev_start timestamptz,
    o2 bigint, o3 bigint, o4 bigint, o5 bigint, o6 bigint, o7 bigint, o8 bigint, o9 bigint,
    PRIMARY KEY (session_id, scope, start)
);
CREATE INDEX funnel_walks_scope_start ON funnel_walks (scope, start);
