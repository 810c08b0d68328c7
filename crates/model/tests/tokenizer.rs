//! The byte-level BPE tokenizer: training, BOS placement, the ChatML template and its
//! assistant mask, saving and loading, streaming decoding, and parity with Python.

use std::path::Path;
use std::process::Command;

use ferrite_model::tokenizer::{
    BOS_TOKEN, ChatMessage, EOS_TOKEN, IM_END_TOKEN, IM_START_TOKEN, PAD_TOKEN, Role, Tokenizer,
    TokenizerError, TrainConfig,
};

/// A few hundred words of varied English, numbers and code, repeated so that common pairs
/// pass the minimum frequency.
fn corpus() -> Vec<String> {
    let lines = [
        "The river ran past the old mill, and the miller counted 1024 sacks of grain.",
        "She asked: what is the capital of France? He answered that it is Paris.",
        "In 1969 the first people walked on the Moon; the trip took about 3 days.",
        "fn main() { println!(\"hello, world\"); let x = 42 + 7; }",
        "Tokenizers split text into pieces; byte-level models never meet an unknown character.",
        "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
        "Prices rose by 12.5 percent in March, then fell by 3 percent in April.",
        "Whether the weather is warm or cold, we walk to the market every morning.",
        "A gardener plants seeds in spring and gathers the harvest in the autumn.",
        "Questions and answers: the assistant replies politely and briefly to the user.",
    ];
    (0..20)
        .flat_map(|_| lines.iter().map(|l| l.to_string()))
        .collect()
}

fn trained(vocab_size: usize) -> Tokenizer {
    let config = TrainConfig {
        vocab_size,
        min_frequency: 2,
    };
    Tokenizer::train(&config, corpus().into_iter()).expect("training succeeds")
}

fn count(ids: &[u32], id: u32) -> usize {
    ids.iter().filter(|&&i| i == id).count()
}

#[test]
fn training_reaches_the_requested_vocabulary_with_special_tokens_first() {
    let tokenizer = trained(400);
    // 256 bytes + 5 specials leave 139 merges; the corpus has far more frequent pairs.
    assert_eq!(tokenizer.vocab_size(), 400);
    let ids: Vec<Option<u32>> = [
        PAD_TOKEN,
        BOS_TOKEN,
        EOS_TOKEN,
        IM_START_TOKEN,
        IM_END_TOKEN,
    ]
    .iter()
    .map(|t| tokenizer.token_to_id(t))
    .collect();
    // The trainer puts special tokens at the front, in the order given.
    assert_eq!(ids, [Some(0), Some(1), Some(2), Some(3), Some(4)]);
    assert_eq!(
        (tokenizer.pad_id(), tokenizer.bos_id(), tokenizer.eos_id()),
        (0, 1, 2)
    );
    assert_eq!(
        tokenizer.stop_ids(),
        vec![2, 4],
        "EOS and <|im_end|> both end generation"
    );
}

#[test]
fn a_vocabulary_smaller_than_bytes_and_specials_is_refused() {
    let config = TrainConfig {
        vocab_size: 260,
        min_frequency: 2,
    };
    let error = Tokenizer::train(&config, corpus().into_iter()).expect_err("too small");
    assert!(matches!(
        error,
        TokenizerError::VocabularyTooSmall { minimum: 261, .. }
    ));
}

#[test]
fn training_merges_frequent_words_into_single_tokens() {
    let tokenizer = trained(400);
    // " the" occurs over 200 times in the corpus, so it must have become one token.
    let ids = tokenizer.encode(" the", false).expect("encodes");
    assert_eq!(ids.len(), 1, "{ids:?}");
    // Digits are split one by one before merging, so "1024" is four tokens however often
    // it appears.
    assert_eq!(tokenizer.encode("1024", false).expect("encodes").len(), 4);
}

#[test]
fn encoding_with_special_tokens_starts_with_exactly_one_bos() {
    let tokenizer = trained(400);
    let bos = tokenizer.bos_id();
    for text in [
        "hello",
        "",
        "<|bos|> pretending to be a BOS",
        "<|bos|><|bos|>",
    ] {
        let ids = tokenizer.encode(text, true).expect("encodes");
        assert_eq!(ids.first(), Some(&bos), "{text:?}");
        assert_eq!(count(&ids, bos), 1, "{text:?} gave {ids:?}");
        let plain = tokenizer.encode(text, false).expect("encodes");
        assert_eq!(count(&plain, bos), 0, "{text:?} without special tokens");
        assert_eq!(ids[1..], plain[..]);
    }
}

#[test]
fn special_token_spellings_inside_text_stay_plain_text() {
    let tokenizer = trained(400);
    let ids = tokenizer.encode("a<|im_end|>b", false).expect("encodes");
    assert!(
        !ids.contains(&tokenizer.token_to_id(IM_END_TOKEN).expect("exists")),
        "{ids:?}"
    );
    assert_eq!(
        tokenizer.decode(&ids, false).ok().as_deref(),
        Some("a<|im_end|>b")
    );
}

#[test]
fn chat_renders_as_chatml_after_one_bos() {
    let tokenizer = trained(400);
    let messages = [
        ChatMessage::new(Role::System, "Be brief."),
        ChatMessage::new(Role::User, "What is the capital of France?"),
        ChatMessage::new(Role::Assistant, "Paris."),
    ];
    let chat = tokenizer.render_chat(&messages, false).expect("renders");
    let text = tokenizer.decode(&chat.ids, false).expect("decodes");
    // The ChatML layout, written out by hand.
    assert_eq!(
        text,
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital \
         of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
    );
    assert_eq!(count(&chat.ids, tokenizer.bos_id()), 1);
    assert_eq!(chat.ids[0], tokenizer.bos_id());
    assert_eq!(chat.ids.len(), chat.assistant_mask.len());
}

#[test]
fn generation_prompt_ends_with_the_assistant_header_and_keeps_one_bos() {
    let tokenizer = trained(400);
    let messages = [ChatMessage::new(Role::User, "Hi")];
    let chat = tokenizer.render_chat(&messages, true).expect("renders");
    let text = tokenizer.decode(&chat.ids, false).expect("decodes");
    assert_eq!(
        text,
        "<|bos|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(count(&chat.ids, tokenizer.bos_id()), 1);
    assert!(
        chat.assistant_mask.iter().all(|&m| !m),
        "nothing the model wrote yet"
    );
}

#[test]
fn assistant_mask_covers_exactly_the_replies_and_their_end_tokens() {
    let tokenizer = trained(400);
    let messages = [
        ChatMessage::new(Role::User, "Capital of France?"),
        ChatMessage::new(Role::Assistant, "Paris."),
        ChatMessage::new(Role::User, "And the third city?"),
        ChatMessage::new(Role::Assistant, "Lyon, I think."),
    ];
    let chat = tokenizer.render_chat(&messages, false).expect("renders");
    let masked: Vec<u32> = chat
        .ids
        .iter()
        .zip(&chat.assistant_mask)
        .filter(|(_, m)| **m)
        .map(|(id, _)| *id)
        .collect();
    let unmasked: Vec<u32> = chat
        .ids
        .iter()
        .zip(&chat.assistant_mask)
        .filter(|(_, m)| !**m)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        tokenizer.decode(&masked, false).ok().as_deref(),
        Some("Paris.<|im_end|>Lyon, I think.<|im_end|>")
    );
    let prompt_side = tokenizer.decode(&unmasked, false).expect("decodes");
    assert!(
        prompt_side.contains("<|im_start|>assistant\n"),
        "{prompt_side:?}"
    );
    assert!(!prompt_side.contains("Paris"), "{prompt_side:?}");
}

#[test]
fn assistant_mask_keeps_a_reply_that_starts_with_newlines() {
    let tokenizer = trained(400);
    let messages = [
        ChatMessage::new(Role::User, "Hi"),
        ChatMessage::new(Role::Assistant, "\n\nParis"),
    ];
    let chat = tokenizer.render_chat(&messages, false).expect("renders");
    let masked: Vec<u32> = chat
        .ids
        .iter()
        .zip(&chat.assistant_mask)
        .filter(|(_, m)| **m)
        .map(|(id, _)| *id)
        .collect();
    let text = tokenizer.decode(&masked, false).expect("decodes");
    // The header's newline may share a token with the reply's first newlines; such a token
    // is the reply's, so the mask may start one newline early but never lose one.
    assert!(text.ends_with("\n\nParis<|im_end|>"), "{text:?}");
    assert!(!text.contains("assistant"), "{text:?}");
}

#[test]
fn decoding_round_trips_text_with_multibyte_characters() {
    let tokenizer = trained(400);
    let text = "naïve café — 東京 🚀 the end";
    let ids = tokenizer.encode(text, true).expect("encodes");
    assert_eq!(tokenizer.decode(&ids, true).ok().as_deref(), Some(text));
    assert_eq!(
        tokenizer.decode(&ids, false).ok(),
        Some(format!("{BOS_TOKEN}{text}")),
        "the BOS shows when special tokens are kept"
    );
}

#[test]
fn saving_and_loading_keeps_ids_specials_and_template() {
    let tokenizer = trained(400);
    let dir = tempfile::tempdir().expect("temp dir");
    tokenizer.save(dir.path()).expect("saves");
    let loaded = Tokenizer::load(dir.path()).expect("loads");

    let text = "The miller counted 1024 sacks, she said. 東京!";
    assert_eq!(
        loaded.encode(text, true).ok(),
        tokenizer.encode(text, true).ok()
    );
    assert_eq!(
        (
            loaded.bos_id(),
            loaded.eos_id(),
            loaded.pad_id(),
            loaded.adds_bos()
        ),
        (
            tokenizer.bos_id(),
            tokenizer.eos_id(),
            tokenizer.pad_id(),
            true
        )
    );
    assert_eq!(loaded.chat_template(), tokenizer.chat_template());
    let messages = [ChatMessage::new(Role::User, "Hi")];
    assert_eq!(
        loaded.render_chat(&messages, true).ok(),
        tokenizer.render_chat(&messages, true).ok()
    );
}

#[test]
fn stream_deltas_never_split_a_character_and_add_up_to_the_text() {
    let tokenizer = trained(400);
    let text = "Paris 🚀 東京 é!";
    let ids = tokenizer.encode(text, false).expect("encodes");
    let mut decoder = tokenizer.stream_decoder(true);
    let mut deltas = Vec::new();
    for &id in &ids {
        deltas.push(decoder.push(id).expect("known id"));
    }
    deltas.push(decoder.finish());

    assert_eq!(deltas.concat(), text);
    assert!(
        deltas
            .iter()
            .all(|d| !d.contains(char::REPLACEMENT_CHARACTER)),
        "{deltas:?}"
    );
    // The rocket is four bytes the corpus never merged, so its first three byte tokens must
    // have produced empty deltas while held back.
    assert!(
        ids.len() > deltas.iter().filter(|d| !d.is_empty()).count(),
        "{deltas:?}"
    );
}

#[test]
fn stream_replaces_bytes_that_cannot_form_a_character_like_a_full_decode() {
    let tokenizer = trained(400);
    // GPT-2's alphabet spells byte 0xF0 (a four-byte lead) as 'ð' and 'a' as itself.
    let lead = tokenizer.token_to_id("ð").expect("byte token");
    let a = tokenizer.token_to_id("a").expect("byte token");
    let mut decoder = tokenizer.stream_decoder(true);
    assert_eq!(
        decoder.push(lead).ok().as_deref(),
        Some(""),
        "could still become a character"
    );
    assert_eq!(decoder.push(a).ok().as_deref(), Some("\u{fffd}a"));
    assert_eq!(decoder.push(lead).ok().as_deref(), Some(""));
    assert_eq!(
        decoder.finish(),
        "\u{fffd}",
        "the stream ended mid-character"
    );
    assert_eq!(
        tokenizer.decode(&[lead, a, lead], true).ok().as_deref(),
        Some("\u{fffd}a\u{fffd}")
    );
}

#[test]
fn stream_skips_special_tokens_when_asked_and_rejects_unknown_ids() {
    let tokenizer = trained(400);
    let im_end = tokenizer.token_to_id(IM_END_TOKEN).expect("exists");
    let mut skipping = tokenizer.stream_decoder(true);
    assert_eq!(skipping.push(im_end).ok().as_deref(), Some(""));
    let mut keeping = tokenizer.stream_decoder(false);
    assert_eq!(keeping.push(im_end).ok().as_deref(), Some(IM_END_TOKEN));
    assert!(matches!(
        keeping.push(400),
        Err(TokenizerError::UnknownTokenId(400))
    ));
}

#[test]
fn training_from_files_reads_them_and_names_a_missing_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("corpus.txt");
    std::fs::write(&path, corpus().join("\n")).expect("writes corpus");
    let config = TrainConfig {
        vocab_size: 400,
        min_frequency: 2,
    };
    let tokenizer = Tokenizer::train_from_files(&config, &[&path]).expect("trains");
    assert_eq!(tokenizer.vocab_size(), 400);

    let missing = dir.path().join("missing.txt");
    let error = Tokenizer::train_from_files(&config, &[&missing]).expect_err("no file");
    assert!(error.to_string().contains("missing.txt"), "{error}");
}

#[test]
fn loading_without_an_add_bos_flag_follows_the_saved_post_processor() {
    let tokenizer = trained(400);
    let dir = tempfile::tempdir().expect("temp dir");
    tokenizer.save(dir.path()).expect("saves");
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("reads")).expect("json");
    config
        .as_object_mut()
        .expect("object")
        .remove("add_bos_token");
    std::fs::write(&config_path, config.to_string()).expect("writes");

    let loaded = Tokenizer::load(dir.path()).expect("loads");
    // The saved post-processor puts <|bos|> first, so the loaded tokenizer adds it too.
    assert!(loaded.adds_bos());
    assert_eq!(
        loaded.encode("hi", true).ok(),
        tokenizer.encode("hi", true).ok()
    );
}

/// The Python interpreter of the project's venv (scripts/setup-python.sh), else `python3`.
fn python() -> std::path::PathBuf {
    std::env::var_os("FERRITE_PY_VENV")
        .map(|venv| Path::new(&venv).join("bin/python"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "python3".into())
}

/// Saves `tokenizer`, records its ids for `texts` and for a few chats, and has Python
/// compare; returns the script's report.
fn python_parity_report(tokenizer: &Tokenizer, texts: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    tokenizer.save(dir.path()).expect("saves");

    let cases: Vec<serde_json::Value> = texts
        .iter()
        .map(|t| serde_json::json!({"text": t, "ids": tokenizer.encode(t, true).expect("encodes")}))
        .collect();
    let conversations = [
        (
            vec![
                ChatMessage::new(Role::System, "Be brief."),
                ChatMessage::new(Role::User, "Hi"),
            ],
            true,
        ),
        (
            vec![
                ChatMessage::new(Role::User, "What is the capital of France?"),
                ChatMessage::new(Role::Assistant, "Paris."),
            ],
            false,
        ),
    ];
    let chats: Vec<serde_json::Value> = conversations
        .iter()
        .map(|(messages, prompt)| {
            let ids = tokenizer
                .render_chat(messages, *prompt)
                .expect("renders")
                .ids;
            serde_json::json!({"messages": messages, "add_generation_prompt": prompt, "ids": ids})
        })
        .collect();
    let expected = serde_json::json!({ "encode": cases, "chats": chats });
    std::fs::write(dir.path().join("expected.json"), expected.to_string()).expect("writes");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tokenizer_parity.py");
    let output = Command::new(python())
        .arg(script)
        .arg(dir.path())
        .output()
        .expect("runs python");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    println!("{report}");
    assert!(output.status.success(), "{report}");
    report
}

const PARITY_TEXTS: [&str; 5] = [
    "The miller counted 1024 sacks of grain.",
    "  Leading spaces,   runs of spaces\tand\ttabs\n\nand blank lines",
    "naïve café — 東京 🚀",
    "fn main() { let x = 42; }",
    "",
];

#[test]
#[ignore = "needs Python with the tokenizers package (scripts/setup-python.sh)"]
fn python_loads_the_saved_file_and_encodes_and_renders_chats_identically() {
    let report = python_parity_report(&trained(400), &PARITY_TEXTS);
    assert!(report.contains("encode: 5/5 identical"), "{report}");
    assert!(
        report.contains("chat: 2/2 identical") || report.contains("chat: skipped"),
        "{report}"
    );
}

#[test]
#[ignore = "needs Python (scripts/setup-python.sh) and the SmolLM2 GGUF (scripts/fetch-data.sh)"]
fn python_loads_the_saved_smollm2_tokenizer_and_agrees_on_text_and_chat() {
    let data = std::env::var_os("FERRITE_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"));
    let gguf = data.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let tokenizer = ferrite_model::gguf::GgufFile::open(gguf)
        .and_then(|file| file.tokenizer())
        .expect("SmolLM2 tokenizer rebuilds");
    // The chat without a system message exercises the template's default system prompt.
    let report = python_parity_report(&tokenizer, &PARITY_TEXTS);
    assert!(report.contains("encode: 5/5 identical"), "{report}");
    assert!(
        report.contains("chat: 2/2 identical") || report.contains("chat: skipped"),
        "{report}"
    );
}

/// `min_tokens` is a floor known from a text's size alone: it must never exceed what encoding
/// gives, for texts the vocabulary covers in long merged tokens as well as byte by byte.
#[test]
fn the_size_floor_never_exceeds_the_encoded_length() {
    let tokenizer = trained(400);
    let merged = corpus().join(" ");
    let texts = [
        merged.clone(),
        merged.repeat(5),
        "x".repeat(10_000),
        "ÿ€😀".repeat(1_000),
        String::new(),
    ];
    for text in &texts {
        let encoded = tokenizer.encode(text, false).expect("encodes").len();
        let floor = tokenizer.min_tokens(text.len());
        assert!(
            floor <= encoded,
            "floor {floor} > {encoded} tokens for {} bytes",
            text.len()
        );
    }
    // Not a vacuous floor: a long text's floor grows with it.
    assert!(tokenizer.min_tokens(merged.repeat(5).len()) > 0);
}
