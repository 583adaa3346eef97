//! Prunes the model declared in `[package.metadata.ziplm]` into OUT_DIR (cached: a
//! rebuild with unchanged inputs does no pruning work).
fn main() {
    let start = std::time::Instant::now();
    match ziplm::build::Builder::from_env().and_then(|b| b.run()) {
        Ok(built) => {
            for b in built {
                println!(
                    "cargo:warning=ziplm: {} -> {} file(s) ({}, {:.2} s)",
                    b.name,
                    b.files.len(),
                    if b.cached { "cached" } else { "pruned" },
                    start.elapsed().as_secs_f64()
                );
            }
        }
        Err(e) => {
            eprintln!("ziplm: {e}");
            std::process::exit(1);
        }
    }
}
