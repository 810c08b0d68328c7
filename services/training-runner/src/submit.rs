//! Turning a submitted [`JobSpec`] into a [`ResolvedJob`]: every check that can fail a job
//! before it runs happens here, so a bad spec is a 4xx naming its field, never a failed attempt.

use std::num::NonZeroU32;

use ferrite_platform::ApiError;
use ferrite_platform::peers::{PeerError, Peers};
use ferrite_training::job::{self, JobKind};
use uuid::Uuid;

use crate::domain::{
    JobSpec, MAX_ATTEMPTS_LIMIT, ResolvedDataset, ResolvedJob, ResolvedModel, default_output_name,
};

/// Why a spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{message}")]
    Invalid { field: String, message: String },
    #[error("the {what} `{reference}` does not exist")]
    NotFound {
        field: String,
        what: &'static str,
        reference: String,
    },
    /// The output model holds versions of another kind than the job produces.
    #[error(
        "`{model}` holds {existing} versions and a {job_kind} job produces {produced} versions; \
         the model registry would refuse this job's output once it has run: name another \
         output_model_name"
    )]
    OutputKindMismatch {
        model: String,
        job_kind: &'static str,
        existing: String,
        produced: &'static str,
    },
    #[error("cannot resolve `{reference}`: {source}")]
    Unavailable {
        reference: String,
        #[source]
        source: PeerError,
    },
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        match &error {
            SubmitError::Invalid { field, message } => {
                ApiError::invalid_request("invalid_value", message.clone()).with_param(field)
            }
            SubmitError::NotFound { field, what, .. } => {
                ApiError::invalid_request(&format!("{what}_not_found"), error.to_string())
                    .with_param(field)
            }
            // The registry's own answer to such a version, so a client handles both alike.
            SubmitError::OutputKindMismatch { .. } => {
                ApiError::conflict("kind_mismatch", error.to_string())
                    .with_param("output_model_name")
            }
            SubmitError::Unavailable { .. } => {
                tracing::warn!(error = %ferrite_platform::error::ErrorChain(&error), "a registry did not answer");
                ApiError::unavailable(error.to_string())
            }
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SubmitError {
    SubmitError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Most GPUs one job may ask for: a single worker drives one machine.
const MAX_GPUS: u32 = 64;

/// Checks everything that needs no other service.
pub fn check(spec: &JobSpec, default_attempts: u32) -> Result<(JobKind, u32), SubmitError> {
    let kind: JobKind = spec.kind.parse().map_err(|e: String| invalid("kind", e))?;
    job::validate(kind, &spec.hyper_parameters).map_err(|e| invalid(e.field, e.message))?;
    let attempts = spec.max_attempts.unwrap_or(default_attempts);
    if !(1..=MAX_ATTEMPTS_LIMIT).contains(&attempts) {
        return Err(invalid(
            "max_attempts",
            format!("must lie in 1..={MAX_ATTEMPTS_LIMIT}"),
        ));
    }
    keep_checkpoints(spec)?;
    if let Some(name) = &spec.output_model_name {
        check_name(name)?;
    }
    // Checked whatever the backend: a spec must stay valid if the runner moves to Kubernetes.
    crate::kubernetes::validate_resources(&spec.resources)
        .map_err(|error| invalid(error.field, error.problem))?;
    if spec.resources.gpus > MAX_GPUS {
        return Err(invalid(
            "resources.gpus",
            format!("must be at most {MAX_GPUS}"),
        ));
    }
    if spec.datasets.is_empty() {
        return Err(invalid("datasets", "a job needs at least one dataset"));
    }
    // Capped before any is resolved: each costs a request to the dataset registry.
    if spec.datasets.len() > job::MAX_DATASETS {
        return Err(invalid(
            "datasets",
            format!("a job names at most {} datasets", job::MAX_DATASETS),
        ));
    }
    for (index, dataset) in spec.datasets.iter().enumerate() {
        check_reference(&format!("datasets[{index}].reference"), &dataset.reference)?;
    }
    if let Some(base) = &spec.base_model {
        check_reference("base_model", base)?;
    }
    Ok((kind, attempts))
}

/// The checkpoint retention a spec asks for. 0 would delete even the newest checkpoint, the
/// one a retried attempt resumes from, so it is refused rather than read as "keep all".
fn keep_checkpoints(spec: &JobSpec) -> Result<Option<NonZeroU32>, SubmitError> {
    spec.keep_checkpoints
        .map(|keep| {
            NonZeroU32::new(keep).ok_or_else(|| {
                invalid(
                    "keep_checkpoints",
                    "must be at least 1; leave it out to keep every checkpoint",
                )
            })
        })
        .transpose()
}

/// The model registry's own rule: a name it would refuse must fail here, not after the job ran.
fn check_name(name: &str) -> Result<(), SubmitError> {
    ferrite_platform::names::check_model_name(name)
        .map_err(|message| invalid("output_model_name", message))
}

/// A reference travels in a URL path segment; anything that would change the path is refused.
fn check_reference(field: &str, reference: &str) -> Result<(), SubmitError> {
    let valid = !reference.is_empty()
        && reference.len() <= 256
        && !reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '%'));
    if valid {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "`{reference}` is not a version reference (`<uuid>`, `<name>:<number>`, `<name>@<alias>` or `<name>`)"
            ),
        ))
    }
}

/// Resolves every reference through the registries and builds what the worker will need.
pub async fn resolve(
    peers: &Peers,
    spec: &JobSpec,
    kind: JobKind,
    job_id: Uuid,
) -> Result<ResolvedJob, SubmitError> {
    let mut datasets = Vec::with_capacity(spec.datasets.len());
    for (index, dataset) in spec.datasets.iter().enumerate() {
        let field = format!("datasets[{index}].reference");
        let path = format!("/v1/datasets/resolve/{}", dataset.reference);
        let version = lookup(peers, &path, &field, "dataset", &dataset.reference).await?;
        let text = |name: &str| -> Result<String, SubmitError> {
            string_field(&version, name, &field, &dataset.reference)
        };
        datasets.push(ResolvedDataset {
            reference: dataset.reference.clone(),
            role: dataset.role,
            version_id: text("id")?,
            kind: text("kind")?,
            format: text("format")?,
            object_key: text("object_key")?,
        });
    }
    let (base_model, base_kind) = match &spec.base_model {
        Some(reference) => {
            let path = format!("/v1/registry/resolve/{reference}");
            let version = lookup(peers, &path, "base_model", "model", reference).await?;
            let text = |name: &str| string_field(&version, name, "base_model", reference);
            let model = ResolvedModel {
                reference: reference.clone(),
                version_id: text("id")?,
                artifact_prefix: text("artifact_prefix")?,
            };
            (Some(model), Some(text("kind")?))
        }
        None => (None, None),
    };
    let found: Vec<_> = datasets
        .iter()
        .map(|dataset| (dataset.kind.as_str(), dataset.role))
        .collect();
    job::check_inputs(kind, base_kind.as_deref(), &found).map_err(|error| {
        let message = match &spec.base_model {
            // The rule knows the base by its kind only; the user knows it by its reference.
            Some(reference) if error.field == "base_model" => {
                format!("`{reference}` {}", error.message)
            }
            _ => error.message,
        };
        invalid(error.field, message)
    })?;
    if let Some(name) = &spec.output_model_name {
        check_output_model(peers, name, kind).await?;
    }
    Ok(ResolvedJob {
        kind,
        base_model,
        datasets,
        hyper_parameters: spec.hyper_parameters.clone(),
        resources: spec.resources.clone(),
        output_model_name: spec
            .output_model_name
            .clone()
            .unwrap_or_else(|| default_output_name(kind, job_id)),
        keep_checkpoints: keep_checkpoints(spec)?,
    })
}

/// Refuses an `output_model_name` whose model holds versions of another kind than the job
/// produces (an adapter job adding to a full model, say): the registry would refuse the output
/// only after the job had run. A name the registry does not know yet is a new model. The
/// registry still checks on registration, which also covers a model that gains versions of
/// another kind while the job runs.
async fn check_output_model(peers: &Peers, name: &str, kind: JobKind) -> Result<(), SubmitError> {
    let field = "output_model_name";
    // A bare name resolves to the model's latest version; all its versions share one kind.
    let latest = match lookup(
        peers,
        &format!("/v1/registry/resolve/{name}"),
        field,
        "model",
        name,
    )
    .await
    {
        Ok(latest) => latest,
        Err(SubmitError::NotFound { .. }) => return Ok(()),
        Err(error) => return Err(error),
    };
    let existing = string_field(&latest, "kind", field, name)?;
    let produced = ferrite_proto::version_kind_of_job(kind.as_str());
    if existing == produced {
        return Ok(());
    }
    Err(SubmitError::OutputKindMismatch {
        model: name.to_owned(),
        job_kind: kind.as_str(),
        existing,
        produced,
    })
}

async fn lookup(
    peers: &Peers,
    path: &str,
    field: &str,
    what: &'static str,
    reference: &str,
) -> Result<serde_json::Value, SubmitError> {
    match peers.get_json(path).await {
        Ok(version) => Ok(version),
        Err(error) => match error.status() {
            Some(404) => Err(SubmitError::NotFound {
                field: field.to_owned(),
                what,
                reference: reference.to_owned(),
            }),
            Some(status) if (400..500).contains(&status) => Err(invalid(
                field,
                format!("the {what} registry refused `{reference}`: {error}"),
            )),
            _ => Err(SubmitError::Unavailable {
                reference: reference.to_owned(),
                source: error,
            }),
        },
    }
}

/// A string field of a registry's answer; a missing one means the registry broke its contract.
fn string_field(
    version: &serde_json::Value,
    name: &str,
    field: &str,
    reference: &str,
) -> Result<String, SubmitError> {
    match &version[name] {
        serde_json::Value::String(text) => Ok(text.clone()),
        other => Err(invalid(
            field,
            format!(
                "the registry's answer for `{reference}` has no string `{name}` (found {other})"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> JobSpec {
        serde_json::from_value(json).expect("a well-formed spec")
    }

    fn field_of(result: Result<(JobKind, u32), SubmitError>) -> String {
        match result {
            Err(SubmitError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_kind_names_the_kind_field() {
        let spec = spec(serde_json::json!({"kind": "distill", "datasets": [{"reference": "a"}]}));
        assert_eq!(field_of(check(&spec, 3)), "kind");
    }

    #[test]
    fn a_bad_hyper_parameter_is_named_by_its_path() {
        let spec = spec(serde_json::json!({
            "kind": "tokenizer", "datasets": [{"reference": "a"}],
            "hyper_parameters": {"vocab_size": 3},
        }));
        assert_eq!(field_of(check(&spec, 3)), "hyper_parameters.vocab_size");
    }

    #[test]
    fn a_reference_that_would_change_the_url_is_refused() {
        let spec = spec(serde_json::json!({
            "kind": "tokenizer", "datasets": [{"reference": "a"}, {"reference": "../x"}],
        }));
        assert_eq!(field_of(check(&spec, 3)), "datasets[1].reference");
    }

    #[test]
    fn attempts_beyond_the_limit_are_refused() {
        let spec = spec(serde_json::json!({
            "kind": "tokenizer", "datasets": [{"reference": "a"}], "max_attempts": 0,
        }));
        assert_eq!(field_of(check(&spec, 3)), "max_attempts");
    }

    #[test]
    fn keeping_no_checkpoint_is_refused_and_one_is_enough() {
        let keep = |n: u32| {
            spec(serde_json::json!({
                "kind": "tokenizer", "datasets": [{"reference": "a"}], "keep_checkpoints": n,
            }))
        };
        // 0 would prune the checkpoint a retry resumes from; 1 keeps exactly that one.
        assert_eq!(field_of(check(&keep(0), 3)), "keep_checkpoints");
        assert!(check(&keep(1), 3).is_ok());
    }

    #[test]
    fn resources_the_api_server_would_refuse_are_named() {
        let spec = spec(serde_json::json!({
            "kind": "tokenizer", "datasets": [{"reference": "a"}],
            "resources": {"cpu": "four"},
        }));
        assert_eq!(field_of(check(&spec, 3)), "resources.cpu");
    }

    #[test]
    fn an_output_name_the_model_registry_would_refuse_is_refused() {
        // The registry takes `[a-z0-9][a-z0-9._-]*` up to 100 bytes: upper case, a leading
        // `_` and 101 bytes each break one clause.
        for name in ["MyModel".to_owned(), "_x".to_owned(), "a".repeat(101)] {
            let spec = spec(serde_json::json!({
                "kind": "tokenizer", "datasets": [{"reference": "a"}], "output_model_name": name,
            }));
            assert_eq!(field_of(check(&spec, 3)), "output_model_name");
        }
    }

    #[test]
    fn too_many_gpus_or_datasets_are_refused_before_resolving() {
        let gpus = spec(serde_json::json!({
            "kind": "tokenizer", "datasets": [{"reference": "a"}], "resources": {"gpus": 100_000},
        }));
        assert_eq!(field_of(check(&gpus, 3)), "resources.gpus");
        // 17 references: one over the cap of 16.
        let many: Vec<_> = (0..17)
            .map(|_| serde_json::json!({"reference": "a"}))
            .collect();
        let spec = spec(serde_json::json!({"kind": "tokenizer", "datasets": many}));
        assert_eq!(field_of(check(&spec, 3)), "datasets");
    }

    #[test]
    fn a_valid_spec_takes_the_default_attempts() {
        let spec =
            spec(serde_json::json!({"kind": "tokenizer", "datasets": [{"reference": "a:1"}]}));
        let (kind, attempts) = check(&spec, 3).expect("valid");
        assert_eq!((kind, attempts), (JobKind::Tokenizer, 3));
    }
}
