//! ferrolm's Rust core: a byte-level BPE tokenizer (and, as the project grows, corpus sharding and
//! packed-batch loading). Pure Rust: nothing here knows about Python; `py/` (behind the `python`
//! feature) is the only bindings layer.
//!
//! Design notes
//! - Encoding is pre-tokenize -> per-piece byte-pair merge. Pre-tokenization uses hand-written
//!   scanners for the GPT-2 / cl100k / o200k patterns (proven equal to the regex by a differential
//!   fuzzer) and fancy-regex for any other pattern: the regex is ~90% of tiktoken's time.
//! - Both merge semantics (tiktoken ranks, Hugging Face merge lists) compile to one integer-keyed
//!   pair table, so there is one merge loop (see `tokenizer::encode`).
//! - One thread pool (`pool`), fork-safe, sized at run time.

pub mod corpus;
pub mod error;
pub mod files;
pub mod loader;
pub mod pool;
pub mod shard;
pub mod tokenizer;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
pub use tokenizer::{MergeRule, SpecialPolicy, Tokenizer, TokenizerParts};
