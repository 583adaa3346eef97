//! Process memory settings for long evaluation passes.
//!
//! A 1024-token forward of a 135M-parameter model allocates and frees buffers of
//! several MB per operation. glibc serves each with a fresh `mmap` and unmaps it on
//! free, so every forward page-faults its buffers back in (zeroed by the kernel):
//! about a third of a perplexity pass on this project's machine (perf: `clear_page_erms`,
//! `exc_page_fault`). [`keep_freed_buffers`] makes glibc reuse them instead.
//!
//! It is process-wide, so only commands that do not time a runtime call it: a latency
//! measured with it would not be the one a serving app sees.

/// Keeps freed buffers of up to 32 MiB in the heap for reuse instead of returning them
/// to the OS. Does nothing off glibc.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; called before the
    // pass, it has no effect on memory already handed out.
    unsafe {
        // Serve blocks below 32 MiB (glibc's largest threshold) from the heap...
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // ...and do not give the heap's free top back to the OS after every forward.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Bytes of activations one forward of a block holds at `workload` (f32, the largest
/// block, the logits when the vocabulary is known), doubled for the runtime's
/// temporaries: an estimate, to refuse workloads that cannot fit before any work.
pub fn workload_bytes(
    structure: &ziplm_plugin_api::ModelStructure,
    workload: &ziplm_plugin_api::Workload,
    vocab: Option<usize>,
) -> u128 {
    use ziplm_plugin_api::{BlockKind, Phase};
    let (batch, seq) = (workload.batch as u128, workload.seq_len as u128);
    let past = match workload.phase {
        Phase::Prefill => 0,
        Phase::Decode { kv_len } => kv_len as u128,
    };
    let tokens = batch * seq;
    let block = |b: &ziplm_plugin_api::PrunableBlock| -> u128 {
        let hidden = b.hidden as u128;
        let inner = match &b.kind {
            BlockKind::Attention(a) => {
                let (h, kv, d) = (a.n_heads as u128, a.n_kv_heads as u128, a.head_dim as u128);
                // q, out; k, v over the whole context; scores and their softmax.
                tokens * h * d * 2
                    + batch * (seq + past) * kv * d * 2
                    + batch * h * seq * (seq + past) * 2
            }
            BlockKind::Ffn(f) => tokens * f.width as u128 * 3,
        };
        tokens * hidden * 2 + inner
    };
    let largest = structure.blocks.iter().map(block).max().unwrap_or(0);
    let logits = tokens * vocab.unwrap_or(0) as u128;
    (largest.max(logits)) * 4 * 2
}

/// Memory this machine can give a process now (`MemAvailable`), when known.
pub fn available_bytes() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses a workload whose forward would not fit in this machine's memory.
pub fn check_workload_fits(
    structure: &ziplm_plugin_api::ModelStructure,
    workload: &ziplm_plugin_api::Workload,
    vocab: Option<usize>,
) -> crate::Result<()> {
    let need = workload_bytes(structure, workload, vocab);
    let Some(available) = available_bytes() else {
        return Ok(());
    };
    if need > available {
        let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
        return Err(crate::Error::Invalid(format!(
            "the workload {workload} needs about {:.1} GiB of activations per forward, and this machine has {:.1} GiB available: lower --batch or --seq-len (workload.batch / workload.seq_len)",
            gib(need),
            gib(available)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ziplm_plugin_api::Workload;

    #[test]
    fn a_huge_batch_is_refused_and_an_ordinary_one_is_not() {
        if super::available_bytes().is_none() {
            return;
        }
        let bert = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/onnx/tiny-bert-feature-extraction/model.onnx");
        let structure = crate::backend::load_structure(&bert, &Workload::prefill(1, 16)).unwrap();
        super::check_workload_fits(&structure, &Workload::prefill(1, 128), Some(30522)).unwrap();
        let e = super::check_workload_fits(&structure, &Workload::prefill(10_000_000, 16), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("GiB of activations"), "{e}");
    }
}
