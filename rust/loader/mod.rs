//! Packed-batch loading over the shards of `crate::shard` (see docs/shards.md).
//!
//! Design notes
//! - **One global row stream.** Each source (a shard directory's split) has an endless stream of
//!   rows of `seq_len + 1` tokens: epoch after epoch, each epoch a fresh seeded order
//!   (`order::epoch_key(seed, source, epoch)`). Several sources are interleaved row by row by a
//!   smooth weighted round-robin (`order::Schedule`), exact in every period. The stream depends on
//!   the data, `seq_len`, the packing, the weights and the seed: never on ranks, workers, threads or
//!   the batch size.
//! - **Ranks take shares of the stream.** Global step at position `p` is the rows
//!   `[p, p + world_size * batch_size)`; rank `r` takes the block `[p + r*B, p + (r+1)*B)`. So the
//!   position is one integer of rows, and a restore with any world size or batch size continues
//!   from the exact next row (resume is at row granularity).
//! - **Concat**: the source's tokens back to back, cut into windows `[k*T, k*T + T + 1)` (each
//!   token is a label exactly once per epoch, as in llm.c); windows in a Feistel order.
//! - **Best fit**: documents in a Feistel order are split into pieces of at most `T + 1` tokens
//!   (overlapping by the one token that is both the last label of a piece and the first input of
//!   the next), fed into a bounded buffer, and each row is filled by repeatedly taking the largest
//!   buffered piece that fits the space left: O(log_64 T) in a hierarchical bitset over piece
//!   lengths with a FIFO per length (equal lengths leave in arrival order). Nothing is cropped;
//!   what is left is padding.
//! - **Resume** = the position (global rows) plus, per source, the epoch and the local row where
//!   it began. Concat jumps there in O(1). Best fit replays its packer from the epoch start using
//!   document lengths only (`doc_offsets`, no tokens): a few microseconds per row, and the state
//!   stays a few integers instead of a serialized buffer.
//! - **Document structure**: `position_ids` restart at every segment (document, piece or
//!   padding); `cu_seqlens` has a fixed length `B * segments_per_row + 1`, where
//!   `segments_per_row` bounds the segments of any row's `T` inputs from the shortest document
//!   (piece) `m` of the data: concat `(T - 2) / m + 2`, best fit `(T + 1) / m + 1`, never more
//!   than `T`. Unused entries repeat `B * T` (empty trailing segments).
//! - **Integrity**: every shard's size, safetensors header, metadata, dtype, token and document
//!   counts are checked against the manifest at open, `doc_offsets` fully (monotone, 0 to
//!   `n_tokens`); sha256 eagerly (`Verify::Eager`), on the first read of each shard in the
//!   background thread (`Verify::Lazy`), or not at all; every row's tokens are checked against
//!   the vocabulary size while they are widened (one `max` per element).
//! - **Memory and speed**: shards are read-only shared memory maps, so forked workers and many
//!   ranks on a node share the page cache. Tokens are widened straight from the map into the
//!   output arrays; the cache lines a row needs are touched ahead in tight loops so their
//!   latencies overlap; output vectors are recycled (`prefetch::BufferPool`); batches of at least
//!   `PARALLEL_TOKENS` are assembled rows-in-parallel on `crate::pool` while the next step is
//!   packed. Tried and dropped: fresh output vectors per batch (up to 3x slower from page faults
//!   when the allocator hands them back to the system).

pub mod order;
pub mod pack;
pub mod prefetch;

use crate::error::{Error, Result};
use crate::shard::manifest::{self, Manifest, ShardInfo};
use crate::shard::safetensors::{self, Dtype};
use memmap2::Mmap;
use rayon::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

pub use order::{Feistel, Schedule};
pub use pack::{Span, PIECE_OVERLAP};

/// How rows are made from documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    Concat,
    BestFit,
}

impl Packing {
    pub fn parse(name: &str) -> Result<Packing> {
        match name {
            "concat" => Ok(Packing::Concat),
            "best_fit" => Ok(Packing::BestFit),
            other => Err(Error::invalid(format!(
                "packing must be \"concat\" or \"best_fit\", got {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Packing::Concat => "concat",
            Packing::BestFit => "best_fit",
        }
    }
}

/// When shard checksums are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// All shards, in parallel, before the loader is returned.
    Eager,
    /// Each shard the first time a batch reads its tokens (in the prefetch thread).
    Lazy,
    /// Never (structure, sizes and token ranges are still checked).
    Off,
}

#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Shard directories (each with a manifest.json).
    pub sources: Vec<PathBuf>,
    /// Integer mixing weights, one per source.
    pub weights: Vec<u64>,
    pub split: String,
    pub seq_len: usize,
    pub packing: Packing,
    pub seed: u64,
    /// Best fit: pieces held in the packing buffer.
    pub buffer_size: usize,
    /// Labels that cross a document (or piece) boundary become -100.
    pub mask_boundary_labels: bool,
    pub verify: Verify,
}

/// The label of positions that carry no loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

const UNCHECKED: u8 = 0;
const VERIFIED: u8 = 1;

/// One memory-mapped shard, checked against its manifest record.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    tokens: Range<usize>,
    offsets: Range<usize>,
    dtype: Dtype,
    pub n_tokens: u64,
    pub n_docs: u64,
    sha256: String,
    /// `UNCHECKED` or `VERIFIED`: an atomic (not a lock) so a forked child never waits on a lock
    /// its parent's threads held.
    verified: AtomicU8,
}

impl Shard {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn open(path: PathBuf, info: &ShardInfo, manifest: &Manifest, split: &str) -> Result<Shard> {
        let location = path.display().to_string();
        let bad = |message: String| Error::format(location.clone(), message);
        // A FIFO or device in place of a shard would block or never end: refused before opening.
        let file = crate::files::open_regular(&path)?;
        let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if size != info.bytes {
            return Err(bad(format!(
                "is {size} bytes but the manifest says {} (truncated or replaced?)",
                info.bytes
            )));
        }
        if size < 8 {
            return Err(bad(format!(
                "is {size} bytes: too short for a safetensors header"
            )));
        }
        // SAFETY: the map is read-only; shards are written once under a temporary name and
        // renamed, so a finished shard is never modified in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let layout = safetensors::read_layout(&map, &location)?;
        let meta = |key: &str| layout.metadata.get(key).map(String::as_str);
        if meta("format") != Some("ferrolm-shard") {
            return Err(bad(format!(
                "metadata format is {:?}, expected \"ferrolm-shard\"",
                meta("format")
            )));
        }
        if meta("format_version") != Some("1") {
            return Err(bad(format!(
                "metadata format_version is {:?}; this ferrolm reads version 1",
                meta("format_version")
            )));
        }
        if meta("tokenizer_sha256") != Some(manifest.tokenizer.sha256.as_str()) {
            return Err(bad(format!(
                "metadata tokenizer_sha256 {:?} differs from the manifest's {:?}",
                meta("tokenizer_sha256"),
                manifest.tokenizer.sha256
            )));
        }
        if meta("split") != Some(split) {
            return Err(bad(format!(
                "metadata split is {:?}, expected {split:?}",
                meta("split")
            )));
        }
        let expected = match manifest.dtype.as_str() {
            "uint16" => Dtype::U16,
            "uint32" => Dtype::U32,
            other => {
                return Err(Error::format(
                    "manifest.json: dtype",
                    format!("must be \"uint16\" or \"uint32\", got {other:?}"),
                ))
            }
        };
        let (dtype, tokens) = layout
            .tensors
            .get("tokens")
            .cloned()
            .ok_or_else(|| bad("has no tensor \"tokens\"".into()))?;
        if dtype != expected {
            return Err(bad(format!(
                "tensor \"tokens\" is {} but the manifest says {}",
                dtype.name(),
                manifest.dtype
            )));
        }
        let n_tokens = (tokens.len() / dtype.size()) as u64;
        if n_tokens != info.tokens {
            return Err(bad(format!(
                "holds {n_tokens} tokens but the manifest says {}",
                info.tokens
            )));
        }
        let (offsets_dtype, offsets) = layout
            .tensors
            .get("doc_offsets")
            .cloned()
            .ok_or_else(|| bad("has no tensor \"doc_offsets\"".into()))?;
        if offsets_dtype != Dtype::U64 {
            return Err(bad(format!(
                "tensor \"doc_offsets\" is {}, expected U64",
                offsets_dtype.name()
            )));
        }
        let n_offsets = (offsets.len() / 8) as u64;
        if n_offsets != info.documents + 1 {
            return Err(bad(format!(
                "doc_offsets has {n_offsets} entries but the manifest lists {} documents (expected documents + 1)",
                info.documents
            )));
        }
        Ok(Shard {
            path,
            map,
            tokens,
            offsets,
            dtype,
            n_tokens,
            n_docs: info.documents,
            sha256: info.sha256.clone(),
            verified: AtomicU8::new(UNCHECKED),
        })
    }

    /// `doc_offsets[i]` (`i <= n_docs`).
    #[inline]
    pub fn doc_offset(&self, i: u64) -> u64 {
        let at = self.offsets.start + 8 * i as usize;
        u64::from_le_bytes(self.map[at..at + 8].try_into().expect("8 bytes"))
    }

    /// The first `i` in `[0, n_docs]` with `doc_offsets[i] > x`.
    fn first_offset_above(&self, x: u64) -> u64 {
        let (mut lo, mut hi) = (0u64, self.n_docs + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.doc_offset(mid) > x {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    /// Checks `doc_offsets` (0 first, `n_tokens` last, never decreasing) and returns the lengths
    /// of the shortest and longest non-empty documents and the shortest best-fit piece.
    fn check_offsets(&self, seq_len: u64) -> Result<DocLengths> {
        let mut lengths = DocLengths::default();
        let first = self.doc_offset(0);
        if first != 0 {
            return Err(Error::format(
                self.location(),
                format!(
                    "doc_offsets[0] is {first}, expected 0 (byte offset {})",
                    self.offsets.start
                ),
            ));
        }
        let mut previous = 0u64;
        for i in 1..=self.n_docs {
            let offset = self.doc_offset(i);
            if offset < previous || offset > self.n_tokens {
                return Err(Error::format(
                    self.location(),
                    format!(
                        "doc_offsets[{i}] = {offset} (byte offset {}) is below doc_offsets[{}] = {previous} or above the token count {}: corrupted",
                        self.offsets.start + 8 * i as usize,
                        i - 1,
                        self.n_tokens
                    ),
                ));
            }
            lengths.add(offset - previous, seq_len);
            previous = offset;
        }
        if previous != self.n_tokens {
            return Err(Error::format(
                self.location(),
                format!(
                    "doc_offsets ends at {previous} but the shard holds {} tokens",
                    self.n_tokens
                ),
            ));
        }
        Ok(lengths)
    }

    /// Checks the file's sha256 against the manifest.
    pub fn verify(&self) -> Result<()> {
        if self.verified.load(Ordering::Acquire) == VERIFIED {
            return Ok(());
        }
        let sha = manifest::sha256_hex(&self.map);
        if sha != self.sha256 {
            return Err(Error::format(
                self.location(),
                format!(
                    "sha256 {sha} does not match the manifest's {} (the file is corrupted or was replaced)",
                    self.sha256
                ),
            ));
        }
        self.verified.store(VERIFIED, Ordering::Release);
        Ok(())
    }

    /// Widens tokens `[start, start + out.len())` into `out`; returns the largest id.
    #[inline]
    fn widen(&self, start: u64, out: &mut [i64]) -> u32 {
        let size = self.dtype.size();
        let from = self.tokens.start + start as usize * size;
        let bytes = &self.map[from..from + out.len() * size];
        match self.dtype {
            Dtype::U16 => {
                // SAFETY: every bit pattern is a valid u16; `align_to` only hands out the
                // aligned middle, and the fast path is taken only when that is all of it.
                let (head, ids, tail) = unsafe { bytes.align_to::<u16>() };
                if cfg!(target_endian = "little") && head.is_empty() && tail.is_empty() {
                    widen_ids(ids, out)
                } else {
                    widen_bytes::<2>(bytes, out)
                }
            }
            _ => {
                // SAFETY: as above, for u32.
                let (head, ids, tail) = unsafe { bytes.align_to::<u32>() };
                if cfg!(target_endian = "little") && head.is_empty() && tail.is_empty() {
                    widen_ids(ids, out)
                } else {
                    widen_bytes::<4>(bytes, out)
                }
            }
        }
    }

    /// Reads one byte at token `start` so that its cache line is on its way (see `Source::touch`).
    #[inline]
    fn touch(&self, start: u64) -> u8 {
        self.map[self.tokens.start + start as usize * self.dtype.size()]
    }

    #[inline]
    fn touch_offset(&self, i: u64) -> u8 {
        self.map[self.offsets.start + 8 * i as usize]
    }
}

/// Aligned little-endian ids to i64 (vectorizes); returns the largest.
#[inline]
fn widen_ids<T: Copy + Into<u32> + Ord + Default>(ids: &[T], out: &mut [i64]) -> u32 {
    let mut max = T::default();
    for (o, &v) in out.iter_mut().zip(ids) {
        max = max.max(v);
        *o = v.into() as i64;
    }
    max.into()
}

/// Unaligned (or big-endian host) fallback.
fn widen_bytes<const N: usize>(bytes: &[u8], out: &mut [i64]) -> u32 {
    let mut max = 0u32;
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
        let v = c
            .iter()
            .rev()
            .fold(0u32, |acc, &byte| (acc << 8) | byte as u32);
        max = max.max(v);
        *o = v as i64;
    }
    max
}

/// Lengths seen while checking `doc_offsets`.
#[derive(Debug, Clone, Copy)]
struct DocLengths {
    min_doc: u64,
    max_doc: u64,
    min_piece: u64,
    nonempty: u64,
}

impl Default for DocLengths {
    fn default() -> Self {
        DocLengths {
            min_doc: u64::MAX,
            max_doc: 0,
            min_piece: u64::MAX,
            nonempty: 0,
        }
    }
}

impl DocLengths {
    fn add(&mut self, len: u64, seq_len: u64) {
        if len == 0 {
            return;
        }
        self.nonempty += 1;
        self.min_doc = self.min_doc.min(len);
        self.max_doc = self.max_doc.max(len);
        self.min_piece = self.min_piece.min(pack::shortest_piece(len, seq_len));
    }

    fn merge(self, other: DocLengths) -> DocLengths {
        DocLengths {
            min_doc: self.min_doc.min(other.min_doc),
            max_doc: self.max_doc.max(other.max_doc),
            min_piece: self.min_piece.min(other.min_piece),
            nonempty: self.nonempty + other.nonempty,
        }
    }
}

/// One shard directory's split: its shards back to back as one token stream.
pub struct Source {
    pub dir: PathBuf,
    pub shards: Vec<Shard>,
    /// `cum_tokens[k]` = tokens in shards before `k` (length shards + 1).
    cum_tokens: Vec<u64>,
    cum_docs: Vec<u64>,
    pub n_tokens: u64,
    pub n_docs: u64,
    pub nonempty_docs: u64,
    pub min_doc_len: u64,
    pub max_doc_len: u64,
    min_piece_len: u64,
    pub vocab_size: u64,
    pub tokenizer_sha256: String,
    pub eos_id: Option<u32>,
    pub bos_id: Option<u32>,
    /// What identifies this source's rows: the split's shard records.
    identity: String,
}

impl Source {
    fn open(dir: &Path, split: &str, seq_len: u64, verify: Verify) -> Result<Source> {
        let manifest_path = dir.join(manifest::MANIFEST);
        if !manifest_path.exists() {
            return Err(Error::io(
                &manifest_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no manifest.json: not a shard directory, or an unfinished shard run",
                ),
            ));
        }
        // Validated on reading: version, vocabulary, special ids, names, totals.
        let manifest = Manifest::read(&manifest_path)?;
        let summary = manifest.splits.get(split).ok_or_else(|| {
            Error::invalid(format!(
                "{}: no split {split:?} (it has {:?})",
                manifest_path.display(),
                manifest.splits.keys().collect::<Vec<_>>()
            ))
        })?;
        let infos = &summary.shards;
        let opened: Vec<(Shard, DocLengths)> = crate::pool::install(None, || {
            infos
                .par_iter()
                .map(|info| {
                    let path = manifest::contained_path(dir, &info.file)?;
                    let shard = Shard::open(path, info, &manifest, split)?;
                    let lengths = shard.check_offsets(seq_len)?;
                    if verify == Verify::Eager {
                        shard.verify()?;
                    }
                    Ok((shard, lengths))
                })
                .collect::<Result<_>>()
        })?;
        let mut lengths = DocLengths::default();
        let mut shards = Vec::with_capacity(opened.len());
        let (mut cum_tokens, mut cum_docs) = (vec![0u64], vec![0u64]);
        for (shard, l) in opened {
            lengths = lengths.merge(l);
            cum_tokens.push(cum_tokens.last().unwrap() + shard.n_tokens);
            cum_docs.push(cum_docs.last().unwrap() + shard.n_docs);
            shards.push(shard);
        }
        let mut identity = format!(
            "split={split} tokenizer={} dtype={}",
            manifest.tokenizer.sha256, manifest.dtype
        );
        for info in infos {
            identity.push_str(&format!(
                " [{} {} {} {} {}]",
                info.file, info.tokens, info.documents, info.bytes, info.sha256
            ));
        }
        Ok(Source {
            dir: dir.to_path_buf(),
            n_tokens: *cum_tokens.last().unwrap(),
            n_docs: *cum_docs.last().unwrap(),
            shards,
            cum_tokens,
            cum_docs,
            nonempty_docs: lengths.nonempty,
            min_doc_len: lengths.min_doc,
            max_doc_len: lengths.max_doc,
            min_piece_len: lengths.min_piece,
            vocab_size: manifest.vocab_size,
            tokenizer_sha256: manifest.tokenizer.sha256.clone(),
            eos_id: manifest.eos_id,
            bos_id: manifest.bos_id,
            identity,
        })
    }

    fn shard_of_token(&self, pos: u64) -> usize {
        self.cum_tokens.partition_point(|&c| c <= pos) - 1
    }

    fn shard_of_doc(&self, doc: u64) -> usize {
        self.cum_docs.partition_point(|&c| c <= doc) - 1
    }

    /// Starts loading the first cache line of each span's tokens, all at once: the loads are
    /// independent, so their memory latencies overlap instead of adding up piece after piece.
    /// Up to four cache lines per span: longer spans are sequential reads that the hardware
    /// prefetcher follows on its own.
    pub fn touch(&self, spans: &[pack::Span]) {
        let mut sink = 0u8;
        for span in spans {
            let k = self.shard_of_token(span.start);
            let shard = &self.shards[k];
            let local = span.start - self.cum_tokens[k];
            let per_line = 64 / shard.dtype.size() as u64;
            let end = (local + span.len as u64).min(shard.n_tokens);
            let mut at = local;
            while at < end && at < local + 4 * per_line {
                sink ^= shard.touch(at);
                at += per_line;
            }
        }
        std::hint::black_box(sink);
    }

    /// Document `doc` as `(first token, length)` in the source's token stream.
    #[inline]
    pub fn doc(&self, doc: u64) -> (u64, u64) {
        let k = self.shard_of_doc(doc);
        let local = doc - self.cum_docs[k];
        let shard = &self.shards[k];
        let (a, b) = (shard.doc_offset(local), shard.doc_offset(local + 1));
        (self.cum_tokens[k] + a, b - a)
    }

    /// Calls `f(p)` for every document start `p` with `start < p < end`, in order, once each.
    pub fn doc_starts_within(&self, start: u64, end: u64, mut f: impl FnMut(u64)) {
        let mut k = self.shard_of_token(start);
        let mut i = self.shards[k].first_offset_above(start - self.cum_tokens[k]);
        let mut last = start;
        while k < self.shards.len() {
            let shard = &self.shards[k];
            while i <= shard.n_docs {
                let p = self.cum_tokens[k] + shard.doc_offset(i);
                if p >= end {
                    return;
                }
                if p > last {
                    f(p);
                    last = p;
                }
                i += 1;
            }
            k += 1;
            i = 1;
        }
    }

    /// Widens tokens `[start, start + out.len())` into `out`, checking each shard's checksum on
    /// first use (lazy mode) and every id against the vocabulary.
    pub fn copy(&self, start: u64, out: &mut [i64], verify: Verify) -> Result<()> {
        let mut pos = start;
        let mut done = 0usize;
        let mut k = self.shard_of_token(start);
        while done < out.len() {
            let shard = &self.shards[k];
            let local = pos - self.cum_tokens[k];
            let n = ((shard.n_tokens - local) as usize).min(out.len() - done);
            if verify == Verify::Lazy {
                shard.verify()?;
            }
            let max = shard.widen(local, &mut out[done..done + n]);
            if max as u64 >= self.vocab_size {
                let at = out[done..done + n]
                    .iter()
                    .position(|&t| t as u64 >= self.vocab_size)
                    .expect("the maximum is in the row");
                let index = local + at as u64;
                return Err(Error::format(
                    shard.location(),
                    format!(
                        "token {index} (byte offset {}) is {}, not below the vocabulary size {}: corrupted shard or wrong manifest",
                        shard.tokens.start as u64 + index * shard.dtype.size() as u64,
                        out[done + at],
                        self.vocab_size
                    ),
                ));
            }
            done += n;
            pos += n as u64;
            k += 1;
        }
        Ok(())
    }
}

impl pack::Docs for Source {
    #[inline]
    fn doc(&self, doc: u64) -> (u64, u64) {
        Source::doc(self, doc)
    }

    #[inline]
    fn touch(&self, doc: u64) -> u8 {
        let k = self.shard_of_doc(doc);
        self.shards[k].touch_offset(doc - self.cum_docs[k])
    }
}

/// Everything a cursor reads: the opened sources and the options. Immutable and shared.
pub struct Dataset {
    pub sources: Vec<Source>,
    pub schedule: Schedule,
    pub options: LoaderOptions,
    pub pad_id: i64,
    /// An upper bound on the document segments of one row's `seq_len` inputs.
    pub segments_per_row: usize,
    pub fingerprint: String,
}

impl Dataset {
    pub fn open(options: LoaderOptions) -> Result<Dataset> {
        if options.seq_len == 0 {
            return Err(Error::invalid("seq_len must be positive"));
        }
        if options.sources.is_empty() {
            return Err(Error::invalid("give at least one shard directory"));
        }
        if options.weights.len() != options.sources.len() {
            return Err(Error::invalid(format!(
                "{} mixing weights for {} shard directories",
                options.weights.len(),
                options.sources.len()
            )));
        }
        if options.packing == Packing::BestFit && options.buffer_size == 0 {
            return Err(Error::invalid("buffer_size must be positive"));
        }
        let schedule = Schedule::new(&options.weights)?;
        let seq_len = options.seq_len as u64;
        let sources: Vec<Source> = options
            .sources
            .iter()
            .map(|dir| Source::open(dir, &options.split, seq_len, options.verify))
            .collect::<Result<_>>()?;
        let first = &sources[0];
        for s in &sources[1..] {
            if s.tokenizer_sha256 != first.tokenizer_sha256 {
                return Err(Error::invalid(format!(
                    "{} and {} were made with different tokenizers (sha256 {} vs {}): rows of one batch must share a vocabulary",
                    first.dir.display(),
                    s.dir.display(),
                    first.tokenizer_sha256,
                    s.tokenizer_sha256
                )));
            }
        }
        for s in &sources {
            match options.packing {
                Packing::Concat if s.n_tokens < seq_len + 1 => {
                    return Err(Error::invalid(format!(
                        "{}: split {:?} holds {} tokens, fewer than seq_len + 1 = {}: no window fits",
                        s.dir.display(),
                        options.split,
                        s.n_tokens,
                        seq_len + 1
                    )))
                }
                Packing::BestFit if s.nonempty_docs == 0 => {
                    return Err(Error::invalid(format!(
                        "{}: split {:?} holds no documents",
                        s.dir.display(),
                        options.split
                    )))
                }
                _ => {}
            }
        }
        let t = seq_len;
        // Segments of a row's T inputs. Concat: a window meets at most (T-2)/m + 2 documents of
        // at least m tokens (two partial ends, whole ones between). Best fit: k pieces of at
        // least m' tokens fill at most T+1 tokens, plus one padding segment. Never more than T.
        let bound = match options.packing {
            Packing::Concat => {
                let m = sources.iter().map(|s| s.min_doc_len).min().unwrap().max(1);
                if t < 2 {
                    1
                } else {
                    (t - 2) / m + 2
                }
            }
            Packing::BestFit => {
                let m = sources
                    .iter()
                    .map(|s| s.min_piece_len)
                    .min()
                    .unwrap()
                    .max(1);
                (t + 1) / m + 1
            }
        }
        .min(t) as usize;
        let pad_id = first.eos_id.or(first.bos_id).unwrap_or(0) as i64;
        let mut identity = format!(
            "ferrolm-loader v1 seq_len={} packing={}",
            options.seq_len,
            options.packing.name()
        );
        if options.packing == Packing::BestFit {
            identity.push_str(&format!(" buffer_size={}", options.buffer_size));
        }
        for (s, w) in sources.iter().zip(&options.weights) {
            identity.push_str(&format!(" | weight={w} {}", s.identity));
        }
        let fingerprint = manifest::sha256_hex(identity.as_bytes())[..16].to_string();
        Ok(Dataset {
            sources,
            schedule,
            options,
            pad_id,
            segments_per_row: bound.max(1),
            fingerprint,
        })
    }

    pub fn seq_len(&self) -> usize {
        self.options.seq_len
    }

    /// Rows in one epoch of source `s` when that is known without packing (concat).
    pub fn rows_per_epoch(&self, s: usize) -> Option<u64> {
        match self.options.packing {
            Packing::Concat => Some(pack::windows(&self.sources[s], self.options.seq_len as u64)),
            Packing::BestFit => None,
        }
    }

    /// Fixed length of `cu_seqlens` for a batch of `batch_size` rows.
    pub fn cu_seqlens_len(&self, batch_size: usize) -> usize {
        batch_size * self.segments_per_row + 1
    }

    /// Checks every shard's sha256 now (in parallel).
    pub fn verify_all(&self) -> Result<()> {
        let shards: Vec<&Shard> = self.sources.iter().flat_map(|s| &s.shards).collect();
        crate::pool::install(None, || shards.par_iter().try_for_each(|s| s.verify()))
    }
}

/// Where one source's stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourcePosition {
    pub epoch: u64,
    /// The source's row index where `epoch` began.
    pub epoch_start: u64,
    /// Rows of this source consumed so far (all epochs).
    pub rows: u64,
}

/// Where the global row stream stands: the whole resumable state besides the seed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Position {
    pub global: u64,
    pub sources: Vec<SourcePosition>,
}

impl Position {
    pub fn start(num_sources: usize) -> Position {
        Position {
            global: 0,
            sources: vec![SourcePosition::default(); num_sources],
        }
    }
}

/// One rank's batch, ready to hand to numpy without copying.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// `[B * T]` row-major.
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<i64>,
    /// Segment boundaries in the flattened `B * T` inputs, padded to a fixed length by
    /// repeating `B * T`.
    pub cu_seqlens: Vec<i32>,
    pub num_cu_seqlens: usize,
    pub max_seqlen: usize,
    pub stats: BatchStats,
    /// The position after the global step this batch belongs to.
    pub position: Position,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub rows: u64,
    /// Row tokens (of `seq_len + 1` per row) that come from documents.
    pub tokens: u64,
    pub padded: u64,
    pub segments: u64,
}

impl BatchStats {
    pub fn add(&mut self, other: &BatchStats) {
        self.rows += other.rows;
        self.tokens += other.tokens;
        self.padded += other.padded;
        self.segments += other.segments;
    }
}

/// One row of the global stream, described without its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlan {
    pub source: usize,
    pub epoch: u64,
    pub spans: Vec<Span>,
}

/// Walks the global row stream from a position.
pub struct Cursor {
    dataset: Arc<Dataset>,
    global: u64,
    sources: Vec<pack::SourceCursor>,
    spans: Vec<Span>,
    row: pack::RowScratch,
}

/// Batches of at least this many tokens are assembled on the thread pool, rows in parallel.
const PARALLEL_TOKENS: usize = 1 << 16;

impl Cursor {
    /// A cursor at `position`. Best-fit sources replay their packer from the epoch start
    /// (lengths only); `stop` cancels a long replay.
    pub fn new(
        dataset: Arc<Dataset>,
        position: &Position,
        stop: Option<&AtomicBool>,
    ) -> Result<Cursor> {
        let n = dataset.sources.len();
        if position.sources.len() != n {
            return Err(Error::invalid(format!(
                "the state describes {} sources but this loader reads {n}",
                position.sources.len()
            )));
        }
        let expected = dataset.schedule.counts_before(position.global);
        for (s, (p, want)) in position.sources.iter().zip(&expected).enumerate() {
            // Concat epochs all hold `windows` rows, so the epoch is known from where it began;
            // a best-fit epoch holds at least one row.
            let epoch_ok = match dataset.rows_per_epoch(s) {
                Some(windows) => p.epoch.checked_mul(windows) == Some(p.epoch_start),
                None => p.epoch <= p.epoch_start && (p.epoch == 0) == (p.epoch_start == 0),
            };
            if !epoch_ok {
                return Err(Error::invalid(format!(
                    "inconsistent loader state: source {s} is in epoch {} from row {}, which no run of this data reaches (tampered epochs?)",
                    p.epoch, p.epoch_start
                )));
            }
            if p.rows != *want || p.epoch_start > p.rows {
                return Err(Error::invalid(format!(
                    "inconsistent loader state: source {s} has consumed {} rows (epoch {} from row {}), but position {} implies {want}",
                    p.rows, p.epoch, p.epoch_start, position.global
                )));
            }
        }
        let sources = position
            .sources
            .iter()
            .enumerate()
            .map(|(s, p)| pack::SourceCursor::new(&dataset, s, p, stop))
            .collect::<Result<_>>()?;
        let row = pack::RowScratch::new(dataset.seq_len());
        Ok(Cursor {
            global: position.global,
            sources,
            spans: Vec::new(),
            row,
            dataset,
        })
    }

    pub fn position(&self) -> Position {
        Position {
            global: self.global,
            sources: self.sources.iter().map(|c| c.position()).collect(),
        }
    }

    /// The next `count` rows of the global stream (for inspection and tests).
    pub fn plan(&mut self, count: u64) -> Vec<RowPlan> {
        let ds = self.dataset.clone();
        (0..count)
            .map(|_| {
                let s = ds.schedule.source(self.global);
                self.global += 1;
                let cursor = &mut self.sources[s];
                let epoch = cursor.next_row(&ds, &mut self.spans);
                RowPlan {
                    source: s,
                    epoch,
                    spans: self.spans.clone(),
                }
            })
            .collect()
    }

    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// Plans rank `rank`'s rows of the next global step (no tokens read) and advances the cursor
    /// past the whole step: the packers go through every rank's rows.
    pub fn plan_batch(
        &mut self,
        rank: usize,
        batch_size: usize,
        world_size: usize,
    ) -> PlannedBatch {
        let ds = self.dataset.clone();
        let mine = order::rank_rows(0, rank, batch_size);
        let mut rows = Vec::with_capacity(batch_size);
        for i in 0..(world_size * batch_size) as u64 {
            let s = ds.schedule.source(self.global + i);
            if mine.contains(&i) {
                let mut spans = Vec::new();
                self.sources[s].next_row(&ds, &mut spans);
                rows.push((s, spans));
            } else {
                self.sources[s].skip_row(&ds);
            }
        }
        self.global += (world_size * batch_size) as u64;
        PlannedBatch {
            rows,
            position: self.position(),
        }
    }

    /// Rank `rank`'s batch of the next global step, advancing the cursor past the whole step;
    /// its vectors reuse `buffers` (empty vectors or ones from `prefetch::BufferPool`).
    pub fn next_batch(
        &mut self,
        rank: usize,
        batch_size: usize,
        world_size: usize,
        buffers: prefetch::Buffers,
    ) -> Result<Batch> {
        let plan = self.plan_batch(rank, batch_size, world_size);
        let ds = self.dataset.clone();
        assemble_batch(&ds, &plan, buffers, &mut self.row)
    }
}

/// One rank's rows of one global step, without their tokens, and the position after the step.
#[derive(Debug, Clone)]
pub struct PlannedBatch {
    pub rows: Vec<(usize, Vec<Span>)>,
    pub position: Position,
}

/// Whether a batch of `tokens` is worth assembling on the thread pool.
pub fn parallel_batch(tokens: usize, batch_size: usize) -> bool {
    tokens >= PARALLEL_TOKENS && batch_size > 1 && crate::pool::num_threads() > 1
}

/// Reads a planned batch's tokens and builds its arrays (rows in parallel on the thread pool
/// for large batches, else in `scratch`).
pub fn assemble_batch(
    ds: &Dataset,
    plan: &PlannedBatch,
    buffers: prefetch::Buffers,
    scratch: &mut pack::RowScratch,
) -> Result<Batch> {
    let t = ds.seq_len();
    let batch_size = plan.rows.len();
    let bt = batch_size * t;
    let prefetch::Buffers {
        input_ids,
        labels,
        position_ids,
        cu_seqlens,
    } = buffers;
    let mut batch = Batch {
        batch_size,
        seq_len: t,
        input_ids,
        labels,
        position_ids,
        cu_seqlens,
        ..Batch::default()
    };
    for v in [
        &mut batch.input_ids,
        &mut batch.labels,
        &mut batch.position_ids,
    ] {
        v.resize(bt, 0);
    }
    batch.cu_seqlens.clear();
    batch.cu_seqlens.reserve(ds.cu_seqlens_len(batch_size));
    batch.cu_seqlens.push(0);
    let mut push_row = |b: usize, stats: &BatchStats, segments: &[(usize, usize)]| {
        let base = (b * t) as i32;
        for &(start, len) in segments {
            batch.cu_seqlens.push(base + (start + len) as i32);
            batch.max_seqlen = batch.max_seqlen.max(len);
        }
        batch.stats.add(stats);
    };
    if parallel_batch(bt, batch_size) {
        let (input, labels, positions) = (
            &mut batch.input_ids,
            &mut batch.labels,
            &mut batch.position_ids,
        );
        let rows: Vec<(BatchStats, Vec<(usize, usize)>)> = crate::pool::install(None, || {
            input
                .par_chunks_mut(t)
                .zip(labels.par_chunks_mut(t))
                .zip(positions.par_chunks_mut(t))
                .zip(plan.rows.par_iter())
                .map_init(
                    || pack::RowScratch::new(t),
                    |scratch, (((input, labels), positions), (s, spans))| {
                        let stats = scratch.assemble(ds, *s, spans, input, labels, positions)?;
                        Ok((stats, scratch.segments.clone()))
                    },
                )
                .collect::<Result<_>>()
        })?;
        for (b, (stats, segments)) in rows.iter().enumerate() {
            push_row(b, stats, segments);
        }
    } else {
        for (b, (s, spans)) in plan.rows.iter().enumerate() {
            let rows = b * t..(b + 1) * t;
            let stats = scratch.assemble(
                ds,
                *s,
                spans,
                &mut batch.input_ids[rows.clone()],
                &mut batch.labels[rows.clone()],
                &mut batch.position_ids[rows],
            )?;
            push_row(b, &stats, &scratch.segments);
        }
    }
    batch.num_cu_seqlens = batch.cu_seqlens.len();
    let fixed = ds.cu_seqlens_len(batch_size);
    assert!(
        batch.cu_seqlens.len() <= fixed,
        "segment bound exceeded: {} > {fixed}",
        batch.cu_seqlens.len()
    );
    batch.cu_seqlens.resize(fixed, bt as i32);
    batch.position = plan.position.clone();
    Ok(batch)
}
