//! Byte-level BPE training, identical to Hugging Face tokenizers' `BpeTrainer` (with a `ByteLevel`
//! pre-tokenizer and the byte-level initial alphabet) merge for merge and id for id.
//!
//! # Semantics
//!
//! 1. Every sequence (a text line of a file with its newline, a JSON-lines field, or one string
//!    from an iterator; see `crate::corpus`) is split by the pattern into pieces ("chunks"). As in
//!    Hugging Face's `Split(pattern, "isolated")`, text between two matches is a piece too (the
//!    built-in patterns match every character, so this only matters for custom regexes). Special
//!    tokens in the text are ordinary text while training.
//! 2. Identical pieces are counted (64-bit counts).
//! 3. Ids: the special tokens first (duplicates ignored), then the 256 byte tokens in the code-point
//!    order of their GPT-2 byte-to-unicode characters (a special token whose text is one of those
//!    characters takes that byte's place), then merged tokens in creation order.
//! 4. Pair counts use overlapping windows (`aaa` holds `aa` twice). Repeatedly the pair with the
//!    highest count is merged, left to right, in every piece it occurs in; ties go to the smallest
//!    `(left id, right id)` (`TieBreak::HuggingFace`) or to the smallest pair when tokens are
//!    numbered the way minbpe / rustbpe number them: bytes by value, then merged tokens in
//!    creation order (`TieBreak::Bytes`; the ids written out are the same layout either way).
//! 5. A merge whose result is already a token (only possible for a special token's text) reuses
//!    that id and does not grow the vocabulary. Training stops when the vocabulary has `vocab_size` ids, when
//!    no pair is left, or when the best count is below `min_frequency` (Hugging Face's rule).
//!
//! # Why this equals Hugging Face, step by step
//!
//! HF's trainer is incremental: a lazy max-heap of (count, pair, pieces) entries, a popped entry
//! whose count is out of date re-queued with the current count, the merged pair's own count never
//! decremented. We keep exactly that bookkeeping (with compact piece lists), so the two agree
//! merge by merge. Both also equal plain "recount everything" BPE: a merge never recreates an
//! existing ordinary token (within a piece, the span of a token evolves exactly as the token's own
//! text did, so the merge that made the token already joined that span), hence a pair gains
//! occurrences in one round only and has one queue entry. Only a special token's text can be
//! "recreated" by a merge, and its id never occurred in a piece before. (Should two entries of
//! one pair ever tie, the older one goes first.) Counts are 64-bit: HF's 32-bit pair counts wrap
//! on very large corpora and then drop pairs.
//!
//! # Speed and memory
//!
//! - Ingestion (nearly all of the cost): files are cut into blocks of whole lines read by the
//!   threads themselves (compressed files are decompressed by one reader and handed out in
//!   blocks), pre-tokenized and counted into one hash map per pool thread; the maps are merged
//!   once at the end. Memory is bounded by the number of distinct pieces, not the corpus size.
//! - Training: pieces are stored as one flat `u32` array; each queue entry is 32 bytes and names a
//!   `Vec<u32>` of piece indices (HF keeps a `HashSet<usize>` per entry, its out-of-memory spot).
//!   A merge rescans only the pieces its entry names; large rounds run on all threads.
//! - Nothing depends on the number of threads: counts are sums, position lists are sets, and
//!   every tie is broken by the rule above (tests compare 1 and 2 threads).

use crate::corpus::{self, InputFormat, ReadOptions, Utf8Report};
use crate::error::{Error, Result};
use crate::tokenizer::pretokenize::{self, PreTokenizer};
use crate::tokenizer::{bytelevel, MergeRule, TokenizerParts};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::collections::BinaryHeap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Size of the blocks of whole lines that threads read and count independently.
const BLOCK_BYTES: u64 = 4 << 20;
/// A merge round touching at least this many pieces runs in parallel.
const PARALLEL_ROUND: usize = 2048;

/// "Should the work stop now?" — polled between blocks and merges; wired to Ctrl-C by the bindings.
pub type StopFn<'a> = &'a (dyn Fn() -> bool + Sync);

/// A `StopFn` that never stops.
pub fn never_stop() -> bool {
    false
}

/// How a tie between pairs of equal count is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TieBreak {
    /// Smallest (left id, right id): Hugging Face tokenizers' rule.
    #[default]
    HuggingFace,
    /// Smallest pair with bytes numbered by value and merged tokens by creation (minbpe / rustbpe).
    Bytes,
}

impl TieBreak {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "hf" | "huggingface" => Ok(TieBreak::HuggingFace),
            "bytes" => Ok(TieBreak::Bytes),
            other => Err(Error::invalid(format!(
                "tie_break={other:?} is not a tie rule: use \"hf\" (Hugging Face) or \"bytes\""
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Number of ids wanted, special tokens and the 256 byte tokens included.
    pub vocab_size: usize,
    pub special_tokens: Vec<String>,
    /// A pair merges only if it occurs at least this often (0 and 1 mean any pair).
    pub min_frequency: u64,
    pub tie_break: TieBreak,
    /// "gpt2", "cl100k", "o200k" (or tiktoken's encoding names) or a regex.
    pub pattern: String,
    /// Threads for ingestion and large merge rounds (None: the pool's default size).
    pub num_threads: Option<usize>,
    /// A progress line on stderr.
    pub show_progress: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            vocab_size: 32768,
            special_tokens: vec!["<|endoftext|>".to_string()],
            min_frequency: 0,
            tie_break: TieBreak::HuggingFace,
            pattern: "cl100k".to_string(),
            num_threads: None,
            show_progress: false,
        }
    }
}

/// Why the merge loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    VocabularyFull,
    NoPairsLeft,
    BelowMinFrequency,
}

#[derive(Debug, Clone)]
pub struct TrainStats {
    /// Merges performed (one that makes a special token's text reuses its id, so this can exceed
    /// the number of new ids).
    pub merges: usize,
    pub vocab_size: usize,
    pub distinct_chunks: usize,
    pub stop_reason: StopReason,
}

#[derive(Debug)]
pub struct Trained {
    pub parts: TokenizerParts,
    pub stats: TrainStats,
}

// =============================================================================================
// Progress line

/// A throttled progress line on stderr: redrawn in place on a terminal, else a line every 10 s.
pub struct Progress {
    enabled: bool,
    tty: bool,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    last: Option<Instant>,
    phase_start: Instant,
    open: bool,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            state: Mutex::new(ProgressState {
                last: None,
                phase_start: Instant::now(),
                open: false,
            }),
        }
    }

    /// Starts timing a new phase (for rates and ETAs).
    pub fn start_phase(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.phase_start = Instant::now();
            s.last = None;
        }
    }

    /// Redraws the line if enough time has passed; `line` gets the phase's elapsed time.
    /// Never blocks: a thread that finds another one printing skips its update.
    pub fn update(&self, line: impl FnOnce(Duration) -> String) {
        if !self.enabled {
            return;
        }
        let Ok(mut s) = self.state.try_lock() else {
            return;
        };
        let every = if self.tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(10)
        };
        let now = Instant::now();
        if s.last.is_some_and(|t| now.duration_since(t) < every) {
            return;
        }
        if s.last.is_none() && now.duration_since(s.phase_start) < Duration::from_millis(250) {
            // Quick phases print only their final line.
            return;
        }
        s.last = Some(now);
        let text = line(now.duration_since(s.phase_start));
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{text}\x1b[K");
            s.open = true;
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
    }

    /// Prints the phase's final line.
    pub fn finish(&self, line: impl FnOnce(Duration) -> String) {
        if !self.enabled {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let text = line(s.phase_start.elapsed());
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err, "\r{text}\x1b[K");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
        s.open = false;
        s.last = None;
    }

    /// Ends an in-place line (before an error message, say).
    pub fn clear(&self) {
        if !self.enabled {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.open {
            let _ = writeln!(std::io::stderr());
            s.open = false;
        }
    }
}

fn eta(done: f64, total: f64, elapsed: Duration) -> String {
    // Too early to tell (the first merges are the slowest ones).
    if done <= 0.0 || total <= done || done < total * 0.02 {
        return "--".to_string();
    }
    let secs = (elapsed.as_secs_f64() * (total - done) / done).round() as u64;
    clock(secs)
}

fn clock(secs: u64) -> String {
    if secs >= 3600 {
        format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
    } else {
        format!("{}:{:02}", secs / 60, secs % 60)
    }
}

fn human(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

// =============================================================================================
// Ingestion: pre-tokenize and count chunks

/// One thread's counts. Chunks of up to 15 bytes (nearly all) are packed with their length into a
/// `u128` key: hashing and comparing them is two integer operations instead of a `memcmp`.
///
/// Counting is bound by memory latency: a map of millions of chunks misses the cache on nearly
/// every probe. Chunk frequencies are Zipf-like, so a small direct-mapped cache in front of the
/// map (1 MiB, within L2) absorbs most occurrences; an evicted entry adds its count to the map.
struct ChunkMap {
    hot: Vec<(u128, u64)>,
    short: FxHashMap<u128, u64>,
    long: FxHashMap<Box<[u8]>, u64>,
}

/// log2 of the number of cache slots (32 bytes each).
const HOT_BITS: u32 = 15;
/// The packed empty chunk, which is never counted: marks an empty slot.
const HOT_EMPTY: u128 = 0;

impl Default for ChunkMap {
    fn default() -> Self {
        ChunkMap {
            hot: vec![(HOT_EMPTY, 0); 1 << HOT_BITS],
            short: FxHashMap::default(),
            long: FxHashMap::default(),
        }
    }
}

impl ChunkMap {
    #[inline]
    fn add(&mut self, chunk: &[u8]) {
        if let Some(key) = pack(chunk) {
            let h = (key as u64 ^ (key >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let slot = &mut self.hot[(h >> (64 - HOT_BITS)) as usize];
            if slot.0 == key {
                slot.1 += 1;
            } else {
                let (old, n) = std::mem::replace(slot, (key, 1));
                if old != HOT_EMPTY {
                    *self.short.entry(old).or_insert(0) += n;
                }
            }
        } else if let Some(count) = self.long.get_mut(chunk) {
            *count += 1;
        } else {
            self.long.insert(chunk.into(), 1);
        }
    }

    /// Moves the cached counts into the map.
    fn flush(&mut self) {
        for slot in &mut self.hot {
            let (key, n) = std::mem::replace(slot, (HOT_EMPTY, 0));
            if key != HOT_EMPTY {
                *self.short.entry(key).or_insert(0) += n;
            }
        }
    }

    fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }
}

const PACKED_MAX: usize = 15;

#[inline]
fn pack(chunk: &[u8]) -> Option<u128> {
    if chunk.len() > PACKED_MAX {
        return None;
    }
    let mut buf = [0u8; 16];
    buf[..chunk.len()].copy_from_slice(chunk);
    buf[15] = chunk.len() as u8;
    Some(u128::from_le_bytes(buf))
}

#[inline]
fn unpack_into(key: u128, out: &mut Vec<u8>) {
    let buf = key.to_le_bytes();
    out.extend_from_slice(&buf[..buf[15] as usize]);
}

/// Distinct chunks and their counts, flat: chunk `i` is `data[ends[i - 1]..ends[i]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkCounts {
    data: Vec<u8>,
    ends: Vec<usize>,
    counts: Vec<u64>,
}

impl ChunkCounts {
    /// From (chunk, count) pairs; empty chunks and zero counts are left out, repeats are added.
    pub fn from_pairs<B: AsRef<[u8]>>(pairs: impl IntoIterator<Item = (B, u64)>) -> Self {
        let mut short: FxHashMap<u128, u64> = FxHashMap::default();
        let mut long: FxHashMap<Vec<u8>, u64> = FxHashMap::default();
        for (chunk, n) in pairs {
            let chunk = chunk.as_ref();
            if chunk.is_empty() || n == 0 {
                continue;
            }
            match pack(chunk) {
                Some(key) => *short.entry(key).or_insert(0) += n,
                None => *long.entry(chunk.to_vec()).or_insert(0) += n,
            }
        }
        let mut out = ChunkCounts::default();
        for (key, n) in short {
            unpack_into(key, &mut out.data);
            out.ends.push(out.data.len());
            out.counts.push(n);
        }
        for (chunk, n) in long {
            out.push(&chunk, n);
        }
        out
    }

    fn push(&mut self, chunk: &[u8], n: u64) {
        self.data.extend_from_slice(chunk);
        self.ends.push(self.data.len());
        self.counts.push(n);
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Chunk `i` and its count.
    pub fn get(&self, i: usize) -> (&[u8], u64) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        (&self.data[start..self.ends[i]], self.counts[i])
    }

    /// Total number of chunk occurrences.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Merges per-thread maps in parallel: every map is cut into `parts` by hash, then each part is
/// merged on its own. Work and memory stay O(entries) whatever the number of threads.
fn merge_maps<K>(
    maps: Vec<FxHashMap<K, u64>>,
    part_of: impl Fn(&K) -> usize + Sync,
    parts: usize,
) -> Vec<Vec<(K, u64)>>
where
    K: std::hash::Hash + Eq + Send,
{
    if maps.len() == 1 {
        let only = maps.into_iter().next().unwrap_or_default();
        return vec![only.into_iter().collect()];
    }
    let split: Vec<Vec<Vec<(K, u64)>>> = maps
        .into_par_iter()
        .map(|map| {
            let mut cut: Vec<Vec<(K, u64)>> = (0..parts).map(|_| Vec::new()).collect();
            for (key, n) in map {
                cut[part_of(&key)].push((key, n));
            }
            cut
        })
        .collect();
    let mut by_part: Vec<Vec<Vec<(K, u64)>>> = (0..parts).map(|_| Vec::new()).collect();
    for cut in split {
        for (p, entries) in cut.into_iter().enumerate() {
            by_part[p].push(entries);
        }
    }
    by_part
        .into_par_iter()
        .map(|lists| {
            let size = lists.iter().map(Vec::len).max().unwrap_or(0);
            let mut merged: FxHashMap<K, u64> = FxHashMap::default();
            merged.reserve(size);
            for list in lists {
                for (key, n) in list {
                    *merged.entry(key).or_insert(0) += n;
                }
            }
            merged.into_iter().collect()
        })
        .collect()
}

#[inline]
fn spread(h: u64, parts: usize) -> usize {
    ((h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize) % parts
}

/// Running totals of what was ingested.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Bytes read: for files, as stored on disk (compressed bytes for .zst); for texts, UTF-8 bytes.
    pub bytes: AtomicU64,
    pub sequences: AtomicU64,
    pub chunks: AtomicU64,
}

/// Counts pre-tokenized chunks from texts and files, on all threads, into per-thread maps.
pub struct ChunkCounter {
    pretokenizer: PreTokenizer,
    num_threads: Option<usize>,
    shards: Vec<Mutex<ChunkMap>>,
    stats: IngestStats,
    /// Files in which invalid UTF-8 was replaced.
    utf8: Vec<(PathBuf, Utf8Report)>,
    progress: Progress,
}

impl ChunkCounter {
    pub fn new(pattern: &str, num_threads: Option<usize>, show_progress: bool) -> Result<Self> {
        Ok(ChunkCounter {
            pretokenizer: PreTokenizer::new(pattern)?,
            num_threads,
            shards: Vec::new(),
            stats: IngestStats::default(),
            utf8: Vec::new(),
            progress: Progress::new(show_progress),
        })
    }

    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }

    /// Files where invalid UTF-8 was replaced by U+FFFD, with the count and first location.
    pub fn utf8_reports(&self) -> &[(PathBuf, Utf8Report)] {
        &self.utf8
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    fn ensure_shards(&mut self) -> usize {
        let threads = crate::pool::install(self.num_threads, rayon::current_num_threads);
        while self.shards.len() < threads {
            self.shards.push(Mutex::new(ChunkMap::default()));
        }
        threads
    }

    /// Counts each text as one sequence.
    pub fn count_texts<S: AsRef<str> + Sync>(&mut self, texts: &[S], stop: StopFn) -> Result<()> {
        let threads = self.ensure_shards();
        let this = &*self;
        let chunk = texts.len().div_ceil(threads * 4).max(1);
        let result = crate::pool::install(self.num_threads, || {
            texts.par_chunks(chunk).try_for_each(|group| {
                if stop() {
                    return Err(Error::Interrupted);
                }
                let mut map = this.shard();
                let (mut bytes, mut chunks) = (0u64, 0u64);
                for text in group {
                    let text = text.as_ref();
                    bytes += text.len() as u64;
                    chunks += count_text(&this.pretokenizer, text, &mut map)?;
                }
                drop(map);
                this.stats.bytes.fetch_add(bytes, Relaxed);
                this.stats.sequences.fetch_add(group.len() as u64, Relaxed);
                this.stats.chunks.fetch_add(chunks, Relaxed);
                this.ingest_progress(None);
                Ok(())
            })
        });
        if result.is_err() {
            self.progress.clear();
        }
        result
    }

    /// Reads and counts files (plain text, .jsonl, .jsonl.zst; see `crate::corpus`). Every file is
    /// opened before any is read, so a missing or unreadable one fails at once.
    pub fn count_files(
        &mut self,
        paths: &[PathBuf],
        read: &ReadOptions,
        stop: StopFn,
    ) -> Result<()> {
        let mut formats = Vec::with_capacity(paths.len());
        let mut total = 0u64;
        for path in paths {
            let format = corpus::detect_format(path)?;
            let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
            if meta.is_dir() {
                return Err(Error::invalid(format!(
                    "{} is a directory; pass the files in it (the Python API and the CLI expand \
                     directories and globs)",
                    path.display()
                )));
            }
            // A FIFO or device would block or never end: refused before any reading starts.
            crate::files::open_regular(path)?;
            total += meta.len();
            formats.push((format, meta.len()));
        }
        let threads = self.ensure_shards();
        let total_before = self.stats.bytes.load(Relaxed);
        let this = &*self;
        let reports: Vec<Mutex<Utf8Report>> = paths.iter().map(|_| Mutex::default()).collect();
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let failed = AtomicBool::new(false);
        let in_flight = AtomicUsize::new(0);
        let limit = threads * 2 + 1;
        let target = Some(total_before + total);

        crate::pool::install(self.num_threads, || {
            let halt = || failed.load(Relaxed) || stop();
            let fail = |e: Error| {
                let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    *slot = Some(e);
                }
                failed.store(true, Relaxed);
            };
            // One job: count a block of whole lines of file `index`.
            let run = |index: usize, job: Job| {
                if halt() {
                    return;
                }
                let path = &paths[index];
                let format = formats[index].0;
                let outcome = match job {
                    Job::Range(start, end) => {
                        corpus::read_range(path, start, end).and_then(|(base, data)| {
                            let r = this.count_block(path, format, base, &data, read);
                            this.stats.bytes.fetch_add(end - start, Relaxed);
                            r
                        })
                    }
                    Job::Data(base, data) => this.count_block(path, format, base, &data, read),
                };
                match outcome {
                    Ok(report) if report.replaced_lines > 0 => reports[index]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .absorb(&report),
                    Ok(_) => {}
                    Err(e) => fail(e),
                }
                this.ingest_progress(target);
            };
            rayon::scope(|scope| {
                // Hands a job to the pool, or runs it here when enough are queued (this thread
                // then works instead of waiting, and memory stays bounded).
                let dispatch = |index: usize, job: Job| {
                    if in_flight.load(Relaxed) >= limit {
                        run(index, job);
                    } else {
                        in_flight.fetch_add(1, Relaxed);
                        let run = &run;
                        let in_flight = &in_flight;
                        scope.spawn(move |_| {
                            run(index, job);
                            in_flight.fetch_sub(1, Relaxed);
                        });
                    }
                };
                'files: for (index, path) in paths.iter().enumerate() {
                    let (format, len) = formats[index];
                    match format.compression {
                        corpus::Compression::None => {
                            for (start, end) in corpus::plan_ranges(len, BLOCK_BYTES) {
                                if halt() {
                                    break 'files;
                                }
                                dispatch(index, Job::Range(start, end));
                            }
                        }
                        corpus::Compression::Zstd | corpus::Compression::Gzip => {
                            let mut blocks =
                                match corpus::LineBlocks::open(path, BLOCK_BYTES as usize) {
                                    Ok(b) => b,
                                    Err(e) => {
                                        fail(e);
                                        break 'files;
                                    }
                                };
                            let mut consumed = 0;
                            loop {
                                if halt() {
                                    break 'files;
                                }
                                match blocks.next_block() {
                                    Ok(Some((base, data))) => {
                                        let now = blocks.bytes_consumed();
                                        this.stats.bytes.fetch_add(now - consumed, Relaxed);
                                        consumed = now;
                                        dispatch(index, Job::Data(base, data));
                                    }
                                    Ok(None) => break,
                                    Err(e) => {
                                        fail(e);
                                        break 'files;
                                    }
                                }
                            }
                            this.stats
                                .bytes
                                .fetch_add(len.saturating_sub(consumed), Relaxed);
                        }
                    }
                }
            });
        });

        if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            self.progress.clear();
            return Err(e);
        }
        if stop() {
            self.progress.clear();
            return Err(Error::Interrupted);
        }
        for (path, report) in paths.iter().zip(reports) {
            let report = report.into_inner().unwrap_or_else(|p| p.into_inner());
            if report.replaced_lines > 0 {
                self.utf8.push((path.clone(), report));
            }
        }
        Ok(())
    }

    fn shard(&self) -> std::sync::MutexGuard<'_, ChunkMap> {
        let index = rayon::current_thread_index().unwrap_or(0) % self.shards.len();
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn count_block(
        &self,
        path: &Path,
        format: InputFormat,
        base: u64,
        data: &[u8],
        read: &ReadOptions,
    ) -> Result<Utf8Report> {
        let mut map = self.shard();
        let (mut sequences, mut chunks) = (0u64, 0u64);
        let report = corpus::for_each_sequence(path, format, base, data, read, &mut |text| {
            sequences += 1;
            chunks += count_text(&self.pretokenizer, text, &mut map)?;
            Ok(())
        })?;
        drop(map);
        self.stats.sequences.fetch_add(sequences, Relaxed);
        self.stats.chunks.fetch_add(chunks, Relaxed);
        Ok(report)
    }

    fn ingest_progress(&self, total: Option<u64>) {
        self.progress.update(|elapsed| {
            let bytes = self.stats.bytes.load(Relaxed);
            let chunks = self.stats.chunks.load(Relaxed);
            let rate = mb(bytes) / elapsed.as_secs_f64().max(1e-9);
            match total {
                Some(total) if total > 0 => format!(
                    "ingest  {:.1}/{:.1} MB  {:>3.0}%  {rate:.1} MB/s  {} chunks  ETA {}",
                    mb(bytes),
                    mb(total),
                    100.0 * bytes as f64 / total as f64,
                    human(chunks),
                    eta(bytes as f64, total as f64, elapsed)
                ),
                _ => format!(
                    "ingest  {:.1} MB  {rate:.1} MB/s  {} texts  {} chunks",
                    mb(bytes),
                    human(self.stats.sequences.load(Relaxed)),
                    human(chunks)
                ),
            }
        });
    }

    /// Merges the per-thread maps (in parallel) into one list of distinct chunks, in no
    /// particular order (training does not depend on it).
    pub fn into_counts(self) -> ChunkCounts {
        let maps: Vec<ChunkMap> = self
            .shards
            .into_par_iter()
            .map(|m| {
                let mut m = m.into_inner().unwrap_or_else(|p| p.into_inner());
                m.flush();
                m
            })
            .filter(|m| m.len() > 0)
            .collect();
        let parts = rayon::current_num_threads() * 4;
        let (short, long): (Vec<_>, Vec<_>) = maps.into_iter().map(|m| (m.short, m.long)).unzip();
        let short = merge_maps(
            short,
            |k| spread(*k as u64 ^ (*k >> 64) as u64, parts),
            parts,
        );
        let long = merge_maps(
            long,
            |k| {
                let mut h = rustc_hash::FxHasher::default();
                std::hash::Hash::hash(k, &mut h);
                spread(std::hash::Hasher::finish(&h), parts)
            },
            parts,
        );
        let mut out = ChunkCounts::default();
        let n =
            short.iter().map(Vec::len).sum::<usize>() + long.iter().map(Vec::len).sum::<usize>();
        out.ends.reserve(n);
        out.counts.reserve(n);
        for part in short {
            for (key, count) in part {
                unpack_into(key, &mut out.data);
                out.ends.push(out.data.len());
                out.counts.push(count);
            }
        }
        for part in long {
            for (chunk, count) in part {
                out.push(&chunk, count);
            }
        }
        out
    }
}

enum Job {
    /// Lines starting in this byte range of an uncompressed file (read by the worker).
    Range(u64, u64),
    /// Whole lines already read (decompressed), starting at this stream offset.
    Data(u64, Vec<u8>),
}

/// Splits one sequence into chunks (the pre-tokenizer's pieces: matches and, as in HF's
/// "isolated" split, the text between them) and counts them. Returns the number of chunks.
fn count_text(pretokenizer: &PreTokenizer, text: &str, map: &mut ChunkMap) -> Result<u64> {
    let mut n = 0u64;
    pretokenizer.split(text, |piece: &str| {
        n += 1;
        map.add(piece.as_bytes());
    })?;
    Ok(n)
}

// =============================================================================================
// The merge loop

#[inline]
fn pair_key(left: u32, right: u32) -> u64 {
    ((left as u64) << 32) | right as u64
}

#[inline]
fn unpack(key: u64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

const NO_RANK: u32 = u32::MAX;

/// The order in which ties are broken: pair keys compare as (rank(left), rank(right)).
struct Ranks {
    bytes: bool,
    rank_of: Vec<u32>,
    id_of_rank: Vec<u32>,
}

impl Ranks {
    #[inline]
    fn tie(&self, left: u32, right: u32) -> u64 {
        if self.bytes {
            pair_key(self.rank_of[left as usize], self.rank_of[right as usize])
        } else {
            pair_key(left, right)
        }
    }

    #[inline]
    fn pair(&self, tie: u64) -> (u32, u32) {
        let (l, r) = unpack(tie);
        if self.bytes {
            (self.id_of_rank[l as usize], self.id_of_rank[r as usize])
        } else {
            (l, r)
        }
    }

    fn assign(&mut self, id: u32) {
        if !self.bytes {
            return;
        }
        if self.rank_of.len() <= id as usize {
            self.rank_of.resize(id as usize + 1, NO_RANK);
        }
        if self.rank_of[id as usize] == NO_RANK {
            self.rank_of[id as usize] = self.id_of_rank.len() as u32;
            self.id_of_rank.push(id);
        }
    }
}

/// A queue entry: the count its pair had when pushed, the pair (as a tie key), a sequence
/// number (older entries of one pair first) and the list of pieces it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    count: u64,
    tie: u64,
    seq: u64,
    list: u32,
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.count
            .cmp(&other.count)
            .then_with(|| other.tie.cmp(&self.tie))
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The vocabulary as Hugging Face builds it: byte-level strings to ids.
struct Vocab {
    ids: FxHashMap<String, u32>,
    strings: Vec<String>,
    ordinary: Vec<bool>,
    byte_ids: [u32; 256],
    specials: Vec<(String, u32)>,
}

impl Vocab {
    fn new(special_tokens: &[String]) -> Result<Self> {
        let mut v = Vocab {
            ids: FxHashMap::default(),
            strings: Vec::new(),
            ordinary: Vec::new(),
            byte_ids: [0; 256],
            specials: Vec::new(),
        };
        for special in special_tokens {
            if special.is_empty() {
                return Err(Error::invalid("a special token is the empty string"));
            }
            if !v.ids.contains_key(special) {
                let id = v.push(special.clone());
                v.specials.push((special.clone(), id));
            }
        }
        for byte in bytelevel::alphabet_in_char_order() {
            let s = bytelevel::byte_to_char(byte).to_string();
            let id = match v.ids.get(&s) {
                Some(&id) => id,
                None => v.push(s),
            };
            v.ordinary[id as usize] = true;
            v.byte_ids[byte as usize] = id;
        }
        Ok(v)
    }

    fn push(&mut self, s: String) -> u32 {
        let id = self.strings.len() as u32;
        self.ids.insert(s.clone(), id);
        self.strings.push(s);
        self.ordinary.push(false);
        id
    }

    fn len(&self) -> usize {
        self.strings.len()
    }
}

/// All pieces, flat: piece `w` is `symbols[meta[w].start..][..meta[w].len]`, seen `meta[w].count`
/// times. One record per piece, so visiting a piece costs one cache miss for its record.
struct Pieces {
    symbols: Vec<u32>,
    meta: Vec<Meta>,
}

#[derive(Clone, Copy)]
struct Meta {
    start: usize,
    count: u64,
    len: u32,
}

/// Raw access to distinct pieces from several threads at once.
#[derive(Clone, Copy)]
struct PiecesPtr {
    symbols: *mut u32,
    meta: *mut Meta,
}

// SAFETY: a `PiecesPtr` is only used to reach pieces named in one position list, whose entries
// are distinct (every list is built with per-piece deduplication), so no two threads touch the
// same piece (its record or its symbols).
unsafe impl Send for PiecesPtr {}
unsafe impl Sync for PiecesPtr {}

/// A hint to load `p`'s cache line soon (piece visits are memory-latency bound).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The changes one merge round makes: per pair, the count delta and the pieces where it gained
/// an occurrence (HF's `where_to_update`).
type Round = FxHashMap<u64, (i64, Vec<u32>)>;

/// Merges (a, b) -> t left to right in one piece, reporting pair changes exactly as Hugging
/// Face's `Word::merge` does (the merged pair itself is not decremented). Returns the new length.
#[inline]
fn merge_piece(sym: &mut [u32], a: u32, b: u32, t: u32, mut emit: impl FnMut(u64, i64)) -> usize {
    let n = sym.len();
    let (mut r, mut w) = (0usize, 0usize);
    while r < n {
        if sym[r] == a && r + 1 < n && sym[r + 1] == b {
            if w > 0 {
                let prev = sym[w - 1];
                emit(pair_key(prev, a), -1);
                emit(pair_key(prev, t), 1);
            }
            if r + 2 < n {
                let next = sym[r + 2];
                emit(pair_key(b, next), -1);
                emit(pair_key(t, next), 1);
            }
            sym[w] = t;
            r += 2;
        } else {
            sym[w] = sym[r];
            r += 1;
        }
        w += 1;
    }
    w
}

/// Applies one merge to the pieces in `positions`, collecting the changes into `round`.
fn merge_round(ptr: PiecesPtr, positions: &[u32], (a, b, t): (u32, u32, u32), round: &mut Round) {
    for (i, &w) in positions.iter().enumerate() {
        // SAFETY: see `PiecesPtr`; every position is a valid piece index, each record describes
        // an in-bounds slice of `symbols`, disjoint from every other piece's.
        unsafe {
            if let Some(&ahead) = positions.get(i + 16) {
                prefetch(ptr.meta.add(ahead as usize));
            }
            if let Some(&near) = positions.get(i + 6) {
                prefetch(ptr.symbols.add((*ptr.meta.add(near as usize)).start));
            }
        }
        let meta = unsafe { &mut *ptr.meta.add(w as usize) };
        if meta.len < 2 {
            continue;
        }
        let sym = unsafe {
            std::slice::from_raw_parts_mut(ptr.symbols.add(meta.start), meta.len as usize)
        };
        let count = meta.count as i64;
        let new_len = merge_piece(sym, a, b, t, |key, change| {
            let slot = round.entry(key).or_insert_with(|| (0, Vec::new()));
            slot.0 += change * count;
            if change > 0 && slot.1.last() != Some(&w) {
                slot.1.push(w);
            }
        });
        meta.len = new_len as u32;
    }
}

fn merge_round_parallel(
    ptr: PiecesPtr,
    positions: &[u32],
    merge: (u32, u32, u32),
    round: &mut Round,
) {
    let parts = rayon::current_num_threads() * 4;
    let size = positions.len().div_ceil(parts).max(1);
    let partial: Vec<Round> = positions
        .par_chunks(size)
        .map(|chunk| {
            let mut local = Round::default();
            merge_round(ptr, chunk, merge, &mut local);
            local
        })
        .collect();
    for local in partial {
        for (key, (delta, words)) in local {
            let slot = round.entry(key).or_insert_with(|| (0, Vec::new()));
            slot.0 += delta;
            slot.1.extend_from_slice(&words);
        }
    }
}

/// Trains on counted chunks (from `ChunkCounter::into_counts`, or `ChunkCounts::from_pairs`).
pub fn train_counts(
    counts: ChunkCounts,
    options: &TrainOptions,
    stop: StopFn,
    progress: &Progress,
) -> Result<Trained> {
    pretokenize::resolve_pattern(&options.pattern)?;
    let vocab = Vocab::new(&options.special_tokens)?;
    let base_size = vocab.len();
    if options.vocab_size < base_size {
        return Err(Error::invalid(format!(
            "vocab_size={} is too small: the 256 byte tokens and {} special token(s) already take \
             {base_size} ids",
            options.vocab_size,
            vocab.specials.len()
        )));
    }
    if counts.is_empty() {
        return Err(Error::invalid(
            "the corpus is empty: no text was found in the inputs",
        ));
    }
    let distinct_chunks = counts.len();
    crate::pool::install(options.num_threads, move || {
        train_pieces(counts, vocab, options, stop, progress)
    })
    .map(|(parts, merges, stop_reason, vocab_size)| Trained {
        parts,
        stats: TrainStats {
            merges,
            vocab_size,
            distinct_chunks,
            stop_reason,
        },
    })
}

fn train_pieces(
    counts: ChunkCounts,
    mut vocab: Vocab,
    options: &TrainOptions,
    stop: StopFn,
    progress: &Progress,
) -> Result<(TokenizerParts, usize, StopReason, usize)> {
    progress.start_phase();
    // ---- the initial pair counts and position lists, dense over byte pairs, one part per thread
    let n = counts.len();
    let threads = rayon::current_num_threads();
    let per = n.div_ceil(threads).max(1);
    let partial: Vec<(Vec<i64>, Vec<Vec<u32>>)> = (0..n.div_ceil(per))
        .into_par_iter()
        .map(|c| {
            let mut pair_counts = vec![0i64; 1 << 16];
            let mut lists: Vec<Vec<u32>> = vec![Vec::new(); 1 << 16];
            let mut last = vec![u32::MAX; 1 << 16];
            for w in c * per..((c + 1) * per).min(n) {
                let (bytes, count) = counts.get(w);
                for pair in bytes.windows(2) {
                    let p = (pair[0] as usize) << 8 | pair[1] as usize;
                    pair_counts[p] += count as i64;
                    if last[p] != w as u32 {
                        last[p] = w as u32;
                        lists[p].push(w as u32);
                    }
                }
            }
            (pair_counts, lists)
        })
        .collect();
    // ---- pieces as byte ids, in place of the bytes
    let ChunkCounts { data, ends, counts } = counts;
    let byte_ids = vocab.byte_ids;
    let symbols: Vec<u32> = data.par_iter().map(|&b| byte_ids[b as usize]).collect();
    drop(data);
    let mut meta = Vec::with_capacity(n);
    let mut previous = 0usize;
    for (&end, &count) in ends.iter().zip(&counts) {
        meta.push(Meta {
            start: previous,
            count,
            len: (end - previous) as u32,
        });
        previous = end;
    }
    drop((ends, counts));
    let mut pieces = Pieces { symbols, meta };
    if stop() {
        return Err(Error::Interrupted);
    }

    let mut ranks = Ranks {
        bytes: options.tie_break == TieBreak::Bytes,
        rank_of: Vec::new(),
        id_of_rank: Vec::new(),
    };
    for byte in 0..=255u8 {
        ranks.assign(vocab.byte_ids[byte as usize]);
    }

    let mut pair_counts: FxHashMap<u64, i64> = FxHashMap::default();
    let mut lists: Vec<Vec<u32>> = Vec::new();
    let mut free_lists: Vec<u32> = Vec::new();
    let mut heap: BinaryHeap<Entry> = BinaryHeap::new();
    let mut seq = 0u64;
    {
        let mut partial = partial;
        for p in 0..1usize << 16 {
            let total: i64 = partial.iter().map(|(c, _)| c[p]).sum();
            if total == 0 {
                continue;
            }
            let mut list = Vec::with_capacity(partial.iter().map(|(_, l)| l[p].len()).sum());
            for (_, l) in partial.iter_mut() {
                list.append(&mut l[p]);
            }
            let (a, b) = (vocab.byte_ids[p >> 8], vocab.byte_ids[p & 0xff]);
            pair_counts.insert(pair_key(a, b), total);
            heap.push(Entry {
                count: total as u64,
                tie: ranks.tie(a, b),
                seq,
                list: lists.len() as u32,
            });
            seq += 1;
            lists.push(list);
        }
    }

    // ---- merges
    progress.start_phase();
    let target = options.vocab_size;
    let wanted = target.saturating_sub(vocab.len()).max(1);
    let mut merges: Vec<(u32, u32)> = Vec::new();
    let mut round = Round::default();
    let ptr = PiecesPtr {
        symbols: pieces.symbols.as_mut_ptr(),
        meta: pieces.meta.as_mut_ptr(),
    };
    let mut reason = StopReason::VocabularyFull;
    let merges_line = |done: usize, elapsed: Duration| {
        format!(
            "merges  {done}/{wanted}  {:>3.0}%  ETA {}",
            100.0 * done as f64 / wanted as f64,
            eta(done as f64, wanted as f64, elapsed)
        )
    };
    let base_size = vocab.len();
    while vocab.len() < target {
        if stop() {
            progress.clear();
            return Err(Error::Interrupted);
        }
        let Some(mut top) = heap.pop() else {
            reason = StopReason::NoPairsLeft;
            break;
        };
        let (a, b) = ranks.pair(top.tie);
        let current = pair_counts[&pair_key(a, b)] as u64;
        if top.count != current {
            top.count = current;
            heap.push(top);
            continue;
        }
        if top.count < 1 {
            reason = StopReason::NoPairsLeft;
            break;
        }
        if options.min_frequency > top.count {
            reason = StopReason::BelowMinFrequency;
            break;
        }
        let joined = format!("{}{}", vocab.strings[a as usize], vocab.strings[b as usize]);
        let t = match vocab.ids.get(&joined) {
            Some(&id) => id,
            None => vocab.push(joined),
        };
        vocab.ordinary[t as usize] = true;
        ranks.assign(t);
        merges.push((a, b));

        let positions = std::mem::take(&mut lists[top.list as usize]);
        free_lists.push(top.list);
        if positions.len() >= PARALLEL_ROUND {
            merge_round_parallel(ptr, &positions, (a, b, t), &mut round);
        } else {
            merge_round(ptr, &positions, (a, b, t), &mut round);
        }
        drop(positions);
        for (key, (delta, words)) in round.drain() {
            let count = pair_counts.entry(key).or_insert(0);
            *count += delta;
            if !words.is_empty() && *count > 0 {
                let list = match free_lists.pop() {
                    Some(slot) => {
                        lists[slot as usize] = words;
                        slot
                    }
                    None => {
                        lists.push(words);
                        (lists.len() - 1) as u32
                    }
                };
                let (l, r) = unpack(key);
                heap.push(Entry {
                    count: *count as u64,
                    tie: ranks.tie(l, r),
                    seq,
                    list,
                });
                seq += 1;
            }
        }
        let done = vocab.len() - base_size;
        progress.update(|elapsed| merges_line(done, elapsed));
    }
    let done = vocab.len() - base_size;
    progress.finish(|elapsed| {
        format!(
            "merges  {done} new tokens from {} merges in {:.1} s{}",
            merges.len(),
            elapsed.as_secs_f64(),
            match reason {
                StopReason::VocabularyFull => String::new(),
                StopReason::NoPairsLeft => " (no pair left to merge)".to_string(),
                StopReason::BelowMinFrequency => " (stopped at min_frequency)".to_string(),
            }
        )
    });

    // ---- the result, as Hugging Face saves it: a pair merged twice keeps its later rank
    let mut last_index: FxHashMap<(u32, u32), usize> = FxHashMap::default();
    for (i, pair) in merges.iter().enumerate() {
        last_index.insert(*pair, i);
    }
    let merge_list: Vec<(u32, u32)> = merges
        .iter()
        .enumerate()
        .filter(|(i, pair)| last_index[*pair] == *i)
        .map(|(_, pair)| *pair)
        .collect();
    let mut tokens = Vec::with_capacity(vocab.len());
    for (id, s) in vocab.strings.iter().enumerate() {
        if vocab.ordinary[id] {
            let bytes = bytelevel::decode_str(s).map_err(|c| {
                Error::invalid(format!(
                    "internal: token {id} has non-byte-level char {c:?}"
                ))
            })?;
            tokens.push((bytes, id as u32));
        }
    }
    let parts = TokenizerParts {
        tokens,
        merge_rule: MergeRule::List(merge_list),
        specials: vocab.specials.clone(),
        pattern: pretokenize::resolve_pattern(&options.pattern)?.to_string(),
        split: pretokenize::SplitOptions::default(),
        whole_piece_first: false,
        add_prefix_space: false,
    };
    Ok((parts, merges.len(), reason, vocab.len()))
}

// =============================================================================================
// One-call entry points

/// Trains on texts, each one sequence.
pub fn train_from_texts<S: AsRef<str> + Sync>(
    texts: &[S],
    options: &TrainOptions,
    stop: StopFn,
) -> Result<Trained> {
    let mut counter =
        ChunkCounter::new(&options.pattern, options.num_threads, options.show_progress)?;
    counter.count_texts(texts, stop)?;
    finish(counter, options, stop)
}

/// Trains on files (plain text, .jsonl, .jsonl.zst; see `crate::corpus`).
pub fn train_from_files(
    paths: &[PathBuf],
    read: &ReadOptions,
    options: &TrainOptions,
    stop: StopFn,
) -> Result<Trained> {
    let mut counter =
        ChunkCounter::new(&options.pattern, options.num_threads, options.show_progress)?;
    counter.count_files(paths, read, stop)?;
    finish(counter, options, stop)
}

/// Ends ingestion (final progress line, merged maps) and trains.
pub fn finish(counter: ChunkCounter, options: &TrainOptions, stop: StopFn) -> Result<Trained> {
    let progress = Progress::new(options.show_progress);
    let (bytes, chunks) = (
        counter.stats.bytes.load(Relaxed),
        counter.stats.chunks.load(Relaxed),
    );
    counter.progress.finish(|elapsed| {
        format!(
            "ingest  {:.1} MB, {} texts/lines, {} chunks in {:.1} s",
            mb(bytes),
            human(counter.stats.sequences.load(Relaxed)),
            human(chunks),
            elapsed.as_secs_f64()
        )
    });
    let counts = crate::pool::install(options.num_threads, || counter.into_counts());
    train_counts(counts, options, stop, &progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(vocab_size: usize, tie_break: TieBreak) -> TrainOptions {
        TrainOptions {
            vocab_size,
            special_tokens: vec!["<|endoftext|>".into()],
            tie_break,
            ..TrainOptions::default()
        }
    }

    fn train(texts: &[&str], o: &TrainOptions) -> Trained {
        train_from_texts(texts, o, &never_stop).unwrap()
    }

    fn merges_as_bytes(t: &Trained) -> Vec<(Vec<u8>, Vec<u8>)> {
        let bytes_of: FxHashMap<u32, Vec<u8>> = t
            .parts
            .tokens
            .iter()
            .map(|(b, id)| (*id, b.clone()))
            .collect();
        match &t.parts.merge_rule {
            MergeRule::List(list) => list
                .iter()
                .map(|(a, b)| (bytes_of[a].clone(), bytes_of[b].clone()))
                .collect(),
            MergeRule::Ranks => unreachable!(),
        }
    }

    #[test]
    fn merge_piece_reports_changes_like_hugging_face() {
        // "a b a b" merging (a, b) -> t: HF's Word::merge change list.
        let (a, b, t) = (1, 2, 9);
        let mut sym = vec![a, b, a, b];
        let mut changes = Vec::new();
        let n = merge_piece(&mut sym, a, b, t, |k, c| changes.push((unpack(k), c)));
        assert_eq!(&sym[..n], &[t, t]);
        assert_eq!(
            changes,
            vec![((b, a), -1), ((t, a), 1), ((t, a), -1), ((t, t), 1)]
        );
        // Overlapping "a a a" merging (a, a): one merge, the second window is decremented.
        let mut sym = vec![a, a, a];
        let mut changes = Vec::new();
        let n = merge_piece(&mut sym, a, a, t, |k, c| changes.push((unpack(k), c)));
        assert_eq!(&sym[..n], &[t, a]);
        assert_eq!(changes, vec![((a, a), -1), ((t, a), 1)]);
    }

    #[test]
    fn layout_and_first_merges() {
        let o = options(256 + 1 + 3, TieBreak::HuggingFace);
        let t = train(&["aaa bbb aaa", "ab ab"], &o);
        assert_eq!(t.parts.specials, vec![("<|endoftext|>".to_string(), 0)]);
        // Byte '!' (the first printable character) is id 1.
        assert!(t.parts.tokens.contains(&(b"!".to_vec(), 1)));
        assert_eq!(t.stats.vocab_size, 260);
        let m = merges_as_bytes(&t);
        // "aa" occurs 4 times (overlapping windows), "ab" twice, " b"/"bb" ...
        assert_eq!(m[0], (b"a".to_vec(), b"a".to_vec()));
    }

    #[test]
    fn deterministic_across_threads_and_tie_rules_differ() {
        let text: Vec<String> = (0..400)
            .map(|i| {
                format!(
                    "w{} {} zq{} {}",
                    i % 37,
                    i * 7 % 101,
                    i % 13,
                    "xy".repeat(i % 5)
                )
            })
            .collect();
        for tie in [TieBreak::HuggingFace, TieBreak::Bytes] {
            let mut o = options(600, tie);
            o.num_threads = Some(1);
            let one = train_from_texts(&text, &o, &never_stop).unwrap();
            o.num_threads = Some(2);
            let two = train_from_texts(&text, &o, &never_stop).unwrap();
            assert_eq!(one.parts.tokens, two.parts.tokens);
            assert_eq!(one.parts.merge_rule, two.parts.merge_rule);
        }
    }

    #[test]
    fn counts_beyond_32_bits() {
        // Hugging Face's i32 pair counts would wrap these to negative numbers and drop the pairs.
        let counts = ChunkCounts::from_pairs([
            (&b"ab"[..], 3_000_000_000),
            (b"cd", 5_000_000_000),
            (b"ef", 1),
        ]);
        let o = options(257 + 3, TieBreak::HuggingFace);
        let t = train_counts(counts, &o, &never_stop, &Progress::new(false)).unwrap();
        assert_eq!(
            merges_as_bytes(&t),
            vec![
                (b"c".to_vec(), b"d".to_vec()),
                (b"a".to_vec(), b"b".to_vec()),
                (b"e".to_vec(), b"f".to_vec())
            ]
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        let o = options(200, TieBreak::HuggingFace);
        let e = train_from_texts(&["abc"], &o, &never_stop).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let o = options(300, TieBreak::HuggingFace);
        let e = train_from_texts::<&str>(&[], &o, &never_stop).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = train_from_texts(&[""], &o, &never_stop).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let mut bad = options(300, TieBreak::HuggingFace);
        bad.pattern = "cl100k_typo".into();
        let e = train_from_texts(&["abc"], &bad, &never_stop).unwrap_err();
        assert!(e.to_string().contains("unknown pattern name"), "{e}");
        assert!(TieBreak::parse("random").is_err());
    }

    #[test]
    fn stop_callback_interrupts() {
        let o = options(400, TieBreak::HuggingFace);
        let calls = AtomicUsize::new(0);
        let stop = || calls.fetch_add(1, Relaxed) > 3;
        let texts: Vec<String> = (0..100).map(|i| format!("text {i} and more")).collect();
        let e = train_from_texts(&texts, &o, &stop).unwrap_err();
        assert!(matches!(e, Error::Interrupted));
    }

    #[test]
    fn custom_pattern_keeps_text_between_matches() {
        let mut o = options(257 + 2, TieBreak::HuggingFace);
        o.pattern = r"\w+".into();
        let t = train(&["ab,ab;ab"], &o);
        // Pieces: "ab" x3, "," and ";" — the first merge is (a, b).
        assert_eq!(merges_as_bytes(&t)[0], (b"a".to_vec(), b"b".to_vec()));
    }

    #[test]
    fn special_token_equal_to_an_alphabet_character_takes_its_id() {
        let mut o = options(256 + 2, TieBreak::HuggingFace);
        o.special_tokens = vec!["<s>".into(), "a".into()];
        let t = train(&["aaaa"], &o);
        assert!(t.parts.tokens.contains(&(b"a".to_vec(), 1)));
        assert_eq!(t.parts.specials[1], ("a".to_string(), 1));
        assert_eq!(t.stats.vocab_size, 258);
    }
}
