//! `weftctl`: command-line client of the weft agent.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    weft_cli::ctl::run(weft_cli::ctl::Cli::parse()).await
}
