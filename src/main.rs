//! The `ziplm` command line. See `ziplm --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    match ziplm::run_cli(std::env::args_os()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ziplm: {e:#}");
            ExitCode::from(2)
        }
    }
}
