#![no_main]
//! vocab.json + merges.txt (also GPT-2's encoder.json + vocab.bpe, the same format):
//! `formats::load_vocab_merges`, which reads files, so the input (split at its first NUL byte into
//! the two files) is written to a per-process directory in /dev/shm first.
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

#[path = "common.rs"]
mod common;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("ferrolm-fuzz-vm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (vocab, merges) = (&data[..split], data.get(split + 1..).unwrap_or(&[]));
    let (vocab_path, merges_path) = (dir().join("vocab.json"), dir().join("merges.txt"));
    std::fs::write(&vocab_path, vocab).unwrap();
    std::fs::write(&merges_path, merges).unwrap();
    let pattern = Some("gpt2");
    if let Ok(parts) =
        ferrolm::tokenizer::formats::load_vocab_merges(&vocab_path, &merges_path, pattern)
    {
        common::exercise(parts);
    }
});
