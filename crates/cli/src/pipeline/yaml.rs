//! YAML read into a tree that remembers the line of every node.
//!
//! Pipeline errors name the line they come from, and serde-based YAML readers forget positions
//! once a value is parsed. This builds the tree from the parser's marked events instead; anchors
//! and aliases are refused, since a pipeline file has no use for them.

use std::fmt;

use yaml_rust2::Yaml;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One YAML node and the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub line: usize,
    pub value: Value,
}

/// The shape of a node. Scalars keep their resolved type (`3` is an integer, `"3"` a string).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Integer(i64),
    Float(f64),
    String(String),
    Sequence(Vec<Node>),
    /// Keys in file order, each with its own line.
    Mapping(Vec<(Key, Node)>),
}

/// A mapping key; only string keys are accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub line: usize,
    pub name: String,
}

/// A problem at one line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl LineError {
    pub fn new(line: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            message: message.into(),
        }
    }
}

/// Parses one YAML document.
pub fn parse(source: &str) -> Result<Node, LineError> {
    let mut builder = Builder::default();
    Parser::new_from_str(source)
        .load(&mut builder, false)
        .map_err(|error| LineError::new(error.marker().line(), error.info().to_owned()))?;
    if let Some(error) = builder.error {
        return Err(error);
    }
    builder
        .root
        .ok_or_else(|| LineError::new(1, "the file is empty"))
}

impl Node {
    /// The value under `key` when this node is a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Mapping(entries) => entries
                .iter()
                .find(|(name, _)| name.name == key)
                .map(|(_, node)| node),
            _ => None,
        }
    }

    /// The node as a string scalar, or an error naming `what`.
    pub fn as_str(&self, what: &str) -> Result<&str, LineError> {
        match &self.value {
            Value::String(text) => Ok(text),
            other => Err(LineError::new(
                self.line,
                format!("`{what}` must be a string, not {}", other.describe()),
            )),
        }
    }

    /// The node as a mapping's entries, or an error naming `what`.
    pub fn as_mapping(&self, what: &str) -> Result<&[(Key, Node)], LineError> {
        match &self.value {
            Value::Mapping(entries) => Ok(entries),
            other => Err(LineError::new(
                self.line,
                format!("`{what}` must be a mapping, not {}", other.describe()),
            )),
        }
    }

    /// The node as a sequence's items, or an error naming `what`.
    pub fn as_sequence(&self, what: &str) -> Result<&[Node], LineError> {
        match &self.value {
            Value::Sequence(items) => Ok(items),
            other => Err(LineError::new(
                self.line,
                format!("`{what}` must be a list, not {}", other.describe()),
            )),
        }
    }

    /// The line of the key (or list item) at a dotted `path` below this one (`batch_size`,
    /// `stages.1.kind`), or of the deepest node the path reaches.
    pub fn line_of(&self, path: &str) -> usize {
        let mut node = self;
        let mut line = self.line;
        for part in path.split('.').filter(|part| !part.is_empty()) {
            let next = match &node.value {
                Value::Mapping(entries) => entries
                    .iter()
                    .find(|(key, _)| key.name == part)
                    .map(|(key, value)| (key.line, value)),
                Value::Sequence(items) => part
                    .parse::<usize>()
                    .ok()
                    .and_then(|index| items.get(index))
                    .map(|item| (item.line, item)),
                _ => None,
            };
            match next {
                Some((at, child)) => (line, node) = (at, child),
                None => return line,
            }
        }
        line
    }

    /// The node as JSON, for hyper-parameters sent to the services as they are.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as Json;
        match &self.value {
            Value::Null => Json::Null,
            Value::Bool(flag) => Json::Bool(*flag),
            Value::Integer(number) => Json::from(*number),
            Value::Float(number) => serde_json::Number::from_f64(*number)
                .map(Json::Number)
                .unwrap_or(Json::Null),
            Value::String(text) => Json::String(text.clone()),
            Value::Sequence(items) => Json::Array(items.iter().map(Node::to_json).collect()),
            Value::Mapping(entries) => Json::Object(
                entries
                    .iter()
                    .map(|(key, value)| (key.name.clone(), value.to_json()))
                    .collect(),
            ),
        }
    }
}

impl Value {
    pub fn describe(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a number",
            Value::String(_) => "a string",
            Value::Sequence(_) => "a list",
            Value::Mapping(_) => "a mapping",
        }
    }
}

/// Collections being built, innermost last.
enum Open {
    Sequence(usize, Vec<Node>),
    /// Entries so far, and a key waiting for its value.
    Mapping(usize, Vec<(Key, Node)>, Option<Key>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    root: Option<Node>,
    error: Option<LineError>,
}

impl Builder {
    fn fail(&mut self, line: usize, message: &str) {
        if self.error.is_none() {
            self.error = Some(LineError::new(line, message));
        }
    }

    /// Places a finished node in its parent, or makes it the root.
    fn place(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Open::Sequence(_, items)) => items.push(node),
            Some(Open::Mapping(_, entries, pending)) => match pending.take() {
                Some(key) => {
                    if entries.iter().any(|(seen, _)| seen.name == key.name) {
                        let message = format!("`{}` appears twice in this mapping", key.name);
                        self.fail(key.line, &message);
                    } else {
                        entries.push((key, node));
                    }
                }
                None => match node.value {
                    Value::String(name) => {
                        *pending = Some(Key {
                            line: node.line,
                            name,
                        })
                    }
                    _ => self.fail(node.line, "mapping keys must be strings"),
                },
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let line = mark.line();
        match event {
            Event::Scalar(text, style, _, _) => {
                let value = if style == TScalarStyle::Plain {
                    scalar(&text)
                } else {
                    Value::String(text)
                };
                self.place(Node { line, value });
            }
            Event::SequenceStart(_, _) => self.stack.push(Open::Sequence(line, Vec::new())),
            Event::MappingStart(_, _) => self.stack.push(Open::Mapping(line, Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Open::Sequence(line, items)) => Node {
                        line,
                        value: Value::Sequence(items),
                    },
                    Some(Open::Mapping(line, entries, _)) => Node {
                        line,
                        value: Value::Mapping(entries),
                    },
                    None => return,
                };
                self.place(node);
            }
            Event::Alias(_) => self.fail(line, "anchors and aliases are not supported"),
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Resolves a plain scalar the way YAML 1.2's core schema does.
fn scalar(text: &str) -> Value {
    match Yaml::from_str(text) {
        Yaml::Null => Value::Null,
        Yaml::Boolean(flag) => Value::Bool(flag),
        Yaml::Integer(number) => Value::Integer(number),
        Yaml::Real(real) => real
            .parse::<f64>()
            .map_or_else(|_| Value::String(text.to_owned()), Value::Float),
        _ => Value::String(text.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_and_item_keeps_its_line() {
        let source = "name: demo\nstages:\n  - name: tok\n    kind: tokenizer\n  - name: pre\n    hyper_parameters:\n      total_steps: 20\n";
        let root = parse(source).expect("valid YAML");
        // Lines counted by hand in `source` above.
        assert_eq!(root.line_of("name"), 1);
        assert_eq!(root.line_of("stages.0.kind"), 4);
        assert_eq!(root.line_of("stages.1"), 5);
        assert_eq!(root.line_of("stages.1.hyper_parameters.total_steps"), 7);
    }

    #[test]
    fn plain_scalars_resolve_and_quoted_ones_stay_strings() {
        let root = parse("a: 3\nb: \"3\"\nc: 2.5e-4\nd: true\ne: ~\n").expect("valid YAML");
        assert_eq!(
            root.to_json(),
            serde_json::json!({"a": 3, "b": "3", "c": 2.5e-4, "d": true, "e": null})
        );
    }

    #[test]
    fn a_duplicate_key_is_an_error_at_its_line() {
        let error = parse("a: 1\nb: 2\na: 3\n").expect_err("duplicate key");
        assert_eq!(error.line, 3);
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let error = parse("stages:\n  - name: a\n   kind: [\n").expect_err("bad YAML");
        assert!(error.line >= 3, "{error}");
    }
}
