//! Supervised fine-tuning data: the record formats the field uses, read into conversations,
//! rendered in ChatML with a mask of the tokens the assistant wrote, and batched either
//! padded or packed.
//!
//! Formats, detected per record: chat `{"messages": [{role, content}]}`, ShareGPT
//! `{"conversations": [{from, value}]}`, Alpaca `{instruction, input?, output, system?}` and
//! `{prompt, completion}`. A file is a JSON array or JSON Lines; errors name the record (array)
//! or line (JSONL) and the field.
//!
//! Labels come from the assistant mask, never from comparing ids with the padding id, so the
//! end-of-turn token a reply ends with stays a label even when it doubles as the padding.

use ferrite_model::tokenizer::{ChatMessage, Role, Tokenizer, TokenizerError};
use serde_json::Value;
use tch::{Device, Tensor};

/// The label that cross-entropy skips (PyTorch's default `ignore_index`).
pub const IGNORE: i64 = -100;

/// Why SFT data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SftDataError {
    /// A record is malformed; `location` is `line N` or `record N` (1-based).
    #[error("{location}: {field}: {problem}")]
    Record {
        /// Where in the file.
        location: String,
        /// The field at fault (`messages[2].role`, `output`, ...), or `record` for the whole.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// Nothing usable was left.
    #[error("the dataset has no example with an assistant reply")]
    Empty,
    /// The tokenizer failed or lacks ChatML tokens.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Reads every record of `text` (a JSON array or JSON Lines) into a conversation.
pub fn parse_conversations(text: &str) -> Result<Vec<Vec<ChatMessage>>, SftDataError> {
    if text.trim_start().starts_with('[') {
        let records: Vec<Value> =
            serde_json::from_str(text).map_err(|error| SftDataError::Record {
                location: format!("line {}", error.line()),
                field: "record".into(),
                problem: format!("not a JSON array of records: {error}"),
            })?;
        return records
            .iter()
            .enumerate()
            .map(|(index, record)| conversation(record, || format!("record {}", index + 1)))
            .collect();
    }
    let mut conversations = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = || format!("line {}", index + 1);
        let record: Value = serde_json::from_str(line).map_err(|error| SftDataError::Record {
            location: location(),
            field: "record".into(),
            problem: format!("not valid JSON: {error}"),
        })?;
        conversations.push(conversation(&record, location)?);
    }
    Ok(conversations)
}

/// One record as a conversation, whatever its format.
fn conversation(
    record: &Value,
    location: impl Fn() -> String,
) -> Result<Vec<ChatMessage>, SftDataError> {
    let fail = |field: &str, problem: &str| SftDataError::Record {
        location: location(),
        field: field.to_string(),
        problem: problem.to_string(),
    };
    let text = |field: &str, required: bool| -> Result<Option<String>, SftDataError> {
        match &record[field] {
            Value::String(value) => Ok(Some(value.clone())),
            Value::Null if !required => Ok(None),
            Value::Null => Err(fail(field, "is missing")),
            _ => Err(fail(field, "must be a string")),
        }
    };
    if !record.is_object() {
        return Err(fail("record", "must be a JSON object"));
    }

    let messages = if record.get("messages").is_some() {
        turns(&record["messages"], "messages", ("role", "content"), &fail)?
    } else if record.get("conversations").is_some() {
        turns(
            &record["conversations"],
            "conversations",
            ("from", "value"),
            &fail,
        )?
    } else if record.get("instruction").is_some() {
        let instruction = text("instruction", true)?.unwrap_or_default();
        let prompt = match text("input", false)? {
            Some(input) if !input.trim().is_empty() => format!("{instruction}\n\n{input}"),
            _ => instruction,
        };
        let mut messages = Vec::new();
        if let Some(system) = text("system", false)? {
            messages.push(ChatMessage::new(Role::System, system));
        }
        messages.push(ChatMessage::new(Role::User, prompt));
        let output = text("output", true)?.unwrap_or_default();
        messages.push(ChatMessage::new(Role::Assistant, output));
        messages
    } else if record.get("prompt").is_some() {
        let prompt = text("prompt", true)?.unwrap_or_default();
        let completion = text("completion", true)?.unwrap_or_default();
        vec![
            ChatMessage::new(Role::User, prompt),
            ChatMessage::new(Role::Assistant, completion),
        ]
    } else {
        return Err(fail(
            "record",
            "has none of `messages`, `conversations`, `instruction`, `prompt`",
        ));
    };
    if !messages
        .iter()
        .any(|message| message.role == Role::Assistant)
    {
        return Err(fail("record", "has no assistant reply to learn from"));
    }
    Ok(messages)
}

/// A list of turns under `list`, each with a speaker and a text field (`keys`).
fn turns(
    value: &Value,
    list: &str,
    (speaker, body): (&str, &str),
    fail: &dyn Fn(&str, &str) -> SftDataError,
) -> Result<Vec<ChatMessage>, SftDataError> {
    let items = value
        .as_array()
        .ok_or_else(|| fail(list, "must be a list of turns"))?;
    let mut messages = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let role = match item[speaker].as_str() {
            Some("system") => Role::System,
            Some("user" | "human") => Role::User,
            Some("assistant" | "gpt" | "model") => Role::Assistant,
            Some(_) => {
                return Err(fail(
                    &format!("{list}[{index}].{speaker}"),
                    "must be system, user (human) or assistant (gpt)",
                ));
            }
            None => {
                return Err(fail(
                    &format!("{list}[{index}].{speaker}"),
                    "is missing or not a string",
                ));
            }
        };
        let content = item[body].as_str().ok_or_else(|| {
            fail(
                &format!("{list}[{index}].{body}"),
                "is missing or not a string",
            )
        })?;
        messages.push(ChatMessage::new(role, content));
    }
    Ok(messages)
}

/// One tokenised conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// True where the token is a label (the assistant wrote it).
    pub trained: Vec<bool>,
}

impl Example {
    /// Renders `messages` in ChatML, cut to `max_length` tokens; `None` when no assistant
    /// token survives the cut.
    pub fn encode(
        tokenizer: &Tokenizer,
        messages: &[ChatMessage],
        max_length: usize,
    ) -> Result<Option<Self>, SftDataError> {
        let mut encoding = tokenizer.render_chat(messages, false)?;
        encoding.ids.truncate(max_length);
        encoding.assistant_mask.truncate(max_length);
        // A label needs a token before it, so the first position never counts.
        if !encoding
            .assistant_mask
            .iter()
            .skip(1)
            .any(|&trained| trained)
        {
            return Ok(None);
        }
        Ok(Some(Self {
            ids: encoding.ids,
            trained: encoding.assistant_mask,
        }))
    }

    /// Number of positions with a label.
    pub fn label_count(&self) -> usize {
        self.trained
            .iter()
            .skip(1)
            .filter(|&&trained| trained)
            .count()
    }
}

/// Model inputs for one batch.
#[derive(Debug)]
pub struct Batch {
    /// `[batch, time]` token ids.
    pub input_ids: Tensor,
    /// `[batch, time]` next-token targets, [`IGNORE`] where there is no label.
    pub labels: Tensor,
    /// `[batch, time]` 1 for real tokens, 0 for padding (padded batches only).
    pub attention_mask: Option<Tensor>,
    /// `[batch, time]` which document each position belongs to (packed batches only).
    pub document_ids: Option<Tensor>,
    /// `[batch, time]` positions that restart at every document (packed batches only).
    pub position_ids: Option<Tensor>,
    /// Positions that carry a label.
    pub label_count: usize,
    /// Positions that hold a real token.
    pub token_count: usize,
}

/// Inputs and targets of one example: input `ids[..n-1]`, target `ids[t + 1]` where the
/// assistant wrote it.
fn shifted(example: &Example) -> (Vec<i64>, Vec<i64>) {
    let length = example.ids.len().saturating_sub(1);
    let inputs = example.ids[..length]
        .iter()
        .map(|&id| i64::from(id))
        .collect();
    let targets = (1..=length)
        .map(|next| {
            if example.trained[next] {
                i64::from(example.ids[next])
            } else {
                IGNORE
            }
        })
        .collect();
    (inputs, targets)
}

fn matrix(values: Vec<i64>, rows: usize, device: Device) -> Tensor {
    Tensor::from_slice(&values)
        .view([rows as i64, (values.len() / rows.max(1)) as i64])
        .to_device(device)
}

/// Pads `examples` on the right to the longest, with `pad_id` inputs and no labels.
pub fn padded_batch(examples: &[&Example], pad_id: u32, device: Device) -> Batch {
    let width = examples
        .iter()
        .map(|example| example.ids.len().saturating_sub(1))
        .max()
        .unwrap_or(0)
        .max(1);
    let (mut inputs, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    let (mut label_count, mut token_count) = (0, 0);
    for example in examples {
        let (row_inputs, row_targets) = shifted(example);
        let real = row_inputs.len();
        token_count += real;
        label_count += row_targets.iter().filter(|&&t| t != IGNORE).count();
        inputs.extend(row_inputs);
        inputs.extend(std::iter::repeat_n(i64::from(pad_id), width - real));
        labels.extend(row_targets);
        labels.extend(std::iter::repeat_n(IGNORE, width - real));
        mask.extend(std::iter::repeat_n(1, real));
        mask.extend(std::iter::repeat_n(0, width - real));
    }
    let rows = examples.len();
    Batch {
        input_ids: matrix(inputs, rows, device),
        labels: matrix(labels, rows, device),
        attention_mask: Some(matrix(mask, rows, device)),
        document_ids: None,
        position_ids: None,
        label_count,
        token_count,
    }
}

/// Packs `examples` one after another into rows of `row_length` positions, starting a new row
/// when the next one does not fit (so none is split). Positions restart at every document and
/// the document ids keep attention inside each; the tail of a row is padding, document `-1`.
pub fn packed_batch(
    examples: &[&Example],
    pad_id: u32,
    row_length: usize,
    device: Device,
) -> Batch {
    let mut rows: Vec<PackedRow> = Vec::new();
    let (mut label_count, mut token_count) = (0, 0);
    for (document, example) in examples.iter().enumerate() {
        let (inputs, targets) = shifted(example);
        let length = inputs.len().min(row_length);
        let fits = rows
            .last()
            .is_some_and(|row| row.inputs.len() + length <= row_length);
        if !fits {
            rows.push(PackedRow::default());
        }
        let Some(row) = rows.last_mut() else { continue };
        token_count += length;
        label_count += targets[..length].iter().filter(|&&t| t != IGNORE).count();
        row.inputs.extend(&inputs[..length]);
        row.labels.extend(&targets[..length]);
        row.documents
            .extend(std::iter::repeat_n(document as i64, length));
        row.positions.extend(0..length as i64);
    }
    let width = rows
        .iter()
        .map(|row| row.inputs.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut merged = PackedRow::default();
    for row in &rows {
        let pad = width - row.inputs.len();
        for (target, values, filler) in [
            (&mut merged.inputs, &row.inputs, i64::from(pad_id)),
            (&mut merged.labels, &row.labels, IGNORE),
            (&mut merged.documents, &row.documents, -1),
            (&mut merged.positions, &row.positions, 0),
        ] {
            target.extend(values);
            target.extend(std::iter::repeat_n(filler, pad));
        }
    }
    let count = rows.len();
    Batch {
        input_ids: matrix(merged.inputs, count, device),
        labels: matrix(merged.labels, count, device),
        attention_mask: None,
        document_ids: Some(matrix(merged.documents, count, device)),
        position_ids: Some(matrix(merged.positions, count, device)),
        label_count,
        token_count,
    }
}

/// One packed row being filled.
#[derive(Debug, Default)]
struct PackedRow {
    inputs: Vec<i64>,
    labels: Vec<i64>,
    documents: Vec<i64>,
    positions: Vec<i64>,
}
