//! `Get` throughput with the data key cache on and off, through an AWS KMS master key on a
//! local KMS API (moto_server, `pip install 'moto[server]'`).
//!
//! `cargo bench --bench kms_cache`. Starts moto_server and the release `byokd` binary twice
//! (cache on, cache off), stores secrets, hands out multi-use leases, then redeems them from
//! 16 concurrent clients for a fixed time. Reports requests/s for both and their ratio, which
//! is the figure to compare (both runs share the machine's noise).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use byokd::api::v1::{self as pb};
use common::Server;

const SECRETS: usize = 100;
const CLIENTS: usize = 16;
const RUN: Duration = Duration::from_secs(5);

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let port = free_port();
    let _moto = Killed(
        Command::new("moto_server")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]')"),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let key_id = runtime.block_on(create_key(&endpoint));
    let mut results = Vec::new();
    for (label, cache) in [("cache on", ""), ("cache off", "cache_size = 0\n")] {
        let rps = runtime.block_on(run(&endpoint, &key_id, cache));
        println!("{label}: {rps:.0} Get/s");
        results.push(rps);
    }
    let ratio = results[0] / results[1];
    println!(
        "| cache | Get/s |\n|---|---|\n| on | {:.0} |\n| off | {:.0} |",
        results[0], results[1]
    );
    println!("cache on / cache off: {ratio:.1}x");
    println!(
        "{{\"bench\":\"kms_cache\",\"get_rps_cache_on\":{:.1},\"get_rps_cache_off\":{:.1},\"ratio\":{ratio:.2}}}",
        results[0], results[1]
    );
}

async fn create_key(endpoint: &str) -> String {
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
        .region(aws_sdk_kms::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_kms::config::Credentials::new(
            "test", "test", None, None, "bench",
        ))
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    let out = aws_sdk_kms::Client::from_conf(config)
        .create_key()
        .send()
        .await
        .expect("create key");
    out.key_metadata().expect("metadata").key_id().to_string()
}

/// Starts byokd with `cache` settings, and returns redeemed Gets per second.
async fn run(endpoint: &str, key_id: &str, cache: &str) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "data_dir = \"data\"\n[master_key]\nkind = \"aws-kms\"\nkey_id = \"{key_id}\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\n{cache}\n{}",
        common::principal_toml()
    );
    common::write_config(dir.path(), &config);
    let server = Server::start(
        dir.path(),
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let mut client = server.clients(1).await.remove(0);
    let mut tokens = Vec::new();
    for i in 0..SECRETS {
        let name = format!("k{i}");
        client
            .store(pb::StoreRequest {
                tenant: "bench".into(),
                name: name.clone(),
                provider: "anthropic".into(),
                value: format!("sk-bench-{i:04}-0123456789abcdefghijklmnop").into_bytes(),
                labels: Default::default(),
                ..Default::default()
            })
            .await
            .expect("store");
        let grant = client
            .lease(pb::LeaseRequest {
                tenant: "bench".into(),
                name,
                ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                max_uses: 1000,
                audience: String::new(),
            })
            .await
            .expect("lease")
            .into_inner();
        tokens.push(grant.token);
    }
    let tokens = Arc::new(tokens);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let (mut client, tokens, done, stop) =
                (client.clone(), tokens.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let token = tokens[i % tokens.len()].clone();
                    if client.get(pb::GetRequest { token }).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += CLIENTS;
                }
            })
        })
        .collect();
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}
