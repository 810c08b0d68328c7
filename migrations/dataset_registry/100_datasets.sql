-- Datasets, their content-addressed versions, aliases and token statistics.

CREATE TABLE datasets (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    -- Every version of a dataset has this kind: text, sft, chat, preference, ranking, prompts.
    kind text NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dataset_versions (
    id uuid PRIMARY KEY,
    dataset_id uuid NOT NULL REFERENCES datasets (id),
    number integer NOT NULL CHECK (number > 0),
    -- Lowercase hex sha256 of the stored (decompressed) bytes; the object lives at datasets/<sha256>.
    sha256 text NOT NULL,
    kind text NOT NULL,
    format text NOT NULL,
    object_key text NOT NULL,
    bytes bigint NOT NULL,
    rows bigint NOT NULL,
    -- Length distribution in characters: {"min", "p50", "p90", "max", "mean"}.
    stats jsonb NOT NULL,
    derived_from uuid REFERENCES dataset_versions (id),
    -- How it was derived, e.g. {"split": "train", "eval_fraction": 0.1, "seed": 7}.
    derivation jsonb,
    campaign_id uuid,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (dataset_id, number),
    UNIQUE (dataset_id, sha256)
);

CREATE INDEX dataset_versions_derived_from ON dataset_versions (derived_from);

CREATE TABLE dataset_aliases (
    dataset_id uuid NOT NULL REFERENCES datasets (id),
    alias text NOT NULL,
    version_id uuid NOT NULL REFERENCES dataset_versions (id),
    updated_by text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset_id, alias)
);

CREATE TABLE token_stats (
    version_id uuid NOT NULL REFERENCES dataset_versions (id),
    -- The model version whose tokenizer counted, and the reference the caller gave.
    tokenizer_version_id uuid NOT NULL,
    tokenizer_reference text NOT NULL,
    -- {"total", "min", "p50", "p90", "max", "mean"} in tokens per row.
    stats jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (version_id, tokenizer_version_id)
);
