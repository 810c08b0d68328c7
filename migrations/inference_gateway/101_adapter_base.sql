-- An adapter deployment also needs its base model's folder; null for a full model.
ALTER TABLE deployments ADD COLUMN base_artifact_prefix TEXT;
