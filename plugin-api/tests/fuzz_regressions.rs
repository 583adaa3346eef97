//! Inputs the fuzzers (`fuzz/`) found, kept as regression tests: each must parse (or
//! fail to parse) without panicking and, when it parses, serialise back to a value
//! that parses to the same thing byte for byte.

use ziplm_plugin_api::{LatencyTable, Plan};

fn round_trips<T: serde::Serialize + serde::de::DeserializeOwned>(bytes: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(bytes) {
        let text = serde_json::to_vec(&value).unwrap();
        let again: T = serde_json::from_slice(&text).unwrap();
        assert_eq!(serde_json::to_vec(&again).unwrap(), text);
    }
}

/// Found by `latency_table_json` when the fuzz crate's serde_json lacked
/// `float_roundtrip`: long decimals such as `1.1348279999999997` must survive a save
/// and load of the table exactly (ziplm and its tables use exact float round trips).
#[test]
fn latency_table_with_long_decimals_round_trips() {
    let bytes = include_bytes!("fuzz_regressions/latency_table_float_roundtrip.json");
    assert!(serde_json::from_slice::<LatencyTable>(bytes).is_ok());
    round_trips::<LatencyTable>(bytes);
}

#[test]
fn every_kept_input_is_handled() {
    // The manifest folder at run time (cargo sets it): a binary built from another
    // checkout of the same sources may be reused from a shared target folder.
    let root = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    for entry in
        std::fs::read_dir(std::path::Path::new(&root).join("tests/fuzz_regressions")).unwrap()
    {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        round_trips::<LatencyTable>(&bytes);
        round_trips::<Plan>(&bytes);
    }
}
