//! Transport security and abuse resistance: TLS and mutual TLS identities, the plaintext
//! guard, rate limits, load shedding, lease brute-force limits, corrupted records, private
//! key and config files.

use std::path::Path;
use std::process::Command;

use byokd::api::v1::vault_client::VaultClient;
use byokd::api::v1::{self as pb};
use byokd::model::{SecretName, TenantId};
use byokd::store::SledStore;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::harness::*;

/// A test PKI: a CA, a server certificate for localhost, and client certificates.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Pem {
    cert: String,
    key: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn issue(&self, cn: &str, sans: Vec<SanType>, purpose: ExtendedKeyUsagePurpose) -> Pem {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn server(&self) -> Pem {
        self.issue(
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, cn: &str, uri: Option<&str>) -> Pem {
        let sans = uri
            .map(|u| SanType::URI(u.try_into().unwrap()))
            .into_iter()
            .collect();
        self.issue(cn, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A test directory serving TLS with `pki`'s server certificate; with `mtls`, client
/// certificates must chain to `pki`'s CA.
fn tls_dir(pki: &Pki, mtls: bool, principals: &str) -> TestDir {
    let dir = TestDir::with_config(&format!(
        "[tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n{}{principals}",
        if mtls { "client_ca = \"ca.pem\"\n" } else { "" }
    ));
    let server = pki.server();
    write_private(&dir.path().join("server.pem"), &server.cert);
    write_private(&dir.path().join("server.key"), &server.key);
    write_private(&dir.path().join("ca.pem"), &pki.ca.pem());
    dir
}

async fn tls_channel(
    server: &TestServer,
    pki: &Pki,
    client: Option<&Pem>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca.pem()))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
    }
    Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

fn client(channel: Channel, token: Option<&str>) -> Client {
    let auth = match token {
        Some(t) => auth(t),
        None => Auth::none(),
    };
    VaultClient::with_interceptor(channel, auth)
}

const CERT_PRINCIPAL: &str = "\n[[principal]]\nid = \"sandbox\"\nclient_cert_ids = [\"spiffe://byokd.test/sandbox\"]\nroles = [\"reader\"]\ntenants = [\"acme\"]\n";

#[tokio::test]
async fn mutual_tls_identifies_principals_by_certificate_and_refuses_strangers() {
    let pki = Pki::new("byokd test CA");
    let dir = tls_dir(&pki, true, CERT_PRINCIPAL);
    let server = dir.start();
    let sandbox = pki.client("sandbox", Some("spiffe://byokd.test/sandbox"));
    let orchestrator = pki.client("orchestrator", None);

    // The orchestrator: a trusted certificate that maps to no principal, plus its token.
    let mut orch = client(
        tls_channel(&server, &pki, Some(&orchestrator))
            .await
            .unwrap(),
        Some(ORCHESTRATOR),
    );
    orch.store(store_req("acme", "k", b"sk-over-mtls-0123456789abcdefgh"))
        .await
        .unwrap();
    let grant = orch
        .lease(lease_req("acme", "k", 2))
        .await
        .unwrap()
        .into_inner();

    // The sandbox: no token at all, its certificate is its identity.
    let mut by_cert = client(
        tls_channel(&server, &pki, Some(&sandbox)).await.unwrap(),
        None,
    );
    let value = by_cert
        .get(get_req(&grant.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(value.value, b"sk-over-mtls-0123456789abcdefgh");
    // Its certificate and another principal's token disagree.
    let mut confused = client(
        tls_channel(&server, &pki, Some(&sandbox)).await.unwrap(),
        Some(AGENT),
    );
    assert_status(
        confused.get(get_req(&grant.token)).await,
        Code::Unauthenticated,
        "different principals",
    );

    // A trusted certificate with an unknown identity, and no token.
    let mut stranger = client(
        tls_channel(&server, &pki, Some(&orchestrator))
            .await
            .unwrap(),
        None,
    );
    assert_status(
        stranger.describe(secret_ref("acme", "k")).await,
        Code::Unauthenticated,
        "not mapped to a principal",
    );

    // No client certificate, or one from another CA: the connection is refused (the client
    // sees it at connect time or at its first request).
    let attempt = |client_cert: Option<Pem>, token: Option<&'static str>| {
        let (server, pki, grant) = (&server, &pki, grant.token.clone());
        async move {
            match tls_channel(server, pki, client_cert.as_ref()).await {
                Err(_) => Err(None),
                Ok(channel) => client(channel, token)
                    .get(get_req(&grant))
                    .await
                    .map(drop)
                    .map_err(Some),
            }
        }
    };
    let no_cert = attempt(None, Some(AGENT)).await;
    assert!(
        no_cert.is_err(),
        "a connection without a client certificate got through"
    );
    let rogue = Pki::new("rogue CA").client("sandbox", Some("spiffe://byokd.test/sandbox"));
    let untrusted = attempt(Some(rogue), None).await;
    assert!(
        untrusted.is_err(),
        "a certificate from an untrusted CA got through"
    );
    for failure in [no_cert, untrusted] {
        if let Err(Some(status)) = failure {
            assert!(
                matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                "{status:?}"
            );
        }
    }
    // Neither reached byokd with a usable identity: the lease still has its second use.
    assert!(by_cert.get(get_req(&grant.token)).await.is_ok());
    // And a plaintext client cannot talk to a TLS port.
    let plaintext = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        assert!(
            client(channel, Some(ORCHESTRATOR))
                .describe(secret_ref("acme", "k"))
                .await
                .is_err()
        );
    }
    let entries = audit_all_over(&mut client(
        tls_channel(&server, &pki, Some(&orchestrator))
            .await
            .unwrap(),
        Some(AUDITOR),
    ))
    .await;
    let sandbox_gets = entries
        .iter()
        .filter(|e| e.principal == "sandbox" && e.action == "Get" && e.outcome == "OK")
        .count();
    assert_eq!(sandbox_gets, 2);
}

#[tokio::test]
async fn a_client_certificate_names_exactly_one_principal() {
    let pki = Pki::new("byokd test CA");
    let principals = format!(
        "{CERT_PRINCIPAL}\n[[principal]]\nid = \"ops\"\nclient_cert_ids = [\"cn:ops-admin\"]\nroles = [\"admin\"]\ntenants = [\"*\"]\n\
         \n[[principal]]\nid = \"other\"\nclient_cert_ids = [\"spiffe://byokd.test/other\"]\nroles = [\"reader\"]\ntenants = [\"acme\"]\n"
    );
    let dir = tls_dir(&pki, true, &principals);
    let server = dir.start();
    let uri = |u: &str| SanType::URI(u.try_into().unwrap());
    let over = |pem: Pem| {
        let (server, pki) = (&server, &pki);
        async move { client(tls_channel(server, pki, Some(&pem)).await.unwrap(), None) }
    };
    let status = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.get_rotation_status(pb::GetRotationStatusRequest::default())
                .await
        }
    };

    // The CN alone: the admin it names.
    let mut admin = over(pki.issue("ops-admin", vec![], ExtendedKeyUsagePurpose::ClientAuth)).await;
    assert_status(status(&mut admin).await, Code::NotFound, "no rotation job");
    // The sandbox's SPIFFE ID with the admin's CN: the sandbox, not the admin.
    let mut mixed = over(pki.issue(
        "ops-admin",
        vec![uri("spiffe://byokd.test/sandbox")],
        ExtendedKeyUsagePurpose::ClientAuth,
    ))
    .await;
    assert_status(
        status(&mut mixed).await,
        Code::PermissionDenied,
        "principal sandbox may not",
    );
    // Two SPIFFE IDs of two principals: neither.
    let mut both = over(pki.issue(
        "both",
        vec![
            uri("spiffe://byokd.test/sandbox"),
            uri("spiffe://byokd.test/other"),
        ],
        ExtendedKeyUsagePurpose::ClientAuth,
    ))
    .await;
    let refused = assert_status(
        both.describe(secret_ref("acme", "k")).await,
        Code::Unauthenticated,
        "names more than one principal",
    );
    assert!(!refused.message().contains("sandbox"), "{refused:?}");
    let entries = audit_all_over(&mut client(
        tls_channel(&server, &pki, Some(&pki.client("auditor", None)))
            .await
            .unwrap(),
        Some(AUDITOR),
    ))
    .await;
    let entry = entries
        .iter()
        .rfind(|e| e.action == "Describe")
        .expect("the refusal is audited");
    assert_eq!(entry.outcome, "UNAUTHENTICATED");
    assert!(
        entry.reason.contains("sandbox") && entry.reason.contains("other"),
        "{entry:?}"
    );
}

async fn audit_all_over(c: &mut Client) -> Vec<pb::AuditEntry> {
    c.audit(pb::AuditRequest {
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .entries
}

#[tokio::test]
async fn tls_without_client_certificates_serves_bearer_tokens() {
    let pki = Pki::new("byokd test CA");
    let dir = tls_dir(&pki, false, "");
    let server = dir.start();
    let mut orch = client(
        tls_channel(&server, &pki, None).await.unwrap(),
        Some(ORCHESTRATOR),
    );
    orch.store(store_req("acme", "k", b"sk-over-tls-0123456789abcdefghi"))
        .await
        .unwrap();
    // A group-readable TLS key is refused.
    assert!(server.stop().await.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("TLS private key") && log.contains("chmod 600"),
        "{log}"
    );
}

#[test]
fn plaintext_off_loopback_needs_the_danger_opt_in() {
    let dir = TestDir::new();
    let run = |extra: &[&str]| {
        let mut cmd = byokd_command(dir.path(), &[], &dir.path().join("off-loopback.log"));
        cmd.args(["serve", "--config"])
            .arg(dir.config())
            .args(["--listen", "0.0.0.0:0"])
            .args(extra);
        cmd
    };
    let out = run(&[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let log = std::fs::read_to_string(dir.path().join("off-loopback.log")).unwrap();
    assert!(
        log.contains("refusing to serve plaintext on 0.0.0.0:0"),
        "{log}"
    );

    dir.rewrite_config("danger_allow_plaintext_non_loopback = true\n");
    let mut child = run(&[]).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .next()
        .unwrap()
        .unwrap();
    assert!(line.starts_with("byokd listening on 0.0.0.0:"), "{line}");
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("off-loopback.log")).unwrap();
    assert!(
        log.contains("serving PLAINTEXT on a non-loopback address"),
        "{log}"
    );
}

#[tokio::test]
async fn a_principal_over_its_rate_limit_gets_resource_exhausted() {
    let dir = TestDir::with_config(
        "\n[[principal]]\nid = \"slow\"\ntoken_sha256 = \"d3eb41a8fb4ba0e4c1ff7e1d0e2b5cc4a4fe3c5c9efb6da1d0d2f1d1a6e8ea3a\"\nroles = [\"writer\"]\ntenants = [\"*\"]\nrate_limit = { per_second = 0.01, burst = 3 }\n",
    );
    // Not a valid digest of anything the test knows: use a real one.
    let token = "tok-slow";
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    let config = std::fs::read_to_string(dir.config()).unwrap().replace(
        "d3eb41a8fb4ba0e4c1ff7e1d0e2b5cc4a4fe3c5c9efb6da1d0d2f1d1a6e8ea3a",
        &digest,
    );
    std::fs::write(dir.config(), config).unwrap();
    let server = dir.start();
    let mut slow = server.as_(token).await;
    for _ in 0..3 {
        assert_status(
            slow.describe(secret_ref("acme", "none")).await,
            Code::NotFound,
            "",
        );
    }
    assert_status(
        slow.describe(secret_ref("acme", "none")).await,
        Code::ResourceExhausted,
        "over its request rate",
    );
    // Others are not affected.
    assert_status(
        server
            .as_(ORCHESTRATOR)
            .await
            .describe(secret_ref("acme", "none"))
            .await,
        Code::NotFound,
        "",
    );
    let limited = audit_all(
        &server,
        pb::AuditRequest {
            outcome: "RESOURCE_EXHAUSTED".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].principal, "slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_beyond_the_concurrency_limit_are_shed_not_queued() {
    let dir = TestDir::with_config("[limits]\nmax_concurrent_requests = 1\n");
    let server = dir.start();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ORCHESTRATOR)).await;
                c.store(store_req(
                    "acme",
                    &format!("k{i}"),
                    b"sk-shed-0123456789abcdefghijklmn",
                ))
                .await
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                shed += 1;
            }
        }
    }
    assert!(ok >= 1 && shed >= 1, "ok {ok}, shed {shed}");
}

#[tokio::test]
async fn guessing_lease_tokens_is_cut_off_per_peer_and_principal() {
    let dir =
        // One token per 100 s: however slow the machine, nothing refills during the test.
        TestDir::with_config("[limits]\nfailed_get_rate_limit = { per_second = 0.01, burst = 5 }\n");
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(&mut orch, "acme", "k", b"sk-guess-0123456789abcdefghijklm").await;
    let real = lease_ok(&mut orch, lease_req("acme", "k", 1)).await;
    let mut agent = server.as_(AGENT).await;
    for i in 0..5 {
        let guess = format!("byokd_lt_{:A>43}", i);
        assert_status(
            agent.get(get_req(&guess)).await,
            Code::NotFound,
            "no longer valid",
        );
    }
    assert_status(
        agent.get(get_req("byokd_lt_guess")).await,
        Code::ResourceExhausted,
        "too many failed lease redemptions",
    );
    // Even the real token waits: the guesser cannot tell a hit from the cut-off.
    assert_status(
        agent.get(get_req(&real.token)).await,
        Code::ResourceExhausted,
        "too many failed",
    );
    // (Another principal from the same host is not cut off: the buckets are per host and
    // principal; see refusals.rs.)
    let cut = audit_all(
        &server,
        pb::AuditRequest {
            action: "Get".into(),
            outcome: "RESOURCE_EXHAUSTED".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(cut.len(), 2);
    // (The bucket refills at its rate: ratelimit.rs's unit tests; a wall-clock wait here
    // would race a loaded machine.)
}

#[tokio::test]
async fn a_corrupted_stored_record_is_an_error_not_a_crash() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    store(
        &mut orch,
        "acme",
        "broken",
        b"sk-broken-0123456789abcdefghijk",
    )
    .await;
    store(
        &mut orch,
        "acme",
        "fine",
        b"sk-fine-0123456789abcdefghijklmn",
    )
    .await;
    assert!(server.stop().await.success());
    {
        let store = SledStore::open(&dir.data().join("db")).unwrap();
        // A record with the right format byte and an undecodable body.
        store
            .danger_overwrite_secret_bytes(
                &TenantId::parse("acme").unwrap(),
                &SecretName::parse("broken").unwrap(),
                &[1, 0xff, 0xff, 0xff],
            )
            .unwrap();
    }
    let server = dir.start();
    let mut orch = server.as_(ORCHESTRATOR).await;
    let status = orch
        .describe(secret_ref("acme", "broken"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Internal, "internal error")
    );
    assert!(
        server.log().contains("corrupt stored record"),
        "the cause is logged"
    );
    assert_status(
        orch.lease(lease_req("acme", "broken", 1)).await,
        Code::Internal,
        "internal error",
    );
    assert_status(
        orch.list(pb::ListRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await,
        Code::Internal,
        "internal error",
    );
    // The server is still up and serves everything else.
    assert_eq!(
        lease_and_get(&server, "acme", "fine").await.unwrap().value,
        b"sk-fine-0123456789abcdefghijklmn"
    );
}

#[test]
fn readable_key_and_config_files_are_refused() {
    let dir = TestDir::new();
    drop(dir.start());
    use std::os::unix::fs::PermissionsExt;
    let key = dir.data().join("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, log) = dir.start_failing();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("readable by group or others (mode 644)"),
        "{log}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(dir.config(), std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_byokd"))
        .args(["serve", "--config"])
        .arg(dir.config())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("config file holding principal token hashes")
    );
}

/// The limits of a running process, from /proc: (soft, hard) of the line starting `name`.
fn process_limit(pid: u32, name: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in {limits}"));
    let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
    (fields[0].to_string(), fields[1].to_string())
}

#[test]
fn the_server_raises_its_open_files_limit_and_allows_no_core_dumps() {
    use std::io::{BufRead, BufReader};
    let dir = TestDir::new();
    // Started with a low soft limit on open files, as many service managers give.
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -S -n 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_byokd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.config())
        .current_dir(dir.path())
        .env("BYOKD_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let listening = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("byokd listening on "));
    let files = process_limit(child.id(), "Max open files");
    let core = process_limit(child.id(), "Max core file size");
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening);
    let (soft, hard) = files;
    let expected = match hard.as_str() {
        "unlimited" => 1 << 20,
        hard => hard.parse::<u64>().unwrap().min(1 << 20),
    };
    assert_eq!(
        soft.parse::<u64>().unwrap(),
        expected,
        "soft {soft}, hard {hard}"
    );
    assert!(expected > 256);
    assert_eq!(core, ("0".to_string(), "0".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_cut_off_at_the_handshake_timeout() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new("byokd test CA");
    let dir = tls_dir(&pki, false, "[limits]\nhandshake_timeout = \"1s\"\n");
    let server = dir.start();
    // Half a ClientHello, or nothing at all, from many connections.
    let mut stalled = Vec::new();
    for i in 0..100 {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 0 {
            tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                .await
                .unwrap();
        }
        stalled.push(tcp);
    }
    let started = std::time::Instant::now();
    for tcp in &mut stalled {
        assert!(
            closed_within(tcp, std::time::Duration::from_secs(5)).await,
            "a stalled TLS handshake is cut off"
        );
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // A real client still gets through.
    let mut orch = client(
        tls_channel(&server, &pki, None).await.unwrap(),
        Some(ORCHESTRATOR),
    );
    orch.store(store_req("acme", "k", b"sk-after-stalls-0123456789abcdef"))
        .await
        .unwrap();
}
