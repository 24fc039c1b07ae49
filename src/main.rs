//! `llmtail`: command line, logging, and the exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use llmtail::config::Config;
use llmtail::daemon::{self, Ended};

/// Tail-sampling OTLP trace processor that understands LLM calls.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Path of the YAML config file.
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
    /// Check the config file, print every problem, and exit (0 valid, 2 invalid).
    #[arg(long)]
    validate: bool,
}

/// Exit code for an invalid config, as `--validate` documents.
const EXIT_INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.config) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!("{}: {} problem(s):", cli.config.display(), errors.0.len());
            for p in &errors.0 {
                eprintln!("  {p}");
            }
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    if cli.validate {
        println!("{}: valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(cfg, daemon::termination_signal())) {
        Ok(Ended::Flushed) => ExitCode::SUCCESS,
        Ok(Ended::TimedOut { lost_spans }) => {
            eprintln!("shutdown timeout: {lost_spans} kept spans could not be exported");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("llmtail: {e:#}");
            ExitCode::FAILURE
        }
    }
}
