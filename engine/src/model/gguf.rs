//! GGUF (v2 and v3) reader and writer.
//!
//! The reader memory-maps the file and parses the header, every metadata
//! key/value, and the tensor table. Nothing read from the file is trusted:
//! counts and lengths are bounded by the bytes that remain, tensor extents are
//! checked against the file size, and arithmetic on dimensions is checked, so
//! any input gives `Ok` or a one-line `GgufError`, never a panic.
//!
//! The writer produces GGUF v3 files; tests use it to build tiny models.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::quant::GgmlType;

/// "GGUF" read as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused so a crafted file cannot
/// exhaust the stack through recursion.
const MAX_ARRAY_DEPTH: usize = 8;

// GGUF metadata value type ids.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// What went wrong, for callers that want to branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufErrorKind {
    /// The file could not be opened, read, mapped or written.
    Io,
    /// The magic number is not "GGUF".
    NotGguf,
    /// A GGUF version other than 2 or 3.
    UnsupportedVersion,
    /// The file ends before something it declares.
    Truncated,
    /// A structurally invalid value (bad type id, duplicate key, overflow...).
    Invalid,
}

/// One line naming the file and the problem.
#[derive(Debug, Clone)]
pub struct GgufError {
    path: PathBuf,
    kind: GgufErrorKind,
    message: String,
}

impl GgufError {
    fn new(path: &Path, kind: GgufErrorKind, message: impl Into<String>) -> Self {
        GgufError {
            path: path.to_path_buf(),
            kind,
            message: message.into(),
        }
    }

    /// What kind of problem it is.
    pub fn kind(&self) -> GgufErrorKind {
        self.kind
    }

    /// The file the problem is in (`<gguf writer>` for the writer's own errors).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The problem without the file name.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for GgufError {}

/// A metadata value, one variant per GGUF value type.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// GGUF_TYPE_UINT8 (type id 0).
    U8(u8),
    /// GGUF_TYPE_INT8 (1).
    I8(i8),
    /// GGUF_TYPE_UINT16 (2).
    U16(u16),
    /// GGUF_TYPE_INT16 (3).
    I16(i16),
    /// GGUF_TYPE_UINT32 (4).
    U32(u32),
    /// GGUF_TYPE_INT32 (5).
    I32(i32),
    /// GGUF_TYPE_UINT64 (10).
    U64(u64),
    /// GGUF_TYPE_INT64 (11).
    I64(i64),
    /// GGUF_TYPE_FLOAT32 (6).
    F32(f32),
    /// GGUF_TYPE_FLOAT64 (12).
    F64(f64),
    /// GGUF_TYPE_BOOL (7): one byte, 0 or 1 (any other byte is refused).
    Bool(bool),
    /// GGUF_TYPE_STRING (8): u64 length, then bytes; read lossily, so an
    /// invalid UTF-8 byte becomes U+FFFD.
    String(String),
    /// GGUF_TYPE_ARRAY (9): element type, u64 count, elements. All elements
    /// have one type; arrays nest at most 8 deep.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Floats, and integers converted to f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32),
        }
    }

    /// The text of a `String`; None for any other type.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// A `Bool`'s value; None for any other type (integers are not truthy).
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An `Array`'s elements; None for any other type.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF type id of this value.
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => T_U8,
            MetaValue::I8(_) => T_I8,
            MetaValue::U16(_) => T_U16,
            MetaValue::I16(_) => T_I16,
            MetaValue::U32(_) => T_U32,
            MetaValue::I32(_) => T_I32,
            MetaValue::U64(_) => T_U64,
            MetaValue::I64(_) => T_I64,
            MetaValue::F32(_) => T_F32,
            MetaValue::F64(_) => T_F64,
            MetaValue::Bool(_) => T_BOOL,
            MetaValue::String(_) => T_STRING,
            MetaValue::Array(_) => T_ARRAY,
        }
    }
}

/// One tensor's entry in the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`), unique in the file.
    pub name: String,
    /// ggml order: `dims[0]` is the innermost dimension (the row length).
    pub dims: Vec<u64>,
    /// The element type; `dims[0]` is a whole number of its blocks.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Bytes of data.
    pub size: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        // Checked at load time not to overflow.
        self.dims.iter().product()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: std::collections::HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io = |what: &str, e: std::io::Error| {
            GgufError::new(path, GgufErrorKind::Io, format!("cannot {what}: {e}"))
        };
        let file = std::fs::File::open(path).map_err(|e| io("open", e))?;
        let len = file.metadata().map_err(|e| io("read metadata of", e))?.len();
        if len < 8 {
            return Err(GgufError::new(
                path,
                GgufErrorKind::NotGguf,
                format!("not a GGUF file (only {len} bytes)"),
            ));
        }
        // SAFETY: the map is read-only and private to this process. If another
        // process truncates the file while it is mapped, reads may fault; that
        // is the accepted contract of memory-mapped model files (llama.cpp and
        // safetensors do the same).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io("memory-map", e))?;
        let parsed = parse(&mmap, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            by_name: parsed
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            metadata: parsed.metadata,
            tensors: parsed.tensors,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's GGUF version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and of every tensor's offset in it:
    /// `general.alignment`, or [`DEFAULT_ALIGNMENT`] when the key is absent.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute offset of the tensor data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Every metadata key/value, sorted by key (keys are unique in the file).
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// The value of metadata key `key` (e.g. `llama.block_count`), if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// `key` as a u32: any integer type whose value fits; None if absent,
    /// negative, too large or not an integer.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    /// `key` as a u64, as [`MetaValue::as_u64`] reads it.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// `key` as an f32, as [`MetaValue::as_f32`] reads it (integers too).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    /// `key` as text; None if absent or not a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// `key` as a bool; None if absent or not a bool.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor. Extents were checked at load time; a
    /// `TensorInfo` from another file that does not fit gives an empty slice.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        t.offset
            .checked_add(t.size)
            .and_then(|end| self.mmap.get(t.offset..end))
            .unwrap_or(&[])
    }

    /// The shared mapping, for callers that keep tensor views alive beyond
    /// this struct.
    pub fn mmap(&self) -> Arc<Mmap> {
        Arc::clone(&self.mmap)
    }
}

struct Parsed {
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
}

/// A bounds-checked little-endian cursor over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: &dyn fmt::Display, need: u64) -> GgufError {
        GgufError::new(
            self.path,
            GgufErrorKind::Truncated,
            format!(
                "truncated: {what} needs {need} bytes at byte {} but the file has {} bytes",
                self.pos,
                self.buf.len()
            ),
        )
    }

    fn invalid(&self, msg: String) -> GgufError {
        GgufError::new(self.path, GgufErrorKind::Invalid, msg)
    }

    fn take(&mut self, n: usize, what: &dyn fmt::Display) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what, n as u64));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string: u64 length, then that many bytes.
    fn raw_string(&mut self, what: &dyn fmt::Display) -> Result<&'a [u8], GgufError> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.truncated(what, len));
        }
        self.take(len as usize, what)
    }

    /// Strings used as names must be valid UTF-8.
    fn name_string(&mut self, what: &dyn fmt::Display) -> Result<String, GgufError> {
        let start = self.pos;
        let bytes = self.raw_string(what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.invalid(format!("{what} at byte {start} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &dyn fmt::Display, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            T_U8 => MetaValue::U8(self.array::<1>(what)?[0]),
            T_I8 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            T_U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            T_I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            T_U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            T_I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            T_U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            T_I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            T_F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            T_F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            T_BOOL => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => return Err(self.invalid(format!("{what} at byte {at}: bool byte {b} is not 0 or 1"))),
                }
            }
            // Values (token texts above all) are taken as they are; a stray
            // invalid byte becomes U+FFFD rather than failing the whole file.
            T_STRING => MetaValue::String(String::from_utf8_lossy(self.raw_string(what)?).into_owned()),
            T_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let elem_ty = self.u32(what)?;
                let min = min_value_size(elem_ty)
                    .ok_or_else(|| self.invalid(format!("{what}: unknown array element type {elem_ty}")))?;
                let count = self.u64(what)?;
                let need = count.saturating_mul(min as u64);
                if need > self.remaining() as u64 {
                    return Err(self.truncated(&format_args!("{what} ({count} elements)"), need));
                }
                // `count` is now bounded by the bytes left, so this allocation is too.
                let mut items = Vec::with_capacity(count as usize);
                for i in 0..count {
                    items.push(self.value(elem_ty, &format_args!("{what}[{i}]"), depth + 1)?);
                }
                MetaValue::Array(items)
            }
            other => return Err(self.invalid(format!("{what}: unknown value type {other}"))),
        })
    }
}

/// The fewest bytes one value of type `ty` occupies, or None for an unknown type.
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 | T_STRING => 8,
        T_ARRAY => 12,
        _ => return None,
    })
}

fn parse(buf: &[u8], path: &Path) -> Result<Parsed, GgufError> {
    let mut c = Cursor { buf, pos: 0, path };
    let magic = c.u32(&"magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::new(
            path,
            GgufErrorKind::NotGguf,
            format!("not a GGUF file (magic 0x{magic:08x}, expected 0x{GGUF_MAGIC:08x} \"GGUF\")"),
        ));
    }
    let version = c.u32(&"version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::new(
            path,
            GgufErrorKind::UnsupportedVersion,
            format!("unsupported GGUF version {version} (2 and 3 are supported)"),
        ));
    }
    let n_tensors = c.u64(&"tensor count")?;
    let n_kv = c.u64(&"metadata count")?;

    // Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes.
    if n_kv.saturating_mul(13) > c.remaining() as u64 {
        return Err(c.truncated(&format_args!("{n_kv} metadata entries"), n_kv.saturating_mul(13)));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.name_string(&format_args!("metadata key #{i}"))?;
        let what = format!("metadata '{key}'");
        let ty = c.u32(&what)?;
        let value = c.value(ty, &what, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(c.invalid(format!("duplicate metadata key '{key}'")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= (1 << 30) => a as usize,
            _ => return Err(c.invalid(format!("general.alignment {v:?} is not a power of two"))),
        },
    };

    // Each tensor info takes at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset).
    if n_tensors.saturating_mul(24) > c.remaining() as u64 {
        return Err(c.truncated(&format_args!("{n_tensors} tensor infos"), n_tensors.saturating_mul(24)));
    }
    struct Raw {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        rel_offset: u64,
        size: u64,
    }
    let mut raws = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = c.name_string(&format_args!("name of tensor #{i}"))?;
        let what = format!("tensor '{name}'");
        let n_dims = c.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(c.invalid(format!("{what} has {n_dims} dimensions (at most {MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let ty_id = c.u32(&what)?;
        let ty = GgmlType::from_id(ty_id)
            .ok_or_else(|| {
                c.invalid(format!(
                    "{what} has {}, which ferry does not load (it loads {})",
                    crate::model::ggml_type_names::describe_type_id(ty_id),
                    crate::model::ggml_type_names::supported_weight_types()
                ))
            })?;
        let rel_offset = c.u64(&what)?;
        if rel_offset % alignment as u64 != 0 {
            return Err(c.invalid(format!(
                "{what} has offset {rel_offset}, not a multiple of the alignment {alignment}"
            )));
        }
        let n_elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| c.invalid(format!("{what}: element count of dims {dims:?} overflows")))?;
        let row = dims.first().copied().unwrap_or(1);
        let block = ty.block_size() as u64;
        if row % block != 0 {
            return Err(c.invalid(format!(
                "{what}: row length {row} is not a whole number of {} blocks of {block}",
                ty.name()
            )));
        }
        let size = (n_elems / block)
            .checked_mul(ty.type_size() as u64)
            .ok_or_else(|| c.invalid(format!("{what}: byte size overflows")))?;
        if !names.insert(name.clone()) {
            return Err(c.invalid(format!("duplicate tensor name '{name}'")));
        }
        raws.push(Raw { name, dims, ty, rel_offset, size });
    }

    let data_offset = align_up(c.pos as u64, alignment as u64);
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raws.len());
    for r in raws {
        let start = data_offset.checked_add(r.rel_offset);
        let end = start.and_then(|s| s.checked_add(r.size));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                name: r.name,
                dims: r.dims,
                ty: r.ty,
                // Both fit in the file length, hence in usize.
                offset: start as usize,
                size: r.size as usize,
            }),
            _ => {
                let end = end.map_or_else(|| "beyond u64".into(), |e| e.to_string());
                return Err(GgufError::new(
                    path,
                    GgufErrorKind::Truncated,
                    format!(
                        "truncated: data of tensor '{}' ends at byte {end} but the file has {file_len} bytes",
                        r.name
                    ),
                ));
            }
        }
    }
    Ok(Parsed {
        version,
        alignment,
        data_offset: data_offset.min(file_len) as usize,
        metadata,
        tensors,
    })
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a).saturating_mul(a)
}

/// Builds a GGUF v3 file in memory and writes it out.
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<WriterTensor>,
    alignment: usize,
}

struct WriterTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

const WRITER_PATH: &str = "<gguf writer>";

impl GgufWriter {
    /// An empty file: no metadata, no tensors, [`DEFAULT_ALIGNMENT`].
    pub fn new() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    fn err(msg: String) -> GgufError {
        GgufError::new(Path::new(WRITER_PATH), GgufErrorKind::Invalid, msg)
    }

    /// Sets the data alignment; also records it as `general.alignment`.
    pub fn set_alignment(&mut self, alignment: usize) -> Result<&mut Self, GgufError> {
        if alignment == 0 || !alignment.is_power_of_two() || alignment > u32::MAX as usize {
            return Err(Self::err(format!("alignment {alignment} is not a power of two")));
        }
        self.alignment = alignment;
        self.metadata.retain(|(k, _)| k != "general.alignment");
        self.metadata
            .push(("general.alignment".into(), MetaValue::U32(alignment as u32)));
        Ok(self)
    }

    /// Adds (or replaces) a metadata entry.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        let key = key.into();
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.metadata.push((key, value));
        }
        self
    }

    /// Adds a tensor; `data` must hold exactly the bytes its dims and type need.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        if dims.len() > MAX_DIMS as usize {
            return Err(Self::err(format!("tensor '{name}' has {} dims (at most {MAX_DIMS})", dims.len())));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Self::err(format!("duplicate tensor name '{name}'")));
        }
        let n: Option<u64> = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let row = dims.first().copied().unwrap_or(1) as usize;
        let expect = n.and_then(|n| {
            let rows = n.checked_div(row as u64).unwrap_or(0);
            ty.row_bytes(row)?.checked_mul(rows as usize)
        });
        match expect {
            Some(e) if e == data.len() => {}
            Some(e) => {
                return Err(Self::err(format!(
                    "tensor '{name}': {} bytes given, dims {dims:?} of {} need {e}",
                    data.len(),
                    ty.name()
                )))
            }
            None => {
                return Err(Self::err(format!(
                    "tensor '{name}': dims {dims:?} are not whole {} blocks or overflow",
                    ty.name()
                )))
            }
        }
        self.tensors.push(WriterTensor { name, dims: dims.to_vec(), ty, data });
        Ok(self)
    }

    /// The complete file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v).map_err(|m| Self::err(format!("metadata '{k}': {m}")))?;
        }
        let a = self.alignment as u64;
        let mut rel = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&rel.to_le_bytes());
            offsets.push(rel);
            rel = align_up(rel + t.data.len() as u64, a);
        }
        let data_start = align_up(out.len() as u64, a) as usize;
        out.resize(data_start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off as usize, 0);
            out.extend_from_slice(&t.data);
        }
        // Pad the last tensor too, as ggml's writer does.
        let end = align_up(out.len() as u64, a) as usize;
        out.resize(end, 0);
        Ok(out)
    }

    /// Writes [`Self::to_bytes`] to `path`, replacing any file there.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes)
            .map_err(|e| GgufError::new(path, GgufErrorKind::Io, format!("cannot write: {e}")))
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) -> Result<(), String> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is written as u8.
            let ty = items.first().map_or(T_U8, MetaValue::type_id);
            if items.iter().any(|x| x.type_id() != ty) {
                return Err("array elements have different types".into());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, x)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn sample_writer() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", MetaValue::String("llama".into()))
            .add_metadata("u8", MetaValue::U8(200))
            .add_metadata("i8", MetaValue::I8(-5))
            .add_metadata("u16", MetaValue::U16(60000))
            .add_metadata("i16", MetaValue::I16(-30000))
            .add_metadata("u32", MetaValue::U32(4_000_000_000))
            .add_metadata("i32", MetaValue::I32(-7))
            .add_metadata("u64", MetaValue::U64(1 << 40))
            .add_metadata("i64", MetaValue::I64(-(1 << 40)))
            .add_metadata("f32", MetaValue::F32(1.5))
            .add_metadata("f64", MetaValue::F64(-2.25))
            .add_metadata("bool", MetaValue::Bool(true))
            .add_metadata(
                "strings",
                MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("héllo ▁".into())]),
            )
            .add_metadata(
                "nested",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]),
                    MetaValue::Array(vec![MetaValue::I32(3)]),
                ]),
            );
        let f32_data: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.add_tensor("a.weight", &[4, 3], GgmlType::F32, f32_data).unwrap();
        // One Q8_0 block row: 34 bytes, 2 rows.
        let q: Vec<u8> = (0..68).map(|i| i as u8).collect();
        w.add_tensor("b.weight", &[32, 2], GgmlType::Q8_0, q).unwrap();
        w.add_tensor("c.bias", &[5], GgmlType::F16, vec![7u8; 10]).unwrap();
        w
    }

    #[test]
    fn round_trip() {
        let w = sample_writer();
        let path = tmp_path("roundtrip.gguf");
        w.write(&path).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.alignment(), 32);
        assert_eq!(g.data_offset() % 32, 0);
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get("u8"), Some(&MetaValue::U8(200)));
        assert_eq!(g.get("i8"), Some(&MetaValue::I8(-5)));
        assert_eq!(g.get("u16"), Some(&MetaValue::U16(60000)));
        assert_eq!(g.get("i16"), Some(&MetaValue::I16(-30000)));
        assert_eq!(g.get_u32("u32"), Some(4_000_000_000));
        assert_eq!(g.get("i32").unwrap().as_u64(), None, "negative ints are not u64");
        assert_eq!(g.get_u64("u64"), Some(1 << 40));
        assert_eq!(g.get("i64"), Some(&MetaValue::I64(-(1 << 40))));
        assert_eq!(g.get_f32("f32"), Some(1.5));
        assert_eq!(g.get("f64"), Some(&MetaValue::F64(-2.25)));
        assert_eq!(g.get_bool("bool"), Some(true));
        let s = g.get("strings").unwrap().as_array().unwrap();
        assert_eq!(s[1].as_str(), Some("héllo ▁"));
        let n = g.get("nested").unwrap().as_array().unwrap();
        assert_eq!(n[0], MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]));
        assert_eq!(g.metadata().len(), 14);

        assert_eq!(g.tensors().len(), 3);
        let a = g.tensor("a.weight").unwrap();
        assert_eq!(a.dims, vec![4, 3]);
        assert_eq!(a.ty, GgmlType::F32);
        assert_eq!(a.size, 48);
        assert_eq!(a.offset % 32, 0);
        let floats: Vec<f32> = g
            .tensor_data(a)
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, (0..12).map(|i| i as f32).collect::<Vec<_>>());
        let b = g.tensor("b.weight").unwrap();
        assert_eq!(b.size, 68);
        assert_eq!(b.offset % 32, 0);
        assert_eq!(g.tensor_data(b), (0..68).map(|i| i as u8).collect::<Vec<_>>().as_slice());
        assert_eq!(g.tensor_data(g.tensor("c.bias").unwrap()), &[7u8; 10]);
        assert!(g.tensor("missing").is_none());
        assert_eq!(g.mmap().len(), std::fs::metadata(&path).unwrap().len() as usize);
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let mut w = sample_writer();
        w.set_alignment(64).unwrap();
        let bytes = w.to_bytes().unwrap();
        let path = tmp_path("align64.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.alignment(), 64);
        assert_eq!(g.get_u32("general.alignment"), Some(64));
        for t in g.tensors() {
            assert_eq!(t.offset % 64, 0, "{}", t.name);
        }
    }

    /// Hand-built header bytes, independent of the writer, so the writer and
    /// reader cannot agree on a wrong layout.
    #[test]
    fn parses_hand_built_v2_file() {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&1u64.to_le_bytes()); // kvs
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(b"key");
        b.extend_from_slice(&8u32.to_le_bytes()); // string
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(b"hi");
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(b"t");
        b.extend_from_slice(&2u32.to_le_bytes()); // n_dims
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // F32
        b.extend_from_slice(&0u64.to_le_bytes()); // offset
        let data_start = b.len().div_ceil(32) * 32;
        b.resize(data_start, 0);
        for x in [1.0f32, 2.0, 3.0, 4.0] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        let path = tmp_path("v2.gguf");
        std::fs::write(&path, &b).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version(), 2);
        assert_eq!(g.get_str("key"), Some("hi"));
        let t = g.tensor("t").unwrap();
        assert_eq!((t.offset, t.size), (data_start, 16));
        assert_eq!(g.data_offset(), data_start);
    }

    fn open_bytes(name: &str, bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let path = tmp_path(name);
        std::fs::write(&path, bytes).unwrap();
        GgufFile::open(&path)
    }

    #[test]
    fn clear_errors() {
        let e = open_bytes("bad_magic.gguf", b"GGML\x03\0\0\0\0\0\0\0\0\0\0\0").unwrap_err();
        assert_eq!(e.kind(), GgufErrorKind::NotGguf);
        let msg = e.to_string();
        assert!(msg.contains("bad_magic.gguf: not a GGUF file (magic 0x4c4d4747"), "{msg}");
        assert!(!msg.contains('\n'));

        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&7u32.to_le_bytes());
        v.extend_from_slice(&[0u8; 16]);
        let e = open_bytes("v7.gguf", &v).unwrap_err();
        assert_eq!(e.kind(), GgufErrorKind::UnsupportedVersion);
        assert!(e.to_string().contains("version 7"));

        let e = GgufFile::open(tmp_path("does-not-exist.gguf")).unwrap_err();
        assert_eq!(e.kind(), GgufErrorKind::Io);
        assert!(e.to_string().contains("does-not-exist.gguf: cannot open"));

        // Drop the last bytes of tensor data: the message names the tensor.
        let bytes = sample_writer().to_bytes().unwrap();
        let g_len = bytes.len();
        let cut = &bytes[..g_len - 40];
        let e = open_bytes("cut.gguf", cut).unwrap_err();
        assert_eq!(e.kind(), GgufErrorKind::Truncated);
        assert!(
            e.to_string().contains("truncated: data of tensor 'c.bias' ends at byte"),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("but the file has {} bytes", g_len - 40)));
    }

    /// Rewrites the type id of the first tensor to 99.
    #[test]
    fn unknown_tensor_type_names_tensor_and_id() {
        let mut w = GgufWriter::new();
        w.add_tensor("blk.0.x", &[2], GgmlType::F32, vec![0; 8]).unwrap();
        let mut bytes = w.to_bytes().unwrap();
        // header 24 bytes, name (8 + 7), n_dims 4, one dim 8, then the type.
        let at = 24 + 8 + 7 + 4 + 8;
        assert_eq!(&bytes[at..at + 4], &0u32.to_le_bytes());
        bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = open_bytes("badtype.gguf", &bytes).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("badtype.gguf"), "{msg}");
        assert!(msg.contains("tensor 'blk.0.x' has unknown type id 99, which ferry does not load (it loads F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16"), "{msg}");
        // A known ggml type that ferry does not load is named.
        bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
        let e = open_bytes("badtype.gguf", &bytes).unwrap_err();
        assert!(e.to_string().contains("tensor 'blk.0.x' has type IQ2_XXS (ggml type 16), which ferry does not load"), "{e}");
    }

    #[test]
    fn rejects_partial_blocks_and_overflow() {
        // Build a Q8_0 tensor header claiming dims[0] = 33 by hand-editing.
        let mut w = GgufWriter::new();
        w.add_tensor("q", &[32], GgmlType::Q8_0, vec![0; 34]).unwrap();
        let mut bytes = w.to_bytes().unwrap();
        let dim_at = 24 + 8 + 1 + 4;
        bytes[dim_at..dim_at + 8].copy_from_slice(&33u64.to_le_bytes());
        let e = open_bytes("partial.gguf", &bytes).unwrap_err();
        assert!(e.to_string().contains("not a whole number of Q8_0 blocks"), "{e}");

        bytes[dim_at..dim_at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
        let e = open_bytes("huge.gguf", &bytes).unwrap_err();
        assert!(e.kind() == GgufErrorKind::Truncated || e.kind() == GgufErrorKind::Invalid, "{e}");

        // The writer refuses mismatched data too.
        let mut w = GgufWriter::new();
        assert!(w.add_tensor("x", &[33], GgmlType::Q4_0, vec![0; 18]).is_err());
        assert!(w.add_tensor("x", &[4], GgmlType::F32, vec![0; 15]).is_err());
        assert!(w.add_tensor("x", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]).is_err());
    }

    /// Every truncation and many byte flips of a valid file give Ok or Err.
    #[test]
    fn never_panics_on_damaged_files() {
        let bytes = sample_writer().to_bytes().unwrap();
        let path = tmp_path("fuzz.gguf");
        for cut in 0..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            // Whatever parses must lie inside the bytes that are there.
            if let Ok(g) = GgufFile::open(&path) {
                for t in g.tensors() {
                    assert!(t.offset + t.size <= cut);
                }
            }
        }
        // Deterministic xorshift so failures reproduce.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut b = bytes.clone();
            let flips = 1 + next() % 4;
            for _ in 0..flips {
                let i = (next() as usize) % b.len();
                b[i] ^= 1 << (next() % 8);
            }
            std::fs::write(&path, &b).unwrap();
            if let Ok(g) = GgufFile::open(&path) {
                for t in g.tensors() {
                    assert_eq!(g.tensor_data(t).len(), t.size);
                }
            }
        }
        // Huge counts and lengths at every u64 field position.
        for pos in 8..bytes.len().min(600) {
            let mut b = bytes.clone();
            if pos + 8 <= b.len() {
                b[pos..pos + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            }
            std::fs::write(&path, &b).unwrap();
            let _ = GgufFile::open(&path);
        }
    }

    #[test]
    fn deeply_nested_arrays_are_refused() {
        let mut v = MetaValue::U8(1);
        for _ in 0..20 {
            v = MetaValue::Array(vec![v]);
        }
        let mut w = GgufWriter::new();
        w.add_metadata("deep", v);
        let e = open_bytes("deep.gguf", &w.to_bytes().unwrap()).unwrap_err();
        assert!(e.to_string().contains("nested deeper"), "{e}");
    }

    /// The real model, when present: header facts checked against gguf-py's view.
    #[test]
    fn opens_real_model() {
        let path = std::env::var("FERRY_TEST_MODEL")
            .unwrap_or_else(|_| "/work/cache/SmolLM2-135M-Instruct.Q4_1.gguf".into());
        if !Path::new(&path).exists() {
            eprintln!("skipping opens_real_model: {path} not found (set FERRY_TEST_MODEL)");
            return;
        }
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        if g.get_str("general.name") != Some("Smollm2 135M 8k Lc100K Mix1 Ep2") {
            eprintln!("not the SmolLM2 file; only generic checks");
            return;
        }
        // Values from gguf-py's GGUFReader on this file.
        assert_eq!(g.tensors().len(), 272);
        assert_eq!(g.metadata().len(), 33);
        assert_eq!(g.get_u32("llama.block_count"), Some(30));
        assert_eq!(g.get_u32("llama.embedding_length"), Some(576));
        assert_eq!(g.get_f32("llama.rope.freq_base"), Some(100000.0));
        assert_eq!(g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap().len(), 49152);
        let t = g.tensor("token_embd.weight").unwrap();
        assert_eq!(t.dims, vec![576, 49152]);
        assert_eq!(t.ty, GgmlType::Q8_0);
        assert_eq!(g.data_offset(), 1785664);
        assert_eq!(t.offset, 1785664);
        assert_eq!(t.size, 30081024);
        let last = g.tensor("output_norm.weight").unwrap();
        assert_eq!((last.offset, last.size), (98360128, 2304));
        let q41 = g.tensors().iter().filter(|t| t.ty == GgmlType::Q4_1).count();
        assert_eq!(q41, 210);
    }
}
