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

impl Manifest {
    pub fn read(path: &Path) -> Result<Self> {
        let text = files::read_utf8(path)?;
        serde_json::from_str(&text).map_err(|e| {
            Error::format(
                path.display().to_string(),
                format!("not a ferrolm shard manifest: {e}"),
            )
        })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("manifest serialises");
        files::write_atomic(path, json.as_bytes())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub tokenizer_sha256: String,
    pub options: String,
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

/// Checks a finished shard's size and checksum against its record.
pub fn verify_shard(dir: &Path, shard: &ShardInfo) -> Result<()> {
    let path = dir.join(&shard.file);
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
