//! Pre-tokenization: splitting text into the pieces that byte-level BPE encodes one at a time.
//!
//! The GPT-2, cl100k and o200k pre-tokenizers are defined by regular expressions (tiktoken's pattern
//! strings, see [`GPT2_PATTERN`], [`CL100K_PATTERN`], [`O200K_PATTERN`]). Running those through a
//! backtracking engine is where tiktoken spends most of its time, so for them this module has
//! hand-written scanners that produce exactly the pieces `fancy_regex::Regex::find_iter` produces on
//! the same pattern (a differential fuzzer in the tests below checks that). Any other pattern is
//! compiled with fancy-regex and used as is.
//!
//! The scanners classify characters with tables built once from `regex-syntax`'s own Unicode data
//! (the same tables the regex engine uses), so they agree with the regex on every code point.
//!
//! How each pattern reads as a scanner (leftmost-first alternation, "run of X" = longest run):
//!
//! * GPT-2: `'` + one of `s d m t ll ve re` (case-sensitive); else an optional space followed by a run
//!   of letters, of numbers or of "others" (neither whitespace, letter nor number); else whitespace:
//!   a run reaching the end of the text is one piece, a longer run gives all but its last character
//!   (left to start the next piece), a single character is a piece.
//! * cl100k: `'` + a case-insensitive contraction (Unicode simple folding, so `'ſ` counts); else one
//!   optional character that is not `\r`, `\n`, a letter or a number, followed by a run of letters;
//!   else 1–3 numbers; else an optional space, a run of others and a run of `\r`/`\n`; else
//!   whitespace: a run reaching the end of the text is one piece (`\s++$`), a run holding a line
//!   break ends after its last line break, otherwise as for GPT-2. The "classic" spelling
//!   ([`CL100K_CLASSIC_PATTERN`], used by Llama 3 and Hugging Face's conversion) has no `\s++$`, so
//!   a trailing run is cut after its last line break too.
//! * o200k: letters are split at lower/upper-case boundaries, `[Lu Lt Lm Lo M]*[Ll Lm Lo M]+` or
//!   `[Lu Lt Lm Lo M]+[Ll Lm Lo M]*`, with the optional prefix character of cl100k and an optional
//!   case-insensitive contraction suffix (backtracking included: `AB` + non-letter gives `AB`,
//!   `ABc` gives `ABc`, a lone combining mark is a letter piece); numbers 1–3; an optional space,
//!   others and a run of `\r`, `\n`, `/`; whitespace as for classic cl100k.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, OnceLock};

use regex_syntax::hir::{Class, HirKind};

use crate::error::{Error, Result};

/// tiktoken's pattern for `gpt2`, `r50k_base` and `p50k_base`.
pub const GPT2_PATTERN: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";

/// tiktoken's pattern for `cl100k_base`.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// tiktoken's pattern for `o200k_base`.
pub const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+",
);

/// [`CL100K_PATTERN`] with `\p{N}{1,3}` for `\p{N}{1,3}+` (the spelling written into a
/// tokenizer.json, where Oniguruma would read `{1,3}+` as a repetition). Same pieces: gets the cl100k
/// scanner.
pub const CL100K_HF_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// The original GPT-2 pattern (also Hugging Face's ByteLevel pre-tokenizer). It splits every text
/// exactly as [`GPT2_PATTERN`] does, so it gets the GPT-2 scanner.
pub const GPT2_CLASSIC_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The cl100k pattern as older tiktoken, Llama 3 and Hugging Face's conversion spell it. It differs
/// from [`CL100K_PATTERN`] only on whitespace at the end of the text that holds a line break
/// followed by other whitespace (`" \n "` at the end: one piece there, `" \n"` + `" "` here).
pub const CL100K_CLASSIC_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Every pattern name, in one table: what training, encoding, loading (tiktoken's encodings
/// included) and saving resolve names with. Several names share a pattern.
pub const PATTERN_NAMES: &[(&str, &str)] = &[
    ("gpt2", GPT2_PATTERN),
    ("r50k_base", GPT2_PATTERN),
    ("p50k_base", GPT2_PATTERN),
    ("p50k_edit", GPT2_PATTERN),
    ("cl100k", CL100K_PATTERN),
    ("cl100k_base", CL100K_PATTERN),
    ("cl100k_classic", CL100K_CLASSIC_PATTERN),
    ("o200k", O200K_PATTERN),
    ("o200k_base", O200K_PATTERN),
];

/// The one resolver of a user's pattern argument: a name from [`PATTERN_NAMES`] gives its pattern;
/// a bare word (letters, digits, `_`, `-`) that is not a name is an error listing the names (a typo,
/// not a regex); anything else is a regex, returned as is.
pub fn resolve_pattern(name_or_regex: &str) -> Result<&str> {
    if name_or_regex.is_empty() {
        return Err(Error::invalid("the pre-tokenizer pattern is empty"));
    }
    if let Some((_, pattern)) = PATTERN_NAMES.iter().find(|(n, _)| *n == name_or_regex) {
        return Ok(pattern);
    }
    let bare_word = name_or_regex
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare_word {
        let names: Vec<&str> = PATTERN_NAMES.iter().map(|(n, _)| *n).collect();
        return Err(Error::invalid(format!(
            "unknown pattern name {}: the known names are {}; anything else must be a regular \
             expression",
            super::quote(name_or_regex),
            names.join(", ")
        )));
    }
    Ok(name_or_regex)
}

/// What Hugging Face's `Split` pre-tokenizer does with the pattern's matches
/// (`SplitDelimiterBehavior`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitBehavior {
    /// Matches are dropped (the only behaviour that loses text).
    Removed,
    /// Matches and the text between them are separate pieces.
    #[default]
    Isolated,
    /// Each match is joined to the piece before it.
    MergedWithPrevious,
    /// Each match is joined to the piece after it.
    MergedWithNext,
    /// Consecutive matches (and consecutive non-matches) form one piece.
    Contiguous,
}

impl SplitBehavior {
    pub const ALL: [SplitBehavior; 5] = [
        SplitBehavior::Removed,
        SplitBehavior::Isolated,
        SplitBehavior::MergedWithPrevious,
        SplitBehavior::MergedWithNext,
        SplitBehavior::Contiguous,
    ];

    /// The spelling in a tokenizer.json.
    pub fn as_hf(self) -> &'static str {
        match self {
            SplitBehavior::Removed => "Removed",
            SplitBehavior::Isolated => "Isolated",
            SplitBehavior::MergedWithPrevious => "MergedWithPrevious",
            SplitBehavior::MergedWithNext => "MergedWithNext",
            SplitBehavior::Contiguous => "Contiguous",
        }
    }

    pub fn from_hf(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_hf() == name)
    }
}

/// How the pattern's matches become pieces (Hugging Face's `Split` options). The default,
/// `Isolated` and not inverted, keeps every byte of the text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplitOptions {
    pub behavior: SplitBehavior,
    /// Matches become non-matches and the other way round, before `behavior` applies.
    pub invert: bool,
    /// The pattern is a literal string (`{"String": ...}`), not a regex.
    pub literal: bool,
}

/// Splits text into pre-tokens, with a hand-written scanner for the known patterns and fancy-regex
/// for any other.
#[derive(Clone)]
pub struct PreTokenizer {
    pattern: Cow<'static, str>,
    kind: Kind,
    options: SplitOptions,
}

#[derive(Clone)]
enum Kind {
    Gpt2,
    Cl100k,
    Cl100kClassic,
    O200k,
    Regex(Arc<fancy_regex::Regex>),
}

impl fmt::Debug for PreTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreTokenizer")
            .field("name", &self.name())
            .field("pattern", &self.pattern)
            .field("options", &self.options)
            .finish()
    }
}

impl PreTokenizer {
    /// A name from [`PATTERN_NAMES`] or a regex string (see [`resolve_pattern`]), with Hugging
    /// Face's default split (`Isolated`): the pieces concatenate back to the text.
    pub fn new(name_or_pattern: &str) -> Result<Self> {
        Self::from_pattern(resolve_pattern(name_or_pattern)?, SplitOptions::default())
    }

    /// A regex (never a name: a file's pattern is taken literally as a regex) or, with
    /// `options.literal`, a literal string. A regex equal to a known pattern (or to a spelling proven
    /// equivalent by the tests) gets the fast scanner; anything else is compiled with fancy-regex.
    pub fn from_pattern(pattern: &str, options: SplitOptions) -> Result<Self> {
        let known = match pattern {
            _ if options.literal => None,
            GPT2_PATTERN => Some((GPT2_PATTERN, Kind::Gpt2)),
            GPT2_CLASSIC_PATTERN => Some((GPT2_CLASSIC_PATTERN, Kind::Gpt2)),
            CL100K_PATTERN => Some((CL100K_PATTERN, Kind::Cl100k)),
            CL100K_HF_PATTERN => Some((CL100K_HF_PATTERN, Kind::Cl100k)),
            CL100K_CLASSIC_PATTERN => Some((CL100K_CLASSIC_PATTERN, Kind::Cl100kClassic)),
            O200K_PATTERN => Some((O200K_PATTERN, Kind::O200k)),
            _ => None,
        };
        if let Some((pattern, kind)) = known {
            return Ok(PreTokenizer {
                pattern: Cow::Borrowed(pattern),
                kind,
                options,
            });
        }
        if pattern.is_empty() {
            return Err(Error::invalid("the pre-tokenizer pattern is empty"));
        }
        let regex = if options.literal {
            fancy_regex::escape(pattern).into_owned()
        } else {
            pattern.to_owned()
        };
        let mut out = Self::with_regex(&regex)?;
        out.pattern = Cow::Owned(pattern.to_owned());
        out.options = options;
        Ok(out)
    }

    /// Always the general regex engine (fancy-regex), whatever the pattern; `Isolated`.
    pub fn with_regex(pattern: &str) -> Result<Self> {
        if pattern.is_empty() {
            return Err(Error::invalid("the pre-tokenizer pattern is empty"));
        }
        let regex = fancy_regex::Regex::new(pattern).map_err(|e| {
            Error::invalid(format!(
                "invalid pre-tokenizer pattern {}: {e}",
                super::quote(pattern)
            ))
        })?;
        Ok(PreTokenizer {
            pattern: Cow::Owned(pattern.to_owned()),
            kind: Kind::Regex(Arc::new(regex)),
            options: SplitOptions::default(),
        })
    }

    /// The regex string this pre-tokenizer implements (the literal string if `options().literal`).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn options(&self) -> SplitOptions {
        self.options
    }

    /// Whether the pieces always concatenate back to the text (every behaviour but `Removed`).
    pub fn is_lossless(&self) -> bool {
        self.options.behavior != SplitBehavior::Removed
    }

    /// `gpt2`, `cl100k`, `cl100k_classic` or `o200k` for a fast scanner, `None` for a custom regex.
    pub fn name(&self) -> Option<&'static str> {
        match self.kind {
            Kind::Gpt2 => Some("gpt2"),
            Kind::Cl100k => Some("cl100k"),
            Kind::Cl100kClassic => Some("cl100k_classic"),
            Kind::O200k => Some("o200k"),
            Kind::Regex(_) => None,
        }
    }

    /// Calls `f` with every non-empty piece, in order, exactly as Hugging Face's `Split` makes them:
    /// the matches and the text between them, inverted if asked, then joined or dropped by the
    /// behaviour. Unless the behaviour is `Removed`, the pieces concatenate back to `text`. Only a
    /// custom regex can fail (e.g. its backtracking limit).
    pub fn split<'t, F: FnMut(&'t str)>(&self, text: &'t str, mut f: F) -> Result<()> {
        let plain = self.options.behavior == SplitBehavior::Isolated;
        match &self.kind {
            // The known patterns match every character: every piece is a match, no gaps.
            _ if plain && !matches!(self.kind, Kind::Regex(_)) => self.scan(text, f),
            Kind::Regex(re) if plain => {
                // Isolated: matches and gaps alike are pieces (invert changes nothing).
                let mut covered = 0;
                for_each_match(re, &self.pattern, text, |start, end| {
                    if start > covered {
                        f(&text[covered..start]);
                    }
                    if end > start {
                        f(&text[start..end]);
                    }
                    covered = end;
                })?;
                if covered < text.len() {
                    f(&text[covered..]);
                }
            }
            _ => {
                for (start, end) in self.split_spans(text)? {
                    if end > start {
                        f(&text[start..end]);
                    }
                }
            }
        }
        Ok(())
    }

    fn scan<'t, F: FnMut(&'t str)>(&self, text: &'t str, f: F) {
        match &self.kind {
            Kind::Gpt2 => scan(text, f, gpt2_piece),
            Kind::Cl100k => scan(text, f, |t, s, p| cl100k_piece(t, s, p, false)),
            Kind::Cl100kClassic => scan(text, f, |t, s, p| cl100k_piece(t, s, p, true)),
            Kind::O200k => scan(text, f, o200k_piece),
            Kind::Regex(_) => unreachable!("scan is only called for the scanners"),
        }
    }

    /// Hugging Face's `Pattern::find_matches` then `NormalizedString::split`: the kept byte
    /// ranges (some may be empty), in order.
    fn split_spans(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        // (start, end, is_match), covering the whole text; empty text is one empty non-match.
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut spans: Vec<(usize, usize, bool)> = Vec::new();
        let mut covered = 0;
        let mut push = |start: usize, end: usize| {
            if start > covered {
                spans.push((covered, start, false));
            }
            spans.push((start, end, true));
            covered = end;
        };
        match &self.kind {
            Kind::Regex(re) => for_each_match(re, &self.pattern, text, &mut push)?,
            _ => {
                let base = text.as_ptr() as usize;
                self.scan(text, |piece: &str| {
                    let start = piece.as_ptr() as usize - base;
                    push(start, start + piece.len())
                })
            }
        }
        if covered < text.len() {
            spans.push((covered, text.len(), false));
        }
        if self.options.invert {
            for s in &mut spans {
                s.2 = !s.2;
            }
        }
        Ok(apply_behavior(&spans, self.options.behavior))
    }

    /// The pieces of `text`, collected (see [`PreTokenizer::split`]).
    pub fn pieces<'t>(&self, text: &'t str) -> Result<Vec<&'t str>> {
        let mut out = Vec::new();
        self.split(text, |p| out.push(p))?;
        Ok(out)
    }
}

/// `NormalizedString::split`'s behaviours on (start, end, is_match) spans: the kept ranges.
fn apply_behavior(spans: &[(usize, usize, bool)], behavior: SplitBehavior) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    match behavior {
        SplitBehavior::Isolated => out.extend(spans.iter().map(|&(s, e, _)| (s, e))),
        SplitBehavior::Removed => out.extend(
            spans
                .iter()
                .filter(|&&(_, _, m)| !m)
                .map(|&(s, e, _)| (s, e)),
        ),
        SplitBehavior::MergedWithPrevious => {
            let mut previous_match = false;
            for &(s, e, m) in spans {
                match out.last_mut() {
                    Some(last) if m && !previous_match => last.1 = e,
                    _ => out.push((s, e)),
                }
                previous_match = m;
            }
        }
        SplitBehavior::MergedWithNext => {
            let mut previous_match = false;
            for &(s, e, m) in spans.iter().rev() {
                match out.last_mut() {
                    Some(last) if m && !previous_match => last.0 = s,
                    _ => out.push((s, e)),
                }
                previous_match = m;
            }
            out.reverse();
        }
        SplitBehavior::Contiguous => {
            let mut previous_match = false;
            for &(s, e, m) in spans {
                match out.last_mut() {
                    Some(last) if m == previous_match => last.1 = e,
                    _ => out.push((s, e)),
                }
                previous_match = m;
            }
        }
    }
    out
}

/// Every match of `re` in `text` as (start, end), empty matches included.
fn for_each_match(
    re: &fancy_regex::Regex,
    pattern: &str,
    text: &str,
    mut f: impl FnMut(usize, usize),
) -> Result<()> {
    for m in re.find_iter(text) {
        let m = m.map_err(|e| Error::Regex {
            pattern: pattern.to_owned(),
            message: e.to_string(),
        })?;
        f(m.start(), m.end());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Character classes

/// `\p{L}`
const L: u8 = 1;
/// `\p{N}`
const N: u8 = 2;
/// `\s`
const S: u8 = 4;
/// o200k's "upper" class `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`
const U: u8 = 8;
/// o200k's "lower" class `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`
const W: u8 = 16;
/// Whitespace, letters and numbers: `[^\s\p{L}\p{N}]` is "none of these".
const LNS: u8 = L | N | S;

/// Size of the second-level blocks of the class table.
const BLOCK_BITS: u32 = 8;
/// Entries in the first level: enough for any value a 4-byte UTF-8 decode can produce (21 bits),
/// so indexing with a masked value needs no bounds check.
const TOP_LEN: usize = 1 << (21 - BLOCK_BITS);

struct Tables {
    ascii: [u8; 128],
    top: Box<[u16; TOP_LEN]>,
    blocks: Vec<u8>,
    /// Case-insensitive contraction letters: `s d m t` (one-letter), then `l`, `v`, `r`, `e`.
    fold: [Vec<char>; 8],
}

const FOLD_LETTERS: [char; 8] = ['s', 'd', 'm', 't', 'l', 'v', 'r', 'e'];

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(Tables::build)
}

fn parse_hir(pattern: &str) -> regex_syntax::hir::Hir {
    regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .unwrap_or_else(|e| panic!("regex-syntax rejected {pattern:?}: {e}"))
}

/// The code points of a class expression, as inclusive ranges, from regex-syntax's Unicode tables.
fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    match parse_hir(pattern).kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        HirKind::Literal(lit) => std::str::from_utf8(&lit.0)
            .expect("literal is UTF-8")
            .chars()
            .map(|c| (c as u32, c as u32))
            .collect(),
        other => panic!("{pattern:?} is not a class: {other:?}"),
    }
}

/// The class definitions behind the flag bits.
const CLASS_PATTERNS: [(u8, &str); 5] = [
    (L, r"\p{L}"),
    (N, r"\p{N}"),
    (S, r"\s"),
    (U, r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"),
    (W, r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"),
];

impl Tables {
    fn build() -> Tables {
        let mut flat = vec![0u8; 0x11_0000];
        for (bit, pattern) in CLASS_PATTERNS {
            for (lo, hi) in class_ranges(pattern) {
                for v in &mut flat[lo as usize..=hi as usize] {
                    *v |= bit;
                }
            }
        }
        let block = 1usize << BLOCK_BITS;
        let mut top = Box::new([0u16; TOP_LEN]);
        let mut blocks: Vec<u8> = Vec::new();
        let mut seen: std::collections::HashMap<&[u8], u16> = std::collections::HashMap::new();
        for (i, chunk) in flat.chunks(block).enumerate() {
            let id = *seen.entry(chunk).or_insert_with(|| {
                let id = (blocks.len() / block) as u16;
                blocks.extend_from_slice(chunk);
                id
            });
            top[i] = id;
        }
        // Code points past U+10FFFF never come out of a valid `str`; they map to block 0.
        let mut ascii = [0u8; 128];
        ascii.copy_from_slice(&flat[..128]);
        let fold = FOLD_LETTERS.map(|c| {
            class_ranges(&format!("(?i){c}"))
                .into_iter()
                .flat_map(|(lo, hi)| (lo..=hi).filter_map(char::from_u32))
                .collect()
        });
        Tables {
            ascii,
            top,
            blocks,
            fold,
        }
    }

    /// The class flags of the character starting at `b[i]` and its length in bytes. `i` must be a
    /// character boundary of a valid UTF-8 string with `i < b.len()`.
    #[inline(always)]
    fn class_at(&self, b: &[u8], i: usize) -> (u8, usize) {
        let b0 = b[i];
        if b0 < 0x80 {
            (self.ascii[b0 as usize], 1)
        } else {
            self.class_non_ascii(b, i, b0)
        }
    }

    #[inline(always)]
    fn class_non_ascii(&self, b: &[u8], i: usize, b0: u8) -> (u8, usize) {
        let (cp, len) = if b0 < 0xE0 {
            (((b0 as u32 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
        } else if b0 < 0xF0 {
            (
                ((b0 as u32 & 0x0F) << 12)
                    | ((b[i + 1] as u32 & 0x3F) << 6)
                    | (b[i + 2] as u32 & 0x3F),
                3,
            )
        } else {
            (
                ((b0 as u32 & 0x07) << 18)
                    | ((b[i + 1] as u32 & 0x3F) << 12)
                    | ((b[i + 2] as u32 & 0x3F) << 6)
                    | (b[i + 3] as u32 & 0x3F),
                4,
            )
        };
        (self.lookup(cp), len)
    }

    #[inline(always)]
    fn lookup(&self, cp: u32) -> u8 {
        let block = self.top[(cp >> BLOCK_BITS) as usize & (TOP_LEN - 1)] as usize;
        self.blocks[(block << BLOCK_BITS) | (cp as usize & ((1 << BLOCK_BITS) - 1))]
    }

    /// The end of the longest run from `i` of characters whose flags masked by `mask` equal `want`.
    /// ASCII is classified eight bytes at a time (see [`ascii_members`]).
    #[inline(always)]
    fn run(&self, b: &[u8], mut i: usize, mask: u8, want: u8) -> usize {
        loop {
            while let Some(chunk) = b.get(i..i + 8) {
                let w = u64::from_le_bytes(chunk.try_into().unwrap());
                let stop = !ascii_members(w, mask, want) & HIGH;
                if stop != 0 {
                    i += (stop.trailing_zeros() / 8) as usize;
                    break;
                }
                i += 8;
            }
            // A non-member, a non-ASCII character, or fewer than eight bytes left: one character at
            // a time until the next ASCII member with eight bytes after it.
            loop {
                let Some(&b0) = b.get(i) else { return i };
                if b0 < 0x80 {
                    if self.ascii[b0 as usize] & mask != want {
                        return i;
                    }
                    i += 1;
                    if i + 8 <= b.len() {
                        break;
                    }
                } else {
                    let (c, len) = self.class_non_ascii(b, i, b0);
                    if c & mask != want {
                        return i;
                    }
                    i += len;
                }
            }
        }
    }

    /// `\p{N}{1,3}` given a number at `i` of length `len`.
    #[inline(always)]
    fn numbers(&self, b: &[u8], i: usize, len: usize) -> usize {
        let mut e = i + len;
        for _ in 0..2 {
            if e >= b.len() {
                break;
            }
            let (c, l) = self.class_at(b, e);
            if c & N == 0 {
                break;
            }
            e += l;
        }
        e
    }

    /// `(?i:[sdmt]|ll|ve|re)` at `i` (after the apostrophe): the end of the match.
    #[cold]
    fn contraction_ci(&self, text: &str, i: usize) -> Option<usize> {
        let mut chars = text.get(i..)?.chars();
        let c = chars.next()?;
        let is = |k: usize, c: char| self.fold[k].contains(&c);
        if (0..4).any(|k| is(k, c)) {
            return Some(i + c.len_utf8());
        }
        let second = match () {
            _ if is(4, c) => 4,
            _ if is(5, c) || is(6, c) => 7,
            _ => return None,
        };
        let c2 = chars.next()?;
        is(second, c2).then(|| i + c.len_utf8() + c2.len_utf8())
    }
}

const HIGH: u64 = 0x8080_8080_8080_8080;
const ONES: u64 = 0x0101_0101_0101_0101;

/// The high bit of each byte of `w` that is in `lo..=hi`, for bytes below 0x80. A byte of 0x80 or
/// more may give wrong bits in the bytes after it (a carry), never in the bytes before it.
#[inline(always)]
const fn in_range(w: u64, lo: u8, hi: u8) -> u64 {
    let at_least_lo = w.wrapping_add(ONES * (0x80 - lo) as u64);
    let above_hi = w.wrapping_add(ONES * (0x7f - hi) as u64);
    at_least_lo & !above_hi & HIGH
}

/// The high bit of each of the eight bytes of `w` (little-endian: the first byte is the lowest)
/// that is an ASCII character of the run class `(mask, want)` of [`Tables::run`]; the lowest byte
/// without it is the first non-member or non-ASCII byte. For the ASCII characters these equal
/// regex-syntax's classes (`ascii_members_match_the_table` checks every byte); a class not listed
/// here has no members, so [`Tables::run`] takes its character-by-character path.
#[inline(always)]
const fn ascii_members(w: u64, mask: u8, want: u8) -> u64 {
    let ascii = !w & HIGH;
    let members = match (mask, want) {
        (L, L) => in_range(w | (ONES * 0x20), b'a', b'z'),
        (N, N) => in_range(w, b'0', b'9'),
        (W, W) => in_range(w, b'a', b'z'),
        (U, U) => in_range(w, b'A', b'Z'),
        (S, S) => in_range(w, b'\t', b'\r') | in_range(w, b' ', b' '),
        (LNS, 0) => {
            !(in_range(w | (ONES * 0x20), b'a', b'z')
                | in_range(w, b'0', b'9')
                | in_range(w, b'\t', b'\r')
                | in_range(w, b' ', b' '))
        }
        _ => 0,
    };
    members & ascii
}

/// `'(?:[sdmt]|ll|ve|re)` (case-sensitive) at `i` (after the apostrophe): the end of the match.
#[inline]
fn contraction_cs(b: &[u8], i: usize) -> Option<usize> {
    match (b.get(i), b.get(i + 1)) {
        (Some(b's' | b'd' | b'm' | b't'), _) => Some(i + 1),
        (Some(b'l'), Some(b'l')) | (Some(b'v' | b'r'), Some(b'e')) => Some(i + 2),
        _ => None,
    }
}

/// Longest run of `\r` / `\n` (and `/` when `slash`) from `i`.
#[inline(always)]
fn newline_tail(b: &[u8], mut i: usize, slash: bool) -> usize {
    while i < b.len() && (b[i] == b'\r' || b[i] == b'\n' || (slash && b[i] == b'/')) {
        i += 1;
    }
    i
}

/// A whitespace run starting at `i` (which holds whitespace).
struct WsRun {
    /// End of the longest run.
    end: usize,
    /// Start of the run's last character.
    last: usize,
    /// End of the run's last `\r` / `\n`, 0 if it has none.
    newline_end: usize,
}

#[inline(always)]
fn ws_run(t: &Tables, b: &[u8], mut i: usize) -> WsRun {
    let mut run = WsRun {
        end: i,
        last: i,
        newline_end: 0,
    };
    while i < b.len() {
        let b0 = b[i];
        let len = if b0 < 0x80 {
            if t.ascii[b0 as usize] & S == 0 {
                break;
            }
            if b0 == b'\n' || b0 == b'\r' {
                run.newline_end = i + 1;
            }
            1
        } else {
            let (c, len) = t.class_non_ascii(b, i, b0);
            if c & S == 0 {
                break;
            }
            len
        };
        run.last = i;
        i += len;
    }
    run.end = i;
    run
}

/// `\s+(?!\S)|\s` (with `\s++$` folded in, as it changes nothing after it): a run reaching the end
/// of the text is one piece; before a non-space, a run of two or more characters leaves its last
/// character to the next piece; a single character is a piece.
#[inline(always)]
fn ws_tail(run: &WsRun, start: usize, n: usize) -> usize {
    if run.end == n || run.last == start {
        run.end
    } else {
        run.last
    }
}

/// Runs `piece` from the start of `text` to its end. Each piece function returns the end of the
/// piece that starts at `pos` (always `> pos`).
#[inline(always)]
fn scan<'t, F: FnMut(&'t str)>(
    text: &'t str,
    mut f: F,
    piece: impl Fn(&Tables, &str, usize) -> usize,
) {
    if text.is_empty() {
        return;
    }
    let t = tables();
    let mut pos = 0;
    while pos < text.len() {
        let end = piece(t, text, pos);
        debug_assert!(end > pos && text.is_char_boundary(end));
        f(&text[pos..end]);
        pos = end;
    }
}

// ---------------------------------------------------------------------------------------------
// The scanners

/// `'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s`
#[inline(always)]
fn gpt2_piece(t: &Tables, text: &str, pos: usize) -> usize {
    let b = text.as_bytes();
    let b0 = b[pos];
    let (mut c, mut len) = t.class_at(b, pos);
    let mut s = pos;
    if b0 == b' ' {
        if pos + 1 < b.len() {
            let (c1, l1) = t.class_at(b, pos + 1);
            if c1 & S == 0 {
                (c, len, s) = (c1, l1, pos + 1);
            }
        }
    } else if b0 == b'\'' {
        if let Some(e) = contraction_cs(b, pos + 1) {
            return e;
        }
    }
    if c & L != 0 {
        t.run(b, s + len, L, L)
    } else if c & N != 0 {
        t.run(b, s + len, N, N)
    } else if c & S == 0 {
        t.run(b, s + len, LNS, 0)
    } else {
        ws_tail(&ws_run(t, b, pos), pos, b.len())
    }
}

/// `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s`,
/// or without `\s++$` when `classic`.
#[inline(always)]
fn cl100k_piece(t: &Tables, text: &str, pos: usize, classic: bool) -> usize {
    let b = text.as_bytes();
    let n = b.len();
    let b0 = b[pos];
    let (c, len) = t.class_at(b, pos);
    if c & L != 0 {
        return t.run(b, pos + len, L, L);
    }
    if c & N != 0 {
        return t.numbers(b, pos, len);
    }
    if b0 == b'\'' {
        if let Some(e) = t.contraction_ci(text, pos + 1) {
            return e;
        }
    }
    let next = pos + len;
    if next < n {
        let (c1, l1) = t.class_at(b, next);
        // `[^\r\n\p{L}\p{N}]\p{L}++` (the character at `pos` is neither a letter nor a number).
        if c1 & L != 0 && b0 != b'\r' && b0 != b'\n' {
            return t.run(b, next + l1, L, L);
        }
        if b0 == b' ' && c1 & LNS == 0 {
            return newline_tail(b, t.run(b, next + l1, LNS, 0), false);
        }
    }
    if c & S == 0 {
        return newline_tail(b, t.run(b, next, LNS, 0), false);
    }
    let run = ws_run(t, b, pos);
    if run.end == n && !classic {
        n
    } else if run.newline_end != 0 {
        run.newline_end
    } else {
        ws_tail(&run, pos, n)
    }
}

/// o200k's two letter alternatives after the optional prefix, from `s`: first
/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+` (with the backtracking of the
/// greedy star), then `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*`. `Ok(end)` when
/// the first matches; otherwise `Err(end)` of the second, which matched only if `end > s`.
#[inline(always)]
fn o200k_letters(t: &Tables, b: &[u8], s: usize) -> std::result::Result<usize, usize> {
    let mut i = s;
    let mut last_lower_end = None;
    while i < b.len() {
        let (c, len) = t.class_at(b, i);
        if c & U == 0 {
            if c & W != 0 {
                return Ok(t.run(b, i + len, W, W));
            }
            break;
        }
        if c & W != 0 {
            last_lower_end = Some(i + len);
        }
        i += len;
    }
    // The star gives back characters until one of them can be the `+` class; that one alone then
    // matches it (the characters after it are not in the class). Failing that, the second
    // alternative's `+` is the whole upper-class run, and its star matches nothing: the character
    // after the run is in neither class.
    last_lower_end.ok_or(i)
}

/// The O200K_PATTERN alternatives in order (see the constant).
#[inline(always)]
fn o200k_piece(t: &Tables, text: &str, pos: usize) -> usize {
    let b = text.as_bytes();
    let n = b.len();
    let b0 = b[pos];
    let (c, len) = t.class_at(b, pos);
    let letters = if c & N != 0 {
        return t.numbers(b, pos, len);
    } else if c & L != 0 {
        // No prefix possible; a letter is in one of the two classes, so one alternative matches.
        let (Ok(e) | Err(e)) = o200k_letters(t, b, pos);
        Some(e)
    } else if b0 != b'\r' && b0 != b'\n' {
        // `[^\r\n\p{L}\p{N}]?` matches. Tried in order: the first alternative with the prefix, then
        // without it (only a combining mark, in both classes, can start it), then the second
        // alternative with and without the prefix.
        let s = pos + len;
        match o200k_letters(t, b, s) {
            Ok(e) => Some(e),
            Err(second) => {
                let without = (c & U != 0).then(|| o200k_letters(t, b, pos));
                match without {
                    Some(Ok(e)) => Some(e),
                    _ if second > s => Some(second),
                    Some(Err(e)) if e > pos => Some(e),
                    _ => None,
                }
            }
        }
    } else {
        None
    };
    if let Some(e) = letters {
        if e < n && b[e] == b'\'' {
            if let Some(e2) = t.contraction_ci(text, e + 1) {
                return e2;
            }
        }
        return e;
    }
    let next = pos + len;
    if b0 == b' ' && next < n {
        let (c1, l1) = t.class_at(b, next);
        if c1 & LNS == 0 {
            return newline_tail(b, t.run(b, next + l1, LNS, 0), true);
        }
    }
    if c & S == 0 {
        return newline_tail(b, t.run(b, next, LNS, 0), true);
    }
    let run = ws_run(t, b, pos);
    if run.newline_end != 0 {
        run.newline_end
    } else {
        ws_tail(&run, pos, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every spelling that gets a fast scanner, with the scanner's name.
    const FAST: [(&str, &str); 6] = [
        (GPT2_PATTERN, "gpt2"),
        (GPT2_CLASSIC_PATTERN, "gpt2"),
        (CL100K_PATTERN, "cl100k"),
        (CL100K_HF_PATTERN, "cl100k"),
        (CL100K_CLASSIC_PATTERN, "cl100k_classic"),
        (O200K_PATTERN, "o200k"),
    ];

    struct Pair {
        fast: PreTokenizer,
        regex: fancy_regex::Regex,
    }

    fn pairs() -> &'static [Pair] {
        static PAIRS: OnceLock<Vec<Pair>> = OnceLock::new();
        PAIRS.get_or_init(|| {
            FAST.iter()
                .map(|&(pattern, name)| {
                    let fast = PreTokenizer::new(pattern).unwrap();
                    assert_eq!(fast.name(), Some(name));
                    assert_eq!(fast.pattern(), pattern);
                    Pair {
                        fast,
                        regex: fancy_regex::Regex::new(pattern).unwrap(),
                    }
                })
                .collect()
        })
    }

    fn regex_pieces<'t>(re: &fancy_regex::Regex, text: &'t str) -> Vec<&'t str> {
        re.find_iter(text).map(|m| m.unwrap().as_str()).collect()
    }

    /// Fast scanner == fancy-regex on `text`, for every fast spelling.
    fn check(text: &str) -> std::result::Result<(), String> {
        for pair in pairs() {
            let fast = pair.fast.pieces(text).unwrap();
            let want = regex_pieces(&pair.regex, text);
            if fast != want {
                return Err(format!(
                    "{}: text {text:?}\n  scanner {fast:?}\n  regex   {want:?}\n  pattern {}",
                    pair.fast.name().unwrap(),
                    pair.fast.pattern()
                ));
            }
            if fast.concat() != text {
                return Err(format!("pieces of {text:?} do not cover it: {fast:?}"));
            }
        }
        Ok(())
    }

    /// Pieces biased to the characters and sequences where the patterns are subtle.
    const ATOMS: &[&str] = &[
        // letters: ASCII both cases, Ll / Lu / Lt / Lm / Lo, titlecase digraphs
        "a",
        "b",
        "e",
        "h",
        "o",
        "x",
        "z",
        "A",
        "B",
        "E",
        "H",
        "X",
        "Z",
        "é",
        "É",
        "ß",
        "σ",
        "Σ",
        "ǅ",
        "ǈ",
        "ʰ",
        "ˆ",
        "ー",
        "中",
        "文",
        "あ",
        "ア",
        "ก",
        "ا",
        "ᾈ",
        "ﬁ",
        "ǲ",
        // contractions and their letters, including the case folds
        "'",
        "'",
        "'",
        "'s",
        "'t",
        "'re",
        "'ve",
        "'m",
        "'ll",
        "'d",
        "'S",
        "'T",
        "'RE",
        "'Ve",
        "'M",
        "'LL",
        "'lL",
        "'D",
        "'ſ",
        "'r",
        "'v",
        "'l",
        "s",
        "t",
        "r",
        "e",
        "v",
        "m",
        "l",
        "d",
        "S",
        "T",
        "ſ",
        "D",
        "L",
        "R",
        "E",
        "V",
        "M",
        "K",
        "\u{212a}",
        "’",
        // numbers: ASCII digits, No, Nd, Nl
        "0",
        "1",
        "7",
        "9",
        "42",
        "²",
        "٣",
        "Ⅻ",
        "①",
        "½",
        "𝟘",
        "〇",
        // whitespace, runs and line breaks
        " ",
        " ",
        " ",
        "  ",
        "   ",
        "\t",
        "\n",
        "\n",
        "\r",
        "\r\n",
        "\n\n",
        "\x0b",
        "\x0c",
        "\u{a0}",
        "\u{85}",
        "\u{1680}",
        "\u{2000}",
        "\u{200a}",
        "\u{2028}",
        "\u{2029}",
        "\u{202f}",
        "\u{205f}",
        "\u{3000}",
        " \n ",
        " \n",
        "\n ",
        " \r\n",
        // others
        "/",
        "/",
        "//",
        ".",
        ",",
        "!",
        "?",
        "-",
        "\"",
        "(",
        ")",
        "$",
        "%",
        "_",
        "`",
        "@",
        "#",
        "...",
        "€",
        "→",
        "©",
        "\u{0}",
        "\u{7f}",
        "\u{feff}",
        "\u{200b}",
        "\u{200d}",
        "\u{e000}",
        // combining marks (Mn, Mc, Me), variation selector, emoji
        "\u{301}",
        "\u{308}",
        "\u{20dd}",
        "\u{903}",
        "\u{fe0f}",
        "\u{1f3fb}",
        "😀",
        "👍",
        "🇺🇸",
        "\u{10ffff}",
    ];

    fn atom() -> impl Strategy<Value = String> {
        prop_oneof![
            12 => proptest::sample::select(ATOMS).prop_map(String::from),
            2 => proptest::char::range('\u{0}', '\u{7f}').prop_map(String::from),
            1 => any::<char>().prop_map(String::from),
        ]
    }

    fn text(max_atoms: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(atom(), 0..max_atoms).prop_map(|v| v.concat())
    }

    /// `PROPTEST_CASES` overrides the default case counts (for long release-mode runs).
    fn cases(default: u32) -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(8000), ..ProptestConfig::default() })]
        #[test]
        fn scanners_match_regex_short(t in text(12)) {
            check(&t).map_err(TestCaseError::fail)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(800), ..ProptestConfig::default() })]
        #[test]
        fn scanners_match_regex_long(t in text(200)) {
            check(&t).map_err(TestCaseError::fail)?;
        }

        #[test]
        fn scanners_match_regex_arbitrary(t in any::<String>()) {
            check(&t).map_err(TestCaseError::fail)?;
        }
    }

    /// A small deterministic generator (xorshift64*), so the loop below needs no proptest.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Seeded strings over the biased alphabet; `PRETOKENIZE_FUZZ_CASES` raises the count (e.g. in a
    /// release-mode run: `PRETOKENIZE_FUZZ_CASES=1000000 cargo test --release seeded`).
    #[test]
    fn scanners_match_regex_seeded() {
        let cases: usize = std::env::var("PRETOKENIZE_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut text = String::new();
        for _ in 0..cases {
            text.clear();
            let max = if rng.below(8) == 0 { 60 } else { 10 };
            let len = 1 + rng.below(max);
            for _ in 0..len {
                if rng.below(16) == 0 {
                    let c = char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{fffd}');
                    text.push(c);
                } else {
                    text.push_str(ATOMS[rng.below(ATOMS.len())]);
                }
            }
            if let Err(e) = check(&text) {
                panic!("{e}");
            }
        }
    }

    /// All texts of up to `len` characters over `alphabet`.
    fn check_all(alphabet: &[&str], len: usize) {
        let mut texts = vec![String::new()];
        for _ in 0..len {
            let mut longer = Vec::new();
            for t in &texts {
                check(t).unwrap();
                for a in alphabet {
                    longer.push(format!("{t}{a}"));
                }
            }
            texts = longer;
        }
        for t in &texts {
            check(t).unwrap();
        }
    }

    /// Every text of up to three characters over an alphabet with one character of each kind the
    /// patterns tell apart, and of up to four over a smaller one.
    #[test]
    fn scanners_match_regex_exhaustive_short() {
        check_all(
            &[
                "a", "A", "ǅ", "ʰ", "中", "s", "ſ", "'", "1", "²", " ", "\t", "\n", "\r", "\u{a0}",
                "/", ".", "\u{301}", "😀",
            ],
            3,
        );
        check_all(
            &[
                "a", "A", "ʰ", "'", "s", "1", " ", "\n", "\r", "\u{a0}", "/", "\u{301}",
            ],
            4,
        );
    }

    #[test]
    fn tricky_cases_match_regex() {
        let cases = [
            "",
            " ",
            "   ",
            "\n",
            "\r\n",
            " \n ",
            "a \n ",
            "a \n \n b",
            "x\u{2028} y",
            "hello world",
            "Hello,  world!\n\nIt's   fine.  ",
            "don't DON'T we'll WE'LL they're THEY'RE i've I'VE i'm I'M he'd HE'D it'ſ",
            "'s's 's ''s \"'s",
            "12345 1234567 ²³¹ ٣٣٣٣ ⅫⅫⅫⅫ",
            "HTTPServer parseHTTPResponse ABCdef ǅungla ʰʰʰa 中文Abc",
            "a/b//c\n/\n//x ,/\r\n/ ",
            "e\u{301}te\u{301} \u{301}\u{301}'s \u{301}A",
            "\u{a0}word\u{3000}word\u{85}word \u{85}\n\u{85}",
            "  \t\n\r\n  x   ",
            "😀👍 🇺🇸x",
        ];
        for t in cases {
            check(t).unwrap();
        }
    }

    #[test]
    fn known_splits() {
        let gpt2 = PreTokenizer::new("gpt2").unwrap();
        let cl = PreTokenizer::new("cl100k_base").unwrap();
        let classic = PreTokenizer::new(CL100K_CLASSIC_PATTERN).unwrap();
        let o200k = PreTokenizer::new("o200k_base").unwrap();
        assert_eq!(
            gpt2.pieces("Hello  world's 12345").unwrap(),
            ["Hello", " ", " world", "'s", " 12345"]
        );
        assert_eq!(gpt2.pieces("IT'S").unwrap(), ["IT", "'", "S"]);
        assert_eq!(cl.pieces("IT'S it'ſ").unwrap(), ["IT", "'S", " it", "'ſ"]);
        assert_eq!(cl.pieces("12345").unwrap(), ["123", "45"]);
        assert_eq!(cl.pieces("a \n ").unwrap(), ["a", " \n "]);
        assert_eq!(classic.pieces("a \n ").unwrap(), ["a", " \n", " "]);
        assert_eq!(cl.pieces("a \n\n b").unwrap(), ["a", " \n\n", " b"]);
        assert_eq!(
            o200k.pieces("HTTPServer isn't OK's").unwrap(),
            ["HTTPServer", " isn't", " OK's"]
        );
        assert_eq!(o200k.pieces("a//\n/b").unwrap(), ["a", "//\n/", "b"]);
        assert_eq!(o200k.pieces("x \n ").unwrap(), ["x", " \n", " "]);
    }

    #[test]
    fn names_and_patterns() {
        for (name, want, pattern) in [
            ("gpt2", "gpt2", GPT2_PATTERN),
            ("r50k_base", "gpt2", GPT2_PATTERN),
            ("p50k_base", "gpt2", GPT2_PATTERN),
            ("cl100k", "cl100k", CL100K_PATTERN),
            ("cl100k_base", "cl100k", CL100K_PATTERN),
            ("cl100k_classic", "cl100k_classic", CL100K_CLASSIC_PATTERN),
            ("o200k", "o200k", O200K_PATTERN),
            ("o200k_base", "o200k", O200K_PATTERN),
        ] {
            let p = PreTokenizer::new(name).unwrap();
            assert_eq!(p.name(), Some(want));
            assert_eq!(p.pattern(), pattern);
        }
        let custom = PreTokenizer::new(r"\w+").unwrap();
        assert_eq!(custom.name(), None);
        assert_eq!(custom.pattern(), r"\w+");
        // The general engine on a known pattern, and the fast scanner, agree.
        let slow = PreTokenizer::with_regex(O200K_PATTERN).unwrap();
        assert_eq!(slow.name(), None);
        let text = "Don't panic: 42 HTTPServers/\n";
        assert_eq!(
            slow.pieces(text).unwrap(),
            PreTokenizer::new("o200k").unwrap().pieces(text).unwrap()
        );
        fn assert_traits<T: Send + Sync + Clone + std::fmt::Debug>() {}
        assert_traits::<PreTokenizer>();
        assert!(format!("{custom:?}").contains(r"\w+"));
    }

    #[test]
    fn custom_regex_semantics() {
        // Isolated (the default): the text between matches is a piece too; nothing is dropped.
        let p = PreTokenizer::new(r"\d+").unwrap();
        assert_eq!(p.pieces("a12b345c").unwrap(), ["a", "12", "b", "345", "c"]);
        // Empty matches are not passed on.
        let p = PreTokenizer::new(r"\d*").unwrap();
        assert_eq!(p.pieces("a12b").unwrap(), ["a", "12", "b"]);
    }

    fn with(pattern: &str, behavior: SplitBehavior, invert: bool, literal: bool) -> PreTokenizer {
        let options = SplitOptions {
            behavior,
            invert,
            literal,
        };
        PreTokenizer::from_pattern(pattern, options).unwrap()
    }

    /// The pieces Hugging Face's `Split` gives (checked by hand against `tokenizers`).
    #[test]
    fn split_behaviours() {
        use SplitBehavior::*;
        let text = "hello world, this";
        let cases: [(SplitBehavior, bool, &[&str]); 10] = [
            (Removed, false, &["hello", "world,", "this"]),
            (Isolated, false, &["hello", " ", "world,", " ", "this"]),
            (MergedWithPrevious, false, &["hello ", "world, ", "this"]),
            (MergedWithNext, false, &["hello", " world,", " this"]),
            (Contiguous, false, &["hello", " ", "world,", " ", "this"]),
            (Removed, true, &[" ", " "]),
            (Isolated, true, &["hello", " ", "world,", " ", "this"]),
            (MergedWithPrevious, true, &["hello", " world,", " this"]),
            (MergedWithNext, true, &["hello ", "world, ", "this"]),
            (Contiguous, true, &["hello", " ", "world,", " ", "this"]),
        ];
        for (behavior, invert, want) in cases {
            let p = with(" ", behavior, invert, true);
            assert_eq!(
                p.pieces(text).unwrap(),
                want,
                "{behavior:?} invert={invert}"
            );
            assert_eq!(p.is_lossless(), behavior != Removed);
        }
        // Contiguous joins runs of matches: "  " is one piece.
        let p = with(" ", Contiguous, false, true);
        assert_eq!(p.pieces("a  b").unwrap(), ["a", "  ", "b"]);
        // A literal is not a regex.
        let p = with(".", Removed, false, true);
        assert_eq!(p.pieces("a.b c").unwrap(), ["a", "b c"]);
        assert!(p.pieces("").unwrap().is_empty());
        // A known pattern with another behaviour goes through the same rules.
        let p = with(GPT2_PATTERN, Removed, false, false);
        assert!(p.pieces("a b").unwrap().is_empty());
        let p = with(GPT2_PATTERN, Removed, true, false);
        assert_eq!(p.pieces("a b").unwrap(), ["a", " b"]);
    }

    #[test]
    fn pattern_names_resolve_in_one_place() {
        for (name, pattern) in PATTERN_NAMES {
            assert_eq!(resolve_pattern(name).unwrap(), *pattern);
            assert_eq!(PreTokenizer::new(name).unwrap().pattern(), *pattern);
        }
        assert_eq!(PreTokenizer::new("p50k_edit").unwrap().name(), Some("gpt2"));
        for typo in ["p50k_typo", "cl100k-base", "gpt3"] {
            let e = resolve_pattern(typo).unwrap_err().to_string();
            assert!(
                e.contains("unknown pattern name") && e.contains("cl100k_classic"),
                "{e}"
            );
        }
        assert_eq!(resolve_pattern(r"\w+").unwrap(), r"\w+");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(256)))]
        /// Every behaviour but Removed keeps all text: the pieces concatenate back to it.
        #[test]
        fn keeping_behaviours_concatenate_to_the_text(
            t in prop_oneof![text(20), "[ a-c,.]{0,30}".prop_map(String::from)],
            which in 0usize..6,
            b in 0usize..5,
            invert in any::<bool>(),
        ) {
            let (pattern, literal) = [
                (" ", true), (",", true), (r"[a-z]+", false), (r"\s+", false), ("gpt2", false),
                (r"\d*", false),
            ][which];
            let pattern = if pattern == "gpt2" { GPT2_PATTERN } else { pattern };
            let behavior = SplitBehavior::ALL[b];
            let p = with(pattern, behavior, invert, literal);
            let pieces = p.pieces(&t).unwrap();
            prop_assert!(pieces.iter().all(|piece| !piece.is_empty()));
            if behavior != SplitBehavior::Removed {
                prop_assert_eq!(pieces.concat(), t);
            }
        }
    }

    #[test]
    fn bad_patterns() {
        assert!(matches!(PreTokenizer::new(""), Err(Error::Invalid(_))));
        assert!(matches!(
            PreTokenizer::with_regex(""),
            Err(Error::Invalid(_))
        ));
        match PreTokenizer::new("(unclosed") {
            Err(Error::Invalid(m)) => assert!(m.contains("(unclosed"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn regex_runtime_failure_is_an_error() {
        // Catastrophic backtracking runs into fancy-regex's backtracking limit.
        let p = PreTokenizer::new(r"(a+)+(?=b)c").unwrap();
        let text = "a".repeat(64);
        match p.split(&text, |_| {}) {
            Err(Error::Regex { pattern, .. }) => assert_eq!(pattern, r"(a+)+(?=b)c"),
            other => panic!("{other:?}"),
        }
    }

    /// The eight-bytes-at-a-time ASCII classification equals the table, for every byte at every
    /// position, after any bytes.
    #[test]
    fn ascii_members_match_the_table() {
        let t = tables();
        for (mask, want) in [(L, L), (N, N), (W, W), (U, U), (S, S), (LNS, 0), (U | W, U)] {
            for byte in 0..=255u8 {
                for at in 0..8 {
                    for fill in [b'a', b'A', b' ', b'0', b'.', 0x80, 0xff] {
                        let mut bytes = [fill; 8];
                        bytes[at] = byte;
                        let bits = ascii_members(u64::from_le_bytes(bytes), mask, want);
                        let got = bits >> (8 * at + 7) & 1 == 1;
                        let prefix_ok = bytes[..at].iter().all(|&x| x < 0x80);
                        if prefix_ok {
                            let want_bit = byte < 0x80
                                && t.ascii[byte as usize] & mask == want
                                && matches!(
                                    (mask, want),
                                    (L, L) | (N, N) | (W, W) | (U, U) | (S, S) | (LNS, 0)
                                );
                            assert_eq!(
                                got, want_bit,
                                "byte {byte:#x} at {at} after {fill:#x} class {mask}/{want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The two-level table holds exactly regex-syntax's classes, for every code point.
    #[test]
    fn tables_match_regex_syntax() {
        let t = tables();
        let classes: Vec<(u8, Vec<(u32, u32)>)> = CLASS_PATTERNS
            .iter()
            .map(|&(bit, p)| (bit, class_ranges(p)))
            .collect();
        let mut buf = [0u8; 4];
        for c in (0..=0x10_ffffu32).filter_map(char::from_u32) {
            let cp = c as u32;
            let mut want = 0;
            for (bit, ranges) in &classes {
                let i = ranges.partition_point(|&(_, hi)| hi < cp);
                if i < ranges.len() && ranges[i].0 <= cp {
                    want |= bit;
                }
            }
            let s = c.encode_utf8(&mut buf);
            assert_eq!(t.class_at(s.as_bytes(), 0), (want, s.len()), "{c:?}");
        }
        assert!(t.fold[0].contains(&'ſ') && t.fold[0].contains(&'S'));
        assert_eq!(t.fold[7], ['E', 'e']);
    }

    /// Spot checks of the flag bits against fancy-regex itself, over the BMP's first planes.
    #[test]
    fn tables_match_fancy_regex() {
        let t = tables();
        let res: Vec<(u8, fancy_regex::Regex)> = CLASS_PATTERNS
            .iter()
            .map(|&(bit, p)| (bit, fancy_regex::Regex::new(&format!("^{p}$")).unwrap()))
            .collect();
        let mut buf = [0u8; 4];
        for cp in (0..0x3100u32).chain((0x3100..0x11_0000).step_by(97)) {
            let Some(c) = char::from_u32(cp) else {
                continue;
            };
            let s = c.encode_utf8(&mut buf);
            let (flags, _) = t.class_at(s.as_bytes(), 0);
            for (bit, re) in &res {
                assert_eq!(flags & bit != 0, re.is_match(s).unwrap(), "{c:?} bit {bit}");
            }
        }
    }
}
