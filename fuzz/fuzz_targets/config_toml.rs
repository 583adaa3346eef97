//! Serving configs (`ziplm.toml`) from arbitrary text: parsing and resolving every
//! model into a job never panics; errors name the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("ziplm.toml");
    match ziplm::config::parse(text, file) {
        Ok(cfg) => {
            for m in &cfg.model {
                if let Err(e) = m.to_job(file, Path::new("/app")) {
                    assert!(e.to_string().contains("ziplm.toml"), "{e}");
                }
            }
        }
        Err(e) => assert!(e.to_string().contains("ziplm.toml"), "{e}"),
    }
});
