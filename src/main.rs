//! The `mailgate` command: `run` and `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailgate::config::Config;

#[derive(Parser)]
#[command(name = "mailgate", version, about = "TLS-terminating IMAP and POP3 gateway")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Serve with the given configuration until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the effective configuration (secrets redacted), or every error with its key.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Commands::CheckConfig { config } => match Config::load(&config) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("error: {e}");
                }
                ExitCode::from(2)
            }
        },
        Commands::Run { config } => {
            init_tracing();
            let path = config;
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(errors) => {
                    for e in &errors.0 {
                        tracing::error!("configuration: {e}");
                    }
                    return ExitCode::from(2);
                }
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            let result = runtime.block_on(async {
                let listeners = mailgate::bind(&config).await?;
                mailgate::run(config, listeners, mailgate::shutdown::signal(), Some(path)).await
            });
            match result {
                Ok(()) => {
                    tracing::info!("stopped");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Logs go to stderr; `RUST_LOG` filters them (default `info`), rustls held to errors
/// unless the filter names it (see `log_budget`: its warnings are a peer's to trigger).
fn init_tracing() {
    let operator = std::env::var(tracing_subscriber::EnvFilter::DEFAULT_ENV).ok();
    let directives = mailgate::log_budget::filter_directives(operator.as_deref());
    let filter = tracing_subscriber::EnvFilter::try_new(directives)
        .unwrap_or_else(|_| mailgate::log_budget::filter_directives(None).into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
