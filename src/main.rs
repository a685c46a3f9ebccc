//! The `byokd` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use byokd::auth::{PRINCIPAL_TOKEN_PREFIX, token_digest};
use byokd::config::{self, Config, LogFormat, Overrides};
use byokd::server::{self, Announcement, ServeOptions};

/// Exit code for a configuration or usage error.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure to start or to run.
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(
    name = "byokd",
    version,
    about = "BYOK vault: end users' model-provider API keys, encrypted, leased and audited"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (with no config: ./byokd-data, a generated local master key, a
    /// bootstrap admin token, 127.0.0.1:50051).
    Serve {
        /// TOML config file.
        #[arg(long, env = config::ENV_CONFIG)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the config file).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory (overrides the config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Log format (overrides the config file).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// Without configured principals: replace the bootstrap admin token and print it.
        #[arg(long)]
        reset_bootstrap_token: bool,
    },
    /// Generate a principal token and the `token_sha256` line for the config file.
    NewToken,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            log_format,
            reset_bootstrap_token,
        } => {
            let overrides = Overrides {
                config,
                listen,
                data_dir,
                log_format,
            };
            let config = match Config::load(overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("byokd: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(config.log_format);
            let options = ServeOptions {
                reset_bootstrap_token,
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("byokd: cannot start the async runtime: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            match runtime.block_on(server::run(config, options, &announce, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "byokd stopped");
                    eprintln!("byokd: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::NewToken => match byokd::crypto::random_token(PRINCIPAL_TOKEN_PREFIX) {
            Ok(token) => {
                println!(
                    "token (give to the client, store nowhere else): {}",
                    &*token
                );
                println!("token_sha256 = \"{}\"", hex::encode(token_digest(&token)));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("byokd: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
    }
}

/// Shows the server's announcements on stdout. Tests and scripts read the `listening` line.
fn announce(announcement: Announcement<'_>) {
    match announcement {
        Announcement::BootstrapToken { principal, token } => {
            println!(
                "byokd: no principals configured; created the bootstrap admin principal {principal:?}."
            );
            println!(
                "byokd: its token is shown only now (restart with --reset-bootstrap-token for a new one):"
            );
            println!("export BYOKD_TOKEN={token}");
        }
        Announcement::Listening(addr) => println!("byokd listening on {addr}"),
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env(config::ENV_LOG).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
