//! A Hugging Face safetensors checkpoint on disk, memory-mapped.
//!
//! Owns: finding the files (`model.safetensors`, or the shards named by
//! `model.safetensors.index.json`), reading their headers, mapping them read-only, and handing
//! out typed, shape-checked views of single tensors. Nothing is copied unless a tensor is
//! misaligned for its element type. Every failure names the file and the tensor; nothing here
//! panics on a bad file.
//!
//! Every file is opened through [`crate::files::open_regular`], so a pipe or device in place of a
//! shard is refused at once. A header is read with plain reads before anything is mapped and must
//! name each tensor once and describe exactly the file's size; no tensor may be in two files.
//! `open_shards` does all of that and is shared with [`crate::preflight`], which stops there.
//!
//! Invariant: a [`Mapped`] view keeps its file mapping alive (`Arc<Mmap>`), so views can be
//! stored in long-lived weight structs with no lifetime tied to the [`Checkpoint`].
//!
//! Not handled: a file truncated or rewritten in place while mapped. Reading a page past the new
//! end kills the process with SIGBUS; checkpoints must be replaced by renaming a new directory
//! into place, never rewritten.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Advice, Mmap};
use safetensors::tensor::{Dtype, Metadata};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::files::{open_regular, read_regular_to_string, FileError};

/// The index file of a sharded checkpoint.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// The weight file of an unsharded checkpoint.
const SINGLE_FILE: &str = "model.safetensors";

/// The largest header accepted (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A checkpoint file or tensor that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: model directory does not exist or is not a directory")]
    NoDirectory { path: PathBuf },
    #[error("{dir}: no model.safetensors and no model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    /// A file is missing, unreadable, or not a regular file.
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: FileError },
    /// A file opened but could not be mapped.
    #[error("{path}: cannot map: {error}")]
    Map {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// A header names one tensor twice (a plain JSON parser would silently keep the last).
    #[error("{path}: the header names tensor `{tensor}` twice")]
    DuplicateTensor { path: PathBuf, tensor: String },
    /// Two weight files both hold a tensor of this name.
    #[error("tensor `{tensor}` is in both {first} and {second}")]
    TensorInTwoFiles {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{path}: bad index: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("{dir}: tensor `{tensor}` is missing from the checkpoint")]
    MissingTensor { dir: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has dtype {found}, expected {expected}")]
    WrongDtype {
        path: PathBuf,
        tensor: String,
        found: String,
        expected: String,
    },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
}

/// Element types the model's tensors use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    Bf16,
    U8,
}

impl ElementType {
    fn dtype(self) -> Dtype {
        match self {
            ElementType::Bf16 => Dtype::BF16,
            ElementType::U8 => Dtype::U8,
        }
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub(crate) struct TensorLocation {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// A read-only slice of `T` inside a mapped file (or, if the file's alignment did not allow a
/// direct view, an owned copy).
#[derive(Clone)]
pub struct Mapped<T: Copy + 'static> {
    ptr: *const T,
    len: usize,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: the pointed-to memory is immutable for the lifetime of `_owner` (a read-only mapping
// or an owned Vec that nobody mutates), and `T: Copy` has no interior mutability here (u8/u16).
unsafe impl<T: Copy + Send + Sync> Send for Mapped<T> {}
// SAFETY: as above; shared read-only access from several threads is sound.
unsafe impl<T: Copy + Send + Sync> Sync for Mapped<T> {}

impl<T: Copy + Send + Sync + 'static> Mapped<T> {
    /// Wraps an owned vector (used for generated or realigned data).
    pub fn from_vec(v: Vec<T>) -> Self {
        let owner: Arc<Vec<T>> = Arc::new(v);
        Self {
            ptr: owner.as_ptr(),
            len: owner.len(),
            _owner: owner,
        }
    }
}

impl<T: Copy + 'static> std::ops::Deref for Mapped<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` is non-null, aligned for T and valid for `len` elements for as long as
        // `_owner` lives (checked at construction), and the memory is never written.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Copy + 'static> std::fmt::Debug for Mapped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapped[{}]", self.len)
    }
}

/// A typed view of one tensor.
#[derive(Clone, Debug)]
pub struct Tensor<T: Copy + 'static> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Mapped<T>,
}

/// An opened checkpoint: its directory, its mapped files and the tensor directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, TensorLocation>,
}

impl Checkpoint {
    /// Opens `dir`: reads every weight file's header (`open_shards`), then maps the files.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let shards = open_shards(dir)?;
        let mut files = Vec::with_capacity(shards.files.len());
        for shard in shards.files {
            let map = map_file(&shard)?;
            files.push((shard.path, Arc::new(map)));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors: shards.tensors,
        })
    }

    /// The checkpoint's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// A bf16 tensor (as raw `u16` bits) of exactly `shape`.
    pub fn bf16(&self, name: &str, shape: &[usize]) -> Result<Tensor<u16>, CheckpointError> {
        self.typed(name, ElementType::Bf16, shape)
    }

    /// A u8 tensor of exactly `shape`.
    pub fn u8(&self, name: &str, shape: &[usize]) -> Result<Tensor<u8>, CheckpointError> {
        self.typed(name, ElementType::U8, shape)
    }

    fn typed<T: Copy + Send + Sync + 'static>(
        &self,
        name: &str,
        ty: ElementType,
        shape: &[usize],
    ) -> Result<Tensor<T>, CheckpointError> {
        let loc = self
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                dir: self.dir.clone(),
                tensor: name.to_string(),
            })?;
        let (path, map) = &self.files[loc.file];
        if loc.dtype != ty.dtype() {
            return Err(CheckpointError::WrongDtype {
                path: path.clone(),
                tensor: name.to_string(),
                found: format!("{:?}", loc.dtype),
                expected: format!("{:?}", ty.dtype()),
            });
        }
        if loc.shape != shape {
            return Err(CheckpointError::WrongShape {
                path: path.clone(),
                tensor: name.to_string(),
                found: loc.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        let elem = std::mem::size_of::<T>();
        let count: usize = shape.iter().product();
        if loc.end - loc.start != count * elem || loc.end > map.len() {
            return Err(CheckpointError::BadFile {
                path: path.clone(),
                reason: format!("tensor `{name}` data does not match its shape"),
            });
        }
        let bytes = &map[loc.start..loc.end];
        let data = if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            Mapped {
                ptr: bytes.as_ptr().cast::<T>(),
                len: count,
                _owner: map.clone(),
            }
        } else {
            // Misaligned inside the file: copy once, element by element.
            let mut v = Vec::with_capacity(count);
            for chunk in bytes.chunks_exact(elem) {
                // SAFETY: `chunk` has exactly size_of::<T>() bytes and T is a plain integer.
                v.push(unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) });
            }
            Mapped::from_vec(v)
        };
        Ok(Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            data,
        })
    }

    /// Reads every mapped file into memory through its mapping (so that the page sizes are the
    /// ones the mapping asks for, see `map_file`), for runs that must not wait on the disk.
    pub fn populate(&self) {
        for (_, map) in &self.files {
            if map.advise(Advice::PopulateRead).is_err() {
                // Older kernels: one read per page does the same.
                let mut sum = 0u8;
                for off in (0..map.len()).step_by(4096) {
                    sum = sum.wrapping_add(map[off]);
                }
                std::hint::black_box(sum);
            }
        }
    }

    /// Total payload bytes of all tensors (for memory and bandwidth figures).
    pub fn payload_bytes(&self) -> u64 {
        payload_bytes(&self.tensors)
    }
}

fn payload_bytes(tensors: &HashMap<String, TensorLocation>) -> u64 {
    tensors.values().map(|t| (t.end - t.start) as u64).sum()
}

/// A weight file, open, with its header read.
pub(crate) struct Shard {
    pub path: PathBuf,
    pub file: File,
    /// The file's size, which its header accounts for exactly.
    pub len: u64,
}

/// Every weight file of a checkpoint, opened, and the tensors their headers name.
pub(crate) struct Shards {
    pub files: Vec<Shard>,
    pub tensors: HashMap<String, TensorLocation>,
}

impl Shards {
    /// Total payload bytes of all tensors.
    pub fn payload_bytes(&self) -> u64 {
        payload_bytes(&self.tensors)
    }
}

/// Finds the weight files of `dir`, opens each (regular files only) and reads its header.
/// Maps nothing: this is everything [`Checkpoint::open`] checks before mapping.
pub(crate) fn open_shards(dir: &Path) -> Result<Shards, CheckpointError> {
    let mut files = Vec::new();
    let mut tensors: HashMap<String, TensorLocation> = HashMap::new();
    for (file_idx, path) in weight_files(dir)?.into_iter().enumerate() {
        let file = open_regular(&path).map_err(|problem| CheckpointError::File {
            path: path.clone(),
            problem,
        })?;
        let (len, located) = read_header(&path, &file, file_idx)?;
        for (name, loc) in located {
            if let Some(earlier) = tensors.get(&name) {
                let first: &Shard = &files[earlier.file];
                return Err(CheckpointError::TensorInTwoFiles {
                    tensor: name,
                    first: first.path.clone(),
                    second: path,
                });
            }
            tensors.insert(name, loc);
        }
        files.push(Shard { path, file, len });
    }
    Ok(Shards { files, tensors })
}

/// The weight files of `dir`: every shard the index names, else `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    if !dir.is_dir() {
        return Err(CheckpointError::NoDirectory {
            path: dir.to_path_buf(),
        });
    }
    let index = dir.join(INDEX_FILE);
    let single = dir.join(SINGLE_FILE);
    // Whatever is at a name counts as present (a pipe, a dangling link): opening it then says
    // what is wrong with it, instead of "no weights".
    let present = |p: &Path| p.symlink_metadata().is_ok();
    if present(&index) {
        Ok(read_index(&index)?
            .into_iter()
            .map(|name| dir.join(name))
            .collect())
    } else if present(&single) {
        Ok(vec![single])
    } else {
        Err(CheckpointError::NoWeights {
            dir: dir.to_path_buf(),
        })
    }
}

/// Reads the header of the safetensors file `file` (opened from `path`) with plain reads: the
/// file's size and where each tensor's bytes are. Rejects a header that names a tensor twice or
/// whose tensors do not fill the file exactly.
fn read_header(
    path: &Path,
    file: &File,
    file_idx: usize,
) -> Result<(u64, Vec<(String, TensorLocation)>), CheckpointError> {
    let bad = |reason: String| CheckpointError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let read_error = |error| CheckpointError::File {
        path: path.to_path_buf(),
        problem: FileError::Read(error),
    };
    let len = file.metadata().map_err(read_error)?.len();
    if len < 8 {
        return Err(bad(format!(
            "{len} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut prefix = [0u8; 8];
    file.read_exact_at(&mut prefix, 0).map_err(read_error)?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_BYTES || header_len > len - 8 {
        return Err(bad(format!(
            "header length {header_len} does not fit the file's {len} bytes (limit {MAX_HEADER_BYTES})"
        )));
    }
    // Both fit in usize: header_len <= MAX_HEADER_BYTES.
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(read_error)?;
    let keys: FirstRepeatedKey =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    if let Some(tensor) = keys.0 {
        return Err(CheckpointError::DuplicateTensor {
            path: path.to_path_buf(),
            tensor,
        });
    }
    // Checks that the tensors' byte ranges are contiguous and match their dtypes and shapes.
    let metadata: Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + header_len;
    let implied = data_start + metadata.data_len() as u64;
    if implied != len {
        return Err(bad(format!(
            "the header describes {implied} bytes, the file has {len}"
        )));
    }
    let data_start = data_start as usize;
    let located = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (s, e) = info.data_offsets;
            let loc = TensorLocation {
                file: file_idx,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + s,
                end: data_start + e,
            };
            (name, loc)
        })
        .collect();
    Ok((len, located))
}

/// The first top-level key of a JSON object that appears a second time, if any.
struct FirstRepeatedKey(Option<String>);

impl<'de> Deserialize<'de> for FirstRepeatedKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = FirstRepeatedKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut seen = HashSet::new();
                let mut repeated = None;
                // Read to the end even after a repeat: the parser checks the closing brace.
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    if repeated.is_none() && seen.contains(&key) {
                        repeated = Some(key);
                    } else {
                        seen.insert(key);
                    }
                }
                Ok(FirstRepeatedKey(repeated))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

fn map_file(shard: &Shard) -> Result<Mmap, CheckpointError> {
    // SAFETY: the mapping is read-only. Like every mmap-based loader we rely on nobody
    // truncating or rewriting the checkpoint while the process runs (see the module doc).
    let map = unsafe { Mmap::map(&shard.file) }.map_err(|error| CheckpointError::Map {
        path: shard.path.clone(),
        error,
    })?;
    if map.len() as u64 != shard.len {
        return Err(CheckpointError::BadFile {
            path: shard.path.clone(),
            reason: format!(
                "changed size while being opened ({} bytes, then {})",
                shard.len,
                map.len()
            ),
        });
    }
    // Weights are streamed once per token, so 4 KB pages cost a TLB miss every 4 KB: with
    // transparent huge pages in "madvise" mode (the common default) and a filesystem whose page
    // cache holds large folios, this hint makes page faults fill the cache with 2 MB folios and
    // map them whole, whatever the readahead size (measured here with 128 KB readahead:
    // FilePmdMapped 0 without it, the whole file with it; bench decode roofline 0.91–0.95 with
    // 4 KB mappings, 0.94–0.99 with 2 MB). Only a hint: where it fails nothing changes.
    let _ = map.advise(Advice::HugePage);
    Ok(map)
}

/// The distinct shard file names of an index, sorted.
fn read_index(path: &Path) -> Result<Vec<String>, CheckpointError> {
    let bad = |reason: String| CheckpointError::BadIndex {
        path: path.to_path_buf(),
        reason,
    };
    let text = read_regular_to_string(path).map_err(|problem| CheckpointError::File {
        path: path.to_path_buf(),
        problem,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`{tensor}` maps to a non-string")))?;
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!(
                "`{tensor}` maps outside the directory: {file}"
            )));
        }
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    if names.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    names.sort();
    Ok(names)
}
