//! TEMPORARY regex-only pre-tokenizer (replaced by the fast scanners).
use crate::error::{Error, Result};
use std::sync::Arc;

pub const GPT2_PATTERN: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
pub const O200K_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, Clone)]
pub struct PreTokenizer {
    pattern: String,
    regex: Arc<fancy_regex::Regex>,
}

impl PreTokenizer {
    pub fn new(name_or_pattern: &str) -> Result<Self> {
        let p = match name_or_pattern {
            "gpt2" | "r50k_base" | "p50k_base" => GPT2_PATTERN,
            "cl100k" | "cl100k_base" => CL100K_PATTERN,
            "o200k" | "o200k_base" => O200K_PATTERN,
            o => o,
        };
        Self::with_regex(p)
    }
    pub fn with_regex(pattern: &str) -> Result<Self> {
        if pattern.is_empty() {
            return Err(Error::invalid("empty pattern"));
        }
        let regex = fancy_regex::Regex::new(pattern)
            .map_err(|e| Error::invalid(format!("invalid pattern {pattern:?}: {e}")))?;
        Ok(PreTokenizer {
            pattern: pattern.to_string(),
            regex: Arc::new(regex),
        })
    }
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
    pub fn name(&self) -> Option<&'static str> {
        None
    }
    pub fn split<'t, F: FnMut(&'t str)>(&self, text: &'t str, mut f: F) -> Result<()> {
        for m in self.regex.find_iter(text) {
            let m = m.map_err(|e| Error::Regex {
                pattern: self.pattern.clone(),
                message: e.to_string(),
            })?;
            f(m.as_str());
        }
        Ok(())
    }
}
