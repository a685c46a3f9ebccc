//! byokd to PostgreSQL over TLS (`sslmode` in `[store] url`): with verify-full every
//! connection of a replica is encrypted and the server proves its name; a certificate that
//! does not chain to the given root, or does not name the host, stops the replica at start;
//! modes that do not check the server are refused in configuration.

use crate::harness::*;

/// The test CA whose certificate for `localhost` the test server serves (scripts/test.sh).
fn test_ca() -> Option<String> {
    let ca = std::env::var("BYOKD_TEST_PG_CA").ok();
    if ca.is_none() {
        must_not_skip("no PostgreSQL test CA: BYOKD_TEST_PG_CA is not set");
    }
    ca
}

/// A config for a replica on `url`, with a local master key in its data directory.
fn config(url: &str) -> String {
    format!(
        "[store]\nkind = \"postgres\"\nurl = \"{url}\"\npool_size = 2\n\n[master_key]\nkind = \"local\"\npath = \"data/master.key\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_verify_full_every_connection_is_encrypted() {
    let (Some(db), Some(ca)) = (PgDatabase::create(), test_ca()) else {
        return;
    };
    let url = db.url_with(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let dir = TestDir::with_config(&config(&url));
    let server = dir.start();
    store(
        &mut server.as_(ADMIN).await,
        "acme",
        "openai",
        b"sk-over-tls-value-000000001",
    )
    .await;
    let got = lease_and_get(&server, "acme", "openai").await.expect("get");
    assert_eq!(got.value, b"sk-over-tls-value-000000001");
    // The writer, the feed's LISTEN and the pool's reads: all TLS, none in the clear.
    let counts = db.query(&format!(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = '{}'",
        db.name()
    ));
    let (tls, plain) = counts.split_once('|').expect("two counts");
    assert!(tls.parse::<u32>().unwrap() >= 2, "{counts}");
    assert_eq!(plain, "0", "{counts}");
}

#[test]
fn a_server_that_cannot_prove_its_name_or_chain_is_refused() {
    let (Some(db), Some(ca)) = (PgDatabase::create(), test_ca()) else {
        return;
    };
    // The certificate names localhost, not 127.0.0.1.
    let wrong_name = db.url_with(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let (status, log) = TestDir::with_config(&config(&wrong_name)).start_failing();
    assert!(!status.success());
    assert!(log.contains("certificate"), "{log}");
    // The system's roots do not know the test CA.
    let unknown_ca = db.url_with("localhost", "sslmode=verify-full&sslrootcert=system");
    let (status, log) = TestDir::with_config(&config(&unknown_ca)).start_failing();
    assert!(!status.success());
    assert!(log.contains("certificate"), "{log}");
    // verify-ca checks the chain only: the same address is accepted.
    let chain_only = db.url_with("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    let dir = TestDir::with_config(&config(&chain_only));
    drop(dir.start());
}

#[test]
fn modes_that_do_not_check_the_server_are_refused_in_configuration() {
    for mode in ["require", "prefer", "allow"] {
        let url = format!("postgres://byokd@db.internal:5432/byokd?sslmode={mode}");
        let (status, log) = TestDir::with_config(&config(&url)).start_failing();
        assert_eq!(status.code(), Some(2), "{log}");
        assert!(
            log.contains(&format!("sslmode={mode}")) && log.contains("verify-full"),
            "{log}"
        );
    }
}
