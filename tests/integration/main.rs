//! ziplm's integration tests: one binary (tract makes each test binary expensive to
//! link), one module per subject.

mod bad_inputs;
mod cli;
mod common;
mod config;
mod database;
mod gpu_target;
#[cfg(feature = "mistralrs")]
mod hf_folders;
#[cfg(feature = "mistralrs")]
mod mistralrs_backend;
mod obs_identities;
mod obs_quality;
mod output_sets;
mod reference_backend;
mod reproducible;
mod search_dp;
mod snapshots;
mod tract_fixtures;
mod tract_hook;
mod verify_loop;
