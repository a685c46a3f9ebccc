//! Crash test: a mixed load (Store, Rotate, Revoke of secrets and of leases, single- and
//! multi-use leases and their uses, a master-key rotation, audit retention pruning), `kill -9`
//! at random points, restart, and a check of everything acknowledged:
//! - every value, or the rotation in flight at the kill; every revocation;
//! - every lease use: a consumed single-use lease answers NOT_FOUND *because it was used up*
//!   (its audit entry says so; nothing here can supersede it: leased secrets are never
//!   rotated), a multi-use lease has exactly the uses left that were not acknowledged;
//! - the head pinned just before the kill is still the trail's (VerifyAudit against it);
//! - a WatchAudit stream, resumed after each restart, sees a gap-free chain from entry 1,
//!   and every acknowledged write's audit entry is in it;
//! - the tenant, secret, principal, peer and time indexes answer what a scan of the trail does.
//!
//! Every other round only leases, so that lease changes must survive through the trail's
//! lease records alone (no store's sled flush carries them).
//!
//! A recovery window and a rotation grace that end while byokd is down (killed) are done at
//! the next start, and nothing else is lost: see the test after the main one (both engines).
//!
//! Any request that fails before the kill, or fails after it with anything but a transport
//! error, fails the test. `BYOKD_CRASH_KILLS` kills (default 3; `scripts/crash-test.sh` runs
//! 25); `BYOKD_CRASH_SEED` replays a run's choices (every worker's operations and names, and
//! the kill delays; the machine's timing is not replayed).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use byokd::api::v1::{self as pb};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::harness::*;

/// 256 KiB audit segments (kills land while segments fill, seal and start anew), retention
/// that prunes the first rounds' entries in later rounds, a slow rewrap, no quota or rate
/// limit in the way.
const CONFIG: &str = "[store]\naudit_segment_kb = 256\n\
    [audit]\nretention = \"4s\"\nprune_interval = \"500ms\"\n\
    [master_key]\nrewrap_batch = 4\n\
    [quotas]\nmax_secrets_per_tenant = 1000000\nmax_leases_per_tenant = 1000000\n\
    [limits]\nfailed_get_rate_limit = { per_second = 100000, burst = 100000 }\n\
    principal_rate_limit = { per_second = 1000000, burst = 1000000 }\n";
/// Secrets that are leased: stored once, never rotated or revoked.
const LEASED: usize = 8;

/// A small deterministic generator: the run's choices follow from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// An audit entry an acknowledged write must have.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Entry {
    Store(String),
    Rotate(String, u32),
    RevokeSecret(String),
    Lease(String),
    Get(String),
    RevokeLease(String),
    RotateMasterKey,
}

impl Entry {
    fn of(e: &pb::AuditEntry) -> Option<Entry> {
        if e.outcome != "OK" {
            return None;
        }
        Some(match e.action.as_str() {
            "Store" => Entry::Store(e.name.clone()),
            "Rotate" => Entry::Rotate(e.name.clone(), e.version),
            "Revoke" if !e.lease_id.is_empty() => Entry::RevokeLease(e.lease_id.clone()),
            "Revoke" => Entry::RevokeSecret(e.name.clone()),
            "Lease" => Entry::Lease(e.lease_id.clone()),
            "Get" => Entry::Get(e.lease_id.clone()),
            "RotateMasterKey" => Entry::RotateMasterKey,
            _ => return None,
        })
    }
}

/// A lease whose state after a restart follows from what was acknowledged.
#[derive(Debug, Clone)]
struct Tracked {
    token: String,
    lease_id: String,
    max_uses: u32,
    acked_uses: u32,
    /// A use (or the revocation) was sent and not answered before the kill.
    use_in_flight: bool,
    revoked: bool,
    revoke_in_flight: bool,
}

#[derive(Default)]
struct Model {
    /// Acknowledged value of each secret, and a rotation in flight at the kill.
    values: HashMap<String, (Vec<u8>, Option<Vec<u8>>)>,
    /// Secrets whose revocation was acknowledged (true) or in flight (false).
    revoked: HashMap<String, bool>,
    leases: Vec<Tracked>,
    /// Audit entries of acknowledged writes, with how many of each.
    expected: HashMap<Entry, usize>,
    acked: u64,
    /// Failed requests that are not an expected outcome.
    errors: Vec<String>,
}

impl Model {
    fn ack(&mut self, entry: Entry) {
        *self.expected.entry(entry).or_default() += 1;
        self.acked += 1;
    }
}

/// What every worker shares.
#[derive(Clone)]
struct Shared {
    model: Arc<Mutex<Model>>,
    killed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn assert_no_errors(&self, round: usize) {
        let errors = self.model.lock().unwrap().errors.clone();
        assert!(errors.is_empty(), "round {round}: {errors:#?}");
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// The answer, or `None` if the request failed: expected only after the kill, as a
    /// transport error; anything else is recorded as an error of the run.
    fn answer<T>(&self, what: &str, result: Result<tonic::Response<T>, Status>) -> Option<T> {
        match result {
            Ok(r) => Some(r.into_inner()),
            Err(status) => {
                let transport = matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                );
                if !(self.killed.load(Ordering::SeqCst) && transport) {
                    self.model
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("{what}: {status:?}"));
                }
                None
            }
        }
    }
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_and_uses_survive_repeated_kill_9() {
    let kills = setting("BYOKD_CRASH_KILLS", 3) as usize;
    let seed = setting(
        "BYOKD_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("crash test: {kills} kills, BYOKD_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = TestDir::with_config(CONFIG);
    let shared = Shared {
        model: Arc::new(Mutex::new(Model::default())),
        killed: Arc::new(AtomicBool::new(false)),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let watched = Arc::new(Mutex::new(Vec::<pb::AuditEntry>::new()));
    let mut pinned: Option<(u64, String)> = None;
    for round in 0..=kills {
        let server = dir.start();
        shared.killed.store(false, Ordering::SeqCst);
        shared.stop.store(false, Ordering::SeqCst);
        let watcher = tokio::spawn(watch(server.addr, watched.clone()));
        if round == 0 {
            let mut orch = server.as_(ORCHESTRATOR).await;
            for i in 0..LEASED {
                let name = format!("leased-{i}");
                let value = format!("sk-crash-{name}-0123456789abcdef").into_bytes();
                store(&mut orch, "acme", &name, &value).await;
                let mut m = shared.model.lock().unwrap();
                m.values.insert(name.clone(), (value, None));
                m.ack(Entry::Store(name));
            }
        } else {
            verify(&server, &shared, &watched, pinned.take()).await;
        }
        if round == kills {
            drop(server);
            ended(watcher).await;
            break;
        }
        let acked_before = shared.model.lock().unwrap().acked;
        let mut tasks = Vec::new();
        // Every other round only leases: then no store's flush makes the lease changes of
        // the groups before it durable in sled, and only the trail's lease records keep them.
        let writers = if round % 2 == 1 { 0 } else { 3 };
        for w in 0..writers {
            let rng = Rng(seed ^ ((round as u64) << 32) ^ (w + 1));
            tasks.push(tokio::spawn(writer(
                server.addr,
                shared.clone(),
                round,
                w,
                rng,
            )));
        }
        for w in 0..2 {
            let rng = Rng(seed ^ ((round as u64) << 32) ^ (w + 100));
            tasks.push(tokio::spawn(leaser(server.addr, shared.clone(), rng)));
        }
        let admin_rng = Rng(seed ^ ((round as u64) << 32) ^ 200);
        tasks.push(tokio::spawn(admin(server.addr, shared.clone(), admin_rng)));
        // Enough writes per round that the trail crosses segments whatever the machine's
        // speed, then a random moment.
        let deadline = Instant::now() + Duration::from_secs(60);
        while shared.model.lock().unwrap().acked < acked_before + 150 {
            assert!(Instant::now() < deadline, "no progress in round {round}");
            shared.assert_no_errors(round);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(150 + rng.below(550))).await;
        // The head now: every later check must still find it.
        let head = verify_against(&server, (0, "")).await;
        assert!(head.ok, "{head:?}");
        pinned = Some((head.head_seq, head.head_hash));
        shared.killed.store(true, Ordering::SeqCst);
        server.kill9();
        shared.stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.expect("worker");
        }
        ended(watcher).await;
        shared.assert_no_errors(round);
    }
    let m = shared.model.lock().unwrap();
    // The trail kept starting new segments (the newest starts after entry 1), even where
    // retention has deleted the older ones since.
    let segments: Vec<u64> = std::fs::read_dir(dir.path().join("data/db/audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some("log".as_ref()))
        .filter_map(|p| p.file_stem()?.to_str()?.parse().ok())
        .collect();
    let newest = segments.iter().max().copied().unwrap_or(0);
    let watched = watched.lock().unwrap();
    let count = |action: &str| watched.iter().filter(|e| e.action == action).count();
    eprintln!(
        "crash test: {} acknowledged writes ({} secrets, {} revoked) survived {kills} kills; \
         {} audit entries watched ({} Get, {} Revoke, {} RotateMasterKey, {} Prune); \
         {} audit segments, the newest from entry {newest}",
        m.acked,
        m.values.len(),
        m.revoked.len(),
        watched.len(),
        count("Get"),
        count("Revoke"),
        count("RotateMasterKey"),
        count("Prune"),
        segments.len(),
    );
    assert!(m.acked > 0 && count("Get") > 0 && count("Revoke") > 0);
    assert!(newest > 1, "{segments:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_and_graces_that_end_while_down_are_done_at_the_next_start_on_sled() {
    let on = crate::key_life::on_sled(DUE_WHILE_DOWN);
    due_while_down(on).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_and_graces_that_end_while_down_are_done_at_the_next_start_on_postgres() {
    let Some(on) = crate::key_life::on_postgres(DUE_WHILE_DOWN) else {
        return;
    };
    due_while_down(on).await;
}

/// Four secrets per tenant at most (so that the usage after the restart is seen), and the
/// sweep at its default interval: what is due at a start must not wait for it.
const DUE_WHILE_DOWN: &str = "[quotas]\nmax_secrets_per_tenant = 4\n";

async fn due_while_down(on: crate::key_life::OnEngine) {
    use crate::key_life::{describe, entries_of, revoke_within, secs};
    let server = &on.server;
    let mut orch = server.as_(ORCHESTRATOR).await;
    // A window and a grace of 2 s, a window that outlasts the test, and a restored secret.
    store(&mut orch, "acme", "window", b"sk-due-window-0001").await;
    let ended = lease_ok(&mut orch, lease_req("acme", "window", 1)).await;
    orch.revoke(revoke_within("acme", "window", 2))
        .await
        .expect("revoke");
    store(&mut orch, "acme", "grace", b"sk-due-grace-v1-0001").await;
    let previous = lease_ok(&mut orch, lease_req("acme", "grace", 2)).await;
    remember_secret(b"sk-due-grace-v2-0002");
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "grace".into(),
        value: b"sk-due-grace-v2-0002".to_vec(),
        previous_grace: secs(2),
        ..Default::default()
    })
    .await
    .expect("rotate");
    let got = redeem(server, AGENT, &previous.token)
        .await
        .expect("in grace");
    assert_eq!(got.value, b"sk-due-grace-v1-0001");
    store(&mut orch, "acme", "long", b"sk-due-long-0001").await;
    orch.revoke(revoke_within("acme", "long", 3600))
        .await
        .expect("revoke");
    store(&mut orch, "acme", "back", b"sk-due-back-0001").await;
    orch.revoke(revoke_within("acme", "back", 3600))
        .await
        .expect("revoke");
    orch.restore(secret_ref("acme", "back"))
        .await
        .expect("restore");
    // All four hold their data keys: the tenant is at its quota.
    let full = orch
        .store(store_req("acme", "extra", b"sk-due-extra-0001"))
        .await;
    assert_status(full, Code::ResourceExhausted, "");
    let head = verify_against(server, (0, "")).await;
    assert!(head.ok);
    let set_at = Instant::now();
    // Killed before either ends; down until both have.
    let crate::key_life::OnEngine {
        server,
        dir,
        _key_dir,
        _db,
    } = on;
    server.kill9();
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(set_at.elapsed())).await;
    let server = dir.start();
    // The sweep destroys both as soon as the new process takes the background turn: at
    // once on sled; on PostgreSQL once the killed process's turn has lapsed (`job_turn`, 15 s),
    // not a sweep interval (30 s) later.
    let mut window = Vec::new();
    for _ in 0..2 {
        window = entries_of(&server, "acme", "window", "Destroy", 1).await;
        if !window.is_empty() {
            break;
        }
    }
    let grace = entries_of(&server, "acme", "grace", "Destroy", 1).await;
    assert_eq!(window.len(), 1, "{window:?}");
    assert_eq!(grace.len(), 1, "{grace:?}");
    assert_eq!(grace[0].version, 1);
    let mut orch = server.as_(ORCHESTRATOR).await;
    let window = describe(&mut orch, "acme", "window").await;
    assert_eq!(window.state, pb::SecretState::Revoked as i32);
    let restore = orch.restore(secret_ref("acme", "window")).await;
    assert_status(restore, Code::FailedPrecondition, "");
    assert_status(
        redeem(&server, AGENT, &ended.token).await,
        Code::NotFound,
        "",
    );
    assert_status(
        redeem(&server, AGENT, &previous.token).await,
        Code::NotFound,
        "",
    );
    // Nothing else lost: the new version, the restored secret, the window still open.
    let got = lease_and_get(&server, "acme", "grace")
        .await
        .expect("grace");
    assert_eq!(got.value, b"sk-due-grace-v2-0002");
    let got = lease_and_get(&server, "acme", "back").await.expect("back");
    assert_eq!(got.value, b"sk-due-back-0001");
    let long = describe(&mut orch, "acme", "long").await;
    assert_eq!(long.state, pb::SecretState::PendingDeletion as i32);
    orch.restore(secret_ref("acme", "long"))
        .await
        .expect("restore");
    let got = lease_and_get(&server, "acme", "long").await.expect("long");
    assert_eq!(got.value, b"sk-due-long-0001");
    // The destroyed secret went back to the quota: one more Store fits, then no more.
    store(&mut orch, "acme", "extra", b"sk-due-extra-0001").await;
    let full = orch
        .store(store_req("acme", "extra2", b"sk-due-extra-0002"))
        .await;
    assert_status(full, Code::ResourceExhausted, "");
    let report = verify_against(&server, (head.head_seq, &head.head_hash)).await;
    assert!(report.ok, "{report:?}");
    drop(server);
    drop(dir);
}

/// Follows the trail from where the entries in `into` end, checking that each entry links to
/// the one before it, until the stream ends (the kill).
async fn watch(addr: std::net::SocketAddr, into: Arc<Mutex<Vec<pb::AuditEntry>>>) {
    let from_seq = into.lock().unwrap().last().map_or(1, |e| e.seq + 1);
    let mut stream = connect(addr, Some(AUDITOR))
        .await
        .watch_audit(pb::WatchAuditRequest {
            from_seq,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("WatchAudit from {from_seq}: {e:?}"))
        .into_inner();
    while let Some(Ok(entry)) = stream.next().await {
        let mut all = into.lock().unwrap();
        if let Some(last) = all.last() {
            assert_eq!(
                (entry.seq, &entry.prev_hash),
                (last.seq + 1, &last.hash),
                "the watched trail has a gap or a fork"
            );
        }
        all.push(entry);
    }
}

/// Waits for a watcher whose server is gone, passing on its panic.
async fn ended(watcher: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the watch ends with its server")
        .expect("watcher");
}

/// Stores new secrets, rotates its own, and stores then revokes others.
async fn writer(addr: std::net::SocketAddr, s: Shared, round: usize, w: u64, mut rng: Rng) {
    let mut c = connect(addr, Some(ORCHESTRATOR)).await;
    let mut own: Vec<String> = Vec::new();
    let mut i = 0;
    while s.running() {
        i += 1;
        let choice = rng.below(100);
        if choice < 25 && !own.is_empty() {
            let name = own[rng.below(own.len() as u64) as usize].clone();
            let value = format!("sk-crash-rotated-{name}-{i}-0123456789").into_bytes();
            remember_secret(&value);
            s.model.lock().unwrap().values.get_mut(&name).unwrap().1 = Some(value.clone());
            let req = pb::RotateRequest {
                tenant: "acme".into(),
                name: name.clone(),
                value: value.clone(),
                ..Default::default()
            };
            let Some(meta) = s.answer("Rotate", c.rotate(req).await) else {
                return;
            };
            let mut m = s.model.lock().unwrap();
            *m.values.get_mut(&name).unwrap() = (value, None);
            m.ack(Entry::Rotate(name, meta.version));
            continue;
        }
        let revoke = choice >= 85;
        let name = format!("r{round}-w{w}-{i}{}", if revoke { "-rv" } else { "" });
        let value = format!("sk-crash-{name}-0123456789abcdef").into_bytes();
        if s.answer("Store", c.store(store_req("acme", &name, &value)).await)
            .is_none()
        {
            return;
        }
        {
            let mut m = s.model.lock().unwrap();
            m.values.insert(name.clone(), (value, None));
            m.ack(Entry::Store(name.clone()));
        }
        if !revoke {
            own.push(name);
            continue;
        }
        s.model.lock().unwrap().revoked.insert(name.clone(), false);
        let req = revoke_secret("acme", &name, "crash test");
        if s.answer("Revoke", c.revoke(req).await).is_none() {
            return;
        }
        let mut m = s.model.lock().unwrap();
        m.revoked.insert(name.clone(), true);
        m.ack(Entry::RevokeSecret(name));
    }
}

/// Leases the leased secrets: single-use leases used once, multi-use leases used once or
/// twice, leases revoked.
async fn leaser(addr: std::net::SocketAddr, s: Shared, mut rng: Rng) {
    let mut orch = connect(addr, Some(ORCHESTRATOR)).await;
    let mut agent = connect(addr, Some(AGENT)).await;
    while s.running() {
        let name = format!("leased-{}", rng.below(LEASED as u64));
        let kind = rng.below(3);
        let max_uses = if kind == 0 { 1 } else { 3 };
        let Some(grant) = s.answer(
            "Lease",
            orch.lease(lease_req("acme", &name, max_uses)).await,
        ) else {
            return;
        };
        let index = {
            let mut m = s.model.lock().unwrap();
            m.ack(Entry::Lease(grant.lease_id.clone()));
            m.leases.push(Tracked {
                token: grant.token.clone(),
                lease_id: grant.lease_id.clone(),
                max_uses,
                acked_uses: 0,
                use_in_flight: false,
                revoked: false,
                revoke_in_flight: false,
            });
            m.leases.len() - 1
        };
        let uses = match kind {
            0 => 1,
            1 => 1 + rng.below(2),
            _ => rng.below(2),
        };
        for _ in 0..uses {
            s.model.lock().unwrap().leases[index].use_in_flight = true;
            let Some(value) = s.answer("Get", agent.get(get_req(&grant.token)).await) else {
                return;
            };
            let mut m = s.model.lock().unwrap();
            let lease = &mut m.leases[index];
            lease.use_in_flight = false;
            lease.acked_uses += 1;
            if value.remaining_uses != lease.max_uses - lease.acked_uses {
                let what = format!("Get: {} uses left of {lease:?}", value.remaining_uses);
                m.errors.push(what);
            }
            m.ack(Entry::Get(grant.lease_id.clone()));
        }
        if kind == 2 {
            s.model.lock().unwrap().leases[index].revoke_in_flight = true;
            let req = revoke_lease(&grant.lease_id);
            if s.answer("Revoke lease", orch.revoke(req).await).is_none() {
                return;
            }
            let mut m = s.model.lock().unwrap();
            m.leases[index].revoked = true;
            m.ack(Entry::RevokeLease(grant.lease_id.clone()));
        }
    }
}

/// Starts one master-key rotation a round, at a random moment (one may still be rewrapping,
/// resumed after the restart: then it is refused as in progress).
async fn admin(addr: std::net::SocketAddr, s: Shared, mut rng: Rng) {
    tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
    if !s.running() {
        return;
    }
    // The server may be killed between the check above and the connection.
    let mut admin = match try_connect(addr, Some(ADMIN)).await {
        Ok(admin) => admin,
        Err(e) => {
            assert!(s.killed.load(Ordering::SeqCst), "connect: {e:?}");
            return;
        }
    };
    match admin.rotate_master_key(pb::RotateMasterKeyRequest {}).await {
        Err(status) if status.code() == Code::FailedPrecondition => {}
        result => {
            if s.answer("RotateMasterKey", result).is_some() {
                s.model.lock().unwrap().ack(Entry::RotateMasterKey);
            }
        }
    }
}

/// After a restart: the pinned head, every value and revocation, every lease's uses, the
/// watched trail against the acknowledged writes, and the indexes against a scan.
async fn verify(
    server: &TestServer,
    shared: &Shared,
    watched: &Arc<Mutex<Vec<pb::AuditEntry>>>,
    pinned: Option<(u64, String)>,
) {
    if let Some((seq, hash)) = pinned {
        let report = verify_against(server, (seq, &hash)).await;
        assert!(report.ok, "the head pinned before the kill: {report:?}");
    }
    let start = verify_against(server, (0, "")).await;
    assert!(start.ok, "{start:?}");
    // The watcher has every entry up to the head at restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    while watched.lock().unwrap().last().map_or(0, |e| e.seq) < start.head_seq {
        assert!(Instant::now() < deadline, "the watcher did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    uses_agree_with_the_trail(server, watched, start.head_seq).await;

    let mut m = shared.model.lock().unwrap().clone_for_check();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut agent = server.as_(AGENT).await;
    // Values, or the rotation in flight.
    for (name, (acked, in_flight)) in m.values.iter_mut() {
        let revoked = m.revoked.get(name).copied();
        let lease = orch.lease(lease_req("acme", name, 1)).await;
        match (lease, revoked) {
            (Err(status), Some(_)) if status.code() == Code::FailedPrecondition => {
                assert!(status.message().contains("revoked"), "{name}: {status:?}");
                m.revoked.insert(name.clone(), true);
                continue;
            }
            (Err(status), _) => panic!("{name}: {status:?}"),
            (Ok(_), Some(true)) => panic!("{name}: its revocation was acknowledged"),
            (Ok(grant), _) => {
                let got = agent
                    .get(get_req(&grant.into_inner().token))
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e:?}"))
                    .into_inner()
                    .value;
                assert!(
                    &got == acked || Some(&got) == in_flight.as_ref(),
                    "{name}: acknowledged value lost"
                );
                *acked = got;
                *in_flight = None;
            }
        }
    }
    m.revoked.retain(|_, done| *done);
    // Leases: each used once more, with the answer its acknowledged uses allow.
    let mut reasons: HashMap<String, HashSet<&'static str>> = HashMap::new();
    for lease in &m.leases {
        let used = [
            lease.acked_uses,
            lease.acked_uses + lease.use_in_flight as u32,
        ];
        let mut allowed = HashSet::new();
        if lease.revoked || lease.revoke_in_flight {
            allowed.insert("lease revoked");
        }
        if used.iter().any(|&u| u >= lease.max_uses) {
            allowed.insert("lease used up");
        }
        match agent.get(get_req(&lease.token)).await {
            Ok(value) => {
                let left = value.into_inner().remaining_uses;
                assert!(
                    !lease.revoked
                        && used
                            .iter()
                            .any(|&u| u < lease.max_uses && left == lease.max_uses - u - 1),
                    "{left} uses left of {lease:?}"
                );
            }
            Err(status) => {
                assert_eq!(status.code(), Code::NotFound, "{lease:?}: {status:?}");
                assert!(!allowed.is_empty(), "{lease:?} refused");
                reasons.insert(lease.lease_id.clone(), allowed);
            }
        }
    }
    // Why each lease was refused: the audit trail's reason must be one its history allows
    // (a used-up single-use lease is not "expired" or "rotated").
    let refusals = audit_all(
        server,
        pb::AuditRequest {
            action: "Get".into(),
            outcome: "NOT_FOUND".into(),
            ..Default::default()
        },
    )
    .await;
    for (lease_id, allowed) in &reasons {
        let entry = refusals
            .iter()
            .rev()
            .find(|e| &e.lease_id == lease_id && e.seq > start.head_seq)
            .unwrap_or_else(|| panic!("no refusal recorded for {lease_id}"));
        assert!(
            allowed.contains(entry.reason.as_str()),
            "{lease_id}: refused as {:?}, allowed {allowed:?}",
            entry.reason
        );
    }

    // The watcher has every entry up to the head at restart (see above), and so every
    // acknowledged write's entry.
    {
        let watched = watched.lock().unwrap();
        assert_eq!(watched.first().map(|e| e.seq), Some(1));
        let mut found: HashMap<Entry, usize> = HashMap::new();
        for entry in watched.iter().filter_map(Entry::of) {
            *found.entry(entry).or_default() += 1;
        }
        for (entry, count) in &m.expected {
            let got = found.get(entry).copied().unwrap_or(0);
            assert!(
                got >= *count,
                "{entry:?}: {count} acknowledged, {got} entries"
            );
        }
    }
    // No effect without its entry, and no entry without its effect: the secrets the vault
    // holds are exactly those with a Store entry, at the version of their last Rotate entry.
    let mut listed = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = orch
            .list(pb::ListRequest {
                tenant: "acme".into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("List")
            .into_inner();
        listed.extend(page.secrets.into_iter().map(|s| (s.name, s.version)));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut recorded: HashMap<String, u32> = HashMap::new();
    for entry in watched.lock().unwrap().iter().filter_map(Entry::of) {
        match entry {
            Entry::Store(name) => {
                recorded.insert(name, 1);
            }
            Entry::Rotate(name, version) => {
                recorded.insert(name, version);
            }
            _ => {}
        }
    }
    assert_eq!(
        listed, recorded,
        "secrets held against the trail's Store and Rotate entries"
    );
    assert_indexes_match_trail(server).await;

    let mut model = shared.model.lock().unwrap();
    model.values = m.values;
    model.revoked = m.revoked;
    // Every lease was used once more: start afresh.
    model.leases.clear();
}

/// Each leased secret's use, counted in the commits that survived the kill (and counted
/// again from the trail where the store lost it), is what the trail records: the entries
/// through `head` as watched since the first (retention has pruned the older ones from the
/// store). Nothing has leased or redeemed since `head`.
async fn uses_agree_with_the_trail(
    server: &TestServer,
    watched: &Arc<Mutex<Vec<pb::AuditEntry>>>,
    head: u64,
) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let entries: Vec<pb::AuditEntry> = watched
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.seq <= head)
        .cloned()
        .collect();
    for i in 0..LEASED {
        let meta = orch
            .describe(secret_ref("acme", &format!("leased-{i}")))
            .await
            .expect("describe")
            .into_inner();
        assert_eq!(
            meta.usage.expect("usage"),
            recount_uses(&entries, &meta.id),
            "leased-{i}: its use against the trail"
        );
    }
}

impl Model {
    /// The parts a check reads and settles.
    fn clone_for_check(&self) -> Model {
        Model {
            values: self.values.clone(),
            revoked: self.revoked.clone(),
            leases: self.leases.clone(),
            expected: self.expected.clone(),
            ..Model::default()
        }
    }
}

/// Queries answered through the audit indexes (one secret, one tenant, one principal, one
/// peer host) and by time list exactly the entries a scan of the whole trail finds: the
/// sealed segments' index files written before the kill and the active segment's index
/// rebuilt at restart agree with the entries that survived.
async fn assert_indexes_match_trail(server: &TestServer) {
    let page = |req: pb::AuditRequest| pb::AuditRequest {
        page_size: 1000,
        ..req
    };
    let trail = audit_all(server, page(pb::AuditRequest::default())).await;
    assert!(trail.len() > 10, "{}", trail.len());
    // Each page of a query is itself audited: compare only the entries that existed when the
    // trail was read.
    let head = trail.last().map_or(0, |e| e.seq);
    let name = trail
        .iter()
        .rev()
        .find(|e| e.action == "Get" && e.outcome == "OK")
        .map(|e| e.name.clone())
        .expect("a redemption");
    let middle = &trail[trail.len() / 2];
    let (since, until) = (middle.time, trail[trail.len() * 3 / 4].time);
    type Wanted = Box<dyn Fn(&pb::AuditEntry) -> bool>;
    let queries: Vec<(&str, pb::AuditRequest, Wanted)> = vec![
        (
            "secret",
            pb::AuditRequest {
                tenant: "acme".into(),
                name: name.clone(),
                ..Default::default()
            },
            Box::new(move |e| e.tenant == "acme" && e.name == name),
        ),
        (
            "tenant",
            pb::AuditRequest {
                tenant: "acme".into(),
                ..Default::default()
            },
            Box::new(|e| e.tenant == "acme"),
        ),
        (
            "principal",
            pb::AuditRequest {
                principal: "agent".into(),
                ..Default::default()
            },
            Box::new(|e| e.principal == "agent"),
        ),
        (
            "peer",
            pb::AuditRequest {
                peer: "127.0.0.1".into(),
                ..Default::default()
            },
            Box::new(|e| e.peer.starts_with("127.0.0.1:")),
        ),
        (
            "time",
            pb::AuditRequest {
                since,
                until,
                ..Default::default()
            },
            Box::new(move |e| {
                let t = micros(&e.time);
                t >= micros(&since) && t < micros(&until)
            }),
        ),
    ];
    for (index, request, wanted) in queries {
        let got = audit_all(server, page(request)).await;
        // Retention may have pruned the oldest entries since the scan.
        let anchor = server
            .as_(AUDITOR)
            .await
            .verify_audit(pb::VerifyAuditRequest {
                max_entries: 1,
                ..Default::default()
            })
            .await
            .expect("VerifyAudit")
            .into_inner()
            .anchor_seq;
        let kept = |s: &u64| *s > anchor && *s <= head;
        let got: Vec<u64> = got.iter().map(|e| e.seq).filter(kept).collect();
        let expected: Vec<u64> = trail
            .iter()
            .filter(|e| wanted(e))
            .map(|e| e.seq)
            .filter(kept)
            .collect();
        assert!(!expected.is_empty(), "{index}");
        if got != expected {
            let missing: Vec<_> = expected.iter().filter(|s| !got.contains(s)).collect();
            let extra: Vec<_> = got.iter().filter(|s| !expected.contains(s)).collect();
            panic!(
                "the {index} index: {} entries, {} by scan; missing {missing:?}, extra {extra:?} \
                 (anchor {anchor}, head {head})",
                got.len(),
                expected.len()
            );
        }
    }
}
