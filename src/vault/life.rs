//! A secret's lifecycle settings (who may read it, when it expires, when its rotation is due):
//! checking them as a request gives them, and UpdateSecret, which changes them and the rest
//! of a secret's metadata.

use std::time::Duration;

use crate::auth::Operation;
use crate::model::{
    Action, AuditDraft, Labels, Lifecycle, PrincipalId, Provider, SecretRecord, Time,
    ValidationError,
};

use super::trail::time_field;
use super::{
    Attempts, Caller, Described, LifeInput, UpdateInput, Vault, VaultError, authorize_secret,
};
use crate::store::{Guard, Transaction, Write};

/// Most principals in `allowed_readers`.
pub const MAX_ALLOWED_READERS: usize = 32;
/// Shortest `rotate_after`.
const MIN_ROTATE_AFTER: Duration = Duration::from_secs(1);
/// Longest `rotate_after` (3650 days).
const MAX_ROTATE_AFTER: Duration = Duration::from_secs(3650 * 24 * 3600);

/// The fields UpdateSecret can change, as `update_mask` names them.
const UPDATABLE: [&str; 5] = [
    "labels",
    "provider",
    "allowed_readers",
    "expires_at",
    "rotate_after",
];

impl Vault {
    /// The principals a request names as a secret's allowed readers: configured principals,
    /// at most [`MAX_ALLOWED_READERS`], sorted and distinct.
    fn allowed_readers(&self, ids: Vec<String>) -> Result<Vec<PrincipalId>, ValidationError> {
        const FIELD: &str = "allowed_readers";
        if ids.len() > MAX_ALLOWED_READERS {
            return Err(ValidationError::new(
                FIELD,
                format!("at most {MAX_ALLOWED_READERS} principals"),
            ));
        }
        let mut readers = Vec::with_capacity(ids.len());
        for id in ids {
            let id = PrincipalId::parse_field(FIELD, id)?;
            if self.principals.get(&id).is_none() {
                return Err(ValidationError::new(FIELD, "no such principal"));
            }
            readers.push(id);
        }
        readers.sort();
        readers.dedup();
        Ok(readers)
    }

    /// The settings of `life` that `fields` names, checked at `now`.
    fn life_change(
        &self,
        life: LifeInput,
        fields: &[&str],
        now: Time,
    ) -> Result<LifeChange, VaultError> {
        let named = |f: &str| fields.contains(&f);
        let mut change = LifeChange::default();
        if named("allowed_readers") {
            change.allowed_readers = Some(self.allowed_readers(life.allowed_readers)?);
        }
        if named("expires_at") {
            let expires_at = time_field("expires_at", life.expires_at)?;
            if expires_at.is_some_and(|t| t <= now) {
                return Err(ValidationError::new("expires_at", "must be in the future").into());
            }
            change.expires_at = Some(expires_at);
        }
        if named("rotate_after") {
            change.rotate_after_us = Some(rotate_after(life.rotate_after)?);
        }
        Ok(change)
    }

    /// The lifecycle of a secret a Store makes at `now`.
    pub(super) fn new_life(&self, life: LifeInput, now: Time) -> Result<Lifecycle, VaultError> {
        let mut new = Lifecycle {
            version_created_at: Some(now),
            ..Lifecycle::default()
        };
        self.life_change(life, &UPDATABLE, now)?.apply(&mut new);
        Ok(new)
    }

    /// Changes a secret's metadata: the fields `update_mask` names.
    pub async fn update_secret(
        &self,
        caller: &Caller,
        input: UpdateInput,
    ) -> Result<Described, VaultError> {
        let updated = operation!(self, caller, Action::UpdateSecret, |audit| {
            self.try_update(caller, input, &mut audit).await
        })?;
        Ok(self.after_change(updated).await)
    }

    async fn try_update(
        &self,
        caller: &Caller,
        input: UpdateInput,
        audit: &mut AuditDraft,
    ) -> Result<SecretRecord, VaultError> {
        let UpdateInput {
            tenant,
            name,
            labels,
            provider,
            life,
            update_mask,
        } = input;
        let (_, tenant, name) =
            authorize_secret(caller, audit, Operation::UpdateSecret, tenant, name)?;
        let fields = update_fields(&update_mask)?;
        let labels = match fields.contains(&"labels") {
            true => Some(Labels::from_request(labels)?),
            false => None,
        };
        let provider = match fields.contains(&"provider") {
            true => Some(Provider::from_request(provider)?),
            false => None,
        };
        let now = Time::now();
        let change = self.life_change(life, &fields, now)?;
        audit.reason = format!("changed: {}", fields.join(", "));
        let mut attempts = Attempts::default();
        loop {
            attempts.next()?;
            let read = self.secret_named(&tenant, &name).await?;
            audit.secret(&read);
            if read.state != crate::model::SecretState::Active {
                return Err(VaultError::SecretRevoked);
            }
            let mut next = read.clone();
            if let Some(labels) = &labels {
                next.labels = labels.clone();
            }
            if let Some(provider) = &provider {
                next.provider = provider.clone();
            }
            next.life.version_created_at = Some(read.version_made_at());
            change.apply(&mut next.life);
            next.updated_at = now.max(read.updated_at);
            let tx = Transaction {
                charges: Vec::new(),
                guards: vec![Guard::secret(&tenant, &name, Some(&read))],
                writes: vec![Write::PutSecret(next.clone())],
                audit: Some(audit.clone()),
            };
            if let Some(done) = self.commit_or_retry(tx, next).await? {
                return Ok(done);
            }
        }
    }
}

/// The lifecycle settings a request changes: `Some` for each one it names.
#[derive(Default)]
struct LifeChange {
    allowed_readers: Option<Vec<PrincipalId>>,
    expires_at: Option<Option<Time>>,
    rotate_after_us: Option<Option<u64>>,
}

impl LifeChange {
    /// Applies the change to `life`.
    fn apply(&self, life: &mut Lifecycle) {
        if let Some(readers) = &self.allowed_readers {
            life.allowed_readers = readers.clone();
        }
        if let Some(expires_at) = self.expires_at {
            life.expires_at = expires_at;
        }
        if let Some(rotate_after) = self.rotate_after_us {
            life.rotate_after_us = rotate_after;
        }
    }
}

/// The fields an `update_mask` names: at least one, each one UpdateSecret can change.
fn update_fields(mask: &[String]) -> Result<Vec<&'static str>, ValidationError> {
    const FIELD: &str = "update_mask";
    if mask.is_empty() {
        return Err(ValidationError::new(
            FIELD,
            format!("name the fields to change: {}", UPDATABLE.join(", ")),
        ));
    }
    let mut fields = Vec::new();
    for path in mask {
        let field = UPDATABLE
            .iter()
            .find(|f| **f == path.as_str())
            .ok_or_else(|| {
                ValidationError::new(
                    FIELD,
                    format!("unknown field; one of {}", UPDATABLE.join(", ")),
                )
            })?;
        if !fields.contains(field) {
            fields.push(*field);
        }
    }
    Ok(fields)
}

/// A request's `rotate_after`, in microseconds: absent, or 1 s to 3650 days.
fn rotate_after(given: Option<(i64, i32)>) -> Result<Option<u64>, ValidationError> {
    let Some(d) = duration_field("rotate_after", given)? else {
        return Ok(None);
    };
    if !(MIN_ROTATE_AFTER..=MAX_ROTATE_AFTER).contains(&d) {
        return Err(ValidationError::new(
            "rotate_after",
            "must be 1s to 3650 days",
        ));
    }
    Ok(Some(d.as_micros() as u64))
}

/// A request's duration `field` (seconds and nanoseconds): absent, or not negative.
fn duration_field(
    field: &'static str,
    given: Option<(i64, i32)>,
) -> Result<Option<Duration>, ValidationError> {
    let Some((seconds, nanos)) = given else {
        return Ok(None);
    };
    let invalid = || ValidationError::new(field, "must not be negative");
    let seconds = u64::try_from(seconds).map_err(|_| invalid())?;
    let nanos = u32::try_from(nanos).map_err(|_| invalid())?;
    if nanos >= 1_000_000_000 {
        return Err(ValidationError::new(field, "not a valid duration"));
    }
    Ok(Some(Duration::new(seconds, nanos)))
}

/// A request's optional duration `field` of at most `max`: absent or zero is `None`.
pub(super) fn window_field(
    field: &'static str,
    given: Option<(i64, i32)>,
    max: Duration,
    max_text: &str,
) -> Result<Option<Duration>, ValidationError> {
    match duration_field(field, given)? {
        Some(d) if d > max => Err(ValidationError::new(field, format!("at most {max_text}"))),
        Some(d) if !d.is_zero() => Ok(Some(d)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_name_known_fields_once() {
        let mask = |m: &[&str]| update_fields(&m.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(mask(&["labels", "labels"]).unwrap(), vec!["labels"]);
        assert!(mask(&[]).is_err());
        assert!(mask(&["value"]).is_err());
        assert!(mask(&["state"]).is_err());
    }

    #[test]
    fn rotation_intervals_are_bounded() {
        assert_eq!(rotate_after(None), Ok(None));
        assert_eq!(rotate_after(Some((60, 0))), Ok(Some(60_000_000)));
        for bad in [
            (0, 0),
            (0, 999_999),
            (-1, 0),
            (3650 * 86_400 + 1, 0),
            (1, -1),
        ] {
            assert!(rotate_after(Some(bad)).is_err(), "{bad:?}");
        }
    }
}
