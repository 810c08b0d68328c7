//! Validated registry types: names, aliases, version kinds and version references.
//!
//! Everything that arrives as text (a path segment, a JSON field, an event field) is parsed
//! into one of these at the edge; the store and the routes only take the parsed types.

use std::fmt;

use uuid::Uuid;

/// Why a name, kind or reference was refused; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// The one naming rule, shared with the training runner so that a job's output name is
/// refused at submission rather than here, after the job ran.
fn check_name(what: &str, text: &str) -> Result<(), InvalidInput> {
    ferrite_platform::names::check_name(what, text).map_err(InvalidInput)
}

/// A model's name, e.g. `smollm2-135m-instruct`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelName(String);

impl ModelName {
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        ferrite_platform::names::check_model_name(text).map_err(InvalidInput)?;
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An alias of a model, e.g. `champion`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AliasName(String);

/// Aliases that are protected whatever they were created with: moving them changes what is
/// served, so only an admin may.
const ALWAYS_PROTECTED: &[&str] = &["champion"];

impl AliasName {
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        check_name("alias", text)?;
        // `name@3` would look like a version number to a reader, though references give
        // numbers after `:`; refusing all-digit aliases keeps the two apart.
        if text.chars().all(|c| c.is_ascii_digit()) {
            return Err(InvalidInput(format!(
                "alias `{text}` is a number; aliases need a letter"
            )));
        }
        Ok(Self(text.to_owned()))
    }

    /// Whether the alias is protected by name, not only by the flag it was created with.
    pub fn is_always_protected(&self) -> bool {
        ALWAYS_PROTECTED.contains(&self.0.as_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AliasName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a version's artifact is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum VersionKind {
    /// A whole Hugging Face model folder.
    Model,
    /// A PEFT adapter; needs a base version.
    Adapter,
    /// A tokenizer alone (`tokenizer.json`).
    Tokenizer,
    /// A model with a scalar reward head.
    RewardModel,
}

impl VersionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionKind::Model => "model",
            VersionKind::Adapter => "adapter",
            VersionKind::Tokenizer => "tokenizer",
            VersionKind::RewardModel => "reward_model",
        }
    }

    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        match text {
            "model" => Ok(VersionKind::Model),
            "adapter" => Ok(VersionKind::Adapter),
            "tokenizer" => Ok(VersionKind::Tokenizer),
            "reward_model" => Ok(VersionKind::RewardModel),
            other => Err(InvalidInput(format!(
                "kind `{other}` is not one of model, adapter, tokenizer, reward_model"
            ))),
        }
    }

    /// The kind of version a finished training job of `job_kind` produces, by the rule the
    /// runner also checks submissions with ([`ferrite_proto::version_kind_of_job`]).
    pub fn of_job(job_kind: &str) -> Self {
        Self::parse(ferrite_proto::version_kind_of_job(job_kind))
            .expect("version_kind_of_job names one of the registry's kinds")
    }
}

/// A reference to one version, in any of the forms every service accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionReference {
    /// `<uuid>`
    Id(Uuid),
    /// `<name>:<number>`
    Number(ModelName, i32),
    /// `<name>@<alias>`
    Alias(ModelName, AliasName),
    /// `<name>`: the latest version.
    Latest(ModelName),
}

impl VersionReference {
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        if let Ok(id) = Uuid::parse_str(text) {
            return Ok(Self::Id(id));
        }
        if let Some((name, alias)) = text.split_once('@') {
            return Ok(Self::Alias(
                ModelName::parse(name)?,
                AliasName::parse(alias)?,
            ));
        }
        if let Some((name, number)) = text.split_once(':') {
            let number = number
                .parse::<i32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    InvalidInput(format!(
                        "`{number}` in `{text}` is not a version number (1, 2, ...)"
                    ))
                })?;
            return Ok(Self::Number(ModelName::parse(name)?, number));
        }
        Ok(Self::Latest(ModelName::parse(text)?))
    }
}

impl fmt::Display for VersionReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::Number(name, number) => write!(f, "{name}:{number}"),
            Self::Alias(name, alias) => write!(f, "{name}@{alias}"),
            Self::Latest(name) => write!(f, "{name}"),
        }
    }
}

/// Parses a list of ids (dataset versions, campaigns), naming the first bad one.
pub fn parse_ids(what: &str, texts: &[String]) -> Result<Vec<Uuid>, InvalidInput> {
    texts
        .iter()
        .map(|text| {
            Uuid::parse_str(text)
                .map_err(|_| InvalidInput(format!("{what} `{text}` is not a UUID")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_form_parses_to_its_variant() {
        let id = "0190c2a4-0000-7000-8000-000000000001";
        assert_eq!(
            VersionReference::parse(id),
            Ok(VersionReference::Id(Uuid::parse_str(id).expect("valid")))
        );
        let name = ModelName::parse("smol").expect("valid");
        assert_eq!(
            VersionReference::parse("smol:3"),
            Ok(VersionReference::Number(name.clone(), 3))
        );
        assert_eq!(
            VersionReference::parse("smol@champion"),
            Ok(VersionReference::Alias(
                name.clone(),
                AliasName::parse("champion").expect("valid")
            ))
        );
        assert_eq!(
            VersionReference::parse("smol"),
            Ok(VersionReference::Latest(name))
        );
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "smol:0", "smol:-1", "smol:x", "smol@", "Smol", "smol@7", "", "a/b",
        ] {
            assert!(
                VersionReference::parse(bad).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn a_model_name_that_reads_as_a_uuid_is_refused() {
        assert!(ModelName::parse("0190c2a4-0000-7000-8000-000000000001").is_err());
    }

    #[test]
    fn job_kinds_map_onto_version_kinds() {
        assert_eq!(VersionKind::of_job("lora"), VersionKind::Adapter);
        assert_eq!(VersionKind::of_job("qlora"), VersionKind::Adapter);
        assert_eq!(VersionKind::of_job("tokenizer"), VersionKind::Tokenizer);
        assert_eq!(VersionKind::of_job("reward"), VersionKind::RewardModel);
        assert_eq!(VersionKind::of_job("sft"), VersionKind::Model);
        assert_eq!(VersionKind::of_job("pretrain"), VersionKind::Model);
    }

    #[test]
    fn champion_is_protected_by_name() {
        assert!(
            AliasName::parse("champion")
                .expect("valid")
                .is_always_protected()
        );
        assert!(
            !AliasName::parse("candidate")
                .expect("valid")
                .is_always_protected()
        );
    }
}
