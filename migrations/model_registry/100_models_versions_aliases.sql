-- The model registry: models, their numbered versions with lineage, and aliases.

CREATE TABLE models (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT,
    created_by  TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE model_versions (
    id                UUID PRIMARY KEY,
    model_id          UUID NOT NULL REFERENCES models (id),
    -- 1, 2, 3, ... per model, allocated under a lock on the model's row.
    number            INTEGER NOT NULL CHECK (number > 0),
    kind              TEXT NOT NULL CHECK (kind IN ('model', 'adapter', 'tokenizer', 'reward_model')),
    -- Object-storage prefix of the Hugging Face folder, ending in `/`.
    artifact_prefix   TEXT NOT NULL,
    -- An adapter's base model version.
    base_version_id   UUID REFERENCES model_versions (id),
    -- A quantised variant's source version, and how it was quantised (`nf4`, `int8`, ...).
    source_version_id UUID REFERENCES model_versions (id),
    quantization      TEXT,
    -- The version this one was trained from; the lineage chain follows it.
    parent_version_id UUID REFERENCES model_versions (id),
    -- The training job that produced it; at most one version per job, so a JobFinished
    -- delivered twice under different message ids still registers once.
    source_job_id     UUID UNIQUE,
    dataset_version_ids            UUID[] NOT NULL DEFAULT '{}',
    -- Reward and RL models: the preference datasets and labeling campaigns behind them.
    preference_dataset_version_ids UUID[] NOT NULL DEFAULT '{}',
    campaign_ids                   UUID[] NOT NULL DEFAULT '{}',
    metrics           JSONB NOT NULL DEFAULT '{}'::jsonb,
    description       TEXT,
    created_by        TEXT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (model_id, number),
    CHECK (kind <> 'adapter' OR base_version_id IS NOT NULL),
    CHECK ((quantization IS NULL) = (source_version_id IS NULL))
);

CREATE INDEX model_versions_parent ON model_versions (parent_version_id);

CREATE TABLE aliases (
    model_id   UUID NOT NULL REFERENCES models (id),
    alias      TEXT NOT NULL,
    version_id UUID NOT NULL REFERENCES model_versions (id),
    -- Only an admin may move or delete a protected alias.
    protected  BOOLEAN NOT NULL DEFAULT false,
    updated_by TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, alias)
);
