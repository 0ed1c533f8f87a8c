#![no_main]
//! A shard file's safetensors header: `shard::safetensors::read_layout` over the whole file's
//! bytes (as the loader does over a memory map). Every accepted tensor must lie inside the file.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(layout) = ferrolm::shard::safetensors::read_layout(data, "fuzz.safetensors") {
        for (dtype, range) in layout.tensors.values() {
            assert!(range.start >= 8 && range.start <= range.end && range.end <= data.len());
            assert_eq!((range.end - range.start) % dtype.size(), 0);
        }
    }
});
