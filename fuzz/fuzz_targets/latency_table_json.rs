//! Latency tables (`latency-table.json`) from arbitrary bytes: parsing never panics,
//! a parsed table round-trips, and looking shapes up in it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ziplm_plugin_api::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(table) = serde_json::from_slice::<LatencyTable>(data) {
        let text = serde_json::to_vec(&table).expect("a parsed table serialises");
        let again: LatencyTable = serde_json::from_slice(&text).expect("a serialised table parses");
        assert_eq!(serde_json::to_vec(&again).unwrap(), text);
        for e in &table.entries {
            let _ = table.get(&e.shape);
        }
    }
});
