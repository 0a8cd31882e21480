-- Hourly engagement and funnel counts, page-less and effect-less: the dashboard's
-- windows of a day or more (hourly trend buckets) read these instead of the
-- 5-minute, per-page and per-effect rows (~70x fewer rows for 7 days). The ingest
-- updates them in the same transaction as the 5-minute rows, from the same new
-- rows, so an hour's row always equals the sum of its 5-minute rows; retention
-- deletes whole hours of both (services/analytics/partitions.py).
CREATE TABLE rollup_events_hourly (
    hour_start timestamptz NOT NULL,
    event_type text        NOT NULL,
    count      bigint      NOT NULL,
    PRIMARY KEY (hour_start, event_type)
);
CREATE TABLE rollup_funnel_hourly (
    hour_start timestamptz NOT NULL,
    step       smallint    NOT NULL,
    count      bigint      NOT NULL,
    PRIMARY KEY (hour_start, step)
);
-- What was ingested before this migration. The table locks keep a flush of a replica
-- still running the previous version (which does not write the hourly tables) from
-- committing rows that the copy below would miss; such a flush afterwards is not
-- counted hourly: roll out with the ingest of the old version stopped, or rebuild.
LOCK TABLE rollup_events, rollup_funnel IN SHARE MODE;
INSERT INTO rollup_events_hourly (hour_start, event_type, count)
SELECT date_bin('1 hour', bucket_start, timestamptz 'epoch'), event_type, sum(count)
FROM rollup_events GROUP BY 1, 2;
INSERT INTO rollup_funnel_hourly (hour_start, step, count)
SELECT date_bin('1 hour', bucket_start, timestamptz 'epoch'), step, sum(count)
FROM rollup_funnel GROUP BY 1, 2;
