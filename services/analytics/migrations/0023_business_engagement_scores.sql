-- Engagement scores per window (7d, 30d) and user as of one UTC day, written by
-- the pre-aggregation pass after it refreshed engagement_daily
-- (services/analytics/engagement.py, store_scores); the report reads them when
-- they are of today, else computes the scores itself.
CREATE TABLE engagement_scores (
    window_name   text             NOT NULL,
    user_id       text COLLATE "C" NOT NULL,
    active_days   integer          NOT NULL,
    last_day      date             NOT NULL,
    events_n      bigint NOT NULL, events_p      double precision NOT NULL,
    uploads_n     bigint NOT NULL, uploads_p     double precision NOT NULL,
    effect_runs_n bigint NOT NULL, effect_runs_p double precision NOT NULL,
    downloads_n   bigint NOT NULL, downloads_p   double precision NOT NULL,
    shares_n      bigint NOT NULL, shares_p      double precision NOT NULL,
    score         double precision NOT NULL,
    PRIMARY KEY (window_name, user_id)
);
CREATE INDEX engagement_scores_rank ON engagement_scores (window_name, score);
CREATE TABLE engagement_scores_as_of (
    window_name text PRIMARY KEY,
    as_of       date NOT NULL
);
