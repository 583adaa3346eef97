//! The `ziplm` command line: `prune`, `profile`, `inspect`, `eval`, `speedup`.
//!
//! Exit codes: 0 success; 1 a budget was missed after verification; 2 an error.
//! Results go to stdout (`--json` for machines); progress and messages to stderr.

mod args;
mod commands;

use args::Cli;

use clap::Parser;
use std::ffi::OsString;
use std::process::ExitCode;

/// Parses arguments and runs the command.
pub fn run(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<ExitCode> {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return Ok(ExitCode::from(code));
        }
    };
    let json = cli.command.json();
    match commands::dispatch(cli) {
        // With --json the error is JSON on stdout too (same exit code; the message also
        // goes to stderr for people).
        Err(e) if json => {
            let message = format!("{e:#}");
            println!("{}", serde_json::json!({ "error": message }));
            eprintln!("ziplm: {message}");
            Ok(ExitCode::from(2))
        }
        other => other,
    }
}
