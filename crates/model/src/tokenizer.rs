//! Byte-level BPE tokenizers: training on a corpus, a ChatML chat template with an assistant
//! mask for supervised fine-tuning, Hugging Face-compatible files, and streaming decoding.
//!
//! Every text a caller passes in is encoded as plain text: a special token's spelling inside
//! it (say a user typing `<|im_end|>`) is split like any other text and never becomes the
//! special token. Special tokens only come from the methods that place them on purpose.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

/// Marks the start of every encoded document when the tokenizer adds one.
pub const BOS_TOKEN: &str = "<|bos|>";
/// Ends a pretraining document.
pub const EOS_TOKEN: &str = "<|eos|>";
/// Fills batches to equal length; never trained on.
pub const PAD_TOKEN: &str = "<|pad|>";
/// Opens a chat turn, followed by the role and a newline (ChatML).
pub const IM_START_TOKEN: &str = "<|im_start|>";
/// Closes a chat turn; generation of a reply stops here.
pub const IM_END_TOKEN: &str = "<|im_end|>";

/// Special tokens of a trained tokenizer, in id order from 0.
const TRAINED_SPECIAL_TOKENS: [&str; 5] = [
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
];

/// The Jinja chat template written to `tokenizer_config.json` for trained tokenizers, so that
/// Hugging Face `apply_chat_template` renders the same ids as [`Tokenizer::render_chat`].
pub const CHATML_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// What went wrong building, loading or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizers library failed to {action}: {source}")]
    Library {
        action: &'static str,
        #[source]
        source: tokenizers::Error,
    },
    #[error("cannot read or write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    InvalidFile { path: PathBuf, reason: String },
    #[error(
        "a vocabulary of {requested} is too small: the 256 bytes and {specials} special tokens need {minimum}"
    )]
    VocabularyTooSmall {
        requested: usize,
        specials: usize,
        minimum: usize,
    },
    #[error("token {0:?} is not in the vocabulary")]
    MissingToken(String),
    #[error("token id {0} is outside the vocabulary")]
    UnknownTokenId(u32),
    #[error("this tokenizer has no {IM_START_TOKEN} and {IM_END_TOKEN} tokens for chat")]
    NoChatTokens,
    #[error("invalid vocabulary: {0}")]
    InvalidVocabulary(String),
}

fn library(action: &'static str) -> impl FnOnce(tokenizers::Error) -> TokenizerError {
    move |source| TokenizerError::Library { action, source }
}

/// How text is split into words before BPE merges apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// GPT-2's byte-level split (letters, numbers, punctuation, spaces), no prefix space.
    ByteLevel,
    /// Every digit on its own first, then GPT-2's split; SmolLM's choice, and ours, because
    /// arithmetic is easier to learn when numbers are spelled digit by digit.
    DigitsThenByteLevel,
}

impl PreTokenizerKind {
    fn build(self) -> PreTokenizerWrapper {
        let byte_level = ByteLevel::new(false, true, true);
        match self {
            Self::ByteLevel => byte_level.into(),
            Self::DigitsThenByteLevel => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
        }
    }
}

/// Settings for [`Tokenizer::train`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Total vocabulary including the 256 byte tokens and the special tokens.
    pub vocab_size: usize,
    /// A pair seen fewer times than this is never merged.
    pub min_frequency: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            min_frequency: 2,
        }
    }
}

/// A byte-level BPE vocabulary as another format stores it (GGUF, for one), to be rebuilt
/// into a [`Tokenizer`]. Tokens are spelled in GPT-2's byte-to-character alphabet.
#[derive(Debug, Clone, PartialEq)]
pub struct BpeVocabulary {
    /// Token strings by id.
    pub tokens: Vec<String>,
    /// Merges in priority order, highest first.
    pub merges: Vec<(String, String)>,
    /// Per id: a control token, matched whole and skipped when decoding without specials.
    pub special: Vec<bool>,
    /// Per id: a user-defined token, matched whole in text but decoded as text.
    pub user_defined: Vec<bool>,
    pub bos_id: u32,
    pub eos_id: u32,
    /// `None` pads with the EOS token, as most chat models do.
    pub pad_id: Option<u32>,
    /// Whether encoding with special tokens starts with BOS.
    pub add_bos: bool,
    pub pre_tokenizer: PreTokenizerKind,
    /// The Jinja chat template to carry along into `tokenizer_config.json`.
    pub chat_template: Option<String>,
}

/// Who said a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role as spelled in the ChatML header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` saying `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatEncoding {
    pub ids: Vec<u32>,
    /// True for tokens an assistant wrote, including the `<|im_end|>` that closes each
    /// reply (so the model learns to stop); false for everything the model is given.
    pub assistant_mask: Vec<bool>,
}

/// The bytes every token id decodes to, shared by streaming decoders.
#[derive(Debug)]
struct TokenPieces {
    bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
}

/// A byte-level BPE tokenizer with BOS, EOS and PAD tokens and a ChatML chat format.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// Encodes with special-token matching switched off; see the module documentation.
    inner: HfTokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    add_bos: bool,
    chat_ids: Option<(u32, u32)>,
    chat_template: Option<String>,
    default_system_prompt: Option<String>,
    pieces: Arc<TokenPieces>,
    /// The most bytes of input one token can stand for; see [`Tokenizer::min_tokens`].
    max_bytes_per_token: usize,
}

/// How many times shorter a normalizer can make a text: Unicode composition (NFC, NFKC)
/// folds at most three code points into one of no more bytes (a Hangul syllable from its
/// three jamo, 9 bytes to 3). Byte-level tokenizers use no other kind of normalizer.
const NORMALIZER_SHRINK: usize = 3;

/// The largest `tokenizer.json` or `tokenizer_config.json` [`Tokenizer::load`] reads, and the
/// largest JSON file the model registry accepts. The biggest a real model needs is its
/// `tokenizer.json`: about 9 MB for Llama 3's 128k vocabulary, about 33 MB for Gemma 3's 262k;
/// configs are kilobytes. Twice Gemma 3's leaves room for a larger vocabulary and bounds what
/// one file can make a loader hold.
pub const MAX_JSON_BYTES: u64 = 64 * 1024 * 1024;

/// Reads the JSON file at `path`, refusing one over [`MAX_JSON_BYTES`] before a byte of it is
/// read. The size is taken from the open file, so it is the file that is then read.
fn read_json_file(path: &Path) -> Result<String, TokenizerError> {
    let io = |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let size_bytes = file.metadata().map_err(io)?.len();
    if size_bytes > MAX_JSON_BYTES {
        return Err(TokenizerError::InvalidFile {
            path: path.to_path_buf(),
            reason: format!(
                "{size_bytes} bytes is more than the {MAX_JSON_BYTES} a tokenizer file may hold"
            ),
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

/// What [`Tokenizer::load`] reads of `tokenizer_config.json`. Every other field is skipped by
/// serde without being built, so parsing holds about the file's bytes rather than a tree many
/// times their size (a `serde_json::Value` of a long number array costs about 17 times).
#[derive(serde::Deserialize)]
struct TokenizerConfigFile {
    #[serde(default)]
    bos_token: ConfigValue,
    #[serde(default)]
    eos_token: ConfigValue,
    #[serde(default)]
    pad_token: ConfigValue,
    #[serde(default)]
    add_bos_token: ConfigValue,
    #[serde(default)]
    chat_template: ConfigValue,
}

/// One field of `tokenizer_config.json`, kept only as far as [`Tokenizer::load`] uses it:
/// Hugging Face writes a special token as its text or as an `AddedToken` object with its text
/// in `content`, a flag as a bool, and a chat template as a string (or a list of named ones,
/// which is not used). Arrays, numbers and an object's other fields are skipped unbuilt.
#[derive(Debug, Default, PartialEq)]
enum ConfigValue {
    /// Missing or `null`.
    #[default]
    Absent,
    Bool(bool),
    Text(String),
    /// An object, with its `content` when that is a string.
    Object(Option<String>),
    /// A number or an array.
    Other,
}

impl<'de> serde::Deserialize<'de> for ConfigValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ConfigValueVisitor)
    }
}

struct ConfigValueVisitor;

impl<'de> serde::de::Visitor<'de> for ConfigValueVisitor {
    type Value = ConfigValue;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Absent)
    }

    fn visit_none<E>(self) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Absent)
    }

    fn visit_bool<E>(self, flag: bool) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Bool(flag))
    }

    fn visit_str<E>(self, text: &str) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Text(text.to_owned()))
    }

    fn visit_string<E>(self, text: String) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Text(text))
    }

    fn visit_i64<E>(self, _: i64) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Other)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ConfigValue, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(ConfigValue::Other)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ConfigValue, A::Error> {
        // As with a JSON object read whole, a repeated `content` counts as its last value.
        let mut content = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "content" {
                content = match map.next_value::<ConfigValue>()? {
                    ConfigValue::Text(text) => Some(text),
                    _ => None,
                };
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(ConfigValue::Object(content))
    }
}

impl Tokenizer {
    /// Trains a tokenizer on an iterator of texts.
    pub fn train<I, S>(config: &TrainConfig, corpus: I) -> Result<Self, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let (mut inner, mut trainer) = untrained(config)?;
        inner
            .train(&mut trainer, corpus)
            .map_err(library("train on the corpus"))?;
        Self::from_trained(inner)
    }

    /// Trains a tokenizer on text files, read line by line.
    pub fn train_from_files(
        config: &TrainConfig,
        files: &[impl AsRef<Path>],
    ) -> Result<Self, TokenizerError> {
        let (mut inner, mut trainer) = untrained(config)?;
        let mut names = Vec::with_capacity(files.len());
        for file in files {
            let path = file.as_ref();
            // Checked here so that a missing file is an error naming it, not a bare io error.
            std::fs::metadata(path).map_err(|source| TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            names.push(path.to_string_lossy().into_owned());
        }
        inner
            .train_from_files(&mut trainer, names)
            .map_err(library("train on the files"))?;
        Self::from_trained(inner)
    }

    fn from_trained(mut inner: HfTokenizer) -> Result<Self, TokenizerError> {
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingToken(token.into()))
        };
        let bos_id = id(BOS_TOKEN)?;
        let eos_id = id(EOS_TOKEN)?;
        let pad_id = id(PAD_TOKEN)?;
        inner.with_post_processor(Some(bos_processor(BOS_TOKEN, bos_id)?));
        Self::assemble(
            inner,
            bos_id,
            eos_id,
            pad_id,
            true,
            Some(CHATML_TEMPLATE.to_owned()),
        )
    }

    /// Rebuilds a tokenizer from a vocabulary and merges stored elsewhere.
    pub fn from_bpe_vocabulary(vocabulary: BpeVocabulary) -> Result<Self, TokenizerError> {
        let count = vocabulary.tokens.len();
        if vocabulary.special.len() != count || vocabulary.user_defined.len() != count {
            return Err(TokenizerError::InvalidVocabulary(format!(
                "{count} tokens but {} special flags and {} user-defined flags",
                vocabulary.special.len(),
                vocabulary.user_defined.len()
            )));
        }
        let mut vocab = HashMap::with_capacity(count);
        for (id, token) in vocabulary.tokens.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| {
                TokenizerError::InvalidVocabulary(format!("{count} tokens do not fit u32 ids"))
            })?;
            if vocab.insert(token.clone(), id).is_some() {
                return Err(TokenizerError::InvalidVocabulary(format!(
                    "token {token:?} appears twice"
                )));
            }
        }
        let check = |id: u32| {
            if (id as usize) < count {
                Ok(id)
            } else {
                Err(TokenizerError::UnknownTokenId(id))
            }
        };
        let bos_id = check(vocabulary.bos_id)?;
        let eos_id = check(vocabulary.eos_id)?;
        let pad_id = check(vocabulary.pad_id.unwrap_or(vocabulary.eos_id))?;

        let model = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), vocabulary.merges)
            .build()
            .map_err(|e| TokenizerError::InvalidVocabulary(e.to_string()))?;
        let mut inner = HfTokenizer::new(model);
        inner.with_pre_tokenizer(Some(vocabulary.pre_tokenizer.build()));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added = |flags: &[bool], special: bool| -> Vec<AddedToken> {
            vocabulary
                .tokens
                .iter()
                .zip(flags)
                .filter(|(_, flag)| **flag)
                .map(|(token, _)| AddedToken::from(token.clone(), special).normalized(false))
                .collect()
        };
        inner.add_special_tokens(&added(&vocabulary.special, true));
        inner.add_tokens(&added(&vocabulary.user_defined, false));
        if vocabulary.add_bos {
            let bos = &vocabulary.tokens[bos_id as usize];
            inner.with_post_processor(Some(bos_processor(bos, bos_id)?));
        }
        Self::assemble(
            inner,
            bos_id,
            eos_id,
            pad_id,
            vocabulary.add_bos,
            vocabulary.chat_template,
        )
    }

    fn assemble(
        mut inner: HfTokenizer,
        bos_id: u32,
        eos_id: u32,
        pad_id: u32,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Result<Self, TokenizerError> {
        inner.set_encode_special_tokens(true);
        let chat_ids = inner
            .token_to_id(IM_START_TOKEN)
            .zip(inner.token_to_id(IM_END_TOKEN));
        let default_system_prompt = chat_template
            .as_deref()
            .and_then(default_system_prompt_of_template);
        let pieces = Arc::new(token_pieces(&inner));
        let longest = pieces.bytes.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let shrink = if inner.get_normalizer().is_some() {
            NORMALIZER_SHRINK
        } else {
            1
        };
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
            add_bos,
            chat_ids,
            chat_template,
            default_system_prompt,
            pieces,
            max_bytes_per_token: longest * shrink,
        })
    }

    /// The fewest tokens a text of `bytes` bytes can encode to, known without encoding it:
    /// byte-level BPE covers every byte of the (normalized) text with exactly one token, and
    /// no token stands for more bytes than the longest in the vocabulary. A server checks a
    /// prompt against its context with this before paying for encoding it (time and memory
    /// grow with the text, and a 16 MB prompt costs seconds and gigabytes to find too long).
    pub fn min_tokens(&self, bytes: usize) -> usize {
        bytes / self.max_bytes_per_token
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`, the pair that
    /// Hugging Face `AutoTokenizer.from_pretrained(dir)` loads.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<(), TokenizerError> {
        let dir = dir.as_ref();
        let io = |path: PathBuf| move |source| TokenizerError::Io { path, source };
        std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
        self.inner
            .save(dir.join("tokenizer.json"), true)
            .map_err(library("write tokenizer.json"))?;

        let token = |id: u32| self.inner.id_to_token(id);
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(self.bos_id),
            "eos_token": token(self.eos_id),
            "pad_token": token(self.pad_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
        });
        if let (Some(template), Some(object)) = (&self.chat_template, config.as_object_mut()) {
            object.insert("chat_template".into(), template.clone().into());
        }
        let path = dir.join("tokenizer_config.json");
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| TokenizerError::InvalidFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        std::fs::write(&path, text).map_err(io(path.clone()))
    }

    /// Reads a folder written by [`Tokenizer::save`] (or by Hugging Face for a byte-level BPE
    /// model): `tokenizer.json` plus the special tokens named in `tokenizer_config.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref();
        let text = read_json_file(&dir.join("tokenizer.json"))?;
        let inner = text
            .parse::<HfTokenizer>()
            .map_err(library("read tokenizer.json"))?;
        let path = dir.join("tokenizer_config.json");
        let text = read_json_file(&path)?;
        let invalid = |reason: String| TokenizerError::InvalidFile {
            path: path.clone(),
            reason,
        };
        let config: TokenizerConfigFile =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        drop(text);

        let special_id = |key: &str, value: ConfigValue| -> Result<Option<u32>, TokenizerError> {
            let spelled = match value {
                ConfigValue::Absent => return Ok(None),
                ConfigValue::Text(spelled) | ConfigValue::Object(Some(spelled)) => spelled,
                _ => return Err(invalid(format!("{key} is neither a string nor a token"))),
            };
            inner
                .token_to_id(&spelled)
                .map(Some)
                .ok_or(TokenizerError::MissingToken(spelled))
        };
        let bos_id = special_id("bos_token", config.bos_token)?
            .ok_or_else(|| invalid("no bos_token".into()))?;
        let eos_id = special_id("eos_token", config.eos_token)?
            .ok_or_else(|| invalid("no eos_token".into()))?;
        let pad_id = special_id("pad_token", config.pad_token)?.unwrap_or(eos_id);
        // Without the flag, the post-processor decides, as it does for Python: see whether it
        // puts BOS in front of an empty text.
        let add_bos = match config.add_bos_token {
            ConfigValue::Bool(flag) => flag,
            _ => {
                inner
                    .encode("", true)
                    .map_err(library("encode an empty text"))?
                    .get_ids()
                    .first()
                    == Some(&bos_id)
            }
        };
        // Only a single template is carried; a list of named ones is left unused.
        let chat_template = match config.chat_template {
            ConfigValue::Text(template) => Some(template),
            _ => None,
        };
        Self::assemble(inner, bos_id, eos_id, pad_id, add_bos, chat_template)
    }

    /// Encodes text; with `add_special_tokens` it starts with BOS when this tokenizer adds
    /// one. Special tokens spelled inside `text` stay plain text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if add_special_tokens && self.add_bos {
            ids.push(self.bos_id);
        }
        // The BOS is placed by hand rather than by the post-processor so that no path can
        // add a second one; the saved post-processor does the same for Python.
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(library("encode text"))?;
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, replacing incomplete UTF-8 with U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let mut decoder = self.stream_decoder(skip_special_tokens);
        let mut text = String::new();
        for &id in ids {
            text.push_str(&decoder.push(id)?);
        }
        text.push_str(&decoder.finish());
        Ok(text)
    }

    /// Renders a conversation in ChatML, `<|im_start|>role\ncontent<|im_end|>\n` per message,
    /// after one BOS when this tokenizer adds one and the default system prompt when the
    /// conversation has none. `add_generation_prompt` appends `<|im_start|>assistant\n`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<ChatEncoding, TokenizerError> {
        let (im_start, im_end) = self.chat_ids.ok_or(TokenizerError::NoChatTokens)?;
        let mut out = ChatEncoding {
            ids: Vec::new(),
            assistant_mask: Vec::new(),
        };
        // A tokenizer whose BOS is <|im_start|> (SmolLM's) begins every chat with it anyway.
        if self.add_bos && self.bos_id != im_start {
            out.ids.push(self.bos_id);
            out.assistant_mask.push(false);
        }

        let default_system = match (messages.first(), &self.default_system_prompt) {
            (Some(first), Some(prompt)) if first.role != Role::System => {
                Some(ChatMessage::new(Role::System, prompt.clone()))
            }
            _ => None,
        };
        for message in default_system.iter().chain(messages) {
            let assistant = message.role == Role::Assistant;
            out.ids.push(im_start);
            out.assistant_mask.push(false);
            // Header and content are one piece, as Hugging Face's template renders them;
            // tokens reaching past the header belong to the reply.
            let header_len = message.role.as_str().len() + 1;
            let piece = format!("{}\n{}", message.role.as_str(), message.content);
            let encoding = self
                .inner
                .encode(piece, false)
                .map_err(library("encode a message"))?;
            for (&id, &(_, end)) in encoding.get_ids().iter().zip(encoding.get_offsets()) {
                out.ids.push(id);
                out.assistant_mask.push(assistant && end > header_len);
            }
            out.ids.push(im_end);
            out.assistant_mask.push(assistant);
            self.push_plain(&mut out, "\n")?;
        }
        if add_generation_prompt {
            out.ids.push(im_start);
            out.assistant_mask.push(false);
            self.push_plain(&mut out, "assistant\n")?;
        }
        Ok(out)
    }

    fn push_plain(&self, out: &mut ChatEncoding, text: &str) -> Result<(), TokenizerError> {
        let ids = self.encode(text, false)?;
        out.assistant_mask
            .extend(std::iter::repeat_n(false, ids.len()));
        out.ids.extend(ids);
        Ok(())
    }

    /// A decoder that turns ids, one at a time, into text deltas.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder {
            pieces: Arc::clone(&self.pieces),
            skip_special_tokens,
            pending: Vec::new(),
        }
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token spelled exactly `token`, special tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id that starts a document (SmolLM's is `<|im_start|>`).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The id that ends a document or, for chat models whose EOS is `<|im_end|>`, a turn.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id that fills batches; EOS when the vocabulary names no pad token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Whether encoding with special tokens, and chat rendering, start with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Ids at which generation should stop: EOS, and `<|im_end|>` when it is another token.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.eos_id];
        if let Some((_, im_end)) = self.chat_ids
            && im_end != self.eos_id
        {
            ids.push(im_end);
        }
        ids
    }

    /// The Jinja chat template saved with the tokenizer, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The system prompt the chat template inserts when a conversation has none.
    pub fn default_system_prompt(&self) -> Option<&str> {
        self.default_system_prompt.as_deref()
    }

    /// The underlying `tokenizers` tokenizer, for what this wrapper does not expose.
    pub fn inner(&self) -> &HfTokenizer {
        &self.inner
    }
}

/// Turns token ids into text as they arrive, holding back the bytes of a character split
/// across tokens until it is complete, so no delta ever contains half a character.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    pieces: Arc<TokenPieces>,
    skip_special_tokens: bool,
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds one id and returns the text it completes, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let index = id as usize;
        let bytes = self
            .pieces
            .bytes
            .get(index)
            .ok_or(TokenizerError::UnknownTokenId(id))?;
        if !(self.skip_special_tokens && self.pieces.special[index]) {
            self.pending.extend_from_slice(bytes);
        }
        Ok(self.take_complete())
    }

    /// Ends the stream: bytes still held back can no longer complete a character and come out
    /// as U+FFFD, as in a full decode.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }

    fn take_complete(&mut self) -> String {
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(valid) => {
                    text.push_str(valid);
                    self.pending.clear();
                    return text;
                }
                Err(error) => {
                    let valid = error.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match error.error_len() {
                        // Bytes that no continuation can repair: emit one replacement, as
                        // a full decode would, and carry on after them.
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        // The start of a character whose remaining bytes are yet to come.
                        None => {
                            self.pending.drain(..valid);
                            return text;
                        }
                    }
                }
            }
        }
    }
}

fn untrained(config: &TrainConfig) -> Result<(HfTokenizer, TrainerWrapper), TokenizerError> {
    let specials = TRAINED_SPECIAL_TOKENS.len();
    let minimum = 256 + specials;
    if config.vocab_size < minimum {
        return Err(TokenizerError::VocabularyTooSmall {
            requested: config.vocab_size,
            specials,
            minimum,
        });
    }
    let trainer = BpeTrainer::builder()
        .vocab_size(config.vocab_size)
        .min_frequency(config.min_frequency)
        .show_progress(false)
        .special_tokens(
            TRAINED_SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true).normalized(false))
                .collect(),
        )
        // All 256 bytes up front, so any text encodes even if the corpus lacks a byte.
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut inner = HfTokenizer::new(BPE::default());
    inner.with_pre_tokenizer(Some(PreTokenizerKind::DigitsThenByteLevel.build()));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok((inner, TrainerWrapper::BpeTrainer(trainer)))
}

/// A post-processor that starts single texts and pairs with one BOS, so Python's
/// `tokenizer.encode(text)` matches [`Tokenizer::encode`] with special tokens.
fn bos_processor(bos: &str, bos_id: u32) -> Result<TemplateProcessing, TokenizerError> {
    let invalid = |e: String| TokenizerError::InvalidVocabulary(e);
    let mut builder = TemplateProcessing::builder();
    builder.try_single(format!("{bos} $A")).map_err(invalid)?;
    builder
        .try_pair(format!("{bos} $A $B:1"))
        .map_err(invalid)?;
    builder.special_tokens(vec![(bos, bos_id)]);
    builder.build().map_err(|e| invalid(e.to_string()))
}

/// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, and the other
/// bytes, in order, for the characters from U+0100 on. Returns the byte each character means.
fn byte_of_char() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut next = 0u32;
    let mut map = HashMap::with_capacity(256);
    for byte in 0..=255u8 {
        let c = if printable(byte) {
            char::from(byte)
        } else {
            next += 1;
            // 256 + (at most 68) is always a valid scalar value.
            char::from_u32(255 + next).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, byte);
    }
    map
}

fn token_pieces(inner: &HfTokenizer) -> TokenPieces {
    let byte_of = byte_of_char();
    let added = inner.get_added_tokens_decoder();
    let count = inner.get_vocab_size(true);
    let mut pieces = TokenPieces {
        bytes: Vec::with_capacity(count),
        special: vec![false; count],
    };
    for id in 0..count as u32 {
        let bytes = match (added.get(&id), inner.id_to_token(id)) {
            // Added tokens decode to their own spelling, not through the byte alphabet.
            (Some(token), _) => {
                pieces.special[id as usize] = token.special;
                token.content.as_bytes().to_vec()
            }
            (None, Some(token)) => {
                let mut bytes = Vec::with_capacity(token.len());
                for c in token.chars() {
                    match byte_of.get(&c) {
                        Some(&b) => bytes.push(b),
                        None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                bytes
            }
            // A gap in the ids decodes to nothing.
            (None, None) => Vec::new(),
        };
        pieces.bytes.push(bytes);
    }
    pieces
}

/// Finds the system prompt a ChatML Jinja template inserts when the first message is not
/// a system message (SmolLM's does: `{% if loop.first and messages[0]['role'] != 'system' %}`).
/// Only that shape is recognised; other templates yield `None`.
fn default_system_prompt_of_template(template: &str) -> Option<String> {
    let condition = template.find("messages[0]['role'] != 'system'")?;
    let after = &template[condition..];
    // The newline inside the Jinja string literal is either a real one or the escape `\n`.
    for (marker, escaped) in [
        ("<|im_start|>system\n", false),
        ("<|im_start|>system\\n", true),
    ] {
        if let Some(start) = after.find(marker) {
            let rest = &after[start + marker.len()..];
            let end = rest.find(IM_END_TOKEN)?;
            let prompt = &rest[..end];
            return Some(if escaped {
                prompt.replace("\\n", "\n")
            } else {
                prompt.to_owned()
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer saved to a fresh folder, trained on just enough text to hold its specials.
    fn saved() -> tempfile::TempDir {
        let config = TrainConfig {
            vocab_size: 300,
            min_frequency: 1,
        };
        let tokenizer = Tokenizer::train(&config, ["a small corpus"].iter()).expect("trains");
        let dir = tempfile::tempdir().expect("temp dir");
        tokenizer.save(dir.path()).expect("saves");
        dir
    }

    #[test]
    fn a_tokenizer_file_over_the_cap_is_refused_before_it_is_read() {
        // Sparse files of zeros one byte past the cap: were either read, the refusal would be
        // a JSON syntax error instead of giving its size.
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let dir = saved();
            let path = dir.path().join(name);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|file| file.set_len(MAX_JSON_BYTES + 1))
                .expect("a sparse file");
            match Tokenizer::load(dir.path()) {
                Err(TokenizerError::InvalidFile {
                    path: refused,
                    reason,
                }) => {
                    assert_eq!(refused, path);
                    assert!(
                        reason.contains(&(MAX_JSON_BYTES + 1).to_string()),
                        "{reason}"
                    );
                }
                other => panic!("{name} over the cap was not refused by size: {other:?}"),
            }
        }
    }

    #[test]
    fn a_config_is_read_for_its_tokens_flag_and_template_only() {
        // Each field in the shape the whole-tree reading accepted: an AddedToken object for
        // BOS, plain text for EOS, a null PAD (which falls back to EOS), a flag that is not a
        // bool (so the post-processor decides), and a list of named templates (not used).
        // The long array is what a `Value` tree made many times larger; it is skipped.
        let dir = saved();
        let config = serde_json::json!({
            "bos_token": {"content": BOS_TOKEN, "lstrip": false},
            "eos_token": EOS_TOKEN,
            "pad_token": null,
            "add_bos_token": "yes",
            "chat_template": [{"name": "default", "template": "{{ x }}"}],
            "padding": vec![1; 1000],
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string())
            .expect("writes");
        let loaded = Tokenizer::load(dir.path()).expect("loads");
        assert_eq!(
            loaded.bos_id,
            loaded.inner.token_to_id(BOS_TOKEN).expect("bos")
        );
        assert_eq!(
            loaded.eos_id,
            loaded.inner.token_to_id(EOS_TOKEN).expect("eos")
        );
        assert_eq!(loaded.pad_id, loaded.eos_id);
        // A trained tokenizer's saved post-processor puts BOS first.
        assert!(loaded.add_bos);
        assert_eq!(loaded.chat_template, None);
    }

    #[test]
    fn a_special_token_that_is_neither_text_nor_a_token_object_is_refused() {
        for bos in [
            serde_json::json!(1),
            serde_json::json!([BOS_TOKEN]),
            serde_json::json!({"content": 1}),
        ] {
            let dir = saved();
            let config = serde_json::json!({"bos_token": bos, "eos_token": EOS_TOKEN});
            std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string())
                .expect("writes");
            match Tokenizer::load(dir.path()) {
                Err(TokenizerError::InvalidFile { reason, .. }) => {
                    assert_eq!(reason, "bos_token is neither a string nor a token", "{bos}");
                }
                other => panic!("{bos} was accepted as bos_token: {other:?}"),
            }
        }
    }
}
