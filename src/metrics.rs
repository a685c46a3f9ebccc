//! Prometheus metrics: process-wide families that any layer records into, and the text
//! exposition served on the ops address (see `server::serve_ops`).
//!
//! Counters and histograms live in one process-wide [`Metrics`] (a process serves one vault).
//! Values that already exist elsewhere (active leases, store size, audit head, data key cache)
//! are read at scrape time into a [`Snapshot`] and never duplicated. No label carries request
//! data: methods are the fixed RPC names, codes the fixed gRPC code names.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};

/// The content type of the exposition (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of an RPC: its full method name and the gRPC status code it ended with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `/package.Service/Method` of a method byokd serves, or `unknown`.
    pub method: &'static str,
    /// The gRPC code name, e.g. `OK`, `NOT_FOUND`.
    pub code: &'static str,
}

/// Labels of a call to the master key service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KmsLabels {
    /// `Encrypt` or `Decrypt`.
    pub operation: &'static str,
    /// `ok`, or the error class: `unwrap_failed`, `unusable`, `unavailable`.
    pub result: &'static str,
}

/// Labels of a lease redemption.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedeemLabels {
    /// `ok` or `failed` (any failure: unknown, expired, used up, wrong tenant, ...).
    pub result: &'static str,
}

/// Labels of a redemption's read on PostgreSQL: where it was answered (`cache`, `database`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `cache` (this replica's redemption cache) or `database`.
    pub source: &'static str,
}

/// Labels of a refusal: why (a fixed name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// e.g. `busy`, `unauthenticated_rate`, `max_connections`.
    pub reason: &'static str,
}

/// Builds latency histograms with the same buckets: 0.25 ms to about 8 s, doubling.
#[derive(Clone, Debug)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        latency_histogram()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The process-wide counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    /// RPCs answered, by method and code.
    pub rpc_requests: Family<RpcLabels, Counter>,
    /// Time to the response headers, by method and code.
    pub rpc_duration: Family<RpcLabels, Histogram, LatencyBuckets>,
    /// Leases issued.
    pub leases_issued: Counter,
    /// Lease redemptions (Get), by result.
    pub lease_redemptions: Family<RedeemLabels, Counter>,
    /// Store flushes (one per group commit) and how long each took.
    pub flush_duration: Histogram,
    /// Calls to AWS KMS, by operation and result.
    pub kms_calls: Family<KmsLabels, Counter>,
    /// Their latency, by operation and result.
    pub kms_duration: Family<KmsLabels, Histogram, LatencyBuckets>,
    /// Requests admission turned away, by reason.
    pub admission_refused: Family<ReasonLabels, Counter>,
    /// Connections closed by admission, by reason.
    pub connections_dropped: Family<ReasonLabels, Counter>,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Times the PostgreSQL store's audit feed had to LISTEN again.
    pub store_listen_reconnects: Counter,
    /// Commits per group the store wrote at once.
    pub group_commits: Histogram,
    /// Time a group waited for its turn in the commit order (the engine's writers' lock and
    /// the position read under it; next to nothing for an engine only this process writes).
    pub commit_order_wait: Histogram,
    /// Commits refused because the store's write had stalled (see `store::commit::STALL`).
    pub commits_refused_stalled: Counter,
    /// The PostgreSQL store's reads of a lease to redeem, by where they were answered.
    pub redemption_reads: Family<SourceLabels, Counter>,
    /// The PostgreSQL store's read connections, by state.
    pub store_pool: Family<PoolLabels, Gauge>,
    /// Times this process took the turn to run background work (see `runner`).
    pub turns_taken: Counter,
    /// 1 while this process holds that turn.
    pub turn_held: Gauge,
    /// Secrets by state, as the last sweep of their lifecycles counted them.
    pub secrets: Family<SecretStateLabels, Gauge>,
    /// Secrets whose rotation is due, as the last sweep counted them.
    pub secrets_rotation_due: Gauge,
    /// Active secrets expiring within 7 days, as the last sweep counted them.
    pub secrets_expiring_soon: Gauge,
}

/// Labels of a count of secrets: their state (`active`, `expired`, `pending_deletion`,
/// `revoked`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretStateLabels {
    /// The state.
    pub state: &'static str,
}

/// Labels of the read pool's connections: `open`, `idle`, or `waiting` (callers waiting for
/// one).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The state.
    pub state: &'static str,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    rpc_requests: Family::default(),
    rpc_duration: Family::new_with_constructor(LatencyBuckets),
    leases_issued: Counter::default(),
    lease_redemptions: Family::default(),
    flush_duration: latency_histogram(),
    kms_calls: Family::default(),
    kms_duration: Family::new_with_constructor(LatencyBuckets),
    admission_refused: Family::default(),
    connections_dropped: Family::default(),
    connections_open: Gauge::default(),
    store_listen_reconnects: Counter::default(),
    group_commits: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
    commit_order_wait: latency_histogram(),
    commits_refused_stalled: Counter::default(),
    redemption_reads: Family::default(),
    store_pool: Family::default(),
    turns_taken: Counter::default(),
    turn_held: Gauge::default(),
    secrets: Family::default(),
    secrets_rotation_due: Gauge::default(),
    secrets_expiring_soon: Gauge::default(),
});

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Records one RPC answered with the gRPC status `code` (its canonical name, `NOT_FOUND`).
    pub fn rpc(&self, method: &'static str, code: &'static str, took: Duration) {
        let labels = RpcLabels { method, code };
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Records one KMS call.
    pub fn kms(&self, operation: &'static str, result: &'static str, took: Duration) {
        let labels = KmsLabels { operation, result };
        self.kms_calls.get_or_create(&labels).inc();
        self.kms_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Records a request admission turned away.
    pub fn admission_refused(&self, reason: &'static str) {
        self.admission_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records a connection admission closed.
    pub fn connection_dropped(&self, reason: &'static str) {
        self.connections_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records one lease redemption.
    pub fn redeemed(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.lease_redemptions
            .get_or_create(&RedeemLabels { result })
            .inc();
    }
}

/// Values read from the vault at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Lease records not yet collected (used up and revoked ones included, until they
    /// expire and are collected).
    pub leases_held: u64,
    /// Free bytes on the data volume.
    pub volume_free_bytes: u64,
    /// Size of the data volume.
    pub volume_size_bytes: u64,
    /// The free space kept on the data volume (below it, the store may not grow).
    pub volume_reserve_bytes: u64,
    /// Bytes the store occupies on disk.
    pub store_bytes: u64,
    /// Sequence number of the newest durable audit entry (0: none).
    pub audit_head_seq: u64,
    /// Data key cache lookups that found the key.
    pub cache_hits: u64,
    /// Data key cache lookups that did not.
    pub cache_misses: u64,
    /// Data keys the cache holds now.
    pub cache_keys: u64,
    /// Whether the vault currently serves (store and master key available).
    pub serving: bool,
}

/// The exposition: every family of [`global`] and the values of `snapshot`.
pub fn render(snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
    let m = global();
    let mut registry = Registry::with_prefix("byokd");
    registry.register(
        "rpc_requests",
        "gRPC requests answered, by method and status code",
        m.rpc_requests.clone(),
    );
    registry.register_with_unit(
        "rpc_duration",
        "Time from request to response headers, by method and status code",
        Unit::Seconds,
        m.rpc_duration.clone(),
    );
    registry.register("leases_issued", "Leases issued", m.leases_issued.clone());
    registry.register(
        "store_group_commits",
        "Commits per group the store wrote at once (one durable write each group)",
        m.group_commits.clone(),
    );
    registry.register_with_unit(
        "store_commit_order_wait",
        "Time each group waited for its turn in the commit order shared by every replica",
        Unit::Seconds,
        m.commit_order_wait.clone(),
    );
    registry.register(
        "store_commits_refused_stalled",
        "Commits refused with UNAVAILABLE because the store's write had not finished for a \
         second (an engine that does not answer, a commit whose outcome is being looked for)",
        m.commits_refused_stalled.clone(),
    );
    registry.register(
        "store_redemption_reads",
        "The PostgreSQL store's reads of a lease to redeem (with its secret and envelope), by \
         where they were answered: this replica's cache or the database",
        m.redemption_reads.clone(),
    );
    registry.register(
        "store_pool_connections",
        "The PostgreSQL store's read connections: open, idle, and callers waiting for one",
        m.store_pool.clone(),
    );
    registry.register(
        "store_listen_reconnects",
        "Times the PostgreSQL store's live audit feed connected and LISTENed again",
        m.store_listen_reconnects.clone(),
    );
    registry.register(
        "background_turns_taken",
        "Times this process took the turn to run background work (summed over replicas: the \
         leader changes)",
        m.turns_taken.clone(),
    );
    registry.register(
        "background_turn_held",
        "1 while this process holds the turn to run background work",
        m.turn_held.clone(),
    );
    registry.register(
        "secrets",
        "Secrets by state (active, expired, pending_deletion, revoked), as the last sweep of \
         their lifecycles counted them (every gc_interval)",
        m.secrets.clone(),
    );
    registry.register(
        "secrets_rotation_due",
        "Secrets whose rotation is due (rotate_after has passed since their current version \
         was made), as the last sweep counted them",
        m.secrets_rotation_due.clone(),
    );
    registry.register(
        "secrets_expiring_soon",
        "Active secrets whose expires_at is within 7 days, as the last sweep counted them",
        m.secrets_expiring_soon.clone(),
    );
    registry.register(
        "lease_redemptions",
        "Lease redemptions (Get), by result",
        m.lease_redemptions.clone(),
    );
    registry.register_with_unit(
        "store_flush_duration",
        "Store flushes (each makes one group of writes durable) and their duration",
        Unit::Seconds,
        m.flush_duration.clone(),
    );
    registry.register(
        "kms_calls",
        "Calls to AWS KMS, by operation and result",
        m.kms_calls.clone(),
    );
    registry.register_with_unit(
        "kms_call_duration",
        "Latency of calls to AWS KMS, by operation and result",
        Unit::Seconds,
        m.kms_duration.clone(),
    );
    registry.register(
        "admission_refused",
        "Requests turned away before they reached the vault, by reason (busy, unauthenticated_busy, unauthenticated_rate, body_timeout, body_too_large, body_broken)",
        m.admission_refused.clone(),
    );
    registry.register(
        "connections_dropped",
        "Connections closed by admission, by reason (max_connections, open_files, handshake_timeout)",
        m.connections_dropped.clone(),
    );
    registry.register(
        "connections_open",
        "Connections open on the main port",
        m.connections_open.clone(),
    );
    let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    register_const(
        &mut registry,
        "leases_held",
        "Lease records not yet collected (expired ones are collected every gc_interval)",
        None,
        gauge(snapshot.leases_held),
    );
    register_const(
        &mut registry,
        "data_volume_free",
        "Free space on the data volume",
        Some(Unit::Bytes),
        gauge(snapshot.volume_free_bytes),
    );
    register_const(
        &mut registry,
        "data_volume_size",
        "Size of the data volume",
        Some(Unit::Bytes),
        gauge(snapshot.volume_size_bytes),
    );
    register_const(
        &mut registry,
        "data_volume_reserve",
        "Free space kept on the data volume: below it, Store, Rotate and Lease are refused",
        Some(Unit::Bytes),
        gauge(snapshot.volume_reserve_bytes),
    );
    register_const(
        &mut registry,
        "store_size",
        "Bytes the store occupies on disk",
        Some(Unit::Bytes),
        gauge(snapshot.store_bytes),
    );
    register_const(
        &mut registry,
        "audit_head_seq",
        "Sequence number of the newest durable audit entry",
        None,
        gauge(snapshot.audit_head_seq),
    );
    register_const(
        &mut registry,
        "data_key_cache_hits",
        "Data key cache lookups that found the unwrapped key",
        None,
        ConstCounter::new(snapshot.cache_hits),
    );
    register_const(
        &mut registry,
        "data_key_cache_misses",
        "Data key cache lookups that had to unwrap the key",
        None,
        ConstCounter::new(snapshot.cache_misses),
    );
    register_const(
        &mut registry,
        "data_key_cache_keys",
        "Unwrapped data keys the cache holds",
        None,
        gauge(snapshot.cache_keys),
    );
    let lookups = snapshot.cache_hits + snapshot.cache_misses;
    let ratio = if lookups == 0 {
        0.0
    } else {
        snapshot.cache_hits as f64 / lookups as f64
    };
    register_const(
        &mut registry,
        "data_key_cache_hit_ratio",
        "Share of data key cache lookups that hit, since start",
        None,
        ConstGauge::new(ratio),
    );
    register_const(
        &mut registry,
        "serving",
        "1 while the vault serves (store writable, master key reachable at the latest health probe), else 0",
        None,
        gauge(u64::from(snapshot.serving)),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

fn register_const<M: Metric + EncodeMetric>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) {
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric),
        None => registry.register(name, help, metric),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_with_recorded_values() {
        global().rpc("/byokd.v1.Vault/Get", "NOT_FOUND", Duration::from_millis(2));
        global().redeemed(false);
        let text = render(&Snapshot {
            leases_held: 3,
            volume_free_bytes: 10,
            volume_size_bytes: 20,
            volume_reserve_bytes: 5,
            store_bytes: 4096,
            audit_head_seq: 42,
            cache_hits: 3,
            cache_misses: 1,
            cache_keys: 2,
            serving: true,
        })
        .unwrap();
        for line in [
            "byokd_rpc_requests_total{method=\"/byokd.v1.Vault/Get\",code=\"NOT_FOUND\"}",
            "byokd_rpc_duration_seconds_bucket{le=\"0.004\",method=\"/byokd.v1.Vault/Get\",code=\"NOT_FOUND\"}",
            "byokd_lease_redemptions_total{result=\"failed\"}",
            "byokd_leases_held 3",
            "byokd_store_size_bytes 4096",
            "byokd_audit_head_seq 42",
            "byokd_data_key_cache_hit_ratio 0.75",
            "byokd_data_key_cache_keys 2",
            "byokd_serving 1",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
