//! The `meridian` command: run a node, set up a cluster, talk to one, measure one.

// Items are `pub` to mark each CLI module's interface; a binary exports nothing.
#![allow(unreachable_pub)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

// glibc's allocator showed up as a tenth of the server's CPU under load (many small, short-lived
// allocations crossing threads); mimalloc's thread-local free lists make those cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, the whole cause chain: what a person needs to act on it.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
