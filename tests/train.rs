//! The trainer's public Rust API end to end: files in every supported format give the same
//! vocabulary as the same texts fed directly.

use ferrolm::corpus::ReadOptions;
use ferrolm::tokenizer::train::{never_stop, train_from_files, train_from_texts, TrainOptions};
use ferrolm::{MergeRule, Tokenizer};
use std::io::Write;

#[test]
fn files_in_every_format_train_like_the_same_texts() {
    let dir = std::env::temp_dir().join(format!("ferrolm-train-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let docs: Vec<String> = (0..500)
        .map(|i| {
            format!(
                "doc {i}: the quick brown fox {} jumps\nover é {}",
                i % 7,
                i % 31
            )
        })
        .collect();

    let mut jsonl = String::new();
    for d in &docs {
        jsonl.push_str(&serde_json::json!({ "text": d, "n": 1 }).to_string());
        jsonl.push('\n');
    }
    std::fs::write(dir.join("a.jsonl"), &jsonl).unwrap();
    let mut z = zstd::stream::write::Encoder::new(
        std::fs::File::create(dir.join("b.jsonl.zst")).unwrap(),
        3,
    )
    .unwrap();
    z.write_all(jsonl.as_bytes()).unwrap();
    z.finish().unwrap();
    // As a text file every line is a sequence, so give each document one line.
    let lines: Vec<String> = docs.iter().map(|d| d.replace('\n', " ") + "\n").collect();
    std::fs::write(dir.join("c.txt"), lines.concat()).unwrap();

    let options = TrainOptions {
        vocab_size: 400,
        num_threads: Some(2),
        ..TrainOptions::default()
    };
    let read = ReadOptions::default();
    let expected = train_from_texts(&docs, &options, &never_stop).unwrap();
    for name in ["a.jsonl", "b.jsonl.zst"] {
        let got = train_from_files(&[dir.join(name)], &read, &options, &never_stop).unwrap();
        assert_eq!(got.parts.tokens, expected.parts.tokens, "{name}");
        assert_eq!(got.parts.merge_rule, expected.parts.merge_rule, "{name}");
    }
    let from_lines = train_from_texts(&lines, &options, &never_stop).unwrap();
    let from_txt = train_from_files(&[dir.join("c.txt")], &read, &options, &never_stop).unwrap();
    assert_eq!(from_txt.parts.merge_rule, from_lines.parts.merge_rule);
    assert!(matches!(from_txt.parts.merge_rule, MergeRule::List(ref l) if l.len() == 400 - 257));

    // The result is a working tokenizer.
    let tok = Tokenizer::new(from_txt.parts).unwrap();
    let ids = tok.encode_ordinary("the quick brown fox").unwrap();
    assert_eq!(tok.decode_bytes(&ids).unwrap(), b"the quick brown fox");
    std::fs::remove_dir_all(&dir).unwrap();
}
