//! List's filters: which of a tenant's secrets a List answers with.

use crate::model::{Labels, Phase, Provider, SecretRecord, Time, ValidationError, keyshape};

use super::ListInput;
use super::trail::time_field;

/// Secret records one List call reads at most (a filtered page stops there, with a next
/// page token).
pub const MAX_LIST_SCAN: usize = 10_000;

/// What a List selects, checked.
pub struct ListFilter {
    provider: Option<Provider>,
    labels: Vec<(String, String)>,
    phases: Vec<Phase>,
    expiring_before: Option<Time>,
    rotation_due: bool,
    /// The time the phases are judged at.
    now: Time,
}

impl ListFilter {
    /// The filters of `input`.
    pub fn parse(input: &ListInput) -> Result<Self, ValidationError> {
        let provider = match input.provider.as_str() {
            "" => None,
            p => Some(Provider::from_request(p)?),
        };
        let phases = input
            .states
            .iter()
            .map(|s| s.ok_or_else(|| ValidationError::new("states", "not a secret state")))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            provider,
            labels: label_selector(&input.label_selector)?,
            phases,
            expiring_before: time_field("expiring_before", input.expiring_before)?,
            rotation_due: input.rotation_due,
            now: Time::now(),
        })
    }

    /// Whether `s` is selected.
    pub fn matches(&self, s: &SecretRecord) -> bool {
        self.provider.as_ref().is_none_or(|p| *p == s.provider)
            && self
                .labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            && (self.phases.is_empty() || self.phases.contains(&s.phase(self.now)))
            && self
                .expiring_before
                .is_none_or(|before| s.life.expires_at.is_some_and(|t| t < before))
            && (!self.rotation_due || s.rotation_due(self.now))
    }
}

/// `k=v,k2=v2` as pairs; each must be a valid label.
fn label_selector(text: &str) -> Result<Vec<(String, String)>, ValidationError> {
    const FIELD: &str = "label_selector";
    keyshape::refuse_key(FIELD, text)?;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let pairs = text
        .split(',')
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| ValidationError::new(FIELD, "k=v pairs separated by commas"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The same rules as labels themselves.
    Labels::parse(pairs.iter().cloned()).map_err(|e| ValidationError::new(FIELD, e.problem))?;
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_pairs_of_valid_labels() {
        assert_eq!(label_selector("").unwrap(), vec![]);
        assert_eq!(
            label_selector("user=42,tier=pro").unwrap(),
            vec![
                ("user".to_string(), "42".to_string()),
                ("tier".to_string(), "pro".to_string())
            ]
        );
        assert_eq!(label_selector("empty=").unwrap().len(), 1);
        for bad in ["user", "=v", "a=b,,c=d", "bad key=v"] {
            assert!(label_selector(bad).is_err(), "{bad}");
        }
    }
}
