//! Validated names and enumerations of the dataset registry, parsed once at the edge.

pub mod rows;
pub mod stats;

use std::fmt;

use serde::Serialize;
use uuid::Uuid;

/// Why a name, kind, format or reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// The request field at fault.
    pub field: &'static str,
    pub message: String,
}

impl ParseError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Names that would collide with the registry's own path segments.
const RESERVED_NAMES: &[&str] = &["resolve", "versions"];

const MAX_NAME_CHARS: usize = 100;

/// A dataset name: ASCII letters, digits, `.`, `_` and `-`, starting with a letter or digit.
/// `:` and `@` are excluded because references use them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct DatasetName(String);

impl DatasetName {
    pub fn parse(name: &str) -> Result<Self, ParseError> {
        parse_identifier(name, "name", MAX_NAME_CHARS)?;
        if RESERVED_NAMES.contains(&name) {
            return Err(ParseError::new(
                "name",
                format!("`{name}` is reserved; choose another dataset name"),
            ));
        }
        if Uuid::parse_str(name).is_ok() {
            return Err(ParseError::new(
                "name",
                "a dataset name cannot look like a UUID, which references read as a version id",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An alias such as `champion` or `eval-2024`: the model registry's rule
/// (`ferrite_platform::names::check_name`, lowercase), and not all digits, which would read
/// as a version number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct AliasName(String);

impl AliasName {
    pub fn parse(alias: &str) -> Result<Self, ParseError> {
        ferrite_platform::names::check_name("alias", alias)
            .map_err(|message| ParseError::new("alias", message))?;
        if alias.chars().all(|c| c.is_ascii_digit()) {
            return Err(ParseError::new(
                "alias",
                format!("alias `{alias}` is a number; aliases need a letter"),
            ));
        }
        Ok(Self(alias.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn parse_identifier(text: &str, field: &'static str, max_chars: usize) -> Result<(), ParseError> {
    let mut chars = text.chars();
    let Some(first) = chars.next() else {
        return Err(ParseError::new(field, format!("the {field} is empty")));
    };
    if text.len() > max_chars {
        return Err(ParseError::new(
            field,
            format!("the {field} is longer than {max_chars} characters"),
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(ParseError::new(
            field,
            format!("the {field} `{text}` must start with a letter or digit"),
        ));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ParseError::new(
            field,
            format!("the {field} `{text}` contains `{bad}`; use letters, digits, `.`, `_`, `-`"),
        ));
    }
    Ok(())
}

/// What the rows of a dataset hold; each kind has its own row schema (see [`rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// Plain text for pretraining; a row is a non-empty line.
    Text,
    /// Instruction pairs: Alpaca `instruction`/`input`/`output` or `prompt`/`completion`.
    Sft,
    /// Conversations: `messages` with roles, or ShareGPT `conversations`.
    Chat,
    /// TRL's `prompt`, `chosen`, `rejected`.
    Preference,
    /// A prompt, k >= 2 responses and their ranks (1 is best, ties allowed).
    Ranking,
    /// A prompt and a reference answer, for verifiable rewards.
    Prompts,
}

impl DatasetKind {
    pub const ALL: [DatasetKind; 6] = [
        DatasetKind::Text,
        DatasetKind::Sft,
        DatasetKind::Chat,
        DatasetKind::Preference,
        DatasetKind::Ranking,
        DatasetKind::Prompts,
    ];

    pub fn parse(text: &str) -> Result<Self, ParseError> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| {
                ParseError::new(
                    "kind",
                    format!(
                        "unknown dataset kind `{text}`; expected one of text, sft, chat, \
                         preference, ranking, prompts"
                    ),
                )
            })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DatasetKind::Text => "text",
            DatasetKind::Sft => "sft",
            DatasetKind::Chat => "chat",
            DatasetKind::Preference => "preference",
            DatasetKind::Ranking => "ranking",
            DatasetKind::Prompts => "prompts",
        }
    }
}

/// How the uploaded bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// One JSON object per line.
    Jsonl,
    /// One top-level JSON array of objects.
    Json,
    /// UTF-8 text; each non-empty line is a row.
    Text,
}

impl DataFormat {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        match text {
            "jsonl" => Ok(DataFormat::Jsonl),
            "json" => Ok(DataFormat::Json),
            "text" => Ok(DataFormat::Text),
            other => Err(ParseError::new(
                "format",
                format!("unknown format `{other}`; expected jsonl, json or text"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Jsonl => "jsonl",
            DataFormat::Json => "json",
            DataFormat::Text => "text",
        }
    }

    /// The format an upload of `kind` gets when the request names none: text for text, and
    /// for structured kinds `json` when the body starts with `[`, else `jsonl` (decided on the
    /// first non-blank byte, see [`crate::ingest`]).
    pub fn check_for(self, kind: DatasetKind) -> Result<Self, ParseError> {
        match (kind, self) {
            (DatasetKind::Text, DataFormat::Text) => Ok(self),
            (DatasetKind::Text, _) => Err(ParseError::new(
                "format",
                "a text dataset is uploaded as format `text`",
            )),
            (_, DataFormat::Text) => Err(ParseError::new(
                "format",
                format!(
                    "a {} dataset is JSON: use format `jsonl` or `json`",
                    kind.as_str()
                ),
            )),
            _ => Ok(self),
        }
    }
}

/// A reference to one version: `<uuid>`, `<name>:<number>`, `<name>@<alias>` or `<name>`
/// (the latest version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionReference {
    Id(Uuid),
    Number(DatasetName, i32),
    Alias(DatasetName, AliasName),
    Latest(DatasetName),
}

impl VersionReference {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let field = "reference";
        let reframe = |e: ParseError| ParseError::new(field, e.message);
        if let Ok(id) = Uuid::parse_str(text) {
            return Ok(Self::Id(id));
        }
        if let Some((name, alias)) = text.split_once('@') {
            let name = DatasetName::parse(name).map_err(reframe)?;
            return Ok(Self::Alias(name, AliasName::parse(alias).map_err(reframe)?));
        }
        if let Some((name, number)) = text.split_once(':') {
            let name = DatasetName::parse(name).map_err(reframe)?;
            let number = number
                .parse::<i32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ParseError::new(
                        field,
                        format!("`{number}` is not a version number (1, 2, ...)"),
                    )
                })?;
            return Ok(Self::Number(name, number));
        }
        Ok(Self::Latest(DatasetName::parse(text).map_err(reframe)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_form_parses() {
        let id = Uuid::now_v7();
        let name = DatasetName::parse("alpaca").expect("valid");
        assert_eq!(
            VersionReference::parse(&id.to_string()),
            Ok(VersionReference::Id(id))
        );
        assert_eq!(
            VersionReference::parse("alpaca:3"),
            Ok(VersionReference::Number(name.clone(), 3))
        );
        assert_eq!(
            VersionReference::parse("alpaca@champion"),
            Ok(VersionReference::Alias(
                name.clone(),
                AliasName::parse("champion").expect("valid")
            ))
        );
        assert_eq!(
            VersionReference::parse("alpaca"),
            Ok(VersionReference::Latest(name))
        );
    }

    #[test]
    fn malformed_references_name_the_problem() {
        for bad in ["alpaca:0", "alpaca:x", "@a", "alpaca@", "a/b", "versions"] {
            let error = VersionReference::parse(bad).expect_err(bad);
            assert_eq!(error.field, "reference", "{bad}");
        }
    }

    #[test]
    fn names_that_would_shadow_routes_or_ids_are_refused() {
        assert!(DatasetName::parse("resolve").is_err());
        assert!(DatasetName::parse("versions").is_err());
        assert!(DatasetName::parse(&Uuid::nil().to_string()).is_err());
        assert!(DatasetName::parse("-x").is_err());
        assert!(DatasetName::parse("alpaca_en-demo.v2").is_ok());
    }

    #[test]
    fn text_kinds_take_text_and_structured_kinds_take_json() {
        assert!(DataFormat::Text.check_for(DatasetKind::Text).is_ok());
        assert!(DataFormat::Jsonl.check_for(DatasetKind::Text).is_err());
        assert!(DataFormat::Text.check_for(DatasetKind::Chat).is_err());
        assert!(DataFormat::Json.check_for(DatasetKind::Ranking).is_ok());
        assert_eq!(
            DatasetKind::parse("rlhf").expect_err("unknown").field,
            "kind"
        );
    }
}
