//! Reads GGUF v3 files (llama.cpp's single-file model format) and imports Llama models from
//! them as f32 tensors with Hugging Face names, a `config.json` and a rebuilt tokenizer.
//!
//! The layout read here, all little-endian: the magic `GGUF`, a `u32` version, a `u64` tensor
//! count and a `u64` metadata count; then the metadata as (string key, `u32` value type,
//! value) triples, where a string is a `u64` byte length and UTF-8 bytes and an array is an
//! element type, a `u64` length and the elements; then per tensor its name, a `u32` number of
//! dimensions, that many `u64` sizes (innermost first), a `u32` ggml type and a `u64` offset
//! into the data section. The data section starts at the next multiple of the alignment
//! (`general.alignment`, 32 when absent) after the tensor infos.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;

use crate::tokenizer::{BpeVocabulary, PreTokenizerKind, Tokenizer, TokenizerError};

/// The only GGUF version this reader accepts; v1 and v2 differ in integer widths.
pub const SUPPORTED_VERSION: u32 = 3;

/// Tensor data alignment when `general.alignment` is absent, fixed by the format.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Nested arrays deeper than this are treated as corrupt rather than followed, so a crafted
/// file cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// A GGUF file that could not be read or imported; always names the file.
#[derive(Debug, thiserror::Error)]
#[error("GGUF file {}: {kind}", path.display())]
pub struct GgufError {
    path: PathBuf,
    kind: GgufErrorKind,
}

impl GgufError {
    fn new(path: &Path, kind: GgufErrorKind) -> Self {
        Self {
            path: path.to_path_buf(),
            kind,
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What went wrong, for callers that react differently to different problems.
    pub fn kind(&self) -> &GgufErrorKind {
        &self.kind
    }
}

/// What was wrong with a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufErrorKind {
    #[error("cannot read the file: {0}")]
    Io(#[source] std::io::Error),
    #[error("not a GGUF file: starts with bytes {found:02x?} instead of \"GGUF\"")]
    BadMagic { found: Vec<u8> },
    #[error("GGUF version {0} is not supported (only version 3 is read)")]
    UnsupportedVersion(u32),
    #[error("truncated: {what} at byte {offset} needs {needed} bytes, the file has {file_len}")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("tensor {tensor} has ggml type {ggml_type}, which cannot be dequantised here")]
    UnsupportedTensorType { tensor: String, ggml_type: GgmlType },
    #[error(
        "tensor {tensor} data [{start}, {end}) lies past the end of the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("no tensor named {0}")]
    MissingTensor(String),
    #[error("metadata key {0} is missing")]
    MissingKey(String),
    #[error("metadata key {key} holds {found}, expected {expected}")]
    WrongType {
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("architecture {0:?} is not supported (only llama)")]
    UnsupportedArchitecture(String),
    #[error("{0} rope scaling is not supported")]
    UnsupportedRopeScaling(String),
    #[error("tensor {0} has no Hugging Face counterpart known to this importer")]
    UnmappedTensor(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// A ggml tensor element type. Only the types with a dequantiser here have their own variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// Blocks of 32 weights: an f16 scale `d`, then 16 bytes of 4-bit codes; `w = (q - 8) * d`.
    Q4_0,
    /// Blocks of 32 weights: f16 scale `d`, f16 minimum `m`, 16 bytes of codes; `w = q * d + m`.
    Q4_1,
    /// Blocks of 32 weights: an f16 scale `d`, then 32 signed bytes; `w = q * d`.
    Q8_0,
    /// Any other ggml type id (K-quants, I-quants, integers), kept so a file can be listed.
    Other(u32),
}

impl GgmlType {
    /// Interprets a ggml type id from a tensor info.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    /// The ggml type id as stored in the file.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::BF16 => 30,
            Self::Other(id) => id,
        }
    }

    /// The name llama.cpp uses for this type, for messages and listings.
    pub fn name(self) -> &'static str {
        // Names of types this module cannot decode are listed so that an error says
        // "Q6_K" rather than a bare number.
        const OTHER_NAMES: [(u32, &str); 23] = [
            (6, "Q5_0"),
            (7, "Q5_1"),
            (9, "Q8_1"),
            (10, "Q2_K"),
            (11, "Q3_K"),
            (12, "Q4_K"),
            (13, "Q5_K"),
            (14, "Q6_K"),
            (15, "Q8_K"),
            (16, "IQ2_XXS"),
            (17, "IQ2_XS"),
            (18, "IQ3_XXS"),
            (19, "IQ1_S"),
            (20, "IQ4_NL"),
            (21, "IQ3_S"),
            (22, "IQ2_S"),
            (23, "IQ4_XS"),
            (24, "I8"),
            (25, "I16"),
            (26, "I32"),
            (27, "I64"),
            (28, "F64"),
            (29, "IQ1_M"),
        ];
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Other(id) => OTHER_NAMES
                .iter()
                .find(|(known, _)| *known == id)
                .map_or("unknown", |(_, name)| name),
        }
    }

    /// Elements per block and bytes per block, for the types this module can decode.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        match self {
            Self::F32 => Some((1, 4)),
            Self::F16 | Self::BF16 => Some((1, 2)),
            Self::Q4_0 => Some((32, 18)),
            Self::Q4_1 => Some((32, 20)),
            Self::Q8_0 => Some((32, 34)),
            Self::Other(_) => None,
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.id(), self.name())
    }
}

/// One metadata value. Arrays hold values of a single type, possibly arrays themselves.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetadataValue {
    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "uint8",
            Self::I8(_) => "int8",
            Self::U16(_) => "uint16",
            Self::I16(_) => "int16",
            Self::U32(_) => "uint32",
            Self::I32(_) => "int32",
            Self::F32(_) => "float32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "uint64",
            Self::I64(_) => "int64",
            Self::F64(_) => "float64",
        }
    }

    /// Any integer type that holds a non-negative value; writers differ in which width they
    /// use for counts, so readers should not insist on one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type, as i64 when it fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float of either width (integers too, since some writers store e.g. a rope base as one).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The flag, if this is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The llama.cpp name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Sizes in ggml order: innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Sizes in row-major order, outermost first, as PyTorch and safetensors write them.
    pub fn shape(&self) -> Vec<usize> {
        // Every product of dims was checked to fit in usize when the file was parsed.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes the tensor occupies, when its type is one this module decodes.
    pub fn byte_len(&self) -> Option<u64> {
        let (block, block_bytes) = self.ggml_type.block_layout()?;
        // Parsing refused tensors whose size overflows, so saturation never happens here.
        Some((self.element_count() / block as u64).saturating_mul(block_bytes as u64))
    }
}

/// The file's bytes: memory-mapped when read from disk, owned when parsed from a buffer.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}

/// A parsed GGUF file: its metadata and tensor directory, with the tensor bytes left in the
/// mapping until asked for.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| GgufError::new(path, GgufErrorKind::Io(e)))?;
        let map = map_file(&file).map_err(|e| GgufError::new(path, GgufErrorKind::Io(e)))?;
        Self::parse(path, Bytes::Mapped(map))
    }

    /// Parses a file already in memory; `path` only names it in errors.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(path.as_ref(), Bytes::Owned(bytes))
    }

    fn parse(path: &Path, bytes: Bytes) -> Result<Self, GgufError> {
        let layout = parse_layout(&bytes).map_err(|kind| GgufError::new(path, kind))?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            version: layout.version,
            metadata: layout.metadata,
            tensors: layout.tensors,
            alignment: layout.alignment,
            data_offset: layout.data_offset,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (always 3 once parsed).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Alignment of tensor data in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where tensor data begins.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The raw bytes of a tensor, checked against the end of the file.
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> Result<&[u8], GgufError> {
        let fail = |kind| GgufError::new(&self.path, kind);
        let byte_len = tensor.byte_len().ok_or_else(|| {
            fail(GgufErrorKind::UnsupportedTensorType {
                tensor: tensor.name.clone(),
                ggml_type: tensor.ggml_type,
            })
        })?;
        let file_len = self.bytes.len() as u64;
        let start = self.data_offset.checked_add(tensor.offset);
        let end = start.and_then(|s| s.checked_add(byte_len));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => {
                // Both bounds are at most the length of an in-memory slice, so they fit usize.
                Ok(&self.bytes[start as usize..end as usize])
            }
            _ => Err(fail(GgufErrorKind::TensorOutOfBounds {
                tensor: tensor.name.clone(),
                start: start.unwrap_or(u64::MAX),
                end: end.unwrap_or(u64::MAX),
                file_len,
            })),
        }
    }

    /// A tensor dequantised to f32, in the file's own element order (no renaming or
    /// un-permuting).
    pub fn tensor_f32(&self, tensor: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let bytes = self.tensor_bytes(tensor)?;
        dequantize(tensor.ggml_type, bytes).map_err(|kind| GgufError::new(&self.path, kind))
    }

    fn required(&self, key: &str) -> Result<&MetadataValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::new(&self.path, GgufErrorKind::MissingKey(key.into())))
    }

    fn wrong_type(&self, key: &str, found: &MetadataValue, expected: &'static str) -> GgufError {
        let kind = GgufErrorKind::WrongType {
            key: key.into(),
            found: found.type_name(),
            expected,
        };
        GgufError::new(&self.path, kind)
    }

    fn required_usize(&self, key: &str) -> Result<usize, GgufError> {
        let value = self.required(key)?;
        value
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.wrong_type(key, value, "a non-negative integer"))
    }

    fn optional_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, value, "a token id")),
        }
    }

    fn string_array(&self, key: &str) -> Result<Vec<String>, GgufError> {
        let value = self.required(key)?;
        let items = value
            .as_array()
            .ok_or_else(|| self.wrong_type(key, value, "an array of strings"))?;
        items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.wrong_type(key, item, "an array of strings"))
            })
            .collect()
    }
}

#[expect(
    unsafe_code,
    reason = "memory-mapping a file is unsafe by the memmap2 API's contract"
)]
fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is read-only and private to this process. If another process
    // truncates the file while it is mapped, reads may fault; model files are written once
    // and then only read, which is the same assumption every mmap-based model loader makes.
    unsafe { Mmap::map(file) }
}

/// What `parse_layout` found, before it is tied to a path and the bytes.
struct Layout {
    version: u32,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// Reads little-endian values from a byte slice, failing instead of reading past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufErrorKind> {
        let truncated = || GgufErrorKind::Truncated {
            what: what.to_owned(),
            offset: self.pos as u64,
            needed: n,
            file_len: self.bytes.len() as u64,
        };
        let n = usize::try_from(n).map_err(|_| truncated())?;
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufErrorKind> {
        let slice = self.take(N as u64, what)?;
        // `take` returned exactly N bytes.
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufErrorKind> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufErrorKind> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufErrorKind> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufErrorKind::Malformed(format!("{what} is not valid UTF-8")))
    }

    /// A count read from the file, checked against the bytes left so that a corrupt count
    /// cannot make us reserve gigabytes: every element takes at least `min_element_bytes`.
    fn count(&mut self, what: &str, min_element_bytes: u64) -> Result<usize, GgufErrorKind> {
        let count = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if count.saturating_mul(min_element_bytes) > left {
            return Err(GgufErrorKind::Truncated {
                what: format!("{what} ({count} entries)"),
                offset: self.pos as u64,
                needed: count.saturating_mul(min_element_bytes),
                file_len: self.bytes.len() as u64,
            });
        }
        // Bounded by the slice length above, so it fits usize.
        Ok(count as usize)
    }

    fn value(
        &mut self,
        type_id: u32,
        key: &str,
        depth: usize,
    ) -> Result<MetadataValue, GgufErrorKind> {
        Ok(match type_id {
            0 => MetadataValue::U8(u8::from_le_bytes(self.array(key)?)),
            1 => MetadataValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => MetadataValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetadataValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetadataValue::U32(self.u32(key)?),
            5 => MetadataValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetadataValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)? {
                [0] => MetadataValue::Bool(false),
                [1] => MetadataValue::Bool(true),
                [other] => {
                    return Err(GgufErrorKind::Malformed(format!(
                        "metadata {key} is a bool stored as {other}, not 0 or 1"
                    )));
                }
            },
            8 => MetadataValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufErrorKind::Malformed(format!(
                        "metadata {key} nests arrays deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let element_type = self.u32(key)?;
                let min_bytes = match element_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    // A string or array element is at least its u64 length.
                    _ => 8,
                };
                let len = self.count(key, min_bytes)?;
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(element_type, key, depth + 1)?);
                }
                MetadataValue::Array(items)
            }
            10 => MetadataValue::U64(self.u64(key)?),
            11 => MetadataValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetadataValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(GgufErrorKind::Malformed(format!(
                    "metadata {key} has unknown value type {other}"
                )));
            }
        })
    }
}

fn parse_layout(bytes: &[u8]) -> Result<Layout, GgufErrorKind> {
    let mut reader = Reader { bytes, pos: 0 };

    let magic = bytes.get(..4).unwrap_or(bytes);
    if magic != b"GGUF" {
        return Err(GgufErrorKind::BadMagic {
            found: magic.to_vec(),
        });
    }
    reader.pos = 4;
    let version = reader.u32("version")?;
    if version != SUPPORTED_VERSION {
        return Err(GgufErrorKind::UnsupportedVersion(version));
    }
    let tensor_count = reader.u64("tensor count")?;
    // A key/value pair is at least a key length, a value type and one byte of value.
    let metadata_count = reader.count("metadata count", 8 + 4 + 1)?;

    // Duplicates are looked up in a set: a crafted file can hold millions of keys.
    let mut seen = HashSet::new();
    let mut metadata: Vec<(String, MetadataValue)> = Vec::with_capacity(metadata_count);
    for index in 0..metadata_count {
        let key = reader.string(&format!("metadata key #{index}"))?;
        let type_id = reader.u32(&key)?;
        let value = reader.value(type_id, &key, 0)?;
        if !seen.insert(key.clone()) {
            return Err(GgufErrorKind::Malformed(format!(
                "metadata key {key} appears twice"
            )));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, value)) => match value.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(GgufErrorKind::Malformed(format!(
                    "general.alignment is {value:?}, not a power of two"
                )));
            }
        },
    };

    // A tensor info is at least a name length, a dimension count, one dimension, a type and
    // an offset.
    const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
    let left = (bytes.len() - reader.pos) as u64;
    if tensor_count.saturating_mul(MIN_TENSOR_INFO_BYTES) > left {
        return Err(GgufErrorKind::Truncated {
            what: format!("tensor infos ({tensor_count} tensors)"),
            offset: reader.pos as u64,
            needed: tensor_count.saturating_mul(MIN_TENSOR_INFO_BYTES),
            file_len: bytes.len() as u64,
        });
    }
    let mut seen = HashSet::new();
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count as usize);
    for index in 0..tensor_count {
        let tensor = read_tensor_info(&mut reader, index, alignment)?;
        if !seen.insert(tensor.name.clone()) {
            let name = tensor.name;
            return Err(GgufErrorKind::Malformed(format!(
                "tensor {name} appears twice"
            )));
        }
        tensors.push(tensor);
    }

    let data_offset = (reader.pos as u64).next_multiple_of(alignment);
    let layout = Layout {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    };
    check_tensor_bounds(&layout, bytes.len() as u64)?;
    Ok(layout)
}

fn read_tensor_info(
    reader: &mut Reader<'_>,
    index: u64,
    alignment: u64,
) -> Result<TensorInfo, GgufErrorKind> {
    let name = reader.string(&format!("name of tensor #{index}"))?;
    let n_dims = reader.u32(&name)?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(GgufErrorKind::Malformed(format!(
            "tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(reader.u64(&name)?);
    }
    let ggml_type = GgmlType::from_id(reader.u32(&name)?);
    let offset = reader.u64(&name)?;

    // Element counts are later used as usize lengths, so they must fit one.
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| usize::try_from(n).is_ok())
        .ok_or_else(|| {
            GgufErrorKind::Malformed(format!(
                "tensor {name} has dims {dims:?}, too many elements"
            ))
        })?;
    if let Some((block, block_bytes)) = ggml_type.block_layout() {
        if !dims[0].is_multiple_of(block as u64) {
            return Err(GgufErrorKind::Malformed(format!(
                "tensor {name} rows of {} elements are not whole {} blocks of {block}",
                dims[0],
                ggml_type.name()
            )));
        }
        if (elements / block as u64)
            .checked_mul(block_bytes as u64)
            .is_none()
        {
            return Err(GgufErrorKind::Malformed(format!(
                "tensor {name} is too large"
            )));
        }
    }
    if !offset.is_multiple_of(alignment) {
        return Err(GgufErrorKind::Malformed(format!(
            "tensor {name} offset {offset} is not a multiple of the alignment {alignment}"
        )));
    }
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

/// Fails on the first decodable tensor whose data runs past the end of the file, so that
/// a truncated download is reported when opened rather than halfway through an import.
fn check_tensor_bounds(layout: &Layout, file_len: u64) -> Result<(), GgufErrorKind> {
    for tensor in &layout.tensors {
        let Some(byte_len) = tensor.byte_len() else {
            continue;
        };
        let start = layout.data_offset.checked_add(tensor.offset);
        let end = start.and_then(|s| s.checked_add(byte_len));
        match (start, end) {
            (Some(_), Some(end)) if end <= file_len => {}
            _ => {
                return Err(GgufErrorKind::TensorOutOfBounds {
                    tensor: tensor.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                });
            }
        }
    }
    Ok(())
}

/// Decodes `bytes` holding whole blocks of `ggml_type` into f32 values.
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, GgufErrorKind> {
    let unsupported = || GgufErrorKind::UnsupportedTensorType {
        tensor: "(raw blocks)".into(),
        ggml_type,
    };
    let (block, block_bytes) = ggml_type.block_layout().ok_or_else(unsupported)?;
    let decode: fn(&[u8], &mut [f32]) = match ggml_type {
        GgmlType::F32 => decode_f32,
        GgmlType::F16 => decode_f16,
        GgmlType::BF16 => decode_bf16,
        GgmlType::Q4_0 => decode_q4_0,
        GgmlType::Q4_1 => decode_q4_1,
        GgmlType::Q8_0 => decode_q8_0,
        GgmlType::Other(_) => return Err(unsupported()),
    };
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(GgufErrorKind::Malformed(format!(
            "{} bytes are not whole {} blocks of {block_bytes} bytes",
            bytes.len(),
            ggml_type.name()
        )));
    }

    let mut out = vec![0f32; bytes.len() / block_bytes * block];
    if block == 1 {
        // Plain floats: decode the whole run at once rather than one call per element.
        decode(bytes, &mut out);
    } else {
        for (b, o) in bytes
            .chunks_exact(block_bytes)
            .zip(out.chunks_exact_mut(block))
        {
            decode(b, o);
        }
    }
    Ok(out)
}

fn decode_f32(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(4).zip(out) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn decode_f16(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks_exact(2).zip(out) {
        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

fn decode_bf16(bytes: &[u8], out: &mut [f32]) {
    // bf16 is the top half of an f32.
    for (b, o) in bytes.chunks_exact(2).zip(out) {
        *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

// In both 4-bit layouts, byte j holds weight j in its low nibble and weight j + 16 in its
// high nibble, so the first half of a block comes from low nibbles.
fn decode_q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let (low, high) = out.split_at_mut(16);
    for ((&q, lo), hi) in block[2..18].iter().zip(low).zip(high) {
        *lo = (i32::from(q & 0x0f) - 8) as f32 * d;
        *hi = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

fn decode_q4_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let (low, high) = out.split_at_mut(16);
    for ((&q, lo), hi) in block[4..20].iter().zip(low).zip(high) {
        *lo = f32::from(q & 0x0f) * d + m;
        *hi = f32::from(q >> 4) * d + m;
    }
}

fn decode_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (&q, o) in block[2..34].iter().zip(out) {
        *o = f32::from(q as i8) * d;
    }
}

/// The hyper-parameters of an imported Llama model, named as in a Hugging Face
/// `config.json` for `LlamaForCausalLM`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// The `config.json` a Hugging Face `LlamaForCausalLM` loads, weights in f32.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        });
        if let (Some(object), Ok(serde_json::Value::Object(fields))) =
            (json.as_object_mut(), serde_json::to_value(self))
        {
            object.extend(fields);
        }
        json
    }
}

/// One tensor of an imported model, in Hugging Face naming and layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedTensor {
    /// The Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Row-major shape, outermost first (`[out_features, in_features]` for a projection).
    pub shape: Vec<usize>,
    /// Row-major f32 values.
    pub values: Vec<f32>,
}

/// A Llama model read from GGUF, ready to be written as a Hugging Face folder.
#[derive(Debug)]
pub struct ImportedModel {
    pub config: LlamaConfig,
    /// In file order. `lm_head.weight` is absent when the embeddings are tied.
    pub tensors: Vec<ImportedTensor>,
    pub tokenizer: Tokenizer,
}

impl ImportedModel {
    /// The tensor with this Hugging Face name, if present.
    pub fn tensor(&self, name: &str) -> Option<&ImportedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Number of parameters, counting tied embeddings once.
    pub fn parameter_count(&self) -> usize {
        self.tensors.iter().map(|t| t.values.len()).sum()
    }
}

/// Reads a Llama GGUF file into f32 tensors with Hugging Face names and layout, its config
/// and its tokenizer.
pub fn import(path: impl AsRef<Path>) -> Result<ImportedModel, GgufError> {
    GgufFile::open(path)?.import()
}

/// The Hugging Face name of a llama.cpp Llama tensor, or `None` for a name this importer
/// does not know.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let module = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

/// Puts the rows of a query or key projection back in Hugging Face order.
///
/// Hugging Face Llama rotates dimension `i` of a head with dimension `i + head_dim / 2`
/// (`rotate_half`); ggml rotates adjacent pairs `(2i, 2i + 1)`. llama.cpp's converter therefore
/// reorders each head's rows so that row `i` of the first half and row `i` of the second half
/// sit next to each other: within head `h`, GGUF row `h * head_dim + 2 * i + j` holds
/// Hugging Face row `h * head_dim + j * head_dim / 2 + i`, for `j` in {0, 1}. This inverts
/// that. `values` are `rows` rows of `row_len` each, `rows` a multiple of `2 * n_heads`.
pub fn unpermute_rotary_rows(
    values: &[f32],
    n_heads: usize,
    row_len: usize,
) -> Result<Vec<f32>, GgufErrorKind> {
    let rows = values.len().checked_div(row_len).unwrap_or(0);
    if n_heads == 0
        || row_len == 0
        || rows * row_len != values.len()
        || !rows.is_multiple_of(2 * n_heads)
    {
        return Err(GgufErrorKind::Malformed(format!(
            "cannot split {} values into rows of {row_len} and {n_heads} rotary heads",
            values.len()
        )));
    }
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for head in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = head * head_dim + 2 * i + j;
                let hf_row = head * head_dim + j * half + i;
                out[hf_row * row_len..(hf_row + 1) * row_len]
                    .copy_from_slice(&values[gguf_row * row_len..(gguf_row + 1) * row_len]);
            }
        }
    }
    Ok(out)
}

/// f32 metadata read as f64 gains digits the writer never meant (1e-5 becomes
/// 9.999999747378752e-6); going through the shortest f32 decimal gives back the written value.
fn f32_as_written(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

impl GgufFile {
    /// The model's hyper-parameters from the `llama.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig, GgufError> {
        let fail = |kind| GgufError::new(&self.path, kind);
        let architecture = self.required("general.architecture")?;
        let architecture = architecture
            .as_str()
            .ok_or_else(|| self.wrong_type("general.architecture", architecture, "a string"))?;
        if architecture != "llama" {
            return Err(fail(GgufErrorKind::UnsupportedArchitecture(
                architecture.into(),
            )));
        }

        let hidden_size = self.required_usize("llama.embedding_length")?;
        let num_attention_heads = self.required_usize("llama.attention.head_count")?;
        let num_key_value_heads = match self.get("llama.attention.head_count_kv") {
            Some(_) => self.required_usize("llama.attention.head_count_kv")?,
            None => num_attention_heads,
        };
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || !num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(fail(GgufErrorKind::Malformed(format!(
                "{num_attention_heads} attention heads cannot share {num_key_value_heads} key/value heads"
            ))));
        }
        let head_dim = match self.get("llama.attention.key_length") {
            Some(_) => self.required_usize("llama.attention.key_length")?,
            None => hidden_size / num_attention_heads,
        };

        let vocab_size = match self.get("llama.vocab_size") {
            Some(_) => self.required_usize("llama.vocab_size")?,
            // Older files leave the vocabulary size to the tokenizer's token list.
            None => self
                .get("tokenizer.ggml.tokens")
                .and_then(MetadataValue::as_array)
                .map(<[MetadataValue]>::len)
                .ok_or_else(|| fail(GgufErrorKind::MissingKey("llama.vocab_size".into())))?,
        };

        // TODO: rotary scaling (linear, YaRN, Llama 3's frequency table) is not carried into
        // the config, so such models are refused rather than imported with wrong positions.
        match self
            .get("llama.rope.scaling.type")
            .and_then(MetadataValue::as_str)
        {
            None | Some("none") => {}
            Some(kind) => {
                return Err(fail(GgufErrorKind::UnsupportedRopeScaling(kind.into())));
            }
        }

        let float = |key: &str, default: Option<f64>| -> Result<f64, GgufError> {
            match (self.get(key), default) {
                (Some(MetadataValue::F32(v)), _) => Ok(f32_as_written(*v)),
                (Some(value), _) => value
                    .as_f64()
                    .ok_or_else(|| self.wrong_type(key, value, "a number")),
                (None, Some(default)) => Ok(default),
                (None, None) => Err(fail(GgufErrorKind::MissingKey(key.into()))),
            }
        };

        Ok(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: self.required_usize("llama.feed_forward_length")?,
            num_hidden_layers: self.required_usize("llama.block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: self.required_usize("llama.context_length")?,
            // 10000 is the original Llama rotary base, which llama.cpp assumes when absent.
            rope_theta: float("llama.rope.freq_base", Some(10_000.0))?,
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", None)?,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            bos_token_id: self.optional_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_id: self.optional_u32("tokenizer.ggml.eos_token_id")?,
            pad_token_id: self.optional_u32("tokenizer.ggml.padding_token_id")?,
        })
    }

    /// Rebuilds the byte-level BPE tokenizer stored in the `tokenizer.*` metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer, GgufError> {
        let fail = |reason: String| GgufError::new(&self.path, GgufErrorKind::Tokenizer(reason));
        let model = self.required("tokenizer.ggml.model")?;
        match model.as_str() {
            Some("gpt2") => {}
            Some(other) => {
                return Err(fail(format!(
                    "tokenizer model {other:?} is not supported (only byte-level BPE, \"gpt2\")"
                )));
            }
            None => return Err(self.wrong_type("tokenizer.ggml.model", model, "a string")),
        }
        let pre_tokenizer = match self
            .get("tokenizer.ggml.pre")
            .and_then(MetadataValue::as_str)
        {
            None | Some("default" | "gpt2") => PreTokenizerKind::ByteLevel,
            Some("smollm") => PreTokenizerKind::DigitsThenByteLevel,
            // TODO: the Llama 3, Qwen and other pre-tokenizer regexes are not rebuilt, so
            // those models' GGUF files cannot be imported yet.
            Some(other) => {
                return Err(fail(format!("pre-tokenizer {other:?} is not supported")));
            }
        };

        let tokens = self.string_array("tokenizer.ggml.tokens")?;
        let merges = self
            .string_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|merge| match merge.split_once(' ') {
                Some((left, right)) => Ok((left.to_owned(), right.to_owned())),
                None => Err(fail(format!(
                    "merge {merge:?} is not two tokens separated by a space"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let token_types = match self.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(value) => value
                .as_array()
                .and_then(|items| {
                    items
                        .iter()
                        .map(MetadataValue::as_i64)
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| {
                    self.wrong_type("tokenizer.ggml.token_type", value, "an array of integers")
                })?,
        };
        if token_types.len() != tokens.len() {
            return Err(fail(format!(
                "{} token types for {} tokens",
                token_types.len(),
                tokens.len()
            )));
        }
        let missing = |key: &str| fail(format!("{key} is missing"));
        let bos_id = self
            .optional_u32("tokenizer.ggml.bos_token_id")?
            .ok_or_else(|| missing("tokenizer.ggml.bos_token_id"))?;
        let eos_id = self
            .optional_u32("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| missing("tokenizer.ggml.eos_token_id"))?;

        let vocabulary = BpeVocabulary {
            tokens,
            merges,
            // llama.cpp's token types: 3 marks control tokens (specials), 4 user-defined ones.
            special: token_types.iter().map(|&t| t == 3).collect(),
            user_defined: token_types.iter().map(|&t| t == 4).collect(),
            bos_id,
            eos_id,
            pad_id: self.optional_u32("tokenizer.ggml.padding_token_id")?,
            add_bos: self
                .get("tokenizer.ggml.add_bos_token")
                .and_then(MetadataValue::as_bool)
                .unwrap_or(false),
            pre_tokenizer,
            chat_template: self
                .get("tokenizer.chat_template")
                .and_then(MetadataValue::as_str)
                .map(str::to_owned),
        };
        Tokenizer::from_bpe_vocabulary(vocabulary).map_err(|e: TokenizerError| fail(e.to_string()))
    }

    /// Dequantises every tensor into Hugging Face names and layout, the query and key
    /// projections un-permuted. Work is spread over the available cores.
    pub fn hf_tensors(&self, config: &LlamaConfig) -> Result<Vec<ImportedTensor>, GgufError> {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut results: Vec<(usize, Result<ImportedTensor, GgufError>)> = Vec::new();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.min(self.tensors.len()).max(1))
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(tensor) = self.tensors.get(index) else {
                                break;
                            };
                            done.push((index, self.hf_tensor(tensor, config)));
                        }
                        done
                    })
                })
                .collect();
            for worker in workers {
                match worker.join() {
                    Ok(done) => results.extend(done),
                    // A panic in a worker is a bug here, not bad input; pass it on.
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
        results.sort_by_key(|(index, _)| *index);
        results.into_iter().map(|(_, tensor)| tensor).collect()
    }

    fn hf_tensor(
        &self,
        tensor: &TensorInfo,
        config: &LlamaConfig,
    ) -> Result<ImportedTensor, GgufError> {
        let fail = |kind| GgufError::new(&self.path, kind);
        let name = hf_tensor_name(&tensor.name)
            .ok_or_else(|| fail(GgufErrorKind::UnmappedTensor(tensor.name.clone())))?;
        let shape = tensor.shape();
        let mut values = self.tensor_f32(tensor)?;

        let rotary_heads = if name.ends_with("self_attn.q_proj.weight")
            || name.ends_with("self_attn.q_proj.bias")
        {
            Some(config.num_attention_heads)
        } else if name.ends_with("self_attn.k_proj.weight")
            || name.ends_with("self_attn.k_proj.bias")
        {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        if let Some(heads) = rotary_heads {
            let rows = shape.first().copied().unwrap_or(0);
            if rows != heads * config.head_dim {
                return Err(fail(GgufErrorKind::Malformed(format!(
                    "tensor {} has {rows} rows, expected {heads} heads of {}",
                    tensor.name, config.head_dim
                ))));
            }
            let row_len = shape.iter().skip(1).product();
            values = unpermute_rotary_rows(&values, heads, row_len).map_err(fail)?;
        }
        Ok(ImportedTensor {
            name,
            shape,
            values,
        })
    }

    /// Reads config, tokenizer and every tensor: everything needed to write a Hugging Face
    /// model folder.
    pub fn import(&self) -> Result<ImportedModel, GgufError> {
        let config = self.llama_config()?;
        let tokenizer = self.tokenizer()?;
        let tensors = self.hf_tensors(&config)?;
        Ok(ImportedModel {
            config,
            tensors,
            tokenizer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // f16 bit patterns used below: 0x3800 = 0.5, 0x3400 = 0.25, 0xbc00 = -1.0, 0x4000 = 2.0.

    #[test]
    fn q4_0_block_takes_low_nibbles_first_and_centres_codes_on_eight() {
        let mut block = vec![0x00, 0x38]; // d = 0.5
        block.extend([0x88; 16]); // code 8 in both nibbles decodes to 0
        block[2] = 0x1f; // weight 0: low nibble 15 -> (15 - 8) * 0.5; weight 16: 1 -> -3.5
        block[3] = 0x80; // weight 1: 0 -> -4.0; weight 17: 8 -> 0.0
        let values = dequantize(GgmlType::Q4_0, &block).expect("one whole block");
        let mut expected = vec![0.0f32; 32];
        expected[0] = 3.5;
        expected[16] = -3.5;
        expected[1] = -4.0;
        expected[17] = 0.0;
        assert_eq!(values, expected);
    }

    #[test]
    fn q4_1_block_scales_codes_and_adds_the_minimum() {
        let mut block = vec![0x00, 0x34, 0x00, 0xbc]; // d = 0.25, m = -1.0
        block.extend([0x00; 16]); // code 0 decodes to the minimum, -1.0
        block[4] = 0x4c; // weight 0: 12 * 0.25 - 1 = 2.0; weight 16: 4 * 0.25 - 1 = 0.0
        block[19] = 0xf0; // weight 15: 0 -> -1.0; weight 31: 15 * 0.25 - 1 = 2.75
        let values = dequantize(GgmlType::Q4_1, &block).expect("one whole block");
        let mut expected = vec![-1.0f32; 32];
        expected[0] = 2.0;
        expected[16] = 0.0;
        expected[31] = 2.75;
        assert_eq!(values, expected);
    }

    #[test]
    fn q8_0_block_multiplies_signed_bytes_by_the_scale() {
        let mut block = vec![0x00, 0x40]; // d = 2.0
        block.extend([0x01; 32]); // 1 * 2.0
        block[2] = 0xfd; // -3 as i8 -> -6.0
        block[33] = 0x7f; // 127 -> 254.0
        let values = dequantize(GgmlType::Q8_0, &block).expect("one whole block");
        let mut expected = vec![2.0f32; 32];
        expected[0] = -6.0;
        expected[31] = 254.0;
        assert_eq!(values, expected);
    }

    #[test]
    fn half_precision_floats_decode_exactly() {
        // 0x3c00 = 1.0, 0xc000 = -2.0, 0x7bff = 65504 (the largest finite f16).
        let f16_bytes = [0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b];
        assert_eq!(
            dequantize(GgmlType::F16, &f16_bytes).ok(),
            Some(vec![1.0, -2.0, 65504.0])
        );
        // bf16 0x3f80 = 1.0 and 0xc020 = -2.5: the top halves of those f32 bit patterns.
        let bf16_bytes = [0x80, 0x3f, 0x20, 0xc0];
        assert_eq!(
            dequantize(GgmlType::BF16, &bf16_bytes).ok(),
            Some(vec![1.0, -2.5])
        );
    }

    #[test]
    fn partial_blocks_and_undecodable_types_are_errors() {
        assert!(matches!(
            dequantize(GgmlType::Q4_1, &[0; 21]),
            Err(GgufErrorKind::Malformed(_))
        ));
        let q6_k = GgmlType::from_id(14);
        assert_eq!(q6_k.to_string(), "14 (Q6_K)");
        assert!(matches!(
            dequantize(q6_k, &[0; 210]),
            Err(GgufErrorKind::UnsupportedTensorType { .. })
        ));
    }

    #[test]
    fn unpermute_restores_halves_from_interleaved_pairs_by_hand() {
        // One head of four rows of one value. Hugging Face rows are [a0, a1, b0, b1] (first
        // half, second half); llama.cpp stores the pairs interleaved: [a0, b0, a1, b1].
        let gguf = [10.0, 20.0, 11.0, 21.0];
        let hf = unpermute_rotary_rows(&gguf, 1, 1).expect("4 rows split into 1 head");
        assert_eq!(hf, vec![10.0, 11.0, 20.0, 21.0]);
    }

    /// llama.cpp's permutation written as its numpy expression,
    /// `w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)`:
    /// the output at (h, i, j, c) reads the input at (h, j, i, c).
    fn llama_cpp_permute(hf: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
        let rows = hf.len() / cols;
        let half = rows / n_heads / 2;
        let mut out = Vec::with_capacity(hf.len());
        for h in 0..n_heads {
            for i in 0..half {
                for j in 0..2 {
                    let source_row = (h * 2 + j) * half + i;
                    out.extend_from_slice(&hf[source_row * cols..(source_row + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation_for_several_head_layouts() {
        for (n_heads, head_dim, cols) in [(1, 4, 1), (3, 8, 5), (9, 64, 3), (3, 64, 2)] {
            let hf: Vec<f32> = (0..n_heads * head_dim * cols).map(|v| v as f32).collect();
            let gguf = llama_cpp_permute(&hf, n_heads, cols);
            assert_ne!(
                gguf, hf,
                "the permutation must move rows for this test to mean anything"
            );
            let back = unpermute_rotary_rows(&gguf, n_heads, cols).expect("valid layout");
            assert_eq!(back, hf, "{n_heads} heads of {head_dim} rows of {cols}");
        }
    }

    #[test]
    fn unpermute_rejects_rows_that_do_not_split_into_pairs_per_head() {
        assert!(unpermute_rotary_rows(&[0.0; 6], 2, 1).is_err()); // 3 rows per head
        assert!(unpermute_rotary_rows(&[0.0; 8], 0, 1).is_err());
        assert!(unpermute_rotary_rows(&[0.0; 7], 1, 2).is_err()); // not whole rows
    }

    #[test]
    fn llama_cpp_names_map_to_hugging_face_names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.ffn_norm.weight",
                "model.layers.12.post_attention_layernorm.weight",
            ),
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
            ),
            (
                "blk.3.attn_v.weight",
                "model.layers.3.self_attn.v_proj.weight",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.29.ffn_gate.weight",
                "model.layers.29.mlp.gate_proj.weight",
            ),
            ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
            ),
            ("blk.1.attn_q.bias", "model.layers.1.self_attn.q_proj.bias"),
        ];
        for (gguf, hf) in cases {
            assert_eq!(hf_tensor_name(gguf).as_deref(), Some(hf), "{gguf}");
        }
        for unknown in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_q.scale",
            "blk..ffn_up.weight",
        ] {
            assert_eq!(hf_tensor_name(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn f32_metadata_reads_back_as_the_decimal_it_was_written_from() {
        // 1e-5 as f32 is 9.99999974737875e-6; configs written by Hugging Face say 1e-05.
        assert_eq!(f32_as_written(1e-5), 1e-5);
        assert_eq!(f32_as_written(100_000.0), 100_000.0);
    }
}
