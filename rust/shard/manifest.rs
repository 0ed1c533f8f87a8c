//! `manifest.json` (written last: its presence means every shard it lists is complete) and the
//! `.progress.json` of an unfinished run. See docs/shards.md for the format.

use super::Skipped;
use crate::error::{Error, Result};
use crate::files;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

pub const MANIFEST: &str = "manifest.json";
pub const PROGRESS: &str = ".progress.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShardInfo {
    /// File name relative to the shard directory.
    pub file: String,
    pub tokens: u64,
    pub documents: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitSummary {
    pub tokens: u64,
    pub documents: u64,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenizerRecord {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InputRecord {
    pub path: String,
    pub documents: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub created_by: String,
    pub tokenizer: TokenizerRecord,
    pub vocab_size: u64,
    pub dtype: String,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub seed: u64,
    pub val_fraction: f64,
    pub shard_tokens: u64,
    pub total_tokens: u64,
    pub total_documents: u64,
    pub documents_read: u64,
    pub input_bytes: u64,
    pub splits: BTreeMap<String, SplitSummary>,
    pub inputs: Vec<InputRecord>,
    pub skipped: Skipped,
}

/// The largest vocabulary a manifest may claim: ids are stored as u32 (uint32 shards).
pub const MAX_VOCAB_SIZE: u64 = 1 << 32;

impl Manifest {
    /// Reads and validates `manifest.json` (see [`Manifest::validate`]): the one reader used by
    /// the loader, by `merge_shards` and by Python's `Manifest.load`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = files::read_utf8(path)?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                path.display().to_string(),
                format!("not a ferrolm shard manifest: {e}"),
            )
        })?;
        manifest.validate(&path.display().to_string())?;
        Ok(manifest)
    }

    /// Checks every field that a reader trusts: the format and its version, the vocabulary size
    /// against the token dtype, special ids against the vocabulary, shard file names (plain names
    /// inside the directory, each listed once), and every total against the sum of its parts.
    /// Nothing is allocated by a size read from the file before this passes.
    pub fn validate(&self, location: &str) -> Result<()> {
        let bad =
            |field: &str, message: String| Error::format(format!("{location}: {field}"), message);
        if self.format != "ferrolm-shards" {
            return Err(bad(
                "format",
                format!("is {:?}, expected \"ferrolm-shards\"", self.format),
            ));
        }
        if self.format_version != super::FORMAT_VERSION {
            return Err(bad(
                "format_version",
                format!(
                    "is {}; this ferrolm reads version {}",
                    self.format_version,
                    super::FORMAT_VERSION
                ),
            ));
        }
        let dtype_max = match self.dtype.as_str() {
            "uint16" => 1u64 << 16,
            "uint32" => MAX_VOCAB_SIZE,
            other => {
                return Err(bad(
                    "dtype",
                    format!("must be \"uint16\" or \"uint32\", got {other:?}"),
                ))
            }
        };
        if self.vocab_size == 0 || self.vocab_size > dtype_max {
            return Err(bad(
                "vocab_size",
                format!(
                    "is {}, expected 1 to {dtype_max} for {} tokens",
                    self.vocab_size, self.dtype
                ),
            ));
        }
        for (field, id) in [("eos_id", self.eos_id), ("bos_id", self.bos_id)] {
            if let Some(id) = id {
                if u64::from(id) >= self.vocab_size {
                    return Err(bad(
                        field,
                        format!("is {id}, not below vocab_size {}", self.vocab_size),
                    ));
                }
            }
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(bad(
                "val_fraction",
                format!("is {}, expected a number in [0, 1)", self.val_fraction),
            ));
        }
        check_file_name(&self.tokenizer.file).map_err(|m| bad("tokenizer.file", m))?;
        let mut seen = std::collections::BTreeSet::new();
        let (mut tokens, mut documents) = (0u64, 0u64);
        for (split, summary) in &self.splits {
            let field = |f: &str| format!("splits.{split}.{f}");
            let (mut t, mut d) = (0u64, 0u64);
            for (i, shard) in summary.shards.iter().enumerate() {
                let f = field(&format!("shards[{i}].file"));
                check_file_name(&shard.file).map_err(|m| bad(&f, m))?;
                if !seen.insert(shard.file.as_str()) {
                    return Err(bad(&f, format!("{:?} is listed twice", shard.file)));
                }
                if shard.sha256.len() != 64 || !shard.sha256.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(bad(
                        &field(&format!("shards[{i}].sha256")),
                        format!("{:?} is not 64 hex digits", shard.sha256),
                    ));
                }
                t = t
                    .checked_add(shard.tokens)
                    .ok_or_else(|| bad(&field("tokens"), "overflows".into()))?;
                d = d
                    .checked_add(shard.documents)
                    .ok_or_else(|| bad(&field("documents"), "overflows".into()))?;
            }
            if t != summary.tokens {
                return Err(bad(
                    &field("tokens"),
                    format!("is {} but its shards hold {t}", summary.tokens),
                ));
            }
            if d != summary.documents {
                return Err(bad(
                    &field("documents"),
                    format!("is {} but its shards hold {d}", summary.documents),
                ));
            }
            tokens = tokens.saturating_add(t);
            documents = documents.saturating_add(d);
        }
        if tokens != self.total_tokens {
            return Err(bad(
                "total_tokens",
                format!("is {} but the splits hold {tokens}", self.total_tokens),
            ));
        }
        if documents != self.total_documents {
            return Err(bad(
                "total_documents",
                format!(
                    "is {} but the splits hold {documents}",
                    self.total_documents
                ),
            ));
        }
        Ok(())
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("manifest serialises");
        files::write_atomic(path, json.as_bytes())
    }
}

/// What an interrupted run had read of one input: enough to know that a resume reads the same.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InputIdentity {
    pub path: String,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
    /// Bytes of the file (as stored) read before the progress file was written, and their sha256.
    pub consumed_bytes: u64,
    pub consumed_sha256: String,
}

/// `(size, mtime in nanoseconds)` of a regular file.
pub fn file_identity(path: &Path) -> Result<(u64, u64)> {
    let meta = files::open_regular(path)?
        .metadata()
        .map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Ok((meta.len(), mtime))
}

impl InputIdentity {
    /// Checks that the file is still what the interrupted run read (`progress` names the
    /// progress file in the error).
    pub fn verify(&self, progress: &Path) -> Result<()> {
        let path = Path::new(&self.path);
        let changed = |what: String| {
            Error::invalid(format!(
                "cannot resume: input {} changed since the interrupted run ({what}; recorded in {}). \
                 Restore it, or start again in an empty directory",
                self.path,
                progress.display()
            ))
        };
        let (size, mtime_ns) = file_identity(path)?;
        if size != self.size {
            return Err(changed(format!("size was {} bytes, now {size}", self.size)));
        }
        if mtime_ns != self.mtime_ns {
            return Err(changed(format!(
                "modification time was {} ns, now {mtime_ns}",
                self.mtime_ns
            )));
        }
        let mut file = files::open_regular(path)?;
        let mut hasher = Sha256::new();
        let mut left = self.consumed_bytes;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n =
                std::io::Read::read(&mut file, &mut buf[..want]).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                return Err(changed(format!(
                    "it now ends before the {} bytes read before",
                    self.consumed_bytes
                )));
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        let sha: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if sha != self.consumed_sha256 {
            return Err(changed(format!(
                "the sha256 of its first {} bytes was {}, now {sha}",
                self.consumed_bytes, self.consumed_sha256
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub tokenizer_sha256: String,
    pub options: String,
    /// Every input begun, in order (a resume checks each and their order).
    pub inputs: Vec<InputIdentity>,
    pub shards: BTreeMap<String, Vec<ShardInfo>>,
}

impl Progress {
    pub fn read(path: &Path) -> Result<Self> {
        let text = files::read_utf8(path)?;
        serde_json::from_str(&text).map_err(|e| {
            Error::format(
                path.display().to_string(),
                format!("unreadable progress file: {e}"),
            )
        })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("progress serialises");
        files::write_atomic(path, json.as_bytes())
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file name that a manifest may list: one plain component (no separator, not `.` or `..`,
/// not absolute, not hidden), so that it names a file inside the manifest's own directory.
pub fn check_file_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
        || Path::new(name).is_absolute()
    {
        return Err(format!(
            "{name:?} is not a plain file name inside the shard directory (no paths, no '..', no hidden names)"
        ));
    }
    Ok(())
}

/// The path of file `name` of directory `dir`, checked to stay inside `dir`: `name` is a plain
/// file name and, if it is a symbolic link, its target still lies inside `dir`.
pub fn contained_path(dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    check_file_name(name).map_err(|m| Error::format(dir.display().to_string(), m))?;
    let path = dir.join(name);
    let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
    if meta.file_type().is_symlink() {
        let real = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
        let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        if !real.starts_with(&root) {
            return Err(Error::format(
                path.display().to_string(),
                format!(
                    "is a symbolic link to {}, outside the shard directory {}",
                    real.display(),
                    root.display()
                ),
            ));
        }
    }
    Ok(path)
}

/// Checks the tokenizer file a manifest names against the manifest: it lies inside `dir`, its
/// sha256 is the recorded one, and its vocabulary size is the manifest's `vocab_size`. The dtype
/// bound in [`Manifest::validate`] lets a uint32 manifest claim up to 2^32 tokens; only the
/// tokenizer itself can say that 4e9 (or a too-small value, which would let out-of-range ids
/// through to the model) is wrong.
pub fn verify_tokenizer(dir: &Path, manifest: &Manifest) -> Result<()> {
    let path = contained_path(dir, &manifest.tokenizer.file)?;
    let text = files::read_utf8(&path)?;
    let location = path.display().to_string();
    let sha = sha256_hex(text.as_bytes());
    if sha != manifest.tokenizer.sha256 {
        return Err(Error::format(
            &location,
            format!(
                "sha256 {sha} does not match tokenizer.sha256 {} in the manifest (replaced or corrupted?)",
                manifest.tokenizer.sha256
            ),
        ));
    }
    let parts = crate::tokenizer::formats::parse_hf_json(&text, &location)?;
    let vocab = crate::tokenizer::Tokenizer::new(parts)?.vocab_size() as u64;
    if vocab != manifest.vocab_size {
        return Err(Error::format(
            format!("{}: vocab_size", dir.join(MANIFEST).display()),
            format!(
                "is {}, but its tokenizer {location} has {vocab} tokens",
                manifest.vocab_size
            ),
        ));
    }
    Ok(())
}

/// Checks a finished shard's size and checksum against its record.
pub fn verify_shard(dir: &Path, shard: &ShardInfo) -> Result<()> {
    let path = contained_path(dir, &shard.file)?;
    let bytes = files::read(&path)?;
    if bytes.len() as u64 != shard.bytes {
        return Err(Error::format(
            path.display().to_string(),
            format!(
                "is {} bytes, the record says {} (truncated or replaced?)",
                bytes.len(),
                shard.bytes
            ),
        ));
    }
    let sha = sha256_hex(&bytes);
    if sha != shard.sha256 {
        return Err(Error::format(
            path.display().to_string(),
            format!(
                "sha256 {sha} does not match the record {} (corrupted?)",
                shard.sha256
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{ShardOptions, ShardWriter};
    use crate::tokenizer::{formats, Tokenizer};
    use std::sync::Arc;

    /// A finished one-shard directory written with a 256-byte + 1 special tokenizer.
    fn shard_dir(name: &str) -> (std::path::PathBuf, Manifest) {
        let dir = std::env::temp_dir().join(format!("ferrolm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let parts = crate::TokenizerParts {
            tokens: (0..=255u8).map(|b| (vec![b], b as u32)).collect(),
            merge_rule: crate::MergeRule::Ranks,
            specials: vec![("<|endoftext|>".to_string(), 256)],
            pattern: crate::tokenizer::pretokenize::GPT2_PATTERN.to_string(),
            split: Default::default(),
            whole_piece_first: true,
            add_prefix_space: false,
        };
        let tokenizer = Arc::new(Tokenizer::new(parts).unwrap());
        let json = formats::to_hf_json(&tokenizer).unwrap();
        let options = ShardOptions {
            output_dir: dir.clone(),
            val_fraction: 0.0,
            shard_tokens: 100,
            seed: 0,
            bos: None,
            eos: Some(256),
            dtype: crate::shard::safetensors::Dtype::U16,
            resume: false,
            num_threads: Some(1),
        };
        let mut writer = ShardWriter::create(options, tokenizer, &json).unwrap();
        writer.add_documents(&["one document", "another"]).unwrap();
        let manifest = writer.finish(Vec::new()).unwrap();
        (dir, manifest)
    }

    #[test]
    fn vocab_size_is_checked_against_the_tokenizer() {
        let (dir, manifest) = shard_dir("vocab-check");
        assert_eq!(manifest.vocab_size, 257);
        verify_tokenizer(&dir, &manifest).unwrap();
        // Both a huge claim (valid for uint32 dtype bounds) and a too-small one are refused.
        for claimed in [4_000_000_000u64, 200, 258] {
            let mut tampered = manifest.clone();
            tampered.vocab_size = claimed;
            tampered.dtype = "uint32".into();
            tampered.eos_id = None; // else validate() already refuses 256 (eos_id 256 out of range)
            tampered.validate("manifest.json").unwrap();
            let err = verify_tokenizer(&dir, &tampered).unwrap_err().to_string();
            assert!(
                err.contains("vocab_size")
                    && err.contains(&format!("is {claimed}"))
                    && err.contains("257 tokens"),
                "{err}"
            );
        }
        // A replaced tokenizer file is caught by its sha256 before it is trusted.
        let mut other = manifest.clone();
        other.tokenizer.sha256 = "0".repeat(64);
        let err = verify_tokenizer(&dir, &other).unwrap_err().to_string();
        assert!(err.contains("does not match tokenizer.sha256"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
