//! `ziplm prune` arguments, lowered and resolved into jobs (clap, the CLI's lowering,
//! [`ziplm::job::request::JobRequest::resolve`]) from arbitrary input: never a panic.
//! The input is split into arguments at NUL bytes; nothing is run or written.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args: Vec<String> = data
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if let Ok(jobs) = ziplm::resolve_prune_args(&args) {
        for job in jobs {
            // A resolved job holds what the checks promise.
            assert!(!job.budgets.is_empty());
            assert!(job.workload.validate().is_ok());
            assert!(job.check_name().is_ok());
        }
    }
});
