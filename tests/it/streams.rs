//! What a stream or a connection may hold, and for how long, whoever opens it: lasting
//! streams without credentials in small pools (per connection too), responses the peer does
//! not read dropped with their connection, idle and half-sent connections closed on both
//! ports, and a peer that makes the server reset streams cut off.

use std::time::{Duration, Instant};

use byokd::api::v1::{self as pb};
use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1 as reflection;

use crate::harness::*;

async fn channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// Opens a health Watch on `channel`: the stream, once its first status arrived, or the
/// refusal.
async fn watch(
    channel: &tonic::transport::Channel,
) -> Result<tonic::Streaming<tonic_health::pb::HealthCheckResponse>, Code> {
    let mut stream = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| s.code())?
        .into_inner();
    match stream.next().await {
        Some(Ok(_)) => Ok(stream),
        Some(Err(status)) => Err(status.code()),
        None => Err(Code::Unknown),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lasting_streams_without_credentials_are_capped_per_connection_and_in_all() {
    let dir = TestDir::with_config(
        "request_timeout = \"2s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\nmax_health_watch_streams = 6\n\
         max_unauthenticated_streams_per_connection = 4\n\
         max_concurrent_unauthenticated = 8\n\
         unauthenticated_rate_limit = { per_second = 1000, burst = 1000 }\n",
    );
    let server = dir.start();
    let main = server.addr.to_string();
    let ops = ops_addr(&server);

    // One connection: four lasting streams, no more.
    let first = channel(&main).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        match watch(&first).await {
            Ok(stream) => held.push(stream),
            Err(code) => {
                assert_eq!(code, Code::ResourceExhausted);
                refused += 1;
            }
        }
    }
    assert_eq!((held.len(), refused), (4, 6));
    // Another connection, on the ops port: two more make the six of the whole process.
    let second = channel(&ops).await;
    let mut more = 0;
    for _ in 0..4 {
        match watch(&second).await {
            Ok(stream) => {
                held.push(stream);
                more += 1;
            }
            Err(code) => assert_eq!(code, Code::ResourceExhausted),
        }
    }
    assert_eq!(more, 2);
    // Health checks are not lasting streams: probes still get through.
    let mut probe = HealthClient::new(first.clone());
    for _ in 0..20 {
        probe
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("a health check while the watches are held");
    }

    // A reflection stream on a fresh connection is served, and ended after the request
    // timeout even though its client keeps it open.
    let third = channel(&main).await;
    let mut client = reflection::server_reflection_client::ServerReflectionClient::new(third);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(reflection::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            reflection::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    })
    .await
    .unwrap();
    let mut responses = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("reflection served")
        .into_inner();
    assert!(responses.next().await.expect("a listing").is_ok());
    let opened = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), responses.next())
        .await
        .expect("the server ends the stream");
    let status = end
        .expect("a status")
        .expect_err("ended with an error status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(opened.elapsed() >= Duration::from_millis(1500));
    drop(tx);

    // Closed streams give their places back.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = channel(&main).await;
    let mut again = Vec::new();
    for _ in 0..4 {
        again.push(watch(&fresh).await.expect("places are free again"));
    }
    let text = scrape(&ops).await;
    assert!(
        sample(
            &text,
            "byokd_admission_refused_total{reason=\"streams_per_connection\"}"
        ) >= 6.0
    );
    assert!(
        sample(
            &text,
            "byokd_admission_refused_total{reason=\"health_watches\"}"
        ) >= 2.0
    );
}

/// A raw HTTP/2 gRPC request to `path` with `message`, as `token`.
fn grpc_request(addr: &str, path: &str, token: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
}

fn grpc_frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&body);
    Bytes::from(framed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_responses_hold_their_principals_slots_until_the_connection_is_dropped() {
    let dir = TestDir::with_config(
        "request_timeout = \"2s\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\nmax_concurrent_requests = 8\nmax_concurrent_requests_per_principal = 4\n",
    );
    let server = dir.start();
    let ops = ops_addr(&server);
    let mut admin = server.as_(ADMIN).await;
    for i in 0..40 {
        store(&mut admin, "t1", &format!("s{i}"), b"v").await;
    }

    // A client that grants no flow-control credit: no response byte can reach it.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let page = grpc_frame(&pb::AuditRequest {
        page_size: 1000,
        ..Default::default()
    });
    let mut responses = Vec::new();
    for _ in 0..20 {
        let (response, mut send) = client
            .send_request(
                grpc_request(&server.addr.to_string(), "/byokd.v1.Vault/Audit", ADMIN),
                false,
            )
            .unwrap();
        send.send_data(page.clone(), true).unwrap();
        responses.push(response);
        client = client.ready().await.unwrap();
    }
    // Headers need no credit: the refused ones say so; the admitted ones keep their slot
    // while their messages wait.
    let mut refused = 0;
    // Kept: a response dropped here would reset its stream.
    let mut waiting = Vec::new();
    for response in responses {
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("response headers")
            .expect("a response");
        if response.headers().get("grpc-status").map(|v| v.as_bytes()) == Some(b"8") {
            refused += 1;
        } else {
            waiting.push(response);
        }
    }
    assert_eq!(
        refused, 16,
        "the principal's share of the slots admitted, the rest refused"
    );
    let mut victim = server.as_(ADMIN).await;
    assert_status(
        victim.describe(secret_ref("t1", "s1")).await,
        Code::ResourceExhausted,
        "this principal",
    );
    // Other principals keep the other slots.
    let mut other = server.as_(ORCHESTRATOR).await;
    store(
        &mut other,
        "acme",
        "other",
        b"sk-other-principal-0123456789",
    )
    .await;

    // Within the request timeout (and a look), the server drops the connection, and with it
    // the responses it held.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the server closes the stalled connection");
    assert!(started.elapsed() < Duration::from_secs(6));
    drop(ended);
    drop(waiting);
    victim
        .describe(secret_ref("t1", "s1"))
        .await
        .expect("slots are free again");
    let text = scrape(&ops).await;
    assert!(sample(&text, "byokd_connections_dropped_total{reason=\"stalled\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_on_both_ports() {
    let dir = TestDir::with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\nhandshake_timeout = \"1s\"\nidle_timeout = \"2s\"\n",
    );
    let server = dir.start();
    let ops = ops_addr(&server);

    let mut half_sent = Vec::new();
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(&ops).await.unwrap();
        stream.write_all(b"GET /metr").await.unwrap();
        half_sent.push(stream);
        let mut stream = tokio::net::TcpStream::connect(&ops).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: byokd\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        idle.push(stream);
    }
    // On the main port: a connection that sends half a preface, and one that made a request.
    let mut main_half = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    main_half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let main_idle = channel(&server.addr.to_string()).await;
    HealthClient::new(main_idle.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    let started = Instant::now();
    for stream in half_sent.iter_mut().chain(std::iter::once(&mut main_half)) {
        assert!(
            closed_within(stream, Duration::from_secs(4)).await,
            "a half-sent request is cut off at the handshake timeout"
        );
    }
    for stream in &mut idle {
        assert!(
            closed_within(stream, Duration::from_secs(5)).await,
            "an idle connection is closed at the idle timeout"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    // The idle gRPC connection on the main port too (it made its request last).
    let mut text = scrape(&ops).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(
        &text,
        "byokd_connections_dropped_total{reason=\"idle_timeout\"}",
    ) < 11.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = scrape(&ops).await;
    }
    assert_eq!(
        sample(
            &text,
            "byokd_connections_dropped_total{reason=\"idle_timeout\"}"
        ),
        11.0
    );
    assert_eq!(
        sample(
            &text,
            "byokd_connections_dropped_total{reason=\"handshake_timeout\"}"
        ),
        11.0
    );
    // The idle gRPC channel reconnects on its own.
    HealthClient::new(main_idle)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a closed idle channel reconnects");
}

/// An HTTP/2 frame: length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes()[1..]);
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_makes_the_server_reset_streams_is_cut_off() {
    let dir = TestDir::new();
    let server = dir.start();
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    // HPACK: POST, http, :path literal, content-type literal.
    let path = b"/grpc.health.v1.Health/Check";
    let mut headers = vec![0x83, 0x86, 0x04, u8::try_from(path.len()).unwrap()];
    headers.extend_from_slice(path);
    headers.extend_from_slice(&[0x0f, 0x10, 16]);
    headers.extend_from_slice(b"application/grpc");
    // Each stream: its headers, then a window update that overflows its send window: the
    // server must reset the stream (a reset it is made to send, not one the peer sends).
    for i in 0..1500u32 {
        let stream = 1 + 2 * i;
        out.extend(h2_frame(0x1, 0x4, stream, &headers));
        out.extend(h2_frame(0x8, 0, stream, &0x7fff_ffffu32.to_be_bytes()));
    }
    let (mut read, mut write) = tcp.split();
    let writer = async {
        // The server may close before it reads everything.
        let _ = write.write_all(&out).await;
    };
    let reader = async {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return seen,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    let (_, seen) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("the server closes the connection");
    // Find the GOAWAY among the frames the server sent.
    let mut at = 0;
    let mut goaway = None;
    while at + 9 <= seen.len() {
        let len = usize::from(seen[at]) << 16
            | usize::from(seen[at + 1]) << 8
            | usize::from(seen[at + 2]);
        if seen[at + 3] == 0x7 && at + 9 + len <= seen.len() && len >= 8 {
            let code = &seen[at + 9 + 4..at + 9 + 8];
            goaway = Some(u32::from_be_bytes(code.try_into().unwrap()));
        }
        at += 9 + len;
    }
    assert_eq!(goaway, Some(0xb), "GOAWAY with ENHANCE_YOUR_CALM");
    // Other connections are served.
    let mut client = server.client(Some(ADMIN)).await;
    store(&mut client, "t1", "s", b"v").await;
}
