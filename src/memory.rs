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
