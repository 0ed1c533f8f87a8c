//! Criterion benches of the core encoder on real text (../shared/data), throughput in bytes.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrolm::tokenizer::formats;
use ferrolm::Tokenizer;
use std::path::Path;

fn shared_data(rel: &str) -> Option<std::path::PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel);
    path.exists().then_some(path)
}

fn bench_encode(c: &mut Criterion) {
    let (Some(gpt2), Some(text)) = (
        shared_data("gpt2"),
        shared_data("tinyshakespeare/input.txt"),
    ) else {
        eprintln!("../shared/data not found: skipping the encode benches");
        return;
    };
    let text = std::fs::read_to_string(text).unwrap();
    let tokenizer = Tokenizer::new(formats::load(&gpt2, None).unwrap()).unwrap();
    let mut group = c.benchmark_group("encode_gpt2");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.sample_size(10);
    group.bench_function("encode_ordinary/tinyshakespeare", |b| {
        b.iter(|| tokenizer.encode_ordinary(&text).unwrap())
    });
    let long = "a".repeat(100_000);
    group.throughput(Throughput::Bytes(long.len() as u64));
    group.bench_function("encode_ordinary/a*100000", |b| {
        b.iter(|| tokenizer.encode_ordinary(&long).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
