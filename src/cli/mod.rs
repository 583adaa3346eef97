//! The `ziplm` command line: `prune`, `profile`, `inspect`, `eval`, `speedup`.
//!
//! Exit codes: 0 success; 1 a budget was missed after verification; 2 an error.
//! Results go to stdout (`--json` for machines); progress and messages to stderr.

mod args;
mod commands;

use args::Cli;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use std::ffi::OsString;
use std::process::ExitCode;

/// Parses the arguments: the command, and the ids of the arguments its command line
/// wrote (not defaults), or clap's error.
fn parse(
    args: impl IntoIterator<Item = OsString>,
) -> std::result::Result<(Cli, Vec<String>), clap::Error> {
    let command = Cli::command();
    let matches = command.clone().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let given = matches
        .subcommand()
        .map(|(name, sub)| {
            // Arguments only (a flattened struct's group has an id too).
            let is_arg = |id: &str| {
                command
                    .find_subcommand(name)
                    .is_some_and(|c| c.get_arguments().any(|a| a.get_id() == id))
            };
            sub.ids()
                .map(|id| id.as_str())
                .filter(|id| is_arg(id) && sub.value_source(id) == Some(ValueSource::CommandLine))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Ok((cli, given))
}

/// Parses `ziplm prune ...` arguments (without the program name) and resolves them into
/// jobs, running nothing: the CLI's lowering and checks alone (for the fuzz target).
#[doc(hidden)]
pub fn resolve_prune_args(args: &[String]) -> anyhow::Result<Vec<crate::job::PruneJob>> {
    let argv = ["ziplm", "prune"]
        .into_iter()
        .map(String::from)
        .chain(args.iter().cloned());
    let (cli, given) = parse(argv.map(OsString::from)).map_err(|e| anyhow::anyhow!("{e}"))?;
    match cli.command {
        args::Command::Prune(a) => Ok(commands::resolve_prune(&a, &given)?
            .into_iter()
            .map(|r| r.job)
            .collect()),
        _ => anyhow::bail!("not a prune command"),
    }
}

/// Parses arguments and runs the command.
pub fn run(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<ExitCode> {
    let (cli, given) = match parse(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return Ok(ExitCode::from(code));
        }
    };
    let json = cli.command.json();
    match commands::dispatch(cli, &given) {
        Ok(code) => Ok(code),
        // The message goes to stderr; with --json it is JSON on stdout too (same exit
        // code).
        Err(e) => {
            let message = error_message(&e);
            if json {
                println!("{}", serde_json::json!({ "error": message }));
            }
            eprintln!("ziplm: {message}");
            Ok(ExitCode::from(2))
        }
    }
}

/// An error and its causes on one line, each cause once: a cause whose text the message
/// already holds (an OS error a path error prints too) is not repeated.
fn error_message(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    /// The recovery settings of the first request `ziplm prune m.gguf ARGS` makes.
    fn recovery_of(args: &[&str]) -> crate::job::RecoverySettings {
        let args = ["ziplm", "prune", "m.gguf"].iter().chain(args);
        let (cli, given) = super::parse(args.map(Into::into)).unwrap();
        let super::args::Command::Prune(a) = cli.command else {
            panic!("not prune")
        };
        super::commands::prune_requests(&a, &given).unwrap()[0]
            .recovery
            .clone()
            .unwrap()
    }

    #[test]
    fn several_recovery_learning_rates_are_tried_one_is_given() {
        let requests =
            |lr: &str| recovery_of(&["--speedup", "1.5", "--recover", "4096", "--recover-lr", lr]);
        let s = requests("3e-5,1e-5");
        assert_eq!(s.learning_rate_trials, vec![3e-5, 1e-5]);
        assert!((s.with_peak(1e-5).min_learning_rate - 1e-6).abs() < 1e-18);
        assert!((s.with_peak(3e-5).min_learning_rate - 3e-6).abs() < 1e-18);
        assert!(s.check().is_ok());
        let s = requests("3e-5");
        assert!(s.learning_rate_trials.is_empty());
        assert_eq!(s.learning_rate, 3e-5);
    }

    #[test]
    fn recover_takes_one_figure_or_one_per_chain_stage() {
        let recovery = |tokens: &str, chain: bool| {
            let mut args = vec!["--speedup", "1.5", "--speedup", "2", "--recover", tokens];
            if chain {
                args.push("--chain");
            }
            recovery_of(&args)
        };
        let s = recovery("4096", true);
        assert_eq!((s.tokens, s.stage_tokens.len()), (4096, 0));
        let s = recovery("4096,16384", true);
        assert_eq!(
            (s.tokens, s.stage_tokens.clone()),
            (4096, vec![4096, 16384])
        );
        assert!(s.chain && s.check().is_ok());
        assert!(recovery("4096,16384", false).check().is_err());
    }

    #[test]
    fn an_os_error_is_printed_once() {
        let io = std::fs::read("/nonexistent-ziplm/x").unwrap_err();
        let os = io.to_string();
        let e = anyhow::Error::new(crate::Error::io("/nonexistent-ziplm/x", io));
        let m = super::error_message(&e);
        assert_eq!(m.matches(&os).count(), 1, "{m}");
        assert!(m.starts_with("/nonexistent-ziplm/x: "), "{m}");
    }
}
