//! Corpus sharding: documents in, tokenized safetensors shards and a manifest out.
//!
//! Documents arrive in order (files sorted, documents in file order). Each is assigned to `train`
//! or `val` by a seeded hash of its bytes ([`split_hash`]), so the split does not depend on thread
//! count or on any other document. Batches are encoded on all cores and appended in order; a shard
//! is closed as soon as it holds at least `shard_tokens` tokens (whole documents only), so the
//! output depends only on the documents, the tokenizer and the options.
//!
//! Crash safety: shards are written under a temporary name and renamed; after each rename the list
//! of finished shards is saved to `.progress.json`; `manifest.json` is written last. Resume
//! re-reads the input, hashes documents to know their split, skips (without encoding) those already
//! in finished shards, and carries on: the result is byte-identical to an uninterrupted run.
//! Skipping by count is only right over the same inputs, so the progress file records each
//! input begun (path, size, mtime, sha256 of the bytes consumed) and a resume refuses, naming the
//! file and what changed, when any differs.

pub mod input;
pub mod manifest;
pub mod safetensors;

use crate::error::{Error, Result};
use crate::files;
use crate::tokenizer::train::{never_stop, StopFn};
use crate::tokenizer::Tokenizer;
use manifest::{Manifest, Progress, ShardInfo, SplitSummary};
use rayon::prelude::*;
use safetensors::{Dtype, TensorBytes};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub const FORMAT_VERSION: u32 = 1;
pub const SPLITS: [&str; 2] = ["train", "val"];
/// The most tokens one shard may be asked to hold (2^36: a 256 GiB uint32 shard).
pub const MAX_SHARD_TOKENS: u64 = 1 << 36;

/// Checks a `shard_tokens` value given by a person (any integer) and returns it.
pub fn shard_tokens_option(value: i128) -> Result<usize> {
    if value < 1 || value > MAX_SHARD_TOKENS as i128 {
        return Err(Error::invalid(format!(
            "shard_tokens (--shard-tokens) must be an integer from 1 to {MAX_SHARD_TOKENS}, got {value}"
        )));
    }
    Ok(value as usize)
}

/// The seeded document hash behind the train/val split: FNV-1a (64-bit) over the document's UTF-8
/// bytes, starting from the FNV offset basis XOR `splitmix64(seed)`, finished with `splitmix64`.
/// A document goes to `val` when `(hash >> 11) / 2^53 < val_fraction`.
pub fn split_hash(seed: u64, text: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ splitmix64(seed);
    for &b in text {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(h)
}

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn is_val(seed: u64, val_fraction: f64, text: &str) -> bool {
    val_fraction > 0.0
        && ((split_hash(seed, text.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}

#[derive(Debug, Clone)]
pub struct ShardOptions {
    pub output_dir: PathBuf,
    pub val_fraction: f64,
    /// A shard is closed once it holds at least this many tokens.
    pub shard_tokens: usize,
    pub seed: u64,
    /// Token put before each document, if any.
    pub bos: Option<u32>,
    /// Token put after each document, if any.
    pub eos: Option<u32>,
    pub dtype: Dtype,
    pub resume: bool,
    /// Threads for encoding (None: the pool's default).
    pub num_threads: Option<usize>,
}

impl ShardOptions {
    /// The options that must not change between a run and its resume.
    fn fingerprint(&self) -> String {
        format!(
            "val_fraction={} shard_tokens={} seed={} bos={:?} eos={:?} dtype={}",
            self.val_fraction,
            self.shard_tokens,
            self.seed,
            self.bos,
            self.eos,
            self.dtype.name()
        )
    }
}

/// Counts of what was read and what was left out (never silently).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Skipped {
    pub empty_documents: u64,
    pub bad_lines: u64,
    /// Invalid UTF-8 sequences replaced by U+FFFD in text files.
    pub invalid_utf8_replaced: u64,
}

/// What a long `add_file` has done so far, readable from another thread while it runs (the
/// bindings show progress within a large file from it).
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes of the current input file consumed (as stored, before decompression).
    pub file_bytes: AtomicU64,
    pub documents_read: AtomicU64,
    pub tokens: AtomicU64,
}

struct Split {
    name: &'static str,
    tokens: Vec<u32>,
    offsets: Vec<u64>,
    finished: Vec<ShardInfo>,
    /// Documents of this split that finished shards already hold (resume skips them).
    already_written: u64,
    seen: u64,
}

pub struct ShardWriter {
    options: ShardOptions,
    tokenizer: Arc<Tokenizer>,
    tokenizer_sha256: String,
    splits: [Split; 2],
    pub skipped: Skipped,
    documents_read: u64,
    bytes_read: u64,
    /// Inputs begun so far: (path, size, mtime in ns, hash of the bytes consumed).
    inputs: Vec<(String, u64, u64, input::SharedHash)>,
    /// The inputs the interrupted run had begun (resume only), checked against this run's.
    resume_inputs: Vec<manifest::InputIdentity>,
    counters: Arc<Counters>,
    flusher: Flusher,
}

/// A finished shard to write, then the progress file that names it.
struct FlushJob {
    shard: PathBuf,
    contents: Vec<u8>,
    progress: Progress,
    progress_path: PathBuf,
}

/// Writes finished shards, each followed by the progress file naming it, on a thread of its
/// own and in order: the fsync of a shard (hundreds of milliseconds for a 20 MB shard on the
/// project's VM) then overlaps the encoding of the next documents instead of stopping it. At most
/// one shard waits while another is written. Dropped without `finish` (an error, Ctrl-C), it
/// completes the write in progress, skips those not begun (a resume redoes them) and returns.
struct Flusher {
    tx: Option<std::sync::mpsc::SyncSender<FlushJob>>,
    handle: Option<std::thread::JoinHandle<Result<()>>>,
    cancel: Arc<AtomicBool>,
}

impl Flusher {
    fn start() -> Flusher {
        let (tx, rx) = std::sync::mpsc::sync_channel::<FlushJob>(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let theirs = cancel.clone();
        let handle = std::thread::Builder::new()
            .name("ferrolm-shard-writer".to_string())
            .spawn(move || {
                for job in rx {
                    if theirs.load(Ordering::Relaxed) {
                        break;
                    }
                    files::write_atomic(&job.shard, &job.contents)?;
                    job.progress.write(&job.progress_path)?;
                }
                Ok(())
            })
            .expect("the shard writer thread starts");
        Flusher {
            tx: Some(tx),
            handle: Some(handle),
            cancel,
        }
    }

    fn send(&mut self, job: FlushJob) -> Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(job).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // The thread stopped on an error: that error is the answer.
        self.finish()?;
        Err(Error::invalid(
            "the shard writer thread has stopped (please report it)",
        ))
    }

    /// Waits until every shard sent is written; the first write error, if any.
    fn finish(&mut self) -> Result<()> {
        drop(self.tx.take());
        match self.handle.take().map(|h| h.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(error))) => Err(error),
            Some(Err(_)) => Err(Error::invalid(
                "internal error in the ferrolm shard writer thread (please report it)",
            )),
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        let _ = self.finish();
    }
}

impl ShardWriter {
    /// Prepares `output_dir`: copies the tokenizer there, and on resume reads the progress file.
    pub fn create(
        options: ShardOptions,
        tokenizer: Arc<Tokenizer>,
        tokenizer_json: &str,
    ) -> Result<Self> {
        // Sharding must never lose text: a pre-tokenizer that drops its matches (a Hugging Face
        // `Split` with behaviour `Removed`) would write shards that decode to less than the corpus.
        // Refused before anything is written.
        if !tokenizer.is_lossless() {
            return Err(Error::invalid(format!(
                "cannot shard with this tokenizer: its pre-tokenizer drops text (a Split with \
                 behavior \"Removed\", pattern {}), so the shards would not hold the whole corpus; \
                 use a tokenizer whose Split keeps its matches (e.g. behavior \"Isolated\")",
                crate::tokenizer::quote(tokenizer.pretokenizer().pattern())
            )));
        }
        if !(0.0..1.0).contains(&options.val_fraction) {
            return Err(Error::invalid(format!(
                "val_fraction must be in [0, 1), got {}",
                options.val_fraction
            )));
        }
        if options.shard_tokens == 0 || options.shard_tokens as u64 > MAX_SHARD_TOKENS {
            return Err(Error::invalid(format!(
                "shard_tokens must be between 1 and {MAX_SHARD_TOKENS}, got {}",
                options.shard_tokens
            )));
        }
        let max_id = tokenizer.vocab_size().saturating_sub(1) as u64;
        let fits = match options.dtype {
            Dtype::U16 => max_id <= u16::MAX as u64,
            _ => true,
        };
        if !fits {
            return Err(Error::invalid(format!(
                "the tokenizer's ids go up to {max_id}, which does not fit uint16: use dtype uint32"
            )));
        }
        let dir = &options.output_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // A run killed mid-write (kill -9) leaves `.NAME.tmp-PID` files; ours are removed here,
        // on a resume and on a fresh run alike (only those whose writer is dead).
        files::remove_stale_temporaries(dir)?;
        let manifest_path = dir.join(manifest::MANIFEST);
        if manifest_path.exists() {
            return Err(Error::invalid(format!(
                "{} exists: this directory holds a finished run; choose another --out or delete it",
                manifest_path.display()
            )));
        }
        let tokenizer_sha256 = manifest::sha256_hex(tokenizer_json.as_bytes());
        files::write_atomic(
            &dir.join(manifest::TOKENIZER_FILE),
            tokenizer_json.as_bytes(),
        )?;

        let mut splits = SPLITS.map(|name| Split {
            name,
            tokens: Vec::new(),
            offsets: vec![0],
            finished: Vec::new(),
            already_written: 0,
            seen: 0,
        });
        let progress_path = dir.join(manifest::PROGRESS);
        let mut resume_inputs = Vec::new();
        if options.resume && progress_path.exists() {
            let progress = Progress::read(&progress_path)?;
            if progress.tokenizer_sha256 != tokenizer_sha256
                || progress.options != options.fingerprint()
            {
                return Err(Error::invalid(format!(
                    "{}: cannot resume with a different tokenizer or options (was: {}; now: {})",
                    progress_path.display(),
                    progress.options,
                    options.fingerprint()
                )));
            }
            for split in &mut splits {
                let done = progress.shards.get(split.name).cloned().unwrap_or_default();
                for shard in &done {
                    manifest::verify_shard(dir, shard)?;
                }
                split.already_written = done.iter().map(|s| s.documents).sum();
                split.finished = done;
            }
            for input in &progress.inputs {
                input.verify(&progress_path)?;
            }
            resume_inputs = progress.inputs;
        } else if progress_path.exists() {
            return Err(Error::invalid(format!(
                "{} holds an unfinished run: pass resume=True (--resume) to finish it, or use an empty directory",
                dir.display()
            )));
        }
        Ok(ShardWriter {
            options,
            tokenizer,
            tokenizer_sha256,
            splits,
            skipped: Skipped::default(),
            documents_read: 0,
            bytes_read: 0,
            inputs: Vec::new(),
            resume_inputs,
            counters: Arc::default(),
            flusher: Flusher::start(),
        })
    }

    /// Starts reading input file `path`: records its identity (size, mtime and, as it is read,
    /// the sha256 of the bytes consumed) for the progress file, and on resume checks that the
    /// inputs come in the order the interrupted run read them. `whole` hashes the whole file now
    /// (for files read outside Rust, e.g. Parquet).
    pub fn begin_input(&mut self, path: &Path, whole: bool) -> Result<input::SharedHash> {
        let index = self.inputs.len();
        let shown = path.display().to_string();
        if let Some(recorded) = self.resume_inputs.get(index) {
            if recorded.path != shown {
                return Err(Error::invalid(format!(
                    "cannot resume: input {index} was {} in the interrupted run but is {shown} now (the list of inputs changed)",
                    recorded.path
                )));
            }
        }
        let (size, mtime_ns) = manifest::file_identity(path)?;
        let hash = input::SharedHash::default();
        if whole {
            let mut file = files::open_regular(path)?;
            let mut h = hash.lock().unwrap_or_else(|p| p.into_inner());
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = std::io::Read::read(&mut file, &mut buf).map_err(|e| Error::io(path, e))?;
                if n == 0 {
                    break;
                }
                sha2::Digest::update(&mut h.sha, &buf[..n]);
                h.bytes += n as u64;
            }
        }
        self.inputs.push((shown, size, mtime_ns, hash.clone()));
        Ok(hash)
    }

    pub fn output_dir(&self) -> &Path {
        &self.options.output_dir
    }

    /// Tokens written or buffered so far, over both splits.
    pub fn tokens_so_far(&self) -> u64 {
        self.splits
            .iter()
            .map(|s| s.finished.iter().map(|f| f.tokens).sum::<u64>() + s.tokens.len() as u64)
            .sum()
    }

    pub fn documents_read(&self) -> u64 {
        self.documents_read
    }

    /// Progress counters, updated after every batch of documents.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Adds documents in order: encodes them on all cores and closes shards as they fill.
    pub fn add_documents<S: AsRef<str> + Sync>(&mut self, documents: &[S]) -> Result<()> {
        self.add_documents_until(documents, &never_stop)
    }

    /// [`ShardWriter::add_documents`] that gives up with [`Error::Interrupted`] as soon as `stop`
    /// says so (checked before each document is encoded). An interrupted writer is left
    /// inconsistent and must be dropped: what is on disk is only finished shards and the
    /// progress file naming them, so a resume continues from there.
    pub fn add_documents_until<S: AsRef<str> + Sync>(
        &mut self,
        documents: &[S],
        stop: StopFn,
    ) -> Result<()> {
        if stop() {
            return Err(Error::Interrupted);
        }
        let (seed, fraction) = (self.options.seed, self.options.val_fraction);
        // Which split each document goes to, and whether an earlier run already wrote it.
        let mut plan: Vec<(usize, usize)> = Vec::with_capacity(documents.len());
        // The split hashes read every byte: computed on the pool, then taken in order.
        let val: Vec<bool> = crate::pool::install(self.options.num_threads, || {
            documents
                .par_iter()
                .map(|doc| is_val(seed, fraction, doc.as_ref()))
                .collect()
        });
        for (i, doc) in documents.iter().enumerate() {
            let text = doc.as_ref();
            self.documents_read += 1;
            self.bytes_read += text.len() as u64;
            if text.is_empty() {
                self.skipped.empty_documents += 1;
                continue;
            }
            let split = usize::from(val[i]);
            let s = &mut self.splits[split];
            s.seen += 1;
            if s.seen > s.already_written {
                plan.push((i, split));
            }
        }
        let tokenizer = &self.tokenizer;
        let encoded: Vec<Vec<u32>> = crate::pool::install(self.options.num_threads, || {
            plan.par_iter()
                .map(|&(i, _)| {
                    if stop() {
                        return Err(Error::Interrupted);
                    }
                    tokenizer.encode_ordinary(documents[i].as_ref())
                })
                .collect::<Result<_>>()
        })?;
        for ((_, split), ids) in plan.iter().zip(encoded) {
            let (bos, eos) = (self.options.bos, self.options.eos);
            let s = &mut self.splits[*split];
            s.tokens.extend(bos);
            s.tokens.extend_from_slice(&ids);
            s.tokens.extend(eos);
            s.offsets.push(s.tokens.len() as u64);
            if s.tokens.len() >= self.options.shard_tokens {
                self.close_shard(*split)?;
            }
        }
        let counters = &self.counters;
        counters
            .documents_read
            .store(self.documents_read, Ordering::Relaxed);
        counters
            .tokens
            .store(self.tokens_so_far(), Ordering::Relaxed);
        Ok(())
    }

    /// Reads one file's documents (see `input`) and adds them; returns what was found. `stop`
    /// is looked at between batches and before each document is encoded
    /// ([`ShardWriter::add_documents_until`]), so a large file can be interrupted within it.
    pub fn add_file(
        &mut self,
        path: &Path,
        options: &input::DocumentOptions,
        stop: StopFn,
    ) -> Result<input::FileStats> {
        let hash = self.begin_input(path, false)?;
        self.counters.file_bytes.store(0, Ordering::Relaxed);
        let consumed = hash.clone();
        // Reading and parsing the next batch (a thread of its own) overlaps encoding this one.
        // Each batch comes with the bytes of the file read when it was cut: progress reports the
        // batch being encoded, not how far ahead the reader is.
        let stats = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(Vec<String>, u64)>(1);
            let reader = scope.spawn(move || {
                input::read_documents(path, options, Some(hash), |batch| {
                    let bytes = consumed.lock().unwrap_or_else(|p| p.into_inner()).bytes;
                    // A send fails only when the encoding side has stopped (its error wins).
                    tx.send((batch, bytes)).map_err(|_| Error::Interrupted)
                })
            });
            let mut added = Ok(());
            for (batch, bytes) in &rx {
                added = self.add_documents_until(&batch, stop);
                self.counters.file_bytes.store(bytes, Ordering::Relaxed);
                if added.is_err() {
                    break;
                }
            }
            drop(rx);
            let read = reader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            added.and(read)
        })?;
        self.skipped.bad_lines += stats.bad_lines;
        self.skipped.invalid_utf8_replaced += stats.utf8_replaced;
        self.skipped.empty_documents += stats.whitespace_only;
        Ok(stats)
    }

    fn close_shard(&mut self, split: usize) -> Result<()> {
        let dir = self.options.output_dir.clone();
        let s = &mut self.splits[split];
        if s.offsets.len() <= 1 {
            return Ok(());
        }
        let name = format!("{}-{:05}.safetensors", s.name, s.finished.len());
        let token_bytes: Vec<u8> = match self.options.dtype {
            Dtype::U16 => s
                .tokens
                .iter()
                .flat_map(|&t| (t as u16).to_le_bytes())
                .collect(),
            _ => s.tokens.iter().flat_map(|&t| t.to_le_bytes()).collect(),
        };
        let offset_bytes: Vec<u8> = s.offsets.iter().flat_map(|&o| o.to_le_bytes()).collect();
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "ferrolm-shard".to_string());
        metadata.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        metadata.insert(
            "tokenizer_sha256".to_string(),
            self.tokenizer_sha256.clone(),
        );
        metadata.insert("split".to_string(), s.name.to_string());
        let mut file = Vec::with_capacity(token_bytes.len() + offset_bytes.len() + 512);
        let tensors = [
            TensorBytes {
                name: "tokens",
                dtype: self.options.dtype,
                bytes: &token_bytes,
            },
            TensorBytes {
                name: "doc_offsets",
                dtype: Dtype::U64,
                bytes: &offset_bytes,
            },
        ];
        safetensors::write(&mut file, &tensors, &metadata)
            .map_err(|e| Error::io(dir.join(&name), e))?;
        s.finished.push(ShardInfo {
            file: name.clone(),
            tokens: s.tokens.len() as u64,
            documents: (s.offsets.len() - 1) as u64,
            bytes: file.len() as u64,
            sha256: manifest::sha256_hex(&file),
        });
        s.tokens.clear();
        s.offsets.truncate(1);
        let job = FlushJob {
            shard: dir.join(&name),
            contents: file,
            progress: self.progress(),
            progress_path: dir.join(manifest::PROGRESS),
        };
        self.flusher.send(job)
    }

    /// What the progress file says now: the finished shards and the inputs read so far.
    fn progress(&self) -> Progress {
        Progress {
            tokenizer_sha256: self.tokenizer_sha256.clone(),
            options: self.options.fingerprint(),
            inputs: self
                .inputs
                .iter()
                .map(|(path, size, mtime_ns, hash)| {
                    let h = hash.lock().unwrap_or_else(|p| p.into_inner());
                    manifest::InputIdentity {
                        path: path.clone(),
                        size: *size,
                        mtime_ns: *mtime_ns,
                        consumed_bytes: h.bytes,
                        consumed_sha256: h.hex(),
                    }
                })
                .collect(),
            shards: self
                .splits
                .iter()
                .map(|s| (s.name.to_string(), s.finished.clone()))
                .collect(),
        }
    }

    /// Writes the last partial shards and then the manifest (last of all).
    pub fn finish(mut self, inputs: Vec<manifest::InputRecord>) -> Result<Manifest> {
        if self.resume_inputs.len() > self.inputs.len() {
            return Err(Error::invalid(format!(
                "cannot resume: the interrupted run had read {} inputs (up to {}), this one only {}: the list of inputs changed",
                self.resume_inputs.len(),
                self.resume_inputs.last().map(|i| i.path.as_str()).unwrap_or(""),
                self.inputs.len()
            )));
        }
        for split in 0..self.splits.len() {
            self.close_shard(split)?;
        }
        // Every shard is on disk before the manifest says the run is complete.
        self.flusher.finish()?;
        let dir = self.options.output_dir.clone();
        let mut splits = BTreeMap::new();
        for s in &self.splits {
            splits.insert(
                s.name.to_string(),
                SplitSummary {
                    tokens: s.finished.iter().map(|f| f.tokens).sum(),
                    documents: s.finished.iter().map(|f| f.documents).sum(),
                    shards: s.finished.clone(),
                },
            );
        }
        let manifest = Manifest {
            format: "ferrolm-shards".to_string(),
            format_version: FORMAT_VERSION,
            created_by: format!("ferrolm {}", env!("CARGO_PKG_VERSION")),
            tokenizer: manifest::TokenizerRecord {
                file: manifest::TOKENIZER_FILE.to_string(),
                sha256: self.tokenizer_sha256.clone(),
            },
            vocab_size: self.tokenizer.vocab_size() as u64,
            dtype: match self.options.dtype {
                Dtype::U16 => "uint16".to_string(),
                _ => "uint32".to_string(),
            },
            bos_id: self.options.bos,
            eos_id: self.options.eos,
            seed: self.options.seed,
            val_fraction: self.options.val_fraction,
            shard_tokens: self.options.shard_tokens as u64,
            total_tokens: splits.values().map(|s| s.tokens).sum(),
            total_documents: splits.values().map(|s| s.documents).sum(),
            documents_read: self.documents_read,
            input_bytes: self.bytes_read,
            splits,
            inputs,
            skipped: self.skipped.clone(),
        };
        manifest.write(&dir.join(manifest::MANIFEST))?;
        let _ = std::fs::remove_file(dir.join(manifest::PROGRESS));
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::pretokenize::{SplitBehavior, SplitOptions};
    use crate::tokenizer::{MergeRule, TokenizerParts};

    fn byte_tokenizer(behavior: SplitBehavior) -> Arc<Tokenizer> {
        let parts = TokenizerParts {
            tokens: (0..=255u8).map(|b| (vec![b], b as u32)).collect(),
            merge_rule: MergeRule::Ranks,
            specials: vec![("<|endoftext|>".to_string(), 256)],
            pattern: " ".to_string(),
            split: SplitOptions {
                behavior,
                invert: false,
                literal: true,
            },
            whole_piece_first: true,
            add_prefix_space: false,
        };
        Arc::new(Tokenizer::new(parts).unwrap())
    }

    fn options(dir: &Path) -> ShardOptions {
        ShardOptions {
            output_dir: dir.to_path_buf(),
            val_fraction: 0.0,
            shard_tokens: 1000,
            seed: 0,
            bos: None,
            eos: Some(256),
            dtype: Dtype::U16,
            resume: false,
            num_threads: Some(1),
        }
    }

    #[test]
    fn a_tokenizer_that_drops_text_is_refused_before_anything_is_written() {
        let dir = std::env::temp_dir().join(format!("ferrolm-lossy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lossy = byte_tokenizer(SplitBehavior::Removed);
        assert!(!lossy.is_lossless());
        let err = ShardWriter::create(options(&dir), lossy, "{}")
            .err()
            .expect("a lossy tokenizer must be refused");
        let message = err.to_string();
        assert!(
            message.contains("drops text") && message.contains("Removed"),
            "{message}"
        );
        assert!(
            !dir.exists(),
            "nothing may be written for a refused tokenizer"
        );

        // The same pattern with a behaviour that keeps the text shards, and round-trips.
        let kept = byte_tokenizer(SplitBehavior::Isolated);
        let mut writer = ShardWriter::create(options(&dir), kept.clone(), "{}").unwrap();
        writer
            .add_documents(&["hello world, this is a test"])
            .unwrap();
        let manifest = writer.finish(Vec::new()).unwrap();
        assert_eq!(manifest.total_tokens, 27 + 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
