//! `kill -9` of one of two replicas on one PostgreSQL database, under Store, Rotate and
//! Lease+Get load on both, several times (`BYOKD_REPLICA_KILLS`, default 3;
//! `scripts/replica-kill-test.sh` runs 25). While one is down the other keeps serving; after
//! it restarts:
//! - every acknowledged Store and Rotate reads through both replicas (a rotation whose answer
//!   the kill cut off may have committed or not: either value);
//! - no single-use lease whose redemption was acknowledged works again, on either replica;
//! - VerifyAudit on both reports the same intact head.
//!
//! The same load goes on while PostgreSQL (a server of the test's own) is stopped with
//! `pg_ctl stop -m immediate` and started again: requests fail with UNAVAILABLE meanwhile, the
//! replicas (not restarted) reconnect by themselves, and the same checks hold.
//!
//! A request to the killed replica may fail once it is being killed, and any request with
//! UNAVAILABLE while PostgreSQL is down; any other failure fails the test.
//! `BYOKD_REPLICA_SEED` replays a run's choices.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use byokd::api::v1 as pb;
use tonic::{Code, Status};

use crate::harness::*;
use crate::replicas::{Replicas, replicas_on, replicas_with, verify};

/// No replica is being killed.
const NONE: usize = usize::MAX;
/// The secret the leasers lease: stored once, never rotated.
const LEASED: &str = "leased";

#[derive(Default)]
struct Model {
    /// What a secret may hold: its last acknowledged value, then any written since whose
    /// answer was lost.
    values: HashMap<String, Vec<Vec<u8>>>,
    /// Single-use lease tokens whose redemption was acknowledged.
    redeemed: Vec<String>,
    /// Acknowledged writes (Store, Rotate, Lease, Get).
    acked: u64,
    errors: Vec<String>,
}

/// What the workers of a round share.
#[derive(Clone)]
struct Load {
    model: Arc<Mutex<Model>>,
    addrs: Arc<Vec<SocketAddr>>,
    /// The replica being killed, or `NONE`.
    down: Arc<AtomicUsize>,
    /// PostgreSQL was stopped (UNAVAILABLE is an answer from then on).
    outage: Arc<AtomicBool>,
    /// Requests answered UNAVAILABLE.
    unavailable: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Load {
    /// The answer of a request to replica `at`, or `None` if it failed: because `at` is being
    /// killed (its outcome is unknown), or for another reason (recorded: the test fails).
    fn answer<T>(&self, at: usize, what: &str, r: Result<tonic::Response<T>, Status>) -> Option<T> {
        match r {
            Ok(response) => Some(response.into_inner()),
            Err(_) if self.down.load(Ordering::SeqCst) == at => None,
            Err(e) if e.code() == Code::Unavailable && self.outage.load(Ordering::SeqCst) => {
                self.unavailable.fetch_add(1, Ordering::SeqCst);
                None
            }
            Err(e) => {
                let mut m = self.model.lock().unwrap();
                m.errors.push(format!("{what} on replica {at}: {e:?}"));
                None
            }
        }
    }

    /// A load on `replicas`.
    fn new(model: &Arc<Mutex<Model>>, replicas: &Replicas) -> Self {
        Self {
            model: model.clone(),
            addrs: Arc::new(replicas.servers.iter().map(|(_, s)| s.addr).collect()),
            down: Arc::new(AtomicUsize::new(NONE)),
            outage: Arc::new(AtomicBool::new(false)),
            unavailable: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts the workers: three writers and two leasers.
    fn start(&self, round: usize, seed: u64) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for w in 0..3 {
            let rng = Rng(seed ^ ((round as u64) << 32) ^ (w + 1));
            tasks.push(tokio::spawn(writer(self.clone(), round, w, rng)));
        }
        for w in 0..2 {
            let rng = Rng(seed ^ ((round as u64) << 32) ^ (w + 100));
            tasks.push(tokio::spawn(leaser(self.clone(), rng)));
        }
        tasks
    }

    /// Acknowledged writes so far.
    fn acked(&self) -> u64 {
        self.model.lock().unwrap().acked
    }

    /// Waits (up to `within`) for `more` acknowledged writes.
    async fn progress(&self, more: u64, within: Duration, what: &str) {
        let target = self.acked() + more;
        let deadline = Instant::now() + within;
        while self.acked() < target {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the workers and fails the test on any error they met.
    async fn finish(&self, tasks: Vec<tokio::task::JoinHandle<()>>, round: usize) {
        self.stop.store(true, Ordering::SeqCst);
        for task in tasks {
            task.await.expect("worker");
        }
        let errors = std::mem::take(&mut self.model.lock().unwrap().errors);
        assert!(errors.is_empty(), "round {round}: {errors:#?}");
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
    }

    async fn clients(&self, token: &str) -> Vec<Client> {
        let mut clients = Vec::new();
        for addr in self.addrs.iter() {
            clients.push(connect(*addr, Some(token)).await);
        }
        clients
    }
}

/// A small deterministic generator: the run's choices follow from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9_of_a_replica() {
    let kills = std::env::var("BYOKD_REPLICA_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(3usize);
    let seed = std::env::var("BYOKD_REPLICA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("replica kill test: {kills} kills, BYOKD_REPLICA_SEED={seed}");
    let Some(mut replicas) = replicas_with(unlimited) else {
        return;
    };
    let mut rng = Rng(seed);
    let model = Arc::new(Mutex::new(Model::default()));
    store_leased(&replicas, &model).await;
    let started = Instant::now();
    for round in 0..kills {
        let load = Load::new(&model, &replicas);
        let tasks = load.start(round, seed);
        load.progress(100, Duration::from_secs(60), "no progress")
            .await;
        tokio::time::sleep(Duration::from_millis(50 + rng.below(400))).await;
        let victim = round % 2;
        load.down.store(victim, Ordering::SeqCst);
        let (dir, server) = replicas.servers.remove(victim);
        server.kill9();
        load.progress(
            30,
            Duration::from_secs(30),
            "the other replica stopped serving",
        )
        .await;
        load.finish(tasks, round).await;
        let server = dir.start();
        replicas.servers.insert(victim, (dir, server));
        check(&replicas.servers, &model).await;
    }
    let m = model.lock().unwrap();
    eprintln!(
        "replica kill test: {} acknowledged writes ({} secrets, {} single-use leases redeemed) \
         survived {kills} kills of a replica in {:.1} s",
        m.acked,
        m.values.len(),
        m.redeemed.len(),
        started.elapsed().as_secs_f64()
    );
}

/// How many times the servers have logged that they were looking for a commit whose answer
/// was lost.
fn resolving(servers: &[(TestDir, TestServer)]) -> usize {
    servers
        .iter()
        .map(|(_, server)| {
            server
                .log()
                .matches("the answer to a commit was lost")
                .count()
        })
        .sum()
}

/// The commits the servers refused while a write of theirs stalled, in all.
async fn refused_stalled(servers: &[(TestDir, TestServer)]) -> f64 {
    let mut refused = 0.0;
    for (_, server) in servers {
        let text = scrape(&ops_addr(server)).await;
        refused += sample(&text, "byokd_store_commits_refused_stalled_total");
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_postgresql_stopped_immediately_under_load() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let mut replicas = replicas_on(pg.database(), unlimited);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let model = Arc::new(Mutex::new(Model::default()));
    store_leased(&replicas, &model).await;
    for round in 0..2 {
        let load = Load::new(&model, &replicas);
        let tasks = load.start(round, seed);
        load.progress(100, Duration::from_secs(60), "no progress")
            .await;
        load.outage.store(true, Ordering::SeqCst);
        let resolving_before = resolving(&replicas.servers);
        let refused_before = refused_stalled(&replicas.servers).await;
        pg.crash();
        // Longer than the store's stall limit (1 s): a replica whose COMMIT was in flight
        // when PostgreSQL stopped waits to learn whether it took effect (it never answers
        // before it knows), but refuses the commits sent meanwhile once that wait passes
        // the limit, instead of queueing them behind it.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let during = load.unavailable.load(Ordering::SeqCst);
        let resolved = resolving(&replicas.servers) > resolving_before;
        pg.up();
        // The replicas were not restarted: they reconnect by themselves.
        load.progress(
            100,
            Duration::from_secs(30),
            "the replicas did not serve again after PostgreSQL came back",
        )
        .await;
        load.finish(tasks, round).await;
        assert!(during > 0, "nothing failed while PostgreSQL was down");
        // A replica that looked for a commit's outcome through this outage refused the
        // commits sent meanwhile instead of holding them.
        let refused = refused_stalled(&replicas.servers).await - refused_before;
        assert!(
            !resolved || refused > 0.0,
            "a replica stalled on a commit's outcome, but refused nothing meanwhile"
        );
        eprintln!(
            "round {round}: {during} requests answered UNAVAILABLE while PostgreSQL was down, \
             {} in all (a commit's answer was lost and looked for: {resolved}; commits \
             refused while a write stalled: {refused})",
            load.unavailable.load(Ordering::SeqCst)
        );
        check(&replicas.servers, &model).await;
    }
    replicas.servers.clear();
}

/// No quota or rate limit in the load's way.
fn unlimited(config: String) -> String {
    config.replace(
        "[limits]\n",
        "[limits]\nprincipal_rate_limit = { per_second = 1000000, burst = 1000000 }\n",
    ) + "\n[quotas]\nmax_secrets_per_tenant = 1000000\nmax_leases_per_tenant = 1000000\n"
}

/// Stores the secret the leasers lease.
async fn store_leased(replicas: &Replicas, model: &Arc<Mutex<Model>>) {
    let value = b"sk-replica-kill-leased-0123456789".to_vec();
    store(
        &mut replicas.servers[0].1.as_(ORCHESTRATOR).await,
        "acme",
        LEASED,
        &value,
    )
    .await;
    model
        .lock()
        .unwrap()
        .values
        .insert(LEASED.into(), vec![value]);
}

/// Stores new secrets and rotates its own, on either replica.
async fn writer(load: Load, round: usize, w: u64, mut rng: Rng) {
    let mut clients = load.clients(ORCHESTRATOR).await;
    let mut own: Vec<String> = Vec::new();
    let mut i = 0;
    while load.running() {
        i += 1;
        let at = rng.below(2) as usize;
        if !own.is_empty() && rng.below(100) < 40 {
            let name = own[rng.below(own.len() as u64) as usize].clone();
            let value = format!("sk-replica-kill-{name}-rotated-{i}-0123456789").into_bytes();
            remember_secret(&value);
            let possible = {
                let mut m = load.model.lock().unwrap();
                let values = m.values.get_mut(&name).expect("own secret");
                values.push(value.clone());
                values.len()
            };
            let req = pb::RotateRequest {
                tenant: "acme".into(),
                name: name.clone(),
                value: value.clone(),
                ..Default::default()
            };
            if load
                .answer(at, "Rotate", clients[at].rotate(req).await)
                .is_some()
            {
                let mut m = load.model.lock().unwrap();
                let values = m.values.get_mut(&name).expect("own secret");
                values.drain(..possible - 1);
                m.acked += 1;
            }
            continue;
        }
        let name = format!("r{round}-w{w}-{i}");
        let value = format!("sk-replica-kill-{name}-0123456789abcdef").into_bytes();
        let req = store_req("acme", &name, &value);
        if load
            .answer(at, "Store", clients[at].store(req).await)
            .is_some()
        {
            let mut m = load.model.lock().unwrap();
            m.values.insert(name.clone(), vec![value]);
            m.acked += 1;
            own.push(name);
        }
    }
}

/// Takes single-use leases on one replica and redeems them on either.
async fn leaser(load: Load, mut rng: Rng) {
    let mut orch = load.clients(ORCHESTRATOR).await;
    let mut agent = load.clients(AGENT).await;
    while load.running() {
        let (a, b) = (rng.below(2) as usize, rng.below(2) as usize);
        let req = lease_req("acme", LEASED, 1);
        let Some(grant) = load.answer(a, "Lease", orch[a].lease(req).await) else {
            continue;
        };
        remember_secret(grant.token.as_bytes());
        load.model.lock().unwrap().acked += 1;
        if load
            .answer(b, "Get", agent[b].get(get_req(&grant.token)).await)
            .is_some()
        {
            let mut m = load.model.lock().unwrap();
            m.redeemed.push(grant.token);
            m.acked += 1;
        }
    }
}

/// Every acknowledged value through both replicas, every redeemed lease spent on both, and
/// one intact chain with the same head on both.
async fn check(servers: &[(TestDir, TestServer)], model: &Arc<Mutex<Model>>) {
    let (values, redeemed) = {
        let m = model.lock().unwrap();
        (m.values.clone(), m.redeemed.clone())
    };
    for (name, possible) in &values {
        for (_, server) in servers {
            let got = lease_and_get(server, "acme", name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert!(
                possible.contains(&got.value),
                "{name}: a value that was never acknowledged nor in flight"
            );
        }
    }
    for token in &redeemed {
        for (_, server) in servers {
            assert_status(redeem(server, AGENT, token).await, Code::NotFound, "");
        }
    }
    let head = verify(&servers[0].1, None).await;
    verify(&servers[1].1, Some(head)).await;
}
