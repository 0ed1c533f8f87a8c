//! Corpus readers: plain text and JSON lines, optionally zstd- or gzip-compressed, read as blocks
//! of whole lines so that many threads can share one file.
//!
//! What a "sequence" is (the unit a pre-tokenizer sees, and the unit Hugging Face tokenizers'
//! `train(files)` / `train_from_iterator` sees):
//! - plain text (`*.txt` and any other name): one sequence per line, KEEPING its `\n` (and a `\r`
//!   before it); a last line without a newline is a sequence too. This is what Hugging Face
//!   tokenizers' `Tokenizer.train(files)` does, so training on a text file is identical there.
//! - JSON lines (`*.jsonl`, `*.ndjson`): one sequence per
//!   line, the string value of the configured field (default `"text"`), newlines inside it kept.
//!   This is Hugging Face's `train_from_iterator(json.loads(line)[field] for line in file)`.
//!   Blank lines are skipped; a line that is not a JSON object with that field holding a string
//!   is an error naming the file and line.
//!
//! Either may be compressed (`.zst`/`.zstd` or `.gz`). Invalid UTF-8 in a text line is either replaced by U+FFFD (`Utf8Policy::Replace`, the default;
//! the caller gets a count and the first location so it can warn) or an error naming the file
//! and line (`Utf8Policy::Strict`, what Hugging Face does). Nothing is ever dropped silently.
//!
//! Two ways in:
//! - uncompressed files are cut into byte ranges ([`plan_ranges`]) that threads read on their own
//!   ([`read_range`]): a range owns every line that STARTS inside it;
//! - compressed files are a stream; [`LineBlocks`] yields consecutive blocks of whole lines from
//!   any file (compressed or not), for one reader thread or for sequential consumers (sharding).
//!
//! Either way a block of whole lines goes through [`for_each_sequence`].

use crate::error::{Error, Result};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// How the lines of a file hold text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Every line (with its newline) is one sequence.
    Lines,
    /// Every non-blank line is a JSON object; one string field is the sequence.
    JsonLines,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Gzip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputFormat {
    pub layout: Layout,
    pub compression: Compression,
}

/// What to do with bytes that are not UTF-8 in a text line (JSON lines must be UTF-8 anyway;
/// under `Replace` they are repaired before parsing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Utf8Policy {
    /// Replace each invalid sequence by U+FFFD and count the line.
    #[default]
    Replace,
    /// Fail, naming the file and line.
    Strict,
}

impl Utf8Policy {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "replace" => Ok(Utf8Policy::Replace),
            "strict" => Ok(Utf8Policy::Strict),
            other => Err(Error::invalid(format!(
                "errors={other:?} is not a UTF-8 policy: use \"replace\" or \"strict\""
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// The JSON-lines field that holds the text.
    pub text_field: String,
    pub utf8: Utf8Policy,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            text_field: "text".to_string(),
            utf8: Utf8Policy::Replace,
        }
    }
}

/// Lines whose invalid UTF-8 was replaced in one block (or summed over many).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Utf8Report {
    pub replaced_lines: u64,
    /// Byte offset (in the decompressed stream) of the first such line, if any.
    pub first_offset: Option<u64>,
}

impl Utf8Report {
    pub fn absorb(&mut self, other: &Utf8Report) {
        self.replaced_lines += other.replaced_lines;
        self.first_offset = match (self.first_offset, other.first_offset) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The format a file name announces. Unknown extensions are plain text; archive and columnar
/// formats this reader cannot open are an error rather than garbage.
pub fn detect_format(path: &Path) -> Result<InputFormat> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let (inner, compression) = if let Some(stem) = name
        .strip_suffix(".zst")
        .or_else(|| name.strip_suffix(".zstd"))
    {
        (stem, Compression::Zstd)
    } else if let Some(stem) = name.strip_suffix(".gz") {
        (stem, Compression::Gzip)
    } else {
        (name.as_str(), Compression::None)
    };
    for unsupported in [".bz2", ".xz", ".lz4", ".zip", ".tar", ".parquet", ".arrow"] {
        if inner.ends_with(unsupported) {
            return Err(Error::format(
                path.display().to_string(),
                format!(
                    "{unsupported} files are not supported; use plain text or .jsonl, optionally \
                     .zst or .gz compressed"
                ),
            ));
        }
    }
    let layout = if inner.ends_with(".jsonl") || inner.ends_with(".ndjson") {
        Layout::JsonLines
    } else {
        Layout::Lines
    };
    Ok(InputFormat {
        layout,
        compression,
    })
}

/// Splits `len` bytes into ranges of about `block` bytes (at least one range for a non-empty file).
pub fn plan_ranges(len: u64, block: u64) -> Vec<(u64, u64)> {
    let block = block.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < len {
        let end = (start + block).min(len);
        out.push((start, end));
        start = end;
    }
    out
}

/// The lines of an uncompressed file that start in `[start, end)`, whole (the last one may run
/// past `end`). Returns the offset of the first returned line and the bytes.
pub fn read_range(path: &Path, start: u64, end: u64) -> Result<(u64, Vec<u8>)> {
    let io = |e| Error::io(path, e);
    let file = crate::files::open_regular(path)?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut first = start;
    if start > 0 {
        // The line containing byte start-1 belongs to the previous range unless it ends there.
        reader.seek(SeekFrom::Start(start - 1)).map_err(io)?;
        let mut skipped = Vec::new();
        let n = reader.read_until(b'\n', &mut skipped).map_err(io)?;
        first = start - 1 + n as u64;
    }
    if first >= end {
        return Ok((first, Vec::new()));
    }
    let mut data = Vec::with_capacity((end - first) as usize + 256);
    (&mut reader)
        .take(end - first)
        .read_to_end(&mut data)
        .map_err(io)?;
    if data.last().is_some_and(|&b| b != b'\n') {
        reader.read_until(b'\n', &mut data).map_err(io)?;
    }
    Ok((first, data))
}

type Stream = Box<dyn Read + Send>;

/// Consecutive blocks of whole lines from one file, decompressing if the name says so.
pub struct LineBlocks {
    path: std::path::PathBuf,
    reader: Stream,
    counted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    block: usize,
    carry: Vec<u8>,
    offset: u64,
    done: bool,
}

impl LineBlocks {
    /// `block`: the approximate size of each block of decompressed bytes.
    pub fn open(path: &Path, block: usize) -> Result<Self> {
        let format = detect_format(path)?;
        // FIFOs and devices would block or never end: refused before reading.
        let file = crate::files::open_regular(path)?;
        let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let raw = SharedCount {
            inner: file,
            counted: counted.clone(),
        };
        let reader: Stream = match format.compression {
            Compression::None => Box::new(raw),
            Compression::Zstd => {
                let mut decoder =
                    zstd::stream::read::Decoder::new(raw).map_err(|e| Error::io(path, e))?;
                // Accept files written with --long (windows up to 2 GiB).
                decoder.window_log_max(31).map_err(|e| Error::io(path, e))?;
                Box::new(decoder)
            }
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
                std::io::BufReader::with_capacity(1 << 16, raw),
            )),
        };
        Ok(LineBlocks {
            path: path.to_path_buf(),
            reader,
            counted,
            block: block.max(1 << 12),
            carry: Vec::new(),
            offset: 0,
            done: false,
        })
    }

    /// Bytes of the file (compressed, as stored) consumed so far.
    pub fn bytes_consumed(&self) -> u64 {
        self.counted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The next block: (offset of its first byte in the decompressed stream, whole lines), or
    /// None at the end of the file.
    pub fn next_block(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let mut data = std::mem::take(&mut self.carry);
        data.reserve(self.block + (self.block >> 3));
        // data[..scanned] is known to hold no newline.
        let mut scanned = 0;
        loop {
            let want = (self.block + 1).saturating_sub(data.len()).max(1 << 16);
            let read = (&mut self.reader)
                .take(want as u64)
                .read_to_end(&mut data)
                .map_err(|e| self.stream_error(e))?;
            if read == 0 {
                self.done = true;
                break;
            }
            if data.len() > self.block {
                if let Some(cut) = memrchr_newline(&data[scanned..]) {
                    self.carry = data.split_off(scanned + cut + 1);
                    break;
                }
                // A single line longer than the block: keep reading until it ends.
                scanned = data.len();
            }
        }
        if data.is_empty() {
            return Ok(None);
        }
        let offset = self.offset;
        self.offset += data.len() as u64;
        Ok(Some((offset, data)))
    }

    fn stream_error(&self, e: std::io::Error) -> Error {
        use std::io::ErrorKind::{InvalidData, InvalidInput, Other, UnexpectedEof};
        if matches!(e.kind(), Other | InvalidData | InvalidInput | UnexpectedEof) {
            Error::format(
                self.path.display().to_string(),
                format!("cannot decompress: {e}"),
            )
        } else {
            Error::io(&self.path, e)
        }
    }
}

struct SharedCount {
    inner: std::fs::File,
    counted: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Read for SharedCount {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counted
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

fn memrchr_newline(data: &[u8]) -> Option<usize> {
    data.iter().rposition(|&b| b == b'\n')
}

/// Calls `f` with every sequence in `data` (whole lines of `path`, starting at stream offset
/// `base`). Errors name the file and the line (counted from the start of the file on demand).
pub fn for_each_sequence(
    path: &Path,
    format: InputFormat,
    base: u64,
    data: &[u8],
    options: &ReadOptions,
    f: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Utf8Report> {
    let mut report = Utf8Report::default();
    // Fast path: a block that is valid UTF-8 as a whole needs no per-line check.
    let whole = std::str::from_utf8(data).ok();
    let mut start = 0usize;
    while start < data.len() {
        let end = match data[start..].iter().position(|&b| b == b'\n') {
            Some(i) => start + i + 1,
            None => data.len(),
        };
        let line_offset = base + start as u64;
        let line: Cow<'_, str> = match whole {
            Some(text) => Cow::Borrowed(&text[start..end]),
            None => match std::str::from_utf8(&data[start..end]) {
                Ok(text) => Cow::Borrowed(text),
                Err(e) => match options.utf8 {
                    Utf8Policy::Strict => {
                        return Err(Error::format(
                            location(path, format, line_offset),
                            format!(
                            "not valid UTF-8 (invalid byte at column {}); pass errors=\"replace\" \
                                 to replace invalid bytes with U+FFFD",
                            e.valid_up_to() + 1
                        ),
                        ))
                    }
                    Utf8Policy::Replace => {
                        report.replaced_lines += 1;
                        report.first_offset.get_or_insert(line_offset);
                        String::from_utf8_lossy(&data[start..end])
                    }
                },
            },
        };
        match format.layout {
            Layout::Lines => f(&line)?,
            Layout::JsonLines => {
                let trimmed = line.trim_ascii();
                if !trimmed.is_empty() {
                    let text = json_field(trimmed, &options.text_field).map_err(|message| {
                        Error::format(location(path, format, line_offset), message)
                    })?;
                    f(&text)?;
                }
            }
        }
        start = end;
    }
    Ok(report)
}

/// "path:LINE" for the line starting at `offset` of the (decompressed) stream; "path" if the
/// file cannot be re-read to count lines.
pub fn location(path: &Path, format: InputFormat, offset: u64) -> String {
    match line_number_at(path, format, offset) {
        Some(line) => format!("{}:{line}", path.display()),
        None => format!("{} (byte {offset})", path.display()),
    }
}

/// The 1-based line number of the line that starts at `offset`; only used for error messages,
/// so it re-reads the file.
pub fn line_number_at(path: &Path, format: InputFormat, offset: u64) -> Option<u64> {
    let file = crate::files::open_regular(path).ok()?;
    let mut reader: Box<dyn Read> = match format.compression {
        Compression::None => Box::new(file),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file).ok()?),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
    };
    let mut remaining = offset;
    let mut lines = 1u64;
    let mut buf = vec![0u8; 1 << 16];
    while remaining > 0 {
        let want = remaining.min(buf.len() as u64) as usize;
        let n = reader.read(&mut buf[..want]).ok()?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        remaining -= n as u64;
    }
    Some(lines)
}

/// The string value of `field` in one JSON object, borrowed from the line when it has no escapes.
pub fn json_field<'a>(line: &'a str, field: &str) -> std::result::Result<Cow<'a, str>, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let found = FieldSeed(field)
        .deserialize(&mut de)
        .map_err(|e| format!("not a JSON object with a string field {field:?}: {e}"))?;
    de.end()
        .map_err(|e| format!("unexpected text after the JSON object: {e}"))?;
    found.ok_or_else(|| format!("the JSON object has no field {field:?}"))
}

struct FieldSeed<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            if found.is_none() && key.0 == self.0 {
                let value: Text<'de> = map
                    .next_value()
                    .map_err(|e| de::Error::custom(format_args!("field {:?}: {e}", self.0)))?;
                found = Some(value.0);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// A JSON string, borrowed when the input allows it.
struct Text<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferrolm-corpus-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sequences(path: &Path, options: &ReadOptions) -> Result<Vec<String>> {
        let format = detect_format(path)?;
        let mut blocks = LineBlocks::open(path, 1 << 12)?;
        let mut out = Vec::new();
        while let Some((base, data)) = blocks.next_block()? {
            for_each_sequence(path, format, base, &data, options, &mut |s| {
                out.push(s.to_string());
                Ok(())
            })?;
        }
        Ok(out)
    }

    #[test]
    fn formats_from_names() {
        let f = |n: &str| detect_format(Path::new(n));
        assert_eq!(f("a.txt").unwrap().layout, Layout::Lines);
        assert_eq!(f("a").unwrap().layout, Layout::Lines);
        let z = f("dir/A.JSONL.ZST").unwrap();
        assert_eq!(
            (z.layout, z.compression),
            (Layout::JsonLines, Compression::Zstd)
        );
        assert_eq!(f("a.txt.zst").unwrap().layout, Layout::Lines);
        assert_eq!(f("a.jsonl.gz").unwrap().compression, Compression::Gzip);
        assert!(f("a.jsonl.xz").is_err());
        assert!(f("a.parquet").is_err());
    }

    #[test]
    fn ranges_own_the_lines_that_start_in_them() {
        let dir = temp_dir("ranges");
        let path = dir.join("a.txt");
        let text = "one\ntwo two\n\nthree\nlast line without newline";
        std::fs::write(&path, text).unwrap();
        for block in 1..12 {
            let mut joined = Vec::new();
            for (start, end) in plan_ranges(text.len() as u64, block) {
                let (first, data) = read_range(&path, start, end).unwrap();
                if !data.is_empty() {
                    assert_eq!(first as usize, joined.len());
                }
                joined.extend_from_slice(&data);
            }
            assert_eq!(joined, text.as_bytes(), "block {block}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn text_lines_keep_newlines_and_json_lines_give_fields() {
        let dir = temp_dir("lines");
        let txt = dir.join("a.txt");
        std::fs::write(&txt, "a b\r\n\nc").unwrap();
        let options = ReadOptions::default();
        assert_eq!(sequences(&txt, &options).unwrap(), ["a b\r\n", "\n", "c"]);

        let jsonl = dir.join("a.jsonl.zst");
        let raw =
            "{\"id\": 1, \"text\": \"x\\ny\", \"more\": [1, {\"text\": 2}]}\n\n{\"text\": \"z\"}\n";
        let mut enc =
            zstd::stream::write::Encoder::new(std::fs::File::create(&jsonl).unwrap(), 3).unwrap();
        enc.write_all(raw.as_bytes()).unwrap();
        enc.finish().unwrap();
        assert_eq!(sequences(&jsonl, &options).unwrap(), ["x\ny", "z"]);

        let bad = dir.join("b.jsonl");
        std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n").unwrap();
        let err = sequences(&bad, &options).unwrap_err().to_string();
        assert!(
            err.contains("b.jsonl:2") && err.contains("no field \"text\""),
            "{err}"
        );
        std::fs::write(&bad, "{\"text\": null}\n").unwrap();
        let err = sequences(&bad, &options).unwrap_err().to_string();
        assert!(
            err.contains("b.jsonl:1") && err.contains("expected a string"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn invalid_utf8_is_replaced_or_refused() {
        let dir = temp_dir("utf8");
        let path = dir.join("a.txt");
        std::fs::write(&path, b"fine\nbad \xff byte\nfine\n").unwrap();
        let format = detect_format(&path).unwrap();
        let data = std::fs::read(&path).unwrap();
        let mut got = Vec::new();
        let report =
            for_each_sequence(&path, format, 0, &data, &ReadOptions::default(), &mut |s| {
                got.push(s.to_string());
                Ok(())
            })
            .unwrap();
        assert_eq!(got[1], "bad \u{fffd} byte\n");
        assert_eq!(report.replaced_lines, 1);
        assert_eq!(report.first_offset, Some(5));
        let strict = ReadOptions {
            utf8: Utf8Policy::Strict,
            ..ReadOptions::default()
        };
        let err = for_each_sequence(&path, format, 0, &data, &strict, &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.txt:2") && err.contains("UTF-8"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_compressed_files_are_format_errors() {
        let dir = temp_dir("compressed");
        for name in ["a.jsonl.zst", "a.jsonl.gz"] {
            let path = dir.join(name);
            std::fs::write(&path, b"this is not compressed").unwrap();
            let err = sequences(&path, &ReadOptions::default()).unwrap_err();
            assert!(matches!(err, Error::Format { .. }), "{name}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
