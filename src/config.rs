//! Configuration: a TOML file, overridden by command-line flags, with typed defaults.
//!
//! Relative paths in a config file are resolved against the file's directory; relative paths
//! given as flags, against the working directory.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{CertIdentity, Principal, RateLimit, Role, TenantScope, TokenDigest};
use crate::keyring::{AwsSettings, CacheSettings, MasterKeySpec};
use crate::lease::{DEFAULT_MAX_TTL, DEFAULT_MAX_USES, DEFAULT_TTL, LeasePolicy};
use crate::model::{PrincipalId, TenantId};

/// Environment variable naming the config file when `--config` is not given.
pub const ENV_CONFIG: &str = "BYOKD_CONFIG";
/// Environment variable with a `tracing` filter for the logs, e.g. `info,byokd=debug`.
pub const ENV_LOG: &str = "BYOKD_LOG";
/// Address the server listens on by default: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Data directory by default, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "byokd-data";
/// Connections a PostgreSQL store opens for reads, by default.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// The variable that gives the PostgreSQL URL when `[store]` has none.
pub const ENV_DATABASE_URL: &str = "BYOKD_DATABASE_URL";
/// Name of the local master key file inside the data directory, by default.
pub const DEFAULT_MASTER_KEY_FILE: &str = "master.key";
/// How often expired leases are removed, by default.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(30);
/// How often the audit retention policy runs, by default.
pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// Longest time a request may run before it is cancelled, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The master key and how byokd uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeyConfig {
    /// The configured key: the key of a new data directory, and the target of the next
    /// `RotateMasterKey`.
    pub spec: MasterKeySpec,
    /// How to reach AWS KMS (for KMS keys).
    pub aws: AwsSettings,
    /// The cache of unwrapped data keys.
    pub cache: CacheSettings,
    /// Envelopes rewrapped per commit during a rotation.
    pub rewrap_batch: usize,
    /// A pause after each rewrapped batch (none by default).
    pub rewrap_pause: Duration,
}

/// Data keys cached at most, by default.
pub const DEFAULT_CACHE_SIZE: usize = 10_000;
/// How long a data key stays cached, by default.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
/// How long the background jobs' runner keeps its turn without renewing it, by default.
pub const DEFAULT_JOB_TURN: Duration = Duration::from_secs(15);

/// Envelopes rewrapped per commit, by default.
pub const DEFAULT_REWRAP_BATCH: usize = 128;

/// How long audit entries are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    /// Entries older than this are pruned (the chain's anchor moves past them).
    pub keep: Duration,
    /// How often the policy runs.
    pub interval: Duration,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory (sled database, and by default the master key).
    pub data_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// Master key source.
    pub master_key: MasterKeyConfig,
    /// Lease limits.
    pub lease: LeasePolicy,
    /// Interval of expired-lease collection.
    pub gc_interval: Duration,
    /// How long the process that runs background jobs keeps its turn without renewing it
    /// (`[store] job_turn`; see `runner`): how soon another takes over when it dies.
    pub job_turn: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Audit retention; `None` keeps every entry forever.
    pub audit_retention: Option<AuditRetention>,
    /// Configured principals; empty means "use the bootstrap admin".
    pub principals: Vec<Principal>,
    /// TLS (and with a client CA, mutual TLS); `None` serves plaintext.
    pub tls: Option<TlsConfig>,
    /// Transport and abuse limits.
    pub limits: Limits,
    /// The ops listener (Prometheus metrics and gRPC health); `None`: not served.
    pub metrics: Option<MetricsConfig>,
    /// How often the store and the master key are probed for health (`[metrics]
    /// health_interval`; health is served on the main port too).
    pub health_interval: Duration,
    /// The storage engine and its settings (`[store]`).
    pub store: crate::store::Engine,
    /// Per-tenant quotas and the free space kept on the data volume.
    pub quotas: crate::quota::QuotaLimits,
}

/// Active secrets per tenant, by default.
pub const DEFAULT_MAX_SECRETS_PER_TENANT: u64 = 10_000;
/// Sealed value bytes per tenant, by default (64 MiB).
pub const DEFAULT_MAX_VALUE_MB_PER_TENANT: u64 = 64;
/// Sealed value bytes in all, by default (1 GiB).
pub const DEFAULT_MAX_VALUE_MB_TOTAL: u64 = 1024;
/// Lease records per tenant, by default.
pub const DEFAULT_MAX_LEASES_PER_TENANT: u64 = 100_000;
/// Free space kept on the data volume, by default (MiB).
pub const DEFAULT_MIN_FREE_MB: u64 = 64;

/// The ops listener: plaintext HTTP `GET /metrics` and `grpc.health.v1` (h2c), for
/// Prometheus and for probes that cannot speak TLS (kubelet). Neither carries secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
}

/// How often health is probed, by default.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// TLS settings: PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA that client certificates must chain to (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// With a client CA: refuse connections without a client certificate.
    pub client_cert_required: bool,
}

/// Limits of the transport and against abuse, applied in one place (`server.rs`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Requests served at once across all connections; beyond, RESOURCE_EXHAUSTED at once
    /// rather than a queue.
    pub max_concurrent_requests: usize,
    /// Of those, requests one principal may have in flight.
    pub max_concurrent_requests_per_principal: usize,
    /// Largest request message decoded.
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping interval.
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// Requests per principal, unless its own `rate_limit` says otherwise.
    pub principal_rate_limit: RateLimit,
    /// Failed lease redemptions allowed per peer host and per principal.
    pub failed_get_rate_limit: RateLimit,
    /// Connections open at once; beyond (or once the open files leave only the store's
    /// reserve), new connections are closed at once.
    pub max_connections: usize,
    /// Streams (requests) one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// How long a new connection may take to deliver its first request (TLS handshake,
    /// HTTP/2 preface, the request's headers) before it is closed.
    pub handshake_timeout: Duration,
    /// How long a request's body may take to arrive, before it takes a concurrency slot.
    pub request_body_timeout: Duration,
    /// Requests without valid credentials served at once (apart from the authenticated
    /// ones' `max_concurrent_requests`, which they cannot take).
    pub max_concurrent_unauthenticated: usize,
    /// Requests without valid credentials (or with an unknown token) per peer host; beyond,
    /// refused before they reach the vault, and counted in one audit entry per host and
    /// `refused_audit_interval`.
    pub unauthenticated_rate_limit: RateLimit,
    /// How often the requests refused by `unauthenticated_rate_limit` are recorded (one
    /// `Throttled` audit entry per host).
    pub refused_audit_interval: Duration,
    /// Live `WatchAudit` streams per principal.
    pub max_watch_streams_per_principal: usize,
    /// Live `WatchAudit` streams in all.
    pub max_watch_streams: usize,
    /// How long a connection may stay open with no request in progress before it is closed.
    pub idle_timeout: Duration,
    /// Health `Watch` streams open at once (main and ops ports together).
    pub max_health_watch_streams: usize,
    /// Streams without credentials that may last (reflection, health `Watch`, unknown paths)
    /// open at once on one connection.
    pub max_unauthenticated_streams_per_connection: usize,
    /// Connections open at once on the ops port.
    pub max_ops_connections: usize,
}

/// Connections open at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Streams per HTTP/2 connection, by default.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Time for a new connection's first request, by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a request's body, by default.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Unauthenticated requests served at once, by default.
pub const DEFAULT_MAX_CONCURRENT_UNAUTHENTICATED: usize = 32;
/// Unauthenticated requests per peer host, by default: a burst of 50, then 10 a second.
pub const DEFAULT_UNAUTHENTICATED_RATE: RateLimit = RateLimit {
    per_second: 10.0,
    burst: 50,
};
/// How often refused unauthenticated requests are recorded, by default.
pub const DEFAULT_REFUSED_AUDIT_INTERVAL: Duration = Duration::from_secs(60);
/// Live WatchAudit streams per principal, by default.
pub const DEFAULT_MAX_WATCH_STREAMS_PER_PRINCIPAL: usize = 16;
/// Live WatchAudit streams in all, by default.
pub const DEFAULT_MAX_WATCH_STREAMS: usize = 128;
/// Time a connection may stay idle, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Health Watch streams at once, by default.
pub const DEFAULT_MAX_HEALTH_WATCH_STREAMS: usize = 32;
/// Lasting streams without credentials per connection, by default.
pub const DEFAULT_MAX_UNAUTHENTICATED_STREAMS_PER_CONNECTION: usize = 4;
/// Connections on the ops port, by default.
pub const DEFAULT_MAX_OPS_CONNECTIONS: usize = 64;

/// Requests served at once, by default.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 512;
/// Requests of one principal served at once, by default.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS_PER_PRINCIPAL: usize = 128;
/// Largest request message, by default (a 64 KiB value and generous room for the rest).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// HTTP/2 keepalive interval, by default.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// HTTP/2 keepalive timeout, by default.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests per principal, by default.
pub const DEFAULT_PRINCIPAL_RATE: RateLimit = RateLimit {
    per_second: 1000.0,
    burst: 2000,
};
/// Failed lease redemptions per peer host and per principal, by default: a burst of 20, then
/// one every two seconds.
pub const DEFAULT_FAILED_GET_RATE: RateLimit = RateLimit {
    per_second: 1.0,
    burst: 20,
};

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config` (or `BYOKD_CONFIG`).
    pub config: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--master-key`: a local master key file.
    pub master_key: Option<PathBuf>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// `BYOKD_DATABASE_URL`: the PostgreSQL URL when `[store]` gives none.
    pub database_url: Option<crate::store::DatabaseUrl>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    #[serde(default, with = "humantime_serde")]
    request_timeout: Option<Duration>,
    #[serde(default)]
    master_key: MasterKeyFile,
    #[serde(default)]
    lease: LeaseFile,
    #[serde(default)]
    audit: AuditFile,
    #[serde(default)]
    principal: Vec<PrincipalFile>,
    tls: Option<TlsFile>,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    danger_allow_plaintext_non_loopback: bool,
    #[serde(default)]
    metrics: MetricsFile,
    #[serde(default)]
    store: StoreFile,
    #[serde(default)]
    quotas: QuotasFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    kind: Option<String>,
    cache_size_mb: Option<u64>,
    audit_segment_kb: Option<u64>,
    min_free_mb: Option<u64>,
    url: Option<String>,
    schema: Option<String>,
    pool_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    job_turn: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotasFile {
    max_secrets_per_tenant: Option<u64>,
    max_value_mb_per_tenant: Option<u64>,
    max_leases_per_tenant: Option<u64>,
    max_value_mb_total: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: Option<String>,
    #[serde(default, with = "humantime_serde")]
    health_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MasterKeyFile {
    #[serde(default)]
    kind: MasterKeyKind,
    path: Option<PathBuf>,
    key_id: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    operation_timeout: Option<Duration>,
    max_attempts: Option<u32>,
    cache_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    cache_ttl: Option<Duration>,
    rewrap_batch: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    rewrap_pause: Option<Duration>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum MasterKeyKind {
    #[default]
    Local,
    AwsKms,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseFile {
    #[serde(default, with = "humantime_serde")]
    default_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_ttl: Option<Duration>,
    max_uses: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    gc_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditFile {
    #[serde(default, with = "humantime_serde")]
    retention: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    prune_interval: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalFile {
    id: String,
    token_sha256: Option<String>,
    #[serde(default)]
    client_cert_ids: Vec<String>,
    roles: Vec<Role>,
    tenants: Vec<String>,
    rate_limit: Option<RateLimitFile>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    /// A number: `0.1` is one request every ten seconds.
    per_second: f64,
    burst: u32,
}

impl RateLimitFile {
    fn check(self, what: &str) -> Result<RateLimit, ConfigError> {
        // At least one request a day, at most a billion a second.
        if !(1.0 / 86_400.0..=1e9).contains(&self.per_second) || self.burst == 0 {
            return Err(ConfigError::Invalid(format!(
                "{what}: per_second must be between 1/86400 (one a day) and 1e9, and burst at least 1"
            )));
        }
        Ok(RateLimit {
            per_second: self.per_second,
            burst: self.burst,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    client_cert_required: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_concurrent_requests: Option<usize>,
    max_concurrent_requests_per_principal: Option<usize>,
    max_message_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    http2_keepalive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    http2_keepalive_timeout: Option<Duration>,
    principal_rate_limit: Option<RateLimitFile>,
    failed_get_rate_limit: Option<RateLimitFile>,
    max_connections: Option<usize>,
    http2_max_concurrent_streams: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    request_body_timeout: Option<Duration>,
    max_concurrent_unauthenticated: Option<usize>,
    unauthenticated_rate_limit: Option<RateLimitFile>,
    #[serde(default, with = "humantime_serde")]
    refused_audit_interval: Option<Duration>,
    max_watch_streams_per_principal: Option<usize>,
    max_watch_streams: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    max_health_watch_streams: Option<usize>,
    max_unauthenticated_streams_per_connection: Option<usize>,
    max_ops_connections: Option<usize>,
}

impl Config {
    /// Reads the config file named by `overrides` (if any) and applies the overrides.
    pub fn load(overrides: Overrides) -> Result<Self, ConfigError> {
        let (file, base) = match &overrides.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                (Self::parse_file(path, &text)?, base)
            }
            None => (FileConfig::default(), PathBuf::new()),
        };
        let url_in_file = file.store.url.is_some();
        let config = Self::resolve(file, &base, overrides.clone())?;
        if let Some(path) = &overrides.config
            && !config.principals.is_empty()
        {
            check_private(path, "config file holding principal token hashes")?;
        }
        if let (Some(path), crate::store::Engine::Postgres { url, .. }) =
            (&overrides.config, &config.store)
            && url_in_file
            && url.has_password()
        {
            check_private(path, "config file holding a database password")?;
        }
        Ok(config)
    }

    /// The config that the file text `text` in directory `base` makes, without overrides
    /// and without the file checks of [`Config::load`] (for the fuzz targets and tests).
    pub fn from_text(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let file = Self::parse_file(&base.join("byokd.toml"), text)?;
        Self::resolve(file, base, Overrides::default())
    }

    fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string()
                + &e.span().map(|s| at_line(text, s.start)).unwrap_or_default(),
        })
    }

    fn resolve(file: FileConfig, base: &Path, overrides: Overrides) -> Result<Self, ConfigError> {
        let listen = match (overrides.listen, &file.listen) {
            (Some(addr), _) => addr,
            (None, Some(text)) => address("listen", text, "127.0.0.1:50051")?,
            (None, None) => address("listen", DEFAULT_LISTEN, "127.0.0.1:50051")?,
        };
        let data_dir = overrides
            .data_dir
            .or_else(|| file.data_dir.map(|d| base.join(d)))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let master_key = master_key(file.master_key, overrides.master_key, base, &data_dir)?;
        let request_timeout = file.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        if request_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "request_timeout must be positive".into(),
            ));
        }
        let tls = tls(
            file.tls,
            base,
            listen,
            file.danger_allow_plaintext_non_loopback,
        )?;
        let metrics_listen = match (overrides.metrics_listen, &file.metrics.listen) {
            (Some(addr), _) => Some(addr),
            (None, Some(text)) => Some(address("metrics.listen", text, "127.0.0.1:9464")?),
            (None, None) => None,
        };
        let health_interval = file
            .metrics
            .health_interval
            .unwrap_or(DEFAULT_HEALTH_INTERVAL);
        if health_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "metrics.health_interval: must be positive".into(),
            ));
        }
        let (lease, gc_interval) = lease_policy(&file.lease)?;
        let store = store_engine(&file.store, overrides.database_url.as_ref())?;
        let principals = principals(file.principal)?;
        if matches!(store, crate::store::Engine::Postgres { .. }) && principals.is_empty() {
            return Err(ConfigError::Invalid(
                "store: kind = \"postgres\" needs [[principal]] entries: replicas share one \
                 database, so there is no bootstrap admin token"
                    .into(),
            ));
        }
        Ok(Self {
            quotas: quota_limits(&file.quotas, &file.store)?,
            store,
            metrics: metrics_listen.map(|listen| MetricsConfig { listen }),
            health_interval,
            tls,
            limits: limits(file.limits)?,
            listen,
            data_dir,
            log_format: overrides.log_format.or(file.log_format).unwrap_or_default(),
            master_key,
            lease,
            gc_interval,
            job_turn: job_turn(&file.store)?,
            request_timeout,
            audit_retention: audit_retention(&file.audit)?,
            principals,
        })
    }
}

/// The socket address in `text`, for the setting `field`.
fn address(field: &str, text: &str, example: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::Invalid(format!(
            "{field}: {text:?} is not an address like {example}"
        ))
    })
}

/// `[lease]`: the lease policy and the collection interval.
fn lease_policy(file: &LeaseFile) -> Result<(LeasePolicy, Duration), ConfigError> {
    let lease = LeasePolicy {
        default_ttl: file.default_ttl.unwrap_or(DEFAULT_TTL),
        max_ttl: file.max_ttl.unwrap_or(DEFAULT_MAX_TTL),
        max_uses: file.max_uses.unwrap_or(DEFAULT_MAX_USES),
    };
    if lease.max_ttl.is_zero() || lease.default_ttl.is_zero() {
        return Err(ConfigError::Invalid(
            "lease: default_ttl and max_ttl must be positive".into(),
        ));
    }
    if lease.default_ttl > lease.max_ttl {
        return Err(ConfigError::Invalid(
            "lease: default_ttl must not exceed max_ttl".into(),
        ));
    }
    if lease.max_uses == 0 {
        return Err(ConfigError::Invalid(
            "lease: max_uses must be at least 1".into(),
        ));
    }
    let gc_interval = file.gc_interval.unwrap_or(DEFAULT_GC_INTERVAL);
    if gc_interval.is_zero() {
        return Err(ConfigError::Invalid(
            "lease: gc_interval must be positive".into(),
        ));
    }
    Ok((lease, gc_interval))
}

/// `[audit]`: retention, if configured.
fn audit_retention(file: &AuditFile) -> Result<Option<AuditRetention>, ConfigError> {
    match (file.retention, file.prune_interval) {
        (Some(keep), interval) => {
            let interval = interval.unwrap_or(DEFAULT_PRUNE_INTERVAL);
            if keep.is_zero() || interval.is_zero() {
                return Err(ConfigError::Invalid(
                    "audit: retention and prune_interval must be positive".into(),
                ));
            }
            Ok(Some(AuditRetention { keep, interval }))
        }
        (None, Some(_)) => Err(ConfigError::Invalid(
            "audit: prune_interval needs retention".into(),
        )),
        (None, None) => Ok(None),
    }
}

/// `[tls]`, and the refusal to serve plaintext beyond loopback without it.
fn tls(
    file: Option<TlsFile>,
    base: &Path,
    listen: SocketAddr,
    allow_plaintext: bool,
) -> Result<Option<TlsConfig>, ConfigError> {
    let tls = file.map(|t| TlsConfig {
        client_cert_required: t.client_cert_required.unwrap_or(t.client_ca.is_some()),
        cert: base.join(t.cert),
        key: base.join(t.key),
        client_ca: t.client_ca.map(|c| base.join(c)),
    });
    if tls
        .as_ref()
        .is_some_and(|t| t.client_cert_required && t.client_ca.is_none())
    {
        return Err(ConfigError::Invalid(
            "tls: client_cert_required needs client_ca".into(),
        ));
    }
    if tls.is_none() && !listen.ip().is_loopback() && !allow_plaintext {
        return Err(ConfigError::Invalid(format!(
            "refusing to serve plaintext on {listen}, which is not a loopback address: configure [tls], \
             or set danger_allow_plaintext_non_loopback = true if something else encrypts the traffic"
        )));
    }
    Ok(tls)
}

/// `[store] job_turn`: between 3 s and 10 min (renewed every third of it).
fn job_turn(file: &StoreFile) -> Result<Duration, ConfigError> {
    match file.job_turn {
        None => Ok(DEFAULT_JOB_TURN),
        Some(turn) if (Duration::from_secs(3)..=Duration::from_secs(600)).contains(&turn) => {
            Ok(turn)
        }
        Some(_) => Err(ConfigError::Invalid(
            "store.job_turn: between 3s and 10m".into(),
        )),
    }
}

/// `[store]`: the engine and its settings. `database_url` (from `BYOKD_DATABASE_URL`) stands
/// in for a missing `url`.
fn store_engine(
    file: &StoreFile,
    database_url: Option<&crate::store::DatabaseUrl>,
) -> Result<crate::store::Engine, ConfigError> {
    let invalid = |m: &str| Err(ConfigError::Invalid(m.into()));
    match file.kind.as_deref().unwrap_or("sled") {
        "sled" => {
            if file.url.is_some() || file.schema.is_some() || file.pool_size.is_some() {
                return invalid("store: url, schema and pool_size are for kind = \"postgres\"");
            }
            sled_engine(file)
        }
        "postgres" => {
            if file.cache_size_mb.is_some() || file.audit_segment_kb.is_some() {
                return invalid(
                    "store: cache_size_mb and audit_segment_kb are for kind = \"sled\"",
                );
            }
            let url = match (&file.url, database_url) {
                (Some(text), _) => {
                    crate::store::DatabaseUrl::parse(text).map_err(ConfigError::Invalid)?
                }
                (None, Some(url)) => url.clone(),
                (None, None) => {
                    return invalid(
                        "store: kind = \"postgres\" needs url (or the BYOKD_DATABASE_URL \
                         variable)",
                    );
                }
            };
            let schema = file.schema.clone().unwrap_or_else(|| "byokd".into());
            crate::store::postgres::schema::check_schema_name(&schema)
                .map_err(|e| ConfigError::Invalid(format!("store.schema: {e}")))?;
            let pool_size = match file.pool_size {
                None => DEFAULT_POOL_SIZE,
                Some(n @ 1..=1024) => n,
                Some(_) => return invalid("store.pool_size: between 1 and 1024"),
            };
            Ok(crate::store::Engine::Postgres {
                url,
                schema,
                pool_size,
            })
        }
        other => Err(ConfigError::Invalid(crate::store::Engine::unknown_kind(
            other,
        ))),
    }
}

/// `[store]` for kind = "sled".
fn sled_engine(file: &StoreFile) -> Result<crate::store::Engine, ConfigError> {
    let cache_bytes = match file.cache_size_mb {
        None => crate::store::DEFAULT_CACHE_BYTES,
        Some(mb @ 16..=1_048_576) => mb * 1024 * 1024,
        Some(_) => {
            return Err(ConfigError::Invalid(
                "store.cache_size_mb: between 16 and 1048576".into(),
            ));
        }
    };
    let audit_segment_bytes = match file.audit_segment_kb {
        None => crate::store::DEFAULT_AUDIT_SEGMENT_BYTES,
        Some(kb @ 64..=1_048_576) => kb * 1024,
        Some(_) => {
            return Err(ConfigError::Invalid(
                "store.audit_segment_kb: between 64 and 1048576".into(),
            ));
        }
    };
    Ok(crate::store::Engine::Sled {
        cache_bytes,
        audit_segment_bytes,
    })
}

/// `[quotas]`, with the free space `[store]` keeps on the volume.
fn quota_limits(
    file: &QuotasFile,
    store: &StoreFile,
) -> Result<crate::quota::QuotaLimits, ConfigError> {
    let mb = |n: u64| n.saturating_mul(1024 * 1024);
    let quotas = crate::quota::QuotaLimits {
        max_secrets_per_tenant: file
            .max_secrets_per_tenant
            .unwrap_or(DEFAULT_MAX_SECRETS_PER_TENANT),
        max_value_bytes_per_tenant: mb(file
            .max_value_mb_per_tenant
            .unwrap_or(DEFAULT_MAX_VALUE_MB_PER_TENANT)),
        max_leases_per_tenant: file
            .max_leases_per_tenant
            .unwrap_or(DEFAULT_MAX_LEASES_PER_TENANT),
        max_value_bytes_total: mb(file
            .max_value_mb_total
            .unwrap_or(DEFAULT_MAX_VALUE_MB_TOTAL)),
        min_free_bytes: mb(store.min_free_mb.unwrap_or(DEFAULT_MIN_FREE_MB)),
    };
    if quotas.max_secrets_per_tenant == 0
        || quotas.max_value_bytes_per_tenant == 0
        || quotas.max_leases_per_tenant == 0
        || quotas.max_value_bytes_total == 0
    {
        return Err(ConfigError::Invalid(
            "quotas: each must be at least 1".into(),
        ));
    }
    Ok(quotas)
}

fn master_key(
    file: MasterKeyFile,
    path_override: Option<PathBuf>,
    base: &Path,
    data_dir: &Path,
) -> Result<MasterKeyConfig, ConfigError> {
    let invalid = |msg: &str| Err(ConfigError::Invalid(format!("master_key: {msg}")));
    let spec = match (file.kind, path_override) {
        (_, Some(path)) => MasterKeySpec::Local {
            path: absolute(&path)?,
        },
        (MasterKeyKind::Local, None) => {
            if file.key_id.is_some() || file.region.is_some() || file.endpoint_url.is_some() {
                return invalid("key_id, region and endpoint_url are for kind = \"aws-kms\"");
            }
            let path = match file.path {
                Some(path) => base.join(path),
                None => data_dir.join(DEFAULT_MASTER_KEY_FILE),
            };
            MasterKeySpec::Local {
                path: absolute(&path)?,
            }
        }
        (MasterKeyKind::AwsKms, None) => {
            if file.path.is_some() {
                return invalid("path is for kind = \"local\"");
            }
            let Some(key_id) = file.key_id.filter(|k| !k.trim().is_empty()) else {
                return invalid("kind = \"aws-kms\" needs key_id (a key id, ARN or alias/...)");
            };
            MasterKeySpec::AwsKms {
                key_id,
                region: file.region,
                endpoint_url: file.endpoint_url,
            }
        }
    };
    let defaults = AwsSettings::default();
    let aws = AwsSettings {
        connect_timeout: file.connect_timeout.unwrap_or(defaults.connect_timeout),
        operation_timeout: file.operation_timeout.unwrap_or(defaults.operation_timeout),
        max_attempts: file.max_attempts.unwrap_or(defaults.max_attempts),
    };
    if aws.connect_timeout.is_zero() || aws.operation_timeout.is_zero() || aws.max_attempts == 0 {
        return invalid("connect_timeout, operation_timeout and max_attempts must be positive");
    }
    let rewrap_batch = file.rewrap_batch.unwrap_or(DEFAULT_REWRAP_BATCH);
    if rewrap_batch == 0 {
        return invalid("rewrap_batch must be at least 1");
    }
    Ok(MasterKeyConfig {
        spec,
        aws,
        cache: CacheSettings {
            capacity: file.cache_size.unwrap_or(DEFAULT_CACHE_SIZE),
            ttl: file.cache_ttl.unwrap_or(DEFAULT_CACHE_TTL),
        },
        rewrap_batch,
        rewrap_pause: file.rewrap_pause.unwrap_or_default(),
    })
}

fn absolute(path: &Path) -> Result<PathBuf, ConfigError> {
    std::path::absolute(path)
        .map_err(|e| ConfigError::Invalid(format!("master_key: path {}: {e}", path.display())))
}

/// " (line N: <that line>)" for the byte offset of a parse error.
fn at_line(text: &str, offset: usize) -> String {
    let number = text.get(..offset).map_or(0, |t| t.matches('\n').count());
    let line = text.lines().nth(number).unwrap_or("").trim();
    format!(" (line {}: {line})", number + 1)
}

fn limits(file: LimitsFile) -> Result<Limits, ConfigError> {
    let limits = Limits {
        max_concurrent_requests: file
            .max_concurrent_requests
            .unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS),
        max_concurrent_requests_per_principal: file
            .max_concurrent_requests_per_principal
            .unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS_PER_PRINCIPAL),
        max_message_bytes: file.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
        http2_keepalive_interval: file
            .http2_keepalive_interval
            .unwrap_or(DEFAULT_KEEPALIVE_INTERVAL),
        http2_keepalive_timeout: file
            .http2_keepalive_timeout
            .unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT),
        principal_rate_limit: match file.principal_rate_limit {
            Some(r) => r.check("limits.principal_rate_limit")?,
            None => DEFAULT_PRINCIPAL_RATE,
        },
        failed_get_rate_limit: match file.failed_get_rate_limit {
            Some(r) => r.check("limits.failed_get_rate_limit")?,
            None => DEFAULT_FAILED_GET_RATE,
        },
        max_connections: file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        http2_max_concurrent_streams: file
            .http2_max_concurrent_streams
            .unwrap_or(DEFAULT_MAX_STREAMS_PER_CONNECTION),
        handshake_timeout: file.handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
        request_body_timeout: file
            .request_body_timeout
            .unwrap_or(DEFAULT_REQUEST_BODY_TIMEOUT),
        max_concurrent_unauthenticated: file
            .max_concurrent_unauthenticated
            .unwrap_or(DEFAULT_MAX_CONCURRENT_UNAUTHENTICATED),
        unauthenticated_rate_limit: match file.unauthenticated_rate_limit {
            Some(r) => r.check("limits.unauthenticated_rate_limit")?,
            None => DEFAULT_UNAUTHENTICATED_RATE,
        },
        refused_audit_interval: file
            .refused_audit_interval
            .unwrap_or(DEFAULT_REFUSED_AUDIT_INTERVAL),
        max_watch_streams_per_principal: file
            .max_watch_streams_per_principal
            .unwrap_or(DEFAULT_MAX_WATCH_STREAMS_PER_PRINCIPAL),
        max_watch_streams: file.max_watch_streams.unwrap_or(DEFAULT_MAX_WATCH_STREAMS),
        idle_timeout: file.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
        max_health_watch_streams: file
            .max_health_watch_streams
            .unwrap_or(DEFAULT_MAX_HEALTH_WATCH_STREAMS),
        max_unauthenticated_streams_per_connection: file
            .max_unauthenticated_streams_per_connection
            .unwrap_or(DEFAULT_MAX_UNAUTHENTICATED_STREAMS_PER_CONNECTION),
        max_ops_connections: file
            .max_ops_connections
            .unwrap_or(DEFAULT_MAX_OPS_CONNECTIONS),
    };
    for (name, value) in [
        ("max_concurrent_requests", limits.max_concurrent_requests),
        (
            "max_concurrent_requests_per_principal",
            limits.max_concurrent_requests_per_principal,
        ),
        ("max_connections", limits.max_connections),
        (
            "http2_max_concurrent_streams",
            limits.http2_max_concurrent_streams as usize,
        ),
        (
            "max_concurrent_unauthenticated",
            limits.max_concurrent_unauthenticated,
        ),
        (
            "max_watch_streams_per_principal",
            limits.max_watch_streams_per_principal,
        ),
        ("max_watch_streams", limits.max_watch_streams),
        ("max_health_watch_streams", limits.max_health_watch_streams),
        (
            "max_unauthenticated_streams_per_connection",
            limits.max_unauthenticated_streams_per_connection,
        ),
        ("max_ops_connections", limits.max_ops_connections),
    ] {
        if value == 0 {
            return Err(ConfigError::Invalid(format!(
                "limits: {name} must be at least 1"
            )));
        }
    }
    for (name, value) in [
        ("handshake_timeout", limits.handshake_timeout),
        ("request_body_timeout", limits.request_body_timeout),
        ("refused_audit_interval", limits.refused_audit_interval),
        ("idle_timeout", limits.idle_timeout),
    ] {
        if value.is_zero() {
            return Err(ConfigError::Invalid(format!(
                "limits: {name} must be positive"
            )));
        }
    }
    if limits.max_message_bytes < 80 * 1024 {
        return Err(ConfigError::Invalid(
            "limits: max_message_bytes must leave room for a 64 KiB value (at least 81920)".into(),
        ));
    }
    if limits.http2_keepalive_interval.is_zero() || limits.http2_keepalive_timeout.is_zero() {
        return Err(ConfigError::Invalid(
            "limits: keepalive durations must be positive".into(),
        ));
    }
    Ok(limits)
}

/// Refuses a file that the group or others may read.
pub fn check_private(path: &Path, what: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError::Invalid(format!(
            "{what} {} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

fn principals(entries: Vec<PrincipalFile>) -> Result<Vec<Principal>, ConfigError> {
    let mut ids = HashSet::new();
    let mut digests = HashSet::new();
    let mut certs = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, p) in entries.into_iter().enumerate() {
        let at = |msg: String| ConfigError::Invalid(format!("principal #{}: {msg}", i + 1));
        let id = PrincipalId::parse(p.id).map_err(|e| at(format!("id: {}", e.problem)))?;
        let at = |msg: String| ConfigError::Invalid(format!("principal {id}: {msg}"));
        if !ids.insert(id.clone()) {
            return Err(at("duplicate id".into()));
        }
        let token_sha256 = match &p.token_sha256 {
            Some(text) => {
                let digest = parse_digest(text).ok_or_else(|| {
                    at("token_sha256 must be 64 hex digits (sha256sum of the token)".into())
                })?;
                if !digests.insert(digest) {
                    return Err(at("token_sha256 is shared with another principal".into()));
                }
                Some(digest)
            }
            None => None,
        };
        let mut cert_ids = BTreeSet::new();
        for text in &p.client_cert_ids {
            let cert_id = CertIdentity::parse(text).ok_or_else(|| {
                at(format!(
                    "client_cert_ids: {text:?} is not spiffe://..., uri:..., dns:... or cn:..."
                ))
            })?;
            if !certs.insert(cert_id.clone()) {
                return Err(at(format!(
                    "client_cert_ids: {text:?} is claimed by another principal"
                )));
            }
            cert_ids.insert(cert_id);
        }
        if token_sha256.is_none() && cert_ids.is_empty() {
            return Err(at("needs token_sha256, client_cert_ids, or both".into()));
        }
        let rate_limit = p
            .rate_limit
            .map(|r| r.check(&format!("principal {id}: rate_limit")))
            .transpose()?;
        if p.roles.is_empty() {
            return Err(at("roles must not be empty".into()));
        }
        let tenants = match p.tenants.as_slice() {
            [] => return Err(at("tenants must not be empty (use [\"*\"] for all)".into())),
            [all] if all == "*" => TenantScope::All,
            list => TenantScope::Only(
                list.iter()
                    .map(|t| {
                        TenantId::parse(t.as_str()).map_err(|_| {
                            at(format!(
                                "tenants: {t:?} is not a tenant (\"*\" must stand alone)"
                            ))
                        })
                    })
                    .collect::<Result<BTreeSet<_>, _>>()?,
            ),
        };
        out.push(Principal {
            id: id.clone(),
            token_sha256,
            cert_ids,
            roles: p.roles.into_iter().collect(),
            tenants,
            rate_limit,
        });
    }
    Ok(out)
}

fn parse_digest(text: &str) -> Option<TokenDigest> {
    let bytes = hex::decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH_A: &str = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";
    const HASH_B: &str = "9e3c5a1d1c37c1a5e5a0e9b2a0f9a8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text, Path::new("/etc/byokd"))
    }

    #[test]
    fn a_postgres_store_needs_a_url_and_principals_and_takes_no_sled_settings() {
        let principal = format!(
            "[[principal]]\nid = \"a\"\ntoken_sha256 = \"{HASH_A}\"\nroles = [\"admin\"]\n\
             tenants = [\"*\"]\n"
        );
        let c = load(&format!(
            "[store]\nkind = \"postgres\"\nurl = \"postgres://byokd:pw@db:5432/byokd\"\n\
             schema = \"vault\"\npool_size = 4\n{principal}"
        ))
        .unwrap();
        match &c.store {
            crate::store::Engine::Postgres {
                url,
                schema,
                pool_size,
            } => {
                assert!(url.has_password());
                assert_eq!((schema.as_str(), *pool_size), ("vault", 4));
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{c:?}").contains(":pw@"));
        let defaults = load(&format!(
            "[store]\nkind = \"postgres\"\nurl = \"postgres://byokd@db/byokd\"\n{principal}"
        ))
        .unwrap();
        assert!(matches!(
            defaults.store,
            crate::store::Engine::Postgres { ref schema, pool_size: DEFAULT_POOL_SIZE, .. }
                if schema == "byokd"
        ));
        // The URL from BYOKD_DATABASE_URL when the file has none.
        let file = Config::parse_file(
            Path::new("t"),
            &format!("[store]\nkind = \"postgres\"\n{principal}"),
        )
        .unwrap();
        let overrides = Overrides {
            database_url: Some(crate::store::DatabaseUrl::parse("postgres://e@db/x").unwrap()),
            ..Overrides::default()
        };
        assert!(matches!(
            Config::resolve(file, Path::new(""), overrides)
                .unwrap()
                .store,
            crate::store::Engine::Postgres { .. }
        ));
        for (text, says) in [
            (
                "[store]\nkind = \"postgres\"\n".to_string() + &principal,
                "needs url",
            ),
            (
                "[store]\nkind = \"postgres\"\nurl = \"postgres://b@db/x\"\n".into(),
                "needs [[principal]]",
            ),
            (
                "[store]\nkind = \"postgres\"\nurl = \"mysql://b:secret@db/x\"\n".to_string()
                    + &principal,
                "not a PostgreSQL URL",
            ),
            (
                "[store]\nkind = \"postgres\"\nurl = \"postgres://b@db/x\"\ncache_size_mb = 64\n"
                    .to_string()
                    + &principal,
                "are for kind = \"sled\"",
            ),
            (
                "[store]\nkind = \"postgres\"\nurl = \"postgres://b@db/x\"\nschema = \"A-b\"\n"
                    .to_string()
                    + &principal,
                "store.schema",
            ),
            (
                "[store]\nkind = \"postgres\"\nurl = \"postgres://b@db/x\"\npool_size = 0\n"
                    .to_string()
                    + &principal,
                "pool_size",
            ),
            (
                "[store]\nurl = \"postgres://b@db/x\"\n".into(),
                "are for kind = \"postgres\"",
            ),
        ] {
            match load(&text) {
                Err(ConfigError::Invalid(why)) => {
                    assert!(why.contains(says), "{text}: {why}");
                    assert!(!why.contains("secret"), "{why}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load(Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(
            c.master_key.spec,
            MasterKeySpec::Local {
                path: std::env::current_dir()
                    .unwrap()
                    .join("byokd-data/master.key")
            }
        );
        assert_eq!(c.master_key.aws, AwsSettings::default());
        assert_eq!(c.master_key.cache.capacity, DEFAULT_CACHE_SIZE);
        assert_eq!(c.lease, LeasePolicy::default());
        assert!(c.principals.is_empty());
        assert_eq!(c.audit_retention, None);
    }

    #[test]
    fn store_sizes_have_defaults_and_bounds() {
        use crate::store::Engine;
        let c = load("").unwrap();
        assert_eq!(c.store, Engine::default());
        assert_eq!(
            c.store,
            Engine::Sled {
                cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
                audit_segment_bytes: crate::store::DEFAULT_AUDIT_SEGMENT_BYTES
            }
        );
        let c =
            load("[store]\nkind = \"sled\"\ncache_size_mb = 64\naudit_segment_kb = 256\n").unwrap();
        assert_eq!(
            c.store,
            Engine::Sled {
                cache_bytes: 64 << 20,
                audit_segment_bytes: 256 << 10
            }
        );
        match load("[store]\nkind = \"cassandra\"\n") {
            Err(ConfigError::Invalid(why)) => {
                assert!(
                    why.contains("\"cassandra\"") && why.contains("sled"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "[store]\ncache_size_mb = 8\n",
            "[store]\naudit_segment_kb = 63\n",
            "[store]\naudit_segment_kb = 1048577\n",
            "[quotas]\nmax_secrets_per_tenant = 0\n",
        ] {
            assert!(matches!(load(bad), Err(ConfigError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn full_file_parses() {
        let c = load(&format!(
            r#"
            listen = "0.0.0.0:6000"
            data_dir = "data"
            log_format = "json"
            [master_key]
            kind = "local"
            path = "/keys/master.key"
            [lease]
            default_ttl = "30s"
            max_ttl = "5m"
            max_uses = 10
            [audit]
            retention = "90d"
            [[principal]]
            id = "orchestrator"
            token_sha256 = "{HASH_A}"
            roles = ["writer", "leaser"]
            tenants = ["*"]
            [[principal]]
            id = "agent"
            token_sha256 = "{HASH_B}"
            client_cert_ids = ["spiffe://prod/agent", "dns:agent.internal"]
            roles = ["reader"]
            tenants = ["acme", "globex"]
            rate_limit = {{ per_second = 5, burst = 10 }}
            [[principal]]
            id = "sidecar"
            client_cert_ids = ["cn:sidecar"]
            roles = ["reader"]
            tenants = ["acme"]
            [tls]
            cert = "tls/server.pem"
            key = "tls/server.key"
            client_ca = "/pki/ca.pem"
            [limits]
            max_concurrent_requests = 64
            failed_get_rate_limit = {{ per_second = 0.25, burst = 3 }}
            "#
        ))
        .unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:6000");
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/byokd/tls/server.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/pki/ca.pem")));
        assert!(
            tls.client_cert_required,
            "a client CA requires client certificates by default"
        );
        assert_eq!(c.limits.max_concurrent_requests, 64);
        assert_eq!(
            c.limits.failed_get_rate_limit,
            RateLimit {
                per_second: 0.25,
                burst: 3
            }
        );
        assert_eq!(c.limits.principal_rate_limit, DEFAULT_PRINCIPAL_RATE);
        assert_eq!(c.principals[1].cert_ids.len(), 2);
        assert_eq!(
            c.principals[1].rate_limit,
            Some(RateLimit {
                per_second: 5.0,
                burst: 10
            })
        );
        assert_eq!(c.principals[2].token_sha256, None);
        assert_eq!(c.data_dir, PathBuf::from("/etc/byokd/data"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.master_key.spec,
            MasterKeySpec::Local {
                path: PathBuf::from("/keys/master.key")
            }
        );
        assert_eq!(c.lease.default_ttl, Duration::from_secs(30));
        assert_eq!(c.lease.max_ttl, Duration::from_secs(300));
        assert_eq!(c.lease.max_uses, 10);
        assert_eq!(
            c.audit_retention,
            Some(AuditRetention {
                keep: Duration::from_secs(90 * 86400),
                interval: DEFAULT_PRUNE_INTERVAL
            })
        );
        assert_eq!(c.principals.len(), 3);
        assert_eq!(c.principals[0].tenants, TenantScope::All);
        assert!(matches!(&c.principals[1].tenants, TenantScope::Only(t) if t.len() == 2));
    }

    #[test]
    fn plaintext_off_loopback_needs_the_danger_opt_in() {
        let c =
            load("listen = \"0.0.0.0:7000\"\ndanger_allow_plaintext_non_loopback = true").unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert!(c.tls.is_none());
        let c = load("listen = \"[::1]:7000\"").unwrap();
        assert!(c.listen.ip().is_loopback());
    }

    #[test]
    fn flags_override_the_file() {
        let file = Config::parse_file(
            Path::new("t"),
            "listen = \"127.0.0.1:1\"\nlog_format = \"json\"",
        )
        .unwrap();
        let c = Config::resolve(
            file,
            Path::new(""),
            Overrides {
                listen: Some("127.0.0.1:2".parse().unwrap()),
                data_dir: Some(PathBuf::from("/d")),
                log_format: Some(LogFormat::Text),
                config: None,
                master_key: None,
                metrics_listen: None,
                database_url: None,
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(
            c.master_key.spec,
            MasterKeySpec::Local {
                path: PathBuf::from("/d/master.key")
            }
        );
    }

    #[test]
    fn aws_kms_master_keys_parse() {
        let c = load(
            r#"
            [master_key]
            kind = "aws-kms"
            key_id = "alias/byokd"
            region = "eu-west-1"
            endpoint_url = "http://127.0.0.1:5000"
            operation_timeout = "2s"
            max_attempts = 5
            cache_size = 0
            rewrap_batch = 16
            "#,
        )
        .unwrap();
        assert_eq!(
            c.master_key.spec,
            MasterKeySpec::AwsKms {
                key_id: "alias/byokd".into(),
                region: Some("eu-west-1".into()),
                endpoint_url: Some("http://127.0.0.1:5000".into())
            }
        );
        assert_eq!(c.master_key.aws.operation_timeout, Duration::from_secs(2));
        assert_eq!(c.master_key.aws.max_attempts, 5);
        assert_eq!(c.master_key.cache.capacity, 0);
        assert_eq!(c.master_key.rewrap_batch, 16);
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let principal = |extra: &str| {
            format!(
                "[[principal]]\nid = \"p\"\ntoken_sha256 = \"{HASH_A}\"\nroles = [\"admin\"]\ntenants = [\"*\"]\n{extra}"
            )
        };
        let cases: Vec<(String, &str)> = vec![
            ("listen = 5".into(), "invalid type"),
            ("listne = \"x\"".into(), "unknown field"),
            ("listen = \"localhost\"".into(), "listen"),
            ("[master_key]\nkind = \"hsm\"".into(), "unknown variant"),
            ("[master_key]\nkind = \"aws-kms\"".into(), "needs key_id"),
            (
                "[master_key]\nkind = \"aws-kms\"\nkey_id = \"k\"\npath = \"p\"".into(),
                "path is for kind",
            ),
            ("[master_key]\nkey_id = \"k\"".into(), "are for kind"),
            ("[master_key]\nrewrap_batch = 0".into(), "rewrap_batch"),
            ("[lease]\nmax_ttl = \"forever\"".into(), "max_ttl"),
            (
                "[lease]\ndefault_ttl = \"20m\"".into(),
                "default_ttl must not exceed max_ttl",
            ),
            ("[lease]\nmax_uses = 0".into(), "max_uses"),
            (
                "listen = \"0.0.0.0:1\"".into(),
                "refusing to serve plaintext on 0.0.0.0:1",
            ),
            ("listen = \"10.0.0.1:1\"".into(), "not a loopback address"),
            (
                "[tls]\ncert = \"c\"\nkey = \"k\"\nclient_cert_required = true".into(),
                "needs client_ca",
            ),
            (
                "[limits]\nmax_concurrent_requests = 0".into(),
                "max_concurrent_requests",
            ),
            (
                "[limits]\nmax_message_bytes = 1000".into(),
                "max_message_bytes",
            ),
            (
                "[limits]\nprincipal_rate_limit = { per_second = 0, burst = 1 }".into(),
                "per_second must be between",
            ),
            (
                "[limits]\nprincipal_rate_limit = { per_second = nan, burst = 1 }".into(),
                "per_second must be between",
            ),
            (
                "[limits]\nprincipal_rate_limit = { per_second = 0.5, burst = 0 }".into(),
                "burst at least 1",
            ),
            (
                principal("").replace(&format!("token_sha256 = \"{HASH_A}\"\n"), ""),
                "needs token_sha256, client_cert_ids, or both",
            ),
            (
                principal("client_cert_ids = [\"agent\"]"),
                "client_cert_ids",
            ),
            (
                principal("client_cert_ids = [\"cn:x\"]\n")
                    + &principal("client_cert_ids = [\"cn:x\"]\n")
                        .replace("\"p\"", "\"q\"")
                        .replace(HASH_A, HASH_B),
                "claimed by another principal",
            ),
            (
                "[audit]\nprune_interval = \"1h\"".into(),
                "prune_interval needs retention",
            ),
            ("[audit]\nretention = \"0s\"".into(), "must be positive"),
            (principal("").replace(HASH_A, "abc"), "token_sha256"),
            (
                principal("").replace("[\"admin\"]", "[\"root\"]"),
                "unknown variant",
            ),
            (
                principal("").replace("[\"admin\"]", "[]"),
                "roles must not be empty",
            ),
            (
                principal("").replace("[\"*\"]", "[]"),
                "tenants must not be empty",
            ),
            (
                principal("").replace("[\"*\"]", "[\"*\", \"a\"]"),
                "must stand alone",
            ),
            (principal("").replace("\"p\"", "\"a b\""), "id"),
            (
                principal("") + &principal("").replace(HASH_A, HASH_B),
                "duplicate id",
            ),
            (
                principal("") + &principal("").replace("\"p\"", "\"q\""),
                "shared",
            ),
        ];
        for (text, expected) in cases {
            let err = load(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
