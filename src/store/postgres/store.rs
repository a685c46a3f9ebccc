//! [`PgStore`]: the `Store` on PostgreSQL. Reads go through a pool of connections
//! (tokio-postgres with deadpool), each one statement (a `Get`'s redemption is one join);
//! commits go through the commit core on its writer thread with [`PgAdapter`].

use std::sync::Arc;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::broadcast;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

use super::activity;
use super::feed::Feed;
use super::redemptions::Redemptions;
use super::rows::{usage_of, uuid};
use super::schema;
use super::{PgAdapter, Target, migrate_blocking, unavailable};
use crate::chain::ChainKey;
use crate::model::{
    AuditAnchor, AuditRecord, EnvelopeRecord, LeaseId, LeaseRecord, Revision, SecretId, SecretName,
    SecretRecord, TenantId, Time, TokenHash,
};
use crate::store::codec::{self, Revisioned};
use crate::store::commit::Committer;
use crate::store::query::{self, AuditFilter, AuditPage};
use crate::store::{
    AuditIndex, Committed, DayQuery, DayRow, ExportSink, ImportSource, MetaKey, Record, Redemption,
    SecretActivity, Store, StoreError, Transaction, Usage, UsageKey,
};

/// Live subscribers' buffer of entries.
const FEED_CAPACITY: usize = 1024;

/// The store on PostgreSQL.
pub struct PgStore {
    pool: Pool,
    sql: Reads,
    committer: Committer<PgAdapter>,
    /// Every replica's entries as they commit (see `feed.rs`).
    feed: Feed,
    /// Leases and secrets read or committed here (see `redemptions.rs`).
    redemptions: Arc<Redemptions>,
}

/// The read statements, for one schema.
struct Reads {
    secret: String,
    secrets_first: String,
    secrets_after: String,
    all_secrets_first: String,
    all_secrets_after: String,
    envelope: String,
    envelopes_first: String,
    envelopes_after: String,
    envelope_count: String,
    usage: String,
    activity: String,
    activity_days: String,
    lease_by_token: String,
    lease_by_id: String,
    redemption: String,
    expired_leases: String,
    audit_entries: String,
    audit_entry: String,
    audit_head: String,
    anchor: String,
    audit_index: String,
    meta: String,
    metas: String,
    all_secrets: String,
    all_envelopes: String,
    size: String,
}

impl Reads {
    fn new(s: &str) -> Self {
        Self {
            secret: format!("SELECT record FROM {s}.secrets WHERE tenant = $1 AND name = $2"),
            secrets_first: format!(
                "SELECT record FROM {s}.secrets WHERE tenant = $1 ORDER BY name LIMIT $2"
            ),
            secrets_after: format!(
                "SELECT record FROM {s}.secrets WHERE tenant = $1 AND name > $2
                 ORDER BY name LIMIT $3"
            ),
            all_secrets_first: format!(
                "SELECT record FROM {s}.secrets ORDER BY tenant, name LIMIT $1"
            ),
            all_secrets_after: format!(
                "SELECT record FROM {s}.secrets WHERE (tenant, name) > ($1, $2)
                 ORDER BY tenant, name LIMIT $3"
            ),
            envelope: format!(
                "SELECT record FROM {s}.envelopes WHERE secret_id = $1 AND version = $2"
            ),
            envelopes_first: format!(
                "SELECT record FROM {s}.envelopes ORDER BY secret_id, version LIMIT $1"
            ),
            envelopes_after: format!(
                "SELECT record FROM {s}.envelopes WHERE (secret_id, version) > ($1, $2)
                 ORDER BY secret_id, version LIMIT $3"
            ),
            envelope_count: format!("SELECT count(*) FROM {s}.envelopes"),
            usage: format!(
                "SELECT tenant, secrets, value_bytes, leases FROM {s}.usage WHERE tenant = $1"
            ),
            activity: format!(
                "SELECT secret_id, leases_issued, redemptions, failed_redemptions, last_leased_at,
                   last_redeemed_at, last_redeemed_by FROM {s}.activity WHERE secret_id = ANY($1)"
            ),
            activity_days: format!(
                "SELECT tenant, day, secret_id, principal, name, leases, redemptions,
                   failed_redemptions FROM {s}.activity_days
                 WHERE tenant = $1 AND day BETWEEN $2 AND $3 AND ($4::text IS NULL OR name = $4)
                 LIMIT $5"
            ),
            lease_by_token: format!("SELECT record FROM {s}.leases WHERE token_hash = $1"),
            lease_by_id: format!("SELECT record FROM {s}.leases WHERE id = $1"),
            redemption: format!(
                "SELECT l.record, s.record, e.record FROM {s}.leases l
                 LEFT JOIN {s}.secrets s ON s.tenant = l.tenant AND s.name = l.name
                 LEFT JOIN {s}.envelopes e ON e.secret_id = s.id AND e.version = s.version
                 WHERE l.token_hash = $1"
            ),
            expired_leases: format!(
                "SELECT record FROM {s}.leases WHERE expires_at < $1
                 ORDER BY expires_at, token_hash LIMIT $2"
            ),
            audit_entries: format!(
                "SELECT seq, record FROM {s}.audit WHERE seq >= $1 ORDER BY seq LIMIT $2"
            ),
            audit_entry: format!("SELECT seq, record FROM {s}.audit WHERE seq = $1"),
            audit_head: format!("SELECT seq, record FROM {s}.audit ORDER BY seq DESC LIMIT 1"),
            anchor: format!("SELECT record FROM {s}.anchor"),
            audit_index: format!(
                "SELECT seq FROM {s}.audit WHERE index_keys @> ARRAY[$1::bytea] AND seq >= $2
                 ORDER BY seq LIMIT $3"
            ),
            meta: format!("SELECT rev, value FROM {s}.meta WHERE name = $1"),
            metas: format!("SELECT name, rev, value FROM {s}.meta ORDER BY name"),
            all_secrets: format!("SELECT record FROM {s}.secrets ORDER BY tenant, name"),
            all_envelopes: format!("SELECT record FROM {s}.envelopes ORDER BY secret_id, version"),
            size: format!(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = '{s}' AND c.relkind = 'r'"
            ),
        }
    }
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn record<T: Revisioned>(key: &[u8], row: &Row, column: usize) -> Result<T, StoreError> {
    codec::decode_record(key, row.get::<_, &[u8]>(column))
}

fn audit(row: &Row) -> Result<AuditRecord, StoreError> {
    let seq: i64 = row.get(0);
    codec::decode(&codec::audit_key(seq as u64), row.get::<_, &[u8]>(1))
}

impl PgStore {
    /// Opens the store in `schema` of the database `target` names: applies the migrations
    /// it lacks, connects the writer (refusing a server with `fsync = off`) and a pool of
    /// up to `pool_size` connections for reads.
    pub async fn open(target: Target, schema: &str, pool_size: usize) -> Result<Self, StoreError> {
        schema::check_schema_name(schema)?;
        let name = schema.to_string();
        let writer = target.clone();
        // The blocking client runs a runtime of its own: not on an async worker, nor inside
        // `block_on`.
        let redemptions = Arc::new(Redemptions::default());
        let told = redemptions.clone();
        let (adapter, position) = tokio::task::spawn_blocking(move || {
            migrate_blocking(&writer, &name)?;
            let mut adapter = PgAdapter::connect(writer, &name)?.telling(told);
            let position = adapter.position()?;
            Ok::<_, StoreError>((adapter, position))
        })
        .await
        .map_err(|e| StoreError::Engine(format!("open: {e}")))??;
        let manager = Manager::from_config(
            target.config.clone(),
            target.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .post_create(Hook::async_fn(|client, _| {
                Box::pin(async move {
                    client
                        .batch_execute(super::SESSION_SETTINGS)
                        .await
                        .map_err(HookError::Backend)
                })
            }))
            .build()
            .map_err(|e| StoreError::Engine(format!("PostgreSQL pool: {e}")))?;
        let committer = Committer::start(adapter, position)?;
        let feed = Feed::start(
            target,
            pool.clone(),
            schema,
            position.next_seq - 1,
            FEED_CAPACITY,
            committer.status().subscribe(),
        );
        tokio::spawn(redemptions.clone().follow(feed.subscribe()));
        Ok(Self {
            pool,
            sql: Reads::new(schema),
            committer,
            feed,
            redemptions,
        })
    }

    /// Runs a read. A pooled connection found dead (the server restarted or failed over
    /// since it was last used) is left for a new one, once: reads can be repeated.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let mut retried = false;
        loop {
            let client = self.pool.get().await.map_err(unavailable)?;
            let result = match client.prepare_cached(sql).await {
                Ok(statement) => client.query(&statement, params).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(rows) => return Ok(rows),
                Err(_) if !retried && client.is_closed() => retried = true,
                Err(e) => return Err(unavailable(e)),
            }
        }
    }

    async fn row(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(sql, params).await?.into_iter().next())
    }

    /// The record a read finds, if any.
    async fn find_record<T: Revisioned>(
        &self,
        key: &[u8],
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        Ok(self.records(key, sql, params).await?.into_iter().next())
    }

    async fn records<T: Revisioned>(
        &self,
        key: &[u8],
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, StoreError> {
        let rows = self.rows(sql, params).await?;
        rows.iter().map(|r| record(key, r, 0)).collect()
    }

    /// Every record but leases, then the trail, from one snapshot of the database.
    async fn export_snapshot(&self, mut sink: ExportSink) -> Result<u64, StoreError> {
        let mut client = self.pool.get().await.map_err(unavailable)?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(unavailable)?;
        let mut count = 0u64;
        let mut pass = |record: Record| {
            count += 1;
            sink(record).map_err(StoreError::Export)
        };
        for row in tx
            .query(&self.sql.all_secrets, &[])
            .await
            .map_err(unavailable)?
        {
            pass(Record::Secret(record(b"secret", &row, 0)?))?;
        }
        for row in tx
            .query(&self.sql.all_envelopes, &[])
            .await
            .map_err(unavailable)?
        {
            pass(Record::Envelope(record(b"envelope", &row, 0)?))?;
        }
        for row in tx.query(&self.sql.metas, &[]).await.map_err(unavailable)? {
            let name: &str = row.get(0);
            let Some(key) = MetaKey::named(name) else {
                return Err(StoreError::Corrupt {
                    key: "meta".into(),
                    reason: format!("unknown meta value {name:?}"),
                });
            };
            pass(Record::Meta(
                key,
                Revision(row.get::<_, i64>(1) as u64),
                row.get(2),
            ))?;
        }
        if let Some(row) = tx
            .query_opt(&self.sql.anchor, &[])
            .await
            .map_err(unavailable)?
        {
            let anchor: AuditAnchor = codec::decode(codec::AUDIT_ANCHOR_META, row.get(0))?;
            pass(Record::Anchor(anchor))?;
        }
        let mut from = 0i64;
        loop {
            let rows = tx
                .query(&self.sql.audit_entries, &[&from, &4096i64])
                .await
                .map_err(unavailable)?;
            let Some(last) = rows.last() else { break };
            from = last.get::<_, i64>(0) + 1;
            for row in &rows {
                pass(Record::Audit(audit(row)?))?;
            }
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(count)
    }
}

#[cfg(test)]
impl PgStore {
    /// A setting of a pooled connection's session.
    pub(super) async fn pooled_setting(&self, name: &str) -> Result<String, StoreError> {
        let row = self.row("SELECT current_setting($1)", &[&name]).await?;
        Ok(row.map(|r| r.get(0)).unwrap_or_default())
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn secret(
        &self,
        tenant: &TenantId,
        name: &SecretName,
    ) -> Result<Option<SecretRecord>, StoreError> {
        let key = codec::secret_key(tenant, name);
        self.find_record(&key, &self.sql.secret, &[&tenant.as_str(), &name.as_str()])
            .await
    }

    async fn list_secrets(
        &self,
        tenant: &TenantId,
        after: Option<&SecretName>,
        limit_to: usize,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        let key = codec::secret_prefix(tenant);
        match after {
            Some(name) => {
                self.records(
                    &key,
                    &self.sql.secrets_after,
                    &[&tenant.as_str(), &name.as_str(), &limit(limit_to)],
                )
                .await
            }
            None => {
                self.records(
                    &key,
                    &self.sql.secrets_first,
                    &[&tenant.as_str(), &limit(limit_to)],
                )
                .await
            }
        }
    }

    async fn all_secrets(
        &self,
        after: Option<(&TenantId, &SecretName)>,
        limit_to: usize,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        let key = [codec::SECRET];
        match after {
            Some((tenant, name)) => {
                let params: [&(dyn ToSql + Sync); 3] =
                    [&tenant.as_str(), &name.as_str(), &limit(limit_to)];
                self.records(&key, &self.sql.all_secrets_after, &params)
                    .await
            }
            None => {
                self.records(&key, &self.sql.all_secrets_first, &[&limit(limit_to)])
                    .await
            }
        }
    }

    async fn envelope(
        &self,
        secret_id: SecretId,
        version: u32,
    ) -> Result<Option<EnvelopeRecord>, StoreError> {
        let key = codec::envelope_key(secret_id, version);
        self.find_record(
            &key,
            &self.sql.envelope,
            &[&uuid(secret_id.as_bytes()), &(version as i32)],
        )
        .await
    }

    async fn envelopes_after(
        &self,
        after: Option<(SecretId, u32)>,
        limit_to: usize,
    ) -> Result<Vec<EnvelopeRecord>, StoreError> {
        match after {
            Some((id, version)) => {
                self.records(
                    b"envelope",
                    &self.sql.envelopes_after,
                    &[&uuid(id.as_bytes()), &(version as i32), &limit(limit_to)],
                )
                .await
            }
            None => {
                self.records(b"envelope", &self.sql.envelopes_first, &[&limit(limit_to)])
                    .await
            }
        }
    }

    async fn envelope_count(&self) -> Result<u64, StoreError> {
        let row = self.row(&self.sql.envelope_count, &[]).await?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    async fn lease_by_token(
        &self,
        token_hash: &TokenHash,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        self.find_record(
            &codec::lease_key(token_hash),
            &self.sql.lease_by_token,
            &[&token_hash.0.as_slice()],
        )
        .await
    }

    /// From the cache when it knows the lease and its secret can redeem it (see
    /// `redemptions.rs`); otherwise read, and kept.
    async fn redemption(&self, token_hash: &TokenHash) -> Result<Option<Redemption>, StoreError> {
        let reads = |source| {
            crate::metrics::global()
                .redemption_reads
                .get_or_create(&crate::metrics::SourceLabels { source })
                .inc();
        };
        if let Some(known) = self.redemptions.get(token_hash) {
            reads("cache");
            return Ok(Some(known));
        }
        reads("database");
        let key = codec::lease_key(token_hash);
        let Some(row) = self
            .row(&self.sql.redemption, &[&token_hash.0.as_slice()])
            .await?
        else {
            return Ok(None);
        };
        let lease: LeaseRecord = record(&key, &row, 0)?;
        let secret: Option<SecretRecord> = row
            .get::<_, Option<&[u8]>>(1)
            .map(|b| codec::decode_record(b"secret", b))
            .transpose()?;
        let envelope: Option<EnvelopeRecord> = row
            .get::<_, Option<&[u8]>>(2)
            .map(|b| codec::decode_record(b"envelope", b))
            .transpose()?;
        let found = Redemption {
            lease,
            secret,
            envelope,
        };
        self.redemptions.read(&found);
        Ok(Some(found))
    }

    async fn lease_by_id(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        self.find_record(b"lease", &self.sql.lease_by_id, &[&uuid(id.as_bytes())])
            .await
    }

    async fn expired_leases(
        &self,
        now: Time,
        limit_to: usize,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        self.records(
            b"lease",
            &self.sql.expired_leases,
            &[&now.as_micros(), &limit(limit_to)],
        )
        .await
    }

    async fn audit_entries(
        &self,
        from: u64,
        limit_to: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = self
            .rows(
                &self.sql.audit_entries,
                &[&(from.min(i64::MAX as u64) as i64), &limit(limit_to)],
            )
            .await?;
        rows.iter().map(audit).collect()
    }

    async fn audit_entry(&self, seq: u64) -> Result<Option<AuditRecord>, StoreError> {
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(None);
        };
        let row = self.row(&self.sql.audit_entry, &[&seq]).await?;
        row.as_ref().map(audit).transpose()
    }

    async fn audit_head(&self) -> Result<Option<AuditRecord>, StoreError> {
        let row = self.row(&self.sql.audit_head, &[]).await?;
        row.as_ref().map(audit).transpose()
    }

    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
        let row = self.row(&self.sql.anchor, &[]).await?;
        row.map(|r| codec::decode(codec::AUDIT_ANCHOR_META, r.get::<_, &[u8]>(0)))
            .transpose()
    }

    async fn audit_index(
        &self,
        index: &AuditIndex,
        from: u64,
        limit_to: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let rows = self
            .rows(
                &self.sql.audit_index,
                &[
                    &codec::audit_index_prefix(index),
                    &(from.min(i64::MAX as u64) as i64),
                    &limit(limit_to),
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    async fn audit_query(
        &self,
        filter: &AuditFilter,
        from: u64,
        until_seq: u64,
        page_size: usize,
    ) -> Result<AuditPage, StoreError> {
        query::walk(self, filter, from, until_seq, page_size).await
    }

    /// The latest entry of any replica this process knows to be committed.
    fn durable_audit_seq(&self) -> u64 {
        self.committer.status().durable_seq().max(self.feed.head())
    }

    /// Every replica's entries, in order, as they commit.
    fn subscribe_audit(&self) -> broadcast::Receiver<Arc<AuditRecord>> {
        self.feed.subscribe()
    }

    async fn start_audit_chain(&self, key: Arc<ChainKey>) -> Result<(), StoreError> {
        self.committer.start_chain(key).await
    }

    async fn meta(&self, key: MetaKey) -> Result<Option<(Revision, Vec<u8>)>, StoreError> {
        let row = self.row(&self.sql.meta, &[&key.name()]).await?;
        Ok(row.map(|r| (Revision(r.get::<_, i64>(0) as u64), r.get(1))))
    }

    /// A commit whose guards failed forgets the records they name: the retry reads them.
    async fn commit(&self, tx: Transaction) -> Result<Committed, StoreError> {
        let guarded = Redemptions::guarded(&tx.guards);
        let result = self.committer.commit(tx).await;
        if let Err(StoreError::Conflict) = &result {
            self.redemptions.forget(&guarded);
        }
        result
    }

    async fn close(&self) -> Result<(), StoreError> {
        let closed = self.committer.close().await;
        self.feed.stop();
        self.pool.close();
        closed
    }

    async fn usage(&self, key: &UsageKey) -> Result<Usage, StoreError> {
        let row = self.row(&self.sql.usage, &[&key.as_str()]).await?;
        Ok(row.map(|r| usage_of(&r, 1)).unwrap_or_default())
    }

    async fn activity(&self, ids: &[SecretId]) -> Result<Vec<SecretActivity>, StoreError> {
        let keys: Vec<uuid::Uuid> = ids.iter().map(|id| uuid(id.as_bytes())).collect();
        let mut found = std::collections::HashMap::new();
        for row in self.rows(&self.sql.activity, &[&keys]).await? {
            let (id, activity) = activity::secret_of(&row)?;
            found.insert(id, activity);
        }
        Ok(ids
            .iter()
            .map(|id| found.remove(id).unwrap_or_default())
            .collect())
    }

    async fn activity_days(&self, query: &DayQuery) -> Result<Vec<DayRow>, StoreError> {
        let name = query.name.as_ref().map(|n| n.as_str());
        let rows = self
            .rows(
                &self.sql.activity_days,
                &[
                    &query.tenant.as_str(),
                    &query.from,
                    &query.to,
                    &name,
                    &limit(query.limit.saturating_add(1)),
                ],
            )
            .await?;
        rows.iter().map(activity::day_of).collect()
    }

    async fn size_on_disk(&self) -> Result<u64, StoreError> {
        let row = self.row(&self.sql.size, &[]).await?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    fn writable(&self) -> bool {
        self.committer.status().writable()
    }

    fn failed_for_good(&self) -> bool {
        self.committer.status().failed_for_good()
    }

    async fn export(&self, sink: ExportSink) -> Result<u64, StoreError> {
        self.export_snapshot(sink).await
    }

    async fn import(&self, source: ImportSource) -> Result<u64, StoreError> {
        self.committer.import(source).await
    }
}
