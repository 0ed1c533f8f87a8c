//! The safetensors container, written and read without the safetensors crate: an 8-byte
//! little-endian header length, a JSON header (`{"name": {"dtype", "shape", "data_offsets"}, ...,
//! "__metadata__": {str: str}}`) padded with spaces to 8 bytes, then the tensors' bytes.
//! Shards hold 1-D integer tensors only, so that is all this module supports.

use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;

/// Element types used by shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U16,
    U32,
    U64,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U16 => "U16",
            Dtype::U32 => "U32",
            Dtype::U64 => "U64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
            Dtype::U64 => 8,
        }
    }

    fn parse(name: &str) -> Option<Dtype> {
        match name {
            "U16" => Some(Dtype::U16),
            "U32" => Some(Dtype::U32),
            "U64" => Some(Dtype::U64),
            _ => None,
        }
    }
}

/// One tensor to write: a name, an element type and its little-endian bytes.
pub struct TensorBytes<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub bytes: &'a [u8],
}

/// Writes a safetensors file into `out` (tensors in the order given).
pub fn write(
    out: &mut impl Write,
    tensors: &[TensorBytes<'_>],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for t in tensors {
        let len = t.bytes.len();
        header.insert(
            t.name.into(),
            json!({"dtype": t.dtype.name(), "shape": [len / t.dtype.size()], "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("JSON of strings and ints");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for t in tensors {
        out.write_all(t.bytes)?;
    }
    Ok(())
}

/// Where each tensor lies in a safetensors file (byte ranges relative to the file start).
#[derive(Debug, Clone)]
pub struct Layout {
    pub tensors: BTreeMap<String, (Dtype, Range<usize>)>,
    pub metadata: BTreeMap<String, String>,
}

/// Parses the header of a safetensors file held in `bytes` (the whole file, e.g. a memory map),
/// checking that every tensor lies inside the file. `location` names the file in errors.
pub fn read_layout(bytes: &[u8], location: &str) -> Result<Layout> {
    let bad = |message: String| Error::format(location, message);
    if bytes.len() < 8 {
        return Err(bad(format!(
            "file is {} bytes long: too short for a safetensors header (truncated?)",
            bytes.len()
        )));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let data_start = 8usize
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            bad(format!(
                "header length {header_len} at offset 0 runs past the end of the file ({} bytes): truncated or not safetensors",
                bytes.len()
            ))
        })?;
    let header: Value = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| bad(format!("header at offset 8 is not valid JSON: {e}")))?;
    let object = header
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let mut layout = Layout {
        tensors: BTreeMap::new(),
        metadata: BTreeMap::new(),
    };
    for (name, value) in object {
        if name == "__metadata__" {
            for (k, v) in value.as_object().into_iter().flatten() {
                layout
                    .metadata
                    .insert(k.clone(), v.as_str().unwrap_or_default().to_string());
            }
            continue;
        }
        let dtype = value
            .get("dtype")
            .and_then(Value::as_str)
            .and_then(Dtype::parse)
            .ok_or_else(|| bad(format!("tensor {name:?}: dtype must be U16, U32 or U64")))?;
        let integers = |key: &str| -> Option<Vec<u64>> {
            value
                .get(key)?
                .as_array()?
                .iter()
                .map(Value::as_u64)
                .collect()
        };
        let Some([start, end]) = integers("data_offsets").as_deref().and_then(|o| match o {
            &[a, b] => Some([a, b]),
            _ => None,
        }) else {
            return Err(bad(format!(
                "tensor {name:?}: data_offsets must be two non-negative integers"
            )));
        };
        let range = (data_start as u64)
            .checked_add(start)
            .zip((data_start as u64).checked_add(end))
            .filter(|&(s, e)| s <= e && e <= bytes.len() as u64);
        let Some((start, end)) = range.map(|(s, e)| (s as usize, e as usize)) else {
            return Err(bad(format!(
                "tensor {name:?} claims data_offsets {start}..{end} after a {data_start}-byte header, but the file has {} bytes (truncated?)",
                bytes.len()
            )));
        };
        if (end - start) % dtype.size() != 0 {
            return Err(bad(format!(
                "tensor {name:?}: {} bytes is not a whole number of {} elements",
                end - start,
                dtype.name()
            )));
        }
        let elements = ((end - start) / dtype.size()) as u64;
        if integers("shape").as_deref() != Some(&[elements][..]) {
            return Err(bad(format!(
                "tensor {name:?}: shape {} does not match its {elements} elements (expected [{elements}])",
                value.get("shape").map(Value::to_string).unwrap_or_else(|| "missing".into())
            )));
        }
        layout.tensors.insert(name.clone(), (dtype, start..end));
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_layout() {
        let tokens: Vec<u8> = [1u16, 2, 3].iter().flat_map(|t| t.to_le_bytes()).collect();
        let offsets: Vec<u8> = [0u64, 3].iter().flat_map(|t| t.to_le_bytes()).collect();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "1".to_string());
        let mut file = Vec::new();
        let tensors = [
            TensorBytes {
                name: "tokens",
                dtype: Dtype::U16,
                bytes: &tokens,
            },
            TensorBytes {
                name: "doc_offsets",
                dtype: Dtype::U64,
                bytes: &offsets,
            },
        ];
        write(&mut file, &tensors, &meta).unwrap();
        assert_eq!(u64::from_le_bytes(file[..8].try_into().unwrap()) % 8, 0);
        let layout = read_layout(&file, "mem").unwrap();
        let (dtype, range) = layout.tensors["tokens"].clone();
        assert_eq!(dtype, Dtype::U16);
        assert_eq!(&file[range], &tokens[..]);
        assert_eq!(layout.metadata["format"], "1");
        // Truncation anywhere is an error, never a short tensor.
        for cut in [0, 7, 20, file.len() - 1] {
            assert!(read_layout(&file[..cut], "mem").is_err(), "cut at {cut}");
        }
    }
}
