//! Documents from files, for sharding.
//!
//! - `.txt` (and any name that is not JSON lines): the whole file is one document, or it is split
//!   at blank lines (Python's `re.split(r"\n\s*\n", text)`) or at an exact delimiter string;
//!   pieces that are empty or only whitespace are skipped and counted. Invalid UTF-8 is replaced by U+FFFD (counted) or an error, by option.
//! - `.jsonl` / `.ndjson`: every non-blank line is a JSON object whose `text_field` holds a string.
//!   A line that is not (bad JSON, no such field, not a string) is skipped and counted, or an error
//!   naming the file and line, by option.
//! - Either may be compressed: `.zst` / `.zstd` or `.gz`, decompressed as a stream.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextSplit {
    WholeFile,
    BlankLines,
    Delimiter(String),
}

#[derive(Debug, Clone)]
pub struct DocumentOptions {
    pub text_field: String,
    pub text_split: TextSplit,
    /// Fail on a bad JSON line instead of skipping and counting it.
    pub strict_lines: bool,
    /// Fail on invalid UTF-8 in a text file instead of replacing it.
    pub strict_utf8: bool,
    /// Documents handed over at once.
    pub batch_documents: usize,
    pub batch_bytes: usize,
}

/// What reading one file found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileStats {
    pub documents: u64,
    pub bytes: u64,
    pub bad_lines: u64,
    pub utf8_replaced: u64,
    pub whitespace_only: u64,
}

fn is_json_lines(name: &str) -> bool {
    name.ends_with(".jsonl") || name.ends_with(".ndjson")
}

/// The sha256 and length of the bytes read from a file so far (as stored, before
/// decompression): what a resume checks to know that the input it re-reads is the same.
#[derive(Clone, Default)]
pub struct PrefixHash {
    pub sha: Sha256,
    pub bytes: u64,
}

impl PrefixHash {
    pub fn hex(&self) -> String {
        self.sha
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

pub type SharedHash = Arc<Mutex<PrefixHash>>;

/// A reader that feeds every byte it returns into a [`PrefixHash`].
struct Hashing<R> {
    inner: R,
    hash: SharedHash,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut h = self.hash.lock().unwrap_or_else(|p| p.into_inner());
        h.sha.update(&buf[..n]);
        h.bytes += n as u64;
        Ok(n)
    }
}

/// The file name without a compression suffix, and a reader that decompresses; the bytes read
/// from the file are hashed into `hash` if given.
pub fn open_decompressed(
    path: &Path,
    hash: Option<SharedHash>,
) -> Result<(String, Box<dyn Read + Send>)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    // A FIFO or a device (/dev/zero) would block or never end: refused before reading.
    let file: Box<dyn Read + Send> = {
        let file = crate::files::open_regular(path)?;
        match hash {
            Some(hash) => Box::new(Hashing { inner: file, hash }),
            None => Box::new(file),
        }
    };
    let io = |e| Error::io(path, e);
    if let Some(inner) = name
        .strip_suffix(".zst")
        .or_else(|| name.strip_suffix(".zstd"))
    {
        let decoder = zstd::stream::read::Decoder::new(file).map_err(io)?;
        Ok((inner.to_string(), Box::new(decoder)))
    } else if let Some(inner) = name.strip_suffix(".gz") {
        Ok((
            inner.to_string(),
            Box::new(flate2::read::MultiGzDecoder::new(file)),
        ))
    } else {
        Ok((name, Box::new(file)))
    }
}

/// Reads the documents of one file, handing them to `sink` in batches, in order.
pub fn read_documents(
    path: &Path,
    options: &DocumentOptions,
    hash: Option<SharedHash>,
    mut sink: impl FnMut(Vec<String>) -> Result<()>,
) -> Result<FileStats> {
    let (name, reader) = open_decompressed(path, hash)?;
    let location = path.display().to_string();
    let mut stats = FileStats::default();
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut push = |doc: String, stats: &mut FileStats, batch: &mut Vec<String>| -> Result<()> {
        stats.documents += 1;
        batch_bytes += doc.len();
        batch.push(doc);
        if batch.len() >= options.batch_documents || batch_bytes >= options.batch_bytes {
            batch_bytes = 0;
            sink(std::mem::take(batch))?;
        }
        Ok(())
    };

    if is_json_lines(&name) {
        // Lines are gathered a batch at a time and then parsed (the parse was most of the
        // sharding time not spent encoding; `add_file` runs this beside the encoding).
        let mut reader = BufReader::with_capacity(1 << 20, reader);
        let mut raw = RawLines::default();
        let mut line_no = 0u64;
        loop {
            let start = raw.bytes.len();
            let n = reader
                .read_until(b'\n', &mut raw.bytes)
                .map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            stats.bytes += n as u64;
            if raw.bytes[start..].iter().all(u8::is_ascii_whitespace) {
                raw.bytes.truncate(start);
            } else {
                raw.lines.push((start, line_no));
            }
            if raw.lines.len() >= options.batch_documents || raw.bytes.len() >= options.batch_bytes
            {
                for doc in raw.parse(&location, options, &mut stats)? {
                    push(doc, &mut stats, &mut batch)?;
                }
            }
        }
        for doc in raw.parse(&location, options, &mut stats)? {
            push(doc, &mut stats, &mut batch)?;
        }
    } else {
        let mut bytes = Vec::new();
        let mut reader = reader;
        reader
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        stats.bytes = bytes.len() as u64;
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) if options.strict_utf8 => {
                return Err(Error::format(
                    &location,
                    format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
                ))
            }
            Err(e) => {
                let lossy = String::from_utf8_lossy(e.as_bytes());
                stats.utf8_replaced += lossy.matches('\u{FFFD}').count() as u64;
                lossy.into_owned()
            }
        };
        let pieces: Vec<&str> = match &options.text_split {
            TextSplit::WholeFile => vec![text.as_str()],
            TextSplit::BlankLines => split_blank_lines(&text),
            TextSplit::Delimiter(d) => text.split(d.as_str()).collect(),
        };
        let whole_file = options.text_split == TextSplit::WholeFile;
        for piece in pieces {
            if !whole_file && piece.chars().all(is_python_space) {
                stats.whitespace_only += 1;
                continue;
            }
            push(piece.to_string(), &mut stats, &mut batch)?;
        }
    }
    if !batch.is_empty() {
        sink(batch)?;
    }
    Ok(stats)
}

/// `re.split(r"\n\s*\n", text)`: a newline, any whitespace, and the LAST newline of that run.
pub fn split_blank_lines(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            // Extend over whitespace; remember the last newline seen after the first.
            let mut j = i + 1;
            let mut last_newline = None;
            while j < bytes.len() {
                let c = text[j..].chars().next().expect("inside the string");
                if !is_python_space(c) {
                    break;
                }
                if c == '\n' {
                    last_newline = Some(j);
                }
                j += c.len_utf8();
            }
            if let Some(end) = last_newline {
                pieces.push(&text[start..i]);
                start = end + 1;
                i = end + 1;
                continue;
            }
        }
        i += 1;
    }
    pieces.push(&text[start..]);
    pieces
}

/// Python's `\s` for str patterns: Unicode White_Space plus the separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// JSON lines read but not parsed yet: the bytes back to back, and where each line starts with
/// its number in the file.
#[derive(Default)]
struct RawLines {
    bytes: Vec<u8>,
    lines: Vec<(usize, u64)>,
}

impl RawLines {
    /// The documents of the lines held (in order, bad lines counted in `stats` or an error
    /// naming `location:line`), emptying the batch.
    fn parse(
        &mut self,
        location: &str,
        options: &DocumentOptions,
        stats: &mut FileStats,
    ) -> Result<Vec<String>> {
        let ends: Vec<usize> = self
            .lines
            .iter()
            .skip(1)
            .map(|&(start, _)| start)
            .chain(std::iter::once(self.bytes.len()))
            .collect();
        let (bytes, field) = (&self.bytes, options.text_field.as_str());
        // On the calling thread: `ShardWriter::add_file` reads on a thread of its own, beside the
        // encoding; on the shared pool the parse would queue behind the encoding it should overlap.
        let parsed = self
            .lines
            .iter()
            .zip(&ends)
            .map(|(&(start, _), &end)| text_of_line(&bytes[start..end], field));
        let mut docs = Vec::with_capacity(self.lines.len());
        for (text, &(_, line_no)) in parsed.zip(&self.lines) {
            match text {
                Ok(text) => docs.push(text),
                Err(reason) if options.strict_lines => {
                    return Err(Error::format(format!("{location}:{line_no}"), reason))
                }
                Err(_) => stats.bad_lines += 1,
            }
        }
        self.bytes.clear();
        self.lines.clear();
        Ok(docs)
    }
}

/// The string `field` of one JSON line: the trainer's reader (`corpus::json_field`, which skips
/// the other fields without building them) and, only when that fails, a full parse that says
/// what is wrong with the line.
fn text_of_line(line: &[u8], field: &str) -> std::result::Result<String, String> {
    if let Ok(text) = std::str::from_utf8(line) {
        if let Ok(found) = crate::corpus::json_field(text, field) {
            return Ok(found.into_owned());
        }
    }
    describe_line(line, field)
}

fn describe_line(line: &[u8], field: &str) -> std::result::Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    match object.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("field {field:?} is not a string but {other}")),
        None => Err(format!("no field {field:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_line_split_matches_the_documented_regex() {
        assert_eq!(split_blank_lines("a\n\nb"), vec!["a", "b"]);
        assert_eq!(split_blank_lines("a\n \n\n  b\nc\n"), vec!["a", "  b\nc\n"]);
        assert_eq!(split_blank_lines("a\nb"), vec!["a\nb"]);
        assert_eq!(split_blank_lines("\n\nx"), vec!["", "x"]);
        assert_eq!(split_blank_lines("a\r\n\r\nb"), vec!["a\r", "b"]);
        assert_eq!(split_blank_lines("é\n\u{3000}\né"), vec!["é", "é"]);
    }

    proptest::proptest! {
        /// The fast reader and the full parse agree on every line: same text, or both refuse.
        #[test]
        fn fast_json_field_agrees_with_the_full_parse(
            text in "\\PC{0,40}",
            other in "\\PC{0,10}",
            before in proptest::bool::ANY,
            ending in proptest::sample::select(vec!["", "\n", "\r\n", " \n"]),
            cut in 0usize..80,
        ) {
            let text_json = serde_json::to_string(&text).unwrap();
            let other_json = serde_json::to_string(&other).unwrap();
            let mut line = if before {
                format!("{{\"id\": [1, {{\"x\": {other_json}}}], \"text\": {text_json}}}{ending}")
            } else {
                format!("{{\"text\": {text_json}, \"meta\": {other_json}}}{ending}")
            };
            if cut < line.len() && line.is_char_boundary(cut) && cut % 3 == 0 {
                line.truncate(cut); // broken lines too
            }
            let fast = text_of_line(line.as_bytes(), "text");
            let full = describe_line(line.as_bytes(), "text");
            proptest::prop_assert_eq!(fast.is_ok(), full.is_ok(), "{:?}", line);
            if let (Ok(a), Ok(b)) = (&fast, &full) {
                proptest::prop_assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn json_line_reasons() {
        assert_eq!(text_of_line(br#"{"text": "hi"}"#, "text").unwrap(), "hi");
        assert!(text_of_line(br#"{"text": 1}"#, "text")
            .unwrap_err()
            .contains("not a string"));
        assert!(text_of_line(br#"{"body": "x"}"#, "text")
            .unwrap_err()
            .contains("no field"));
        assert!(text_of_line(b"{oops", "text")
            .unwrap_err()
            .contains("not valid JSON"));
    }
}
