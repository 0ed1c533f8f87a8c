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
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Pieces at least this long (in bytes) take the heap path.
const HEAP_THRESHOLD: usize = 128;
const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merge {
    pub priority: u32,
    pub merged: u32,
}

#[derive(Debug, Clone)]
pub struct BytePairEncoder {
    byte_ids: [u32; 256],
    merges: FxHashMap<u64, Merge>,
    /// Pieces whose encoding is the single token they map to.
    whole_pieces: FxHashMap<Vec<u8>, u32>,
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
        BytePairEncoder {
            byte_ids,
            merges,
            whole_pieces,
        }
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
                self.encode_piece(bytes, &mut out);
                out.len() == 1 && out[0] == *id
            })
            .map(|(bytes, id)| (bytes.clone(), id))
            .collect()
    }

    pub fn with_whole_pieces(mut self, whole_pieces: FxHashMap<Vec<u8>, u32>) -> Self {
        self.whole_pieces = whole_pieces;
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
            n => {
                if let Some(&id) = self.whole_pieces.get(piece) {
                    out.push(id);
                    return;
                }
                if n < HEAP_THRESHOLD {
                    self.merge_by_scan(piece, out)
                } else {
                    self.merge_by_heap(piece, out)
                }
            }
        }
    }

    /// Repeatedly merges the leftmost lowest-priority pair by scanning: O(n^2), fast for short pieces.
    fn merge_by_scan(&self, piece: &[u8], out: &mut Vec<u32>) {
        // ids[i] is part i; priorities[i] is the priority of merging part i with part i + 1.
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut priorities: Vec<u32> = ids.windows(2).map(|w| self.priority(w[0], w[1])).collect();
        loop {
            let mut best = NONE;
            let mut at = 0;
            for (i, &p) in priorities.iter().enumerate() {
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
            ids.remove(at + 1);
            priorities.remove(at);
            if at + 1 < ids.len() {
                priorities[at] = self.priority(ids[at], ids[at + 1]);
            }
            if at > 0 {
                priorities[at - 1] = self.priority(ids[at - 1], ids[at]);
            }
        }
        out.extend_from_slice(&ids);
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

    fn run(bpe: &BytePairEncoder, s: &[u8]) -> (Vec<u32>, Vec<u32>) {
        let (mut scan, mut heap) = (vec![], vec![]);
        bpe.merge_by_scan(s, &mut scan);
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
