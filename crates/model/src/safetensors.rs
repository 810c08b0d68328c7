//! Reads and writes the safetensors format: an 8-byte little-endian header length, a JSON
//! header mapping tensor names to dtype, shape and byte range, then the raw bytes.
//!
//! Written here rather than through tch because tch's writer cannot attach the
//! `{"format": "pt"}` metadata `transformers` expects, and its reader panics on corrupt files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

/// Why a safetensors file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// The file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The bytes do not form a valid safetensors file.
    #[error("{path} is not a valid safetensors file: {problem}")]
    Corrupt {
        /// The file involved.
        path: String,
        /// What is wrong, e.g. a truncated header or data past the end of the file.
        problem: String,
    },
    /// A tensor uses a dtype this reader does not convert.
    #[error("{path}: tensor {name} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file involved.
        path: String,
        /// The tensor's name.
        name: String,
        /// The dtype as written in the header.
        dtype: String,
    },
    /// libtorch refused an operation on a tensor.
    #[error("{path}: tensor {name}: {source}")]
    Torch {
        /// The file involved.
        path: String,
        /// The tensor's name.
        name: String,
        /// The libtorch error.
        source: tch::TchError,
    },
}

/// The safetensors name of a tch kind, and its size in bytes.
fn dtype_of(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "F32",
        Kind::Double => "F64",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        _ => return None,
    })
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "F64" => Kind::Double,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

/// Writes `tensors` to `path` with the given string metadata (e.g. `format = pt`).
/// Tensors are moved to the CPU and made contiguous; names are written sorted.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), SafetensorsError> {
    let shown = path.display().to_string();
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".to_string(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut blobs = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, tensor) in tensors {
        let torch_error = |source| SafetensorsError::Torch {
            path: shown.clone(),
            name: name.clone(),
            source,
        };
        let kind = tensor.f_kind().map_err(torch_error)?;
        let dtype = dtype_of(kind).ok_or_else(|| SafetensorsError::UnsupportedDtype {
            path: shown.clone(),
            name: name.clone(),
            dtype: format!("{kind:?}"),
        })?;
        let cpu = tensor
            .detach()
            .f_to_device(Device::Cpu)
            .map_err(torch_error)?
            .contiguous();
        let numel = cpu.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        cpu.f_copy_data_u8(&mut bytes, numel).map_err(torch_error)?;
        let shape: Vec<i64> = cpu.size();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
        blobs.push(bytes);
    }

    let mut header_bytes = Value::Object(header).to_string().into_bytes();
    // Padding the header to 8 bytes keeps the data aligned for readers that map it directly.
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let mut file = Vec::with_capacity(8 + header_bytes.len() + offset);
    file.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    file.extend_from_slice(&header_bytes);
    for blob in blobs {
        file.extend_from_slice(&blob);
    }
    std::fs::write(path, file).map_err(|source| SafetensorsError::Io {
        path: shown,
        source,
    })
}

/// Tensors read from a safetensors file, with the file's string metadata.
#[derive(Debug)]
pub struct Loaded {
    /// Tensors by name, on the CPU, in the dtype the file stores.
    pub tensors: BTreeMap<String, Tensor>,
    /// The `__metadata__` entries.
    pub metadata: BTreeMap<String, String>,
}

/// Reads every tensor of a safetensors file, checking the header against the file's size.
pub fn load(path: &Path) -> Result<Loaded, SafetensorsError> {
    let reader = Reader::open(path)?;
    let mut tensors = BTreeMap::new();
    for name in reader.names() {
        tensors.insert(name.to_owned(), reader.read(name)?);
    }
    Ok(Loaded {
        tensors,
        metadata: reader.metadata,
    })
}

/// Parses safetensors bytes; `shown` names the source in errors.
pub fn parse(bytes: &[u8], shown: &str) -> Result<Loaded, SafetensorsError> {
    let length_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|slice| slice.try_into().ok())
        .ok_or_else(|| {
            corrupt(
                shown,
                format!(
                    "file is {} bytes, shorter than the 8-byte header length",
                    bytes.len()
                ),
            )
        })?;
    let data_start = data_start(length_bytes, bytes.len() as u64, shown)? as usize;
    let (entries, metadata) = parse_header(&bytes[8..data_start], bytes.len() - data_start, shown)?;
    let data = &bytes[data_start..];
    let mut tensors = BTreeMap::new();
    for (name, entry) in entries {
        let tensor = entry.tensor(&data[entry.begin..entry.end], &name, shown)?;
        tensors.insert(name, tensor);
    }
    Ok(Loaded { tensors, metadata })
}

/// A safetensors file opened to read one tensor at a time: loading a model this way holds its
/// parameters and one tensor in flight, not the whole file besides. The header is checked
/// against the file's size when the file is opened.
#[derive(Debug)]
pub struct Reader {
    file: std::fs::File,
    shown: String,
    data_start: u64,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl Reader {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self, SafetensorsError> {
        use std::os::unix::fs::FileExt as _;
        let shown = path.display().to_string();
        let io = |source| SafetensorsError::Io {
            path: shown.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let file_length = file.metadata().map_err(io)?.len();
        let mut length_bytes = [0u8; 8];
        if file_length < 8 {
            return Err(corrupt(
                &shown,
                format!("file is {file_length} bytes, shorter than the 8-byte header length"),
            ));
        }
        file.read_exact_at(&mut length_bytes, 0).map_err(io)?;
        let data_start = data_start(length_bytes, file_length, &shown)?;
        let mut header = vec![0u8; (data_start - 8) as usize];
        file.read_exact_at(&mut header, 8).map_err(io)?;
        let (entries, metadata) =
            parse_header(&header, (file_length - data_start) as usize, &shown)?;
        Ok(Self {
            file,
            shown,
            data_start,
            entries,
            metadata,
        })
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// A tensor's shape, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.entries.get(name).map(|entry| entry.shape.as_slice())
    }

    /// The `__metadata__` entries.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Reads one tensor, on the CPU, in the dtype the file stores.
    pub fn read(&self, name: &str) -> Result<Tensor, SafetensorsError> {
        use std::os::unix::fs::FileExt as _;
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| corrupt(&self.shown, format!("there is no tensor {name}")))?;
        let mut bytes = vec![0u8; entry.end - entry.begin];
        self.file
            .read_exact_at(&mut bytes, self.data_start + entry.begin as u64)
            .map_err(|source| SafetensorsError::Io {
                path: self.shown.clone(),
                source,
            })?;
        entry.tensor(&bytes, name, &self.shown)
    }
}

/// What a shard index holds that the reader uses; its `metadata` and anything else are
/// skipped unparsed, so reading the index costs its bytes and the map, never a JSON tree.
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// A model's weights as one set of names, whether they sit in one safetensors file or in
/// shards listed by an index (`{"weight_map": {"<tensor>": "<file>"}}`, the layout
/// `transformers` writes for models past its shard size).
#[derive(Debug)]
pub struct Weights {
    readers: Vec<Reader>,
    /// Which reader holds each tensor.
    owners: BTreeMap<String, usize>,
    /// The file errors about the set as a whole name: the single file or the index.
    shown: PathBuf,
}

impl Weights {
    /// The weights in `dir`: the shards `index` lists when that file exists, else `single`.
    pub fn open(dir: &Path, single: &str, index: &str) -> Result<Self, SafetensorsError> {
        let index_path = dir.join(index);
        if !index_path.exists() {
            let reader = Reader::open(&dir.join(single))?;
            let owners = reader.names().map(|name| (name.to_owned(), 0)).collect();
            return Ok(Self {
                readers: vec![reader],
                owners,
                shown: dir.join(single),
            });
        }
        let shown = index_path.display().to_string();
        let bytes = std::fs::read(&index_path).map_err(|source| SafetensorsError::Io {
            path: shown.clone(),
            source,
        })?;
        let ShardIndex { weight_map } = serde_json::from_slice(&bytes).map_err(|error| {
            let problem = if error.is_data() {
                format!("weight_map is not a name-to-file map: {error}")
            } else {
                format!("not JSON: {error}")
            };
            corrupt(&shown, problem)
        })?;
        let mut readers = Vec::new();
        let mut shards: BTreeMap<&str, usize> = BTreeMap::new();
        let mut owners = BTreeMap::new();
        for (name, file) in &weight_map {
            let owner = match shards.get(file.as_str()) {
                Some(&owner) => owner,
                None => {
                    // The index comes with the model, possibly from elsewhere: a shard is a
                    // file next to it, never a path that leaves the folder.
                    let plain = !file.is_empty()
                        && !file.contains(['/', '\\'])
                        && file != "."
                        && file != "..";
                    if !plain {
                        return Err(corrupt(
                            &shown,
                            format!("shard {file:?} is not a file name in the model folder"),
                        ));
                    }
                    readers.push(Reader::open(&dir.join(file))?);
                    shards.insert(file, readers.len() - 1);
                    readers.len() - 1
                }
            };
            if readers[owner].shape(name).is_none() {
                return Err(corrupt(
                    &shown,
                    format!("weight_map puts {name} in {file}, which has no such tensor"),
                ));
            }
            owners.insert(name.clone(), owner);
        }
        Ok(Self {
            readers,
            owners,
            shown: index_path,
        })
    }

    /// The single file or the index, for errors about the set as a whole.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.owners.keys().map(String::as_str)
    }

    /// A tensor's shape, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.owners
            .get(name)
            .and_then(|&owner| self.readers[owner].shape(name))
    }

    /// The file holding a tensor, for errors about that tensor.
    pub fn file(&self, name: &str) -> Option<&Path> {
        self.owners
            .get(name)
            .map(|&owner| Path::new(&self.readers[owner].shown))
    }

    /// Reads one tensor from whichever file holds it.
    pub fn read(&self, name: &str) -> Result<Tensor, SafetensorsError> {
        match self.owners.get(name) {
            Some(&owner) => self.readers[owner].read(name),
            None => Err(corrupt(
                &self.shown.display().to_string(),
                format!("there is no tensor {name}"),
            )),
        }
    }
}

fn corrupt(shown: &str, problem: String) -> SafetensorsError {
    SafetensorsError::Corrupt {
        path: shown.to_string(),
        problem,
    }
}

/// A header longer than this is refused rather than read into memory: real headers are a few
/// hundred kilobytes even for models with thousands of tensors, and a file from elsewhere (an
/// upload, a shard an index names) could otherwise claim gigabytes.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Where the tensor bytes begin, from the 8-byte header length, checked against the file.
fn data_start(
    length_bytes: [u8; 8],
    file_length: u64,
    shown: &str,
) -> Result<u64, SafetensorsError> {
    let header_length = u64::from_le_bytes(length_bytes);
    if header_length > MAX_HEADER_BYTES {
        return Err(corrupt(
            shown,
            format!(
                "header claims {header_length} bytes, more than the {MAX_HEADER_BYTES} allowed"
            ),
        ));
    }
    header_length
        .checked_add(8)
        .filter(|end| *end <= file_length)
        .ok_or_else(|| {
            corrupt(
                shown,
                format!(
                    "header claims {header_length} bytes but the file has only {} after the length",
                    file_length - 8
                ),
            )
        })
}

/// One tensor as the header describes it, checked against the data's length.
#[derive(Debug)]
struct Entry {
    kind: Kind,
    shape: Vec<i64>,
    begin: usize,
    end: usize,
}

impl Entry {
    fn tensor(&self, bytes: &[u8], name: &str, shown: &str) -> Result<Tensor, SafetensorsError> {
        Tensor::f_from_data_size(bytes, &self.shape, self.kind).map_err(|source| {
            SafetensorsError::Torch {
                path: shown.to_string(),
                name: name.to_string(),
                source,
            }
        })
    }
}

type Header = (BTreeMap<String, Entry>, BTreeMap<String, String>);

/// The tensors and metadata a JSON header describes, each tensor's byte range checked
/// against `data_length` and its shape and dtype.
fn parse_header(
    header: &[u8],
    data_length: usize,
    shown: &str,
) -> Result<Header, SafetensorsError> {
    let header: Map<String, Value> = serde_json::from_slice(header)
        .map_err(|error| corrupt(shown, format!("header is not a JSON object: {error}")))?;
    let mut entries = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(entry).map_err(|error| {
                corrupt(shown, format!("__metadata__ is not a string map: {error}"))
            })?;
            continue;
        }
        let parsed = parse_entry(&name, &entry, data_length, shown)?;
        entries.insert(name, parsed);
    }
    Ok((entries, metadata))
}

fn parse_entry(
    name: &str,
    entry: &Value,
    data_length: usize,
    shown: &str,
) -> Result<Entry, SafetensorsError> {
    let corrupt = |problem: String| corrupt(shown, format!("tensor {name}: {problem}"));
    let dtype = entry["dtype"]
        .as_str()
        .ok_or_else(|| corrupt("no dtype".to_string()))?;
    let kind = kind_of(dtype).ok_or_else(|| SafetensorsError::UnsupportedDtype {
        path: shown.to_string(),
        name: name.to_string(),
        dtype: dtype.to_string(),
    })?;
    let shape: Vec<i64> = serde_json::from_value(entry["shape"].clone())
        .map_err(|error| corrupt(format!("bad shape: {error}")))?;
    let offsets: [usize; 2] = serde_json::from_value(entry["data_offsets"].clone())
        .map_err(|error| corrupt(format!("bad data_offsets: {error}")))?;
    let [begin, end] = offsets;
    if begin > end || end > data_length {
        return Err(corrupt(format!(
            "bytes {begin}..{end} lie outside the {data_length} data bytes (file truncated?)"
        )));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |product, &dim| {
            usize::try_from(dim)
                .ok()
                .and_then(|dim| product.checked_mul(dim))
        })
        .ok_or_else(|| corrupt(format!("invalid shape {shape:?}")))?;
    let expected = numel * kind.elt_size_in_bytes();
    if end - begin != expected {
        return Err(corrupt(format!(
            "shape {shape:?} of {dtype} needs {expected} bytes but the header gives {}",
            end - begin
        )));
    }
    Ok(Entry {
        kind,
        shape,
        begin,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, Tensor> {
        BTreeMap::from([
            (
                "a.weight".to_string(),
                Tensor::from_slice(&[1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0]).reshape([2, 3]),
            ),
            ("b.bias".to_string(), Tensor::from_slice(&[1i64, 2, 3])),
            (
                "c.half".to_string(),
                Tensor::from_slice(&[0.5f32, 0.25]).to_kind(Kind::BFloat16),
            ),
        ])
    }

    #[test]
    fn tensors_and_metadata_survive_a_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.safetensors");
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        save(&path, &sample(), &metadata).expect("writes");
        let loaded = load(&path).expect("reads back");
        assert_eq!(loaded.metadata, metadata);
        for (name, tensor) in sample() {
            let read = &loaded.tensors[&name];
            assert_eq!(read.size(), tensor.size(), "{name}");
            assert_eq!(read.kind(), tensor.kind(), "{name}");
            assert!(read.equal(&tensor), "{name}");
        }
    }

    #[test]
    fn the_layout_matches_the_published_format() {
        // The format's definition: u64 little-endian header size, then JSON, then the bytes
        // of each tensor at its data_offsets, row-major, little-endian.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.safetensors");
        let tensors = BTreeMap::from([("x".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))]);
        save(&path, &tensors, &BTreeMap::new()).expect("writes");
        let bytes = std::fs::read(&path).expect("reads");
        let header_length = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + header_length]).expect("json");
        assert_eq!(header["x"]["dtype"], "F32");
        assert_eq!(header["x"]["data_offsets"], serde_json::json!([0, 8]));
        let data = &bytes[8 + header_length..];
        assert_eq!(data, [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat());
    }

    #[test]
    fn a_truncated_file_is_reported_not_panicked_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.safetensors");
        save(&path, &sample(), &BTreeMap::new()).expect("writes");
        let bytes = std::fs::read(&path).expect("reads");
        for cut in [0, 5, 8, 20, bytes.len() - 1] {
            let error = parse(&bytes[..cut], "t.safetensors").expect_err("truncated");
            assert!(
                matches!(error, SafetensorsError::Corrupt { .. }),
                "cut {cut}: {error}"
            );
        }
    }

    #[test]
    fn a_header_length_past_the_cap_is_refused_before_it_is_read() {
        // A file really holding one byte past the cap: refused by its length alone.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("huge.safetensors");
        let file = std::fs::File::create(&path).expect("creates");
        let claimed = MAX_HEADER_BYTES + 1;
        std::io::Write::write_all(&mut &file, &claimed.to_le_bytes()).expect("writes");
        file.set_len(8 + claimed)
            .expect("a sparse file of that size");
        let error = Reader::open(&path).expect_err("over the cap");
        assert!(error.to_string().contains("more than"), "{error}");
    }

    #[test]
    fn a_header_that_lies_about_sizes_is_rejected() {
        let header = br#"{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 8]);
        let error = parse(&bytes, "lying.safetensors").expect_err("3 floats need 12 bytes");
        assert!(error.to_string().contains("needs 12 bytes"), "{error}");
    }
}
