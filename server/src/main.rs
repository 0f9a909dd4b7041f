//! The `meridian` command: run a node, set up a cluster, talk to one, measure one.

// Items are `pub` to mark each CLI module's interface; a binary exports nothing.
#![allow(unreachable_pub)]

mod cli;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

// glibc's allocator showed up as a tenth of the server's CPU under load (many small, short-lived
// allocations crossing threads); mimalloc's thread-local free lists make those cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(error) => return refuse_arguments(&error),
    };
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, the whole cause chain: what a person needs to act on it.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap writes them; a bad argument becomes one line (what is wrong
/// and clap's tip, without the usage block), like every other error this command prints.
fn refuse_arguments(error: &clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => error.exit(),
        _ => {
            eprintln!("{}", one_line(&error.render().to_string()));
            ExitCode::from(2)
        }
    }
}

/// clap's message up to its usage block, on one line: `error: the following required
/// arguments were not provided: <KEY>`, `error: unexpected argument '--url' found; tip: ...`.
fn one_line(rendered: &str) -> String {
    let mut line = String::new();
    for part in rendered
        .lines()
        .map(str::trim)
        .take_while(|part| !part.starts_with("Usage:") && !part.starts_with("For more information"))
        .filter(|part| !part.is_empty())
    {
        if !line.is_empty() {
            line.push_str(if part.starts_with("tip:") { "; " } else { " " });
        }
        line.push_str(part);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_become_one_line() {
        let missing = "error: the following required arguments were not provided:\n  <KEY>\n\nUsage: meridian get <KEY>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(missing),
            "error: the following required arguments were not provided: <KEY>"
        );
        let unexpected = "error: unexpected argument '--url' found\n\n  tip: to pass '--url' as a value, use '-- --url'\n\nUsage: meridian get [OPTIONS] <KEY>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(unexpected),
            "error: unexpected argument '--url' found; tip: to pass '--url' as a value, use '-- --url'"
        );
    }

    #[test]
    fn every_argument_error_of_the_real_parser_is_one_line() {
        for argv in [
            &["meridian", "get"][..],
            &["meridian", "get", ""],
            &["meridian", "incr", "c", "abc"],
            &["meridian", "get", "--url", "x", "k"],
            &["meridian", "frobnicate"],
            &["meridian", "get", "-t", "tables", "k"],
        ] {
            let error = cli::Cli::try_parse_from(argv)
                .err()
                .unwrap_or_else(|| panic!("{argv:?} parsed"));
            let line = one_line(&error.render().to_string());
            assert!(line.starts_with("error: "), "{argv:?}: {line}");
            assert!(!line.contains('\n'), "{argv:?}: {line}");
            assert!(line.len() > "error: ".len() + 10, "{argv:?}: {line}");
        }
    }
}
