#![no_main]
//! A tiktoken rank file (`base64 rank` lines): `formats::parse_tiktoken`, then a tokenizer.
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(tokens) = ferrolm::tokenizer::formats::parse_tiktoken(text, "fuzz.tiktoken") {
        common::exercise(ferrolm::TokenizerParts {
            tokens,
            merge_rule: ferrolm::MergeRule::Ranks,
            specials: Vec::new(),
            pattern: ferrolm::tokenizer::pretokenize::GPT2_PATTERN.to_string(),
            split: Default::default(),
            whole_piece_first: true,
            add_prefix_space: false,
        });
    }
});
