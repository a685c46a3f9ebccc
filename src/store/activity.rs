//! How much each secret is used: leases issued, redemptions and failed redemptions, in all
//! and per UTC day (and principal), for the owners of the keys to match their providers'
//! bills.
//!
//! The counts are derived from the audit entries a group commits ([`Activity::of`]), by the
//! commit core, so that they change in the same atomic write as the Lease or Get they count
//! and agree with the trail on every engine. An engine stores them beside the records:
//! PostgreSQL adds a group's counts to its rows in the group's statement; sled, whose groups
//! of lease changes are durable through the trail alone, stores with each row the last
//! entry it counts (`through`) and counts again from the trail after a crash, skipping what
//! a row already holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{
    Action, AuditRecord, Outcome, PrincipalId, SecretId, SecretName, TenantId, Time,
};

/// Microseconds in a day.
pub const DAY_MICROS: i64 = 86_400_000_000;

/// The day (since the Unix epoch, UTC) that holds `time`.
pub fn day_of(time: Time) -> i64 {
    time.as_micros().div_euclid(DAY_MICROS)
}

/// A secret's use in all.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretActivity {
    /// Leases issued.
    pub leases_issued: u64,
    /// Successful redemptions (Gets).
    pub redemptions: u64,
    /// Gets that named one of its leases and failed.
    pub failed_redemptions: u64,
    /// When the last lease was issued.
    pub last_leased_at: Option<Time>,
    /// When the last redemption succeeded.
    pub last_redeemed_at: Option<Time>,
    /// Whose it was.
    pub last_redeemed_by: Option<PrincipalId>,
}

impl SecretActivity {
    /// Adds `later` (counted from entries after those this holds).
    pub fn add(&mut self, later: &SecretActivity) {
        self.leases_issued += later.leases_issued;
        self.redemptions += later.redemptions;
        self.failed_redemptions += later.failed_redemptions;
        if later.last_leased_at.is_some() {
            self.last_leased_at = later.last_leased_at;
        }
        if later.last_redeemed_at.is_some() {
            self.last_redeemed_at = later.last_redeemed_at;
            self.last_redeemed_by = later.last_redeemed_by.clone();
        }
    }
}

/// One bucket's counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Leases issued.
    pub leases: u64,
    /// Successful redemptions.
    pub redemptions: u64,
    /// Failed redemptions.
    pub failed_redemptions: u64,
}

impl Counts {
    /// Adds `other`.
    pub fn add(&mut self, other: Counts) {
        self.leases += other.leases;
        self.redemptions += other.redemptions;
        self.failed_redemptions += other.failed_redemptions;
    }
}

/// Which day bucket: a tenant's secret on one UTC day, used by one principal (`""`: a caller
/// that was not authenticated).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DayKey {
    /// The tenant.
    pub tenant: TenantId,
    /// The day (see [`day_of`]).
    pub day: i64,
    /// The secret.
    pub secret_id: SecretId,
    /// The caller.
    pub principal: String,
}

/// A day bucket as stored: its key, the secret's name and the counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayRow {
    /// Which bucket.
    pub key: DayKey,
    /// The secret's name.
    pub name: SecretName,
    /// What was counted.
    pub counts: Counts,
}

/// Which day buckets a report reads: a tenant's (one secret name's, if given) from day
/// `from` through day `to`, at most `limit` of them (an engine returns one more if there
/// are more, so that its caller can tell).
#[derive(Debug, Clone)]
pub struct DayQuery {
    /// The tenant.
    pub tenant: TenantId,
    /// One name only.
    pub name: Option<SecretName>,
    /// The first day.
    pub from: i64,
    /// The last day.
    pub to: i64,
    /// The most rows wanted.
    pub limit: usize,
}

impl DayQuery {
    /// True if `row` answers the query (for an engine that walks more than it answers).
    pub fn matches(&self, row: &DayRow) -> bool {
        row.key.tenant == self.tenant
            && (self.from..=self.to).contains(&row.key.day)
            && self.name.as_ref().is_none_or(|name| *name == row.name)
    }
}

/// What a run of audit entries adds to the counts: per secret, and per day bucket with the
/// secret's name; each with the last entry that added to it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Activity {
    /// Per secret: what it adds, and the last entry counted.
    pub secrets: BTreeMap<SecretId, (SecretActivity, u64)>,
    /// Per day bucket: the secret's name, what it adds, and the last entry counted.
    pub days: BTreeMap<DayKey, (SecretName, Counts, u64)>,
    /// The entries that counted.
    pub entries: u64,
}

impl Activity {
    /// The counts of `entries`, in their order.
    pub fn of<'a>(entries: impl IntoIterator<Item = &'a AuditRecord>) -> Self {
        let mut activity = Self::default();
        for entry in entries {
            activity.count(entry);
        }
        activity
    }

    /// Counts one entry: a Lease issued, a Get that succeeded, or a Get that named a lease of
    /// a secret and failed. Nothing else counts.
    pub fn count(&mut self, record: &AuditRecord) {
        let entry = &record.entry;
        let (Some(tenant), Some(name), Some(secret_id)) =
            (&entry.tenant, &entry.name, entry.secret_id)
        else {
            return;
        };
        let ok = entry.outcome == Outcome::Ok;
        let mut secret = SecretActivity::default();
        let mut counts = Counts::default();
        match (entry.action, ok) {
            (Action::Lease, true) => {
                secret.leases_issued = 1;
                secret.last_leased_at = Some(record.time);
                counts.leases = 1;
            }
            (Action::Get, true) => {
                secret.redemptions = 1;
                secret.last_redeemed_at = Some(record.time);
                secret.last_redeemed_by = entry.principal.clone();
                counts.redemptions = 1;
            }
            (Action::Get, false) => {
                secret.failed_redemptions = 1;
                counts.failed_redemptions = 1;
            }
            _ => return,
        }
        self.entries += 1;
        let (sum, through) = self.secrets.entry(secret_id).or_default();
        sum.add(&secret);
        *through = record.seq;
        let key = DayKey {
            tenant: tenant.clone(),
            day: day_of(record.time),
            secret_id,
            principal: entry
                .principal
                .as_ref()
                .map_or_else(String::new, |p| p.as_str().to_string()),
        };
        let (_, sum, through) = self
            .days
            .entry(key)
            .or_insert_with(|| (name.clone(), Counts::default(), 0));
        sum.add(counts);
        *through = record.seq;
    }
}

/// A row as an engine that applies counts more than once (sled, after a crash) stores it:
/// the value and the last entry it counts, so that counting an entry again changes nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counted<T> {
    /// The value.
    pub value: T,
    /// The last entry counted.
    pub through: u64,
}

impl<T> Counted<T> {
    /// Adds what entries through `through` counted (`add`), unless the row counts them
    /// already. True if it changed.
    pub fn add_through(&mut self, through: u64, add: impl FnOnce(&mut T)) -> bool {
        if self.through >= through {
            return false;
        }
        add(&mut self.value);
        self.through = through;
        true
    }
}

/// A day bucket's stored value: the secret's name and the counts.
pub type DayValue = (SecretName, Counts);

/// The buckets of a report: one per day and secret (and principal if `by_principal`; else
/// the principal is `""`), ordered by day, name, secret and principal.
pub fn buckets(rows: Vec<DayRow>, by_principal: bool) -> Vec<DayRow> {
    let mut merged: BTreeMap<(i64, SecretName, SecretId, String), (TenantId, Counts)> =
        BTreeMap::new();
    for row in rows {
        let principal = if by_principal {
            row.key.principal
        } else {
            String::new()
        };
        let (_, counts) = merged
            .entry((row.key.day, row.name, row.key.secret_id, principal))
            .or_insert_with(|| (row.key.tenant, Counts::default()));
        counts.add(row.counts);
    }
    merged
        .into_iter()
        .map(
            |((day, name, secret_id, principal), (tenant, counts))| DayRow {
                key: DayKey {
                    tenant,
                    day,
                    secret_id,
                    principal,
                },
                name,
                counts,
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::GENESIS;
    use crate::model::AuditDraft;

    fn entry(seq: u64, at: i64, action: Action, outcome: Outcome, who: &str) -> AuditRecord {
        let mut draft = AuditDraft::new(action, PrincipalId::parse(who).ok(), None);
        draft.tenant = TenantId::parse("t").ok();
        draft.name = SecretName::parse("k").ok();
        draft.secret_id = Some(SecretId::from_bytes([7; 16]));
        draft.outcome = outcome;
        AuditRecord {
            seq,
            time: Time::from_micros(at),
            entry: draft,
            prev_hash: GENESIS,
            hash: GENESIS,
        }
    }

    #[test]
    fn leases_gets_and_failures_count_per_secret_day_and_principal() {
        let day = DAY_MICROS;
        let entries = [
            entry(1, 10, Action::Lease, Outcome::Ok, "app"),
            entry(2, 20, Action::Get, Outcome::Ok, "agent"),
            entry(3, day + 1, Action::Get, Outcome::NotFound, "other"),
            entry(4, day + 2, Action::Get, Outcome::Ok, "agent2"),
            entry(
                5,
                day + 3,
                Action::Lease,
                Outcome::FailedPrecondition,
                "app",
            ),
            entry(6, day + 4, Action::Describe, Outcome::Ok, "app"),
        ];
        let activity = Activity::of(&entries);
        let (secret, through) = &activity.secrets[&SecretId::from_bytes([7; 16])];
        assert_eq!(*through, 4);
        assert_eq!(
            (
                secret.leases_issued,
                secret.redemptions,
                secret.failed_redemptions
            ),
            (1, 2, 1)
        );
        assert_eq!(secret.last_leased_at, Some(Time::from_micros(10)));
        assert_eq!(secret.last_redeemed_at, Some(Time::from_micros(day + 2)));
        assert_eq!(
            secret.last_redeemed_by.as_ref().map(|p| p.as_str()),
            Some("agent2")
        );
        assert_eq!(activity.days.len(), 4);
        let rows: Vec<DayRow> = activity
            .days
            .into_iter()
            .map(|(key, (name, counts, _))| DayRow { key, name, counts })
            .collect();
        let per_day = buckets(rows.clone(), false);
        assert_eq!(per_day.len(), 2);
        assert_eq!(
            per_day[1].counts,
            Counts {
                leases: 0,
                redemptions: 1,
                failed_redemptions: 1
            }
        );
        assert_eq!(per_day[1].key.principal, "");
        let per_principal = buckets(rows, true);
        assert_eq!(per_principal.len(), 4);
        assert_eq!(per_principal[0].key.principal, "agent");
        assert_eq!(day_of(Time::from_micros(-1)), -1);
    }
}
