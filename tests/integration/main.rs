//! ziplm's integration tests: one binary (the tract and candle dependencies make each
//! test binary expensive to link), one module per subject.

mod common;
mod database;
mod obs_identities;
mod obs_quality;
mod search_dp;
mod tract_fixtures;
mod tract_hook;
