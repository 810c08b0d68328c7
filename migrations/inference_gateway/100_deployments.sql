-- A deployment serves one registered model version under a name clients put in `model`.
CREATE TABLE deployments (
    name            TEXT PRIMARY KEY,
    model_reference TEXT NOT NULL,
    version_id      UUID NOT NULL,
    model_name      TEXT NOT NULL,
    version_number  BIGINT NOT NULL,
    -- Kept so a restart reloads from object storage without asking the registry again.
    artifact_prefix TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX deployments_version_id ON deployments (version_id);
