//! `weft-agent`: parses configuration, starts the agent, runs until SIGTERM or SIGINT.

use std::io::IsTerminal;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use weft_agent::config::{Config, Flags, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load(Flags::parse())?;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: journald and log files get plain text.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    let agent = weft_agent::supervisor::Agent::start(config).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    agent.run(shutdown).await
}
