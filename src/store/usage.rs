//! What each tenant holds (active secrets, the bytes of their sealed values, lease records),
//! and the quotas the commit core holds it to.
//!
//! The usage is part of the store's state, so that every process writing one store counts
//! the same: a transaction carries [`Charge`]s (what it adds or gives back, per tenant), and
//! the commit core checks them against the usage as the engine holds it, overlaid with the
//! group's earlier charges ([`Ledger`]), under the same writers' lock as the guards. A charge
//! that would take a tenant (or all tenants together) past a quota fails its transaction with
//! [`OverQuota`] and nothing of it is written; the new usage is written with the group.
//! Giving back is never refused and never goes below zero.
//!
//! An engine starts from counts ([`Tally`]): of its records when it opens (sled, which keeps
//! the usage in memory) or when its usage table is made (PostgreSQL), and of the records an
//! import brings.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::model::{EnvelopeRecord, LeaseRecord, SecretId, TenantId};

/// What a tenant holds (or all tenants together).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Active secrets.
    pub secrets: u64,
    /// Bytes of their sealed values.
    pub value_bytes: u64,
    /// Lease records.
    pub leases: u64,
}

impl Usage {
    /// The usage after `delta` (never below zero).
    pub fn after(self, delta: Delta) -> Usage {
        let add = |value: u64, delta: i64| {
            if delta >= 0 {
                value.saturating_add(delta.unsigned_abs())
            } else {
                value.saturating_sub(delta.unsigned_abs())
            }
        };
        Usage {
            secrets: add(self.secrets, delta.secrets),
            value_bytes: add(self.value_bytes, delta.value_bytes),
            leases: add(self.leases, delta.leases),
        }
    }
}

/// A change in a tenant's usage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    /// Secrets.
    pub secrets: i64,
    /// Value bytes.
    pub value_bytes: i64,
    /// Leases.
    pub leases: i64,
}

impl Delta {
    /// The opposite change.
    pub fn back(self) -> Delta {
        Delta {
            secrets: -self.secrets,
            value_bytes: -self.value_bytes,
            leases: -self.leases,
        }
    }

    /// True if anything grows.
    pub fn grows(self) -> bool {
        self.secrets > 0 || self.value_bytes > 0 || self.leases > 0
    }
}

/// The quotas a charge is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Active secrets per tenant.
    pub secrets_per_tenant: u64,
    /// Bytes of sealed values per tenant.
    pub value_bytes_per_tenant: u64,
    /// Lease records per tenant.
    pub leases_per_tenant: u64,
    /// Bytes of sealed values of all tenants together.
    pub value_bytes_total: u64,
}

/// Whose usage a stored count is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UsageKey {
    /// One tenant's.
    Tenant(TenantId),
    /// All tenants' together.
    All,
}

impl UsageKey {
    /// The key as an engine stores it: the tenant's name, or the empty string (which no
    /// tenant is named) for all tenants.
    pub fn as_str(&self) -> &str {
        match self {
            UsageKey::Tenant(tenant) => tenant.as_str(),
            UsageKey::All => "",
        }
    }

    /// The key stored as `s`.
    pub fn parse(s: &str) -> Option<UsageKey> {
        if s.is_empty() {
            return Some(UsageKey::All);
        }
        TenantId::parse(s).ok().map(UsageKey::Tenant)
    }
}

/// What a transaction adds to (or gives back from) a tenant's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The tenant.
    pub tenant: TenantId,
    /// The change.
    pub delta: Delta,
    /// The quotas it is held to where it grows (`None`: never refused).
    pub limits: Option<Limits>,
}

/// Why a charge was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OverQuota {
    /// A tenant quota.
    #[error("tenant {tenant} is at its quota of {limit} {what}")]
    Tenant {
        /// The tenant.
        tenant: TenantId,
        /// What is counted.
        what: &'static str,
        /// The quota.
        limit: u64,
    },
    /// All tenants' value bytes together.
    #[error("the vault holds its quota of {limit} value bytes in all")]
    Total {
        /// The quota.
        limit: u64,
    },
}

/// The usage a group's charges are checked against: what its transactions so far left, then
/// the stored usage read when the group began.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Read from the engine at the group's start.
    pub stored: foldhash::HashMap<UsageKey, Usage>,
    /// As the group's transactions so far left it.
    written: foldhash::HashMap<UsageKey, Usage>,
}

impl Ledger {
    /// The keys whose usage `charges` need.
    pub fn keys<'a>(charges: impl IntoIterator<Item = &'a Charge>) -> Vec<UsageKey> {
        let mut keys: Vec<UsageKey> = charges
            .into_iter()
            .map(|c| UsageKey::Tenant(c.tenant.clone()))
            .collect::<foldhash::HashSet<_>>()
            .into_iter()
            .collect();
        if !keys.is_empty() {
            keys.push(UsageKey::All);
        }
        keys
    }

    fn current(&self, key: &UsageKey) -> Usage {
        self.written
            .get(key)
            .or_else(|| self.stored.get(key))
            .copied()
            .unwrap_or_default()
    }

    /// The usage `charges` leave, if all of them stay within their quotas: not applied
    /// until [`Ledger::apply`].
    pub fn charge(&self, charges: &[Charge]) -> Result<Vec<(UsageKey, Usage)>, OverQuota> {
        let mut next: BTreeMap<UsageKey, Usage> = BTreeMap::new();
        for charge in charges {
            let key = UsageKey::Tenant(charge.tenant.clone());
            let before = next
                .get(&key)
                .copied()
                .unwrap_or_else(|| self.current(&key));
            let after = before.after(charge.delta);
            let all = next
                .get(&UsageKey::All)
                .copied()
                .unwrap_or_else(|| self.current(&UsageKey::All))
                .after(charge.delta);
            if let Some(limits) = &charge.limits {
                check(&charge.tenant, charge.delta, after, all, limits)?;
            }
            next.insert(key, after);
            next.insert(UsageKey::All, all);
        }
        Ok(next.into_iter().collect())
    }

    /// Keeps what [`Ledger::charge`] returned (its transaction is in the group).
    pub fn apply(&mut self, charged: Vec<(UsageKey, Usage)>) {
        self.written.extend(charged);
    }

    /// The usage the group leaves, for every key it changed.
    pub fn written(&self) -> Vec<(UsageKey, Usage)> {
        let mut written: Vec<_> = self.written.iter().map(|(k, u)| (k.clone(), *u)).collect();
        written.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        written
    }
}

/// Refuses a charge that grows past a quota; `after` is the tenant's usage with it, `all`
/// all tenants' together.
fn check(
    tenant: &TenantId,
    delta: Delta,
    after: Usage,
    all: Usage,
    limits: &Limits,
) -> Result<(), OverQuota> {
    let over = |grows: bool, value: u64, limit: u64, what| {
        if grows && value > limit {
            Err(OverQuota::Tenant {
                tenant: tenant.clone(),
                what,
                limit,
            })
        } else {
            Ok(())
        }
    };
    over(
        delta.secrets > 0,
        after.secrets,
        limits.secrets_per_tenant,
        "secrets",
    )?;
    over(
        delta.value_bytes > 0,
        after.value_bytes,
        limits.value_bytes_per_tenant,
        "value bytes",
    )?;
    if delta.value_bytes > 0 && all.value_bytes > limits.value_bytes_total {
        return Err(OverQuota::Total {
            limit: limits.value_bytes_total,
        });
    }
    over(
        delta.leases > 0,
        after.leases,
        limits.leases_per_tenant,
        "leases",
    )
}

/// Counts the usage of a store's records from its envelopes (an active secret has one, or two
/// for a moment; a revoked one none) and its lease records.
#[derive(Debug, Default)]
pub struct Tally {
    usage: HashMap<TenantId, Usage>,
    /// The secrets counted.
    secrets: HashSet<SecretId>,
}

impl Tally {
    /// Counts an envelope's sealed value, and its secret the first time.
    pub fn envelope(&mut self, envelope: &EnvelopeRecord) {
        let usage = self.usage.entry(envelope.tenant.clone()).or_default();
        usage.value_bytes += envelope.ciphertext.len() as u64;
        if self.secrets.insert(envelope.secret_id) {
            usage.secrets += 1;
        }
    }

    /// Counts a lease record.
    pub fn lease(&mut self, lease: &LeaseRecord) {
        self.leases(&lease.tenant, 1);
    }

    /// Counts `count` lease records of `tenant`.
    pub fn leases(&mut self, tenant: &TenantId, count: u64) {
        self.usage.entry(tenant.clone()).or_default().leases += count;
    }

    /// True if nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.usage.is_empty()
    }

    /// The usage counted, per tenant and for all together.
    pub fn finish(self) -> HashMap<UsageKey, Usage> {
        let mut all = Usage::default();
        let mut counted: HashMap<UsageKey, Usage> = HashMap::new();
        for (tenant, usage) in self.usage {
            all.secrets += usage.secrets;
            all.value_bytes += usage.value_bytes;
            all.leases += usage.leases;
            counted.insert(UsageKey::Tenant(tenant), usage);
        }
        counted.insert(UsageKey::All, all);
        counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(secrets: u64) -> Limits {
        Limits {
            secrets_per_tenant: secrets,
            value_bytes_per_tenant: 1000,
            leases_per_tenant: 10,
            value_bytes_total: 1500,
        }
    }

    fn charge(tenant: &TenantId, delta: Delta, limited: bool) -> Charge {
        Charge {
            tenant: tenant.clone(),
            delta,
            limits: limited.then(|| limits(2)),
        }
    }

    #[test]
    fn charges_stop_at_each_quota_count_the_group_and_give_back_without_limit() {
        let t = TenantId::parse("t").unwrap();
        let u = TenantId::parse("u").unwrap();
        let one = Delta {
            secrets: 1,
            value_bytes: 100,
            leases: 0,
        };
        let mut ledger = Ledger::default();
        ledger.stored.insert(
            UsageKey::Tenant(t.clone()),
            Usage {
                secrets: 1,
                value_bytes: 100,
                leases: 0,
            },
        );
        // A charge not applied leaves nothing.
        let _ = ledger.charge(&[charge(&t, one, true)]).unwrap();
        let applied = ledger.charge(&[charge(&t, one, true)]).unwrap();
        ledger.apply(applied);
        // The group's own charge counts: a third secret is over the quota of 2.
        assert_eq!(
            ledger.charge(&[charge(&t, one, true)]),
            Err(OverQuota::Tenant {
                tenant: t.clone(),
                what: "secrets",
                limit: 2
            })
        );
        // Another tenant has room; a charge of two tenants fails as a whole.
        assert!(ledger.charge(&[charge(&u, one, true)]).is_ok());
        assert!(
            ledger
                .charge(&[charge(&u, one, true), charge(&t, one, true)])
                .is_err()
        );
        // Giving back is never refused, and never goes below zero.
        let back = ledger
            .charge(&[charge(
                &t,
                Delta {
                    secrets: -5,
                    value_bytes: -100,
                    leases: 0,
                },
                false,
            )])
            .unwrap();
        ledger.apply(back);
        assert_eq!(ledger.current(&UsageKey::Tenant(t.clone())).secrets, 0);
        // Value bytes per tenant, then all tenants together (1500).
        let big = |bytes| Delta {
            value_bytes: bytes,
            ..Delta::default()
        };
        assert!(matches!(
            ledger.charge(&[charge(&t, big(901), true)]),
            Err(OverQuota::Tenant {
                what: "value bytes",
                ..
            })
        ));
        let applied = ledger.charge(&[charge(&u, big(1000), true)]).unwrap();
        ledger.apply(applied);
        assert_eq!(
            ledger.charge(&[charge(&t, big(501), true)]),
            Err(OverQuota::Total { limit: 1500 })
        );
        // Shrinking is never refused, even over a quota.
        assert!(ledger.charge(&[charge(&t, big(-50), true)]).is_ok());
        let written = ledger.written();
        assert_eq!(written.last().map(|(k, _)| k), Some(&UsageKey::All));
        assert_eq!(
            written
                .iter()
                .find(|(k, _)| *k == UsageKey::All)
                .map(|(_, u)| u.value_bytes),
            Some(1000)
        );
    }
}
