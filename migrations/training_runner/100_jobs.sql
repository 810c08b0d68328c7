-- Training jobs, their attempts, and what running attempts leave behind.

-- One row per submitted job. The spec is stored as submitted and as resolved (object keys and
-- version ids looked up at submission), so a worker never asks the registries again.
CREATE TABLE jobs (
    id               UUID PRIMARY KEY,
    kind             TEXT NOT NULL,
    -- queued, running, succeeded, failed, cancelled.
    state            TEXT NOT NULL DEFAULT 'queued',
    spec             JSONB NOT NULL,
    resolved         JSONB NOT NULL,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    -- Set when JobRequested came back through the queue; the scheduler starts only such jobs.
    accepted_at      TIMESTAMPTZ,
    -- The attempt the scheduler started last; 0 before the first.
    current_attempt  INTEGER NOT NULL DEFAULT 0,
    -- The lease: the attempt that may write, and until when without a heartbeat.
    lease_attempt    INTEGER,
    lease_expires_at TIMESTAMPTZ,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    progress_step    BIGINT NOT NULL DEFAULT 0,
    total_steps      BIGINT NOT NULL DEFAULT 0,
    artifact_prefix  TEXT,
    final_metrics    JSONB,
    error            TEXT,
    created_by       TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    CONSTRAINT jobs_state_known
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled'))
);

CREATE INDEX jobs_by_state ON jobs (state, created_at);

-- One row per worker started for a job. `state`: starting, running, succeeded, failed, lost,
-- cancelled.
CREATE TABLE attempts (
    job_id              UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    number              INTEGER NOT NULL CHECK (number >= 1),
    state               TEXT NOT NULL DEFAULT 'starting',
    backend             TEXT NOT NULL,
    worker_pid          INTEGER,
    -- The checkpoint step this attempt continued from; NULL when it started afresh.
    resumed_from_step   BIGINT,
    error               TEXT,
    started_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at        TIMESTAMPTZ,
    ended_at            TIMESTAMPTZ,
    PRIMARY KEY (job_id, number)
);

-- Time series, one row per metric value.
CREATE TABLE metrics (
    job_id      UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    name        TEXT NOT NULL,
    step        BIGINT NOT NULL,
    value       DOUBLE PRECISION NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX metrics_by_job_name ON metrics (job_id, name, step);

CREATE TABLE checkpoints (
    job_id      UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step        BIGINT NOT NULL,
    attempt     INTEGER NOT NULL,
    prefix      TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, step)
);

CREATE TABLE job_logs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     INTEGER,
    level       TEXT NOT NULL,
    message     TEXT NOT NULL,
    logged_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX job_logs_by_job ON job_logs (job_id, id);
