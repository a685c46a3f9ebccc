//! The PostgreSQL engine against a real server (see `testing`): migrations, and the commit
//! core on it with two processes writing one database.

use postgres::NoTls;

use super::schema::{self, MIGRATIONS, Migrated};
use super::testing::{TestDatabase, blocking};
use super::{PgAdapter, PgStore};
use crate::model::{Action, AuditRecord, Revision};
use crate::store::Store;
use crate::store::Write;
use crate::store::commit::tests::{Written, two_writers};
use crate::store::commit::{Committer, Position};
use crate::store::tests::{Subject, chain_key, put, secret, suite};

const SCHEMA: &str = "byokd";

fn migrated(db: &TestDatabase) {
    let mut client = db.connect();
    schema::migrate(&mut client, SCHEMA).unwrap();
}

fn adapter(db: &TestDatabase) -> PgAdapter {
    let target = db.target();
    blocking(move || PgAdapter::connect(target, SCHEMA).unwrap())
}

/// The trail, the secrets' revisions and the revision counter, as the database holds them.
fn written(db: &TestDatabase) -> Written {
    blocking(|| {
        let mut client = db.connect();
        let trail = client
            .query(
                &format!("SELECT seq, record FROM {SCHEMA}.audit ORDER BY seq"),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                crate::store::codec::decode::<AuditRecord>(
                    &crate::store::codec::audit_key(seq as u64),
                    r.get(1),
                )
                .unwrap()
            })
            .collect();
        let revisions = client
            .query(&format!("SELECT rev FROM {SCHEMA}.secrets"), &[])
            .unwrap()
            .iter()
            .map(|r| Revision(r.get::<_, i64>(0) as u64))
            .collect();
        let last: i64 = client
            .query_one(&format!("SELECT last_revision FROM {SCHEMA}.position"), &[])
            .unwrap()
            .get(0);
        Written {
            trail,
            revisions,
            last_revision: Revision(last as u64),
        }
    })
}

#[test]
fn migrations_apply_once_even_when_several_processes_start_at_once() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let results: Vec<Migrated> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut client = db.connect();
                    schema::migrate(&mut client, SCHEMA).unwrap()
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let latest = MIGRATIONS.last().unwrap().version;
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(
        results.iter().filter(|m| m.applied == all).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .all(|m| m.latest == latest && (m.applied.is_empty() || m.applied == all))
    );
    let mut client = db.connect();
    let recorded: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {SCHEMA}.schema_migrations"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(recorded, MIGRATIONS.len() as i64);
    // Run again: nothing to do.
    let again = schema::migrate(&mut client, SCHEMA).unwrap();
    assert_eq!(
        again,
        Migrated {
            applied: vec![],
            latest
        }
    );
    // A newer build's migration in the database: this build uses the schema as it is.
    client
        .execute(
            &format!(
                "INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES (9999, 'newer')"
            ),
            &[],
        )
        .unwrap();
    let newer = schema::migrate(&mut client, SCHEMA).unwrap();
    assert_eq!(
        newer,
        Migrated {
            applied: vec![],
            latest: 9999
        }
    );
}

#[test]
fn a_schema_name_that_is_not_a_plain_identifier_is_refused() {
    for bad in [
        "",
        "Byokd",
        "1byokd",
        "byokd; drop table x",
        "by-okd",
        &"a".repeat(64),
    ] {
        assert!(schema::check_schema_name(bad).is_err(), "{bad:?}");
    }
    for good in ["byokd", "_b", "byokd_2", &"a".repeat(63)] {
        assert!(schema::check_schema_name(good).is_ok(), "{good:?}");
    }
}

#[test]
fn a_server_without_fsync_is_refused() {
    assert!(super::refuse_unsafe("on").is_ok());
    let refused = super::refuse_unsafe("off").unwrap_err().to_string();
    assert!(refused.contains("fsync = off"), "{refused}");
    // The live check passes on the test server (which runs with fsync on).
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let mut client = db.connect();
    super::check_durable(&mut client).unwrap();
    let synchronous: String = client
        .query_one("SHOW synchronous_commit", &[])
        .unwrap()
        .get(0);
    assert_eq!(synchronous, "on");
    let planning: String = client
        .query_one("SHOW plan_cache_mode", &[])
        .unwrap()
        .get(0);
    assert_eq!(planning, "force_custom_plan");
}

/// Reads plan each execution for its parameters, on every pooled connection as on the
/// writer's (`SESSION_SETTINGS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_plans_each_execution() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let store = PgStore::open(db.target(), "byokd", 2).await.unwrap();
    for _ in 0..4 {
        let mode = store.pooled_setting("plan_cache_mode").await.unwrap();
        assert_eq!(mode, "force_custom_plan");
    }
    store.close().await.unwrap();
}

/// The commit core's two-process case (`commit/tests.rs`) on PostgreSQL: two committers,
/// each with its own connection, one database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_database_keep_one_chain() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    blocking(|| migrated(&db));
    assert!(two_writers(|| adapter(&db), || written(&db)).await);
}

/// A connection lost between groups (the server restarted or failed over) is found dead
/// when the next group begins, before anything of it is written, and made again: the group
/// commits and the chain goes on where it stood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_between_groups_is_made_again_before_the_next() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    blocking(|| migrated(&db));
    let committer =
        Committer::start(adapter(&db), Position::after(None, None, Revision(0))).unwrap();
    committer.start_chain(chain_key()).await.unwrap();
    let store = |name: &str| put(vec![Write::PutSecret(secret("t", name))], Action::Store);
    let first = committer.commit(store("a")).await.unwrap();
    assert_eq!(first.audit_seq, Some(1));
    let name = db.config.get_dbname().unwrap().to_string();
    blocking(|| {
        let server = db.config.clone();
        let mut client = server.connect(NoTls).unwrap();
        let ended = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .unwrap();
        assert_eq!(ended.len(), 1, "the writer's one connection");
    });
    let after = committer.commit(store("b")).await.unwrap();
    assert_eq!(after.audit_seq, Some(2));
    let next = committer.commit(store("c")).await.unwrap();
    assert_eq!(next.audit_seq, Some(3));
    assert!(!committer.status().failed_for_good());
    committer.close().await.unwrap();
    let written = written(&db);
    assert_eq!(written.trail.len(), 3);
    assert!(
        written
            .trail
            .windows(2)
            .all(|w| w[1].prev_hash == w[0].hash)
    );
}

/// Stores on PostgreSQL for the shared suite: each fresh store in a schema of its own in one
/// test database; another handle is a second `PgStore` (a second process) on the same schema.
struct PgSubject {
    db: TestDatabase,
    opened: std::sync::Mutex<Vec<(std::sync::Arc<dyn Store>, String)>>,
}

impl PgSubject {
    async fn open(&self, schema: &str) -> std::sync::Arc<dyn Store> {
        std::sync::Arc::new(PgStore::open(self.db.target(), schema, 4).await.unwrap())
    }
}

#[async_trait::async_trait]
impl Subject for PgSubject {
    async fn fresh(&self) -> std::sync::Arc<dyn Store> {
        let schema = format!("s{}", self.opened.lock().unwrap().len());
        let store = self.open(&schema).await;
        self.opened.lock().unwrap().push((store.clone(), schema));
        store
    }

    async fn another_handle(&self, store: &std::sync::Arc<dyn Store>) -> std::sync::Arc<dyn Store> {
        let schema = {
            let opened = self.opened.lock().unwrap();
            let found = opened
                .iter()
                .find(|(s, _)| std::sync::Arc::ptr_eq(s, store));
            found.map(|(_, schema)| schema.clone()).unwrap()
        };
        let other = self.open(&schema).await;
        self.opened.lock().unwrap().push((other.clone(), schema));
        other
    }
}

/// Migrations 2 and 3 count the usage of the records already there and the secrets' use the
/// trail records: with their tables dropped and the migrations applied again, the counts are
/// what the commits had left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_migrations_count_what_the_records_and_the_trail_hold() {
    use crate::model::{Action, Outcome};
    use crate::store::tests::{secret, use_of};
    use crate::store::usage::UsageKey;
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let store = PgStore::open(db.target(), SCHEMA, 2).await.unwrap();
    let charged = crate::store::tests::charged_records(&store).await;
    let k = secret("u1", "k");
    for (action, outcome) in [
        (Action::Lease, Outcome::Ok),
        (Action::Get, Outcome::Ok),
        (Action::Get, Outcome::PermissionDenied),
    ] {
        store
            .commit(use_of(&k, action, outcome, "p"))
            .await
            .unwrap();
    }
    let used = store.activity(&[k.id]).await.unwrap();
    assert_eq!(used[0].redemptions, 1);
    store.close().await.unwrap();
    let migrated = blocking(|| {
        let mut client = db.connect();
        client
            .batch_execute(&format!(
                "DROP TABLE {SCHEMA}.usage, {SCHEMA}.activity, {SCHEMA}.activity_days;
                 DELETE FROM {SCHEMA}.schema_migrations WHERE version >= 2"
            ))
            .unwrap();
        schema::migrate(&mut client, SCHEMA).unwrap()
    });
    assert_eq!(migrated.applied, vec![2, 3]);
    let store = PgStore::open(db.target(), SCHEMA, 2).await.unwrap();
    assert_eq!(store.activity(&[k.id]).await.unwrap(), used);
    for (key, usage) in [
        UsageKey::Tenant(crate::model::TenantId::parse("u1").unwrap()),
        UsageKey::Tenant(crate::model::TenantId::parse("u2").unwrap()),
        UsageKey::All,
    ]
    .iter()
    .zip(charged)
    {
        assert_eq!(store.usage(key).await.unwrap(), usage, "{key:?}");
    }
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_suite() {
    let Some(db) = TestDatabase::create() else {
        return;
    };
    let subject = PgSubject {
        db,
        opened: Default::default(),
    };
    suite(&subject).await;
}

/// A commit whose answer is lost is looked for before it is answered: found, it is durable
/// and the chain goes on after it; not found (the connection dropped before COMMIT), its
/// callers get UNAVAILABLE and the next commit takes its place. The store never fails for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_resolved_before_it_is_answered() {
    use super::adapter::Fault;
    let Some(db) = TestDatabase::create() else {
        return;
    };
    blocking(|| migrated(&db));
    let faults = [(Fault::LoseAnswer, true), (Fault::DropBeforeCommit, false)];
    for (fault, committed) in faults {
        let (tx, rx) = std::sync::mpsc::channel();
        let adapter = adapter(&db);
        // The fault is set from the writer thread, between groups.
        let committer =
            Committer::start(adapter, Position::after(None, None, Revision(0))).unwrap();
        committer.start_chain(chain_key()).await.unwrap();
        let before = written(&db).trail.len() as u64;
        committer
            .between(Box::new(move |a: &mut PgAdapter| {
                a.fault.set(Some(fault));
                let _ = tx.send(());
            }))
            .await
            .unwrap();
        rx.recv().unwrap();
        let name = format!("{fault:?}");
        let result = committer
            .commit(put(
                vec![Write::PutSecret(secret("t", &name))],
                Action::Store,
            ))
            .await;
        if committed {
            assert_eq!(result.unwrap().audit_seq, Some(before + 1), "{fault:?}");
        } else {
            assert!(
                matches!(&result, Err(e) if e.is_unavailable()),
                "{fault:?}: {result:?}"
            );
        }
        assert!(!committer.status().failed_for_good(), "{fault:?}");
        let next = committer
            .commit(put(
                vec![Write::PutSecret(secret("t", &format!("{name}-next")))],
                Action::Store,
            ))
            .await
            .unwrap();
        let expected = before + if committed { 2 } else { 1 };
        assert_eq!(next.audit_seq, Some(expected), "{fault:?}");
        committer.close().await.unwrap();
        let trail = written(&db).trail;
        assert_eq!(trail.len() as u64, expected, "{fault:?}");
        assert!(trail.windows(2).all(|w| w[1].prev_hash == w[0].hash));
    }
}
