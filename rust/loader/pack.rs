//! Rows from documents: concat windows, best-fit packing, and the assembly of a row's inputs,
//! labels, position ids and document segments.

use super::order::{epoch_key, Feistel};
use super::{BatchStats, Dataset, Packing, Source, SourcePosition, IGNORE};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// Consecutive pieces of a split document share one token: the last label of a piece is the
/// first input of the next, so every token after a document's first is a label exactly once.
pub const PIECE_OVERLAP: u64 = 1;

/// A contiguous range of a source's token stream placed in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Span {
    pub start: u64,
    pub len: u32,
}

/// Concat windows `[k*T, k*T + T + 1)` in a source of `n` tokens.
pub fn windows(source: &Source, t: u64) -> u64 {
    source.n_tokens.saturating_sub(1) / t
}

/// Pieces of a document of `len` tokens with rows of `t + 1` tokens.
pub fn num_pieces(len: u64, t: u64) -> u64 {
    match len {
        0 => 0,
        l if l <= t + 1 => 1,
        l => (l - 1).div_ceil(t),
    }
}

/// The length of the shortest piece of a document of `len > 0` tokens.
pub fn shortest_piece(len: u64, t: u64) -> u64 {
    if len <= t + 1 {
        len
    } else {
        (len - 2) % t + 2
    }
}

/// A set of integers in `[0, n)` with `find_le(x)` (the largest member `<= x`) in O(log_64 n):
/// a bitset plus summary levels where bit `j` says whether word `j` of the level below is nonzero.
#[derive(Debug, Clone)]
pub struct PrevSet {
    levels: Vec<Vec<u64>>,
}

impl PrevSet {
    pub fn new(n: usize) -> PrevSet {
        let mut levels = vec![vec![0u64; n.div_ceil(64).max(1)]];
        while levels.last().unwrap().len() > 1 {
            let words = levels.last().unwrap().len().div_ceil(64);
            levels.push(vec![0u64; words]);
        }
        PrevSet { levels }
    }

    pub fn insert(&mut self, mut i: usize) {
        for level in &mut self.levels {
            let word = &mut level[i / 64];
            let was_empty = *word == 0;
            *word |= 1 << (i % 64);
            if !was_empty {
                return;
            }
            i /= 64;
        }
    }

    pub fn remove(&mut self, mut i: usize) {
        for level in &mut self.levels {
            let word = &mut level[i / 64];
            *word &= !(1 << (i % 64));
            if *word != 0 {
                return;
            }
            i /= 64;
        }
    }

    /// The largest member `<= x`.
    pub fn find_le(&self, x: usize) -> Option<usize> {
        self.find_le_at(0, x)
    }

    fn find_le_at(&self, level: usize, x: usize) -> Option<usize> {
        let words = &self.levels[level];
        let w = (x / 64).min(words.len() - 1);
        let bit = if w < x / 64 { 63 } else { x % 64 };
        let mask = if bit == 63 {
            u64::MAX
        } else {
            (1u64 << (bit + 1)) - 1
        };
        let m = words[w] & mask;
        if m != 0 {
            return Some(w * 64 + 63 - m.leading_zeros() as usize);
        }
        if w == 0 || level + 1 == self.levels.len() {
            return None;
        }
        let w2 = self.find_le_at(level + 1, w - 1)?;
        Some(w2 * 64 + 63 - words[w2].leading_zeros() as usize)
    }
}

const NONE: u32 = u32::MAX;

/// Documents as the packer sees them: `(first token, length)` of document `d`; `touch(d)` starts
/// loading what `doc(d)` will read (a hint: the packer touches documents a few dozen ahead, so
/// their memory latencies overlap).
pub trait Docs {
    fn doc(&self, d: u64) -> (u64, u64);

    fn touch(&self, _d: u64) -> u8 {
        0
    }
}

impl<F: Fn(u64) -> (u64, u64)> Docs for F {
    fn doc(&self, d: u64) -> (u64, u64) {
        self(d)
    }
}

/// Documents resolved ahead of the one being cut.
const LOOKAHEAD: usize = 32;

/// Best-fit packing of one source's epoch, driven by document lengths only.
///
/// Documents come in a Feistel order; each is cut into pieces of at most `T + 1` tokens; pieces
/// wait in a buffer of `buffer_size`. A row takes the largest buffered piece that fits the space
/// left, again and again (the buffer is topped up after every take), until no piece fits; the rest
/// is padding. Equal lengths leave in arrival order. When the documents run out the buffer drains
/// and the epoch ends. Cost per piece: one Feistel evaluation per document, O(log_64 T) per take.
#[derive(Debug, Clone)]
pub struct BestFit {
    cap: usize,
    buffer_size: usize,
    order: Feistel,
    next_doc: u64,
    /// Documents already drawn from the order (and touched), not yet cut.
    ahead: std::collections::VecDeque<u64>,
    /// The document being cut: next piece start and document end.
    cut: (u64, u64),
    start: Vec<u64>,
    len: Vec<u32>,
    next: Vec<u32>,
    free: Vec<u32>,
    head: Vec<u32>,
    tail: Vec<u32>,
    lengths: PrevSet,
    count: usize,
}

impl BestFit {
    pub fn new(n_docs: u64, key: u64, t: u64, buffer_size: usize) -> BestFit {
        let cap = t as usize + 1;
        BestFit {
            cap,
            buffer_size,
            order: Feistel::new(n_docs, key),
            next_doc: 0,
            ahead: std::collections::VecDeque::with_capacity(LOOKAHEAD),
            cut: (0, 0),
            start: Vec::new(),
            len: Vec::new(),
            next: Vec::new(),
            free: Vec::new(),
            head: vec![NONE; cap + 1],
            tail: vec![NONE; cap + 1],
            lengths: PrevSet::new(cap + 1),
            count: 0,
        }
    }

    /// Draws the next documents from the order, then touches them all in a tight loop: a loop
    /// of Feistel rounds between the loads would fill the reorder buffer and leave only two or
    /// three loads in flight.
    fn look_ahead(&mut self, docs: &impl Docs) {
        let first = self.ahead.len();
        while self.ahead.len() < LOOKAHEAD && self.next_doc < self.order.len() {
            self.ahead.push_back(self.order.apply(self.next_doc));
            self.next_doc += 1;
        }
        let mut sink = 0u8;
        for &d in self.ahead.range(first..) {
            sink ^= docs.touch(d);
        }
        std::hint::black_box(sink);
    }

    fn next_piece(&mut self, docs: &impl Docs) -> Option<(u64, usize)> {
        while self.cut.0 >= self.cut.1 {
            if self.ahead.is_empty() {
                self.look_ahead(docs);
            }
            let d = self.ahead.pop_front()?;
            let (start, len) = docs.doc(d);
            self.cut = (start, start + len);
        }
        let (pos, end) = self.cut;
        if end - pos <= self.cap as u64 {
            self.cut.0 = end;
            Some((pos, (end - pos) as usize))
        } else {
            self.cut.0 = pos + self.cap as u64 - PIECE_OVERLAP;
            Some((pos, self.cap))
        }
    }

    fn fill(&mut self, docs: &impl Docs) {
        while self.count < self.buffer_size {
            let Some((start, len)) = self.next_piece(docs) else {
                return;
            };
            let slot = match self.free.pop() {
                Some(slot) => {
                    self.start[slot as usize] = start;
                    self.len[slot as usize] = len as u32;
                    self.next[slot as usize] = NONE;
                    slot
                }
                None => {
                    self.start.push(start);
                    self.len.push(len as u32);
                    self.next.push(NONE);
                    (self.start.len() - 1) as u32
                }
            };
            if self.tail[len] == NONE {
                self.head[len] = slot;
                self.lengths.insert(len);
            } else {
                self.next[self.tail[len] as usize] = slot;
            }
            self.tail[len] = slot;
            self.count += 1;
        }
    }

    fn take(&mut self, len: usize) -> Span {
        let slot = self.head[len];
        self.head[len] = self.next[slot as usize];
        if self.head[len] == NONE {
            self.tail[len] = NONE;
            self.lengths.remove(len);
        }
        self.free.push(slot);
        self.count -= 1;
        Span {
            start: self.start[slot as usize],
            len: len as u32,
        }
    }

    /// Fills `spans` with the next row; false when the epoch is over.
    pub fn next_row(&mut self, docs: &impl Docs, spans: &mut Vec<Span>) -> bool {
        spans.clear();
        self.fill(docs);
        if self.count == 0 {
            return false;
        }
        let mut room = self.cap;
        while room > 0 {
            let Some(len) = self.lengths.find_le(room) else {
                break;
            };
            spans.push(self.take(len));
            room -= len;
            self.fill(docs);
        }
        true
    }
}

enum Order {
    Concat { windows: u64, perm: Feistel },
    BestFit(Box<BestFit>),
}

/// One source's position in its endless row stream (epoch after epoch).
pub struct SourceCursor {
    source: usize,
    epoch: u64,
    epoch_start: u64,
    rows: u64,
    order: Order,
    discard: Vec<Span>,
}

impl SourceCursor {
    fn order(ds: &Dataset, s: usize, epoch: u64) -> Order {
        let key = epoch_key(ds.options.seed, s, epoch);
        let t = ds.seq_len() as u64;
        let source = &ds.sources[s];
        match ds.options.packing {
            Packing::Concat => {
                let windows = windows(source, t);
                Order::Concat {
                    windows,
                    perm: Feistel::new(windows, key),
                }
            }
            Packing::BestFit => Order::BestFit(Box::new(BestFit::new(
                source.n_docs,
                key,
                t,
                ds.options.buffer_size,
            ))),
        }
    }

    /// A cursor at `p`; best fit replays the rows of the current epoch before `p.rows`.
    pub fn new(
        ds: &Dataset,
        s: usize,
        p: &SourcePosition,
        stop: Option<&AtomicBool>,
    ) -> Result<SourceCursor> {
        let mut cursor = SourceCursor {
            source: s,
            epoch: p.epoch,
            epoch_start: p.epoch_start,
            rows: p.epoch_start,
            order: Self::order(ds, s, p.epoch),
            discard: Vec::new(),
        };
        let skip = p.rows - p.epoch_start;
        let inconsistent = || {
            Error::invalid(format!(
                "inconsistent loader state: epoch {} of source {s} ({}) has fewer than {skip} rows",
                p.epoch,
                ds.sources[s].dir.display()
            ))
        };
        match &mut cursor.order {
            Order::Concat { windows, .. } => {
                if skip > *windows {
                    return Err(inconsistent());
                }
                cursor.rows = p.rows;
            }
            Order::BestFit(packer) => {
                let source = &ds.sources[s];
                for i in 0..skip {
                    if i % 4096 == 0 && stop.is_some_and(|f| f.load(Ordering::Relaxed)) {
                        return Err(Error::Interrupted);
                    }
                    if !packer.next_row(source, &mut cursor.discard) {
                        return Err(inconsistent());
                    }
                }
                cursor.rows = p.rows;
            }
        }
        Ok(cursor)
    }

    pub fn position(&self) -> SourcePosition {
        SourcePosition {
            epoch: self.epoch,
            epoch_start: self.epoch_start,
            rows: self.rows,
        }
    }

    fn next_epoch(&mut self, ds: &Dataset) {
        self.epoch += 1;
        self.epoch_start = self.rows;
        self.order = Self::order(ds, self.source, self.epoch);
    }

    /// Fills `spans` with the next row of this source; returns the row's epoch.
    pub fn next_row(&mut self, ds: &Dataset, spans: &mut Vec<Span>) -> u64 {
        let t = ds.seq_len() as u64;
        let source = &ds.sources[self.source];
        loop {
            match &mut self.order {
                Order::Concat { windows, perm } => {
                    let k = self.rows - self.epoch_start;
                    if k < *windows {
                        spans.clear();
                        spans.push(Span {
                            start: perm.apply(k) * t,
                            len: (t + 1) as u32,
                        });
                        break;
                    }
                }
                Order::BestFit(packer) => {
                    if packer.next_row(source, spans) {
                        break;
                    }
                }
            }
            self.next_epoch(ds);
        }
        self.rows += 1;
        self.epoch
    }

    /// Advances past one row without describing it (rows of other ranks).
    pub fn skip_row(&mut self, ds: &Dataset) {
        if let Order::Concat { windows, .. } = &self.order {
            if self.rows - self.epoch_start >= *windows {
                self.next_epoch(ds);
            }
            self.rows += 1;
            return;
        }
        let mut discard = std::mem::take(&mut self.discard);
        self.next_row(ds, &mut discard);
        self.discard = discard;
    }
}

/// Reusable buffers for assembling one row.
pub struct RowScratch {
    bounds: Vec<usize>,
    /// The row's segments over its `T` inputs: (start, length), in order.
    pub segments: Vec<(usize, usize)>,
}

impl RowScratch {
    pub fn new(_t: usize) -> RowScratch {
        RowScratch {
            bounds: Vec::new(),
            segments: Vec::new(),
        }
    }

    /// Writes one row: `input[i] = row[i]`, `labels[i] = row[i + 1]` (-100 on padding, and
    /// across boundaries when asked), `positions` restarting at every segment. Tokens are
    /// widened straight from the shard into `input` and `labels`.
    pub fn assemble(
        &mut self,
        ds: &Dataset,
        s: usize,
        spans: &[Span],
        input: &mut [i64],
        labels: &mut [i64],
        positions: &mut [i64],
    ) -> Result<BatchStats> {
        let t = ds.seq_len();
        let source = &ds.sources[s];
        let concat = ds.options.packing == Packing::Concat;
        let RowScratch { bounds, segments } = self;
        if spans.len() > 1 {
            source.touch(spans);
        }
        bounds.clear();
        let mut used = 0usize;
        for span in spans {
            let len = span.len as usize;
            bounds.push(used);
            // Row position p is input p (p < T) and label p - 1 (p >= 1): each span is widened
            // into both (the second read hits the cache). Only the row's last span reaches T.
            let inputs = len.min(t.saturating_sub(used));
            source.copy(
                span.start,
                &mut input[used..used + inputs],
                ds.options.verify,
            )?;
            let skip = usize::from(used == 0);
            let first_label = (used + skip) - 1;
            let label_end = (used + len - 1).min(t);
            if label_end > first_label {
                source.copy(
                    span.start + skip as u64,
                    &mut labels[first_label..label_end],
                    ds.options.verify,
                )?;
            }
            if concat {
                let base = used;
                source.doc_starts_within(span.start, span.start + len as u64, |p| {
                    bounds.push(base + (p - span.start) as usize)
                });
            }
            used += len;
        }
        if used < t + 1 {
            input[used.min(t)..].fill(ds.pad_id);
            bounds.push(used);
        }
        if used < t + 1 {
            labels[used.saturating_sub(1)..].fill(IGNORE);
        }
        if ds.options.mask_boundary_labels {
            for &b in &bounds[1..] {
                if b < used {
                    labels[b - 1] = IGNORE;
                }
            }
        }
        segments.clear();
        for (i, &b) in bounds.iter().enumerate() {
            if b >= t {
                break;
            }
            let end = bounds.get(i + 1).copied().unwrap_or(t).min(t);
            if end > b {
                segments.push((b, end - b));
                for (k, p) in positions[b..end].iter_mut().enumerate() {
                    *p = k as i64;
                }
            }
        }
        Ok(BatchStats {
            rows: 1,
            tokens: used as u64,
            padded: (t + 1 - used) as u64,
            segments: segments.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn prev_set_matches_a_btree_set() {
        for n in [1usize, 5, 64, 65, 200, 4097, 70_000] {
            let mut set = PrevSet::new(n);
            let mut reference = BTreeSet::new();
            let mut x = 12345u64;
            for _ in 0..3000 {
                x = crate::shard::splitmix64(x);
                let i = (x % n as u64) as usize;
                if x & (1 << 40) != 0 {
                    set.insert(i);
                    reference.insert(i);
                } else {
                    set.remove(i);
                    reference.remove(&i);
                }
                let q = (crate::shard::splitmix64(x) % n as u64) as usize;
                assert_eq!(set.find_le(q), reference.range(..=q).next_back().copied());
            }
        }
    }

    #[test]
    fn pieces_cover_documents() {
        for t in 1..20u64 {
            for len in 1..100u64 {
                let n = num_pieces(len, t);
                let last_start = (n - 1) * t;
                assert!(last_start + 1 < len || n == 1);
                assert!(len - last_start <= t + 1);
                assert_eq!(shortest_piece(len, t).min(len), len - last_start);
            }
        }
    }
}
