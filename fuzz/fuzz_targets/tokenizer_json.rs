#![no_main]
//! tokenizer.json (Hugging Face): `formats::parse_hf_json`, then the tokenizer it describes.
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parts) = ferrolm::tokenizer::formats::parse_hf_json(text, "fuzz/tokenizer.json") {
        common::exercise(parts);
    }
});
