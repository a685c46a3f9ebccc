use super::*;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;

fn payload(position: u64) -> Vec<u8> {
    format!("entry {position} {}", "x".repeat((position % 50) as usize)).into_bytes()
}

/// Even positions carry a redo part.
fn redo(position: u64) -> Vec<u8> {
    if position.is_multiple_of(2) {
        position.to_be_bytes().to_vec()
    } else {
        Vec::new()
    }
}

fn frame<'a>(position: u64, payload: &'a [u8], redo: &'a [u8]) -> NewFrame<'a> {
    NewFrame {
        position,
        flags: (position % 2) as u8,
        payload,
        redo,
        keys: None,
    }
}

/// Index keys from a test payload: its position modulo 3 and modulo 7.
fn keys_of(position: u64) -> Vec<Vec<u8>> {
    vec![
        format!("m3-{}", position % 3).into_bytes(),
        format!("m7-{}", position % 7).into_bytes(),
    ]
}

fn test_indexer() -> Indexer {
    Arc::new(|payload: &[u8]| {
        let text = String::from_utf8_lossy(payload);
        match text.split(' ').nth(1).and_then(|p| p.parse::<u64>().ok()) {
            Some(position) => keys_of(position),
            None => Vec::new(),
        }
    })
}

/// Every index key of the test payloads, looked up from `from`, against the entries read.
fn check_lookups(log: &AuditLog, from: u64) {
    let read = positions(log, from);
    for key in (0..3)
        .map(|i| format!("m3-{i}"))
        .chain((0..7).map(|i| format!("m7-{i}")))
    {
        let expected: Vec<u64> = read
            .iter()
            .copied()
            .filter(|&p| keys_of(p).contains(&key.clone().into_bytes()))
            .collect();
        assert_eq!(
            log.lookup(key.as_bytes(), from, usize::MAX).unwrap(),
            expected,
            "{key} from {from}"
        );
        let two = log.lookup(key.as_bytes(), from, 2).unwrap();
        assert_eq!(two, expected[..expected.len().min(2)], "{key} from {from}");
    }
}

fn append(log: &AuditLog, positions: std::ops::Range<u64>) {
    let payloads: Vec<(u64, Vec<u8>, Vec<u8>)> =
        positions.map(|p| (p, payload(p), redo(p))).collect();
    let frames: Vec<NewFrame<'_>> = payloads.iter().map(|(p, b, r)| frame(*p, b, r)).collect();
    log.append(&frames).unwrap();
    log.sync().unwrap();
    log.publish(payloads.last().unwrap().0);
}

/// Appends `positions` in groups of `group` (a segment is full only between appends, so
/// groups let small segments fill and seal).
fn append_in_groups(log: &AuditLog, positions: std::ops::Range<u64>, group: u64) {
    let end = positions.end;
    for first in positions.step_by(group as usize) {
        append(log, first..(first + group).min(end));
    }
}

fn positions(log: &AuditLog, from: u64) -> Vec<u64> {
    log.read(from, usize::MAX, false)
        .unwrap()
        .into_iter()
        .map(|f| {
            assert_eq!(f.payload, payload(f.position));
            assert_eq!(f.redo, redo(f.position));
            assert_eq!(f.flags, (f.position % 2) as u8);
            f.position
        })
        .collect()
}

#[test]
fn entries_read_back_across_segments_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 1000, test_indexer()).unwrap();
    assert_eq!(log.next_position().unwrap(), 1);
    assert_eq!(log.head().unwrap(), None);
    for chunk in 0..20 {
        append(&log, 1 + chunk * 10..11 + chunk * 10);
    }
    let segments = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("log".as_ref()))
        .count();
    assert!(segments > 3, "{segments} segments");
    assert_eq!(positions(&log, 0), (1..=200).collect::<Vec<_>>());
    assert_eq!(positions(&log, 137), (137..=200).collect::<Vec<_>>());
    for from in [0, 1, 55, 137, 200, 201] {
        check_lookups(&log, from);
    }
    assert_eq!(log.read(50, 3, false).unwrap().len(), 3);
    // Unpublished entries are the writer's only.
    log.append(&[frame(201, &payload(201), &[])]).unwrap();
    assert_eq!(log.head().unwrap().unwrap().position, 200);
    assert_eq!(log.read(201, 1, true).unwrap()[0].position, 201);
    drop(log);
    let log = AuditLog::open(dir.path(), 1000, test_indexer()).unwrap();
    assert_eq!(log.next_position().unwrap(), 202);
    check_lookups(&log, 0);
    assert_eq!(positions(&log, 190), (190..=201).collect::<Vec<_>>());
    append(&log, 202..205);
    assert_eq!(log.head().unwrap().unwrap().position, 204);
}

/// A closed trail of entries 1 to 5 in one segment, and that segment's path.
fn five_entries() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
    append(&log, 1..6);
    drop(log);
    let path = segment_path(dir.path(), 1, "log");
    (dir, path)
}

#[test]
fn a_torn_tail_is_cut_off_at_open() {
    let (dir, path) = five_entries();
    let full = std::fs::metadata(&path).unwrap().len();
    // Half a frame, as a kill in the middle of a write leaves it.
    let mut torn = Vec::new();
    let (body, extra) = (payload(6), redo(6));
    encode_frame(&mut torn, frame(6, &body, &extra));
    let file = open_file(&path, false).unwrap();
    file.write_all_at(&torn[..torn.len() / 2], full).unwrap();
    let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
    assert_eq!(positions(&log, 0), (1..6).collect::<Vec<_>>());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), full);
    append(&log, 6..8);
    assert_eq!(positions(&log, 0), (1..8).collect::<Vec<_>>());
    // A flipped byte in the last frame: it is not a frame.
    drop(log);
    let len = std::fs::metadata(&path).unwrap().len();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, len - 2).unwrap();
    file.write_all_at(&[byte[0] ^ 1], len - 2).unwrap();
    let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
    assert_eq!(positions(&log, 0), (1..7).collect::<Vec<_>>());
}

/// The files of the segments in `dir`, in order.
pub(crate) fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some("log".as_ref()))
        .collect();
    logs.sort();
    logs
}

fn flip(path: &Path, at: u64) {
    let file = open_file(path, false).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
}

fn damage_of(result: Result<AuditLog, StoreError>) -> TrailDamage {
    match result {
        Err(StoreError::TrailDamaged(damage)) => *damage,
        Err(e) => panic!("expected damage, got {e}"),
        Ok(_) => panic!("expected damage, the trail opened"),
    }
}

#[test]
fn a_bad_frame_with_valid_frames_after_it_is_damage_not_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
    append_in_groups(&log, 1..31, 3);
    drop(log);
    let path = segment_path(dir.path(), 1, "log");
    let len = std::fs::metadata(&path).unwrap().len();
    flip(&path, len / 3);
    let damage = damage_of(AuditLog::open(dir.path(), 1 << 20, test_indexer()));
    assert!(
        damage
            .location
            .contains("00000000000000000001.log at offset"),
        "{damage}"
    );
    assert!(damage.reason.contains("a valid entry follows"), "{damage}");
    assert!((5..15).contains(&damage.first_lost), "{damage}");
    // Nothing was cut: the evidence stays for the operator.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    assert_eq!(
        AuditLog::find_damage(dir.path(), 1, 0).unwrap(),
        Some(damage.clone())
    );

    // A repair keeps the entries before the damage and copies the files aside.
    let quarantine = dir.path().join("q");
    let copied = AuditLog::cut_before(dir.path(), damage.first_lost, &quarantine).unwrap();
    assert_eq!(copied, vec![quarantine.join("00000000000000000001.log")]);
    assert_eq!(std::fs::metadata(&copied[0]).unwrap().len(), len);
    let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
    assert_eq!(
        positions(&log, 0),
        (1..damage.first_lost).collect::<Vec<_>>()
    );
    assert_eq!(AuditLog::find_damage(dir.path(), 1, 0).unwrap(), None);
}

/// A valid frame far ahead of the next position would make the scan hold an offset for every
/// position skipped (found by fuzzing `audit_files`: one frame at 2^57 ran out of memory).
#[test]
fn a_frame_far_ahead_of_the_next_position_is_damage_not_a_gap() {
    let (dir, path) = five_entries();
    let len = std::fs::metadata(&path).unwrap().len();
    let far = |position: u64| {
        let mut bytes = Vec::new();
        let (payload, redo) = (payload(position), redo(position));
        encode_frame(&mut bytes, frame(position, &payload, &redo));
        bytes
    };
    // A gap the tamper tests make (entries removed) still opens, padded.
    let file = open_file(&path, false).unwrap();
    file.write_all_at(&far(6 + MAX_MISSING), len).unwrap();
    let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
    assert_eq!(positions(&log, 0), vec![1, 2, 3, 4, 5, 6 + MAX_MISSING]);
    drop(log);
    for position in [7 + MAX_MISSING, 1 << 57, u64::MAX] {
        file.set_len(len).unwrap();
        file.write_all_at(&far(position), len).unwrap();
        let damage = damage_of(AuditLog::open(dir.path(), 1 << 20, test_indexer()));
        assert_eq!(damage.first_lost, 6, "{damage}");
        assert!(damage.reason.contains("entries missing"), "{damage}");
    }
}

#[test]
fn a_bad_last_frame_the_records_reflect_is_damage() {
    let (dir, path) = five_entries();
    let len = std::fs::metadata(&path).unwrap().len();
    flip(&path, len - 2);
    let damage = damage_of(AuditLog::open_acknowledged(
        dir.path(),
        1 << 20,
        test_indexer(),
        5,
    ));
    assert_eq!(damage.first_lost, 5, "{damage}");
    assert!(damage.reason.contains("acknowledged"), "{damage}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    // Not acknowledged: a torn write, cut.
    let log = AuditLog::open_acknowledged(dir.path(), 1 << 20, test_indexer(), 4).unwrap();
    assert_eq!(positions(&log, 0), (1..5).collect::<Vec<_>>());
}

#[test]
fn a_truncated_or_missing_sealed_segment_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    append_in_groups(&log, 1..80, 4);
    drop(log);
    let logs = segment_files(dir.path());
    assert!(logs.len() >= 4, "{logs:?}");
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
    }

    // Cut short by a few bytes (inside its last frame).
    let len = std::fs::metadata(&logs[1]).unwrap().len();
    open_file(&logs[1], false)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let damage = damage_of(AuditLog::open(dir.path(), 300, test_indexer()));
    assert!(
        damage.location.starts_with(&*logs[1].to_string_lossy()),
        "{damage}"
    );

    // A middle segment deleted.
    let dir = copy;
    let logs = segment_files(dir.path());
    std::fs::remove_file(&logs[2]).unwrap();
    let damage = damage_of(AuditLog::open(dir.path(), 300, test_indexer()));
    assert!(damage.reason.contains("are missing"), "{damage}");
    let second: u64 = logs[2]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    assert_eq!(damage.first_lost, second);
    assert_eq!(
        AuditLog::find_damage(dir.path(), 1, 0)
            .unwrap()
            .map(|d| d.first_lost),
        Some(second)
    );
    // The first segment gone: the trail starts late.
    std::fs::remove_file(&logs[0]).unwrap();
    let found = AuditLog::find_damage(dir.path(), 1, 0).unwrap().unwrap();
    assert_eq!(found.first_lost, 1, "{found}");
}

#[test]
fn damage_inside_a_sealed_segment_stops_appends_once_found() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    append_in_groups(&log, 1..60, 4);
    drop(log);
    let logs = segment_files(dir.path());
    let len = std::fs::metadata(&logs[1]).unwrap().len();
    flip(&logs[1], len / 2);
    // Open checks only the ends of sealed segments.
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    log.publish(59);
    assert_eq!(log.damage(), None);
    // A reader finds it...
    assert!(matches!(
        log.read(0, usize::MAX, false),
        Err(StoreError::Corrupt { .. })
    ));
    let found = log.damage().expect("marked damaged");
    assert!(
        found.location.starts_with(&*logs[1].to_string_lossy()),
        "{found}"
    );
    // ... and appends stop.
    let (p, r) = (payload(60), redo(60));
    assert!(matches!(
        log.append(&[frame(60, &p, &r)]),
        Err(StoreError::TrailDamaged(_))
    ));
    // So does the scrub, without a reader.
    drop(log);
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    let scrubbed = log.scrub(&AtomicBool::new(false)).unwrap();
    assert_eq!(scrubbed, Some(found));
    assert!(log.damage().is_some());
}

#[test]
fn a_damaged_offset_file_is_written_again_from_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    append_in_groups(&log, 1..60, 4);
    drop(log);
    let idx = segment_path(dir.path(), 1, "idx");
    // An offset in the middle: open does not see it, a reader does.
    flip(&idx, 8 * 3);
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    log.publish(59);
    assert_eq!(positions(&log, 0), (1..60).collect::<Vec<_>>());
    assert_eq!(log.damage(), None);
    // Its length: open sees it.
    drop(log);
    open_file(&idx, false).unwrap().set_len(8).unwrap();
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    log.publish(59);
    assert_eq!(positions(&log, 0), (1..60).collect::<Vec<_>>());
    assert_eq!(log.scrub(&AtomicBool::new(false)).unwrap(), None);
}

#[test]
fn a_segment_that_cannot_be_started_fails_the_append_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    append_in_groups(&log, 1..20, 4);
    let next = log.next_position().unwrap();
    let mut p = next;
    // Fill the active segment, then make its successor's file impossible to create.
    while log.tail.lock().unwrap().len < 300 {
        append(&log, p..p + 1);
        p += 1;
    }
    let blocker = segment_path(dir.path(), p, "log");
    std::fs::create_dir(&blocker).unwrap();
    let (body, extra) = (payload(p), redo(p));
    assert!(matches!(
        log.append(&[frame(p, &body, &extra)]),
        Err(StoreError::Transient(_))
    ));
    assert_eq!(log.next_position().unwrap(), p);
    std::fs::remove_dir(&blocker).unwrap();
    append(&log, p..p + 3);
    assert_eq!(positions(&log, 0), (1..p + 3).collect::<Vec<_>>());
    drop(log);
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    log.publish(p + 2);
    assert_eq!(positions(&log, 0), (1..p + 3).collect::<Vec<_>>());
}

#[test]
fn truncation_and_deletion_keep_the_rest_readable() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 500, test_indexer()).unwrap();
    append_in_groups(&log, 1..60, 5);
    log.truncate_after(45).unwrap();
    assert_eq!(log.next_position().unwrap(), 46);
    assert_eq!(positions(&log, 0), (1..46).collect::<Vec<_>>());
    check_lookups(&log, 0);
    append(&log, 46..50);
    log.delete_through(30).unwrap();
    log.set_start(31);
    assert_eq!(positions(&log, 0), (31..50).collect::<Vec<_>>());
    check_lookups(&log, 0);
    let first_kept = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".log").map(|f| f.parse::<u64>().unwrap())
        })
        .min()
        .unwrap();
    assert!(first_kept > 1 && first_kept <= 31, "{first_kept}");
    drop(log);
    let log = AuditLog::open(dir.path(), 500, test_indexer()).unwrap();
    log.set_start(31);
    assert_eq!(positions(&log, 0), (31..50).collect::<Vec<_>>());
    check_lookups(&log, 40);
}

#[test]
fn segments_seal_in_the_background_and_unsynced_frames_stay_for_the_next_sync() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    append_in_groups(&log, 1..60, 4);
    // Readable and indexed at once, whether or not the seals are done.
    assert_eq!(positions(&log, 0), (1..60).collect::<Vec<_>>());
    check_lookups(&log, 0);
    log.wait_for_seals();
    let segments: Vec<Arc<Segment>> = log.segments.read().unwrap().values().cloned().collect();
    assert!(segments.len() >= 3, "{}", segments.len());
    let (active, sealed) = segments.split_last().unwrap();
    for segment in sealed {
        assert!(matches!(
            *segment.offsets.read().unwrap(),
            Offsets::Sealed { .. }
        ));
        assert!(matches!(
            *segment.index.read().unwrap(),
            SegmentIndex::Sealed { .. }
        ));
        assert!(segment_path(dir.path(), segment.first, "idx").exists());
        assert!(segment_path(dir.path(), segment.first, "ndx").exists());
    }
    assert!(matches!(
        *active.offsets.read().unwrap(),
        Offsets::Active(_)
    ));
    check_lookups(&log, 0);

    // Frames appended without a sync before the segment fills: the segment is handed to
    // its seal, and the next sync still covers it.
    let mut next = 60;
    while log.segments.read().unwrap().len() == segments.len() {
        let (p, r) = (payload(next), redo(next));
        log.append(&[frame(next, &p, &r)]).unwrap();
        next += 1;
    }
    let unsynced: Vec<u64> = log
        .tail
        .lock()
        .unwrap()
        .unsynced
        .iter()
        .map(|s| s.first)
        .collect();
    assert_eq!(unsynced.len(), 2, "{unsynced:?}");
    assert!(unsynced.contains(&active.first), "{unsynced:?}");
    log.sync().unwrap();
    assert!(log.tail.lock().unwrap().unsynced.is_empty());
    log.publish(next - 1);
    assert_eq!(positions(&log, 0), (1..next).collect::<Vec<_>>());
    drop(log);
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    log.publish(next - 1);
    assert_eq!(positions(&log, 0), (1..next).collect::<Vec<_>>());
    check_lookups(&log, 0);
}

#[test]
fn missing_or_damaged_index_files_are_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    append_in_groups(&log, 1..80, 4);
    drop(log);
    let mut ndx: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some("ndx".as_ref()))
        .collect();
    ndx.sort();
    assert!(ndx.len() >= 3, "{ndx:?}");
    std::fs::remove_file(&ndx[0]).unwrap();
    let mut bytes = std::fs::read(&ndx[1]).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 0xff;
    std::fs::write(&ndx[1], &bytes).unwrap();
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    assert!(ndx[0].exists());
    check_lookups(&log, 0);
    check_lookups(&log, 33);
    // A block in the middle: open does not read it; the lookup that does rebuilds it.
    drop(log);
    let mut bytes = std::fs::read(&ndx[2]).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&ndx[2], &bytes).unwrap();
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    log.publish(79);
    check_lookups(&log, 0);
    assert_eq!(log.damage(), None);
}

#[test]
fn rewritten_and_removed_entries() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 400, test_indexer()).unwrap();
    // Sealed segments (3 and 5) and the active one (39).
    append_in_groups(&log, 1..40, 5);
    log.rewrite(3, None).unwrap();
    log.rewrite(39, None).unwrap();
    log.rewrite(5, Some(b"other")).unwrap();
    let read = log.read(0, usize::MAX, false).unwrap();
    let at: Vec<u64> = read.iter().map(|f| f.position).collect();
    assert!(!at.contains(&3) && !at.contains(&39) && at.contains(&4));
    assert_eq!(
        read.iter().find(|f| f.position == 5).unwrap().payload,
        b"other"
    );
    assert_eq!(log.head().unwrap().unwrap().position, 38);
    let lookup = |key: &str| log.lookup(key.as_bytes(), 0, usize::MAX).unwrap();
    assert!(!lookup("m3-0").contains(&3) && lookup("m3-0").contains(&6));
    assert!(!lookup("m3-2").contains(&5) && lookup("m3-2").contains(&8));
    assert!(!lookup("m7-4").contains(&39) && lookup("m7-4").contains(&32));
    drop(log);
    let log = AuditLog::open(dir.path(), 400, test_indexer()).unwrap();
    let again: Vec<u64> = log
        .read(0, usize::MAX, false)
        .unwrap()
        .iter()
        .map(|f| f.position)
        .collect();
    assert_eq!(again, at);
    assert_eq!(log.next_position().unwrap(), 39);
}

/// The length of `path`, and where its frames end.
fn length_and_frames_end(path: &Path) -> (u64, u64) {
    let file = open_file(path, false).unwrap();
    let len = file.metadata().unwrap().len();
    (len, frames::scan(&file, 0, None).valid)
}

#[test]
fn space_set_aside_reads_as_the_end_and_goes_when_a_segment_is_left_or_the_trail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), 1 << 20, test_indexer()).unwrap();
    append_in_groups(&log, 1..21, 4);
    let path = segment_path(dir.path(), 1, "log");
    let (len, end) = length_and_frames_end(&path);
    assert_eq!(
        len,
        4096 + (1 << 20),
        "a segment's worth set aside (less than SET_ASIDE), after the first group's page"
    );
    assert!(end > 0 && end < len, "{end}");
    // The scrub reads the zeros as the end, not as damage.
    assert_eq!(log.scrub(&AtomicBool::new(false)).unwrap(), None);

    // A crash now leaves the zeros: the next open reads them as the end, and appends go on
    // where the frames end.
    let crashed = tempfile::tempdir().unwrap();
    std::fs::copy(&path, segment_path(crashed.path(), 1, "log")).unwrap();
    let reopened =
        AuditLog::open_acknowledged(crashed.path(), 1 << 20, test_indexer(), 20).unwrap();
    assert_eq!(positions(&reopened, 0), (1..21).collect::<Vec<_>>());
    append(&reopened, 21..25);
    assert_eq!(positions(&reopened, 0), (1..25).collect::<Vec<_>>());
    check_lookups(&reopened, 0);
    drop(reopened);
    let (len, end) = length_and_frames_end(&segment_path(crashed.path(), 1, "log"));
    assert_eq!(len, end, "closed, the segment ends with its last frame");

    // A write torn inside the space set aside is cut off as before; past what the records
    // reflect it is damage.
    let torn = |acknowledged: u64| {
        let crashed = tempfile::tempdir().unwrap();
        let copy = segment_path(crashed.path(), 1, "log");
        std::fs::copy(&path, &copy).unwrap();
        let (_, end) = length_and_frames_end(&copy);
        let file = open_file(&copy, false).unwrap();
        let mut bytes = Vec::new();
        let (payload, redo) = (payload(21), redo(21));
        encode_frame(&mut bytes, frame(21, &payload, &redo));
        file.write_all_at(&bytes[..bytes.len() - 5], end).unwrap();
        (
            AuditLog::open_acknowledged(crashed.path(), 1 << 20, test_indexer(), acknowledged),
            crashed,
        )
    };
    let (opened, _kept) = torn(20);
    assert_eq!(positions(&opened.unwrap(), 0), (1..21).collect::<Vec<_>>());
    let (opened, _kept) = torn(21);
    assert_eq!(damage_of(opened).first_lost, 21);

    // Segments left behind end with their last frame, as does the active one once closed.
    append_in_groups(&log, 21..60, 4);
    drop(log);
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    append_in_groups(&log, 60..120, 4);
    let logs = segment_files(dir.path());
    assert!(logs.len() >= 4, "{logs:?}");
    for sealed in &logs[..logs.len() - 1] {
        let (len, end) = length_and_frames_end(sealed);
        assert_eq!(len, end, "{}", sealed.display());
    }
    drop(log);
    let (len, end) = length_and_frames_end(logs.last().unwrap());
    assert_eq!(len, end);
    let log = AuditLog::open(dir.path(), 300, test_indexer()).unwrap();
    assert_eq!(positions(&log, 0), (1..120).collect::<Vec<_>>());
    check_lookups(&log, 50);
}

/// After every group, the active segment's file is its frames and then zeros, to a length
/// the writer knows, whatever pages and set-aside runs the groups cross, and after a reopen
/// that left the frames ending inside a page.
#[test]
fn frames_written_in_whole_pages_leave_frames_then_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = segment_path(dir.path(), 1, "log");
    let check = |log: &AuditLog, last: u64| {
        let bytes = std::fs::read(&path).unwrap();
        let tail = log.tail.lock().unwrap();
        assert_eq!(
            bytes.len() as u64,
            tail.allocated,
            "the file's length is known"
        );
        let (_, end) = length_and_frames_end(&path);
        assert_eq!(end, tail.len, "the frames end where the writer says");
        assert!(
            bytes[end as usize..].iter().all(|&b| b == 0),
            "zeros after the frames"
        );
        drop(tail);
        assert_eq!(positions(log, 0), (1..=last).collect::<Vec<_>>());
    };
    // Two pages set aside at a time: the groups cross many pages and several runs of zeros.
    let log = AuditLog::open(dir.path(), 1 << 30, test_indexer()).unwrap();
    log.tail.lock().unwrap().room = 8192;
    let mut next = 1;
    for size in (1..=7).cycle().take(150) {
        append(&log, next..next + size);
        next += size;
        check(&log, next - 1);
    }
    let (len, _) = length_and_frames_end(&path);
    assert!(
        len % 4096 == 0 && len > 4 * 8192,
        "several runs set aside: {len}"
    );
    drop(log);
    let (len, end) = length_and_frames_end(&path);
    assert_eq!(len, end, "closed, the segment ends with its last frame");
    assert_ne!(end % 4096, 0, "the frames end inside a page");
    // Reopened, the first write reads the start of its page back from the file.
    let log = AuditLog::open(dir.path(), 1 << 30, test_indexer()).unwrap();
    log.tail.lock().unwrap().room = 8192;
    for size in [1, 5, 2] {
        append(&log, next..next + size);
        next += size;
        check(&log, next - 1);
    }
    check_lookups(&log, 0);
}
