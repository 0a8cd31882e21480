-- The UTC days whose hours' distinct-count sketches must be recounted
-- (services/analytics/distinct.py): a pre-aggregation pass names the days of the
-- change rows it applies, in the same transaction; the next sketch build, on any
-- replica, recounts those days' hours and then deletes the days it read. Kept here
-- rather than in the memory of the replica that ran the pass, so that a replica
-- dying between its pass and its build leaves no hour stale.
CREATE TABLE sketch_recheck_days (day date PRIMARY KEY);
