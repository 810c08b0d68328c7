//! GGUF reading and importing, on files built byte by byte here and on the real
//! SmolLM2-135M-Instruct file when it has been fetched.

use std::path::{Path, PathBuf};

use ferrite_model::gguf::{
    self, GgmlType, GgufErrorKind, GgufFile, MetadataValue, TensorInfo, unpermute_rotary_rows,
};
use ferrite_model::tokenizer::ChatMessage;
use ferrite_model::tokenizer::Role;

/// Writes GGUF v3 files for tests, independently of the reader: fields in the order the
/// format specifies, tensors at aligned offsets.
struct GgufWriter {
    version: u32,
    alignment: usize,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    fn new() -> Self {
        Self {
            version: 3,
            alignment: 32,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn meta(mut self, key: &str, value: MetadataValue) -> Self {
        self.metadata.push((key.into(), value));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.into(), dims.to_vec(), ggml_type, data));
        self
    }

    fn f32_tensor(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, 0, data)
    }

    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            out.extend(type_id(value).to_le_bytes());
            put_value(&mut out, value);
        }

        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ggml_type, data) in &self.tensors {
            put_string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ggml_type.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len()).next_multiple_of(self.alignment);
        }

        let data_start = out.len().next_multiple_of(self.alignment);
        out.resize(data_start, 0);
        for ((_, _, _, data), offset) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + offset, 0);
            out.extend(data);
        }
        out
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(value: &MetadataValue) -> u32 {
    match value {
        MetadataValue::U8(_) => 0,
        MetadataValue::I8(_) => 1,
        MetadataValue::U16(_) => 2,
        MetadataValue::I16(_) => 3,
        MetadataValue::U32(_) => 4,
        MetadataValue::I32(_) => 5,
        MetadataValue::F32(_) => 6,
        MetadataValue::Bool(_) => 7,
        MetadataValue::String(_) => 8,
        MetadataValue::Array(_) => 9,
        MetadataValue::U64(_) => 10,
        MetadataValue::I64(_) => 11,
        MetadataValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, value: &MetadataValue) {
    match value {
        MetadataValue::U8(v) => out.extend(v.to_le_bytes()),
        MetadataValue::I8(v) => out.extend(v.to_le_bytes()),
        MetadataValue::U16(v) => out.extend(v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend(v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend(v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend(v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend(v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(u8::from(*v)),
        MetadataValue::String(s) => put_string(out, s),
        MetadataValue::Array(items) => {
            // An empty array's element type does not matter; uint8 is as good as any.
            out.extend(items.first().map_or(0, type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        MetadataValue::U64(v) => out.extend(v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend(v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend(v.to_le_bytes()),
    }
}

fn string(s: &str) -> MetadataValue {
    MetadataValue::String(s.into())
}

fn strings(items: &[&str]) -> MetadataValue {
    MetadataValue::Array(items.iter().map(|s| string(s)).collect())
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, gguf::GgufError> {
    GgufFile::from_bytes("test.gguf", bytes)
}

fn kind_of(bytes: Vec<u8>) -> GgufErrorKind {
    match parse(bytes) {
        Ok(file) => panic!("expected an error, parsed {file:?}"),
        Err(error) => {
            assert!(
                error.to_string().contains("test.gguf"),
                "error names the file: {error}"
            );
            match error.kind() {
                GgufErrorKind::Truncated {
                    what,
                    offset,
                    needed,
                    file_len,
                } => GgufErrorKind::Truncated {
                    what: what.clone(),
                    offset: *offset,
                    needed: *needed,
                    file_len: *file_len,
                },
                other => GgufErrorKind::Malformed(other.to_string()),
            }
        }
    }
}

/// A small file with one decodable tensor whose data ends the file.
fn small_file() -> Vec<u8> {
    GgufWriter::new()
        .meta("general.architecture", string("llama"))
        .meta("general.name", string("tiny"))
        .f32_tensor("output_norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0])
        .build()
}

#[test]
fn metadata_of_every_type_reads_back_as_written() {
    let values = vec![
        ("u8", MetadataValue::U8(200)),
        ("i8", MetadataValue::I8(-100)),
        ("u16", MetadataValue::U16(60_000)),
        ("i16", MetadataValue::I16(-30_000)),
        ("u32", MetadataValue::U32(4_000_000_000)),
        ("i32", MetadataValue::I32(-2_000_000_000)),
        ("f32", MetadataValue::F32(0.5)),
        ("bool", MetadataValue::Bool(true)),
        ("string", string("naïve 東京")),
        ("u64", MetadataValue::U64(u64::MAX)),
        ("i64", MetadataValue::I64(i64::MIN)),
        ("f64", MetadataValue::F64(-1e300)),
        (
            "ints",
            MetadataValue::Array(vec![MetadataValue::I32(1), MetadataValue::I32(-2)]),
        ),
        ("strings", strings(&["a", "", "c d"])),
        (
            "nested",
            MetadataValue::Array(vec![
                MetadataValue::Array(vec![MetadataValue::U8(1), MetadataValue::U8(2)]),
                MetadataValue::Array(vec![MetadataValue::U8(3)]),
            ]),
        ),
    ];
    let mut writer = GgufWriter::new();
    for (key, value) in &values {
        writer = writer.meta(key, value.clone());
    }
    let file = parse(writer.build()).expect("valid file");

    assert_eq!(file.version(), 3);
    let read: Vec<_> = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    assert_eq!(read, values);
    assert_eq!(file.get("u8").and_then(MetadataValue::as_u64), Some(200));
    assert_eq!(
        file.get("i8").and_then(MetadataValue::as_u64),
        None,
        "negative is not a count"
    );
    assert!(file.tensors().is_empty());
}

#[test]
fn tensor_infos_give_row_major_shapes_and_data_starts_at_the_default_alignment() {
    let values: Vec<f32> = (0..6).map(|v| v as f32).collect();
    let bytes = GgufWriter::new()
        .meta("general.name", string("x"))
        .f32_tensor("a", &[3, 2], &values)
        .f32_tensor("b", &[1], &[7.5])
        .build();
    let file = parse(bytes).expect("valid file");

    assert_eq!(
        file.alignment(),
        32,
        "no general.alignment, so the format's default"
    );
    assert_eq!(file.data_offset() % 32, 0);
    let a = file.tensor("a").expect("tensor a");
    // ggml lists the innermost dimension first: 2 rows of 3.
    assert_eq!(a.shape(), vec![2, 3]);
    assert_eq!(file.tensor_f32(a).ok(), Some(values));
    let b = file.tensor("b").expect("tensor b");
    assert_eq!(
        b.offset, 32,
        "24 bytes of a, padded to the next multiple of 32"
    );
    assert_eq!(file.tensor_f32(b).ok(), Some(vec![7.5]));
}

#[test]
fn general_alignment_moves_the_data_section_and_tensor_offsets() {
    let mut writer = GgufWriter::new()
        .meta("general.alignment", MetadataValue::U32(64))
        .f32_tensor("a", &[1], &[1.0])
        .f32_tensor("b", &[2], &[2.0, 3.0]);
    writer.alignment = 64;
    let file = parse(writer.build()).expect("valid file");

    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_offset() % 64, 0);
    assert_eq!(file.tensor("b").map(|t| t.offset), Some(64));
    let b = file.tensor("b").expect("tensor b");
    assert_eq!(file.tensor_f32(b).ok(), Some(vec![2.0, 3.0]));
}

#[test]
fn wrong_magic_is_reported_with_the_bytes_found() {
    let mut bytes = small_file();
    bytes[..4].copy_from_slice(b"GGML");
    let error = parse(bytes).expect_err("not GGUF");
    assert!(matches!(error.kind(), GgufErrorKind::BadMagic { found } if found == b"GGML"));
    assert!(error.to_string().contains("test.gguf"));
}

#[test]
fn versions_other_than_three_are_refused() {
    for version in [1u32, 2, 4] {
        let mut bytes = small_file();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let error = parse(bytes).expect_err("unsupported version");
        assert!(
            matches!(error.kind(), GgufErrorKind::UnsupportedVersion(v) if *v == version),
            "{error}"
        );
    }
}

#[test]
fn every_truncation_of_a_file_is_an_error_and_never_a_panic() {
    let bytes = small_file();
    for len in 0..bytes.len() {
        assert!(
            parse(bytes[..len].to_vec()).is_err(),
            "a prefix of {len} bytes parsed"
        );
    }
    assert!(parse(bytes).is_ok());
}

#[test]
fn tensor_data_cut_off_by_truncation_names_the_tensor() {
    let mut bytes = small_file();
    bytes.truncate(bytes.len() - 1);
    let error = parse(bytes).expect_err("last float cut");
    match error.kind() {
        GgufErrorKind::TensorOutOfBounds {
            tensor,
            end,
            file_len,
            ..
        } => {
            assert_eq!(tensor, "output_norm.weight");
            assert_eq!(*end, *file_len + 1, "one byte short");
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn flipping_any_header_byte_gives_an_error_or_a_file_but_no_panic() {
    let bytes = small_file();
    let data_start = bytes.len() - 16;
    for at in 0..data_start {
        let mut corrupt = bytes.clone();
        corrupt[at] ^= 0xff;
        // Either outcome is fine; reaching the next iteration means nothing panicked.
        let _ = parse(corrupt);
    }
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    // 2^64 - 1 metadata entries cannot fit in the few bytes that follow.
    let mut bytes = small_file();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(kind_of(bytes), GgufErrorKind::Truncated { .. }));

    // An array claiming 2^60 elements of uint32.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    put_string(&mut bytes, "big");
    bytes.extend(9u32.to_le_bytes());
    bytes.extend(4u32.to_le_bytes());
    bytes.extend((1u64 << 60).to_le_bytes());
    assert!(matches!(kind_of(bytes), GgufErrorKind::Truncated { .. }));
}

#[test]
fn unknown_value_types_bad_bools_and_bad_alignments_are_malformed() {
    let with_raw_value = |type_id: u32, payload: &[u8]| {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        put_string(&mut bytes, "key");
        bytes.extend(type_id.to_le_bytes());
        bytes.extend(payload);
        bytes
    };
    let message = |bytes| match kind_of(bytes) {
        GgufErrorKind::Malformed(message) => message,
        other => panic!("expected malformed, got {other}"),
    };
    assert!(message(with_raw_value(13, &[0; 8])).contains("unknown value type 13"));
    assert!(message(with_raw_value(7, &[2])).contains("bool"));

    for alignment in [0u32, 3, 48] {
        let bytes = GgufWriter::new()
            .meta("general.alignment", MetadataValue::U32(alignment))
            .build();
        assert!(
            message(bytes).contains("alignment"),
            "alignment {alignment}"
        );
    }
}

#[test]
fn a_key_or_tensor_name_given_twice_is_malformed() {
    let twice_key = GgufWriter::new()
        .meta("general.name", string("a"))
        .meta("general.name", string("b"))
        .build();
    assert!(
        matches!(kind_of(twice_key), GgufErrorKind::Malformed(m) if m.contains("general.name"))
    );
    let twice_tensor = GgufWriter::new()
        .f32_tensor("x", &[1], &[1.0])
        .f32_tensor("x", &[1], &[2.0])
        .build();
    assert!(matches!(kind_of(twice_tensor), GgufErrorKind::Malformed(m) if m.contains("tensor x")));
}

#[test]
fn misaligned_and_out_of_file_tensor_offsets_are_errors() {
    let mut bytes = small_file();
    // The tensor offset is the last 8 bytes of the only tensor info, 16 bytes of data and
    // the padding before them come after it; find it by searching for the name instead.
    let name_at = bytes
        .windows(18)
        .position(|w| w == b"output_norm.weight")
        .expect("name is in the file");
    let offset_at = name_at + 18 + 4 + 8 + 4;
    bytes[offset_at..offset_at + 8].copy_from_slice(&8u64.to_le_bytes());
    assert!(
        matches!(kind_of(bytes.clone()), GgufErrorKind::Malformed(m) if m.contains("alignment"))
    );

    bytes[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let error = parse(bytes).expect_err("offset past the end");
    assert!(
        matches!(error.kind(), GgufErrorKind::TensorOutOfBounds { tensor, .. } if tensor == "output_norm.weight")
    );
}

#[test]
fn undecodable_tensor_types_are_listed_but_refused_when_read() {
    let bytes = GgufWriter::new()
        .meta("general.name", string("x"))
        .tensor("blk.0.ffn_up.weight", &[256, 1], 14, vec![0; 210])
        .tensor("blk.0.ffn_down.weight", &[32, 1], 99, vec![0; 4])
        .build();
    let file = parse(bytes).expect("listing works whatever the types");
    let types: Vec<GgmlType> = file.tensors().iter().map(|t| t.ggml_type).collect();
    assert_eq!(types, vec![GgmlType::Other(14), GgmlType::Other(99)]);

    let q6 = file.tensor("blk.0.ffn_up.weight").expect("listed");
    let error = file.tensor_f32(q6).expect_err("Q6_K is not decoded");
    let message = error.to_string();
    assert!(
        message.contains("blk.0.ffn_up.weight") && message.contains("Q6_K"),
        "{message}"
    );
    let unknown = file.tensor("blk.0.ffn_down.weight").expect("listed");
    let message = file.tensor_f32(unknown).expect_err("type 99").to_string();
    assert!(message.contains("99 (unknown)"), "{message}");
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    let error = GgufFile::open("/nonexistent/model.gguf").expect_err("no such file");
    assert!(matches!(error.kind(), GgufErrorKind::Io(_)));
    assert!(error.to_string().contains("/nonexistent/model.gguf"));
}

// ---- importing a tiny Llama written here ----

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 64;

/// The tokens of the tiny model: three ChatML specials, then byte-level letters and merges.
/// "Ġ" is GPT-2's spelling of the space byte and "Ċ" of the newline.
const TOKENS: [&str; 20] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "h",
    "i",
    "Ġ",
    "Ċ",
    "u",
    "s",
    "e",
    "r",
    "hi",
    "Ġh",
    "Ġhi",
    "us",
    "user",
    "y",
    "t",
    "m",
    "er",
];
const MERGES: [&str; 6] = ["Ġ h", "h i", "Ġh i", "u s", "e r", "us er"];

/// llama.cpp's row order for q and k: within each head, pairs (first half i, second half i).
fn permute_like_llama_cpp(hf: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let half = hf.len() / cols / heads / 2;
    let mut out = Vec::new();
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let row = h * 2 * half + j * half + i;
                out.extend_from_slice(&hf[row * cols..(row + 1) * cols]);
            }
        }
    }
    out
}

fn pattern(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + seed * 13) % 23) as f32 - 11.0)
        .collect()
}

/// A Q8_0 encoding of integer values in [-127, 127] with scale 1, so it decodes exactly.
fn q8_0_of_integers(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        out.extend([0x00, 0x3c]); // f16 1.0
        out.extend(block.iter().map(|&v| (v as i8) as u8));
    }
    out
}

fn tiny_llama(tied: bool) -> GgufWriter {
    let u32v = MetadataValue::U32;
    let token_types: Vec<MetadataValue> = (0..TOKENS.len())
        .map(|i| MetadataValue::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let mut writer = GgufWriter::new()
        .meta("general.architecture", string("llama"))
        .meta("llama.block_count", u32v(1))
        .meta("llama.context_length", u32v(256))
        .meta("llama.embedding_length", u32v(HIDDEN as u32))
        .meta("llama.feed_forward_length", u32v(FFN as u32))
        .meta("llama.attention.head_count", u32v(HEADS as u32))
        .meta("llama.attention.head_count_kv", u32v(KV_HEADS as u32))
        .meta("llama.rope.freq_base", MetadataValue::F32(100_000.0))
        .meta("llama.attention.layer_norm_rms_epsilon", MetadataValue::F32(1e-5))
        .meta("tokenizer.ggml.model", string("gpt2"))
        .meta("tokenizer.ggml.pre", string("smollm"))
        .meta("tokenizer.ggml.tokens", strings(&TOKENS))
        .meta("tokenizer.ggml.merges", strings(&MERGES))
        .meta("tokenizer.ggml.token_type", MetadataValue::Array(token_types))
        .meta("tokenizer.ggml.bos_token_id", u32v(1))
        .meta("tokenizer.ggml.eos_token_id", u32v(2))
        .meta("tokenizer.ggml.padding_token_id", u32v(2))
        .meta("tokenizer.ggml.add_bos_token", MetadataValue::Bool(false))
        .meta(
            "tokenizer.chat_template",
            string("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nhi<|im_end|>\n' }}{% endif %}{% endfor %}"),
        );
    let vocab = TOKENS.len();
    let (h, f) = (HIDDEN as u64, FFN as u64);
    writer = writer
        .f32_tensor(
            "token_embd.weight",
            &[h, vocab as u64],
            &pattern(HIDDEN * vocab, 1),
        )
        .f32_tensor("blk.0.attn_norm.weight", &[h], &pattern(HIDDEN, 2))
        .f32_tensor(
            "blk.0.attn_q.weight",
            &[h, h],
            &permute_like_llama_cpp(&pattern(HIDDEN * HIDDEN, 3), HEADS, HIDDEN),
        )
        .f32_tensor(
            "blk.0.attn_k.weight",
            &[h, (KV_HEADS * HEAD_DIM) as u64],
            &permute_like_llama_cpp(&pattern(KV_HEADS * HEAD_DIM * HIDDEN, 4), KV_HEADS, HIDDEN),
        )
        .f32_tensor(
            "blk.0.attn_v.weight",
            &[h, (KV_HEADS * HEAD_DIM) as u64],
            &pattern(KV_HEADS * HEAD_DIM * HIDDEN, 5),
        )
        .f32_tensor(
            "blk.0.attn_output.weight",
            &[h, h],
            &pattern(HIDDEN * HIDDEN, 6),
        )
        .f32_tensor("blk.0.ffn_norm.weight", &[h], &pattern(HIDDEN, 7))
        .f32_tensor("blk.0.ffn_gate.weight", &[h, f], &pattern(HIDDEN * FFN, 8))
        .f32_tensor("blk.0.ffn_up.weight", &[h, f], &pattern(HIDDEN * FFN, 9))
        .tensor(
            "blk.0.ffn_down.weight",
            &[f, h],
            8,
            q8_0_of_integers(&pattern(FFN * HIDDEN, 10)),
        )
        .f32_tensor("output_norm.weight", &[h], &pattern(HIDDEN, 11));
    if !tied {
        writer = writer.f32_tensor(
            "output.weight",
            &[h, vocab as u64],
            &pattern(HIDDEN * vocab, 12),
        );
    }
    writer
}

fn import_bytes(bytes: Vec<u8>) -> gguf::ImportedModel {
    parse(bytes)
        .and_then(|file| file.import())
        .expect("tiny llama imports")
}

#[test]
fn tiny_llama_imports_with_hugging_face_names_shapes_and_unpermuted_projections() {
    let model = import_bytes(tiny_llama(true).build());

    let names: Vec<&str> = model.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.norm.weight",
        ]
    );
    let tensor = |name: &str| model.tensor(name).unwrap_or_else(|| panic!("{name}"));
    // The values written before llama.cpp's permutation come back.
    let q = tensor("model.layers.0.self_attn.q_proj.weight");
    assert_eq!(q.shape, vec![HIDDEN, HIDDEN]);
    assert_eq!(q.values, pattern(HIDDEN * HIDDEN, 3));
    let k = tensor("model.layers.0.self_attn.k_proj.weight");
    assert_eq!(k.shape, vec![KV_HEADS * HEAD_DIM, HIDDEN]);
    assert_eq!(k.values, pattern(KV_HEADS * HEAD_DIM * HIDDEN, 4));
    // v is not rotated, so it is stored and read unchanged.
    assert_eq!(
        tensor("model.layers.0.self_attn.v_proj.weight").values,
        pattern(KV_HEADS * HEAD_DIM * HIDDEN, 5)
    );
    let down = tensor("model.layers.0.mlp.down_proj.weight");
    assert_eq!(down.shape, vec![HIDDEN, FFN]);
    assert_eq!(
        down.values,
        pattern(FFN * HIDDEN, 10),
        "Q8_0 with scale 1 holds integers exactly"
    );
    assert_eq!(
        tensor("model.embed_tokens.weight").shape,
        vec![TOKENS.len(), HIDDEN]
    );
}

#[test]
fn tiny_llama_config_comes_from_llama_metadata() {
    let model = import_bytes(tiny_llama(true).build());
    let config = &model.config;
    assert_eq!(
        (
            config.vocab_size,
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers
        ),
        (TOKENS.len(), HIDDEN, FFN, 1)
    );
    assert_eq!(
        (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim
        ),
        (HEADS, KV_HEADS, HEAD_DIM)
    );
    assert_eq!(config.max_position_embeddings, 256);
    assert_eq!(config.rope_theta, 100_000.0);
    assert_eq!(config.rms_norm_eps, 1e-5);
    assert!(config.tie_word_embeddings, "no output.weight in the file");
    assert_eq!(
        (
            config.bos_token_id,
            config.eos_token_id,
            config.pad_token_id
        ),
        (Some(1), Some(2), Some(2))
    );

    let json = config.to_hf_json();
    assert_eq!(json["architectures"][0], "LlamaForCausalLM");
    assert_eq!(json["num_key_value_heads"], 2);
    assert_eq!(json["rms_norm_eps"], 1e-5);
    assert_eq!(json["tie_word_embeddings"], true);
}

#[test]
fn an_output_projection_becomes_lm_head_and_unties_the_embeddings() {
    let model = import_bytes(tiny_llama(false).build());
    assert!(!model.config.tie_word_embeddings);
    let head = model.tensor("lm_head.weight").expect("lm_head present");
    assert_eq!(head.shape, vec![TOKENS.len(), HIDDEN]);
    assert_eq!(head.values, pattern(HIDDEN * TOKENS.len(), 12));
}

#[test]
fn tiny_llama_tokenizer_applies_merges_and_keeps_chatml_tokens_whole() {
    let model = import_bytes(tiny_llama(true).build());
    let tokenizer = &model.tokenizer;
    // "hi hi" splits into "hi" and " hi". The best-ranked merge applies first: "hi" takes
    // "h i" (11); " hi" takes "Ġ h" then "Ġh i" (13). Were "h i" ranked first, " hi" would
    // end as "Ġ" "hi", since no merge joins those two.
    assert_eq!(
        tokenizer.encode("hi hi", true).ok(),
        Some(vec![11, 13]),
        "no BOS: add_bos_token is false"
    );
    assert_eq!(
        tokenizer.decode(&[11, 13], false).ok().as_deref(),
        Some("hi hi")
    );
    assert_eq!(
        (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
        (1, 2, 2)
    );
    assert_eq!(tokenizer.default_system_prompt(), Some("hi"));

    // <|im_start|> "user" "Ċ" "hi" <|im_end|> "Ċ" (ids 1 15 6 11 2 6), after the default
    // system turn that the chat template inserts.
    let chat = tokenizer
        .render_chat(&[ChatMessage::new(Role::User, "hi")], false)
        .expect("chat tokens exist");
    assert_eq!(chat.ids[chat.ids.len() - 6..], [1, 15, 6, 11, 2, 6]);
    assert_eq!(
        chat.ids.iter().filter(|&&id| id == 1).count(),
        2,
        "system and user turns"
    );
}

#[test]
fn an_unknown_tensor_name_fails_the_import_naming_it() {
    let bytes = tiny_llama(true)
        .f32_tensor("rope_freqs.weight", &[4], &[1.0; 4])
        .build();
    let error = parse(bytes)
        .and_then(|f| f.import())
        .expect_err("unmapped tensor");
    assert!(
        matches!(error.kind(), GgufErrorKind::UnmappedTensor(name) if name == "rope_freqs.weight")
    );
}

#[test]
fn other_architectures_are_refused() {
    let mut writer = tiny_llama(true);
    writer.metadata[0].1 = string("gemma");
    let error = parse(writer.build())
        .and_then(|f| f.import())
        .expect_err("gemma");
    assert!(matches!(error.kind(), GgufErrorKind::UnsupportedArchitecture(a) if a == "gemma"));
}

#[test]
fn rope_scaling_is_refused_rather_than_dropped() {
    let bytes = tiny_llama(true)
        .meta("llama.rope.scaling.type", string("linear"))
        .build();
    let error = parse(bytes)
        .and_then(|f| f.import())
        .expect_err("scaled rope");
    assert!(
        matches!(error.kind(), GgufErrorKind::UnsupportedRopeScaling(kind) if kind == "linear"),
        "{error}"
    );
}

#[test]
fn unpermuting_checks_that_q_rows_match_the_head_count() {
    // A q projection with one head's rows too few cannot be un-permuted.
    assert!(unpermute_rotary_rows(&[0.0; 3 * 8], 2, 8).is_err());
}

// ---- the real SmolLM2-135M-Instruct file ----

fn smollm2_path() -> PathBuf {
    let data = std::env::var_os("FERRITE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"));
    data.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
#[ignore = "needs data/models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-data.sh)"]
fn smollm2_lists_272_tensors_of_the_published_types() {
    let file = GgufFile::open(smollm2_path()).expect("SmolLM2 GGUF opens");
    // Counts published with the file (DATA.md) and by the gguf Python package's reader.
    let count = |t: GgmlType| {
        file.tensors()
            .iter()
            .filter(|i: &&TensorInfo| i.ggml_type == t)
            .count()
    };
    assert_eq!(file.tensors().len(), 272);
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );
    assert_eq!(
        file.tensor("token_embd.weight").map(|t| t.ggml_type),
        Some(GgmlType::Q8_0)
    );
    assert_eq!(
        file.metadata().len(),
        33,
        "the key/value count gguf-py reports for the file"
    );
}

#[test]
#[ignore = "needs data/models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-data.sh)"]
fn smollm2_config_matches_the_published_architecture() {
    let file = GgufFile::open(smollm2_path()).expect("SmolLM2 GGUF opens");
    let config = file.llama_config().expect("llama metadata");
    // The published SmolLM2-135M architecture (DATA.md and the model card).
    assert_eq!(config.num_hidden_layers, 30);
    assert_eq!(config.hidden_size, 576);
    assert_eq!(config.num_attention_heads, 9);
    assert_eq!(config.num_key_value_heads, 3);
    assert_eq!(config.head_dim, 64);
    assert_eq!(config.intermediate_size, 1536);
    assert_eq!(config.max_position_embeddings, 8192);
    assert_eq!(config.rope_theta, 100_000.0);
    assert_eq!(config.rms_norm_eps, 1e-5);
    assert_eq!(config.vocab_size, 49_152);
    assert!(config.tie_word_embeddings);
}

#[test]
#[ignore = "needs data/models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-data.sh)"]
fn smollm2_dequantises_like_the_gguf_python_package() {
    let file = GgufFile::open(smollm2_path()).expect("SmolLM2 GGUF opens");
    // Reference: gguf 0.19.0 (PyPI), `gguf.quants.dequantize(t.data, t.tensor_type)` summed
    // in float64, on this same file.
    let cases = [
        (
            "token_embd.weight",
            [-0.10654449462890625, 0.032978057861328125],
            -15353.04449415207,
        ),
        (
            "blk.0.attn_q.weight",
            [-0.0963134765625, 0.1573486328125],
            59.22322082519531,
        ),
        (
            "blk.29.ffn_down.weight",
            [-0.2733154296875, 0.186279296875],
            49.83570861816406,
        ),
        ("output_norm.weight", [1.7578125, 1.8203125], 1038.33203125),
    ];
    for (name, first, sum) in cases {
        let info = file.tensor(name).expect("tensor present");
        let values = file.tensor_f32(info).expect("decodable");
        assert_eq!(
            [f64::from(values[0]), f64::from(values[1])],
            first,
            "{name}"
        );
        let total: f64 = values.iter().map(|&v| f64::from(v)).sum();
        assert!(
            (total - sum).abs() < 1e-6 * sum.abs().max(1.0),
            "{name}: {total} vs {sum}"
        );
    }
}

#[test]
#[ignore = "needs data/models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-data.sh)"]
fn smollm2_imports_134_5_million_parameters_with_q_rows_unpermuted() {
    let model = gguf::import(smollm2_path()).expect("SmolLM2 imports");
    // 49152 * 576 embeddings + 30 layers * 3,540,096 + 576 final norm, counted by hand from
    // the architecture; the model card rounds it to 134.5M.
    assert_eq!(model.parameter_count(), 134_515_008);
    assert!(model.tensor("lm_head.weight").is_none(), "tied embeddings");
    assert_eq!(model.tensors.len(), 272);

    // Head 0's Hugging Face row 1 (first half, i = 1) is GGUF row 2 (pair i = 1, j = 0).
    // GGUF row 2 starts [-0.1591796875, 0.39794921875, -0.0198974609375] per gguf-py.
    let q = model
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .expect("q");
    assert_eq!(q.shape, vec![576, 576]);
    let as_f64 = |values: &[f32]| values.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    assert_eq!(
        as_f64(&q.values[576..579]),
        [-0.1591796875, 0.39794921875, -0.0198974609375]
    );
    let k = model
        .tensor("model.layers.0.self_attn.k_proj.weight")
        .expect("k");
    assert_eq!(k.shape, vec![192, 576]);
    // k's GGUF row 2 starts [0.203369140625, 0.09136962890625, 0.203369140625] per gguf-py.
    assert_eq!(
        as_f64(&k.values[576..579]),
        [0.203369140625, 0.09136962890625, 0.203369140625]
    );

    // Rows from the other half and another head, as transformers 5's own GGUF loader
    // (`from_pretrained(..., gguf_file=...)`, whose model answers "The capital of France is
    // Paris.") un-permutes them: q row 32 (head 0, second half, i = 0) and k row 100 (head 1,
    // second half, i = 4).
    assert_eq!(
        as_f64(&q.values[32 * 576..32 * 576 + 3]),
        [-0.1173095703125, -0.1173095703125, -0.19281005859375]
    );
    assert_eq!(
        as_f64(&k.values[100 * 576..100 * 576 + 3]),
        [0.2972412109375, -0.07501220703125, 0.54541015625]
    );
}

#[test]
#[ignore = "needs data/models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-data.sh)"]
fn smollm2_tokenizer_encodes_like_the_reference_tokenizers() {
    let file = GgufFile::open(smollm2_path()).expect("SmolLM2 GGUF opens");
    let tokenizer = file.tokenizer().expect("byte-level BPE rebuilds");
    assert_eq!(tokenizer.vocab_size(), 49_152);
    assert_eq!(
        (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
        (1, 2, 2)
    );
    assert!(
        !tokenizer.adds_bos(),
        "the file sets tokenizer.ggml.add_bos_token to false"
    );

    // Reference: transformers 5 (PyPI) rebuilding this file's tokenizer with its GGUF
    // converter, then the `tokenizers` package encoding without special tokens.
    let cases: [(&str, &[u32]); 5] = [
        (
            "What is the capital of France?",
            &[1780, 314, 260, 3575, 282, 4649, 47],
        ),
        (
            "The capital of France is Paris.",
            &[504, 3575, 282, 4649, 314, 7042, 30],
        ),
        (
            "  Hello,   world!\n\nNew line\ttab",
            &[
                216, 38699, 28, 256, 905, 17, 198, 198, 5529, 1761, 197, 15999,
            ],
        ),
        (
            "naïve café — 東京 🚀",
            &[
                3546, 46494, 37366, 1841, 17097, 247, 126, 16736, 122, 15107, 244, 218,
            ],
        ),
        (
            "In the beginning God created the heaven and the earth.",
            &[788, 260, 3616, 1839, 2312, 260, 10419, 284, 260, 3103, 30],
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            tokenizer.encode(text, true).expect("encodes"),
            expected,
            "{text:?}"
        );
        assert_eq!(
            tokenizer.decode(expected, false).ok().as_deref(),
            Some(text)
        );
    }
    // That converter leaves out SmolLM2's digit split (llama.cpp's "smollm" pre-tokenizer and
    // the model's own tokenizer.json both split digits one by one), so numbers were checked
    // against the same converter with a Digits(individual_digits=True) step put in front:
    // " 2024" is "Ġ" then one token per digit.
    assert_eq!(
        tokenizer
            .encode("The year 2024 had 366 days.", false)
            .expect("encodes"),
        [
            504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30
        ]
    );

    // Reference: the `tokenizers` package encoding the chat template's output for one user
    // message, with the template's default system prompt, special tokens matched.
    let chat = tokenizer
        .render_chat(
            &[ChatMessage::new(
                Role::User,
                "What is the capital of France?",
            )],
            true,
        )
        .expect("ChatML tokens exist");
    assert_eq!(
        chat.ids,
        [
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
            520, 9531, 198
        ]
    );
    assert_eq!(tokenizer.stop_ids(), vec![2], "<|im_end|> is the EOS");
}
