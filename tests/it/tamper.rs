//! The tamper table: every kind of raw edit an attacker with write access to the data
//! directory can make to the audit trail's files and the prune anchor, each with the outcome
//! SECURITY.md promises for it, checked three ways: the next start, `byokd audit verify` and
//! `VerifyAudit` (against the head recorded before the edit).
//!
//! Edits are made to the bytes of the files, as an attacker would: frames are cut, copied,
//! moved and renumbered with their CRC recomputed, the anchor is edited in sled's database.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use byokd::api::v1::{self as pb};
use tonic::Code;

use crate::harness::*;

/// Small segments, so that the history spans several sealed segments and an active one.
const SMALL_SEGMENTS: &str = "[store]\naudit_segment_kb = 64\n\
    [limits]\nfailed_get_rate_limit = { per_second = 1000, burst = 1000 }\n";
/// Frame header: len u32 | crc32 u32 | position u64 | flags u8 | payload_len u32.
const HEADER: usize = 21;
/// A frame carrying its transaction's lease changes.
const REPLAYABLE: u8 = 2;

/// What the vault must do about an edit.
#[derive(Debug, Clone, Copy)]
enum Promise {
    /// Damage: byokd refuses to start, naming the damaged file and saying `says`; the
    /// offline verification reports the trail broken.
    RefusedAtStart { says: &'static str },
    /// Damage inside a sealed segment: byokd starts, its scrub finds the damage, and every
    /// write is refused from then on; the offline verification reports the trail broken.
    WritesStopOnceFound,
    /// Valid frames in a wrong chain: byokd starts, and both verifications report the chain
    /// broken at this entry (an offset from the recorded head; 0 is the head itself).
    ChainBrokenAt { from_head: i64 },
    /// A derived file (offsets, index) or a part of a frame read only after a crash: byokd
    /// starts, the chain verifies against the recorded head, and every query answers exactly
    /// as before the edit.
    NoEffect,
}

struct Case {
    name: &'static str,
    /// The file the edit damaged (checked in the refusal), if the promise names one.
    edit: fn(&Trail) -> Option<PathBuf>,
    promise: Promise,
}

/// A stopped server's data directory, copied for each case.
struct Trail {
    dir: TestDir,
}

impl Trail {
    /// Files of the trail ending in `ext`, in order.
    fn files(&self, ext: &str) -> Vec<PathBuf> {
        trail_files(&self.dir, ext)
    }

    fn active(&self) -> PathBuf {
        self.files("log").pop().expect("a segment")
    }

    fn sealed(&self) -> PathBuf {
        let logs = self.files("log");
        assert!(logs.len() >= 3, "{logs:?}");
        logs[1].clone()
    }
}

/// The frames of a segment file, each as its bytes.
fn frames(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).expect("segment");
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        out.push(bytes[at..at + 8 + len].to_vec());
        at += 8 + len;
    }
    assert_eq!(at, bytes.len(), "{path:?} is whole frames");
    out
}

fn write_frames(path: &Path, frames: &[Vec<u8>]) {
    std::fs::write(path, frames.concat()).expect("write segment");
}

fn position(frame: &[u8]) -> u64 {
    u64::from_le_bytes(frame[8..16].try_into().unwrap())
}

/// Sets a frame's position and recomputes its CRC, as anyone can.
fn renumber(frame: &mut [u8], to: u64) {
    frame[8..16].copy_from_slice(&to.to_le_bytes());
    reseal(frame);
}

fn reseal(frame: &mut [u8]) {
    let crc = crc32fast::hash(&frame[8..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// The redo part of a frame (after its payload).
fn redo_range(frame: &[u8]) -> std::ops::Range<usize> {
    let payload = u32::from_le_bytes(frame[17..21].try_into().unwrap()) as usize;
    HEADER + payload..frame.len()
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("file").len()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Edits of the trail and what each must lead to.
fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "a byte flipped in a frame of the active segment",
            edit: |t| {
                let active = t.active();
                flip_byte(&active, len(&active) / 2);
                Some(active)
            },
            promise: Promise::RefusedAtStart { says: "at offset" },
        },
        Case {
            name: "a byte flipped in a frame of a sealed segment",
            edit: |t| {
                let sealed = t.sealed();
                flip_byte(&sealed, len(&sealed) / 2);
                Some(sealed)
            },
            promise: Promise::WritesStopOnceFound,
        },
        Case {
            name: "a sealed segment truncated",
            edit: |t| {
                let sealed = t.sealed();
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&sealed)
                    .unwrap();
                file.set_len(len(&sealed) - 100).unwrap();
                Some(sealed)
            },
            promise: Promise::RefusedAtStart {
                says: "audit trail is damaged",
            },
        },
        Case {
            name: "the active segment's last frame cut off whole",
            edit: |t| {
                let active = t.active();
                let mut all = frames(&active);
                all.pop();
                write_frames(&active, &all);
                None
            },
            promise: Promise::RefusedAtStart {
                says: "but the records reflect entries through",
            },
        },
        Case {
            name: "a sealed segment in the middle deleted",
            edit: |t| {
                std::fs::remove_file(t.sealed()).unwrap();
                None
            },
            promise: Promise::RefusedAtStart {
                says: "are missing",
            },
        },
        Case {
            name: "the first segment deleted",
            edit: |t| {
                std::fs::remove_file(&t.files("log")[0]).unwrap();
                None
            },
            promise: Promise::RefusedAtStart {
                says: "a segment is missing",
            },
        },
        Case {
            name: "the active segment deleted",
            edit: |t| {
                std::fs::remove_file(t.active()).unwrap();
                None
            },
            promise: Promise::RefusedAtStart {
                says: "but the records reflect entries through",
            },
        },
        Case {
            name: "a copy of a frame inserted in the active segment",
            edit: |t| {
                let active = t.active();
                let mut all = frames(&active);
                let copy = all[1].clone();
                all.insert(4, copy);
                write_frames(&active, &all);
                Some(active)
            },
            promise: Promise::RefusedAtStart {
                says: "or later belongs",
            },
        },
        Case {
            name: "a copy of a frame inserted in a sealed segment",
            edit: |t| {
                let sealed = t.sealed();
                let mut all = frames(&sealed);
                let copy = all[1].clone();
                all.insert(all.len() / 2, copy);
                write_frames(&sealed, &all);
                Some(sealed)
            },
            promise: Promise::RefusedAtStart {
                says: "or later belongs",
            },
        },
        Case {
            name: "a frame appended after the head, renumbered to follow it",
            edit: |t| {
                let active = t.active();
                let mut all = frames(&active);
                let mut copy = all[all.len() - 3].clone();
                let next = position(all.last().unwrap()) + 1;
                // Not state-bearing: nothing in the records needs to reflect it.
                copy[16] = 0;
                renumber(&mut copy, next);
                all.push(copy);
                write_frames(&active, &all);
                None
            },
            promise: Promise::ChainBrokenAt { from_head: 1 },
        },
        Case {
            name: "two frames of the active segment swapped",
            edit: |t| {
                let active = t.active();
                let mut all = frames(&active);
                all.swap(3, 4);
                write_frames(&active, &all);
                Some(active)
            },
            promise: Promise::RefusedAtStart {
                says: "or later belongs",
            },
        },
        Case {
            name: "two frames swapped and renumbered into order",
            edit: |t| {
                let active = t.active();
                let mut all = frames(&active);
                let (a, b) = (position(&all[3]), position(&all[4]));
                all.swap(3, 4);
                renumber(&mut all[3], a);
                renumber(&mut all[4], b);
                write_frames(&active, &all);
                None
            },
            // The fourth frame of the active segment: counted back from the head below.
            promise: Promise::ChainBrokenAt {
                from_head: i64::MIN,
            },
        },
        Case {
            name: "a frame's lease record edited, its CRC recomputed",
            edit: |t| {
                let active = t.active();
                let mut all = frames(&active);
                let frame = all
                    .iter_mut()
                    .rev()
                    .find(|f| f[16] & REPLAYABLE != 0 && !redo_range(f).is_empty())
                    .expect("a frame with a lease record");
                let redo = redo_range(frame);
                let at = redo.start + redo.len() / 2;
                frame[at] ^= 0x01;
                reseal(frame);
                write_frames(&active, &all);
                None
            },
            promise: Promise::NoEffect,
        },
        Case {
            name: "a frame's lease record edited, its CRC left",
            edit: |t| {
                let active = t.active();
                let all = frames(&active);
                let mut offset = 0;
                for frame in &all {
                    if frame[16] & REPLAYABLE != 0 && !redo_range(frame).is_empty() {
                        let redo = redo_range(frame);
                        flip_byte(&active, (offset + redo.start + redo.len() / 2) as u64);
                        return Some(active);
                    }
                    offset += frame.len();
                }
                panic!("no frame with a lease record");
            },
            promise: Promise::RefusedAtStart { says: "at offset" },
        },
        Case {
            name: "an offset file's byte flipped",
            edit: |t| {
                let idx = t.files("idx")[1].clone();
                flip_byte(&idx, len(&idx) / 2 / 8 * 8 + 1);
                None
            },
            promise: Promise::NoEffect,
        },
        Case {
            name: "an offset file truncated",
            edit: |t| {
                let idx = t.files("idx")[0].clone();
                let file = std::fs::OpenOptions::new().write(true).open(&idx).unwrap();
                file.set_len(len(&idx) - 8).unwrap();
                None
            },
            promise: Promise::NoEffect,
        },
        Case {
            name: "an index file's byte flipped",
            edit: |t| {
                for ndx in t.files("ndx") {
                    flip_byte(&ndx, len(&ndx) / 3);
                }
                None
            },
            promise: Promise::NoEffect,
        },
        Case {
            name: "offset and index files deleted",
            edit: |t| {
                for f in t.files("idx").into_iter().chain(t.files("ndx")) {
                    std::fs::remove_file(f).unwrap();
                }
                None
            },
            promise: Promise::NoEffect,
        },
    ]
}

/// What a healthy trail answers, to compare with after an edit that must change nothing.
#[derive(Debug, PartialEq)]
struct Answers {
    /// Every entry up to the recorded head.
    all: Vec<pb::AuditEntry>,
    /// The entries of one secret whose history is in a sealed segment (an indexed query).
    one_secret: Vec<pb::AuditEntry>,
    /// The entries of the principal that redeemed (an indexed query).
    redeemer: Vec<pb::AuditEntry>,
}

async fn answers(server: &TestServer, head: u64) -> Result<Answers, tonic::Status> {
    let mut client = server.as_(AUDITOR).await;
    let mut query = async |mut req: pb::AuditRequest| {
        let mut out = Vec::new();
        loop {
            let page = client.audit(req.clone()).await?.into_inner();
            out.extend(page.entries.into_iter().filter(|e| e.seq <= head));
            if page.next_page_token.is_empty() {
                return Ok::<_, tonic::Status>(out);
            }
            req.page_token = page.next_page_token;
        }
    };
    Ok(Answers {
        all: query(pb::AuditRequest::default()).await?,
        one_secret: query(pb::AuditRequest {
            tenant: "acme".into(),
            name: "k700".into(),
            ..Default::default()
        })
        .await?,
        redeemer: query(pb::AuditRequest {
            principal: "agent".into(),
            ..Default::default()
        })
        .await?,
    })
}

/// The history: 1,300 stores over several 64 KiB segments, then leases, uses (frames with
/// lease records) and failed uses in the active segment. Returns the directory and the
/// tokens used up.
async fn history() -> (TestDir, Vec<String>) {
    let dir = TestDir::with_config(SMALL_SEGMENTS);
    let server = dir.start();
    store_many(&server, 1300, |i| {
        format!("sk-tamper-{i:04}-0123456789abcdef").into_bytes()
    })
    .await;
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut used = Vec::new();
    for i in (0..1300).step_by(100) {
        let grant = lease_ok(&mut orch, lease_req("acme", &format!("k{i}"), 1)).await;
        redeem(&server, AGENT, &grant.token).await.expect("get");
        assert!(redeem(&server, AGENT, &grant.token).await.is_err());
        used.push(grant.token);
    }
    // The last entries are uses: the records reflect the trail's last frame.
    let grant = lease_ok(&mut orch, lease_req("acme", "k1", 1)).await;
    redeem(&server, AGENT, &grant.token).await.expect("get");
    used.push(grant.token);
    assert!(server.stop().await.success());
    (dir, used)
}

/// `byokd audit verify` on a directory, with extra arguments: (exit code, output).
fn verify_offline(dir: &TestDir, extra: &[&str]) -> (i32, String) {
    let config = dir.config().to_string_lossy().into_owned();
    let mut args = vec!["audit", "verify", "--config", &config];
    args.extend(extra);
    byokd(dir.path(), &args, "")
}

/// The warnings and errors of a server's log.
fn errors(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until a write is refused (the scrub found the damage): UNAVAILABLE, no detail.
async fn writes_stop(server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for attempt in 0.. {
        let mut orch = server.as_(ORCHESTRATOR).await;
        let name = format!("after-edit-{attempt}");
        match orch
            .store(store_req("acme", &name, b"sk-after-edit-0123456789abc"))
            .await
        {
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(!status.message().contains("segment"), "{status:?}");
                return;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "still writing after 30 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_raw_edit_of_the_trail_has_the_promised_outcome() {
    let (original, used) = history().await;
    let (code, text) = verify_offline(&original, &[]);
    assert_eq!(code, 0, "{text}");
    let head_line = text
        .lines()
        .find_map(|l| l.strip_prefix("head: seq "))
        .expect("head line")
        .to_string();
    let (seq, hash) = head_line.split_once(" hash ").expect("seq and hash");
    let head: (u64, String) = (seq.parse().expect("seq"), hash.trim().to_string());
    let pinned = format!("{}:{}", head.0, head.1);
    let fresh = || {
        let trail = Trail {
            dir: TestDir::with_config(SMALL_SEGMENTS),
        };
        copy_tree(&original.data(), &trail.dir.data());
        trail
    };

    // The untouched copy: what every query answers.
    let control = fresh();
    assert!(control.files("log").len() >= 3);
    let first_of_active: u64 = control
        .active()
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("segment name");
    let server = control.dir.start();
    let before = answers(&server, head.0).await.expect("queries");
    assert!(
        before.one_secret.len() >= 3 && before.redeemer.len() >= 20,
        "{} {}",
        before.one_secret.len(),
        before.redeemer.len()
    );
    let report = verify_against(&server, (head.0, &head.1)).await;
    assert!(report.ok, "{report:?}");
    drop(server);

    let mut failures = Vec::new();
    for case in cases() {
        let trail = fresh();
        let damaged = (case.edit)(&trail);
        let damaged_name = damaged.map(|p| p.file_name().unwrap().to_string_lossy().into_owned());
        let (code, offline) = verify_offline(&trail.dir, &["--expect-head", &pinned]);
        let outcome: Result<(), String> = async {
            match case.promise {
                Promise::RefusedAtStart { says } => {
                    let (status, log) = trail.dir.start_failing();
                    if status.code() != Some(1) || !log.contains(says) {
                        return Err(format!("start: {status:?}, wanted {says:?}:\n{log}"));
                    }
                    if let Some(name) = &damaged_name
                        && !log.contains(name)
                    {
                        return Err(format!("the refusal does not name {name}:\n{log}"));
                    }
                    if code != 3 || !offline.contains("BROKEN") {
                        return Err(format!("offline verify said {code}: {offline}"));
                    }
                }
                Promise::WritesStopOnceFound => {
                    let server = trail.dir.start();
                    writes_stop(&server).await;
                    let log = server.log();
                    let name = damaged_name.as_deref().unwrap_or_default();
                    if !log.contains("audit trail is damaged") || !log.contains(name) {
                        return Err(format!("log does not name {name}:\n{log}"));
                    }
                    if code != 3 || !offline.contains("BROKEN") {
                        return Err(format!("offline verify said {code}: {offline}"));
                    }
                }
                Promise::ChainBrokenAt { from_head } => {
                    let at = if from_head == i64::MIN {
                        first_of_active + 3
                    } else {
                        head.0.checked_add_signed(from_head).expect("seq")
                    };
                    let server = trail.dir.start();
                    let report = verify_against(&server, (head.0, &head.1)).await;
                    if report.ok || report.first_bad_seq != at {
                        return Err(format!("VerifyAudit, wanted broken at {at}: {report:?}"));
                    }
                    let want = format!("BROKEN at entry {at}");
                    if code != 3 || !offline.contains(&want) {
                        return Err(format!("offline verify said {code}: {offline}"));
                    }
                }
                Promise::NoEffect => {
                    let server = trail.dir.start();
                    let report = verify_against(&server, (head.0, &head.1)).await;
                    if !report.ok {
                        return Err(format!("VerifyAudit: {report:?}"));
                    }
                    let after = answers(&server, head.0).await;
                    if after.as_ref().ok() != Some(&before) {
                        return Err(format!(
                            "queries answer differently: {:?}\n{}",
                            after.map(|a| a.all.len()),
                            errors(&server.log())
                        ));
                    }
                    for token in &used {
                        let answer = redeem(&server, AGENT, token).await;
                        if answer.as_ref().map_err(|s| s.code()).err() != Some(Code::NotFound) {
                            return Err(format!("a used token answered {answer:?}"));
                        }
                    }
                    if code != 0 {
                        return Err(format!("offline verify said {code}: {offline}"));
                    }
                }
            }
            Ok(())
        }
        .await;
        eprintln!("{}: {:?}: {outcome:?}", case.name, case.promise);
        if let Err(why) = outcome {
            failures.push(format!("{}: {why}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The prune anchor, as stored in sled (a format byte, then postcard: seq as a varint, the
/// last pruned entry's hash, the MAC).
const ANCHOR_KEY: &[u8] = b"maudit-anchor";

fn edit_anchor(dir: &TestDir, edit: impl FnOnce(Option<Vec<u8>>) -> Option<Vec<u8>>) {
    let db = sled::open(dir.data().join("db")).expect("open sled");
    let tree = db.open_tree("byokd").expect("tree");
    let old = tree.get(ANCHOR_KEY).expect("read").map(|v| v.to_vec());
    match edit(old) {
        Some(new) => tree.insert(ANCHOR_KEY, new).map(drop),
        None => tree.remove(ANCHOR_KEY).map(drop),
    }
    .expect("write anchor");
    db.flush().expect("flush");
}

/// A postcard varint.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// The anchor with its seq replaced (hash and MAC kept).
fn with_seq(anchor: &[u8], seq: u64) -> Vec<u8> {
    let rest = &anchor[anchor.len() - 64..];
    [&anchor[..1], &varint(seq), rest].concat()
}

fn anchor_seq(anchor: &[u8]) -> u64 {
    let mut n = 0u64;
    for (i, b) in anchor[1..anchor.len() - 64].iter().enumerate() {
        n |= u64::from(b & 0x7f) << (7 * i);
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edit_of_the_prune_anchor_is_reported_or_refused() {
    // A trail whose first segments were pruned away: entries before the anchor are gone.
    let retention = "[audit]\nretention = \"1s\"\nprune_interval = \"300ms\"\n";
    let original = TestDir::with_config(&format!("{SMALL_SEGMENTS}{retention}"));
    let server = original.start();
    store_many(&server, 1300, |i| {
        format!("sk-anchor-{i:04}-0123456789abcdef").into_bytes()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let pruned_through = loop {
        let prunes = audit_all(
            &server,
            pb::AuditRequest {
                action: "Prune".into(),
                ..Default::default()
            },
        )
        .await;
        let report = verify_against(&server, (0, "")).await;
        if !prunes.is_empty() && report.anchor_seq > 1000 {
            break report.anchor_seq;
        }
        assert!(Instant::now() < deadline, "not pruned: {report:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(server.stop().await.success());
    // Later checks run without retention, which would move the anchor again.
    original.rewrite_config(SMALL_SEGMENTS);
    let (code, text) = verify_offline(&original, &[]);
    assert_eq!(code, 0, "{text}");

    let fresh = || {
        let dir = TestDir::with_config(SMALL_SEGMENTS);
        copy_tree(&original.data(), &dir.data());
        dir
    };
    let mut stored = None;
    edit_anchor(&fresh(), |old| {
        stored = old.clone();
        old
    });
    let stored = stored.expect("an anchor");
    assert!(anchor_seq(&stored) >= pruned_through, "{pruned_through}");
    let seq = anchor_seq(&stored);

    // Its MAC (or hash) altered: the start is where it was, and both verifications say the
    // anchor is not authentic.
    for at in [stored.len() - 1, stored.len() - 40] {
        let dir = fresh();
        edit_anchor(&dir, |old| {
            let mut new = old.expect("anchor");
            new[at] ^= 0x01;
            Some(new)
        });
        let (code, text) = verify_offline(&dir, &[]);
        assert_eq!(code, 3, "{text}");
        assert!(text.contains("anchor is not authentic"), "{text}");
        let server = dir.start();
        let report = verify_against(&server, (0, "")).await;
        assert!(
            !report.ok && report.problem.contains("anchor"),
            "{report:?}"
        );
    }

    // Moved back, so that it claims fewer entries were pruned: the entries after it are gone,
    // so the start is refused.
    let dir = fresh();
    edit_anchor(&dir, |old| Some(with_seq(&old.expect("anchor"), seq - 500)));
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("a segment is missing"), "{}", errors(&log));
    assert_eq!(verify_offline(&dir, &[]).0, 3);

    // Deleted: the same.
    let dir = fresh();
    edit_anchor(&dir, |_| None);
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("a segment is missing"), "{}", errors(&log));
    assert_eq!(verify_offline(&dir, &[]).0, 3);

    // Moved forward, to hide entries after the real one: not authentic.
    let dir = fresh();
    edit_anchor(&dir, |old| Some(with_seq(&old.expect("anchor"), seq + 3)));
    let (code, text) = verify_offline(&dir, &[]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("anchor is not authentic"), "{text}");
    let server = dir.start();
    let report = verify_against(&server, (0, "")).await;
    assert!(
        !report.ok && report.problem.contains("anchor"),
        "{report:?}"
    );
    drop(server);

    // Retention does not launder a forged anchor by writing an authentic one over it.
    dir.rewrite_config(&format!("{SMALL_SEGMENTS}{retention}"));
    let server = dir.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.log().contains("not pruning over it") {
        assert!(Instant::now() < deadline, "{}", errors(&server.log()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = verify_against(&server, (0, "")).await;
    assert!(
        !report.ok && report.problem.contains("anchor"),
        "{report:?}"
    );
}
