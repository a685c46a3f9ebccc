//! How much secrets are used: each secret's totals in its metadata, and GetUsage's report
//! per UTC day (the counts are kept by the store as Leases and Gets commit:
//! `store/activity.rs`).

use crate::auth::Operation;
use crate::model::{Action, SecretId, SecretName, SecretRecord, TenantId, Time, ValidationError};
use crate::store::activity::{DAY_MICROS, buckets, day_of};
use crate::store::{DayQuery, DayRow, SecretActivity};

use super::trail::time_field;
use super::{Caller, Described, UsageInput, Vault, VaultError, noted};

/// Most days one report covers.
pub const MAX_USAGE_DAYS: i64 = 366;
/// Days a report covers when it names no start.
const DEFAULT_USAGE_DAYS: i64 = 30;
/// Most stored buckets one report reads (one per day, secret and principal).
pub const MAX_USAGE_ROWS: usize = 100_000;

impl Vault {
    /// How much a tenant's secrets (or one name's) were used per UTC day.
    pub async fn get_usage(
        &self,
        caller: &Caller,
        input: UsageInput,
    ) -> Result<Vec<DayRow>, VaultError> {
        operation!(self, caller, Action::GetUsage, |audit| {
            let tenant = TenantId::from_request(input.tenant.as_str());
            let tenant = noted(caller, "tenant", tenant, &mut audit.tenant);
            let name = match input.name.as_str() {
                "" => None,
                name => {
                    let name = SecretName::from_request(name);
                    Some(noted(caller, "name", name, &mut audit.name))
                }
            };
            let principal = caller.authorize(Operation::GetUsage)?;
            let tenant = tenant?;
            let name = name.transpose()?;
            principal.require_tenant(&tenant)?;
            let (from, to) = day_range(input.from, input.to, Time::now())?;
            let query = DayQuery {
                tenant,
                name,
                from,
                to,
                limit: MAX_USAGE_ROWS,
            };
            let rows = self.store.activity_days(&query).await?;
            if rows.len() > MAX_USAGE_ROWS {
                return Err(ValidationError::new(
                    "from",
                    format!(
                        "the range holds more than {MAX_USAGE_ROWS} buckets; ask for fewer days or one name"
                    ),
                )
                .into());
            }
            self.record(audit.settle()).await?;
            Ok(buckets(rows, input.group_by_principal))
        })
    }

    /// `secrets` with their use, for a read's answer.
    pub(super) async fn described(
        &self,
        secrets: Vec<SecretRecord>,
    ) -> Result<Vec<Described>, VaultError> {
        let ids: Vec<SecretId> = secrets.iter().map(|s| s.id).collect();
        let usage = self.store.activity(&ids).await?;
        Ok(secrets
            .into_iter()
            .zip(usage)
            .map(|(secret, usage)| Described {
                secret,
                usage: Some(usage),
            })
            .collect())
    }

    /// A secret a change committed, with its use for the answer: none if it cannot be read
    /// now (the change stands; the cause is logged).
    pub(super) async fn after_change(&self, secret: SecretRecord) -> Described {
        Described {
            usage: self.usage_after(secret.id).await,
            secret,
        }
    }

    /// The use of a secret a change committed (see [`Vault::after_change`]).
    pub(super) async fn usage_after(&self, id: SecretId) -> Option<SecretActivity> {
        match self.store.activity(&[id]).await {
            Ok(mut found) => found.pop(),
            Err(e) => {
                tracing::warn!(error = %e, "could not read a secret's use for an answer");
                None
            }
        }
    }
}

/// The days a report covers: from the day holding `from` through the day holding `to`
/// (absent: today; and the 30 days through `to`).
fn day_range(
    from: Option<(i64, i32)>,
    to: Option<(i64, i32)>,
    now: Time,
) -> Result<(i64, i64), ValidationError> {
    let to = time_field("to", to)?.map_or(day_of(now), day_of);
    let from = time_field("from", from)?.map_or(to - (DEFAULT_USAGE_DAYS - 1), day_of);
    if from > to {
        return Err(ValidationError::new("from", "after to"));
    }
    if to - from + 1 > MAX_USAGE_DAYS {
        return Err(ValidationError::new(
            "from",
            format!("a report covers at most {MAX_USAGE_DAYS} days"),
        ));
    }
    Ok((from, to))
}

/// Midnight UTC of `day`.
pub fn day_start(day: i64) -> Time {
    Time::from_micros(day.saturating_mul(DAY_MICROS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_covers_whole_days_thirty_by_default_at_most_a_year() {
        let now = Time::from_micros(20_000 * DAY_MICROS + 5);
        assert_eq!(day_range(None, None, now), Ok((19_971, 20_000)));
        let at = |day: i64, s: i64| Some((day * 86_400 + s, 0));
        assert_eq!(day_range(at(10, 5), at(12, 86_399), now), Ok((10, 12)));
        assert_eq!(
            day_range(at(13, 0), at(12, 0), now).unwrap_err().field,
            "from"
        );
        assert!(day_range(at(0, 0), at(365, 0), now).is_ok());
        assert!(day_range(at(0, 0), at(366, 0), now).is_err());
        assert!(day_range(Some((0, -1)), None, now).is_err());
        assert_eq!(day_start(2), Time::from_micros(2 * DAY_MICROS));
    }
}
