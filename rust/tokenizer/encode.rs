//! The byte-pair merge loop: one pre-tokenized piece in, token ids out.
//!
//! A vocabulary is turned into a table `(left id, right id) -> (priority, merged id)`. Two sources:
//! - a merge list (Hugging Face, GPT-2 `merges.txt`): only listed pairs merge, priority = list index;
//! - a rank file (tiktoken): any two adjacent parts whose concatenation is a token merge, priority =
//!   the rank of that token. We enumerate every split of every token into two tokens once at load
//!   time, so both semantics run through the same integer-keyed loop (no byte-string hashing).
//!
//! The loop always merges the lowest-priority pair, the LEFTMOST one among equals (tiktoken's and
//! Hugging Face's rule). Short pieces use a linear scan (fast for the common case); long pieces
//! (e.g. `"a" * 100_000`) use a heap with lazy deletion and a linked list, O(n log n).
//!
//! Before merging, a piece is looked up whole in `whole_pieces`: pieces known to encode to one
//! token. For tiktoken (and Hugging Face's `ignore_merges`) that is every token, by definition of
//! their algorithm; for a merge list it is every token whose own bytes merge back into itself,
//! checked once at load time, so the shortcut never changes a result. Most English pieces are
//! whole tokens, so most pieces cost one hash probe.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Pieces at least this long (in bytes) take the heap path.
const HEAP_THRESHOLD: usize = 128;
const NONE: u32 = u32::MAX;

/// Pieces of at most this many bytes are keys of the inline tables below (most pieces of prose
/// and code are shorter; longer ones take the general map and are never cached).
const SHORT_MAX: usize = 11;
/// Slots of each thread's word cache (direct-mapped, see [`WordCache`]).
const CACHE_SLOTS: usize = 1 << 16;
/// Ids a cached piece may have; pieces that merge into more tokens are not cached.
const CACHE_IDS: usize = 4;
/// Word caches one thread keeps (one per tokenizer it used last): bounds memory per thread.
const CACHES_PER_THREAD: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merge {
    pub priority: u32,
    pub merged: u32,
}

/// A piece of at most [`SHORT_MAX`] bytes packed into twelve: bytes 0..8 in `lo`, bytes 8..11
/// and the length (top byte) in `hi`. Packing is exact (the length tells padding from a zero
/// byte), so comparing keys compares pieces, without a pointer chase or a `memcmp`. No packed
/// piece is all zeros (its length is at least 1), so zero marks an empty slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ShortKey {
    lo: u64,
    hi: u32,
}

impl ShortKey {
    #[inline]
    fn pack(piece: &[u8]) -> Option<ShortKey> {
        let n = piece.len();
        if n == 0 || n > SHORT_MAX {
            return None;
        }
        // Whole-word loads straight from the piece (no byte copies through the stack, whose
        // reload would stall on store forwarding).
        let (lo, rest) = if n >= 8 {
            let (head, tail) = piece.split_at(8);
            (u64::from_le_bytes(head.try_into().expect("8 bytes")), tail)
        } else {
            (load_le(piece), &[][..])
        };
        Some(ShortKey {
            lo,
            hi: load_le(rest) as u32 | (n as u32) << 24,
        })
    }

    #[inline]
    fn is_empty(self) -> bool {
        self.lo == 0 && self.hi == 0
    }

    /// A well-mixed 64-bit hash (two multiply-xor rounds); callers take the top bits.
    #[inline]
    fn hash(self) -> u64 {
        let h = (self.lo.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.hi as u64)
            .wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        h ^ (h >> 29)
    }
}

/// The bytes of `b` (at most 8) as a little-endian integer, from two overlapping loads.
#[inline]
fn load_le(b: &[u8]) -> u64 {
    let n = b.len();
    let word4 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as u64;
    let word2 = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes")) as u64;
    match n {
        0 => 0,
        1 => b[0] as u64,
        2..=3 => word2(0) | word2(n - 2) << ((n - 2) * 8),
        4..=7 => word4(0) | word4(n - 4) << ((n - 4) * 8),
        _ => u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
    }
}

/// One slot of a [`ShortTable`]: 16 bytes, four to a cache line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct Slot {
    lo: u64,
    hi: u32,
    id: u32,
}

impl Slot {
    #[inline]
    fn key(self) -> ShortKey {
        ShortKey {
            lo: self.lo,
            hi: self.hi,
        }
    }
}

/// Open-addressing table (linear probing, load factor <= 1/2) from short pieces to one id,
/// keys stored inline: a lookup is one hash and, almost always, one cache line. The table is what
/// a cold lookup pays for in cache misses, so its slots are as small as the keys allow.
#[derive(Debug, Clone)]
struct ShortTable {
    slots: Vec<Slot>,
    shift: u32,
}

impl ShortTable {
    fn new(entries: impl ExactSizeIterator<Item = (ShortKey, u32)>) -> ShortTable {
        let bits = (entries.len().max(1) * 2)
            .next_power_of_two()
            .trailing_zeros()
            .max(4);
        let mut table = ShortTable {
            slots: vec![Slot::default(); 1 << bits],
            shift: 64 - bits,
        };
        let mask = table.slots.len() - 1;
        for (key, id) in entries {
            let mut i = (key.hash() >> table.shift) as usize;
            while !table.slots[i].key().is_empty() && table.slots[i].key() != key {
                i = (i + 1) & mask;
            }
            table.slots[i] = Slot {
                lo: key.lo,
                hi: key.hi,
                id,
            };
        }
        table
    }

    #[inline]
    fn get(&self, key: ShortKey) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = (key.hash() >> self.shift) as usize;
        loop {
            let slot = self.slots[i];
            if slot.key() == key {
                return Some(slot.id);
            }
            if slot.key().is_empty() {
                return None;
            }
            i = (i + 1) & mask;
        }
    }
}

/// One thread's memory of pieces it merged for one encoder: a direct-mapped table (a new piece
/// replaces whatever shared its slot), so its size is fixed and a hit is one probe. It only ever
/// holds the exact output of the merge loop for the exact piece, so it never changes ids.
struct WordCache {
    encoder: u64,
    slots: Box<[CacheSlot]>,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct CacheSlot {
    lo: u64,
    hi: u32,
    len: u32,
    ids: [u32; CACHE_IDS],
}

thread_local! {
    /// The most recently used cache first.
    static WORD_CACHES: RefCell<Vec<WordCache>> = const { RefCell::new(Vec::new()) };
}

/// Identifies an encoder's merge table for the thread-local caches (never reused).
static NEXT_ENCODER: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone)]
pub struct BytePairEncoder {
    byte_ids: [u32; 256],
    merges: FxHashMap<u64, Merge>,
    /// Pieces whose encoding is the single token they map to: short ones inline, long ones here.
    whole_short: ShortTable,
    whole_long: FxHashMap<Vec<u8>, u32>,
    /// Key of this encoder's word caches; a copy shares it (same table, same results).
    uid: u64,
}

#[inline]
fn pair_key(left: u32, right: u32) -> u64 {
    ((left as u64) << 32) | right as u64
}

impl BytePairEncoder {
    /// `byte_ids[b]` is the id of the one-byte token `b`; callers guarantee all 256 exist.
    /// `whole_pieces` must only hold pieces that this merge table encodes to that one token (or
    /// that the semantics being implemented defines so, as tiktoken does).
    pub fn new(
        byte_ids: [u32; 256],
        merges: FxHashMap<u64, Merge>,
        whole_pieces: FxHashMap<Vec<u8>, u32>,
    ) -> Self {
        let mut encoder = BytePairEncoder {
            byte_ids,
            merges,
            whole_short: ShortTable::new(std::iter::empty()),
            whole_long: FxHashMap::default(),
            uid: 0,
        };
        encoder.set_whole_pieces(whole_pieces);
        encoder
    }

    fn set_whole_pieces(&mut self, whole_pieces: FxHashMap<Vec<u8>, u32>) {
        let mut short = Vec::new();
        let mut long = FxHashMap::default();
        for (bytes, id) in whole_pieces {
            match ShortKey::pack(&bytes) {
                Some(key) => short.push((key, id)),
                None => {
                    long.insert(bytes, id);
                }
            }
        }
        self.whole_short = ShortTable::new(short.into_iter());
        self.whole_long = long;
        self.uid = NEXT_ENCODER.fetch_add(1, Ordering::Relaxed);
    }

    /// The tokens among `tokens` that the merge loop alone encodes to themselves.
    pub fn self_encoding<'a>(
        &self,
        tokens: impl Iterator<Item = (&'a Vec<u8>, u32)>,
    ) -> FxHashMap<Vec<u8>, u32> {
        let mut out = Vec::new();
        tokens
            .filter(|(bytes, id)| {
                out.clear();
                self.merge(bytes, &mut out);
                out.len() == 1 && out[0] == *id
            })
            .map(|(bytes, id)| (bytes.clone(), id))
            .collect()
    }

    pub fn with_whole_pieces(mut self, whole_pieces: FxHashMap<Vec<u8>, u32>) -> Self {
        self.set_whole_pieces(whole_pieces);
        self
    }

    pub fn merge_table_key(left: u32, right: u32) -> u64 {
        pair_key(left, right)
    }

    #[inline]
    fn merge_of(&self, left: u32, right: u32) -> Option<Merge> {
        self.merges.get(&pair_key(left, right)).copied()
    }

    #[inline]
    fn priority(&self, left: u32, right: u32) -> u32 {
        self.merge_of(left, right).map_or(NONE, |m| m.priority)
    }

    /// Appends the ids of one piece to `out`.
    #[inline]
    pub fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        match piece.len() {
            0 => {}
            1 => out.push(self.byte_ids[piece[0] as usize]),
            _ => match ShortKey::pack(piece) {
                Some(key) => {
                    if let Some(id) = self.whole_short.get(key) {
                        out.push(id);
                    } else {
                        self.merge_cached(key, piece, out);
                    }
                }
                None => match self.whole_long.get(piece) {
                    Some(&id) => out.push(id),
                    None => self.merge(piece, out),
                },
            },
        }
    }

    /// The merge loop behind this thread's word cache for this encoder.
    fn merge_cached(&self, key: ShortKey, piece: &[u8], out: &mut Vec<u32>) {
        let cached = WORD_CACHES.try_with(|caches| {
            let Ok(mut caches) = caches.try_borrow_mut() else {
                return false;
            };
            let at = match caches.iter().position(|c| c.encoder == self.uid) {
                Some(0) => 0,
                Some(i) => {
                    caches[..=i].rotate_right(1);
                    0
                }
                None => {
                    if caches.len() == CACHES_PER_THREAD {
                        caches.pop();
                    }
                    caches.insert(
                        0,
                        WordCache {
                            encoder: self.uid,
                            slots: vec![CacheSlot::default(); CACHE_SLOTS].into_boxed_slice(),
                        },
                    );
                    0
                }
            };
            let slot =
                &mut caches[at].slots[(key.hash() >> (64 - CACHE_SLOTS.trailing_zeros())) as usize];
            if slot.lo == key.lo && slot.hi == key.hi {
                out.extend_from_slice(&slot.ids[..slot.len as usize]);
                return true;
            }
            let start = out.len();
            self.merge(piece, out);
            let ids = &out[start..];
            if ids.len() <= CACHE_IDS {
                slot.lo = key.lo;
                slot.hi = key.hi;
                slot.len = ids.len() as u32;
                slot.ids[..ids.len()].copy_from_slice(ids);
            }
            true
        });
        if cached != Ok(true) {
            self.merge(piece, out);
        }
    }

    /// The merge loop alone (no whole-piece shortcut, no cache).
    fn merge(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() < HEAP_THRESHOLD {
            self.merge_by_scan(piece, out)
        } else {
            self.merge_by_heap(piece, out)
        }
    }

    /// Repeatedly merges the leftmost lowest-priority pair by scanning: O(n^2), fast for short
    /// pieces. `piece` is shorter than [`HEAP_THRESHOLD`]: the parts live on the stack.
    fn merge_by_scan(&self, piece: &[u8], out: &mut Vec<u32>) {
        debug_assert!(piece.len() < HEAP_THRESHOLD);
        if piece.is_empty() {
            return;
        }
        // ids[i] is part i; priorities[i] is the priority of merging part i with part i + 1.
        let mut ids = [0u32; HEAP_THRESHOLD];
        let mut priorities = [NONE; HEAP_THRESHOLD];
        let mut n = piece.len();
        for (id, &b) in ids.iter_mut().zip(piece) {
            *id = self.byte_ids[b as usize];
        }
        for i in 0..n - 1 {
            priorities[i] = self.priority(ids[i], ids[i + 1]);
        }
        loop {
            let mut best = NONE;
            let mut at = 0;
            for (i, &p) in priorities[..n - 1].iter().enumerate() {
                if p < best {
                    best = p;
                    at = i;
                }
            }
            if best == NONE {
                break;
            }
            ids[at] = self
                .merge_of(ids[at], ids[at + 1])
                .expect("priority came from a merge")
                .merged;
            ids.copy_within(at + 2..n, at + 1);
            priorities.copy_within(at + 1..n - 1, at);
            n -= 1;
            if at + 1 < n {
                priorities[at] = self.priority(ids[at], ids[at + 1]);
            }
            if at > 0 {
                priorities[at - 1] = self.priority(ids[at - 1], ids[at]);
            }
        }
        out.extend_from_slice(&ids[..n]);
    }

    /// The same rule with a min-heap of (priority, position) and lazy deletion: O(n log n).
    /// Position is the byte offset of the left part, so ties pop leftmost first.
    fn merge_by_heap(&self, piece: &[u8], out: &mut Vec<u32>) {
        let n = piece.len();
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut next: Vec<u32> = (1..=n as u32).collect();
        let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
        next[n - 1] = NONE;
        // The priority of the pair that starts at each live part (NONE: no pair / dead part).
        let mut pair_priority = vec![NONE; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            let p = self.priority(ids[i], ids[i + 1]);
            pair_priority[i] = p;
            if p != NONE {
                heap.push(Reverse((p, i as u32)));
            }
        }
        while let Some(Reverse((p, at))) = heap.pop() {
            let at = at as usize;
            // Stale entries: the part died or its pair changed since the push.
            if pair_priority[at] != p {
                continue;
            }
            let right = next[at] as usize;
            ids[at] = self
                .merge_of(ids[at], ids[right])
                .expect("live pair")
                .merged;
            // Unlink the right part.
            let after = next[right];
            next[at] = after;
            if after != NONE {
                prev[after as usize] = at as u32;
            }
            pair_priority[right] = NONE;
            ids[right] = NONE;
            // The pairs on both sides of the merged part changed.
            pair_priority[at] = if after != NONE {
                self.priority(ids[at], ids[after as usize])
            } else {
                NONE
            };
            if pair_priority[at] != NONE {
                heap.push(Reverse((pair_priority[at], at as u32)));
            }
            let before = prev[at];
            if before != NONE {
                let b = before as usize;
                pair_priority[b] = self.priority(ids[b], ids[at]);
                if pair_priority[b] != NONE {
                    heap.push(Reverse((pair_priority[b], before)));
                }
            }
        }
        let mut i = 0u32;
        while i != NONE {
            out.push(ids[i as usize]);
            i = next[i as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes a=0, b=1, c=2 (others unused); merges: (a,a)->3 p0, (3,a)->4 p1, (b,c)->5 p2, (a,b)->6 p3.
    fn toy(shortcut: bool) -> BytePairEncoder {
        let mut byte_ids = [NONE; 256];
        for (i, b) in [b'a', b'b', b'c'].into_iter().enumerate() {
            byte_ids[b as usize] = i as u32;
        }
        for (b, id) in byte_ids.iter_mut().enumerate() {
            if *id == NONE {
                *id = 100 + b as u32;
            }
        }
        let mut merges = FxHashMap::default();
        for (l, r, p, m) in [(0, 0, 0, 3), (3, 0, 1, 4), (1, 2, 2, 5), (0, 1, 3, 6)] {
            merges.insert(
                pair_key(l, r),
                Merge {
                    priority: p,
                    merged: m,
                },
            );
        }
        let mut whole = FxHashMap::default();
        if shortcut {
            whole.insert(b"abc".to_vec(), 42);
        }
        BytePairEncoder::new(byte_ids, merges, whole)
    }

    /// The rule written as plainly as possible: merge the leftmost lowest-priority pair, repeat.
    fn reference(bpe: &BytePairEncoder, s: &[u8]) -> Vec<u32> {
        let mut ids: Vec<u32> = s.iter().map(|&b| bpe.byte_ids[b as usize]).collect();
        while let Some((at, m)) = ids
            .windows(2)
            .enumerate()
            .filter_map(|(i, w)| bpe.merge_of(w[0], w[1]).map(|m| (i, m)))
            .min_by_key(|&(i, m)| (m.priority, i))
        {
            ids.splice(at..at + 2, [m.merged]);
        }
        ids
    }

    /// (scan or, for long pieces, the reference; heap)
    fn run(bpe: &BytePairEncoder, s: &[u8]) -> (Vec<u32>, Vec<u32>) {
        let (mut scan, mut heap) = (vec![], vec![]);
        if s.len() < HEAP_THRESHOLD {
            bpe.merge_by_scan(s, &mut scan);
            assert_eq!(scan, reference(bpe, s));
        } else {
            scan = reference(bpe, s);
        }
        bpe.merge_by_heap(s, &mut heap);
        (scan, heap)
    }

    #[test]
    fn leftmost_lowest_priority_wins() {
        let bpe = toy(false);
        // "aaa": (a,a) at 0 and 1 tie; leftmost merges first -> [3, a] -> (3,a) -> 4.
        assert_eq!(run(&bpe, b"aaa"), (vec![4], vec![4]));
        // "aaaa": [3, 3] and no (3,3) merge.
        assert_eq!(run(&bpe, b"aaaa"), (vec![3, 3], vec![3, 3]));
        // "abc": (b,c) p2 beats (a,b) p3.
        assert_eq!(run(&bpe, b"abc"), (vec![0, 5], vec![0, 5]));
    }

    #[test]
    fn whole_piece_shortcut_only_when_enabled() {
        let mut out = vec![];
        toy(true).encode_piece(b"abc", &mut out);
        assert_eq!(out, vec![42]);
        out.clear();
        toy(false).encode_piece(b"abc", &mut out);
        assert_eq!(out, vec![0, 5]);
    }

    #[test]
    fn self_encoding_keeps_only_tokens_that_merge_back() {
        let bpe = toy(false);
        let aa = b"aa".to_vec();
        let ab = b"ab".to_vec();
        // "aa" merges to 3; "ab" merges to 6 but we claim id 7: not self-encoding.
        let kept = bpe.self_encoding([(&aa, 3), (&ab, 7)].into_iter());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept.get(&aa), Some(&3));
    }

    /// Encodes `s` through `encode_piece` (shortcut tables and this thread's word cache).
    fn encode(bpe: &BytePairEncoder, s: &[u8]) -> Vec<u32> {
        let mut out = vec![];
        bpe.encode_piece(s, &mut out);
        out
    }

    fn random_strings(seed: u64, count: usize, alphabet: &[u8]) -> Vec<Vec<u8>> {
        let mut state = seed;
        (0..count)
            .map(|i| {
                (0..1 + i % 40)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        alphabet[(state >> 33) as usize % alphabet.len()]
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn cached_encoding_equals_the_merge_loop() {
        let bpe = toy(false);
        // Far more distinct pieces than cache slots, each encoded twice (miss, then hit or evicted).
        let strings = random_strings(7, 3 * CACHE_SLOTS, b"abcx");
        for round in 0..2 {
            for s in &strings {
                let mut expected = vec![];
                bpe.merge(s, &mut expected);
                assert_eq!(encode(&bpe, s), expected, "round {round}: {s:?}");
            }
        }
    }

    #[test]
    fn encoders_on_one_thread_never_share_cache_entries() {
        // Same bytes, different merge tables: each must keep its own results.
        let a = toy(false);
        let mut b = toy(false);
        b.merges.insert(
            pair_key(0, 1),
            Merge {
                priority: 0,
                merged: 77,
            },
        );
        b = b.with_whole_pieces(FxHashMap::default());
        let extra: Vec<BytePairEncoder> = (0..CACHES_PER_THREAD + 2).map(|_| toy(false)).collect();
        for _ in 0..3 {
            assert_eq!(encode(&a, b"abab"), vec![6, 6]);
            assert_eq!(encode(&b, b"abab"), vec![77, 77]);
            for e in &extra {
                assert_eq!(encode(e, b"abc"), vec![0, 5]);
            }
        }
        let caches = WORD_CACHES.with(|c| c.borrow().len());
        assert!(caches <= CACHES_PER_THREAD, "{caches} caches kept");
    }

    #[test]
    fn little_endian_loads_match_byte_by_byte() {
        let bytes: Vec<u8> = (1..=8).map(|i| i * 17).collect();
        for n in 0..=8 {
            let expected = bytes[..n]
                .iter()
                .rev()
                .fold(0u64, |acc, &b| (acc << 8) | b as u64);
            assert_eq!(load_le(&bytes[..n]), expected, "{n} bytes");
        }
    }

    #[test]
    fn short_keys_are_exact() {
        let zero = ShortKey::pack(b"a\0").unwrap();
        let plain = ShortKey::pack(b"a").unwrap();
        assert_ne!(zero, plain);
        assert!(ShortKey::pack(&[0u8; SHORT_MAX]).is_some());
        assert!(ShortKey::pack(&[0u8; SHORT_MAX + 1]).is_none());
        assert!(!ShortKey::pack(&[0u8; 1]).unwrap().is_empty());
        let mut whole = FxHashMap::default();
        for (i, s) in random_strings(3, 5000, b"ab\0").into_iter().enumerate() {
            whole.insert(s, i as u32);
        }
        let keyed: Vec<(ShortKey, u32)> = whole
            .iter()
            .filter_map(|(k, &v)| ShortKey::pack(k).map(|key| (key, v)))
            .collect();
        let table = ShortTable::new(keyed.into_iter());
        for (k, &v) in &whole {
            if let Some(key) = ShortKey::pack(k) {
                assert_eq!(table.get(key), Some(v));
            }
        }
        assert_eq!(table.get(ShortKey::pack(b"zzz").unwrap()), None);
    }

    #[test]
    fn scan_and_heap_agree_on_many_strings() {
        let bpe = toy(false);
        let mut state = 12345u64;
        for len in 1..300 {
            let s: Vec<u8> = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    [b'a', b'b', b'c', b'x'][(state >> 62) as usize]
                })
                .collect();
            let (scan, heap) = run(&bpe, &s);
            assert_eq!(scan, heap, "{:?}", String::from_utf8_lossy(&s));
        }
    }
}
