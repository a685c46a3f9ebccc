//! The secrets' use (`store/activity.rs`) on sled: a row per secret and per day bucket in the
//! tree, each with the last audit entry it counts, and the rows a group changes kept in
//! memory until a checkpoint writes them.
//!
//! A group of `Get`s is durable through the trail alone, so the counts need no write of
//! their own: the writer adds each group's counts to the rows it keeps in memory
//! ([`Unwritten`]; readers see them there), and writes them to the tree with a group that
//! writes the tree anyway (one that is flushed), every [`CHECKPOINT_ENTRIES`] entries counted
//! or [`CHECKPOINT_ROWS`] rows changed, and at close, with the last entry they count
//! (`mactivity-through`). At open, the entries after that mark are counted again from the
//! trail (after recovery cut what was never answered); a row that already counts an entry
//! (written by a checkpoint whose mark a crash lost) does not count it twice. A store made
//! before the counts were kept has no mark: its whole trail is counted at its first open.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::model::SecretId;
use crate::store::StoreError;
use crate::store::activity::{
    Activity, Counted, DayKey, DayQuery, DayRow, DayValue, SecretActivity,
};
use crate::store::auditlog::AuditLog;
use crate::store::codec;

use super::recovery::stored_mark;
use super::{Pending, batch_of, decode_frame, engine};

/// Entries counted since the last checkpoint that make the writer write the rows.
const CHECKPOINT_ENTRIES: u64 = 4096;
/// Rows changed since the last checkpoint that make the writer write them.
const CHECKPOINT_ROWS: usize = 1024;

/// A day bucket's row.
type DayCounted = Counted<Option<DayValue>>;

/// The rows changed since the last checkpoint, as they are now.
#[derive(Default)]
pub(super) struct Unwritten {
    secrets: HashMap<SecretId, Counted<SecretActivity>>,
    days: BTreeMap<DayKey, DayCounted>,
    /// Entries counted since the checkpoint.
    entries: u64,
}

/// What the writer and the readers share.
pub(super) type SharedUnwritten = Arc<Mutex<Unwritten>>;

/// The rows a group changes, as it leaves them (applied to [`Unwritten`] once it is written).
#[derive(Default)]
pub(super) struct Counting {
    secrets: Vec<(SecretId, Counted<SecretActivity>)>,
    days: Vec<(DayKey, DayCounted)>,
    entries: u64,
}

/// A stored row (absent: nothing counted).
fn stored<T: serde::de::DeserializeOwned + Default>(
    tree: &sled::Tree,
    key: &[u8],
) -> Result<Counted<T>, StoreError> {
    match tree.get(key).map_err(engine)? {
        Some(bytes) => codec::decode(key, &bytes),
        None => Ok(Counted::default()),
    }
}

impl Unwritten {
    /// The rows `activity` changes, as they will be: from the rows kept here, else stored.
    pub(super) fn count(
        &self,
        tree: &sled::Tree,
        activity: &Activity,
    ) -> Result<Counting, StoreError> {
        let mut counting = Counting {
            entries: self.entries,
            ..Counting::default()
        };
        for (id, (added, through)) in &activity.secrets {
            let mut row = match self.secrets.get(id) {
                Some(row) => row.clone(),
                None => stored(tree, &codec::activity_key(*id))?,
            };
            if row.add_through(*through, |value| value.add(added)) {
                counting.secrets.push((*id, row));
            }
        }
        for (key, (name, added, through)) in &activity.days {
            let mut row = match self.days.get(key) {
                Some(row) => row.clone(),
                None => stored(tree, &codec::activity_day_key(key))?,
            };
            let changed = row.add_through(*through, |value| {
                value
                    .get_or_insert_with(|| (name.clone(), Default::default()))
                    .1
                    .add(*added)
            });
            if changed {
                counting.days.push((key.clone(), row));
            }
        }
        counting.entries += activity.entries;
        Ok(counting)
    }

    /// True if the rows should be written with the group `counting` comes with.
    pub(super) fn due(&self, counting: &Counting) -> bool {
        counting.entries >= CHECKPOINT_ENTRIES
            || self.secrets.len() + self.days.len() + counting.secrets.len() + counting.days.len()
                >= CHECKPOINT_ROWS
    }

    /// Stages every row kept here, with `counting`'s over them, and the mark that the tree
    /// counts every entry through `through` (the group's last: a group's entries are all
    /// counted once it is written).
    pub(super) fn stage_checkpoint(
        &self,
        counting: &Counting,
        through: u64,
        pending: &mut Pending,
    ) -> Result<(), StoreError> {
        let mut secrets: HashMap<&SecretId, &Counted<SecretActivity>> =
            self.secrets.iter().collect();
        secrets.extend(counting.secrets.iter().map(|(id, row)| (id, row)));
        let mut days: BTreeMap<&DayKey, &DayCounted> = self.days.iter().collect();
        days.extend(counting.days.iter().map(|(key, row)| (key, row)));
        for (id, row) in secrets {
            pending.insert(codec::activity_key(*id), Some(codec::encode(row)?));
        }
        for (key, row) in days {
            pending.insert(codec::activity_day_key(key), Some(codec::encode(row)?));
        }
        pending.insert(
            codec::ACTIVITY_THROUGH_META.to_vec(),
            Some(through.to_be_bytes().to_vec()),
        );
        Ok(())
    }

    /// Keeps what a written group counted (`checkpointed`: its rows went to the tree with
    /// every row kept here, which are dropped).
    pub(super) fn apply(&mut self, counting: Counting, checkpointed: bool) {
        if checkpointed {
            *self = Unwritten::default();
            return;
        }
        self.secrets.extend(counting.secrets);
        self.days.extend(counting.days);
        self.entries = counting.entries;
    }

    /// True if nothing is kept.
    pub(super) fn is_empty(&self) -> bool {
        self.secrets.is_empty() && self.days.is_empty()
    }
}

/// The rows kept in memory.
pub(super) fn unwritten(shared: &SharedUnwritten) -> std::sync::MutexGuard<'_, Unwritten> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// At open, after recovery: counts the entries after the mark (all of them for a store
/// without one) into the tree, in one flushed batch with the new mark.
pub(super) fn catch_up(db: &sled::Db, tree: &sled::Tree, log: &AuditLog) -> Result<(), StoreError> {
    // The entry through which the rows count every entry (none: a store made before).
    let marked = stored_mark(tree, codec::ACTIVITY_THROUGH_META)?;
    let started = std::time::Instant::now();
    let mut from = marked.map_or(0, |through| through + 1);
    let mut rows = Unwritten::default();
    let mut last = marked.unwrap_or(0);
    loop {
        let frames = log.read(from, 4096, true)?;
        let Some(end) = frames.last().map(|f| f.position) else {
            break;
        };
        for frame in &frames {
            let record = decode_frame(frame)?;
            let counting = rows.count(tree, &Activity::of([&record]))?;
            rows.apply(counting, false);
            last = frame.position;
        }
        from = end + 1;
    }
    if marked == Some(last) {
        return Ok(());
    }
    let mut pending = Pending::new();
    let counted = rows.entries;
    rows.stage_checkpoint(&Counting::default(), last, &mut pending)?;
    tree.apply_batch(batch_of(&pending)).map_err(engine)?;
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

/// The use of each of `ids`, in their order: as kept in memory, else as stored.
pub(super) fn read(
    tree: &sled::Tree,
    unwritten: &SharedUnwritten,
    ids: &[SecretId],
) -> Result<Vec<SecretActivity>, StoreError> {
    let kept = self::unwritten(unwritten);
    ids.iter()
        .map(|id| match kept.secrets.get(id) {
            Some(row) => Ok(row.value.clone()),
            None => stored::<SecretActivity>(tree, &codec::activity_key(*id)).map(|c| c.value),
        })
        .collect()
}

/// The day buckets `query` names: a walk of the tenant's days in its range, with the rows
/// kept in memory over the stored ones.
pub(super) fn days(
    tree: &sled::Tree,
    unwritten: &SharedUnwritten,
    query: &DayQuery,
) -> Result<Vec<DayRow>, StoreError> {
    let start = codec::activity_day_prefix(&query.tenant, Some(query.from));
    // Days are far from i64::MAX (the vault bounds a report's range).
    let end = codec::activity_day_prefix(&query.tenant, Some(query.to.saturating_add(1)));
    let mut rows: BTreeMap<DayKey, DayRow> = BTreeMap::new();
    let keep = |key: DayKey, row: DayCounted, rows: &mut BTreeMap<DayKey, DayRow>| {
        if let Some((name, counts)) = row.value {
            let row = DayRow {
                key: key.clone(),
                name,
                counts,
            };
            if query.matches(&row) {
                rows.insert(key, row);
            }
        }
    };
    for entry in tree.range(start..end) {
        let (key, value) = entry.map_err(engine)?;
        let day = codec::activity_day_of_key(&key).ok_or_else(|| StoreError::Corrupt {
            key: codec::describe_key(&key),
            reason: "not a day bucket's key".into(),
        })?;
        keep(day, codec::decode(&key, &value)?, &mut rows);
        if rows.len() > query.limit {
            break;
        }
    }
    let kept = self::unwritten(unwritten);
    for (key, row) in &kept.days {
        keep(key.clone(), row.clone(), &mut rows);
    }
    Ok(rows
        .into_values()
        .take(query.limit.saturating_add(1))
        .collect())
}
