//! The secrets' use (`store/activity.rs`) in the tree: a row per secret and per day bucket,
//! each with the last audit entry it counts.
//!
//! A group's counts go into the tree with its records. A group of `Get`s is durable through
//! the trail alone (its tree writes are not flushed), so a crash can lose counts the trail
//! holds: `open` counts again the entries after the position the tree reflects, and a row
//! that already counts an entry (`through`) does not count it twice. A store made before
//! the counts existed has them counted from its whole trail at its first open.

use crate::model::{AuditRecord, SecretId};
use crate::store::StoreError;
use crate::store::activity::{Activity, Counted, DayQuery, DayRow, DayValue, SecretActivity};
use crate::store::auditlog::AuditLog;
use crate::store::codec;

use super::{Pending, batch_of, decode_frame, engine};

/// The stored row under `key`, as the group's staged changes leave it (else as stored).
fn stored<T: serde::de::DeserializeOwned + Default>(
    tree: &sled::Tree,
    pending: &Pending,
    key: &[u8],
) -> Result<Counted<T>, StoreError> {
    let bytes = match pending.get(key) {
        Some(staged) => staged.clone(),
        None => tree.get(key).map_err(engine)?.map(|v| v.to_vec()),
    };
    match bytes {
        Some(bytes) => codec::decode(key, &bytes),
        None => Ok(Counted::default()),
    }
}

/// Stages what `activity` adds to the rows, skipping a row that already counts the last
/// entry that adds to it (counted before a crash).
pub(super) fn stage_activity(
    tree: &sled::Tree,
    activity: &Activity,
    pending: &mut Pending,
) -> Result<(), StoreError> {
    for (id, (added, through)) in &activity.secrets {
        let key = codec::activity_key(*id);
        let mut row: Counted<SecretActivity> = stored(tree, pending, &key)?;
        if row.through < *through {
            row.value.add(added);
            row.through = *through;
            pending.insert(key, Some(codec::encode(&row)?));
        }
    }
    for (day, (name, added, through)) in &activity.days {
        let key = codec::activity_day_key(day);
        let mut row: Counted<Option<DayValue>> = stored(tree, pending, &key)?;
        if row.through < *through {
            let value = row
                .value
                .get_or_insert_with(|| (name.clone(), Default::default()));
            value.1.add(*added);
            row.through = *through;
            pending.insert(key, Some(codec::encode(&row)?));
        }
    }
    Ok(())
}

/// Stages the counts of one entry read back from the trail (recovery).
pub(super) fn stage_entry(
    tree: &sled::Tree,
    record: &AuditRecord,
    pending: &mut Pending,
) -> Result<(), StoreError> {
    stage_activity(tree, &Activity::of([record]), pending)
}

/// For a store whose rows do not count its trail yet (made before they existed): counts
/// every entry through `applied` (the position the tree reflects; recovery counts those
/// after), in one flushed batch with the mark that they are counted.
pub(super) fn count_trail(
    db: &sled::Db,
    tree: &sled::Tree,
    log: &AuditLog,
    applied: u64,
) -> Result<(), StoreError> {
    if tree
        .contains_key(codec::ACTIVITY_COUNTED_META)
        .map_err(engine)?
    {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut activity = Activity::default();
    let mut from = 0;
    let mut counted = 0u64;
    'frames: loop {
        let frames = log.read(from, 4096, true)?;
        let Some(end) = frames.last().map(|f| f.position) else {
            break;
        };
        for frame in &frames {
            if frame.position > applied {
                break 'frames;
            }
            activity.count(&decode_frame(frame)?);
            counted += 1;
        }
        from = end + 1;
    }
    let mut pending = Pending::new();
    stage_activity(tree, &activity, &mut pending)?;
    pending.insert(codec::ACTIVITY_COUNTED_META.to_vec(), Some(Vec::new()));
    tree.apply_batch(batch_of(pending)).map_err(engine)?;
    db.flush().map_err(engine)?;
    if counted > 0 {
        tracing::info!(
            entries = counted,
            ms = started.elapsed().as_millis() as u64,
            "counted the secrets' use from the audit trail"
        );
    }
    Ok(())
}

/// The use of each of `ids`, in their order.
pub(super) fn read(tree: &sled::Tree, ids: &[SecretId]) -> Result<Vec<SecretActivity>, StoreError> {
    ids.iter()
        .map(|id| {
            let key = codec::activity_key(*id);
            match tree.get(&key).map_err(engine)? {
                Some(bytes) => {
                    codec::decode::<Counted<SecretActivity>>(&key, &bytes).map(|c| c.value)
                }
                None => Ok(SecretActivity::default()),
            }
        })
        .collect()
}

/// The day buckets `query` names (a walk of the tenant's days in its range).
pub(super) fn days(tree: &sled::Tree, query: &DayQuery) -> Result<Vec<DayRow>, StoreError> {
    let start = codec::activity_day_prefix(&query.tenant, Some(query.from));
    // Days are far from i64::MAX (the vault bounds a report's range).
    let end = codec::activity_day_prefix(&query.tenant, Some(query.to.saturating_add(1)));
    let mut rows = Vec::new();
    for entry in tree.range(start..end) {
        let (key, value) = entry.map_err(engine)?;
        let day = codec::activity_day_of_key(&key).ok_or_else(|| StoreError::Corrupt {
            key: codec::describe_key(&key),
            reason: "not a day bucket's key".into(),
        })?;
        let row: Counted<Option<DayValue>> = codec::decode(&key, &value)?;
        let Some((name, counts)) = row.value else {
            continue;
        };
        let row = DayRow {
            key: day,
            name,
            counts,
        };
        if query.matches(&row) {
            rows.push(row);
            if rows.len() > query.limit {
                break;
            }
        }
    }
    Ok(rows)
}
