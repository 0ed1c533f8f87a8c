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
/// Pieces [`PieceBatch`] holds before it looks their table slots up. Looking a batch up in two
/// passes (compute every slot and prefetch it, then read them) keeps many cache misses in flight
/// at once instead of waiting for each in turn: a lookup in a multi-megabyte table is a miss.
pub const BATCH: usize = 64;

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
    #[inline(always)]
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

    /// [`ShortKey::pack`] of `text[start..start + len]` without branches on `len` (a piece's
    /// length is what the branch predictor cannot guess), reading 16 bytes from `start` when the
    /// text has them. A length outside 1..=[`SHORT_MAX`] gives an unspecified key: callers
    /// check the length themselves.
    #[inline(always)]
    fn pack_at(text: &[u8], start: usize, len: usize) -> ShortKey {
        let Some(window) = text.get(start..start + 16) else {
            return ShortKey::pack(&text[start..(start + len).min(text.len())]).unwrap_or_default();
        };
        let lo = u64::from_le_bytes(window[..8].try_into().expect("8 bytes"));
        let hi = u32::from_le_bytes(window[8..12].try_into().expect("4 bytes"));
        let n = len.clamp(1, SHORT_MAX);
        let lo_mask = u64::MAX >> ((8 - n.min(8)) * 8);
        let hi_mask = ((1u64 << ((n.max(8) - 8) * 8)) - 1) as u32;
        ShortKey {
            lo: lo & lo_mask,
            hi: (hi & hi_mask) | (n as u32) << 24,
        }
    }

    #[inline]
    fn is_empty(self) -> bool {
        self.lo == 0 && self.hi == 0
    }

    /// A well-mixed 64-bit hash (two multiply-xor rounds); callers take the top bits.
    #[inline(always)]
    fn hash(self) -> u64 {
        let h = (self.lo.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.hi as u64)
            .wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        h ^ (h >> 29)
    }
}

/// The bytes of `b` (at most 8) as a little-endian integer, from two overlapping loads.
#[inline(always)]
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
        self.get_from(key, self.home(key))
    }

    /// The slot where the search for `key` starts.
    #[inline]
    fn home(&self, key: ShortKey) -> usize {
        (key.hash() >> self.shift) as usize
    }

    #[inline]
    fn get_from(&self, key: ShortKey, home: usize) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = home;
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

/// The merge table: open addressing (linear probing, load factor <= 1/2) from a pair of ids to
/// its merge, 16-byte slots. Unlike a general hash map it lets the merge loop compute where a
/// pair's slot is and prefetch it before reading it (see [`PairTable::home`]).
#[derive(Debug, Clone)]
struct PairTable {
    slots: Vec<PairSlot>,
    shift: u32,
}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct PairSlot {
    /// [`pair_key`] of the pair, or [`EMPTY_PAIR`] (no id is `u32::MAX`).
    key: u64,
    merge: Merge,
}

const EMPTY_PAIR: u64 = u64::MAX;

impl PairTable {
    fn new(merges: &FxHashMap<u64, Merge>) -> PairTable {
        let bits = (merges.len().max(1) * 2)
            .next_power_of_two()
            .trailing_zeros()
            .max(4);
        let empty = PairSlot {
            key: EMPTY_PAIR,
            merge: Merge {
                priority: NONE,
                merged: NONE,
            },
        };
        let mut table = PairTable {
            slots: vec![empty; 1 << bits],
            shift: 64 - bits,
        };
        let mask = table.slots.len() - 1;
        for (&key, &merge) in merges {
            let mut i = table.home(key);
            while table.slots[i].key != EMPTY_PAIR && table.slots[i].key != key {
                i = (i + 1) & mask;
            }
            table.slots[i] = PairSlot { key, merge };
        }
        table
    }

    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h ^ (h >> 32)).wrapping_mul(0xC2B2_AE3D_27D4_EB4F) >> self.shift) as usize
    }

    #[inline(always)]
    fn prefetch(&self, key: u64) -> usize {
        let home = self.home(key);
        prefetch(&self.slots[home]);
        home
    }

    #[inline(always)]
    fn get_from(&self, key: u64, home: usize) -> Option<Merge> {
        let mask = self.slots.len() - 1;
        let mut i = home;
        loop {
            let slot = self.slots[i];
            if slot.key == key {
                return Some(slot.merge);
            }
            if slot.key == EMPTY_PAIR {
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
    /// Pieces of at most [`SHORT_MAX`] bytes that are one token, whether the whole-piece table
    /// said so or the merge loop did: the hot part of the text's vocabulary in a table small
    /// enough to stay in the core's own cache (see [`FrontSet`]).
    front: Box<[FrontSet]>,
    /// Pieces of at most [`SHORT_MAX`] bytes that merge into two to [`CACHE_IDS`] tokens.
    slots: Box<[CacheSlot]>,
    /// The same for pieces longer than [`SHORT_MAX`] (runs of CJK letters, long identifiers):
    /// their bytes are stored and compared in full. Made on the first long piece.
    long: Option<Box<LongCache>>,
}

/// Sets of each thread's front cache: 4,096 x 64 bytes = 256 KiB, a quarter of a typical L2.
const FRONT_SETS: usize = 1 << 12;
const FRONT_WAYS: usize = 4;

/// One set of the front cache: four (piece, id) slots in one cache line, most recently inserted
/// first. Text is Zipf-distributed: a few thousand pieces make up most of it, and kept together
/// they hit in the core's cache, where the whole-piece table (megabytes, one piece per line
/// touched) misses. An empty slot is all zeros, which no key is.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct FrontSet {
    slots: [Slot; FRONT_WAYS],
}

impl FrontSet {
    #[inline(always)]
    fn get(&self, key: ShortKey) -> Option<u32> {
        self.slots.iter().find(|s| s.key() == key).map(|s| s.id)
    }

    /// [`FrontSet::get`] without a branch on which slot matched (NONE: none). An empty key
    /// matches an empty slot: callers must not use the result for one.
    #[inline(always)]
    fn get_id(&self, key: ShortKey) -> u32 {
        // Which slot holds a piece is as unpredictable as the text: conditional moves, not
        // branches (the compiler turns plain selects and even masks into branches).
        let mut id = NONE;
        for slot in &self.slots {
            let hit = (slot.lo == key.lo) & (slot.hi == key.hi);
            id = std::hint::select_unpredictable(hit, slot.id, id);
        }
        id
    }

    /// Remembers `key -> id`, forgetting the set's oldest entry.
    #[inline]
    fn insert(&mut self, key: ShortKey, id: u32) {
        if self.get(key).is_none() {
            self.slots.copy_within(0..FRONT_WAYS - 1, 1);
            self.slots[0] = Slot {
                lo: key.lo,
                hi: key.hi,
                id,
            };
        }
    }
}

/// The long-piece cache: its arena (bytes), its index (entries) and the longest piece it keeps.
const LONG_ARENA: usize = 1 << 22;
// 131,072 entries: 2 MB of CJK text has ~30,000 distinct long pieces, which a 32,768-entry index
// kept evicting from each other (warm CJK ran at half the speed it does now).
const LONG_INDEX: usize = 1 << 17;
const LONG_MAX: usize = 1024;

/// One thread's memory of pieces longer than [`SHORT_MAX`] bytes (runs of CJK letters, long
/// identifiers, whitespace): what varies is their length, so the results live in a ring arena,
/// each record `[piece length u32][id count u32][piece bytes][ids]`, written one after another and
/// overwritten oldest first; a direct-mapped index gives each piece's hash its latest record. A
/// record is read only if it is still whole (the ring has not come round to it) and its bytes are
/// the piece's: memory is fixed (4 MiB + 2 MiB, allocated on the first long piece) and a result
/// is always the merge loop's own.
struct LongCache {
    arena: Vec<u8>,
    /// (hash, absolute position of the record in the ring); position u64::MAX: empty.
    index: Vec<(u64, u64)>,
    /// Bytes written since the start: the next record goes to `written % LONG_ARENA`.
    written: u64,
}

impl LongCache {
    fn new() -> LongCache {
        LongCache {
            arena: vec![0; LONG_ARENA],
            index: vec![(0, u64::MAX); LONG_INDEX],
            written: 0,
        }
    }

    #[inline]
    fn slot(hash: u64) -> usize {
        (hash >> (64 - LONG_INDEX.trailing_zeros())) as usize
    }

    /// Appends the cached ids of `piece` to `out`; false if they are not cached.
    #[inline]
    fn get(&self, hash: u64, piece: &[u8], out: &mut Vec<u32>) -> bool {
        let (h, pos) = self.index[Self::slot(hash)];
        if h != hash || pos == u64::MAX || pos + (LONG_ARENA as u64) < self.written {
            return false;
        }
        let at = (pos % LONG_ARENA as u64) as usize;
        let word = |i: usize| {
            u32::from_le_bytes(self.arena[at + i..at + i + 4].try_into().expect("4 bytes")) as usize
        };
        let (len, n) = (word(0), word(4));
        if len != piece.len() || &self.arena[at + 8..at + 8 + len] != piece {
            return false;
        }
        let ids = &self.arena[at + 8 + len..at + 8 + len + 4 * n];
        out.extend(
            ids.chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))),
        );
        true
    }

    fn put(&mut self, hash: u64, piece: &[u8], ids: &[u32]) {
        let size = 8 + piece.len() + 4 * ids.len();
        let mut at = (self.written % LONG_ARENA as u64) as usize;
        if at + size > LONG_ARENA {
            // A record never wraps: the rest of the ring is skipped (and counts as written).
            self.written += (LONG_ARENA - at) as u64;
            at = 0;
        }
        let record = &mut self.arena[at..at + size];
        record[..4].copy_from_slice(&(piece.len() as u32).to_le_bytes());
        record[4..8].copy_from_slice(&(ids.len() as u32).to_le_bytes());
        record[8..8 + piece.len()].copy_from_slice(piece);
        for (dst, id) in record[8 + piece.len()..].chunks_exact_mut(4).zip(ids) {
            dst.copy_from_slice(&id.to_le_bytes());
        }
        self.index[Self::slot(hash)] = (hash, self.written);
        self.written += size as u64;
    }
}

/// A hash of a piece of up to [`LONG_MAX`] bytes, eight at a time.
#[inline]
fn long_hash(piece: &[u8]) -> u64 {
    let mut h = piece.len() as u64;
    let mut chunks = piece.chunks_exact(8);
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    h = (h ^ load_le(chunks.remainder())).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    h ^ (h >> 29)
}

impl WordCache {
    /// [`WordCache::merge`] for a piece longer than [`SHORT_MAX`].
    #[inline]
    fn merge_long(&mut self, bpe: &BytePairEncoder, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() > LONG_MAX {
            return bpe.merge(piece, out);
        }
        let long = self.long.get_or_insert_with(|| Box::new(LongCache::new()));
        let hash = long_hash(piece);
        if long.get(hash, piece, out) {
            return;
        }
        let start = out.len();
        bpe.merge(piece, out);
        long.put(hash, piece, &out[start..]);
    }

    #[inline]
    fn index(key: ShortKey) -> usize {
        (key.hash() >> (64 - CACHE_SLOTS.trailing_zeros())) as usize
    }

    /// The front set of `key`: other hash bits than [`WordCache::index`]'s, so pieces that share
    /// a slot there are spread over the sets here.
    #[inline]
    fn front_index(key: ShortKey) -> usize {
        (key.hash() as usize) & (FRONT_SETS - 1)
    }

    /// `bpe`'s ids for `piece` (whose key is `key`, slot `index`), from the cache or from the
    /// merge loop, remembered when they fit a slot.
    #[inline]
    fn merge(
        &mut self,
        bpe: &BytePairEncoder,
        key: ShortKey,
        index: usize,
        piece: &[u8],
        out: &mut Vec<u32>,
    ) {
        let slot = &mut self.slots[index];
        if slot.lo == key.lo && slot.hi == key.hi {
            out.extend_from_slice(&slot.ids[..slot.len as usize]);
            return;
        }
        // A short piece of more than CACHE_IDS tokens (runs of punctuation, odd bytes) is kept
        // where the long pieces are: one ring for every result that does not fit a slot.
        let hash = long_hash(piece);
        if let Some(long) = &self.long {
            if long.get(hash, piece, out) {
                return;
            }
        }
        let start = out.len();
        bpe.merge(piece, out);
        let ids = &out[start..];
        if ids.len() <= CACHE_IDS {
            slot.lo = key.lo;
            slot.hi = key.hi;
            slot.len = ids.len() as u32;
            slot.ids[..ids.len()].copy_from_slice(ids);
        } else {
            self.long
                .get_or_insert_with(|| Box::new(LongCache::new()))
                .put(hash, piece, ids);
        }
    }
}

/// Starts loading the cache line holding `value`: a hint, with no effect on any result.
#[inline(always)]
fn prefetch<T>(value: &T) {
    // SAFETY: SSE is part of the x86_64 baseline, and a prefetch never faults nor reads into
    // the program: any address is allowed (this one is a live reference).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (value as *const T).cast::<i8>(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
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
    merges: PairTable,
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
            merges: PairTable::new(&merges),
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
        let key = pair_key(left, right);
        self.merges.get_from(key, self.merges.home(key))
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
                    None => self.with_word_cache(|cache| match cache {
                        Some(cache) => cache.merge_long(self, piece, out),
                        None => self.merge(piece, out),
                    }),
                },
            },
        }
    }

    /// The merge loop behind this thread's word cache for this encoder.
    fn merge_cached(&self, key: ShortKey, piece: &[u8], out: &mut Vec<u32>) {
        self.with_word_cache(|cache| match cache {
            Some(cache) => cache.merge(self, key, WordCache::index(key), piece, out),
            None => self.merge(piece, out),
        })
    }

    /// Appends the ids of each piece of `text` to `out`, in order: for each, what
    /// [`Self::encode_piece`] appends. A piece is `(start, length)` in bytes; at most [`BATCH`].
    ///
    /// The loop is shaped by what it costs, measured: unpredictable branches (a piece's length
    /// decides how its key is packed and where it is looked up) and cache misses. So each table
    /// is probed for the whole batch at once, every slot computed and prefetched first and read
    /// after, so the misses of a batch overlap; keys are packed and the front cache probed without
    /// branches that depend on the piece; only a front-cache miss takes a branch, to the
    /// whole-piece table, then the word cache and the merge loop.
    #[inline]
    pub fn encode_spans(&self, text: &[u8], spans: &[(usize, usize)], out: &mut Vec<u32>) {
        assert!(spans.len() <= BATCH, "at most BATCH pieces");
        self.with_word_cache(|cache| match cache {
            Some(cache) => self.encode_spans_cached(cache, text, spans, out),
            None => spans
                .iter()
                .for_each(|&(start, len)| self.encode_piece(&text[start..start + len], out)),
        })
    }

    #[inline(always)]
    fn encode_spans_cached(
        &self,
        cache: &mut WordCache,
        text: &[u8],
        spans: &[(usize, usize)],
        out: &mut Vec<u32>,
    ) {
        let mut keys = [ShortKey::default(); BATCH];
        // The front set of each piece, then, after a front miss, its whole-table slot.
        let mut homes = [0usize; BATCH];
        for (i, &(start, len)) in spans.iter().enumerate() {
            keys[i] = ShortKey::pack_at(text, start, len);
            homes[i] = WordCache::front_index(keys[i]);
            prefetch(&cache.front[homes[i]]);
        }
        // The id of each piece that is one byte or a front-cache hit (NONE: look further).
        let mut found = [NONE; BATCH];
        for (i, &(start, len)) in spans.iter().enumerate() {
            let byte = text.get(start).map_or(NONE, |&b| self.byte_ids[b as usize]);
            let front = cache.front[homes[i]].get_id(keys[i]);
            let short = len.wrapping_sub(2) < SHORT_MAX - 1;
            let one = ((len == 1) as u32).wrapping_neg();
            let front = front | !((short as u32).wrapping_neg()); // NONE unless short
            found[i] = (byte & one) | (front & !one);
            if found[i] == NONE && short {
                homes[i] = self.whole_short.home(keys[i]);
                prefetch(&self.whole_short.slots[homes[i]]);
                prefetch(&cache.slots[WordCache::index(keys[i])]);
            }
        }
        out.reserve(spans.len());
        for (i, &(start, len)) in spans.iter().enumerate() {
            if found[i] != NONE {
                out.push(found[i]);
                continue;
            }
            if len == 0 {
                continue;
            }
            let piece = &text[start..start + len];
            if len > SHORT_MAX {
                match self.whole_long.get(piece) {
                    Some(&id) => out.push(id),
                    None => cache.merge_long(self, piece, out),
                }
            } else if let Some(id) = self.whole_short.get_from(keys[i], homes[i]) {
                cache.front[WordCache::front_index(keys[i])].insert(keys[i], id);
                out.push(id);
            } else {
                cache.merge(self, keys[i], WordCache::index(keys[i]), piece, out);
            }
        }
    }

    /// Runs `f` with this thread's word cache for this encoder (made if needed), or with None
    /// when the thread has none to lend (its destructor ran, or the cache is in use further up).
    #[inline]
    fn with_word_cache<R>(&self, f: impl FnOnce(Option<&mut WordCache>) -> R) -> R {
        let mut f = Some(f);
        let result = WORD_CACHES.try_with(|caches| {
            let mut caches = caches.try_borrow_mut().ok()?;
            match caches.iter().position(|c| c.encoder == self.uid) {
                Some(0) => {}
                Some(i) => caches[..=i].rotate_right(1),
                None => {
                    if caches.len() == CACHES_PER_THREAD {
                        caches.pop();
                    }
                    caches.insert(
                        0,
                        WordCache {
                            encoder: self.uid,
                            front: vec![FrontSet::default(); FRONT_SETS].into_boxed_slice(),
                            slots: vec![CacheSlot::default(); CACHE_SLOTS].into_boxed_slice(),
                            long: None,
                        },
                    );
                }
            }
            let f = f.take().expect("called once");
            Some(f(Some(&mut caches[0])))
        });
        match result {
            Ok(Some(r)) => r,
            _ => (f.take().expect("not called yet"))(None),
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

    /// Repeatedly merges the leftmost lowest-priority pair. `piece` is shorter than [`HEAP_THRESHOLD`]: the parts live on the stack.
    ///
    /// Parts stay where they started (a merged part takes its left half's place, its right half
    /// is unlinked and its pair marked empty), so a merge moves nothing. The lowest pair comes
    /// from a tournament tree of (priority, position) keys, kept with branch-free minimums
    /// (which pair wins is what a branch predictor cannot guess): a merge updates three leaves,
    /// O(log n) each, instead of rescanning every pair.
    fn merge_by_scan(&self, piece: &[u8], out: &mut Vec<u32>) {
        debug_assert!(piece.len() < HEAP_THRESHOLD);
        let n = piece.len();
        if n == 0 {
            return;
        }
        let no_merge = Merge {
            priority: NONE,
            merged: NONE,
        };
        // ids[i]: the part starting at byte i; next[i]: the byte where the part after it starts
        // (n: none); pairs[i]: the merge of part i with part next[i] (priority NONE: none).
        let mut ids = [0u32; HEAP_THRESHOLD];
        let mut next = [0u8; HEAP_THRESHOLD];
        let mut prev = [0u8; HEAP_THRESHOLD];
        let mut pairs = [no_merge; HEAP_THRESHOLD];
        for (i, &b) in piece.iter().enumerate() {
            ids[i] = self.byte_ids[b as usize];
            next[i] = (i + 1) as u8;
            prev[i] = i.wrapping_sub(1) as u8;
        }
        // Every pair's slot first (prefetched), then the merges: the cache misses overlap.
        let mut homes = [0usize; HEAP_THRESHOLD];
        for i in 0..n - 1 {
            homes[i] = self.merges.prefetch(pair_key(ids[i], ids[i + 1]));
        }
        for i in 0..n - 1 {
            let key = pair_key(ids[i], ids[i + 1]);
            pairs[i] = self.merges.get_from(key, homes[i]).unwrap_or(no_merge);
        }
        // Leaves at width..2 width hold each pair's key, node k the least of nodes 2k and 2k + 1:
        // the root is the leftmost lowest priority (tiktoken's tie rule).
        let key = |i: usize, pair: Merge| (pair.priority as u64) << 32 | i as u64;
        let width = (n - 1).max(1).next_power_of_two();
        let mut tree = [u64::MAX; 2 * HEAP_THRESHOLD];
        for i in 0..n - 1 {
            tree[width + i] = key(i, pairs[i]);
        }
        for k in (1..width).rev() {
            tree[k] = tree[2 * k].min(tree[2 * k + 1]);
        }
        let set = |tree: &mut [u64; 2 * HEAP_THRESHOLD], i: usize, value: u64| {
            let mut k = width + i;
            tree[k] = value;
            while k > 1 {
                k /= 2;
                tree[k] = tree[2 * k].min(tree[2 * k + 1]);
            }
        };
        loop {
            let best = tree[1];
            if (best >> 32) as u32 == NONE {
                break;
            }
            let at = best as u32 as usize;
            let right = next[at] as usize;
            ids[at] = pairs[at].merged;
            if right < n - 1 {
                pairs[right] = no_merge;
                set(&mut tree, right, u64::MAX);
            }
            let after = next[right] as usize;
            next[at] = after as u8;
            if after < n {
                prev[after] = at as u8;
            }
            // The two new pairs around the merged part: both slots in flight, then both read.
            let before = prev[at] as usize; // wraps to 255 >= n for the first part
            let right_home =
                (after < n).then(|| self.merges.prefetch(pair_key(ids[at], ids[after])));
            let left_home =
                (before < n).then(|| self.merges.prefetch(pair_key(ids[before], ids[at])));
            pairs[at] = match right_home {
                Some(home) => self
                    .merges
                    .get_from(pair_key(ids[at], ids[after]), home)
                    .unwrap_or(no_merge),
                None => no_merge,
            };
            set(&mut tree, at, key(at, pairs[at]));
            if let Some(home) = left_home {
                let pair = pair_key(ids[before], ids[at]);
                pairs[before] = self.merges.get_from(pair, home).unwrap_or(no_merge);
                set(&mut tree, before, key(before, pairs[before]));
            }
        }
        let mut i = 0;
        while i < n {
            out.push(ids[i]);
            i = next[i] as usize;
        }
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
        toy_with(shortcut, &[])
    }

    /// [`toy`] with `extra` merges (left, right, priority, merged) added or replacing its own.
    fn toy_with(shortcut: bool, extra: &[(u32, u32, u32, u32)]) -> BytePairEncoder {
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
        let own = [(0, 0, 0, 3), (3, 0, 1, 4), (1, 2, 2, 5), (0, 1, 3, 6)];
        for &(l, r, p, m) in own.iter().chain(extra) {
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
    fn batched_encoding_equals_the_merge_loop() {
        // Batches of every size up to BATCH, pieces of 0 to 1,100 bytes (short keys, the long-piece
        // cache and its length limit, the heap path), more than the front cache holds, twice.
        for bpe in [toy(false), toy(true)] {
            let mut strings = random_strings(11, 4 * FRONT_SETS * FRONT_WAYS, b"abcx");
            strings.extend((0..=1100).map(|n| b"abcab".iter().cycle().take(n).copied().collect()));
            for round in 0..2 {
                let mut at = 0;
                let mut size = round;
                while at < strings.len() {
                    size = (size * 7 + 3) % (BATCH + 1);
                    let batch: Vec<&[u8]> = strings[at..(at + size).min(strings.len())]
                        .iter()
                        .map(|s| &s[..])
                        .collect();
                    at += size.max(1);
                    let mut expected = vec![];
                    for piece in &batch {
                        if piece.len() == 3
                            && **piece == *b"abc"
                            && bpe
                                .whole_short
                                .get(ShortKey::pack(piece).unwrap())
                                .is_some()
                        {
                            expected.push(42);
                        } else {
                            bpe.merge(piece, &mut expected);
                        }
                    }
                    // One text holding the batch's pieces in turn (the last ones near its
                    // end, where fewer than 16 bytes follow them).
                    let text: Vec<u8> = batch.concat();
                    let mut spans = vec![];
                    let mut start = 0;
                    for piece in &batch {
                        spans.push((start, piece.len()));
                        start += piece.len();
                    }
                    let mut got = vec![];
                    bpe.encode_spans(&text, &spans, &mut got);
                    assert_eq!(got, expected, "round {round}: {batch:?}");
                }
            }
        }
    }

    #[test]
    fn encoders_on_one_thread_never_share_cache_entries() {
        // Same bytes, different merge tables: each must keep its own results.
        let a = toy(false);
        let b = toy_with(false, &[(0, 1, 0, 77)]);
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
    fn the_long_cache_gives_back_what_it_was_given_or_nothing() {
        // Far more records than the ring holds (it comes round many times), pieces of every
        // length up to LONG_MAX, colliding hashes forced: every hit must be the piece's own ids.
        let mut cache = LongCache::new();
        let mut kept = vec![];
        let mut state = 7u64;
        for round in 0..20_000u64 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = SHORT_MAX + 1 + (state >> 33) as usize % (LONG_MAX - SHORT_MAX);
            let piece: Vec<u8> = (0..len).map(|i| (round as usize * 31 + i) as u8).collect();
            // A piece always has the same ids (as from the merge loop).
            let ids: Vec<u32> = (0..len / 3)
                .map(|i| piece[i] as u32 * 1000 + i as u32)
                .collect();
            let hash = if round % 3 == 0 {
                42
            } else {
                long_hash(&piece)
            };
            cache.put(hash, &piece, &ids);
            kept.push((hash, piece, ids));
        }
        let (mut hits, mut out) = (0, vec![]);
        for (hash, piece, ids) in &kept {
            out.clear();
            if cache.get(*hash, piece, &mut out) {
                assert_eq!(&out, ids);
                hits += 1;
            } else {
                assert!(out.is_empty());
            }
        }
        assert!(hits > 100, "the latest records are kept: {hits} hits");
    }

    #[test]
    fn keys_packed_in_place_equal_packed_keys() {
        // Every short piece at every offset of a text with arbitrary bytes around it, including
        // the last 16 bytes (where the window does not fit and the plain packing is used).
        let text: Vec<u8> = (0..64u32).map(|i| (i * 37 % 256) as u8).collect();
        for start in 0..text.len() {
            for len in 1..=SHORT_MAX.min(text.len() - start) {
                let want = ShortKey::pack(&text[start..start + len]).unwrap();
                assert_eq!(ShortKey::pack_at(&text, start, len), want, "{start} {len}");
            }
        }
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
