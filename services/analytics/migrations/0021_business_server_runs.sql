-- Engagement counts effect runs from the server's task ends (services/analytics/preagg.py):
-- a day is recomputed when its task-end count moves too.
ALTER TABLE preagg_days ADD COLUMN task_ends bigint NOT NULL DEFAULT 0;
