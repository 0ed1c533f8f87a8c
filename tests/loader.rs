//! The packed-batch loader against references: the Feistel order is a bijection (and pinned),
//! the O(log) best-fit packer equals a linear-scan packer, an epoch covers every window / piece
//! exactly once across ranks, resume (also with another world or batch size) continues with the
//! exact next rows, and damaged shards are reported by file.

use ferrolm::loader::order::{epoch_key, rank_rows, Feistel, Schedule};
use ferrolm::loader::pack::{num_pieces, BestFit, Span};
use ferrolm::loader::prefetch::Loader;
use ferrolm::loader::{Cursor, Dataset, LoaderOptions, Packing, Position, Verify, IGNORE};
use ferrolm::shard::manifest::{
    sha256_hex, Manifest, ShardInfo, SplitSummary, TokenizerRecord, MANIFEST,
};
use ferrolm::shard::safetensors::{write, Dtype, TensorBytes};
use ferrolm::shard::{splitmix64, Skipped};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const VOCAB: u64 = 1000;
const EOS: u32 = 999;

fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ferrolm-loader-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Documents with lengths `lengths` (each ends with EOS), tokens derived from a counter so
/// every position of the stream is recognisable.
fn documents(lengths: &[usize], salt: u64) -> Vec<Vec<u32>> {
    let mut x = salt;
    lengths
        .iter()
        .map(|&n| {
            let mut doc: Vec<u32> = (0..n.saturating_sub(1))
                .map(|_| {
                    x = splitmix64(x);
                    (x % (VOCAB - 1)) as u32
                })
                .collect();
            doc.push(EOS);
            doc
        })
        .collect()
}

/// Writes a shard directory (train split) holding `docs`, `per_shard` documents per shard.
fn write_dir(dir: &Path, docs: &[Vec<u32>], per_shard: usize) -> Manifest {
    let mut shards = Vec::new();
    for (k, chunk) in docs.chunks(per_shard.max(1)).enumerate() {
        let tokens: Vec<u32> = chunk.iter().flatten().copied().collect();
        let mut offsets = vec![0u64];
        for d in chunk {
            offsets.push(offsets.last().unwrap() + d.len() as u64);
        }
        let token_bytes: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| (t as u16).to_le_bytes())
            .collect();
        let offset_bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "ferrolm-shard".to_string());
        meta.insert("format_version".to_string(), "1".to_string());
        meta.insert("tokenizer_sha256".to_string(), "tok".to_string());
        meta.insert("split".to_string(), "train".to_string());
        let mut file = Vec::new();
        write(
            &mut file,
            &[
                TensorBytes {
                    name: "tokens",
                    dtype: Dtype::U16,
                    bytes: &token_bytes,
                },
                TensorBytes {
                    name: "doc_offsets",
                    dtype: Dtype::U64,
                    bytes: &offset_bytes,
                },
            ],
            &meta,
        )
        .unwrap();
        let name = format!("train-{k:05}.safetensors");
        std::fs::write(dir.join(&name), &file).unwrap();
        shards.push(ShardInfo {
            file: name,
            tokens: tokens.len() as u64,
            documents: chunk.len() as u64,
            bytes: file.len() as u64,
            sha256: sha256_hex(&file),
        });
    }
    let tokens = shards.iter().map(|s| s.tokens).sum();
    let mut splits = BTreeMap::new();
    splits.insert(
        "train".to_string(),
        SplitSummary {
            tokens,
            documents: docs.len() as u64,
            shards,
        },
    );
    let manifest = Manifest {
        format: "ferrolm-shards".into(),
        format_version: 1,
        created_by: "test".into(),
        tokenizer: TokenizerRecord {
            file: "tokenizer.json".into(),
            sha256: "tok".into(),
        },
        vocab_size: VOCAB,
        dtype: "uint16".into(),
        bos_id: None,
        eos_id: Some(EOS),
        seed: 0,
        val_fraction: 0.0,
        shard_tokens: 0,
        total_tokens: tokens,
        total_documents: docs.len() as u64,
        documents_read: docs.len() as u64,
        input_bytes: 0,
        splits,
        inputs: Vec::new(),
        skipped: Skipped::default(),
    };
    manifest.write(&dir.join(MANIFEST)).unwrap();
    manifest
}

fn options(dirs: Vec<PathBuf>, weights: Vec<u64>, t: usize, packing: Packing) -> LoaderOptions {
    LoaderOptions {
        sources: dirs,
        weights,
        split: "train".into(),
        seq_len: t,
        packing,
        seed: 7,
        buffer_size: 16,
        mask_boundary_labels: false,
        verify: Verify::Lazy,
    }
}

fn open(options: LoaderOptions) -> Arc<Dataset> {
    Arc::new(Dataset::open(options).unwrap())
}

fn global_rows(ds: &Arc<Dataset>, from: &Position, count: u64) -> Vec<(usize, Vec<Span>)> {
    let mut cursor = Cursor::new(ds.clone(), from, None).unwrap();
    cursor
        .plan(count)
        .into_iter()
        .map(|r| (r.source, r.spans))
        .collect()
}

/// A linear-scan best-fit packer written from the definition: the reference for `BestFit`.
fn reference_best_fit(lengths: &[u64], key: u64, t: u64, buffer: usize) -> Vec<Vec<(u64, u64)>> {
    let starts: Vec<u64> = std::iter::once(0)
        .chain(lengths.iter().scan(0, |a, &l| {
            *a += l;
            Some(*a)
        }))
        .collect();
    let order = Feistel::new(lengths.len() as u64, key);
    let mut pieces = Vec::new();
    for k in 0..lengths.len() as u64 {
        let d = order.apply(k) as usize;
        let (start, len) = (starts[d], lengths[d]);
        for p in 0..num_pieces(len, t) {
            let s = start + p * t;
            pieces.push((s, (start + len - s).min(t + 1)));
        }
    }
    let mut stream = pieces.into_iter();
    let mut held: Vec<(u64, u64)> = Vec::new();
    let mut rows = Vec::new();
    let refill = |held: &mut Vec<(u64, u64)>, stream: &mut dyn Iterator<Item = (u64, u64)>| {
        while held.len() < buffer {
            match stream.next() {
                Some(p) => held.push(p),
                None => break,
            }
        }
    };
    loop {
        refill(&mut held, &mut stream);
        if held.is_empty() {
            return rows;
        }
        let mut room = t + 1;
        let mut row = Vec::new();
        loop {
            // largest length that fits; first arrival among equals
            let mut best: Option<usize> = None;
            for (i, p) in held.iter().enumerate() {
                if p.1 <= room && best.is_none_or(|b| p.1 > held[b].1) {
                    best = Some(i);
                }
            }
            let Some(i) = best else { break };
            let p = held.remove(i);
            room -= p.1;
            row.push(p);
            refill(&mut held, &mut stream);
            if room == 0 {
                break;
            }
        }
        rows.push(row);
    }
}

#[test]
fn feistel_order_is_pinned() {
    // The order is part of the format of a training run: a change here changes every run's
    // batches. These values are the written-down algorithm's (rust/loader/order.rs).
    let f = Feistel::new(10, epoch_key(0, 0, 0));
    let got: Vec<u64> = (0..10).map(|i| f.apply(i)).collect();
    assert_eq!(got, PINNED_10);
    let g = Feistel::new(1_000_000_007, 12345);
    assert_eq!([g.apply(0), g.apply(1), g.apply(999_999_999)], PINNED_BIG);
}

const PINNED_10: [u64; 10] = [3, 2, 6, 7, 1, 9, 4, 5, 8, 0];
const PINNED_BIG: [u64; 3] = [784_420_684, 727_953_838, 849_773_505];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn feistel_is_a_bijection(n in 0u64..3000, key in any::<u64>()) {
        let f = Feistel::new(n, key);
        let mut seen = vec![false; n as usize];
        for i in 0..n {
            let y = f.apply(i);
            prop_assert!(y < n && !seen[y as usize]);
            seen[y as usize] = true;
            prop_assert_eq!(f.invert(y), i);
        }
    }

    #[test]
    fn feistel_inverts_on_large_domains(n in 2u64..u64::MAX / 4, key in any::<u64>(), i in any::<u64>()) {
        let f = Feistel::new(n, key);
        let i = i % n;
        let y = f.apply(i);
        prop_assert!(y < n);
        prop_assert_eq!(f.invert(y), i);
    }

    #[test]
    fn best_fit_equals_the_linear_scan_reference(
        lengths in prop::collection::vec(0u64..60, 1..120),
        t in 1u64..24,
        buffer in 1usize..12,
        key in any::<u64>(),
    ) {
        let reference = reference_best_fit(&lengths, key, t, buffer);
        let starts: Vec<u64> = std::iter::once(0).chain(lengths.iter().scan(0, |a, &l| { *a += l; Some(*a) })).collect();
        let doc = |d: u64| (starts[d as usize], lengths[d as usize]);
        let mut packer = BestFit::new(lengths.len() as u64, key, t, buffer);
        let mut spans = Vec::new();
        let mut rows = Vec::new();
        while packer.next_row(&doc, &mut spans) {
            rows.push(spans.iter().map(|s| (s.start, s.len as u64)).collect::<Vec<_>>());
        }
        prop_assert_eq!(&rows, &reference);
        // Every piece of every document exactly once, rows never over T + 1 tokens.
        let mut seen: Vec<(u64, u64)> = rows.iter().flatten().copied().collect();
        seen.sort();
        let mut expected = Vec::new();
        for (d, &len) in lengths.iter().enumerate() {
            for p in 0..num_pieces(len, t) {
                let s = starts[d] + p * t;
                expected.push((s, (starts[d] + len - s).min(t + 1)));
            }
        }
        expected.sort();
        prop_assert_eq!(seen, expected);
        for row in &rows {
            prop_assert!(row.iter().map(|p| p.1).sum::<u64>() <= t + 1);
        }
    }

    #[test]
    fn schedule_counts_are_exact(weights in prop::collection::vec(1u64..20, 1..5), row in 0u64..10_000) {
        let s = Schedule::new(&weights).unwrap();
        let counts = s.counts_before(row);
        prop_assert_eq!(counts.iter().sum::<u64>(), row);
        let period: u64 = weights.iter().sum();
        for (c, w) in counts.iter().zip(&weights) {
            // within one row of the exact share at every point
            let exact = row as f64 * *w as f64 / period as f64;
            prop_assert!((*c as f64 - exact).abs() < 1.0 + 1e-9, "{c} vs {exact}");
        }
    }
}

struct Fixture {
    dirs: Vec<PathBuf>,
    docs: Vec<Vec<Vec<u32>>>,
}

impl Fixture {
    fn new(tag: &str, sets: &[(Vec<usize>, usize)]) -> Fixture {
        let mut dirs = Vec::new();
        let mut all = Vec::new();
        for (i, (lengths, per_shard)) in sets.iter().enumerate() {
            let dir = temp_dir(&format!("{tag}{i}"));
            let docs = documents(lengths, i as u64 + 1);
            write_dir(&dir, &docs, *per_shard);
            dirs.push(dir);
            all.push(docs);
        }
        Fixture { dirs, docs: all }
    }

    fn stream(&self, s: usize) -> Vec<u32> {
        self.docs[s].iter().flatten().copied().collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn varied_lengths(n: usize, salt: u64, max: u64) -> Vec<usize> {
    let mut x = salt;
    (0..n)
        .map(|_| {
            x = splitmix64(x);
            1 + (x % max) as usize
        })
        .collect()
}

#[test]
fn concat_epoch_covers_every_window_once_across_ranks() {
    let fx = Fixture::new("cover", &[(varied_lengths(300, 1, 40), 37)]);
    let t = 16usize;
    let ds = open(options(fx.dirs.clone(), vec![1], t, Packing::Concat));
    let windows = ds.rows_per_epoch(0).unwrap();
    let stream = fx.stream(0);
    assert_eq!(windows, (stream.len() as u64 - 1) / t as u64);
    let (b, w) = (3usize, 4usize);
    let steps = windows.div_ceil((b * w) as u64);
    let mut seen = HashMap::new();
    for rank in 0..w {
        let mut loader = Loader::new(ds.clone(), rank, b, w, 2).unwrap();
        for step in 0..steps {
            let batch = loader.next_batch().unwrap();
            for row in 0..b {
                let global = step * (b * w) as u64 + rank_rows(0, rank, b).start + row as u64;
                if global >= windows {
                    continue; // next epoch
                }
                let ids = &batch.input_ids[row * t..(row + 1) * t];
                // find the window by its tokens (windows start at multiples of t)
                let start = (0..windows)
                    .find(|k| {
                        let k = (*k as usize) * t;
                        stream[k..k + t]
                            .iter()
                            .zip(ids)
                            .all(|(a, b)| *a as i64 == *b)
                            && stream[k + 1..k + t + 1]
                                .iter()
                                .zip(&batch.labels[row * t..(row + 1) * t])
                                .all(|(a, b)| *a as i64 == *b)
                    })
                    .expect("every row is a window");
                *seen.entry(start).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(seen.len() as u64, windows);
    assert!(seen.values().all(|&c| c == 1));
}

#[test]
fn best_fit_epoch_covers_every_piece_once() {
    let fx = Fixture::new("bfcover", &[(varied_lengths(200, 2, 70), 50)]);
    let t = 24u64;
    let ds = open(options(
        fx.dirs.clone(),
        vec![1],
        t as usize,
        Packing::BestFit,
    ));
    let rows = global_rows(&ds, &Position::start(1), 2000);
    let mut cursor = Cursor::new(ds.clone(), &Position::start(1), None).unwrap();
    let plans = cursor.plan(2000);
    let epoch0: Vec<&Span> = plans
        .iter()
        .filter(|r| r.epoch == 0)
        .flat_map(|r| &r.spans)
        .collect();
    let mut got: Vec<(u64, u64)> = epoch0.iter().map(|s| (s.start, s.len as u64)).collect();
    got.sort();
    let mut expected = Vec::new();
    let mut start = 0u64;
    for d in &fx.docs[0] {
        let len = d.len() as u64;
        for p in 0..num_pieces(len, t) {
            let s = start + p * t;
            expected.push((s, (start + len - s).min(t + 1)));
        }
        start += len;
    }
    expected.sort();
    assert_eq!(got, expected);
    assert!(
        plans.iter().any(|r| r.epoch == 1),
        "2000 rows reach epoch 1"
    );
    assert_eq!(rows.len(), 2000);
}

/// The rows rank `rank` gets in `steps` steps, as (input_ids, labels, position_ids) per row.
fn rank_batches(loader: &mut Loader, steps: usize) -> Vec<Vec<i64>> {
    (0..steps)
        .map(|_| {
            let b = loader.next_batch().unwrap();
            let mut v = b.input_ids;
            v.extend(b.labels);
            v.extend(b.position_ids);
            v.extend(b.cu_seqlens.iter().map(|&c| c as i64));
            v
        })
        .collect()
}

/// Global rows as per-row token vectors, for comparing across geometries.
fn global_token_rows(
    ds: &Arc<Dataset>,
    from: &Position,
    steps: usize,
    b: usize,
    w: usize,
) -> Vec<Vec<i64>> {
    let t = ds.seq_len();
    let mut loaders: Vec<Loader> = (0..w)
        .map(|r| {
            let mut l = Loader::new(ds.clone(), r, b, w, 2).unwrap();
            l.seek(from.clone()).unwrap();
            l
        })
        .collect();
    let mut rows = Vec::new();
    for _ in 0..steps {
        for l in &mut loaders {
            let batch = l.next_batch().unwrap();
            for r in 0..b {
                let mut row = batch.input_ids[r * t..(r + 1) * t].to_vec();
                row.extend(&batch.labels[r * t..(r + 1) * t]);
                row.extend(&batch.position_ids[r * t..(r + 1) * t]);
                rows.push(row);
            }
        }
    }
    rows
}

#[test]
fn resume_is_exact_and_elastic() {
    let fx = Fixture::new(
        "resume",
        &[
            (varied_lengths(120, 3, 50), 30),
            (varied_lengths(60, 4, 90), 25),
        ],
    );
    for packing in [Packing::Concat, Packing::BestFit] {
        let ds = open(options(fx.dirs.clone(), vec![2, 1], 12, packing));
        // uninterrupted: world 2, batch 3, 40 steps (several epochs of the small sources)
        let full = global_token_rows(&ds, &Position::start(2), 40, 3, 2);
        // interrupted after 17 steps; the state from rank 1 (all ranks agree)
        let mut a = Loader::new(ds.clone(), 0, 3, 2, 2).unwrap();
        let mut b = Loader::new(ds.clone(), 1, 3, 2, 2).unwrap();
        rank_batches(&mut a, 17);
        rank_batches(&mut b, 17);
        assert_eq!(a.position(), b.position());
        let state = b.position().clone();
        assert_eq!(state.global, 17 * 6);
        // same geometry, other geometries with the same global batch, and other global batches
        for (bs, ws, steps) in [
            (3, 2, 23),
            (6, 1, 23),
            (1, 6, 23),
            (2, 3, 23),
            (4, 3, 11),
            (5, 1, 27),
        ] {
            let resumed = global_token_rows(&ds, &state, steps, bs, ws);
            let n = resumed.len();
            assert_eq!(
                resumed[..],
                full[17 * 6..17 * 6 + n],
                "{packing:?} B={bs} W={ws}"
            );
        }
    }
}

#[test]
fn batches_match_the_row_plans() {
    // Tokens, labels, positions and cu_seqlens rebuilt from the plan and the raw stream.
    let fx = Fixture::new(
        "assemble",
        &[
            (varied_lengths(150, 5, 30), 40),
            (varied_lengths(40, 6, 100), 9),
        ],
    );
    for packing in [Packing::Concat, Packing::BestFit] {
        for mask in [false, true] {
            let t = 20usize;
            let mut o = options(fx.dirs.clone(), vec![1, 1], t, packing);
            o.mask_boundary_labels = mask;
            let ds = open(o);
            let streams = [fx.stream(0), fx.stream(1)];
            let doc_starts: Vec<Vec<u64>> = fx
                .docs
                .iter()
                .map(|docs| {
                    docs.iter()
                        .scan(0u64, |a, d| {
                            let s = *a;
                            *a += d.len() as u64;
                            Some(s)
                        })
                        .collect()
                })
                .collect();
            let b = 4usize;
            let plans = global_rows(&ds, &Position::start(2), 40 * b as u64);
            let mut loader = Loader::new(ds.clone(), 0, b, 1, 3).unwrap();
            for step in 0..40 {
                let batch = loader.next_batch().unwrap();
                assert_eq!(batch.cu_seqlens.len(), ds.cu_seqlens_len(b));
                let mut cu = vec![0i32];
                for r in 0..b {
                    let (s, spans) = &plans[step * b + r];
                    let mut row = Vec::new();
                    let mut bounds = Vec::new();
                    for span in spans {
                        bounds.push(row.len());
                        for p in span.start..span.start + span.len as u64 {
                            if p > span.start && doc_starts[*s].binary_search(&p).is_ok() {
                                bounds.push(row.len());
                            }
                            row.push(streams[*s][p as usize] as i64);
                        }
                    }
                    let used = row.len();
                    row.resize(t + 1, EOS as i64);
                    if used < t + 1 {
                        bounds.push(used);
                    }
                    let mut labels = row[1..].to_vec();
                    for (i, l) in labels.iter_mut().enumerate() {
                        if i + 1 >= used || (mask && bounds[1..].contains(&(i + 1))) {
                            *l = IGNORE;
                        }
                    }
                    let mut positions = vec![0i64; t];
                    for (i, &start) in bounds.iter().enumerate() {
                        let end = bounds.get(i + 1).copied().unwrap_or(t).min(t);
                        for (k, p) in (start..end.max(start)).enumerate() {
                            positions[p] = k as i64;
                        }
                        if start < t && end > start {
                            cu.push((r * t + end) as i32);
                        }
                    }
                    let rows = r * t..(r + 1) * t;
                    assert_eq!(
                        batch.input_ids[rows.clone()],
                        row[..t],
                        "step {step} row {r}"
                    );
                    assert_eq!(batch.labels[rows.clone()], labels[..]);
                    assert_eq!(batch.position_ids[rows], positions[..]);
                }
                assert_eq!(batch.num_cu_seqlens, cu.len());
                assert_eq!(batch.cu_seqlens[..cu.len()], cu[..]);
                assert!(batch.cu_seqlens[cu.len()..]
                    .iter()
                    .all(|&c| c == (b * t) as i32));
                let max = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap();
                assert_eq!(batch.max_seqlen, max);
            }
        }
    }
}

#[test]
fn mixing_gives_exact_proportions() {
    let fx = Fixture::new(
        "mix",
        &[
            (varied_lengths(50, 7, 40), 50),
            (varied_lengths(50, 8, 40), 50),
        ],
    );
    let ds = open(options(fx.dirs.clone(), vec![3, 1], 8, Packing::Concat));
    let rows = global_rows(&ds, &Position::start(2), 4000);
    let from_first = rows.iter().filter(|r| r.0 == 0).count();
    assert_eq!(from_first, 3000);
    // every window of a short period is spread out: never more than 3 in a row from source 0
    assert!(rows.windows(4).all(|w| w.iter().any(|r| r.0 == 1)));
}

#[test]
fn errors_name_the_file() {
    let fx = Fixture::new("bad", &[(varied_lengths(100, 9, 40), 25)]);
    let dir = &fx.dirs[0];
    let shard = dir.join("train-00001.safetensors");
    let original = std::fs::read(&shard).unwrap();
    let t = 8;
    let message = |verify: Verify| -> String {
        let mut o = options(fx.dirs.clone(), vec![1], t, Packing::Concat);
        o.verify = verify;
        match Dataset::open(o) {
            Err(e) => e.to_string(),
            Ok(ds) => {
                let mut loader = Loader::new(Arc::new(ds), 0, 64, 1, 1).unwrap();
                let mut out = String::new();
                for _ in 0..50 {
                    if let Err(e) = loader.next_batch() {
                        out = e.to_string();
                        break;
                    }
                }
                out
            }
        }
    };
    // truncated
    std::fs::write(&shard, &original[..original.len() - 10]).unwrap();
    let m = message(Verify::Off);
    assert!(
        m.contains("train-00001.safetensors") && m.contains("truncated"),
        "{m}"
    );
    // one token flipped to an id beyond the vocabulary: caught by the checksum (lazy, eager) or
    // by the id check (off), each naming the file
    let header = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let mut damaged = original.clone();
    damaged[8 + header + 2 * 5 + 1] = 0xff;
    std::fs::write(&shard, &damaged).unwrap();
    for verify in [Verify::Eager, Verify::Lazy] {
        let m = message(verify);
        assert!(
            m.contains("train-00001.safetensors") && m.contains("sha256"),
            "{m}"
        );
    }
    let m = message(Verify::Off);
    assert!(
        m.contains("train-00001.safetensors") && m.contains("token 5 ") && m.contains("vocabulary"),
        "{m}"
    );
    std::fs::write(&shard, &original).unwrap();
    assert_eq!(message(Verify::Eager), "");
}

#[test]
fn state_from_another_dataset_is_refused() {
    let fx = Fixture::new("refuse", &[(varied_lengths(80, 10, 40), 40)]);
    let ds = open(options(fx.dirs.clone(), vec![1], 8, Packing::BestFit));
    let mut loader = Loader::new(ds.clone(), 0, 2, 1, 1).unwrap();
    let bad = Position {
        global: 10,
        sources: vec![ferrolm::loader::SourcePosition {
            epoch: 0,
            epoch_start: 0,
            rows: 9,
        }],
    };
    assert!(loader.seek(bad).is_err());
    // an epoch start far beyond the epoch's rows
    let far = Position {
        global: 1_000_000,
        sources: vec![ferrolm::loader::SourcePosition {
            epoch: 0,
            epoch_start: 0,
            rows: 1_000_000,
        }],
    };
    loader.seek(far).unwrap();
    let e = loader.next_batch().unwrap_err().to_string();
    assert!(e.contains("inconsistent loader state"), "{e}");
}

#[test]
fn parallel_assembly_equals_sequential() {
    // 64 rows of 1024 tokens reach the thread-pool path; one-row batches take the sequential one.
    ferrolm::pool::set_num_threads(2);
    let fx = Fixture::new(
        "parallel",
        &[
            (varied_lengths(400, 11, 900), 150),
            (varied_lengths(300, 12, 60), 100),
        ],
    );
    for packing in [Packing::Concat, Packing::BestFit] {
        let mut o = options(fx.dirs.clone(), vec![1, 2], 1024, packing);
        o.mask_boundary_labels = true;
        let ds = open(o);
        let big = global_token_rows(&ds, &Position::start(2), 3, 64, 1);
        let small = global_token_rows(&ds, &Position::start(2), 3 * 64, 1, 1);
        assert_eq!(big, small, "{packing:?}");
        // cu_seqlens of the big batch agree with the rows' position ids
        let mut loader = Loader::new(ds.clone(), 0, 64, 1, 1).unwrap();
        let batch = loader.next_batch().unwrap();
        let starts: Vec<i32> = (0..64 * 1024)
            .filter(|&i| batch.position_ids[i] == 0)
            .map(|i| i as i32)
            .collect();
        assert_eq!(batch.cu_seqlens[..batch.num_cu_seqlens - 1], starts[..]);
    }
}
