//! A bounds-checked walk of a GGUF file's header (no dependencies beyond std).
//!
//! Every length read from the file (strings, arrays, counts) is checked against the
//! bytes that are left before anything is allocated, and every tensor's data range is
//! checked against the file size. The mistral.rs backend runs this before handing a
//! file to candle's reader (which trusts those lengths); the fuzz target
//! `gguf_header` runs it on arbitrary bytes.

use std::io::Read;

/// Why a GGUF header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError(pub String);

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Largest number of dimensions a GGUF tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Default data alignment of GGUF files.
const DEFAULT_ALIGNMENT: u64 = 32;

/// A tensor's place in the file, from the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// ggml type id.
    pub dtype: u32,
    /// Dimensions, innermost first as stored in the file.
    pub dims: Vec<u64>,
    /// Byte offset in the data section.
    pub offset: u64,
    /// Byte size of the data.
    pub bytes: u64,
}

/// A header that passed [`check_header`].
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedHeader {
    /// GGUF version (1 to 3).
    pub version: u32,
    /// Number of metadata entries.
    pub metadata_entries: u64,
    /// Every tensor.
    pub tensors: Vec<TensorEntry>,
    /// Start of the data section.
    pub data_offset: u64,
}

/// Block size (elements) and block byte size of a ggml type id; `None` when unknown.
pub fn ggml_type_layout(id: u32) -> Option<(u64, u64)> {
    Some(match id {
        0 => (1, 4),     // F32
        1 => (1, 2),     // F16
        2 => (32, 18),   // Q4_0
        3 => (32, 20),   // Q4_1
        6 => (32, 22),   // Q5_0
        7 => (32, 24),   // Q5_1
        8 => (32, 34),   // Q8_0
        9 => (32, 36),   // Q8_1
        10 => (256, 84), // Q2_K
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        30 => (1, 2), // BF16
        _ => return None,
    })
}

/// A reader that refuses to read past a known end.
struct Bounded<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Bounded<R> {
    fn need(&self, n: u64, what: &str) -> Result<(), HeaderError> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(HeaderError(format!(
                "truncated or corrupt header: {what} needs {n} bytes at offset {}, the file has {} left",
                self.pos,
                self.len.saturating_sub(self.pos)
            )));
        }
        Ok(())
    }
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, HeaderError> {
        self.need(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut v)
            .map_err(|e| HeaderError(format!("reading {what}: {e}")))?;
        self.pos += n;
        Ok(v)
    }
    fn skip(&mut self, n: u64, what: &str) -> Result<(), HeaderError> {
        self.need(n, what)?;
        std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| HeaderError(format!("reading {what}: {e}")))?;
        self.pos += n;
        Ok(())
    }
    fn u32(&mut self, what: &str) -> Result<u32, HeaderError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, HeaderError> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn len_field(&mut self, version: u32, what: &str) -> Result<u64, HeaderError> {
        if version == 1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }
    fn string(&mut self, version: u32, what: &str) -> Result<Vec<u8>, HeaderError> {
        let n = self.len_field(version, what)?;
        self.bytes(n, what)
    }
    fn skip_string(&mut self, version: u32, what: &str) -> Result<(), HeaderError> {
        let n = self.len_field(version, what)?;
        self.skip(n, what)
    }

    /// Skips one metadata value of type `ty`, nested arrays at most `depth` deep.
    fn skip_value(&mut self, version: u32, ty: u32, depth: u32) -> Result<(), HeaderError> {
        match ty {
            0 | 1 | 7 => self.skip(1, "a metadata value"),
            2 | 3 => self.skip(2, "a metadata value"),
            4..=6 => self.skip(4, "a metadata value"),
            10..=12 => self.skip(8, "a metadata value"),
            8 => self.skip_string(version, "a metadata string"),
            9 => {
                if depth == 0 {
                    return Err(HeaderError("metadata arrays nested too deep".into()));
                }
                let elem = self.u32("an array element type")?;
                let n = self.len_field(version, "an array length")?;
                let fixed = match elem {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    8 | 9 => None,
                    other => {
                        return Err(HeaderError(format!(
                            "unknown metadata array element type {other}"
                        )))
                    }
                };
                match fixed {
                    Some(size) => self.skip(
                        n.checked_mul(size)
                            .ok_or_else(|| HeaderError("metadata array too long".into()))?,
                        "a metadata array",
                    ),
                    None => {
                        // Each element takes at least 4 bytes: a length prefix or a type.
                        self.need(n.saturating_mul(4), "a metadata array")?;
                        for _ in 0..n {
                            self.skip_value(version, elem, depth - 1)?;
                        }
                        Ok(())
                    }
                }
            }
            other => Err(HeaderError(format!("unknown metadata value type {other}"))),
        }
    }
}

/// Walks a GGUF header with every length bounded by `file_len`, and checks every tensor's
/// data lies inside the file. Never allocates more than the file could hold.
pub fn check_header<R: Read>(reader: R, file_len: u64) -> Result<CheckedHeader, HeaderError> {
    let mut r = Bounded {
        inner: reader,
        pos: 0,
        len: file_len,
    };
    let magic = r.bytes(4, "the GGUF magic")?;
    if magic != b"GGUF" {
        return Err(HeaderError(
            "not a GGUF file (the first four bytes are not `GGUF`)".into(),
        ));
    }
    let version = r.u32("the GGUF version")?;
    if !(1..=3).contains(&version) {
        return Err(HeaderError(format!(
            "GGUF version {version} is not supported (1 to 3 are)"
        )));
    }
    let n_tensors = r.len_field(version, "the tensor count")?;
    let n_meta = r.len_field(version, "the metadata count")?;
    // Each metadata entry takes at least 12 bytes, each tensor entry at least 24.
    r.need(n_meta.saturating_mul(12), "the metadata entries")?;
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_meta {
        let key = r.string(version, "a metadata key")?;
        let ty = r.u32("a metadata value type")?;
        if key == b"general.alignment" && (ty == 4 || ty == 5) {
            let v = r.u32("general.alignment")?;
            if v == 0 || !v.is_power_of_two() {
                return Err(HeaderError(format!(
                    "general.alignment {v} is not a power of two"
                )));
            }
            alignment = u64::from(v);
        } else {
            r.skip_value(version, ty, 3)?;
        }
    }
    r.need(n_tensors.saturating_mul(24), "the tensor entries")?;
    let mut tensors = Vec::with_capacity(n_tensors.min(1 << 20) as usize);
    for _ in 0..n_tensors {
        let name = String::from_utf8_lossy(&r.string(version, "a tensor name")?)
            .trim_end_matches('\0')
            .to_string();
        let n_dims = r.u32("a tensor's dimension count")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(HeaderError(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )));
        }
        let mut dims = vec![];
        for _ in 0..n_dims {
            dims.push(r.len_field(version, "a tensor dimension")?);
        }
        let dtype = r.u32("a tensor type")?;
        let offset = r.u64("a tensor offset")?;
        let (block, block_bytes) = ggml_type_layout(dtype)
            .ok_or_else(|| HeaderError(format!("tensor `{name}` has unknown type id {dtype}")))?;
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| HeaderError(format!("tensor `{name}`: size overflows")))?;
        if elems == 0 || elems % block != 0 || dims[0] % block != 0 {
            return Err(HeaderError(format!(
                "tensor `{name}` has {elems} elements, rows of {}: not a whole number of {block}-element blocks",
                dims[0]
            )));
        }
        let bytes = (elems / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| HeaderError(format!("tensor `{name}`: size overflows")))?;
        tensors.push(TensorEntry {
            name,
            dtype,
            dims,
            offset,
            bytes,
        });
    }
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.bytes));
        if end.is_none_or(|e| e > file_len) {
            return Err(HeaderError(format!(
                "truncated file: tensor `{}` ({} bytes at data offset {}) ends past the end of the file ({file_len} bytes)",
                t.name, t.bytes, t.offset
            )));
        }
    }
    Ok(CheckedHeader {
        version,
        metadata_entries: n_meta,
        tensors,
        data_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_lengths_beyond_the_file() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes()); // key length
        let e = check_header(&b[..], b.len() as u64).unwrap_err();
        assert!(e.0.contains("truncated or corrupt"), "{e}");
        assert!(check_header(&b"GGUF"[..], 4).is_err());
        assert!(check_header(&b"ONNX1234"[..], 8)
            .unwrap_err()
            .0
            .contains("not a GGUF"));
    }
}
