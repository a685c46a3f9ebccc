//! Startup and shutdown: wires the store, the master key and the principals into a vault,
//! and serves it over gRPC with health checking and server reflection.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::admission::{Admission, AdmissionLayer};
use crate::api;
use crate::auth::Principals;
use crate::config::{AuditRetention, Config, TlsConfig};
use crate::connection::{ConnTimeouts, Incoming};
use crate::keyring::{DataKeyCache, KeyringError};
use crate::quota::Quotas;
use crate::rotation::{RotationSettings, Rotator};
use crate::runner::Runner;
use crate::service::VaultService;
use crate::store::{RepairNote, Store, StoreError, load_meta};
use crate::vault::{Vault, VaultParts};

mod ops;
mod process;
mod startup;

use self::ops::serve_ops;
pub(crate) use self::process::{create_private_dir, raise_open_files_limit};
use self::process::{descriptor_ceiling, harden_process, make_private};
use self::startup::bootstrap_principals;
#[cfg(test)]
use self::startup::rotated_from;
pub use self::startup::{BOOTSTRAP_PRINCIPAL, Initialise, Keys, open_keys, open_store};

/// How long in-flight requests may run after a shutdown signal before they are cut off.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store in {path}: {source}")]
    OpenStore {
        /// The database directory.
        path: PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The data directory has no key-check record: it was never initialised by `serve`.
    #[error("{0} is not an initialised byokd data directory (no key-check record)")]
    NotInitialised(PathBuf),
    /// The master key could not be loaded.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The key file is gone although the data directory was created with a key.
    #[error(
        "master key file {path} is missing, but the data directory was created with master key {expected}; \
         restore that key file (byokd never creates a new key for existing data)"
    )]
    MasterKeyMissing {
        /// The configured key file.
        path: PathBuf,
        /// The id of the key the data needs.
        expected: String,
    },
    /// The configured master key is not the one the data directory was created with.
    #[error(
        "wrong master key: the data directory was created with master key {expected}, \
         but the configured key is {found}; refusing to start"
    )]
    WrongMasterKey {
        /// Id of the key the data needs.
        expected: String,
        /// Id of the configured key.
        found: String,
    },
    /// The key-check record did not unwrap under the configured key.
    #[error(
        "master key {key_id} failed the key check (wrong key, or key file or data directory altered); refusing to start"
    )]
    KeyCheckFailed {
        /// Id of the configured key.
        key_id: String,
    },
    /// The key service could not be reached.
    #[error("cannot reach {key}: {detail}; refusing to start")]
    KeyUnreachable {
        /// The key.
        key: String,
        /// What the key service said.
        detail: String,
    },
    /// The key exists but cannot be used (disabled, deleted, no permission).
    #[error(
        "{key} cannot be used (disabled, pending deletion, not found, or no permission): {detail}; refusing to start"
    )]
    KeyUnusable {
        /// The key.
        key: String,
        /// What the key service said.
        detail: String,
    },
    /// A stored meta value could not be decoded.
    #[error("corrupt {what} record in the data directory")]
    CorruptMeta {
        /// Which record.
        what: &'static str,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file could not be used.
    #[error("TLS: {path}: {detail}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Server reflection could not be built from the descriptor sets.
    #[error("server reflection: {0}")]
    Reflection(String),
    /// A start-up task on a blocking thread failed.
    #[error("start-up task failed: {0}")]
    Startup(String),
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Writing an export failed.
    #[error("export: {0}")]
    Export(String),
    /// A backup could not be taken or written.
    #[error("backup: {0}")]
    Backup(String),
    /// A backup could not be restored; the data directory was left without data.
    #[error("restore: {0}")]
    Restore(String),
    /// `byokd audit repair --apply` cut the trail but did not get to record it.
    #[error(
        "an audit repair cut the trail but its Repair entry is not recorded yet; run `byokd audit repair --apply` again"
    )]
    RepairPending,
    /// Randomness for the bootstrap token failed.
    #[error("random number generator: {0}")]
    Rng(crate::crypto::CryptoError),
}

/// Startup choices that are not configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Replace the bootstrap admin token (when no principals are configured) and print the
    /// new one.
    pub reset_bootstrap_token: bool,
}

/// What the server tells the operator directly (on a terminal, never in the logs).
pub enum Announcement<'a> {
    /// A bootstrap admin principal got a new token. Shown this once.
    BootstrapToken {
        /// The principal's id.
        principal: &'a str,
        /// Its bearer token.
        token: &'a str,
    },
    /// The server accepts connections at this address.
    Listening(SocketAddr),
    /// The ops listener (metrics, health) accepts connections at this address.
    Ops(SocketAddr),
}

/// Something that shows announcements to the operator.
pub type Announcer = dyn Fn(Announcement<'_>) + Send + Sync;

/// Runs the server until `shutdown` completes, then drains in-flight requests and closes the
/// store.
pub async fn run(
    config: Config,
    options: ServeOptions,
    announce: &Announcer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    harden_process();
    create_private_dir(&config.data_dir)?;
    make_private(&config.data_dir)?;
    remove_stale_backups(&config.data_dir);
    crate::quota::prepare_volume(&config.data_dir, config.quotas.min_free_bytes).map_err(
        |source| ServeError::DataDir {
            path: config.data_dir.join(crate::quota::SPACE_FILE),
            source,
        },
    )?;
    let store = open_store(&config.store, &config.data_dir).await?;
    let result = serve(config, options, store.clone(), announce, shutdown).await;
    let closed = store.close().await.map_err(ServeError::from);
    tracing::info!("store closed");
    result.and(closed)
}

/// Deletes the temporary files of backups that a killed process left in the data directory
/// (a backup is written there before it is streamed; a running one deletes its own).
fn remove_stale_backups(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name
            .to_string_lossy()
            .starts_with(crate::vault::BACKUP_TEMP_PREFIX)
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "deleted the temporary file of an unfinished backup")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot delete the temporary file of an unfinished backup")
                }
            }
        }
    }
}

async fn serve(
    config: Config,
    options: ServeOptions,
    store: Arc<dyn Store>,
    announce: &Announcer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let keys = open_keys(
        &config.master_key,
        &*store,
        Initialise::IfNew,
        &config.data_dir,
    )
    .await?;
    if load_meta::<RepairNote>(&*store)
        .await?
        .is_some_and(|note| !note.value.0.is_empty())
    {
        return Err(ServeError::RepairPending);
    }
    let (version, key_id) = keys.keyring.current();
    tracing::info!(version, key_id, "master key verified");
    store.start_audit_chain(keys.chain.clone()).await?;
    match store.audit_head().await? {
        Some(head) => tracing::info!(
            seq = head.seq,
            hash = %hex::encode(head.hash),
            "audit head (record it elsewhere to detect truncation later)"
        ),
        None => tracing::info!("audit trail is empty"),
    }

    let principals = Arc::new(if config.principals.is_empty() {
        bootstrap_principals(&*store, options.reset_bootstrap_token, announce).await?
    } else {
        tracing::info!(count = config.principals.len(), "principals configured");
        Principals::new(config.principals.clone())
    });
    let admission = Admission::new(principals.clone(), config.limits, config.request_timeout);
    let timeouts = ConnTimeouts {
        handshake: config.limits.handshake_timeout,
        idle: config.limits.idle_timeout,
        stall: config.request_timeout,
    };
    let ceiling = descriptor_ceiling();

    let runner = Runner::new(store.clone(), config.job_turn, config.store.shared());
    let rotator = Arc::new(Rotator::new(
        store.clone(),
        keys.keyring.clone(),
        RotationSettings {
            target: config.master_key.spec.clone(),
            aws: config.master_key.aws,
            batch: config.master_key.rewrap_batch,
            pause: config.master_key.rewrap_pause,
            create_local: !config.store.shared(),
        },
        runner.clone(),
    ));
    let quotas = Arc::new(Quotas::new(config.quotas, config.data_dir.clone()));
    let vault = Arc::new(Vault::new(VaultParts {
        quotas,
        store,
        keyring: keys.keyring,
        cache: DataKeyCache::new(config.master_key.cache),
        rotator: rotator.clone(),
        chain: keys.chain,
        principals,
        policy: config.lease,
        limits: config.limits,
        scratch_dir: config.data_dir.clone(),
    }));
    // Whether this process holds the turn to run background work is known before it serves.
    match runner.step().await {
        Ok(true) => rotator.resume().await.map_err(startup::rotation_error)?,
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not take the background turn; trying again later")
        }
    }
    let turns = tokio::spawn(take_turns(runner.clone(), rotator.clone()));
    let gc = tokio::spawn(collect_leases(
        vault.clone(),
        runner.clone(),
        config.gc_interval,
    ));
    let sweep = tokio::spawn(sweep_secrets(
        vault.clone(),
        runner.clone(),
        config.gc_interval,
    ));
    // Only other processes sharing the store change keys behind this one's back: a process
    // alone on its store evicts what its own Rotate and Revoke destroy as they commit, and
    // would otherwise wake for every audit entry to learn nothing.
    let evictions = config
        .store
        .shared()
        .then(|| tokio::spawn(vault.clone().follow_keys()));
    let retention = config
        .audit_retention
        .map(|policy| tokio::spawn(prune_audit(vault.clone(), runner.clone(), policy)));
    let refusals = tokio::spawn(record_refused(
        vault.clone(),
        admission.clone(),
        config.limits.refused_audit_interval,
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, true).await;
    health
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    let (stop_ops_tx, stop_ops) = tokio::sync::watch::channel(false);
    let mut ops_task = None;
    if let Some(metrics) = config.metrics {
        let listener =
            TcpListener::bind(metrics.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: metrics.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: metrics.listen,
            source,
        })?;
        tracing::info!(%addr, "metrics and health listening");
        ops_task = Some(tokio::spawn(serve_ops(
            Incoming::new(
                listener,
                config.limits.max_ops_connections,
                ceiling,
                timeouts,
                false,
            ),
            AdmissionLayer::ops(admission.clone()),
            config.limits.http2_max_concurrent_streams,
            vault.clone(),
            health_service.clone(),
            stop_ops.clone(),
        )));
        announce(Announcement::Ops(addr));
    }
    let monitor = tokio::spawn(monitor_health(
        vault.clone(),
        health.clone(),
        config.health_interval,
        stop_ops.clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    // TLS files are read before listening, so that a bad one stops startup before the
    // server announces itself.
    let tls = config.tls.as_ref().map(tls_config).transpose()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    tracing::info!(%addr, "listening");
    if config.tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            addr = %addr,
            "serving PLAINTEXT on a non-loopback address (danger_allow_plaintext_non_loopback): tokens and values cross the network unencrypted"
        );
    }
    announce(Announcement::Listening(addr));

    let (draining_tx, draining) = tokio::sync::oneshot::channel::<()>();
    let reporter = health.clone();
    let draining_vault = vault.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutdown requested; draining in-flight requests");
        // Live audit streams end now (telling clients where to resume) instead of holding
        // the drain open.
        draining_vault.begin_shutdown();
        let _ = stop_ops_tx.send(true);
        set_health(&reporter, false).await;
        reporter
            .set_service_status(LIVENESS, ServingStatus::NotServing)
            .await;
        let _ = draining_tx.send(());
    };
    // The one place transport limits are set: per-request timeout, streams per connection,
    // HTTP/2 keepalive, TLS; admission (connections, authentication before a slot, body
    // deadline, slots that shed load instead of queueing); and below, the largest message
    // decoded.
    let mut builder = Server::builder()
        .timeout(config.request_timeout)
        .max_concurrent_streams(config.limits.http2_max_concurrent_streams)
        .http2_keepalive_interval(Some(config.limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.limits.http2_keepalive_timeout))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(
            tower::ServiceBuilder::new()
                // Outermost, so that shed and refused requests are counted too.
                .layer(crate::rpcmetrics::RpcMetricsLayer)
                .layer(AdmissionLayer::main(admission)),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            VaultService::new(vault)
                .with_request_timeout(config.request_timeout)
                .into_server()
                .max_decoding_message_size(config.limits.max_message_bytes),
        )
        .serve_with_incoming_shutdown(
            Incoming::new(
                listener,
                config.limits.max_connections,
                ceiling,
                timeouts,
                true,
            ),
            signal,
        );
    let result = tokio::select! {
        result = server => result.map_err(ServeError::from),
        () = async {
            if draining.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight requests did not finish in time; stopping");
            Ok(())
        }
    };
    gc.abort();
    sweep.abort();
    turns.abort();
    if let Some(evictions) = evictions {
        evictions.abort();
    }
    refusals.abort();
    if let Some(task) = retention {
        task.abort();
    }
    monitor.abort();
    if let Some(task) = ops_task {
        task.abort();
    }
    result
}

/// Streams one connection may have the server reset for its errors before it is closed
/// (hyper's default, which tonic switches off unless told).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The health service name that only says the process runs and is not shutting down (for
/// liveness probes: a KMS outage must not get the process restarted).
pub const LIVENESS: &str = "liveness";

/// Sets the readiness statuses: the overall one ("") and the vault's.
async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <crate::api::v1::vault_server::VaultServer<VaultService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Probes the store and the master key every `interval` and reports the result as the
/// readiness health, and liveness NOT_SERVING once the store failed for good, until shutdown.
async fn monitor_health(
    vault: Arc<Vault>,
    reporter: tonic_health::server::HealthReporter,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut serving = true;
    let mut alive = true;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let probe = vault.probe().await;
        if *stop.borrow() {
            return;
        }
        match (&probe, serving) {
            (Err(why), true) => tracing::error!(reason = %why, "health: NOT_SERVING"),
            (Ok(()), false) => tracing::info!("health: SERVING again"),
            _ => {}
        }
        serving = probe.is_ok();
        set_health(&reporter, serving).await;
        // Only a restart clears a store whose durability is unknown: say so to liveness.
        if alive && vault.needs_restart() {
            alive = false;
            tracing::error!(
                "liveness: NOT_SERVING (the store failed for good; restart the process)"
            );
            reporter
                .set_service_status(LIVENESS, ServingStatus::NotServing)
                .await;
        }
    }
}

/// Takes or renews the turn to run background work (see `runner`) every third of its length,
/// and while this process holds it, runs an unfinished master-key rewrap. Its first step is
/// one period after start-up's.
async fn take_turns(runner: Arc<Runner>, rotator: Arc<Rotator>) {
    let period = runner.renewal_period();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match runner.step().await {
            Ok(true) => {
                if let Err(e) = rotator.resume().await {
                    tracing::warn!(error = %e, "could not resume the master key rotation");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not renew or take the background turn"),
        }
    }
}

async fn prune_audit(vault: Arc<Vault>, runner: Arc<Runner>, policy: AuditRetention) {
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(fence) = runner.fence() else {
            continue;
        };
        match vault.prune_audit(policy.keep, fence).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "audit entries past retention pruned"),
            Err(e) => tracing::warn!(error = %e, "audit retention failed"),
        }
    }
}

/// Records the requests admission refused for the unauthenticated rate: one audit entry per
/// host (the 100 hosts most refused; the rest in one entry) every `every`.
async fn record_refused(vault: Arc<Vault>, admission: Arc<Admission>, every: Duration) {
    const HOSTS_PER_REPORT: usize = 100;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let report = admission.take_refused(HOSTS_PER_REPORT);
        if let Err(e) = vault.record_refused(&report, every).await {
            tracing::warn!(error = %e, "could not record refused requests");
        }
    }
}

async fn collect_leases(vault: Arc<Vault>, runner: Arc<Runner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(fence) = runner.fence() else {
            continue;
        };
        match vault.collect_expired_leases(fence).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "expired leases collected"),
            Err(e) => tracing::warn!(error = %e, "expired lease collection failed"),
        }
    }
}

/// Sweeps the secrets' lifecycles every `every` (see `vault::sweep`), and as soon as this
/// process takes the background turn: while it holds the turn, what fell due is done and the
/// secrets are counted for the gauges.
async fn sweep_secrets(vault: Arc<Vault>, runner: Arc<Runner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = runner.turn_taken() => {}
        }
        match vault.sweep_secrets(runner.fence()).await {
            Ok(counts) if counts.recorded > 0 => {
                tracing::info!(
                    recorded = counts.recorded,
                    "secrets' lifecycle events recorded"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep of secrets' lifecycles failed"),
        }
    }
}

/// The rustls configuration of `[tls]`: the server identity, and with a client CA, mutual TLS.
fn tls_config(tls: &TlsConfig) -> Result<ServerTlsConfig, ServeError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ServeError::Tls {
            path: path.to_path_buf(),
            detail: source.to_string(),
        })
    };
    crate::config::check_private(&tls.key, "TLS private key").map_err(|e| ServeError::Tls {
        path: tls.key.clone(),
        detail: e.to_string(),
    })?;
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(ca) = &tls.client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read(ca)?))
            .client_auth_optional(!tls.client_cert_required);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::MasterKeySpec;

    #[test]
    fn a_rotated_local_key_counts_as_the_configured_one() {
        let local = |p: &str| MasterKeySpec::Local { path: p.into() };
        assert!(rotated_from(
            &local("/k/master.key"),
            &local("/k/master.key")
        ));
        assert!(rotated_from(
            &local("/k/master.key.v2"),
            &local("/k/master.key")
        ));
        assert!(rotated_from(
            &local("/k/master.key.v13"),
            &local("/k/master.key")
        ));
        assert!(!rotated_from(
            &local("/k/master.key.v"),
            &local("/k/master.key")
        ));
        assert!(!rotated_from(
            &local("/k/master.key.vx"),
            &local("/k/master.key")
        ));
        assert!(!rotated_from(
            &local("/k/other.key"),
            &local("/k/master.key")
        ));
    }
}
