//! What the benches that drive a real byokd share: starting the release server in a directory,
//! and tonic clients that carry the bench principal's token. Each bench uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use byokd::api::v1::vault_client::VaultClient;
use sha2::{Digest, Sha256};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The bench principal's bearer token.
pub const TOKEN: &str = "bench-admin-token";

/// The config lines that declare the bench principal (admin on every tenant).
pub fn principal_toml() -> String {
    format!(
        "[[principal]]\nid = \"bench\"\ntoken_sha256 = \"{}\"\nroles = [\"admin\"]\ntenants = [\"*\"]\n",
        hex::encode(Sha256::digest(TOKEN.as_bytes()))
    )
}

/// Writes `config` to `dir/byokd.toml`, readable by its owner only (byokd insists).
pub fn write_config(dir: &Path, config: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("byokd.toml");
    std::fs::write(&path, config).expect("config");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// A vault client that sends the bench token.
pub type Client = VaultClient<InterceptedService<Channel, Bearer>>;

/// Adds the bench principal's bearer token to each request.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

/// A release byokd serving `byokd.toml` of its directory on a loopback port; killed on drop.
pub struct Server {
    child: Child,
    /// host:port it listens on.
    pub addr: String,
    /// From process start to listening.
    pub startup: Duration,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts byokd in `dir` with extra environment variables `env`.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_byokd"))
            .args(["serve", "--config", "byokd.toml", "--listen", "127.0.0.1:0"])
            .current_dir(dir)
            .env("BYOKD_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("byokd");
        let stdout = child.stdout.take().expect("stdout");
        let addr = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("byokd listening on ").map(str::to_string))
            .expect("listening");
        Server {
            child,
            addr,
            startup: started.elapsed(),
        }
    }

    /// A clean stop: SIGTERM, then wait.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// `kill -9`.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// (VmRSS, VmHWM) in MiB.
    pub fn memory(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(f64::NAN, |kib| kib / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// `n` clients, each on its own HTTP/2 connection.
    pub async fn clients(&self, n: usize) -> Vec<Client> {
        let mut out = Vec::new();
        for _ in 0..n {
            let channel = Channel::from_shared(format!("http://{}", self.addr))
                .expect("uri")
                .connect()
                .await
                .expect("connect");
            let auth = Bearer(format!("Bearer {TOKEN}").parse().expect("ascii"));
            out.push(VaultClient::with_interceptor(channel, auth));
        }
        out
    }
}
