//! Several byokd processes on one PostgreSQL database (`[store] kind = "postgres"`): what one
//! replica writes, the others read at once, a single-use lease is redeemed once whichever
//! replicas race for it, and all of them extend and verify one audit chain.

use crate::harness::*;
use byokd::api::v1 as pb;
use tonic::Code;

/// Replicas on one database, and what they share (kept until the test ends).
pub(crate) struct Replicas {
    pub(crate) servers: Vec<(TestDir, TestServer)>,
    pub(crate) _key_dir: tempfile::TempDir,
    // Dropped last: the servers close their connections first.
    pub(crate) db: PgDatabase,
}

/// Two replicas on one fresh database, sharing one local master key file; `None` without
/// PostgreSQL.
fn replicas() -> Option<Replicas> {
    replicas_with(|config| config)
}

/// [`replicas`], with their configuration changed by `adjust` first.
pub(crate) fn replicas_with(adjust: impl Fn(String) -> String) -> Option<Replicas> {
    Some(replicas_on(PgDatabase::create()?, adjust))
}

/// [`replicas_with`] on `db`.
pub(crate) fn replicas_on(db: PgDatabase, adjust: impl Fn(String) -> String) -> Replicas {
    let shared = tempfile::tempdir().expect("tempdir");
    let key = shared.path().join("master.key");
    // The losers of the races below are failed redemptions: not what is measured here.
    let config = adjust(
        db.replica_config(&key)
            + "\n[limits]\nfailed_get_rate_limit = { per_second = 1000000, burst = 1000000 }\n"
            + "\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let mut servers = Vec::new();
    // One after the other: the first creates the key file and the keyring.
    for _ in 0..2 {
        let dir = TestDir::with_config(&config);
        let server = dir.start();
        servers.push((dir, server));
    }
    Replicas {
        servers,
        _key_dir: shared,
        db,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_writes_the_other_reads_at_once() {
    let Some(replicas) = replicas() else {
        return;
    };
    let servers = &replicas.servers;
    let (a, b) = (&servers[0].1, &servers[1].1);
    let mut on_a = a.as_(ADMIN).await;
    let mut on_b = b.as_(ADMIN).await;
    store(&mut on_a, "acme", "openai", b"sk-replicated-value-0001").await;
    // Described, leased and read on B right away.
    let described = on_b
        .describe(secret_ref("acme", "openai"))
        .await
        .expect("describe on B")
        .into_inner();
    assert_eq!(described.version, 1);
    let value = lease_and_get(b, "acme", "openai").await.expect("get on B");
    assert_eq!(value.value, b"sk-replicated-value-0001");
    // A lease issued on B is redeemed on A.
    let grant = lease_ok(
        &mut b.as_(ORCHESTRATOR).await,
        lease_req("acme", "openai", 5),
    )
    .await;
    remember_secret(grant.token.as_bytes());
    let got = redeem(a, AGENT, &grant.token).await.expect("get on A");
    assert_eq!(got.value, b"sk-replicated-value-0001");
    // A rotation on B is what A serves next; a revocation on A is in force on B.
    on_b.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "openai".into(),
        value: b"sk-replicated-value-0002".to_vec(),
        ..Default::default()
    })
    .await
    .expect("rotate on B");
    let value = lease_and_get(a, "acme", "openai").await.expect("get on A");
    assert_eq!(value.value, b"sk-replicated-value-0002");
    let grant = lease_ok(
        &mut b.as_(ORCHESTRATOR).await,
        lease_req("acme", "openai", 5),
    )
    .await;
    remember_secret(grant.token.as_bytes());
    on_a.revoke(revoke_secret("acme", "openai", "replica test"))
        .await
        .expect("revoke on A");
    assert_status(redeem(b, AGENT, &grant.token).await, Code::NotFound, "");
    let lease = b
        .as_(ORCHESTRATOR)
        .await
        .lease(lease_req("acme", "openai", 1))
        .await;
    assert_status(lease, Code::FailedPrecondition, "");
}

/// A lease B has redeemed is one B answers later Gets of from what it knows (its redemption
/// cache, `store/postgres/redemptions.rs`): whatever ends it on A is in force on B at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_one_replica_knows_stops_working_there_when_another_ends_it() {
    let Some(replicas) = replicas() else {
        return;
    };
    let servers = &replicas.servers;
    let (a, b) = (&servers[0].1, &servers[1].1);
    let mut on_a = a.as_(ADMIN).await;
    store(&mut on_a, "acme", "openai", b"sk-known-lease-value-0001").await;
    let mut orchestrator_b = b.as_(ORCHESTRATOR).await;
    // Redeemed on B twice: B knows the lease, its secret and its envelope.
    let known = lease_ok(&mut orchestrator_b, lease_req("acme", "openai", 10)).await;
    for _ in 0..2 {
        let got = redeem(b, AGENT, &known.token).await.expect("get on B");
        assert_eq!(got.value, b"sk-known-lease-value-0001");
    }
    let cached = sample(
        &scrape(&ops_addr(b)).await,
        "byokd_store_redemption_reads_total{source=\"cache\"}",
    );
    assert!(cached >= 1.0, "B answered no Get from its cache");
    // Rotated on A: B refuses the old lease and serves the new value on a new one.
    on_a.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "openai".into(),
        value: b"sk-known-lease-value-0002".to_vec(),
        ..Default::default()
    })
    .await
    .expect("rotate on A");
    assert_status(redeem(b, AGENT, &known.token).await, Code::NotFound, "");
    let rotated = lease_ok(&mut orchestrator_b, lease_req("acme", "openai", 10)).await;
    for _ in 0..2 {
        let got = redeem(b, AGENT, &rotated.token).await.expect("get on B");
        assert_eq!(got.value, b"sk-known-lease-value-0002");
    }
    // Uses consumed on A count on B: a lease of 3 uses, 2 taken on B and 1 on A.
    let counted = lease_ok(&mut orchestrator_b, lease_req("acme", "openai", 3)).await;
    for _ in 0..2 {
        redeem(b, AGENT, &counted.token).await.expect("get on B");
    }
    redeem(a, AGENT, &counted.token)
        .await
        .expect("last use on A");
    assert_status(redeem(b, AGENT, &counted.token).await, Code::NotFound, "");
    // The lease revoked on A.
    on_a.revoke(revoke_lease(&rotated.lease_id))
        .await
        .expect("revoke the lease on A");
    assert_status(redeem(b, AGENT, &rotated.token).await, Code::NotFound, "");
    // The secret revoked on A.
    let last = lease_ok(&mut orchestrator_b, lease_req("acme", "openai", 10)).await;
    redeem(b, AGENT, &last.token).await.expect("get on B");
    on_a.revoke(revoke_secret("acme", "openai", "known lease test"))
        .await
        .expect("revoke on A");
    assert_status(redeem(b, AGENT, &last.token).await, Code::NotFound, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotate_or_revoke_on_one_replica_drops_the_keys_the_other_cached() {
    let Some(replicas) = replicas() else {
        return;
    };
    let servers = &replicas.servers;
    let (a, b) = (&servers[0].1, &servers[1].1);
    let cached_on_b = || async { sample(&scrape(&ops_addr(b)).await, "byokd_data_key_cache_keys") };
    let mut on_a = a.as_(ADMIN).await;
    store(&mut on_a, "acme", "openai", b"sk-cached-value-000000001").await;
    store(&mut on_a, "acme", "other", b"sk-cached-value-000000002").await;
    for name in ["openai", "other"] {
        lease_and_get(b, "acme", name).await.expect("get on B");
    }
    assert_eq!(cached_on_b().await, 2.0, "B holds both data keys");
    // A Rotate on A destroys version 1's key: B drops it (and only it) from memory.
    on_a.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "openai".into(),
        value: b"sk-cached-value-000000003".to_vec(),
        ..Default::default()
    })
    .await
    .expect("rotate on A");
    wait_for_cached(b, 1.0).await;
    let value = lease_and_get(b, "acme", "openai").await.expect("get on B");
    assert_eq!(value.value, b"sk-cached-value-000000003");
    assert_eq!(cached_on_b().await, 2.0);
    // A Revoke on A: B holds no key of that secret any more.
    on_a.revoke(revoke_secret("acme", "openai", "cache test"))
        .await
        .expect("revoke on A");
    wait_for_cached(b, 1.0).await;
    let value = lease_and_get(b, "acme", "other").await.expect("get on B");
    assert_eq!(value.value, b"sk-cached-value-000000002");
}

/// Waits (up to 10 s) until `server` holds `keys` data keys in its cache.
async fn wait_for_cached(server: &TestServer, keys: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let held = sample(
            &scrape(&ops_addr(server)).await,
            "byokd_data_key_cache_keys",
        );
        if held == keys {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cache holds {held} keys, not {keys}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_runs_on_one_replica_and_a_rewrap_resumes_on_another_when_it_dies() {
    use crate::rotation::{assert_all_readable, rotate, status, value, wait_done};
    // Turns of 3 s; a rewrap paced at one key per 50 ms, so that the kill lands inside it.
    let Some(mut replicas) = replicas_with(|config| {
        config
            .replace("pool_size = 4\n", "pool_size = 4\njob_turn = \"3s\"\n")
            .replace(
                "[master_key]\n",
                "[master_key]\nrewrap_batch = 1\nrewrap_pause = \"50ms\"\n",
            )
    }) else {
        return;
    };
    let held = |server: &TestServer| {
        let ops = ops_addr(server);
        async move { sample(&scrape(&ops).await, "byokd_background_turn_held") }
    };
    {
        let (a, b) = (&replicas.servers[0].1, &replicas.servers[1].1);
        // A started first and took the turn; B waits for it to lapse.
        assert_eq!((held(a).await, held(b).await), (1.0, 0.0));
        let mut admin = a.as_(ADMIN).await;
        for i in 0..60 {
            store(&mut admin, "acme", &format!("k{i}"), &value(i)).await;
        }
    }
    // With several replicas, the operator gives every one the new version's key file first.
    let key_v2 = replicas._key_dir.path().join("master.key.v2");
    std::fs::write(&key_v2, [0x5a; 32]).unwrap();
    std::fs::set_permissions(&key_v2, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // Started on B, which does not hold the turn: A runs the job.
    let job = rotate(&replicas.servers[1].1).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let progress = loop {
        let s = status(&replicas.servers[1].1, &job.job_id).await;
        assert!(!s.done, "the job finished before A could be killed: {s:?}");
        if s.rewrapped >= 5 {
            break s.rewrapped;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A did not run the job"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let (_dir_a, a) = replicas.servers.remove(0);
    assert!(a.log().contains("this process took the turn"));
    a.kill9();
    // B takes the lapsed turn and finishes the job where A left it.
    let b = &replicas.servers[0].1;
    let done = wait_done(b, &job.job_id).await;
    assert!(
        done.rewrapped >= progress && done.rewrapped >= 60,
        "{done:?}"
    );
    assert_eq!(held(b).await, 1.0);
    let text = scrape(&ops_addr(b)).await;
    assert_eq!(sample(&text, "byokd_background_turns_taken_total"), 1.0);
    assert!(
        b.log()
            .contains("resuming the unfinished master key rotation")
    );
    // Every value, its data key now wrapped by version 2, reads on B.
    assert_all_readable(b, 60).await;
    verify(b, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_lease_raced_from_two_replicas_is_redeemed_once() {
    let Some(replicas) = replicas() else {
        return;
    };
    let servers = &replicas.servers;
    let (a, b) = (&servers[0].1, &servers[1].1);
    store(
        &mut a.as_(ADMIN).await,
        "acme",
        "raced",
        b"sk-raced-value-000001",
    )
    .await;
    let mut orchestrator = a.as_(ORCHESTRATOR).await;
    let (agent_a, agent_b) = (a.as_(AGENT).await, b.as_(AGENT).await);
    const RACES: usize = 1000;
    let mut wins = 0;
    for _ in 0..RACES {
        let grant = lease_ok(&mut orchestrator, lease_req("acme", "raced", 1)).await;
        remember_secret(grant.token.as_bytes());
        let (mut x, mut y) = (agent_a.clone(), agent_b.clone());
        let (ra, rb) = tokio::join!(x.get(get_req(&grant.token)), y.get(get_req(&grant.token)));
        let won: Vec<bool> = [ra, rb]
            .into_iter()
            .map(|r| match r {
                Ok(v) => {
                    assert_eq!(v.into_inner().value, b"sk-raced-value-000001");
                    true
                }
                Err(s) => {
                    assert_eq!(s.code(), Code::NotFound, "{s:?}");
                    false
                }
            })
            .collect();
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
        wins += 1;
    }
    assert_eq!(wins, RACES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_writing_at_once_extend_one_chain_that_each_verifies() {
    let Some(replicas) = replicas() else {
        return;
    };
    let servers = &replicas.servers;
    let mut tasks = Vec::new();
    for (i, (_, server)) in servers.iter().enumerate() {
        for j in 0..32 {
            let mut client = server.as_(ADMIN).await;
            tasks.push(tokio::spawn(async move {
                client
                    .store(store_req(
                        "acme",
                        &format!("r{i}-{j}"),
                        b"sk-chain-value-000001",
                    ))
                    .await
                    .map(drop)
            }));
        }
    }
    for task in tasks {
        task.await.unwrap().expect("store");
    }
    // Each replica verifies the whole chain, and finds there the head the other one reported
    // (each VerifyAudit is itself audited, so the heads move on by one entry each time).
    let (a, b) = (&servers[0].1, &servers[1].1);
    let on_a = verify(a, None).await;
    let on_b = verify(b, Some(on_a.clone())).await;
    assert_eq!(
        on_b.0,
        on_a.0 + 1,
        "B's head is A's plus A's VerifyAudit entry"
    );
    let again_on_a = verify(a, Some(on_b.clone())).await;
    assert_eq!(again_on_a.0, on_b.0 + 1);
    let heads = [on_a];
    // 64 stores, each one entry, after the start-up entries of both replicas.
    assert!(heads[0].0 >= 64, "{heads:?}");
    let entries = audit_all(&servers[1].1, pb::AuditRequest::default()).await;
    let stores = entries.iter().filter(|e| e.action == "Store").count();
    assert_eq!(stores, 64);
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap-free: {seqs:?}"
    );
}

/// VerifyAudit of the whole chain on `server`, which must find `expected` (a head another
/// replica reported) in it: the head it reports.
pub(crate) async fn verify(server: &TestServer, expected: Option<(u64, String)>) -> (u64, String) {
    let (expected_head_seq, expected_head_hash) = expected.unwrap_or_default();
    let report = server
        .as_(AUDITOR)
        .await
        .verify_audit(pb::VerifyAuditRequest {
            expected_head_seq,
            expected_head_hash,
            ..Default::default()
        })
        .await
        .expect("verify")
        .into_inner();
    assert!(report.ok && report.first_bad_seq == 0, "{report:?}");
    (report.head_seq, report.head_hash)
}

/// `byokd migrate`: several at once on a fresh database apply each migration once and all
/// succeed; run again, it has nothing to do; a server then starts on the schema; with sled
/// there is nothing to migrate.
#[test]
fn byokd_migrate_applies_the_schema_once_however_many_run_it() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let shared = tempfile::tempdir().expect("tempdir");
    let dir = TestDir::with_config(&db.replica_config(&shared.path().join("master.key")));
    let config = dir.config().to_string_lossy().into_owned();
    let runs: Vec<(i32, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| byokd(dir.path(), &["migrate", "--config", &config], "")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(runs.iter().all(|(code, _)| *code == 0), "{runs:?}");
    let applied = runs
        .iter()
        .filter(|(_, out)| out.contains("schema byokd: applied migrations 1"))
        .count();
    let up_to_date = runs
        .iter()
        .filter(|(_, out)| out.contains("schema byokd is up to date"))
        .count();
    assert_eq!((applied, up_to_date), (1, 2), "{runs:?}");
    let (code, again) = byokd(dir.path(), &["migrate", "--config", &config], "");
    assert_eq!(code, 0, "{again}");
    assert!(again.contains("is up to date"), "{again}");
    let server = dir.start();
    drop(server);
    // No password in what it prints when the database cannot be reached.
    let unreachable = TestDir::with_config(
        "[store]\nkind = \"postgres\"\nurl = \"postgres://byokd:hunter2@127.0.0.1:1/byokd\"\n",
    );
    let (code, out) = byokd(
        unreachable.path(),
        &[
            "migrate",
            "--config",
            &unreachable.config().to_string_lossy(),
        ],
        "",
    );
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    let sled = TestDir::new();
    let (code, out) = byokd(
        sled.path(),
        &["migrate", "--config", &sled.config().to_string_lossy()],
        "",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to do"), "{out}");
}

/// WatchAudit on one replica streams the other's entries too, in order and without gaps,
/// and goes on after the database ends its LISTEN connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_audit_on_one_replica_streams_every_replicas_entries_in_order() {
    use tokio_stream::StreamExt;
    let Some(replicas) = replicas() else {
        return;
    };
    let (a, b) = (&replicas.servers[0].1, &replicas.servers[1].1);
    let mut watch = b
        .as_(AUDITOR)
        .await
        .watch_audit(pb::WatchAuditRequest {
            action: "Store".into(),
            // A Store refused during the failover is audited too (and then retried).
            outcome: "OK".into(),
            ..Default::default()
        })
        .await
        .expect("watch on B")
        .into_inner();
    let mut on_a = a.as_(ADMIN).await;
    let mut on_b = b.as_(ADMIN).await;
    let mut stored = Vec::new();
    let mut seen = Vec::new();
    let mut seqs = Vec::new();
    // First only A writes: B learns of A's entries from the database alone. Then, after a
    // failover-like end of every connection, both write.
    for phase in 0..2 {
        if phase == 1 {
            replicas.db.terminate_connections();
        }
        for i in 0..10 {
            let client = if phase == 0 || i % 2 == 0 {
                &mut on_a
            } else {
                &mut on_b
            };
            let name = format!("w{phase}-{i}");
            // Right after the failover a replica's pooled connection may still be found
            // dead: UNAVAILABLE, retry (as a client does).
            let mut attempts = 0;
            while let Err(status) = client
                .store(store_req("acme", &name, b"sk-watched-value-0001"))
                .await
            {
                attempts += 1;
                assert!(
                    status.code() == Code::Unavailable && attempts < 3,
                    "{status:?}"
                );
            }
            stored.push(name);
        }
        while seen.len() < stored.len() {
            let entry = tokio::time::timeout(std::time::Duration::from_secs(20), watch.next())
                .await
                .expect("an entry within 20 s")
                .expect("stream open")
                .expect("entry");
            seqs.push(entry.seq);
            seen.push(entry.name);
        }
    }
    assert_eq!(seen, stored);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // B's feed noticed that its LISTEN connection ended, and listened again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !b.log().contains("audit feed: the LISTEN connection ended") {
        assert!(std::time::Instant::now() < deadline, "no reconnect logged");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// What an operator of replicas watches: commit group sizes, the wait for the cluster-wide
/// commit order, the read pool, LISTEN reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reports_its_commit_groups_order_wait_and_pool() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let shared = tempfile::tempdir().expect("tempdir");
    let dir = TestDir::with_config(
        &(db.replica_config(&shared.path().join("master.key"))
            + "\n[metrics]\nlisten = \"127.0.0.1:0\"\n"),
    );
    let server = dir.start();
    let mut admin = server.as_(ADMIN).await;
    for i in 0..5 {
        store(
            &mut admin,
            "acme",
            &format!("m{i}"),
            b"sk-metrics-value-0001",
        )
        .await;
    }
    let ops = ops_addr(&server);
    // The pool's gauges follow the feed's one-second tick.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = scrape(&ops).await;
        let open = "byokd_store_pool_connections{state=\"open\"}";
        if text.contains(open) && sample(&text, open) >= 1.0 {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // Five Stores and the start-up's commits, each group at least one commit.
    assert!(
        sample(&text, "byokd_store_group_commits_count") >= 5.0,
        "{text}"
    );
    assert!(
        sample(&text, "byokd_store_group_commits_sum")
            >= sample(&text, "byokd_store_group_commits_count")
    );
    assert!(sample(&text, "byokd_store_commit_order_wait_seconds_count") >= 5.0);
    assert!(sample(&text, "byokd_store_pool_connections{state=\"idle\"}") >= 0.0);
    assert_eq!(sample(&text, "byokd_store_listen_reconnects_total"), 0.0);
    assert_eq!(
        sample(&text, "byokd_store_commits_refused_stalled_total"),
        0.0
    );
}

/// Moving a single node to PostgreSQL and back: `byokd backup` from the sled server, `byokd
/// restore` into the database (only an empty one), and the same from a replica into a new
/// sled data directory. Every value reads and the chain verifies against the same head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_backup_restores_into_postgresql_and_back() {
    use crate::ops::restore;
    use crate::rotation::{assert_all_readable, value};
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let sled = TestDir::new();
    let server = sled.start();
    let mut admin = server.as_(ADMIN).await;
    for i in 0..10 {
        store(&mut admin, "acme", &format!("k{i}"), &value(i)).await;
    }
    admin
        .revoke(revoke_secret("acme", "k10", "not there"))
        .await
        .expect_err("no such secret");
    store(&mut admin, "acme", "gone", b"sk-revoked-before-the-move-01").await;
    admin
        .revoke(revoke_secret("acme", "gone", "revoked before the move"))
        .await
        .expect("revoke");
    let to_pg = sled.path().join("sled.backup");
    let (code, out) = backup_cli(&server, &sled, &to_pg).await;
    assert_eq!(code, 0, "{out}");
    let head = verify(&server, None).await;
    assert!(server.stop().await.success());

    // Into PostgreSQL, with the same master key file.
    let key = sled.data().join("master.key");
    let pg = TestDir::with_config(&db.replica_config(&key));
    let (code, out) = restore(&pg, &to_pg);
    assert_eq!(code, 0, "{out}");
    let (code, out) = restore(&pg, &to_pg);
    assert_ne!(
        code, 0,
        "a second restore went into a schema that holds records"
    );
    assert!(out.contains("holds records"), "{out}");
    let replica = pg.start();
    assert_all_readable(&replica, 10).await;
    let lease = replica
        .as_(ORCHESTRATOR)
        .await
        .lease(lease_req("acme", "gone", 1))
        .await;
    assert_status(lease, Code::FailedPrecondition, "");
    verify(&replica, Some(head.clone())).await;

    // And back, into a new sled data directory that holds only the master key.
    let to_sled = pg.path().join("pg.backup");
    let (code, out) = backup_cli(&replica, &pg, &to_sled).await;
    assert_eq!(code, 0, "{out}");
    let head = verify(&replica, None).await;
    assert!(replica.stop().await.success());
    let single = TestDir::new();
    std::fs::create_dir(single.data()).unwrap();
    std::fs::set_permissions(
        single.data(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::fs::copy(&key, single.data().join("master.key")).unwrap();
    let (code, out) = restore(&single, &to_sled);
    assert_eq!(code, 0, "{out}");
    let server = single.start();
    assert_all_readable(&server, 10).await;
    verify(&server, Some(head)).await;
}

/// A restore that fails its checks (here: a damaged backup file) leaves the database as it
/// was: empty, so that the next restore can go in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_into_postgresql_leaves_the_schema_empty() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let sled = TestDir::new();
    let server = sled.start();
    store(
        &mut server.as_(ADMIN).await,
        "acme",
        "k",
        b"sk-a-value-for-the-restore-01",
    )
    .await;
    let backup = sled.path().join("sled.backup");
    let (code, out) = backup_cli(&server, &sled, &backup).await;
    assert_eq!(code, 0, "{out}");
    assert!(server.stop().await.success());
    let mut bytes = std::fs::read(&backup).unwrap();
    let at = bytes.len() * 2 / 3;
    bytes[at] ^= 0x01;
    let damaged = sled.path().join("damaged.backup");
    std::fs::write(&damaged, bytes).unwrap();
    let pg = TestDir::with_config(&db.replica_config(&sled.data().join("master.key")));
    let (code, out) = crate::ops::restore(&pg, &damaged);
    assert_ne!(code, 0, "{out}");
    // Nothing was left behind: the intact file restores into the same database.
    let (code, out) = crate::ops::restore(&pg, &backup);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("into the PostgreSQL schema byokd"), "{out}");
    let replica = pg.start();
    let value = lease_and_get(&replica, "acme", "k").await.expect("get");
    assert_eq!(value.value, b"sk-a-value-for-the-restore-01");
}

/// Quotas hold for the cluster, not per replica: the tenant's usage lives in the database
/// and each commit is checked against it under the cluster's commit order. Stores and
/// Leases raced from two replicas stop exactly at the quota; a revocation on one replica
/// makes room on the other; every replica reports the cluster's lease records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quotas_hold_for_the_cluster_when_replicas_race() {
    let Some(replicas) = replicas_with(|config| {
        config + "\n[quotas]\nmax_secrets_per_tenant = 10\nmax_leases_per_tenant = 6\n"
    }) else {
        return;
    };
    let servers = &replicas.servers;
    let (a, b) = (&servers[0].1, &servers[1].1);
    let mut admins = [a.as_(ADMIN).await, b.as_(ADMIN).await];
    // 2 x 15 Stores at once, alternating replicas.
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let mut admin = admins[i % 2].clone();
            tokio::spawn(async move {
                admin
                    .store(store_req(
                        "acme",
                        &format!("s{i}"),
                        b"sk-quota-value-0123456789",
                    ))
                    .await
            })
        })
        .collect();
    let (mut stored, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => stored += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("tenant acme is at its quota of 10 secrets"),
                    "{status:?}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((stored, refused), (10, 20));
    let listed = admins[1]
        .list(pb::ListRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.secrets.len(), 10);
    // A revocation on A makes room for one Store on B, and only one.
    let first = listed.secrets[0].name.clone();
    admins[0]
        .revoke(revoke_secret("acme", &first, "make room"))
        .await
        .unwrap();
    store(
        &mut admins[1],
        "acme",
        "after-revoke",
        b"sk-quota-value-0123456789",
    )
    .await;
    assert_status(
        admins[0]
            .store(store_req(
                "acme",
                "one-too-many",
                b"sk-quota-value-0123456789",
            ))
            .await,
        Code::ResourceExhausted,
        "quota of 10 secrets",
    );
    // 2 x 6 Leases at once: exactly six lease records.
    let orchestrators = [a.as_(ORCHESTRATOR).await, b.as_(ORCHESTRATOR).await];
    let name = listed.secrets[1].name.clone();
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let mut client = orchestrators[i % 2].clone();
            let req = lease_req("acme", &name, 1);
            tokio::spawn(async move { client.lease(req).await })
        })
        .collect();
    let mut leased = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => leased += 1,
            Err(status) => assert!(
                status.code() == Code::ResourceExhausted
                    && status.message().contains("quota of 6 leases"),
                "{status:?}"
            ),
        }
    }
    assert_eq!(leased, 6);
    // Each replica reports the cluster's lease records, whichever issued them.
    for server in [a, b] {
        let text = scrape(&ops_addr(server)).await;
        assert_eq!(sample(&text, "byokd_leases_held"), 6.0, "{text}");
    }
}

/// Master-key rotation with AWS KMS across replicas: each version is a key id every replica
/// can reach, so nothing is copied. A is restarted with the new key configured and rotates;
/// the rewrap runs on B (which holds the turn and is still configured with the old key), B
/// opens the new version by the key id the keyring records, and every value reads on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_kms_rotation_runs_across_replicas_configured_with_either_key() {
    use crate::rotation::{assert_all_readable, rotate, value, wait_done};
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let moto = Moto::start();
    let (old_key, new_key) = (moto.create_key().await, moto.create_key().await);
    let config_for = |key: &str| {
        let store = db.replica_config(std::path::Path::new("unused"));
        let store = store
            .split("[master_key]")
            .next()
            .unwrap_or_default()
            .to_string();
        store.replace("pool_size = 4\n", "pool_size = 4\njob_turn = \"3s\"\n")
            + &moto.master_key_config(key, "")
            + "\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
    };
    let held = |server: &TestServer| {
        let ops = ops_addr(server);
        async move { sample(&scrape(&ops).await, "byokd_background_turn_held") }
    };
    let dir_a = TestDir::with_config(&config_for(&old_key));
    let a = dir_a.start();
    let dir_b = TestDir::with_config(&config_for(&old_key));
    let b = dir_b.start();
    let mut admin = a.as_(ADMIN).await;
    for i in 0..30 {
        store(&mut admin, "acme", &format!("k{i}"), &value(i)).await;
    }
    // The operator moves A to the new key. B takes the turn A gave up (before A is back, so
    // that A cannot take it first), and keeps it.
    assert!(a.stop().await.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while held(&b).await != 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "B did not take the turn"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    dir_a.rewrite_config(&config_for(&new_key));
    let a = dir_a.start();
    let job = rotate(&a).await;
    assert_eq!(job.new_key_version, 2);
    let done = wait_done(&b, &job.job_id).await;
    assert!(done.rewrapped >= 30, "{done:?}");
    assert!(
        b.log()
            .contains("resuming the unfinished master key rotation")
            && !a
                .log()
                .contains("resuming the unfinished master key rotation"),
        "the rewrap ran elsewhere than on B"
    );
    // B opened the version A made, by its key id, without being configured with it.
    assert!(
        b.log()
            .lines()
            .any(|l| l.contains("master key version opened") && l.contains(&new_key)),
        "{}",
        b.log()
    );
    assert_all_readable(&b, 30).await;
    assert_all_readable(&a, 30).await;
    // A new value stored on B (its data key wrapped by the new version) reads on A.
    store(
        &mut b.as_(ADMIN).await,
        "acme",
        "after",
        b"sk-after-rotation-0123456789",
    )
    .await;
    let got = lease_and_get(&a, "acme", "after").await.unwrap();
    assert_eq!(got.value, b"sk-after-rotation-0123456789");
    // B's verification finds A's head in the chain it verifies.
    let head = verify(&a, None).await;
    verify(&b, Some(head)).await;
}

/// A binding (allowed readers) changed on one replica is in force on the other at once, both
/// ways, whatever the other's redemption cache holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_changed_on_one_replica_is_in_force_on_the_other_at_once() {
    let Some(replicas) = replicas() else {
        return;
    };
    let servers = &replicas.servers;
    let (a, b) = (&servers[0].1, &servers[1].1);
    let mut on_a = a.as_(ORCHESTRATOR).await;
    let bound = pb::StoreRequest {
        allowed_readers: vec!["agent2".into()],
        ..store_req("acme", "bound", b"sk-bound-replica-value-01")
    };
    on_a.store(bound).await.expect("store");
    let grant = lease_ok(
        &mut b.as_(ORCHESTRATOR).await,
        lease_req("acme", "bound", 10),
    )
    .await;
    // B reads and knows the lease and the secret; the agent is refused there.
    redeem(b, AGENT2, &grant.token)
        .await
        .expect("allowed reader on B");
    assert_status(redeem(b, AGENT, &grant.token).await, Code::NotFound, "");
    let update = |readers: Vec<String>| pb::UpdateSecretRequest {
        tenant: "acme".into(),
        name: "bound".into(),
        allowed_readers: readers,
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["allowed_readers".into()],
        }),
        ..Default::default()
    };
    // Cleared on A: the agent redeems on B at once.
    on_a.update_secret(update(Vec::new())).await.expect("clear");
    redeem(b, AGENT, &grant.token)
        .await
        .expect("any reader on B now");
    // Bound again on A: refused on B at once.
    on_a.update_secret(update(vec!["agent2".into()]))
        .await
        .expect("bind");
    assert_status(redeem(b, AGENT, &grant.token).await, Code::NotFound, "");
    redeem(b, AGENT2, &grant.token)
        .await
        .expect("allowed reader on B");
}
