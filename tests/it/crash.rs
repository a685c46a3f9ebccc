//! Crash test: store, rotate and get load, `kill -9` at random points, restart, and check that
//! nothing acknowledged was lost. `BYOKD_CRASH_KILLS` kills (default 3; `scripts/crash-test.sh`
//! runs 25).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use byokd::api::v1::{self as pb};
use tonic::Code;

use crate::harness::*;

#[derive(Default)]
struct State {
    /// Acknowledged value of each secret, and a rotation that was in flight at the kill.
    values: HashMap<String, (Vec<u8>, Option<Vec<u8>>)>,
    /// Single-use lease tokens whose one use was acknowledged.
    consumed: Vec<String>,
    /// Acknowledged writes, for the report.
    acked: u64,
}

fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_and_uses_survive_repeated_kill_9() {
    let kills: usize = std::env::var("BYOKD_CRASH_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(3);
    let mut seed: u64 = std::env::var("BYOKD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test: {kills} kills, BYOKD_CRASH_SEED={seed}");
    // 256 KiB audit segments: kills land while segments fill, seal and start anew.
    let dir = TestDir::with_config(
        "[store]\naudit_segment_kb = 256\n\
         [limits]\nfailed_get_rate_limit = { per_second = 100000, burst = 100000 }\n",
    );
    let state = Arc::new(Mutex::new(State::default()));
    for round in 0..kills {
        let server = dir.start();
        verify(&server, &state).await;
        let acked_before = state.lock().unwrap().acked;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..4 {
            let (addr, state, stop) = (server.addr, state.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = connect(addr, Some(ORCHESTRATOR)).await;
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("r{round}-w{w}-{i}");
                    let value = format!("sk-crash-{name}-0123456789abcdef").into_bytes();
                    i += 1;
                    if c.store(store_req("acme", &name, &value)).await.is_err() {
                        return;
                    }
                    let mut s = state.lock().unwrap();
                    s.values.insert(name, (value, None));
                    s.acked += 1;
                }
            }));
        }
        for w in 0..2 {
            let (addr, state, stop) = (server.addr, state.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = connect(addr, Some(ORCHESTRATOR)).await;
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Each rotator owns the names whose hash is its number: one writer per name.
                    let pick = {
                        let s = state.lock().unwrap();
                        let mut names: Vec<&String> =
                            s.values.keys().filter(|k| k.len() % 2 == w).collect();
                        names.sort();
                        names
                            .get((n as usize * 7919) % names.len().max(1))
                            .map(|s| s.to_string())
                    };
                    n += 1;
                    let Some(name) = pick else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let value = format!("sk-crash-rotated-{name}-{n}-0123456789").into_bytes();
                    remember_secret(&value);
                    state.lock().unwrap().values.get_mut(&name).unwrap().1 = Some(value.clone());
                    let req = pb::RotateRequest {
                        tenant: "acme".into(),
                        name: name.clone(),
                        value: value.clone(),
                    };
                    if c.rotate(req).await.is_err() {
                        return;
                    }
                    let mut s = state.lock().unwrap();
                    *s.values.get_mut(&name).unwrap() = (value, None);
                    s.acked += 1;
                }
            }));
        }
        for _ in 0..2 {
            let (addr, state, stop) = (server.addr, state.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut orch = connect(addr, Some(ORCHESTRATOR)).await;
                let mut agent = connect(addr, Some(AGENT)).await;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = state.lock().unwrap().values.keys().next().cloned();
                    let Some(name) = name else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let Ok(grant) = orch.lease(lease_req("acme", &name, 1)).await else {
                        return;
                    };
                    let grant = grant.into_inner();
                    match agent.get(get_req(&grant.token)).await {
                        Ok(_) => state.lock().unwrap().consumed.push(grant.token),
                        Err(s) if s.code() == Code::NotFound => {} // rotated in between
                        Err(_) => return,
                    }
                }
            }));
        }
        // Enough writes per round that the trail crosses segments whatever the machine's
        // speed, then a random moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while state.lock().unwrap().acked < acked_before + 150 {
            assert!(
                std::time::Instant::now() < deadline,
                "no progress in round {round}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delay = 150 + lcg(&mut seed) % 550;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    }
    let server = dir.start();
    verify(&server, &state).await;
    let s = state.lock().unwrap();
    // The kills landed on a trail that kept starting new segments (and sealing full ones).
    let segments = std::fs::read_dir(dir.path().join("data/db/audit"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("log".as_ref()))
        .count();
    eprintln!(
        "crash test: {} acknowledged writes, {} secrets, {} consumed leases survived {kills} kills \
         ({segments} audit segments)",
        s.acked,
        s.values.len(),
        s.consumed.len()
    );
    assert!(s.acked > 0 && !s.consumed.is_empty());
    assert!(segments >= 2, "{segments} audit segments");
}

/// Everything acknowledged is there after a restart, no consumed use is back, and the audit
/// chain verifies.
async fn verify(server: &TestServer, state: &Arc<Mutex<State>>) {
    let (values, consumed) = {
        let s = state.lock().unwrap();
        (s.values.clone(), s.consumed.clone())
    };
    let mut settled = HashMap::new();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let mut agent = server.as_(AGENT).await;
    for (name, (acked, inflight)) in values {
        let grant = lease_ok(&mut orch, lease_req("acme", &name, 1)).await;
        let got = agent
            .get(get_req(&grant.token))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
            .into_inner()
            .value;
        assert!(
            got == acked || Some(&got) == inflight.as_ref(),
            "{name}: acknowledged value lost"
        );
        settled.insert(name, (got, None));
    }
    for token in &consumed {
        assert_status(
            agent.get(get_req(token)).await,
            Code::NotFound,
            "no longer valid",
        );
    }
    assert_chain_verifies(server).await;
    assert_indexes_match_trail(server, settled.keys().next()).await;
    let mut s = state.lock().unwrap();
    for (name, value) in settled {
        s.values.insert(name, value);
    }
}

/// Queries answered through the audit indexes (one secret, one principal) list exactly the
/// entries a scan of the whole trail finds: the sealed segments' index files written before the
/// kill and the active segment's index rebuilt at restart agree with the entries that survived.
async fn assert_indexes_match_trail(server: &TestServer, name: Option<&String>) {
    let page = |req: pb::AuditRequest| pb::AuditRequest {
        page_size: 1000,
        ..req
    };
    let trail = audit_all(server, page(pb::AuditRequest::default())).await;
    // Each page of a query is itself audited (an `Audit` entry naming the secret it asked
    // about): compare only the entries that existed when the trail was read.
    let head = trail.last().map_or(0, |e| e.seq);
    let seqs = |entries: Vec<pb::AuditEntry>| {
        entries
            .iter()
            .map(|e| e.seq)
            .filter(|&s| s <= head)
            .collect::<Vec<_>>()
    };
    if let Some(name) = name {
        let by_secret = audit_all(
            server,
            page(pb::AuditRequest {
                tenant: "acme".into(),
                name: name.clone(),
                ..Default::default()
            }),
        )
        .await;
        let expected: Vec<u64> = trail
            .iter()
            .filter(|e| e.tenant == "acme" && &e.name == name)
            .map(|e| e.seq)
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(seqs(by_secret), expected, "secret index of {name}");
    }
    let by_agent = audit_all(
        server,
        page(pb::AuditRequest {
            principal: "agent".into(),
            ..Default::default()
        }),
    )
    .await;
    let expected: Vec<u64> = trail
        .iter()
        .filter(|e| e.principal == "agent")
        .map(|e| e.seq)
        .collect();
    // verify() has just redeemed a lease as the agent for every secret.
    assert_eq!(expected.is_empty(), name.is_none());
    assert_eq!(seqs(by_agent), expected, "principal index of agent");
}
