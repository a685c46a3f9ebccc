//! Startup and shutdown: wires the store, the master key and the principals into a vault,
//! and serves it over gRPC with health checking and server reflection.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::admission::{Admission, AdmissionLayer};
use crate::api;
use crate::auth::{self, Principal, Principals, Role, TenantScope};
use crate::chain::ChainKey;
use crate::config::{AuditRetention, Config, MasterKeyConfig, TlsConfig};
use crate::connection::{ConnTimeouts, Incoming};
use crate::keyring::{
    DataKeyCache, Keyring, KeyringError, MasterKeySpec, StoredKey, WrapContext, make_key_check,
    verify_key_check,
};
use crate::model::PrincipalId;
use crate::quota::Quotas;
use crate::rotation::{KeyVersion, KeyringState, RotationSettings, Rotator};
use crate::service::VaultService;
use crate::store::{
    Engine, Guard, MetaKey, MetaValue, RepairNote, Store, StoreError, Transaction, load_meta,
    put_meta,
};
use crate::vault::{Vault, VaultParts};

/// Id of the admin principal created when no principals are configured.
pub const BOOTSTRAP_PRINCIPAL: &str = "bootstrap-admin";
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
    let store = open_store(&config.store, &config.data_dir)?;
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

/// Opens the store of a data directory with the configured engine.
pub fn open_store(engine: &Engine, data_dir: &Path) -> Result<Arc<dyn Store>, ServeError> {
    raise_open_files_limit();
    let path = engine.location(data_dir);
    engine
        .open_at(&path)
        .map_err(|source| ServeError::OpenStore { path, source })
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

    let rotator = Arc::new(Rotator::new(
        store.clone(),
        keys.keyring.clone(),
        RotationSettings {
            target: config.master_key.spec.clone(),
            aws: config.master_key.aws,
            batch: config.master_key.rewrap_batch,
            pause: config.master_key.rewrap_pause,
        },
    ));
    rotator.resume(&keys.state);
    let started = std::time::Instant::now();
    let usage = Quotas::count(&*store).await?;
    tracing::info!(
        tenants = usage.len(),
        ms = started.elapsed().as_millis() as u64,
        "tenant usage counted"
    );
    let quotas = Arc::new(Quotas::new(config.quotas, config.data_dir.clone(), usage));
    let vault = Arc::new(Vault::new(VaultParts {
        quotas,
        store,
        keyring: keys.keyring,
        cache: DataKeyCache::new(config.master_key.cache),
        rotator,
        chain: keys.chain,
        principals,
        policy: config.lease,
        limits: config.limits,
        scratch_dir: config.data_dir.clone(),
    }));
    let gc = tokio::spawn(collect_leases(vault.clone(), config.gc_interval));
    let retention = config
        .audit_retention
        .map(|policy| tokio::spawn(prune_audit(vault.clone(), policy)));
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

/// Streams one connection may have the server reset for its errors before it is closed
/// (hyper's default, which tonic switches off unless told).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The ops listener: `GET /metrics` (Prometheus text, HTTP/1.1) and `grpc.health.v1`
/// (plaintext HTTP/2) on one port, until shutdown. Carries no secrets and needs no token;
/// its connections are under the same watch as the main port's, and its requests under
/// admission (health `Watch` and scrapes in small pools).
async fn serve_ops(
    incoming: Incoming,
    admission: AdmissionLayer,
    max_streams: u32,
    vault: Arc<Vault>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt;
    let metrics = axum::routing::get(move || {
        let vault = vault.clone();
        async move { render_metrics(vault).await }
    });
    let router = tonic::service::Routes::new(health)
        .prepare()
        .into_axum_router()
        .route("/metrics", metrics)
        .fallback(|| async { (http::StatusCode::NOT_FOUND, "not found\n") });
    let app = tower::ServiceBuilder::new()
        .layer(admission)
        .map_response(|response: axum::response::Response| response.map(tonic::body::Body::new))
        .service(router);
    let mut incoming = std::pin::pin!(incoming);
    loop {
        let accepted = tokio::select! {
            accepted = incoming.next() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let Some(Ok(io)) = accepted else {
            continue;
        };
        let info = io.info();
        let app = tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(info.clone());
                request
            },
        );
        tokio::spawn(async move {
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http2()
                .max_concurrent_streams(max_streams)
                .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .await
            {
                tracing::debug!(error = %e, "ops connection ended");
            }
        });
    }
}

async fn render_metrics(vault: Arc<Vault>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let runtime = tokio::runtime::Handle::current();
    let text = tokio::task::spawn_blocking(move || {
        let snapshot = runtime
            .block_on(vault.metrics_snapshot())
            .map_err(|e| e.to_string())?;
        crate::metrics::render(&snapshot).map_err(|e| e.to_string())
    })
    .await;
    match text {
        Ok(Ok(text)) => (
            [(http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "metrics: cannot read the vault's state");
            (http::StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics task failed");
            (http::StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
    }
}

/// True if `current` is the configured master key, or (for a local key) a version that a
/// rotation created from it: `<path>.v<N>`, written next to the configured file.
/// A recorded local key file that is gone may have moved with its data (a restore into
/// another directory or host): the configured key file, or the file of the recorded name
/// beside it (`<path>.v<N>` of a rotation), stands in for it if its key id is the one
/// recorded. Key ids come from the key material, so no other key can pass.
async fn moved_local_key(
    config: &MasterKeyConfig,
    recorded: &MasterKeySpec,
    key_id: &str,
) -> Option<Arc<dyn crate::keyring::MasterKey>> {
    let (MasterKeySpec::Local { path: configured }, MasterKeySpec::Local { path: recorded }) =
        (&config.spec, recorded)
    else {
        return None;
    };
    let mut candidates = vec![configured.clone()];
    if let (Some(dir), Some(name)) = (configured.parent(), recorded.file_name()) {
        candidates.push(dir.join(name));
    }
    for path in candidates {
        let spec = MasterKeySpec::Local { path: path.clone() };
        if let Ok((key, _)) = spec.open(&config.aws, false).await
            && key.key_id() == key_id
        {
            tracing::info!(
                recorded = %recorded.display(),
                found = %path.display(),
                key_id,
                "a master key file moved with its data; using it where the config points"
            );
            return Some(key);
        }
    }
    None
}

fn rotated_from(current: &MasterKeySpec, configured: &MasterKeySpec) -> bool {
    match (current, configured) {
        (MasterKeySpec::Local { path: current }, MasterKeySpec::Local { path: configured }) => {
            let (current, configured) = (current.as_os_str(), configured.as_os_str());
            current == configured
                || current
                    .to_str()
                    .zip(configured.to_str())
                    .and_then(|(c, base)| c.strip_prefix(base)?.strip_prefix(".v"))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        }
        _ => current == configured,
    }
}

/// Whether `open_keys` may initialise a new data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initialise {
    /// Create the key-check record, the audit seed and (for a local key) the key file if
    /// this is a new data directory.
    IfNew,
    /// Only open what exists (offline tools, backups).
    Never,
}

/// The keys of a data directory, verified against it.
pub struct Keys {
    /// The master key versions.
    pub keyring: Arc<Keyring>,
    /// The audit chain's key.
    pub chain: Arc<ChainKey>,
    /// The stored keyring state (versions, rotation job).
    pub state: KeyringState,
}

/// Opens the master key versions recorded in the data directory and proves each is the one
/// recorded (by unwrapping its key-check record): a wrong, missing or unreachable key stops
/// startup here rather than failing requests later. A new data directory is initialised with
/// the configured key (creating a local key file if absent). Then unwraps (or creates) the
/// audit seed and derives the audit chain's key from it.
pub async fn open_keys(
    config: &MasterKeyConfig,
    store: &dyn Store,
    initialise: Initialise,
    data_dir: &Path,
) -> Result<Keys, ServeError> {
    let state = match KeyringState::load(store).await.map_err(rotation_error)? {
        Some(state) => state,
        None if initialise == Initialise::Never => {
            return Err(ServeError::NotInitialised(data_dir.to_path_buf()));
        }
        None => {
            let (key, created) = config.spec.open(&config.aws, true).await?;
            if created {
                tracing::info!(key = %config.spec, key_id = key.key_id(), "created local master key");
            }
            let check = make_key_check(&*key)
                .await
                .map_err(|e| key_error(&config.spec, key.key_id(), e))?;
            let state = KeyringState {
                current: 1,
                versions: vec![KeyVersion {
                    version: 1,
                    spec: config.spec.clone(),
                    key_id: key.key_id().to_string(),
                    check,
                    retired_at: None,
                }],
                rotation: None,
            };
            // Another process (or task) initialising the same store at once may win: then
            // its keyring is the one.
            match create_meta(store, &state).await? {
                Some(theirs) => theirs,
                None => state,
            }
        }
    };
    let mut keys = BTreeMap::new();
    for v in state.versions.iter().filter(|v| v.retired_at.is_none()) {
        let key = match v.spec.open(&config.aws, false).await {
            Ok((key, _)) => key,
            Err(KeyringError::Io { path, source })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                match moved_local_key(config, &v.spec, &v.key_id).await {
                    Some(key) => key,
                    None => {
                        return Err(ServeError::MasterKeyMissing {
                            path,
                            expected: v.key_id.clone(),
                        });
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        if key.key_id() != v.key_id {
            return Err(ServeError::WrongMasterKey {
                expected: v.key_id.clone(),
                found: key.key_id().to_string(),
            });
        }
        verify_key_check(&*key, &v.check)
            .await
            .map_err(|e| key_error(&v.spec, &v.key_id, e))?;
        keys.insert(v.version, key);
    }
    let keyring = Arc::new(Keyring::new(keys, state.current));
    if state
        .version(state.current)
        .is_some_and(|v| !rotated_from(&v.spec, &config.spec))
    {
        tracing::warn!(
            configured = %config.spec,
            "the configured master key is not the current one; call RotateMasterKey to move to it"
        );
    }
    let stored = match load_meta::<StoredKey>(store).await? {
        Some(stored) => stored.value,
        None if initialise == Initialise::Never => {
            return Err(ServeError::NotInitialised(data_dir.to_path_buf()));
        }
        None => {
            let (stored, _) = StoredKey::generate(&keyring, &WrapContext::AuditSeed).await?;
            // The seed of another process initialising the store at once, if it won.
            create_meta(store, &stored).await?.unwrap_or(stored)
        }
    };
    let seed = stored
        .unwrap(&keyring, &WrapContext::AuditSeed)
        .await
        .map_err(|e| key_error(&config.spec, &keyring.current().1, e))?;
    Ok(Keys {
        keyring,
        chain: Arc::new(ChainKey::derive(&seed)),
        state,
    })
}

/// A key that failed its startup check, explained.
fn key_error(spec: &MasterKeySpec, key_id: &str, e: KeyringError) -> ServeError {
    match e {
        KeyringError::Unwrap | KeyringError::ForeignKey { .. } => ServeError::KeyCheckFailed {
            key_id: key_id.to_string(),
        },
        KeyringError::Unavailable(detail) => ServeError::KeyUnreachable {
            key: spec.to_string(),
            detail,
        },
        KeyringError::KeyUnusable(detail) => ServeError::KeyUnusable {
            key: spec.to_string(),
            detail,
        },
        other => other.into(),
    }
}

fn rotation_error(e: crate::rotation::RotationError) -> ServeError {
    match e {
        crate::rotation::RotationError::Store(e) => ServeError::Store(e),
        crate::rotation::RotationError::Keyring(e) => ServeError::Keyring(e),
        _ => ServeError::CorruptMeta { what: "keyring" },
    }
}

/// Stores `value` if the store holds none yet. If another process (or task) stored one
/// first, nothing is written and theirs is returned.
async fn create_meta<T: MetaValue>(store: &dyn Store, value: &T) -> Result<Option<T>, ServeError> {
    let created = store
        .commit(Transaction {
            guards: vec![Guard::meta(T::KEY, None)],
            writes: vec![put_meta(value)?],
            audit: None,
        })
        .await;
    match created {
        Ok(_) => Ok(None),
        Err(StoreError::Conflict) => Ok(load_meta::<T>(store).await?.map(|meta| meta.value)),
        Err(e) => Err(e.into()),
    }
}

/// The SHA-256 of the bootstrap admin's token (stored as its 32 bytes).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct BootstrapAdmin(auth::TokenDigest);

crate::postcard_meta!(BootstrapAdmin, MetaKey::BootstrapAdmin);

/// With no principals configured: an admin principal whose token was printed once, at the
/// first start (or now, if asked to reset it).
async fn bootstrap_principals(
    store: &dyn Store,
    reset: bool,
    announce: &Announcer,
) -> Result<Principals, ServeError> {
    let corrupt = || ServeError::CorruptMeta {
        what: "bootstrap-admin",
    };
    let stored = load_meta::<BootstrapAdmin>(store).await?;
    let digest: auth::TokenDigest = match stored {
        Some(stored) if !reset => stored.value.0,
        stored => {
            let token = crate::crypto::random_token(auth::PRINCIPAL_TOKEN_PREFIX)
                .map_err(ServeError::Rng)?;
            let digest = auth::token_digest(token.expose_secret());
            let replaced = store
                .commit(Transaction {
                    guards: vec![Guard::meta(
                        MetaKey::BootstrapAdmin,
                        stored.map(|s| s.revision),
                    )],
                    writes: vec![put_meta(&BootstrapAdmin(digest))?],
                    audit: None,
                })
                .await;
            match replaced {
                Ok(_) => {
                    announce(Announcement::BootstrapToken {
                        principal: BOOTSTRAP_PRINCIPAL,
                        token: token.expose_secret(),
                    });
                    digest
                }
                // Another process initialising the store at once created it: its token is
                // the one (it printed it).
                Err(StoreError::Conflict) if !reset => {
                    load_meta::<BootstrapAdmin>(store)
                        .await?
                        .ok_or(StoreError::Conflict)?
                        .value
                        .0
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    tracing::warn!(
        principal = BOOTSTRAP_PRINCIPAL,
        "no principals configured: serving the bootstrap admin only; configure [[principal]] tables for production"
    );
    let id = PrincipalId::parse(BOOTSTRAP_PRINCIPAL).map_err(|_| corrupt())?;
    Ok(Principals::new(vec![Principal {
        id,
        token_sha256: Some(digest),
        cert_ids: Default::default(),
        roles: [Role::Admin].into_iter().collect(),
        tenants: TenantScope::All,
        rate_limit: None,
    }]))
}

async fn prune_audit(vault: Arc<Vault>, policy: AuditRetention) {
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match vault.prune_audit(policy.keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "audit entries past retention pruned"),
            Err(e) => tracing::warn!(error = %e, "audit retention failed"),
        }
    }
}

/// File descriptors kept for the store (segment files, sled, the seals' temporary files):
/// connections may not take them.
const STORE_FD_RESERVE: u64 = 256;

/// The descriptor number at which connections are refused, logged.
fn descriptor_ceiling() -> Option<u64> {
    let ceiling = crate::connection::descriptor_ceiling(STORE_FD_RESERVE);
    if let Some(ceiling) = ceiling {
        tracing::info!(
            ceiling,
            reserve = STORE_FD_RESERVE,
            "connections are refused once this many files are open (the open-files limit less the store's reserve)"
        );
    }
    ceiling
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

async fn collect_leases(vault: Arc<Vault>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match vault.collect_expired_leases().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "expired leases collected"),
            Err(e) => tracing::warn!(error = %e, "expired lease collection failed"),
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

/// Keeps secrets out of core dumps: no core files, and not dumpable (which also keeps other
/// processes of the same user from ptrace-attaching).
fn harden_process() {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    // Everything byokd creates (sled's files too) is its user's alone.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let no_core = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, no_core) {
        tracing::warn!(error = %e, "could not disable core dumps (RLIMIT_CORE)");
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %e, "could not mark the process non-dumpable (PR_SET_DUMPABLE)");
    }
}

/// Most the soft limit on open files is raised to (Linux's default `fs.nr_open`).
const OPEN_FILES_CEILING: u64 = 1 << 20;

/// Raises the soft limit on open files to the hard one: every sealed audit segment keeps three
/// files open (entries, offsets, index: about a hundred per GB of trail), which outgrows the
/// usual soft limit of 1024 long before the hard limit.
pub(crate) fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let wanted = limit
        .maximum
        .unwrap_or(OPEN_FILES_CEILING)
        .min(OPEN_FILES_CEILING);
    if limit.current.is_some_and(|current| current >= wanted) {
        return;
    }
    let raised = Rlimit {
        current: Some(wanted),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(soft = wanted, "raised the open files limit"),
        Err(e) => tracing::warn!(
            error = %e,
            soft = ?limit.current,
            "could not raise the open files limit (RLIMIT_NOFILE)"
        ),
    }
}

/// Takes group and other permissions off the data directory and the store in it (a
/// directory created by hand, or files an older byokd or sled left 0644): 0700 directories,
/// files readable by byokd's user only. Other files there (a master key file) keep their
/// mode: their own checks refuse them if others may read them, because by then others may
/// have. Symbolic links inside are left alone.
fn make_private(data_dir: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let error = |path: &Path, source| ServeError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    let mut tightened = 0u64;
    let mut pending = vec![data_dir.to_path_buf()];
    let store = data_dir.join("db");
    while let Some(path) = pending.pop() {
        if path != data_dir && !path.starts_with(&store) {
            continue;
        }
        let meta = if path == data_dir {
            std::fs::metadata(&path)
        } else {
            std::fs::symlink_metadata(&path)
        }
        .map_err(|e| error(&path, e))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                .map_err(|e| error(&path, e))?;
            tightened += 1;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| error(&path, e))? {
                pending.push(entry.map_err(|e| error(&path, e))?.path());
            }
        }
    }
    if tightened > 0 {
        tracing::warn!(
            paths = tightened,
            dir = %data_dir.display(),
            "the data directory was readable by others: took group and other permissions off"
        );
    }
    Ok(())
}

pub(crate) fn create_private_dir(path: &Path) -> Result<(), ServeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| ServeError::DataDir {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
