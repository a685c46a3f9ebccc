//! Startup and shutdown: wires the store, the master key and the principals into a vault,
//! and serves it over gRPC with health checking and server reflection.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::api;
use crate::auth::{self, Principal, Principals, Role, TenantScope};
use crate::config::{Config, MasterKeyConfig};
use crate::keyring::{KeyCheck, KeyringError, LocalMasterKey, MasterKey};
use crate::model::PrincipalId;
use crate::service::VaultService;
use crate::store::{MetaKey, SledStore, Store, StoreError, Transaction, Write};
use crate::vault::Vault;

/// Id of the admin principal created when no principals are configured.
pub const BOOTSTRAP_PRINCIPAL: &str = "bootstrap-admin";
/// Largest request message accepted (a 64 KiB value plus generous room for the rest).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
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
    /// The store could not be opened or written.
    #[error("store in {path}: {source}")]
    Store {
        /// The database directory.
        path: PathBuf,
        /// Why.
        source: StoreError,
    },
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
        "master key {key_id} failed the key check (key file or data directory altered); refusing to start"
    )]
    KeyCheckFailed {
        /// Id of the configured key.
        key_id: String,
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
    /// Server reflection could not be built from the descriptor sets.
    #[error("server reflection: {0}")]
    Reflection(String),
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
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
    create_private_dir(&config.data_dir)?;
    let db_path = config.data_dir.join("db");
    let store_error = |source| ServeError::Store {
        path: db_path.clone(),
        source,
    };
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&db_path).map_err(store_error)?);
    let result = serve(config, options, store.clone(), announce, shutdown).await;
    let closed = store.close().await.map_err(store_error);
    tracing::info!("store closed");
    result.and(closed)
}

async fn serve(
    config: Config,
    options: ServeOptions,
    store: Arc<dyn Store>,
    announce: &Announcer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let db_path = config.data_dir.join("db");
    let store_error = |source| ServeError::Store {
        path: db_path.clone(),
        source,
    };
    let master = open_master_key(&config.master_key, &*store)
        .await
        .map_err(|e| match e {
            OpenKeyError::Serve(e) => e,
            OpenKeyError::Store(e) => store_error(e),
        })?;
    tracing::info!(key_id = master.key_id(), "master key verified");

    let principals = if config.principals.is_empty() {
        bootstrap_principals(&*store, options.reset_bootstrap_token, announce)
            .await
            .map_err(|e| match e {
                OpenKeyError::Serve(e) => e,
                OpenKeyError::Store(e) => store_error(e),
            })?
    } else {
        tracing::info!(count = config.principals.len(), "principals configured");
        Principals::new(config.principals.clone())
    };

    let vault = Arc::new(Vault::new(store, master, principals, config.lease));
    let gc = tokio::spawn(collect_leases(vault.clone(), config.gc_interval));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<crate::api::v1::vault_server::VaultServer<VaultService>>()
        .await;
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
    announce(Announcement::Listening(addr));

    let (draining_tx, draining) = tokio::sync::oneshot::channel::<()>();
    let reporter = health.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutdown requested; draining in-flight requests");
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        reporter
            .set_not_serving::<crate::api::v1::vault_server::VaultServer<VaultService>>()
            .await;
        let _ = draining_tx.send(());
    };
    let server = Server::builder()
        .timeout(config.request_timeout)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            VaultService::new(vault)
                .into_server()
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
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
    result
}

/// Either a startup failure or a store failure (which the caller attributes to its path).
enum OpenKeyError {
    Serve(ServeError),
    Store(StoreError),
}

impl From<StoreError> for OpenKeyError {
    fn from(e: StoreError) -> Self {
        OpenKeyError::Store(e)
    }
}

impl From<KeyringError> for OpenKeyError {
    fn from(e: KeyringError) -> Self {
        OpenKeyError::Serve(e.into())
    }
}

/// Loads the master key and proves it is the data directory's: a new data directory gets a
/// key-check record for the configured key (and, for a local key, the key file if absent);
/// an existing one must unwrap its record under the configured key.
async fn open_master_key(
    config: &MasterKeyConfig,
    store: &dyn Store,
) -> Result<Arc<dyn MasterKey>, OpenKeyError> {
    let MasterKeyConfig::Local { path } = config;
    let existing = match store.meta(MetaKey::KeyCheck)? {
        Some(bytes) => Some(
            postcard::from_bytes::<KeyCheck>(&bytes)
                .map_err(|_| OpenKeyError::Serve(ServeError::CorruptMeta { what: "key-check" }))?,
        ),
        None => None,
    };
    let Some(check) = existing else {
        let (master, created) = LocalMasterKey::load_or_create(path, true)?;
        if created {
            tracing::info!(path = %path.display(), key_id = master.key_id(), "created local master key");
        }
        let check = KeyCheck::create(&master).await?;
        let bytes = postcard::to_stdvec(&check)
            .map_err(|_| OpenKeyError::Serve(ServeError::CorruptMeta { what: "key-check" }))?;
        store
            .commit(Transaction {
                writes: vec![Write::PutMeta(MetaKey::KeyCheck, bytes)],
                ..Default::default()
            })
            .await?;
        return Ok(Arc::new(master));
    };
    let master = match LocalMasterKey::load_or_create(path, false) {
        Ok((master, _)) => master,
        Err(KeyringError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(OpenKeyError::Serve(ServeError::MasterKeyMissing {
                path: path.clone(),
                expected: check.wrapped.key_id,
            }));
        }
        Err(e) => return Err(e.into()),
    };
    if check.wrapped.key_id != master.key_id() {
        return Err(OpenKeyError::Serve(ServeError::WrongMasterKey {
            expected: check.wrapped.key_id,
            found: master.key_id().to_string(),
        }));
    }
    check.verify(&master).await.map_err(|_| {
        OpenKeyError::Serve(ServeError::KeyCheckFailed {
            key_id: master.key_id().to_string(),
        })
    })?;
    Ok(Arc::new(master))
}

/// With no principals configured: an admin principal whose token was printed once, at the
/// first start (or now, if asked to reset it).
async fn bootstrap_principals(
    store: &dyn Store,
    reset: bool,
    announce: &Announcer,
) -> Result<Principals, OpenKeyError> {
    let stored = store.meta(MetaKey::BootstrapAdmin)?;
    let digest: auth::TokenDigest = match stored {
        Some(bytes) if !reset => bytes.try_into().map_err(|_| {
            OpenKeyError::Serve(ServeError::CorruptMeta {
                what: "bootstrap-admin",
            })
        })?,
        _ => {
            let token = crate::crypto::random_token(auth::PRINCIPAL_TOKEN_PREFIX)
                .map_err(|e| OpenKeyError::Serve(ServeError::Rng(e)))?;
            let digest = auth::token_digest(&token);
            store
                .commit(Transaction {
                    writes: vec![Write::PutMeta(MetaKey::BootstrapAdmin, digest.to_vec())],
                    ..Default::default()
                })
                .await?;
            announce(Announcement::BootstrapToken {
                principal: BOOTSTRAP_PRINCIPAL,
                token: &token,
            });
            digest
        }
    };
    tracing::warn!(
        principal = BOOTSTRAP_PRINCIPAL,
        "no principals configured: serving the bootstrap admin only; configure [[principal]] tables for production"
    );
    let id = PrincipalId::parse(BOOTSTRAP_PRINCIPAL).map_err(|_| {
        OpenKeyError::Serve(ServeError::CorruptMeta {
            what: "bootstrap-admin",
        })
    })?;
    Ok(Principals::new(vec![Principal {
        id,
        token_sha256: digest,
        roles: [Role::Admin].into_iter().collect(),
        tenants: TenantScope::All,
    }]))
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

fn create_private_dir(path: &Path) -> Result<(), ServeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| ServeError::DataDir {
            path: path.to_path_buf(),
            source,
        })
}
