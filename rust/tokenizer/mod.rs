//! Byte-level BPE: a pre-tokenizer splits text into pieces, each piece's UTF-8 bytes are merged
//! into tokens, and special tokens are matched before either (only those the caller allows).

pub mod bytelevel;
pub mod encode;
pub mod formats;
pub mod pretokenize;
pub mod train;

use crate::error::{Error, Result};
use aho_corasick::{AhoCorasick, MatchKind};
use encode::{BytePairEncoder, Merge};
use pretokenize::{PreTokenizer, SplitOptions};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::sync::{Arc, Mutex};

/// How pairs are chosen for merging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeRule {
    /// tiktoken: any two adjacent parts whose concatenation is a token merge, lowest id first.
    Ranks,
    /// Hugging Face / GPT-2 `merges.txt`: only the listed pairs merge, earliest in the list first.
    List(Vec<(u32, u32)>),
}

/// Everything that defines a tokenizer; what the file formats read and write.
#[derive(Debug, Clone)]
pub struct TokenizerParts {
    /// The ordinary vocabulary: each token's bytes and id.
    pub tokens: Vec<(Vec<u8>, u32)>,
    pub merge_rule: MergeRule,
    /// Special tokens (text, id), matched in raw text before pre-tokenization.
    pub specials: Vec<(String, u32)>,
    /// The pre-tokenization regex (a literal string if `split.literal`). Never a name: names are
    /// resolved where a user gives them (`pretokenize::resolve_pattern`).
    pub pattern: String,
    /// What Hugging Face's `Split` does with the pattern's matches (default: `Isolated`, which
    /// keeps all text).
    pub split: SplitOptions,
    /// A piece that is itself a token becomes that token without merging (tiktoken always does
    /// this; Hugging Face does it when the file says `ignore_merges`).
    pub whole_piece_first: bool,
    /// Hugging Face's ByteLevel `add_prefix_space`: a space is put before each text segment that
    /// does not start with one.
    pub add_prefix_space: bool,
}

/// Which special tokens may appear in the text (tiktoken's `allowed_special` / `disallowed_special`).
#[derive(Debug, Clone, Default)]
pub struct SpecialPolicy {
    /// Encoded as their special id when they occur.
    pub allowed: Vec<u32>,
    /// An error when they occur (checked before encoding).
    pub disallowed: Vec<u32>,
}

pub struct Tokenizer {
    parts: TokenizerParts,
    pretokenizer: PreTokenizer,
    bpe: BytePairEncoder,
    /// Bytes of every id (ordinary and special), flat for decoding: `spans[id] = (start, end)`.
    token_bytes: Vec<u8>,
    spans: Vec<(u32, u32)>,
    ordinary_ids: FxHashMap<Vec<u8>, u32>,
    special_ids: FxHashMap<String, u32>,
    /// Aho-Corasick automata keyed by the sorted id set they match, built on first use.
    special_matchers: Mutex<FxHashMap<Vec<u32>, Arc<AhoCorasick>>>,
}

const MISSING: (u32, u32) = (u32::MAX, u32::MAX);

/// How far ids may run past the number of tokens (unused ids between them are allowed).
pub const ID_SLACK: u64 = 1 << 20;

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("pattern", &self.parts.pattern)
            .field("specials", &self.parts.specials.len())
            .finish()
    }
}

impl Tokenizer {
    pub fn new(parts: TokenizerParts) -> Result<Self> {
        let pretokenizer = PreTokenizer::from_pattern(&parts.pattern, parts.split)?;

        let mut ordinary_ids: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        ordinary_ids.reserve(parts.tokens.len());
        let mut bytes_of: FxHashMap<u32, &[u8]> = FxHashMap::default();
        for (bytes, id) in &parts.tokens {
            if bytes.is_empty() {
                return Err(Error::invalid(format!("token id {id} has no bytes")));
            }
            if let Some(other) = ordinary_ids.insert(bytes.clone(), *id) {
                return Err(Error::invalid(format!(
                    "token {} appears twice, with ids {other} and {id}",
                    describe_bytes(bytes)
                )));
            }
            if let Some(other) = bytes_of.insert(*id, bytes) {
                return Err(Error::invalid(format!(
                    "id {id} is given to two tokens: {} and {}",
                    describe_bytes(other),
                    describe_bytes(bytes)
                )));
            }
        }

        let mut byte_ids = [0u32; 256];
        for b in 0..=255u8 {
            byte_ids[b as usize] = *ordinary_ids.get(&[b][..]).ok_or_else(|| {
                Error::invalid(format!(
                    "the vocabulary lacks the single-byte token {} (a byte-level BPE vocabulary has all 256 bytes)",
                    describe_bytes(&[b])
                ))
            })?;
        }

        // Ids index the decode table, so they must be near the number of tokens: one huge id in a
        // small file must not size a huge table. Gaps are allowed (tiktoken's cl100k has a few
        // unused ids before its specials), up to `ID_SLACK` of them.
        let id_count = ordinary_ids.len() + parts.specials.len();
        let id_limit = (id_count as u64 + ID_SLACK).min(u32::MAX as u64);
        let named = parts
            .tokens
            .iter()
            .map(|(bytes, id)| (describe_bytes(bytes), *id))
            .chain(parts.specials.iter().map(|(text, id)| (quote(text), *id)));
        for (token, id) in named {
            if id as u64 >= id_limit {
                return Err(Error::invalid(format!(
                    "token {token} has id {id}, but this tokenizer has {id_count} tokens: ids must be below {id_limit} (the number of tokens + {ID_SLACK})"
                )));
            }
        }
        // A special token may share an id only with an ordinary token of the same text: its bytes,
        // or its byte-level spelling (a tokenizer.json vocabulary entry, "Ġthe" or "é" for 0xe9).
        for (text, id) in &parts.specials {
            if let Some(bytes) = bytes_of.get(id) {
                if *bytes != text.as_bytes() && bytelevel::encode_bytes(bytes) != *text {
                    return Err(Error::invalid(format!(
                        "special token {} has id {id}, which is already the ordinary token {}",
                        quote(text),
                        describe_bytes(bytes)
                    )));
                }
            }
        }

        let merges = match &parts.merge_rule {
            MergeRule::Ranks => merges_from_ranks(&parts.tokens, &ordinary_ids),
            MergeRule::List(list) => {
                let merges = merges_from_list(list, &bytes_of, &ordinary_ids)?;
                // Every multi-byte token must be made by a merge: one that none makes is what a
                // truncated merge list leaves, and encoding would never produce it.
                let made: rustc_hash::FxHashSet<u32> = merges.values().map(|m| m.merged).collect();
                let mut orphans: Vec<&(Vec<u8>, u32)> = parts
                    .tokens
                    .iter()
                    .filter(|(b, id)| b.len() > 1 && !made.contains(id))
                    .collect();
                if !orphans.is_empty() {
                    orphans.sort_by_key(|(_, id)| *id);
                    let (bytes, id) = orphans[0];
                    return Err(Error::invalid(format!(
                        "vocabulary token {} (id {id}) is not a special token and no merge makes it ({} such token(s)); is the merge list truncated?",
                        describe_bytes(bytes),
                        orphans.len()
                    )));
                }
                merges
            }
        };
        let whole_piece_first = parts.whole_piece_first || parts.merge_rule == MergeRule::Ranks;

        let max_id = parts
            .tokens
            .iter()
            .map(|(_, id)| *id)
            .chain(parts.specials.iter().map(|(_, id)| *id))
            .max()
            .unwrap_or(0);
        let mut spans = vec![MISSING; max_id as usize + 1];
        let mut token_bytes = Vec::new();
        let mut push = |id: u32, bytes: &[u8]| {
            let start = token_bytes.len() as u32;
            token_bytes.extend_from_slice(bytes);
            spans[id as usize] = (start, token_bytes.len() as u32);
        };
        for (bytes, id) in &parts.tokens {
            push(*id, bytes);
        }
        let mut special_ids = FxHashMap::default();
        for (text, id) in &parts.specials {
            if text.is_empty() {
                return Err(Error::invalid(format!("special token id {id} is empty")));
            }
            if let Some(other) = special_ids.insert(text.clone(), *id) {
                if other != *id {
                    return Err(Error::invalid(format!(
                        "special token {} has two ids, {other} and {id}",
                        quote(text)
                    )));
                }
            }
            // A special token's own text wins for decoding when it shares an id with an ordinary one.
            push(*id, text.as_bytes());
        }

        let bpe = if whole_piece_first {
            BytePairEncoder::new(byte_ids, merges, ordinary_ids.clone())
        } else {
            let plain = BytePairEncoder::new(byte_ids, merges, FxHashMap::default());
            let multi_byte = parts.tokens.iter().filter(|(b, _)| b.len() > 1);
            let whole = plain.self_encoding(multi_byte.map(|(b, id)| (b, *id)));
            plain.with_whole_pieces(whole)
        };
        Ok(Tokenizer {
            parts,
            pretokenizer,
            bpe,
            token_bytes,
            spans,
            ordinary_ids,
            special_ids,
            special_matchers: Mutex::new(FxHashMap::default()),
        })
    }

    pub fn parts(&self) -> &TokenizerParts {
        &self.parts
    }

    pub fn pretokenizer(&self) -> &PreTokenizer {
        &self.pretokenizer
    }

    /// Whether `decode(encode(text)) == text` for every text: false when the pre-tokenizer drops
    /// text (a Hugging Face `Split` with behaviour `Removed`). Sharding refuses a lossy tokenizer.
    pub fn is_lossless(&self) -> bool {
        self.pretokenizer.is_lossless()
    }

    /// One more than the largest id (ordinary or special).
    pub fn vocab_size(&self) -> usize {
        self.spans.len()
    }

    pub fn special_tokens(&self) -> &[(String, u32)] {
        &self.parts.specials
    }

    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.special_ids.get(text).copied()
    }

    pub fn ordinary_id(&self, bytes: &[u8]) -> Option<u32> {
        self.ordinary_ids.get(bytes).copied()
    }

    /// The bytes of one id, or None if no token has it.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let &(start, end) = self.spans.get(id as usize)?;
        (start != u32::MAX).then(|| &self.token_bytes[start as usize..end as usize])
    }

    /// Encodes text with no special-token handling: special tokens' text is ordinary text.
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.encode_ordinary_into(text, &mut out)?;
        Ok(out)
    }

    fn encode_ordinary_into(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if self.parts.add_prefix_space && !text.is_empty() && !text.starts_with(' ') {
            return self.encode_pieces_of(&format!(" {text}"), out);
        }
        self.encode_pieces_of(text, out)
    }

    /// Splits `text` and encodes its pieces [`encode::BATCH`] at a time (see
    /// [`BytePairEncoder::encode_spans`]).
    #[inline]
    fn encode_pieces_of(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut batch = [(0usize, 0usize); encode::BATCH];
        let mut n = 0;
        let base = text.as_ptr() as usize;
        self.pretokenizer.split(text, |piece| {
            batch[n] = (piece.as_ptr() as usize - base, piece.len());
            n += 1;
            if n == encode::BATCH {
                self.bpe.encode_spans(text.as_bytes(), &batch, out);
                n = 0;
            }
        })?;
        self.bpe.encode_spans(text.as_bytes(), &batch[..n], out);
        Ok(())
    }

    /// Encodes text, turning allowed special tokens into their ids and refusing disallowed ones.
    pub fn encode(&self, text: &str, policy: &SpecialPolicy) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.encode_into(text, policy, &mut out)?;
        Ok(out)
    }

    /// [`Tokenizer::encode`], appending to `out`.
    fn encode_into(&self, text: &str, policy: &SpecialPolicy, out: &mut Vec<u32>) -> Result<()> {
        if !policy.disallowed.is_empty() {
            let matcher = self.special_matcher(&policy.disallowed)?;
            if let Some(m) = matcher.find(text) {
                return Err(Error::DisallowedSpecial {
                    token: text[m.range()].to_string(),
                    offset: m.start(),
                });
            }
        }
        if policy.allowed.is_empty() {
            return self.encode_ordinary_into(text, out);
        }
        let matcher = self.special_matcher(&policy.allowed)?;
        let mut start = 0;
        for m in matcher.find_iter(text) {
            self.encode_ordinary_into(&text[start..m.start()], out)?;
            out.push(self.special_ids[&text[m.range()]]);
            start = m.end();
        }
        self.encode_ordinary_into(&text[start..], out)
    }

    /// Encodes many texts on the pool (`num_threads` None: the default size).
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        policy: &SpecialPolicy,
        num_threads: Option<usize>,
    ) -> Result<Vec<Vec<u32>>> {
        crate::pool::install(num_threads, || {
            texts
                .par_iter()
                .map(|t| self.encode(t.as_ref(), policy))
                .collect()
        })
    }

    /// Encodes many texts on the pool into one flat array: appends each text's ids to `flat` and
    /// the end of each to `offsets` (text i is `flat[offsets[i]..offsets[i + 1]]` when `offsets`
    /// starts as `[0]`). Each worker fills one buffer for a run of texts, so the cost per text is
    /// no allocation of its own.
    pub fn encode_batch_flat<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        policy: &SpecialPolicy,
        num_threads: Option<usize>,
        flat: &mut Vec<u32>,
        offsets: &mut Vec<i64>,
    ) -> Result<()> {
        let threads = num_threads.unwrap_or_else(crate::pool::num_threads).max(1);
        // A few runs per thread, so an uneven run does not leave the others idle.
        let run = texts.len().div_ceil(threads * 4).max(1);
        let runs: Vec<(Vec<u32>, Vec<usize>)> = crate::pool::install(num_threads, || {
            texts
                .par_chunks(run)
                .map(|chunk| {
                    let bytes: usize = chunk.iter().map(|t| t.as_ref().len()).sum();
                    let mut ids = Vec::with_capacity(bytes / 3);
                    let mut ends = Vec::with_capacity(chunk.len());
                    for text in chunk {
                        self.encode_into(text.as_ref(), policy, &mut ids)?;
                        ends.push(ids.len());
                    }
                    Ok((ids, ends))
                })
                .collect::<Result<_>>()
        })?;
        flat.reserve(runs.iter().map(|(ids, _)| ids.len()).sum());
        for (ids, ends) in runs {
            let base = flat.len() as i64;
            offsets.extend(ends.iter().map(|&end| base + end as i64));
            flat.extend_from_slice(&ids);
        }
        Ok(())
    }

    /// Concatenated bytes of `ids`; an id that no token has is an error naming it.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for (position, &id) in ids.iter().enumerate() {
            match self.token_bytes(id) {
                Some(bytes) => out.extend_from_slice(bytes),
                None => {
                    return Err(Error::invalid(format!(
                        "token id {id} at position {position} is not in the vocabulary (the largest id is {})",
                        self.vocab_size().saturating_sub(1)
                    )))
                }
            }
        }
        Ok(out)
    }

    fn special_matcher(&self, ids: &[u32]) -> Result<Arc<AhoCorasick>> {
        let mut key = ids.to_vec();
        key.sort_unstable();
        key.dedup();
        let mut cache = self
            .special_matchers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(m) = cache.get(&key) {
            return Ok(m.clone());
        }
        let mut texts = Vec::with_capacity(key.len());
        for id in &key {
            let text = self
                .parts
                .specials
                .iter()
                .find(|(_, sid)| sid == id)
                .map(|(t, _)| t.as_str())
                .ok_or_else(|| Error::invalid(format!("id {id} is not a special token")))?;
            texts.push(text);
        }
        let matcher = Arc::new(
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&texts)
                .map_err(|e| Error::invalid(format!("cannot match the special tokens: {e}")))?,
        );
        if cache.len() > 64 {
            cache.clear();
        }
        cache.insert(key, matcher.clone());
        Ok(matcher)
    }

    /// The merge list in priority order: the given list, or for rank files the pair that builds
    /// each multi-byte token (found by running the merge loop on its bytes with only lower ranks).
    pub fn merge_list(&self) -> Result<Vec<(u32, u32)>> {
        match &self.parts.merge_rule {
            MergeRule::List(list) => Ok(list.clone()),
            MergeRule::Ranks => derive_merges_from_ranks(&self.parts.tokens, &self.ordinary_ids),
        }
    }
}

/// Every split of every token into two tokens merges into it, with the token's rank as priority.
fn merges_from_ranks(
    tokens: &[(Vec<u8>, u32)],
    ids: &FxHashMap<Vec<u8>, u32>,
) -> FxHashMap<u64, Merge> {
    let mut merges = FxHashMap::default();
    for (bytes, id) in tokens {
        for split in 1..bytes.len() {
            if let (Some(&left), Some(&right)) =
                (ids.get(&bytes[..split]), ids.get(&bytes[split..]))
            {
                let merge = Merge {
                    priority: *id,
                    merged: *id,
                };
                merges.insert(BytePairEncoder::merge_table_key(left, right), merge);
            }
        }
    }
    merges
}

fn merges_from_list(
    list: &[(u32, u32)],
    bytes_of: &FxHashMap<u32, &[u8]>,
    ids: &FxHashMap<Vec<u8>, u32>,
) -> Result<FxHashMap<u64, Merge>> {
    let mut merges = FxHashMap::default();
    merges.reserve(list.len());
    for (index, &(left, right)) in list.iter().enumerate() {
        let side = |id: u32| {
            bytes_of.get(&id).copied().ok_or_else(|| {
                Error::invalid(format!(
                    "merge {index} refers to id {id}, which is not a token"
                ))
            })
        };
        let mut joined = side(left)?.to_vec();
        joined.extend_from_slice(side(right)?);
        let merged = *ids.get(&joined).ok_or_else(|| {
            Error::invalid(format!(
                "merge {index} ({} {}) makes {}, which is not in the vocabulary",
                describe_bytes(side(left).unwrap_or_default()),
                describe_bytes(side(right).unwrap_or_default()),
                describe_bytes(&joined)
            ))
        })?;
        // A repeated pair keeps its first (highest-priority) position, as Hugging Face does.
        merges
            .entry(BytePairEncoder::merge_table_key(left, right))
            .or_insert(Merge {
                priority: index as u32,
                merged,
            });
    }
    Ok(merges)
}

fn derive_merges_from_ranks(
    tokens: &[(Vec<u8>, u32)],
    ids: &FxHashMap<Vec<u8>, u32>,
) -> Result<Vec<(u32, u32)>> {
    let mut by_rank: Vec<&(Vec<u8>, u32)> = tokens.iter().filter(|(b, _)| b.len() > 1).collect();
    by_rank.sort_by_key(|(_, id)| *id);
    let mut list = Vec::with_capacity(by_rank.len());
    for (bytes, rank) in by_rank {
        // Merge the token's bytes using only tokens ranked below it; a BPE-built vocabulary
        // always ends with exactly two parts.
        let mut parts: Vec<&[u8]> = bytes.chunks(1).collect();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for i in 0..parts.len() - 1 {
                let joined = [parts[i], parts[i + 1]].concat();
                if let Some(&r) = ids.get(&joined) {
                    if r < *rank && best.is_none_or(|(b, _)| r < b) {
                        best = Some((r, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let start = parts[i].as_ptr() as usize - bytes.as_ptr() as usize;
            let len = parts[i].len() + parts[i + 1].len();
            parts[i] = &bytes[start..start + len];
            parts.remove(i + 1);
        }
        if parts.len() != 2 {
            return Err(Error::invalid(format!(
                "token {} (rank {rank}) cannot be built by merging two lower-ranked tokens, so this \
                 vocabulary has no equivalent merge list",
                describe_bytes(bytes)
            )));
        }
        list.push((ids[parts[0]], ids[parts[1]]));
    }
    Ok(list)
}

/// Quoted text for an error message (Rust `{:?}` spelling), cut to about 200 characters so that a
/// huge line or token does not become a huge message. With [`cap`], the one helper every tokenizer
/// error uses for input text.
pub fn quote(text: &str) -> String {
    match cut_point(text) {
        None => format!("{text:?}"),
        Some(cut) => format!("{:?}... ({} bytes in all)", &text[..cut], text.len()),
    }
}

/// Text already spelled for a message (a JSON value), cut like [`quote`] but not quoted again.
pub fn cap(text: &str) -> String {
    match cut_point(text) {
        None => text.to_string(),
        Some(cut) => format!("{}... ({} bytes in all)", &text[..cut], text.len()),
    }
}

const QUOTE_CHARS: usize = 200;

fn cut_point(text: &str) -> Option<usize> {
    text.char_indices().nth(QUOTE_CHARS).map(|(cut, _)| cut)
}

/// A token's bytes for messages: the text if it is UTF-8, else its byte-level spelling.
pub fn describe_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => quote(s),
        Err(_) if bytes.len() > 64 => format!(
            "{} (not UTF-8, {} bytes)",
            quote(&bytelevel::encode_bytes(bytes)),
            bytes.len()
        ),
        Err(_) => format!(
            "{} (bytes {:02x?})",
            quote(&bytelevel::encode_bytes(bytes)),
            bytes
        ),
    }
}
