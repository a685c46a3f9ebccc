//! The `byokd` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use byokd::audit::RecordedHead;
use byokd::auth::{PRINCIPAL_TOKEN_PREFIX, token_digest};
use byokd::config::{self, Config, LogFormat, Overrides};
use byokd::model::Time;
use byokd::offline::Repair;
use byokd::server::{self, Announcement, ServeOptions};

/// Exit code for a failure to start, run or complete.
const EXIT_FAILURE: u8 = 1;
/// Exit code for a configuration or usage error.
const EXIT_CONFIG: u8 = 2;
/// Exit code of `audit verify` when the chain is broken.
const EXIT_BROKEN_CHAIN: u8 = 3;

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
        #[command(flatten)]
        location: Location,
        /// Address to listen on (overrides the config file).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Log format (overrides the config file).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// Address of the ops listener: Prometheus metrics and gRPC health (overrides the
        /// config file's [metrics] listen).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Without configured principals: replace the bootstrap admin token and print it.
        #[arg(long)]
        reset_bootstrap_token: bool,
    },
    /// Work on the audit trail of a data directory while the server is stopped (or of a
    /// copy, such as a backup).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Generate a principal token and the `token_sha256` line for the config file.
    NewToken,
    /// Apply the schema migrations the configured PostgreSQL database lacks (each replica
    /// also does at start; safe while replicas run and when several run it at once).
    Migrate {
        #[command(flatten)]
        location: Location,
    },
    /// Take an online backup from the running server (admin token) into a file: every record
    /// but leases, still encrypted, with the audit chain. Useless without the master key.
    Backup {
        #[command(flatten)]
        location: Location,
        /// The backup file to write (refuses to overwrite one).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Load a backup into the configured data directory, which must hold no data yet, and
    /// verify it (audit chain, every value decrypts under the configured master key) before
    /// the data directory becomes usable.
    ///
    /// A backup knows nothing of what happened after it was taken: name the source server's
    /// audit export with --revocations-from (secrets it records as revoked since are revoked
    /// again), or accept with --without-later-revocations that they come back.
    #[command(group(clap::ArgGroup::new("later").required(true).args(["revocations_from", "without_later_revocations"])))]
    Restore {
        #[command(flatten)]
        location: Location,
        /// The backup file.
        #[arg(long = "in")]
        input: PathBuf,
        /// The JSONL audit export (`byokd audit export`) of the server the backup came from:
        /// secrets revoked after the backup are revoked again, secrets rotated since are listed.
        #[arg(long)]
        revocations_from: Option<PathBuf>,
        /// Restore as the backup is: secrets revoked after it was taken come back.
        #[arg(long)]
        without_later_revocations: bool,
    },
}

/// How a client command reaches the running server.
#[derive(Args)]
struct ClientArgs {
    /// Bearer token of an admin principal.
    #[arg(long, env = "BYOKD_TOKEN", hide_env_values = true)]
    token: String,
    /// Server URL (default: from the config's listen address and [tls], e.g.
    /// https://127.0.0.1:50051).
    #[arg(long)]
    target: Option<String>,
    /// CA certificate (PEM) to trust for the server (default with [tls]: the server's own
    /// certificate file).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Name to expect in the server's certificate (default: localhost).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Client certificate (PEM), for mutual TLS.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Client key (PEM), for mutual TLS.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain. Exit code 0: intact; 3: broken; 1: could not check.
    Verify {
        #[command(flatten)]
        location: Location,
        /// First entry to check (default: the start of the chain).
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        /// Last entry to check (default: the head).
        #[arg(long, default_value_t = 0)]
        to_seq: u64,
        /// A head recorded earlier, as SEQ:HEXHASH; the trail must still reach it.
        #[arg(long, value_parser = parse_head)]
        expect_head: Option<RecordedHead>,
    },
    /// Find where a damaged audit trail breaks (a stopped server's data directory) and, with
    /// --apply, cut it there and record what was lost in a `Repair` entry. Exit code 0:
    /// intact, or repaired; 3: damaged, nothing changed (without --apply); 1: failed.
    Repair {
        #[command(flatten)]
        location: Location,
        /// Cut the trail (copies of the damaged files are kept), end every outstanding
        /// lease, and record the repair in the trail.
        #[arg(long)]
        apply: bool,
    },
    /// Write audit entries as JSON lines (one object per line, RFC 3339 times) to stdout.
    Export {
        #[command(flatten)]
        location: Location,
        /// Only entries at or after this time: RFC 3339 (2026-11-01T00:00:00Z) or an age (24h).
        #[arg(long, value_parser = parse_since)]
        since: Option<Time>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// JSON lines.
    Jsonl,
}

/// Where the data directory and its key are.
#[derive(Args)]
struct Location {
    /// TOML config file.
    #[arg(long, env = config::ENV_CONFIG)]
    config: Option<PathBuf>,
    /// Data directory (overrides the config file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Local master key file (overrides the config file; default <data-dir>/master.key).
    #[arg(long)]
    master_key: Option<PathBuf>,
}

impl Location {
    fn load(
        self,
        listen: Option<SocketAddr>,
        log_format: Option<LogFormat>,
        metrics_listen: Option<SocketAddr>,
    ) -> Result<Config, ExitCode> {
        let database_url = match std::env::var(config::ENV_DATABASE_URL) {
            Ok(text) => match byokd::store::DatabaseUrl::parse(&text) {
                Ok(url) => Some(url),
                Err(e) => {
                    eprintln!("byokd: {}: {e}", config::ENV_DATABASE_URL);
                    return Err(ExitCode::from(EXIT_CONFIG));
                }
            },
            Err(_) => None,
        };
        Config::load(Overrides {
            config: self.config,
            listen,
            data_dir: self.data_dir,
            log_format,
            master_key: self.master_key,
            metrics_listen,
            database_url,
        })
        .map_err(|e| {
            eprintln!("byokd: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
    }
}

/// mimalloc instead of glibc's malloc: the server allocates per request on many threads,
/// where glibc's arenas cost a measurable share of a `Get` (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve {
            location,
            listen,
            log_format,
            metrics_listen,
            reset_bootstrap_token,
        } => {
            let config = match location.load(listen, log_format, metrics_listen) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(config.log_format);
            let options = ServeOptions {
                reset_bootstrap_token,
            };
            run_async(
                server::run(config, options, &announce, shutdown_signal()),
                |()| ExitCode::SUCCESS,
            )
        }
        Command::Audit { command } => audit(command),
        Command::Backup {
            location,
            out,
            client,
        } => {
            init_logging_quiet();
            let config = match location.load(None, None, None) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let target = byokd::client::Target {
                url: client.target,
                token: byokd::crypto::SecretToken::new(client.token),
                ca: client.ca,
                server_name: client.server_name,
                client_identity: client.client_cert.zip(client.client_key),
            };
            run_async(byokd::client::backup(&config, &target, &out), |summary| {
                println!(
                    "backup written to {}: {} records, {} bytes, audit head seq {} hash {}",
                    out.display(),
                    summary.records,
                    summary.bytes,
                    summary.header.audit_head_seq,
                    summary.header.audit_head_hash
                );
                println!(
                    "it is encrypted under master key(s) {}: keep that key, or this backup is useless",
                    summary.header.master_key_ids.join(", ")
                );
                ExitCode::SUCCESS
            })
        }
        Command::Restore {
            location,
            input,
            revocations_from,
            without_later_revocations: _,
        } => {
            init_logging_quiet();
            let config = match location.load(None, None, None) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let later = match revocations_from {
                Some(export) => byokd::offline::LaterChanges::Replay(export),
                None => byokd::offline::LaterChanges::Ignore,
            };
            run_async(byokd::offline::restore(&config, &input, later), |summary| {
                println!(
                    "restored {} records into {}: audit chain verified ({} entries, head seq {}), {} secret versions decrypted; the backup was taken at {}",
                    summary.records,
                    config.store.describe(&config.data_dir),
                    summary.audit_entries,
                    summary.header.audit_head_seq,
                    summary.versions_checked,
                    summary.header.created_at
                );
                for (tenant, name) in &summary.revocations_replayed {
                    println!("revoked again (revoked after the backup): {tenant}/{name}");
                }
                for (tenant, name) in &summary.purges_replayed {
                    println!("purged again (purged after the backup): {tenant}/{name}");
                }
                for (tenant, name) in &summary.rotated_after {
                    println!(
                        "rotated after the backup, restored with its older value (rotate it again): {tenant}/{name}"
                    );
                }
                ExitCode::SUCCESS
            })
        }
        Command::Migrate { location } => {
            init_logging_quiet();
            let config = match location.load(None, None, None) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_async(byokd::offline::migrate(&config), |done| {
                println!("{done}");
                ExitCode::SUCCESS
            })
        }
        Command::NewToken => match byokd::crypto::random_token(PRINCIPAL_TOKEN_PREFIX) {
            Ok(token) => {
                println!(
                    "token (give to the client, store nowhere else): {}",
                    token.expose_secret()
                );
                println!(
                    "token_sha256 = \"{}\"",
                    hex::encode(token_digest(token.expose_secret()))
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("byokd: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
    }
}

fn audit(command: AuditCommand) -> ExitCode {
    init_logging_quiet();
    match command {
        AuditCommand::Verify {
            location,
            from_seq,
            to_seq,
            expect_head,
        } => {
            let config = match location.load(None, None, None) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_async(
                byokd::offline::verify_audit(&config, from_seq, to_seq, expect_head),
                |report| {
                    if let Some((seq, hash)) = report.head {
                        println!("head: seq {seq} hash {}", hex::encode(hash));
                    }
                    match report.broken {
                        None => {
                            println!(
                                "audit chain intact: {} entries checked after anchor {}",
                                report.checked, report.anchor_seq
                            );
                            ExitCode::SUCCESS
                        }
                        Some((seq, why)) => {
                            println!("audit chain BROKEN at entry {seq}: {why}");
                            ExitCode::from(EXIT_BROKEN_CHAIN)
                        }
                    }
                },
            )
        }
        AuditCommand::Repair { location, apply } => {
            let config = match location.load(None, None, None) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_async(
                byokd::offline::repair_audit(&config, apply),
                |outcome| match outcome {
                    Repair::NothingToDo => {
                        println!("the audit trail is intact; nothing to repair");
                        ExitCode::SUCCESS
                    }
                    Repair::Planned(plan) => {
                        println!("audit trail DAMAGED: {}", plan.damage);
                        println!(
                            "a repair cuts the trail before entry {}, keeps copies of the damaged files, \
                             ends {} outstanding leases and records this in the trail; \
                             run again with --apply to do it (or restore a backup instead)",
                            plan.damage.first_lost, plan.leases
                        );
                        ExitCode::from(EXIT_BROKEN_CHAIN)
                    }
                    Repair::Done { seq, note } => {
                        println!("repaired: recorded as audit entry {seq}: {note}");
                        ExitCode::SUCCESS
                    }
                },
            )
        }
        AuditCommand::Export {
            location,
            since,
            format: ExportFormat::Jsonl,
        } => {
            let config = match location.load(None, None, None) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let mut out = std::io::stdout().lock();
            run_async(
                byokd::offline::export_audit(&config.store, &config.data_dir, since, &mut out),
                |count| {
                    eprintln!("byokd: exported {count} audit entries");
                    ExitCode::SUCCESS
                },
            )
        }
    }
}

/// Runs `future` on a new runtime; `ok` turns its result into the exit code.
fn run_async<T, F>(future: F, ok: impl FnOnce(T) -> ExitCode) -> ExitCode
where
    F: std::future::Future<Output = Result<T, server::ServeError>>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("byokd: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(future) {
        Ok(value) => ok(value),
        Err(e) => {
            tracing::error!(error = %e, "byokd failed");
            eprintln!("byokd: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn parse_head(text: &str) -> Result<RecordedHead, String> {
    let (seq, hash) = text.split_once(':').ok_or("expected SEQ:HEXHASH")?;
    let seq = seq.parse().map_err(|_| "SEQ must be a number")?;
    let hash = hex::decode(hash)
        .ok()
        .and_then(|h| h.try_into().ok())
        .ok_or("HEXHASH must be 64 hex digits")?;
    Ok(RecordedHead { seq, hash })
}

fn parse_since(text: &str) -> Result<Time, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(Time::from_system(t));
    }
    let age = humantime::parse_duration(text)
        .map_err(|_| "expected an RFC 3339 time or an age such as 24h")?;
    Ok(Time::from_system(SystemTime::now()).minus(age))
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
        Announcement::Ops(addr) => println!("byokd metrics and health on {addr}"),
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

/// Offline commands log warnings and errors only (to stderr), unless `BYOKD_LOG` says more.
fn init_logging_quiet() {
    let filter =
        EnvFilter::try_from_env(config::ENV_LOG).unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
