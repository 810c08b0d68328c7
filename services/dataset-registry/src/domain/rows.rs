//! The row schema of each dataset kind: what a row must hold, and the text it carries.
//!
//! A row is checked as a `serde_json::Value`, so every problem can name its field path
//! (`messages[2].role`) instead of stopping at the first serde error.

use serde_json::{Map, Value};

use super::DatasetKind;

/// One thing wrong with a row: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

/// Checks `row` against the schema of `kind` and returns the texts it carries, in order
/// (the prompt, the responses, the messages' contents), or every problem found.
///
/// `kind` must not be [`DatasetKind::Text`], whose rows are lines, not JSON.
pub fn check(kind: DatasetKind, row: &Value) -> Result<Vec<&str>, Vec<FieldProblem>> {
    let Some(object) = row.as_object() else {
        return Err(vec![problem(
            "",
            format!("a row must be a JSON object, found {}", type_name(row)),
        )]);
    };
    let mut checker = Checker {
        object,
        texts: Vec::new(),
        problems: Vec::new(),
    };
    match kind {
        DatasetKind::Text => checker.string("text"),
        DatasetKind::Sft => checker.sft(),
        DatasetKind::Chat => checker.chat(),
        DatasetKind::Preference => checker.preference(),
        DatasetKind::Ranking => checker.ranking(),
        DatasetKind::Prompts => checker.prompts(),
    }
    if checker.problems.is_empty() {
        Ok(checker.texts)
    } else {
        Err(checker.problems)
    }
}

const CHAT_ROLES: &[&str] = &["system", "user", "assistant"];
const SHAREGPT_ROLES: &[&str] = &["system", "human", "gpt"];

struct Checker<'a> {
    object: &'a Map<String, Value>,
    texts: Vec<&'a str>,
    problems: Vec<FieldProblem>,
}

impl<'a> Checker<'a> {
    fn sft(&mut self) {
        if self.object.contains_key("instruction") {
            self.string("instruction");
            self.optional_string("input");
            self.string("output");
        } else if self.object.contains_key("prompt") {
            self.string("prompt");
            self.string("completion");
        } else {
            self.fail(
                "instruction",
                "missing: an sft row needs `instruction` and `output` (Alpaca) or `prompt` and \
                 `completion`",
            );
        }
    }

    fn chat(&mut self) {
        if self.object.contains_key("messages") {
            self.messages("messages", "role", "content", CHAT_ROLES);
        } else if self.object.contains_key("conversations") {
            self.messages("conversations", "from", "value", SHAREGPT_ROLES);
        } else {
            self.fail(
                "messages",
                "missing: a chat row needs `messages` (role, content) or ShareGPT \
                 `conversations` (from, value)",
            );
        }
    }

    fn preference(&mut self) {
        self.text_or_messages("prompt");
        self.text_or_messages("chosen");
        self.text_or_messages("rejected");
    }

    fn ranking(&mut self) {
        self.text_or_messages("prompt");
        let responses = self.array("responses", |checker, field, item| {
            checker.string_value(field, item);
        });
        if let Some(count) = responses
            && count < 2
        {
            self.fail(
                "responses",
                format!("a ranking needs at least 2 responses, found {count}"),
            );
        }
        let Some(ranks) = self.field_array("ranks") else {
            return;
        };
        let k = responses.unwrap_or(ranks.len());
        self.ranks(ranks, k, responses);
    }

    fn ranks(&mut self, ranks: &'a [Value], k: usize, responses: Option<usize>) {
        if let Some(responses) = responses
            && ranks.len() != responses
        {
            self.fail(
                "ranks",
                format!(
                    "ranks has {} entries for {responses} responses; give one rank per response",
                    ranks.len()
                ),
            );
            return;
        }
        let mut best_seen = false;
        for (i, rank) in ranks.iter().enumerate() {
            match rank.as_u64() {
                Some(r) if r >= 1 && r <= k as u64 => best_seen |= r == 1,
                _ => self.fail(
                    &format!("ranks[{i}]"),
                    format!("a rank is an integer from 1 (best) to {k}, found {rank}"),
                ),
            }
        }
        if !best_seen && self.problems.is_empty() {
            self.fail("ranks", "no response has rank 1; 1 is the best");
        }
    }

    fn prompts(&mut self) {
        self.text_or_messages("prompt");
        match self.object.get("answer") {
            None => self.fail("answer", "missing"),
            Some(Value::String(answer)) => self.texts.push(answer),
            // A number is a fine reference answer for a verifier (GSM8K's `#### 72`).
            Some(Value::Number(_)) => {}
            Some(other) => self.fail(
                "answer",
                format!("expected a string or a number, found {}", type_name(other)),
            ),
        }
    }

    /// A string, or a list of chat messages (TRL accepts both for prompt, chosen, rejected).
    fn text_or_messages(&mut self, field: &str) {
        match self.object.get(field) {
            Some(Value::Array(_)) => self.messages(field, "role", "content", CHAT_ROLES),
            _ => self.string(field),
        }
    }

    fn messages(&mut self, field: &str, role_key: &str, content_key: &str, roles: &[&str]) {
        let count = self.array(field, |checker, path, item| {
            let Some(message) = item.as_object() else {
                checker.fail(
                    path,
                    format!("a message is an object, found {}", type_name(item)),
                );
                return;
            };
            match message.get(role_key).and_then(Value::as_str) {
                Some(role) if roles.contains(&role) => {}
                Some(role) => checker.fail(
                    &format!("{path}.{role_key}"),
                    format!(
                        "unknown role `{role}`; expected one of {}",
                        roles.join(", ")
                    ),
                ),
                None => checker.fail(&format!("{path}.{role_key}"), "missing or not a string"),
            }
            match message.get(content_key) {
                Some(Value::String(content)) => checker.texts.push(content),
                Some(other) => checker.fail(
                    &format!("{path}.{content_key}"),
                    format!("expected a string, found {}", type_name(other)),
                ),
                None => checker.fail(&format!("{path}.{content_key}"), "missing"),
            }
        });
        if count == Some(0) {
            self.fail(field, "the conversation is empty");
        }
    }

    /// Runs `each` on every item of the array `field`; returns its length when it is one.
    fn array(
        &mut self,
        field: &str,
        mut each: impl FnMut(&mut Self, &str, &'a Value),
    ) -> Option<usize> {
        let items = self.field_array(field)?;
        for (i, item) in items.iter().enumerate() {
            each(self, &format!("{field}[{i}]"), item);
        }
        Some(items.len())
    }

    fn field_array(&mut self, field: &str) -> Option<&'a [Value]> {
        match self.object.get(field) {
            Some(Value::Array(items)) => Some(items),
            Some(other) => {
                self.fail(
                    field,
                    format!("expected an array, found {}", type_name(other)),
                );
                None
            }
            None => {
                self.fail(field, "missing");
                None
            }
        }
    }

    fn string(&mut self, field: &str) {
        match self.object.get(field) {
            Some(value) => self.string_value(field, value),
            None => self.fail(field, "missing"),
        }
    }

    fn optional_string(&mut self, field: &str) {
        match self.object.get(field) {
            None | Some(Value::Null) => {}
            Some(value) => self.string_value(field, value),
        }
    }

    fn string_value(&mut self, path: &str, value: &'a Value) {
        match value {
            Value::String(text) => self.texts.push(text),
            other => self.fail(
                path,
                format!("expected a string, found {}", type_name(other)),
            ),
        }
    }

    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(problem(field, message));
    }
}

fn problem(field: &str, message: impl Into<String>) -> FieldProblem {
    FieldProblem {
        field: field.to_owned(),
        message: message.into(),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(kind: DatasetKind, row: Value) -> Vec<String> {
        check(kind, &row)
            .expect_err("the row is invalid")
            .into_iter()
            .map(|p| p.field)
            .collect()
    }

    #[test]
    fn alpaca_and_prompt_completion_rows_are_sft() {
        let alpaca = json!({"instruction": "Add", "input": "", "output": "2"});
        assert_eq!(check(DatasetKind::Sft, &alpaca), Ok(vec!["Add", "", "2"]));
        let pair = json!({"prompt": "Hi", "completion": "Hello"});
        assert_eq!(check(DatasetKind::Sft, &pair), Ok(vec!["Hi", "Hello"]));
        assert_eq!(
            fields(DatasetKind::Sft, json!({"instruction": "x", "output": 3})),
            ["output"]
        );
        assert_eq!(
            fields(DatasetKind::Sft, json!({"text": "x"})),
            ["instruction"]
        );
    }

    #[test]
    fn chat_problems_name_the_message_and_field() {
        let row = json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "bot", "content": "hello"},
            {"role": "assistant"}
        ]});
        assert_eq!(
            fields(DatasetKind::Chat, row),
            ["messages[1].role", "messages[2].content"]
        );
        let sharegpt = json!({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]});
        assert_eq!(check(DatasetKind::Chat, &sharegpt), Ok(vec!["a", "b"]));
        assert_eq!(
            fields(DatasetKind::Chat, json!({"messages": []})),
            ["messages"]
        );
    }

    #[test]
    fn preference_takes_strings_or_message_lists() {
        let row = json!({
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": "bad"
        });
        assert_eq!(
            check(DatasetKind::Preference, &row),
            Ok(vec!["q", "good", "bad"])
        );
        assert_eq!(
            fields(
                DatasetKind::Preference,
                json!({"prompt": "q", "chosen": "a"})
            ),
            ["rejected"]
        );
    }

    #[test]
    fn rankings_allow_ties_and_refuse_bad_ranks() {
        let tied = json!({"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 1, 3]});
        assert!(check(DatasetKind::Ranking, &tied).is_ok());
        let one = json!({"prompt": "q", "responses": ["a"], "ranks": [1]});
        assert_eq!(fields(DatasetKind::Ranking, one), ["responses"]);
        let short = json!({"prompt": "q", "responses": ["a", "b"], "ranks": [1]});
        assert_eq!(fields(DatasetKind::Ranking, short), ["ranks"]);
        // 3 is out of range for k = 2; 0 is not a rank.
        let out = json!({"prompt": "q", "responses": ["a", "b"], "ranks": [0, 3]});
        assert_eq!(fields(DatasetKind::Ranking, out), ["ranks[0]", "ranks[1]"]);
        let no_best = json!({"prompt": "q", "responses": ["a", "b"], "ranks": [2, 2]});
        assert_eq!(fields(DatasetKind::Ranking, no_best), ["ranks"]);
    }

    #[test]
    fn prompts_need_an_answer() {
        assert!(
            check(
                DatasetKind::Prompts,
                &json!({"prompt": "2+2?", "answer": 4})
            )
            .is_ok()
        );
        assert_eq!(
            fields(DatasetKind::Prompts, json!({"prompt": "2+2?"})),
            ["answer"]
        );
        assert_eq!(fields(DatasetKind::Prompts, json!([1])), [""]);
    }
}
