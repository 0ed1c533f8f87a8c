#![no_main]
//! `manifest.json` and `.progress.json`: the serde reader plus `Manifest::validate`, the checks
//! every reader (loader, merge, Python's Manifest.load) relies on.
use ferrolm::shard::manifest::{check_file_name, Manifest, Progress};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data) {
        if manifest.validate("fuzz/manifest.json").is_ok() {
            // What validate promises the readers: plain names, sums that add up, ids in range.
            let mut tokens = 0u64;
            for split in manifest.splits.values() {
                for shard in &split.shards {
                    assert!(check_file_name(&shard.file).is_ok());
                }
                tokens += split.tokens;
            }
            assert_eq!(tokens, manifest.total_tokens);
            assert!(manifest.vocab_size >= 1 && manifest.vocab_size <= 1 << 32);
            if let Some(eos) = manifest.eos_id {
                assert!(u64::from(eos) < manifest.vocab_size);
            }
        }
    }
    let _ = serde_json::from_slice::<Progress>(data);
});
