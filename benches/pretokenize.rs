//! Pre-tokenizer throughput: the hand-written scanners against fancy-regex on the same patterns.
//!
//! Texts: `../shared/data/tinyshakespeare/input.txt` (English, ASCII; skipped when absent) and a
//! built-in multilingual text (Latin with diacritics, Cyrillic, Greek, CJK, Arabic, emoji, code).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferrolm::tokenizer::pretokenize::PreTokenizer;

const SHAKESPEARE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/tinyshakespeare/input.txt"
);

const MULTILINGUAL: &str = "Größere Übungen fürs Café: naïve Ärzte lösen Rätsel.\r\n\
    Съешь же ещё этих мягких французских булок, да выпей чаю! \
    Ἐν ἀρχῇ ἦν ὁ λόγος. 我们今天去北京大学图书馆看书。東京は日本の首都です。\
    العربية لغة جميلة ١٢٣ ٤٥٦. 😀 👍🏽 🇺🇸 — “quoted” ‘text’ … \
    fn main() { let x_1 = vec![1, 2, 3]; println!(\"{x_1:?}\"); } // 12345678\n\n\
    HTTPServer parseJSONResponse It's DON'T they'll I'd   \t  spaced\u{a0}out\u{3000}end.\n";

fn texts() -> Vec<(&'static str, String)> {
    let mut texts = Vec::new();
    match std::fs::read_to_string(SHAKESPEARE) {
        Ok(text) => texts.push(("shakespeare", text)),
        Err(e) => eprintln!("skipping tinyshakespeare ({SHAKESPEARE}: {e})"),
    }
    texts.push(("multilingual", MULTILINGUAL.repeat(2000)));
    texts
}

fn count_pieces(p: &PreTokenizer, text: &str) -> usize {
    let mut n = 0usize;
    p.split(text, |piece| {
        black_box(piece);
        n += 1;
    })
    .unwrap();
    n
}

fn bench(c: &mut Criterion) {
    for (label, text) in texts() {
        let mut group = c.benchmark_group(format!("pretokenize/{label}"));
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        for name in ["gpt2", "cl100k", "cl100k_classic", "o200k"] {
            let fast = PreTokenizer::new(name).unwrap();
            let regex = PreTokenizer::with_regex(fast.pattern()).unwrap();
            assert_eq!(count_pieces(&fast, &text), count_pieces(&regex, &text));
            group.bench_with_input(BenchmarkId::new("scanner", name), &text, |b, t| {
                b.iter(|| count_pieces(&fast, black_box(t)))
            });
            group.bench_with_input(BenchmarkId::new("fancy-regex", name), &text, |b, t| {
                b.iter(|| count_pieces(&regex, black_box(t)))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
