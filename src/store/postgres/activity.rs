//! The secrets' use (`store/activity.rs`) in the `activity` and `activity_days` tables: what
//! a group's entries add goes into the group's statement as two additive upserts, so the
//! counts commit with the entries they count; migration 3 counts the trail once.

use postgres::types::ToSql;

use crate::model::{PrincipalId, SecretId, SecretName, TenantId, Time};
use crate::store::StoreError;
use crate::store::activity::{Activity, Counts, DayKey, DayRow, SecretActivity};
use crate::store::codec;

use super::pg_error;

/// A secret's id as PostgreSQL's `uuid`.
fn uuid(id: SecretId) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

/// Parameters the upserts take.
pub(super) const PARAMS: usize = 15;

/// The group statement's `WITH` clauses that add to the rows, their parameters numbered from
/// `first` (see [`Columns::params`]).
pub(super) fn upserts(s: &str, first: usize) -> String {
    let p: Vec<usize> = (first..first + PARAMS).collect();
    format!(
        "put_activity AS (
           INSERT INTO {s}.activity AS a (secret_id, leases_issued, redemptions,
             failed_redemptions, last_leased_at, last_redeemed_at, last_redeemed_by)
           SELECT * FROM unnest(${}::uuid[], ${}::int8[], ${}::int8[], ${}::int8[],
                                ${}::int8[], ${}::int8[], ${}::text[])
           ON CONFLICT (secret_id) DO UPDATE SET
             leases_issued = a.leases_issued + excluded.leases_issued,
             redemptions = a.redemptions + excluded.redemptions,
             failed_redemptions = a.failed_redemptions + excluded.failed_redemptions,
             last_leased_at = coalesce(excluded.last_leased_at, a.last_leased_at),
             last_redeemed_by = CASE WHEN excluded.last_redeemed_at IS NULL
               THEN a.last_redeemed_by ELSE excluded.last_redeemed_by END,
             last_redeemed_at = coalesce(excluded.last_redeemed_at, a.last_redeemed_at)),
         put_activity_days AS (
           INSERT INTO {s}.activity_days AS d (tenant, day, secret_id, principal, name, leases,
             redemptions, failed_redemptions)
           SELECT * FROM unnest(${}::text[], ${}::int8[], ${}::uuid[], ${}::text[], ${}::text[],
                                ${}::int8[], ${}::int8[], ${}::int8[])
           ON CONFLICT (tenant, day, secret_id, principal) DO UPDATE SET
             leases = d.leases + excluded.leases,
             redemptions = d.redemptions + excluded.redemptions,
             failed_redemptions = d.failed_redemptions + excluded.failed_redemptions)",
        p[0],
        p[1],
        p[2],
        p[3],
        p[4],
        p[5],
        p[6],
        p[7],
        p[8],
        p[9],
        p[10],
        p[11],
        p[12],
        p[13],
        p[14]
    )
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// What a group adds, as columns for `unnest`.
#[derive(Default)]
pub(super) struct Columns {
    id: Vec<uuid::Uuid>,
    leases_issued: Vec<i64>,
    redemptions: Vec<i64>,
    failed: Vec<i64>,
    last_leased_at: Vec<Option<i64>>,
    last_redeemed_at: Vec<Option<i64>>,
    last_redeemed_by: Vec<Option<String>>,
    day_tenant: Vec<String>,
    day: Vec<i64>,
    day_id: Vec<uuid::Uuid>,
    day_principal: Vec<String>,
    day_name: Vec<String>,
    day_leases: Vec<i64>,
    day_redemptions: Vec<i64>,
    day_failed: Vec<i64>,
}

impl Columns {
    /// The columns of `activity`.
    pub(super) fn of(activity: &Activity) -> Self {
        let mut c = Self::default();
        for (id, (a, _)) in &activity.secrets {
            c.id.push(uuid(*id));
            c.leases_issued.push(count(a.leases_issued));
            c.redemptions.push(count(a.redemptions));
            c.failed.push(count(a.failed_redemptions));
            c.last_leased_at.push(a.last_leased_at.map(Time::as_micros));
            c.last_redeemed_at
                .push(a.last_redeemed_at.map(Time::as_micros));
            c.last_redeemed_by
                .push(a.last_redeemed_by.as_ref().map(|p| p.as_str().to_string()));
        }
        for (key, (name, counts, _)) in &activity.days {
            c.day_tenant.push(key.tenant.as_str().to_string());
            c.day.push(key.day);
            c.day_id.push(uuid(key.secret_id));
            c.day_principal.push(key.principal.clone());
            c.day_name.push(name.as_str().to_string());
            c.day_leases.push(count(counts.leases));
            c.day_redemptions.push(count(counts.redemptions));
            c.day_failed.push(count(counts.failed_redemptions));
        }
        c
    }

    /// The [`PARAMS`] parameters of [`upserts`].
    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); PARAMS] {
        [
            &self.id,
            &self.leases_issued,
            &self.redemptions,
            &self.failed,
            &self.last_leased_at,
            &self.last_redeemed_at,
            &self.last_redeemed_by,
            &self.day_tenant,
            &self.day,
            &self.day_id,
            &self.day_principal,
            &self.day_name,
            &self.day_leases,
            &self.day_redemptions,
            &self.day_failed,
        ]
    }
}

/// Migration 3's fill: counts the trail into the tables, under the writers' lock (so that no
/// group of any replica commits meanwhile).
pub(super) fn count_trail(tx: &mut postgres::Transaction<'_>, s: &str) -> Result<(), StoreError> {
    use postgres::fallible_iterator::FallibleIterator;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock(hashtext('byokd-commit:{s}'))"
    ))
    .map_err(pg_error)?;
    let mut activity = Activity::default();
    let mut rows = tx
        .query_raw(
            &format!("SELECT seq, record FROM {s}.audit ORDER BY seq"),
            std::iter::empty::<&(dyn ToSql + Sync)>(),
        )
        .map_err(pg_error)?;
    while let Some(row) = rows.next().map_err(pg_error)? {
        let seq: i64 = row.get(0);
        activity.count(&codec::decode(
            &codec::audit_key(seq as u64),
            row.get::<_, &[u8]>(1),
        )?);
    }
    drop(rows);
    let columns = Columns::of(&activity);
    tx.execute(
        &format!("WITH {} SELECT 1", upserts(s, 1)),
        &columns.params(),
    )
    .map_err(pg_error)?;
    Ok(())
}

fn corrupt(what: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: what.to_string(),
        reason: reason.to_string(),
    }
}

/// A row of `SELECT secret_id, leases_issued, redemptions, failed_redemptions,
/// last_leased_at, last_redeemed_at, last_redeemed_by FROM activity`.
pub(super) fn secret_of(
    row: &tokio_postgres::Row,
) -> Result<(SecretId, SecretActivity), StoreError> {
    let id: uuid::Uuid = row.get(0);
    let n = |i| row.get::<_, i64>(i).max(0) as u64;
    let by = row
        .get::<_, Option<&str>>(6)
        .map(PrincipalId::parse)
        .transpose()
        .map_err(|e| corrupt("activity", e))?;
    Ok((
        SecretId::from_bytes(*id.as_bytes()),
        SecretActivity {
            leases_issued: n(1),
            redemptions: n(2),
            failed_redemptions: n(3),
            last_leased_at: row.get::<_, Option<i64>>(4).map(Time::from_micros),
            last_redeemed_at: row.get::<_, Option<i64>>(5).map(Time::from_micros),
            last_redeemed_by: by,
        },
    ))
}

/// A row of `SELECT tenant, day, secret_id, principal, name, leases, redemptions,
/// failed_redemptions FROM activity_days`.
pub(super) fn day_of(row: &tokio_postgres::Row) -> Result<DayRow, StoreError> {
    let id: uuid::Uuid = row.get(2);
    let n = |i| row.get::<_, i64>(i).max(0) as u64;
    Ok(DayRow {
        key: DayKey {
            tenant: TenantId::parse(row.get::<_, &str>(0))
                .map_err(|e| corrupt("activity_days", e))?,
            day: row.get(1),
            secret_id: SecretId::from_bytes(*id.as_bytes()),
            principal: row.get::<_, &str>(3).to_string(),
        },
        name: SecretName::parse(row.get::<_, &str>(4)).map_err(|e| corrupt("activity_days", e))?,
        counts: Counts {
            leases: n(5),
            redemptions: n(6),
            failed_redemptions: n(7),
        },
    })
}
