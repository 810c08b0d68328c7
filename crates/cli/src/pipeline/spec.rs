//! The pipeline file: what it may say, and every check that can run before anything is sent.
//!
//! A pipeline names the datasets it uploads, the models it imports, and its stages in order.
//! A stage reads datasets and models by reference (`<uuid>`, `<name>:<n>`, `<name>@<alias>`,
//! `<name>`) or the output of an earlier stage (`stage:<name>`). Every problem found is reported
//! with the line it sits on, all at once, before the first request.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::stages;
use super::yaml::{self, Key, LineError, Node, Value};

/// A parsed and checked pipeline file.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// The folder the file lies in; relative dataset and model paths start there.
    pub base_dir: PathBuf,
    pub datasets: Vec<DatasetUpload>,
    pub models: Vec<ModelImport>,
    pub stages: Vec<StageSpec>,
}

impl Pipeline {
    /// A path from the file, made relative to the file's folder.
    pub fn path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// A local file the run registers as a dataset version before any stage.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetUpload {
    pub line: usize,
    pub name: String,
    /// The registry's kind: text, sft, chat, preference, ranking, prompts.
    pub kind: String,
    pub path: PathBuf,
    /// The data's licence and source, shown in the report.
    pub licence: Option<String>,
    /// Upload only the first this many records (JSON array items or lines).
    pub max_rows: Option<usize>,
    /// Upload only the first this many bytes of a text file, cut at a line end.
    pub max_bytes: Option<usize>,
}

/// A GGUF file the run imports into the model registry when the name is not there yet.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelImport {
    pub line: usize,
    pub name: String,
    pub gguf: PathBuf,
}

/// One stage as written.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub line: usize,
    pub name: String,
    pub kind: StageKind,
    pub inputs: Inputs,
    pub hyper_parameters: serde_json::Value,
    /// The whole stage node, so later checks can name the line of any field.
    pub node: Node,
}

impl StageSpec {
    /// A string option of the stage itself (`output_model_name`, `alias`, `deployment`).
    pub fn option(&self, key: &str) -> Option<&str> {
        match self.node.get(key).map(|node| &node.value) {
            Some(Value::String(text)) => Some(text),
            _ => None,
        }
    }

    /// The line of a dotted path inside the stage (`hyper_parameters.batch_size`).
    pub fn line_of(&self, path: &str) -> usize {
        self.node.line_of(path)
    }
}

/// What a stage reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub datasets: Vec<DatasetInput>,
    pub base_model: Option<Located<Reference>>,
    pub model: Option<Located<Reference>>,
}

/// A dataset a stage reads and what for.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetInput {
    pub reference: Located<Reference>,
    /// `train` or `eval`.
    pub role: String,
}

/// A value and the line it was written on.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    pub line: usize,
    pub value: T,
}

/// Where an input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// The output of an earlier stage of this pipeline.
    Stage(String),
    /// A registry reference, passed on as written.
    Registry(String),
}

impl FromStr for Reference {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if let Some(stage) = text.strip_prefix("stage:") {
            if stage.is_empty() {
                return Err("`stage:` needs a stage name after it".into());
            }
            return Ok(Reference::Stage(stage.to_owned()));
        }
        if text.is_empty() {
            return Err("a reference cannot be empty".into());
        }
        if text.contains(char::is_whitespace) || text.contains('/') {
            return Err(format!(
                "`{text}` is not a reference; use <uuid>, <name>:<number>, <name>@<alias>, <name> or stage:<name>"
            ));
        }
        Ok(Reference::Registry(text.to_owned()))
    }
}

/// Every kind of stage a pipeline may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Tokenizer,
    Pretrain,
    Sft,
    Lora,
    Qlora,
    Register,
    Deploy,
}

impl StageKind {
    pub const ALL: [StageKind; 7] = [
        StageKind::Tokenizer,
        StageKind::Pretrain,
        StageKind::Sft,
        StageKind::Lora,
        StageKind::Qlora,
        StageKind::Register,
        StageKind::Deploy,
    ];

    /// Kinds the design names that arrive in a later version.
    const LATER: [&'static str; 5] = ["campaign", "reward", "ppo", "grpo", "evaluate"];

    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Tokenizer => "tokenizer",
            StageKind::Pretrain => "pretrain",
            StageKind::Sft => "sft",
            StageKind::Lora => "lora",
            StageKind::Qlora => "qlora",
            StageKind::Register => "register",
            StageKind::Deploy => "deploy",
        }
    }
}

impl FromStr for StageKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if let Some(kind) = StageKind::ALL.into_iter().find(|k| k.as_str() == name) {
            return Ok(kind);
        }
        if StageKind::LATER.contains(&name) {
            return Err(format!(
                "stage kind `{name}` is not available in this version of Ferrite"
            ));
        }
        let names: Vec<_> = StageKind::ALL.iter().map(|k| k.as_str()).collect();
        Err(format!(
            "unknown stage kind `{name}`; expected one of {}",
            names.join(", ")
        ))
    }
}

/// Every problem in a pipeline file, sorted by line.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.file, .problems))]
pub struct SpecErrors {
    pub file: String,
    pub problems: Vec<LineError>,
}

fn render(file: &str, problems: &[LineError]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|problem| format!("{file}:{}: {}", problem.line, problem.message))
        .collect();
    lines.join("\n")
}

/// Reads and checks a pipeline file.
pub fn load(path: &Path) -> Result<Pipeline, SpecErrors> {
    let file = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|error| SpecErrors {
        file: file.clone(),
        problems: vec![LineError::new(0, format!("cannot read the file: {error}"))],
    })?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&source, base_dir).map_err(|problems| SpecErrors { file, problems })
}

/// Parses and checks pipeline text; `base_dir` is where relative paths start.
pub fn parse(source: &str, base_dir: PathBuf) -> Result<Pipeline, Vec<LineError>> {
    let root = yaml::parse(source).map_err(|error| vec![error])?;
    let mut problems = Vec::new();
    let pipeline = read_pipeline(&root, base_dir, &mut problems);
    if let Some(pipeline) = &pipeline {
        check_graph(pipeline, &declared_stage_names(&root), &mut problems);
        for stage in &pipeline.stages {
            problems.extend(stages::for_kind(stage.kind).check(stage));
        }
    }
    problems.sort_by_key(|problem| problem.line);
    match pipeline {
        Some(pipeline) if problems.is_empty() => Ok(pipeline),
        _ => Err(problems),
    }
}

fn read_pipeline(
    root: &Node,
    base_dir: PathBuf,
    problems: &mut Vec<LineError>,
) -> Option<Pipeline> {
    let entries = collect(root.as_mapping("the pipeline"), problems)?;
    unknown_keys(entries, &["name", "datasets", "models", "stages"], problems);
    let name = match root.get("name") {
        Some(node) => collect(node.as_str("name"), problems)
            .and_then(|name| collect(check_name(name, node.line, "pipeline name"), problems)),
        None => {
            problems.push(LineError::new(root.line, "the pipeline needs a `name`"));
            None
        }
    };
    let datasets = list(root, "datasets", problems, read_dataset);
    let models = list(root, "models", problems, read_model);
    let stages = list(root, "stages", problems, read_stage);
    if root.get("stages").is_none() {
        problems.push(LineError::new(root.line, "the pipeline needs `stages`"));
    }
    Some(Pipeline {
        name: name?.to_owned(),
        base_dir,
        datasets,
        models,
        stages,
    })
}

/// Reads the list under `key`, skipping (and reporting) items that do not parse.
fn list<T>(
    root: &Node,
    key: &str,
    problems: &mut Vec<LineError>,
    read: fn(&Node, &mut Vec<LineError>) -> Option<T>,
) -> Vec<T> {
    let Some(node) = root.get(key) else {
        return Vec::new();
    };
    let Some(items) = collect(node.as_sequence(key), problems) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| read(item, problems))
        .collect()
}

fn read_dataset(node: &Node, problems: &mut Vec<LineError>) -> Option<DatasetUpload> {
    let entries = collect(node.as_mapping("a dataset"), problems)?;
    let keys = ["name", "kind", "path", "licence", "max_rows", "max_bytes"];
    unknown_keys(entries, &keys, problems);
    let name = required_str(node, "name", "a dataset", problems);
    let kind = required_str(node, "kind", "a dataset", problems);
    let path = required_str(node, "path", "a dataset", problems);
    const KINDS: [&str; 6] = ["text", "sft", "chat", "preference", "ranking", "prompts"];
    if let (Some(kind), Some(kind_node)) = (kind, node.get("kind"))
        && !KINDS.contains(&kind)
    {
        problems.push(LineError::new(
            kind_node.line,
            format!(
                "unknown dataset kind `{kind}`; expected one of {}",
                KINDS.join(", ")
            ),
        ));
    }
    let licence = optional_str(node, "licence", problems).map(str::to_owned);
    let max_rows = optional_count(node, "max_rows", problems);
    let max_bytes = optional_count(node, "max_bytes", problems);
    let name = collect(
        check_name(name?, node.line_of("name"), "dataset name"),
        problems,
    )?;
    Some(DatasetUpload {
        line: node.line,
        name: name.to_owned(),
        kind: kind?.to_owned(),
        path: PathBuf::from(path?),
        licence,
        max_rows,
        max_bytes,
    })
}

fn read_model(node: &Node, problems: &mut Vec<LineError>) -> Option<ModelImport> {
    let entries = collect(node.as_mapping("a model"), problems)?;
    unknown_keys(entries, &["name", "gguf"], problems);
    let name = required_str(node, "name", "a model", problems);
    let gguf = required_str(node, "gguf", "a model", problems);
    let name = collect(
        check_name(name?, node.line_of("name"), "model name"),
        problems,
    )?;
    Some(ModelImport {
        line: node.line,
        name: name.to_owned(),
        gguf: PathBuf::from(gguf?),
    })
}

fn read_stage(node: &Node, problems: &mut Vec<LineError>) -> Option<StageSpec> {
    let entries = collect(node.as_mapping("a stage"), problems)?;
    let name = required_str(node, "name", "a stage", problems);
    let kind = required_str(node, "kind", "a stage", problems).and_then(|kind| {
        let line = node.line_of("kind");
        collect(
            kind.parse::<StageKind>()
                .map_err(|e| LineError::new(line, e)),
            problems,
        )
    });
    if let Some(kind) = kind {
        let mut allowed = vec!["name", "kind", "inputs"];
        allowed.extend_from_slice(stages::for_kind(kind).options());
        unknown_keys(entries, &allowed, problems);
    }
    let inputs = node
        .get("inputs")
        .and_then(|inputs| read_inputs(inputs, problems))
        .unwrap_or_default();
    let hyper_parameters = match node.get("hyper_parameters") {
        Some(hp) => collect(hp.as_mapping("hyper_parameters"), problems).map(|_| hp.to_json()),
        None => Some(serde_json::json!({})),
    };
    let name = collect(
        check_name(name?, node.line_of("name"), "stage name"),
        problems,
    )?;
    Some(StageSpec {
        line: node.line,
        name: name.to_owned(),
        kind: kind?,
        inputs,
        hyper_parameters: hyper_parameters?,
        node: node.clone(),
    })
}

fn read_inputs(node: &Node, problems: &mut Vec<LineError>) -> Option<Inputs> {
    let entries = collect(node.as_mapping("inputs"), problems)?;
    unknown_keys(entries, &["datasets", "base_model", "model"], problems);
    let mut inputs = Inputs {
        base_model: node.get("base_model").and_then(|n| reference(n, problems)),
        model: node.get("model").and_then(|n| reference(n, problems)),
        ..Inputs::default()
    };
    if let Some(datasets) = node.get("datasets") {
        for item in collect(datasets.as_sequence("inputs.datasets"), problems)? {
            if let Some(input) = read_dataset_input(item, problems) {
                inputs.datasets.push(input);
            }
        }
    }
    Some(inputs)
}

/// A dataset input: a reference string, or `{reference, role}`.
fn read_dataset_input(node: &Node, problems: &mut Vec<LineError>) -> Option<DatasetInput> {
    if let Value::String(_) = node.value {
        return Some(DatasetInput {
            reference: reference(node, problems)?,
            role: "train".into(),
        });
    }
    let entries = collect(node.as_mapping("a dataset input"), problems)?;
    unknown_keys(entries, &["reference", "role"], problems);
    let role = optional_str(node, "role", problems).unwrap_or("train");
    if role != "train" && role != "eval" {
        let line = node.line_of("role");
        problems.push(LineError::new(
            line,
            format!("role `{role}` must be train or eval"),
        ));
    }
    let Some(reference_node) = node.get("reference") else {
        problems.push(LineError::new(
            node.line,
            "a dataset input needs a `reference`",
        ));
        return None;
    };
    Some(DatasetInput {
        reference: reference(reference_node, problems)?,
        role: role.to_owned(),
    })
}

fn reference(node: &Node, problems: &mut Vec<LineError>) -> Option<Located<Reference>> {
    let text = collect(node.as_str("a reference"), problems)?;
    let value = collect(
        text.parse::<Reference>()
            .map_err(|e| LineError::new(node.line, e)),
        problems,
    )?;
    Some(Located {
        line: node.line,
        value,
    })
}

/// Stage names are unique, and `stage:` references point at an earlier stage.
/// The names of every stage in the file, including stages that did not parse: a reference to
/// one of those is not reported again, since the stage's own problem already is.
fn declared_stage_names(root: &Node) -> BTreeSet<String> {
    let Some(Ok(items)) = root.get("stages").map(|node| node.as_sequence("stages")) else {
        return BTreeSet::new();
    };
    items
        .iter()
        .filter_map(|item| item.get("name")?.as_str("name").ok())
        .map(str::to_owned)
        .collect()
}

fn check_graph(pipeline: &Pipeline, declared: &BTreeSet<String>, problems: &mut Vec<LineError>) {
    let mut earlier = BTreeSet::new();
    for stage in &pipeline.stages {
        for reference in stage_references(&stage.inputs) {
            let Reference::Stage(target) = &reference.value else {
                continue;
            };
            if earlier.contains(target.as_str()) {
                continue;
            }
            let parsed = pipeline.stages.iter().any(|s| &s.name == target);
            if !parsed && declared.contains(target) {
                continue;
            }
            let message = if parsed {
                format!(
                    "stage `{target}` runs after `{}`; move it before",
                    stage.name
                )
            } else {
                format!("there is no stage named `{target}`")
            };
            problems.push(LineError::new(reference.line, message));
        }
        if !earlier.insert(stage.name.as_str()) {
            let message = format!("a stage named `{}` already exists", stage.name);
            problems.push(LineError::new(stage.line_of("name"), message));
        }
    }
}

/// Every reference a stage's inputs make.
pub fn stage_references(inputs: &Inputs) -> impl Iterator<Item = &Located<Reference>> {
    inputs
        .datasets
        .iter()
        .map(|dataset| &dataset.reference)
        .chain(inputs.base_model.iter())
        .chain(inputs.model.iter())
}

fn unknown_keys(entries: &[(Key, Node)], allowed: &[&str], problems: &mut Vec<LineError>) {
    for (key, _) in entries {
        if !allowed.contains(&key.name.as_str()) {
            problems.push(LineError::new(
                key.line,
                format!(
                    "unknown key `{}`; expected one of {}",
                    key.name,
                    allowed.join(", ")
                ),
            ));
        }
    }
}

fn required_str<'a>(
    node: &'a Node,
    key: &str,
    what: &str,
    problems: &mut Vec<LineError>,
) -> Option<&'a str> {
    match node.get(key) {
        Some(value) => collect(value.as_str(key), problems),
        None => {
            problems.push(LineError::new(node.line, format!("{what} needs `{key}`")));
            None
        }
    }
}

fn optional_str<'a>(node: &'a Node, key: &str, problems: &mut Vec<LineError>) -> Option<&'a str> {
    node.get(key)
        .and_then(|value| collect(value.as_str(key), problems))
}

fn optional_count(node: &Node, key: &str, problems: &mut Vec<LineError>) -> Option<usize> {
    let value = node.get(key)?;
    match value.value {
        Value::Integer(count) if count > 0 => usize::try_from(count).ok(),
        _ => {
            problems.push(LineError::new(
                value.line,
                format!("`{key}` must be a positive integer"),
            ));
            None
        }
    }
}

/// Names become URL path segments and folder names: keep them plain.
fn check_name<'a>(name: &'a str, line: usize, what: &str) -> Result<&'a str, LineError> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if plain {
        Ok(name)
    } else {
        Err(LineError::new(
            line,
            format!("{what} `{name}` must be 1-64 characters of letters, digits, `-`, `_`, `.`"),
        ))
    }
}

fn collect<T>(result: Result<T, LineError>, problems: &mut Vec<LineError>) -> Option<T> {
    result.map_err(|error| problems.push(error)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "\
name: p
datasets:
  - name: corpus
    kind: text
    path: corpus.txt
stages:
  - name: tok
    kind: tokenizer
    inputs:
      datasets: [corpus]
    hyper_parameters:
      vocab_size: 300
  - name: pre
    kind: pretrain
    inputs:
      datasets: [corpus]
      base_model: stage:tok
    hyper_parameters:
      preset: tiny
      total_steps: 5
";

    fn problems(source: &str) -> Vec<LineError> {
        parse(source, PathBuf::new()).expect_err("the pipeline has problems")
    }

    #[test]
    fn a_valid_pipeline_keeps_its_stages_in_order() {
        let pipeline = parse(VALID, PathBuf::from("examples")).expect("valid");
        let names: Vec<_> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["tok", "pre"]);
        assert_eq!(
            pipeline.stages[1]
                .inputs
                .base_model
                .as_ref()
                .map(|r| &r.value),
            Some(&Reference::Stage("tok".into()))
        );
        assert_eq!(
            pipeline.path(Path::new("corpus.txt")),
            PathBuf::from("examples/corpus.txt")
        );
    }

    #[test]
    fn an_unknown_stage_kind_is_reported_at_its_line() {
        let source = VALID.replace("kind: pretrain", "kind: pretrian");
        let found = problems(&source);
        // `kind: pretrian` is line 14 of VALID.
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].line, 14);
        assert!(found[0].message.contains("unknown stage kind `pretrian`"));
    }

    #[test]
    fn a_stage_with_an_unknown_kind_is_reported_once_not_again_where_it_is_used() {
        // `tok`'s kind (line 8) is misspelt; `pre` still refers to it at line 17. The one real
        // problem is the kind; "there is no stage named `tok`" would send the reader astray.
        let source = VALID.replace("kind: tokenizer", "kind: tokeniser");
        let found = problems(&source);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].line, 8);
        assert!(found[0].message.contains("unknown stage kind `tokeniser`"));
    }

    #[test]
    fn a_later_stage_kind_is_refused_as_not_available_yet() {
        let source = VALID.replace("kind: pretrain", "kind: grpo");
        assert!(
            problems(&source)[0]
                .message
                .contains("not available in this version")
        );
    }

    #[test]
    fn a_reference_to_a_missing_or_later_stage_names_the_line() {
        let missing = problems(&VALID.replace("stage:tok", "stage:nope"));
        // `base_model: stage:nope` is line 17.
        assert_eq!(
            (missing[0].line, missing[0].message.as_str()),
            (17, "there is no stage named `nope`")
        );

        let forward = VALID.replace("datasets: [corpus]\n    hyper_parameters:\n      vocab_size", "datasets: [corpus]\n      base_model: stage:pre\n    hyper_parameters:\n      vocab_size");
        let found = problems(&forward);
        // The inserted `base_model: stage:pre` is line 11.
        assert!(
            found
                .iter()
                .any(|p| p.line == 11 && p.message.contains("runs after")),
            "{found:?}"
        );
    }

    #[test]
    fn a_missing_input_is_reported_at_the_stage_inputs() {
        let found = problems(&VALID.replace("      base_model: stage:tok\n", ""));
        // `inputs:` of the pretrain stage is line 15.
        assert_eq!(found[0].line, 15);
        assert!(
            found[0].message.contains("needs `inputs.base_model`"),
            "{found:?}"
        );
    }

    #[test]
    fn a_bad_hyper_parameter_is_reported_at_its_own_line() {
        let found = problems(&VALID.replace("total_steps: 5", "total_steps: many"));
        // `total_steps: many` is line 20; the message comes from ferrite_training::job::validate.
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].line, 20);
        assert!(found[0].message.contains("total_steps"), "{found:?}");

        let found = problems(&VALID.replace("vocab_size: 300", "vocab_size: 100"));
        // The tokenizer's vocabulary must hold the 256 bytes at least; line 12.
        assert_eq!(found[0].line, 12);
    }

    #[test]
    fn unknown_keys_and_duplicate_stage_names_are_all_reported_together() {
        let source = VALID
            .replace(
                "    kind: tokenizer\n",
                "    kind: tokenizer\n    colour: blue\n",
            )
            .replace("name: pre\n", "name: tok\n");
        let found = problems(&source);
        let lines: Vec<_> = found.iter().map(|p| p.line).collect();
        // `colour` on line 9; the second `name: tok` moves from line 13 to 14.
        assert_eq!(lines, [9, 14], "{found:?}");
    }
}
