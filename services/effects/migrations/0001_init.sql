-- The effect catalog (loaded from services/effects/catalog.json at start-up).
CREATE TABLE effects (
    effect_id   text PRIMARY KEY,
    name        text NOT NULL,
    description text NOT NULL,
    category    text NOT NULL,
    region      text NOT NULL CHECK (region IN ('cn', 'global')),
    webapp_id   text NOT NULL,
    cover_url   text NOT NULL,
    labels      jsonb NOT NULL DEFAULT '{}',
    position    integer NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX effects_listing ON effects (region, category, position);

-- The last good RunningHub config of each webapp: served when RunningHub is
-- down and neither cache level holds it.
CREATE TABLE webapp_configs (
    region     text NOT NULL,
    webapp_id  text NOT NULL,
    parameters jsonb NOT NULL,
    fetched_at timestamptz NOT NULL,
    PRIMARY KEY (region, webapp_id)
);

-- One row per task, inserted before RunningHub is called: the unique
-- (owner, request_id) makes CreateTask idempotent under concurrent duplicates.
-- create_state: pending (row inserted, create not answered yet), ambiguous (the
-- create may have made a task: the webhook carrying task_id tells), done.
CREATE TABLE tasks (
    task_id       uuid PRIMARY KEY,
    owner         text NOT NULL,
    request_id    text NOT NULL,
    effect_id     text NOT NULL,
    region        text NOT NULL,
    webapp_id     text NOT NULL,
    instance_type text NOT NULL,
    node_info     jsonb NOT NULL,
    status        text NOT NULL CHECK (status IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    create_state  text NOT NULL DEFAULT 'pending' CHECK (create_state IN ('pending', 'ambiguous', 'done')),
    rh_task_id    text,
    outputs       jsonb NOT NULL DEFAULT '[]',
    failure       jsonb,
    cost_seconds  double precision,
    cost_coins    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- when RunningHub was last asked about the task
    checked_at    timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz,
    UNIQUE (owner, request_id)
);
CREATE UNIQUE INDEX tasks_upstream ON tasks (region, rh_task_id) WHERE rh_task_id IS NOT NULL;
-- The sweeper's work: creates with no word, and open tasks not refreshed lately.
CREATE INDEX tasks_open ON tasks (checked_at) WHERE status IN ('QUEUED', 'RUNNING');
