//! GGUF headers from arbitrary bytes: the bounds-checked walk never panics, never
//! allocates more than the input could hold, and every tensor it accepts lies inside
//! the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = ziplm::gguf_header::check_header(data, data.len() as u64) {
        for t in &h.tensors {
            assert!(h.data_offset + t.offset + t.bytes <= data.len() as u64);
        }
    }
});
