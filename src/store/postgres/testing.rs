//! A database of its own for each test on PostgreSQL, in the server that
//! `BYOKD_TEST_DATABASE_URL` names (`scripts/test.sh` provides one). Without it a test is
//! skipped, and says so, except under `CI=true`, where it fails.

use postgres::NoTls;

/// A fresh database, dropped when this is.
pub struct TestDatabase {
    server: postgres::Config,
    name: String,
    /// Connects to the test's database.
    pub config: postgres::Config,
    /// The same, as a URL.
    pub url: String,
}

/// Runs `work` on a thread of its own: the blocking client may not run on an async worker.
pub fn blocking<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(work).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

impl TestDatabase {
    /// A new empty database, or `None` (the test is skipped) when no PostgreSQL is given.
    pub fn create() -> Option<Self> {
        let Ok(url) = std::env::var("BYOKD_TEST_DATABASE_URL") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and no PostgreSQL: set BYOKD_TEST_DATABASE_URL (scripts/test.sh does)"
            );
            eprintln!("skipped: BYOKD_TEST_DATABASE_URL is not set (scripts/test.sh sets it)");
            return None;
        };
        let server: postgres::Config = url.parse().expect("BYOKD_TEST_DATABASE_URL");
        let name = format!("byokd_test_{}", uuid::Uuid::new_v4().simple());
        blocking(|| {
            let mut client = server.connect(NoTls).expect("connect to the test server");
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .expect("create the test database");
        });
        let mut config = server.clone();
        config.dbname(&name);
        let url = with_dbname(&url, &name);
        Some(Self {
            server,
            name,
            config,
            url,
        })
    }

    /// A connection to the test's database.
    /// Where the store of the test's database connects (without TLS).
    pub fn target(&self) -> super::Target {
        let config = self.url.parse().expect("the test database's URL");
        super::Target::plain(config).expect("a target without TLS")
    }

    pub fn connect(&self) -> postgres::Client {
        self.config
            .connect(NoTls)
            .expect("connect to the test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server, name) = (&self.server, &self.name);
        blocking(|| {
            if let Ok(mut client) = server.connect(NoTls) {
                let _ =
                    client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        });
    }
}

/// `url` with its database name replaced by `name` (the path of a `postgres://` URL).
fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base
        .find("://")
        .map(|scheme| scheme + 3)
        .and_then(|start| base[start..].find('/').map(|slash| start + slash))
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}
