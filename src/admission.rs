//! Admission: what a connection and a request must show before they cost byokd anything
//! that other callers need.
//!
//! - **Connections** ([`Incoming`]): at most `max_connections` open at once, and none once the
//!   process's open files reach the limit less a reserve kept for the store
//!   ([`descriptor_ceiling`]); a connection over either cap is closed as soon as it is
//!   accepted. A connection that has not delivered its first
//!   request (TLS handshake, HTTP/2 preface, the request's headers) within
//!   `handshake_timeout` is closed. HTTP/2 itself caps the streams of one connection
//!   (`http2_max_concurrent_streams`, set in `server.rs`).
//! - **Requests** ([`AdmissionLayer`]): the caller is authenticated from the headers first
//!   (bearer token, client certificate). A request without valid credentials is held to a rate
//!   per peer host (beyond it, refused here and only counted: [`Admission::take_refused`] feeds
//!   one audit entry per host and interval) and to a small pool of its own, so it can never
//!   take a slot of an authenticated caller. Then the body of a vault request (all are unary)
//!   must arrive within `request_body_timeout`, and only then does an authenticated request
//!   take one of the `max_concurrent_requests` slots (none free: `RESOURCE_EXHAUSTED` at
//!   once, no queue).
//!   Health checks take no slot. The authentication result travels to the service in the
//!   request's extensions ([`Admitted`]), so the vault neither repeats it nor sees transport
//!   types.
//!
//! Every refusal is counted in `byokd_admission_refused_total{reason}` or
//! `byokd_connections_dropped_total{reason}`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::transport::server::{Connected, TlsConnectInfo};
use tower::{Layer, Service};

use crate::auth::{AuthError, CertIdentity, Principal, Principals, RateLimit};
use crate::config::Limits;
use crate::ratelimit::Buckets;

/// Peer hosts whose refused requests are counted one by one until the next report; the
/// rest are counted together.
const MAX_REFUSED_HOSTS: usize = 10_000;
/// How long the accept loop pauses after an error (out of file descriptors, say), instead of
/// spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Room for the gRPC frame header and some slack on top of the largest message.
const BODY_SLACK: usize = 1024;

/// What admission decided about a request, for the service: who is calling, from where.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The authenticated principal, or why the caller is not one.
    pub principal: Result<Principal, AuthError>,
    /// The peer's address.
    pub peer: Option<SocketAddr>,
}

/// The limits admission enforces, and its state.
pub struct Admission {
    principals: Arc<Principals>,
    limits: Limits,
    slots: Arc<Semaphore>,
    unauthenticated_slots: Arc<Semaphore>,
    unauthenticated_rate: Buckets<IpAddr>,
    refused: Mutex<Refused>,
}

/// Requests refused for the unauthenticated rate since the last report.
#[derive(Default)]
struct Refused {
    by_host: HashMap<IpAddr, u64>,
    /// Refused requests of hosts beyond [`MAX_REFUSED_HOSTS`], and how many hosts.
    others: (u64, u64),
}

/// Refused requests to record: per host, and the rest together.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RefusedReport {
    /// Host and count, most refused first.
    pub hosts: Vec<(IpAddr, u64)>,
    /// Requests of the hosts not listed, and how many hosts those were.
    pub others: (u64, u64),
}

/// Why admission turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Busy,
    UnauthenticatedBusy,
    UnauthenticatedRate,
    BodyTimeout,
    BodyTooLarge,
    BodyBroken,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::UnauthenticatedBusy => "unauthenticated_busy",
            Refusal::UnauthenticatedRate => "unauthenticated_rate",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::BodyBroken => "body_broken",
        }
    }

    fn status(self) -> tonic::Status {
        match self {
            Refusal::Busy => tonic::Status::resource_exhausted("server busy; retry later"),
            Refusal::UnauthenticatedBusy => tonic::Status::resource_exhausted(
                "too many requests without valid credentials in flight; retry later",
            ),
            Refusal::UnauthenticatedRate => tonic::Status::resource_exhausted(
                "too many requests without valid credentials from this host; retry later",
            ),
            Refusal::BodyTimeout => {
                tonic::Status::deadline_exceeded("the request body did not arrive in time")
            }
            Refusal::BodyTooLarge => tonic::Status::resource_exhausted("request too large"),
            Refusal::BodyBroken => tonic::Status::cancelled("the request body was not received"),
        }
    }
}

/// What kind of path a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `grpc.health.v1.Health`: for probes, no credentials, no slot.
    Health,
    /// `byokd.v1.Vault`: authenticated.
    Vault,
    /// Anything else (reflection, unknown paths): no credentials.
    Open,
}

fn route(path: &str) -> Route {
    if path.starts_with("/grpc.health.v1.Health/") {
        Route::Health
    } else if path.starts_with("/byokd.v1.Vault/") {
        Route::Vault
    } else {
        Route::Open
    }
}

impl Admission {
    /// Admission for `principals` under `limits`.
    pub fn new(principals: Arc<Principals>, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            principals,
            slots: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            unauthenticated_slots: Arc::new(Semaphore::new(limits.max_concurrent_unauthenticated)),
            unauthenticated_rate: Buckets::default(),
            refused: Mutex::new(Refused::default()),
            limits,
        })
    }

    /// The requests refused for the unauthenticated rate since the last call, per host (at
    /// most `max_hosts`, most refused first; the rest together).
    pub fn take_refused(&self, max_hosts: usize) -> RefusedReport {
        let taken = std::mem::take(&mut *self.refused.lock().unwrap_or_else(|p| p.into_inner()));
        let mut hosts: Vec<(IpAddr, u64)> = taken.by_host.into_iter().collect();
        hosts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let (mut others, mut other_hosts) = taken.others;
        for (_, count) in hosts.drain(max_hosts.min(hosts.len())..) {
            others += count;
            other_hosts += 1;
        }
        RefusedReport {
            hosts,
            others: (others, other_hosts),
        }
    }

    fn count_refused(&self, host: Option<IpAddr>) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let Some(host) = host else {
            refused.others.0 += 1;
            return;
        };
        if let Some(count) = refused.by_host.get_mut(&host) {
            *count += 1;
        } else if refused.by_host.len() < MAX_REFUSED_HOSTS {
            refused.by_host.insert(host, 1);
        } else {
            refused.others.0 += 1;
            refused.others.1 += 1;
        }
    }

    /// Decides on a request: the permit it holds while it runs, or a refusal.
    async fn admit(
        &self,
        parts: &mut http::request::Parts,
        body: Body,
    ) -> Result<(Option<OwnedSemaphorePermit>, Body), Refusal> {
        let connection = Connection::of(&parts.extensions);
        if let Some(state) = &connection.state {
            state.started.store(true, Ordering::Release);
        }
        let route = route(parts.uri.path());
        if route == Route::Health {
            return Ok((None, body));
        }
        let principal = match route {
            Route::Vault => {
                let header = parts
                    .headers
                    .get(http::header::AUTHORIZATION)
                    // Present but not text: something that fails as malformed, not as missing.
                    .map(|v| v.to_str().unwrap_or(""));
                self.principals
                    .authenticate(header, &connection.certs)
                    .cloned()
            }
            _ => Err(AuthError::MissingToken),
        };
        let pool = if principal.is_ok() {
            Ok(None)
        } else {
            let host = connection.peer.map(|p| p.ip());
            let limit: RateLimit = self.limits.unauthenticated_rate_limit;
            // Requests without a peer address (never over TCP) share one bucket.
            let key = host.unwrap_or(IpAddr::from([0, 0, 0, 0]));
            if self.unauthenticated_rate.take(&key, limit) {
                self.unauthenticated_slots
                    .clone()
                    .try_acquire_owned()
                    .map(Some)
                    .map_err(|_| Refusal::UnauthenticatedBusy)
            } else {
                self.count_refused(host);
                Err(Refusal::UnauthenticatedRate)
            }
        };
        // Vault requests are unary: the whole body, in time, also before a refusal (a
        // response that leaves the body unread ends in a stream reset, and many resets end
        // the whole connection, other callers' streams included). Other routes may stream
        // their requests (reflection does): they pass as they are, in their own pool.
        let body = match route {
            Route::Vault => self.read_body(body).await,
            _ => Ok(body),
        };
        let pool = pool?;
        let body = body?;
        let permit = match pool {
            Some(permit) => permit,
            None => self
                .slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| Refusal::Busy)?,
        };
        if route == Route::Vault {
            parts.extensions.insert(Admitted {
                principal,
                peer: connection.peer,
            });
        }
        Ok((Some(permit), body))
    }

    /// The whole body, if it arrives in time and within the size limit.
    async fn read_body(&self, body: Body) -> Result<Body, Refusal> {
        let limit = self.limits.max_message_bytes + BODY_SLACK;
        let mut collect = std::pin::pin!(http_body_util::Limited::new(body, limit).collect());
        // Usually the body came with the headers: no timer for that.
        let collected =
            match std::future::poll_fn(|cx| Poll::Ready(collect.as_mut().poll(cx))).await {
                Poll::Ready(collected) => collected,
                Poll::Pending => tokio::time::timeout(self.limits.request_body_timeout, collect)
                    .await
                    .map_err(|_| Refusal::BodyTimeout)?,
            };
        match collected {
            Ok(collected) => Ok(Body::new(http_body_util::Full::new(collected.to_bytes()))),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::BodyTooLarge),
            Err(_) => Err(Refusal::BodyBroken),
        }
    }
}

/// Adds admission in front of a service.
#[derive(Clone)]
pub struct AdmissionLayer(pub Arc<Admission>);

impl<S> Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            admission: self.0.clone(),
        }
    }
}

/// A service behind admission.
#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    admission: Arc<Admission>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> Service<http::Request<Body>> for AdmissionService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone is ready only after poll_ready; the polled one serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let admission = self.admission.clone();
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            match admission.admit(&mut parts, body).await {
                Ok((permit, body)) => {
                    let response = inner
                        .call(http::Request::from_parts(parts, body))
                        .await
                        .map_err(Into::into);
                    drop(permit);
                    response
                }
                Err(refusal) => {
                    crate::metrics::global().admission_refused(refusal.reason());
                    Ok(refusal.status().into_http())
                }
            }
        })
    }
}

/// What the transport knows of a request's connection.
struct Connection {
    peer: Option<SocketAddr>,
    certs: Vec<CertIdentity>,
    state: Option<Arc<ConnState>>,
}

impl Connection {
    fn of(extensions: &http::Extensions) -> Self {
        // With TLS, tonic inserts both; the TLS one carries the client certificate.
        if let Some(tls) = extensions.get::<TlsConnectInfo<ConnInfo>>() {
            let info = tls.get_ref();
            return Connection {
                peer: Some(info.remote),
                certs: tls
                    .peer_certs()
                    .map(|certs| cert_identities(&certs))
                    .unwrap_or_default(),
                state: Some(info.state.clone()),
            };
        }
        match extensions.get::<ConnInfo>() {
            Some(info) => Connection {
                peer: Some(info.remote),
                certs: Vec::new(),
                state: Some(info.state.clone()),
            },
            None => Connection {
                peer: None,
                certs: Vec::new(),
                state: None,
            },
        }
    }
}

/// The identities in the client certificate of a mutual-TLS connection (already verified
/// against the client CA by rustls): URI SANs (SPIFFE IDs) and DNS SANs, and the subject CN
/// only for a certificate that has neither (a CN next to a SPIFFE ID is not an identity of
/// its own: whoever issued the SPIFFE ID may not vouch for the CN).
fn cert_identities(certs: &[tonic::transport::CertificateDer<'static>]) -> Vec<CertIdentity> {
    use x509_parser::extensions::GeneralName;
    let Some(Ok((_, cert))) = certs
        .first()
        .map(|leaf| x509_parser::parse_x509_certificate(leaf.as_ref()))
    else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => ids.push(CertIdentity::Uri((*uri).to_string())),
                GeneralName::DNSName(dns) => ids.push(CertIdentity::Dns(dns.to_ascii_lowercase())),
                _ => {}
            }
        }
    }
    if ids.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                ids.push(CertIdentity::CommonName(cn.to_string()));
            }
        }
    }
    ids
}

/// Per-connection state shared between the connection and its requests.
#[derive(Debug, Default)]
struct ConnState {
    /// A request has arrived: the handshake deadline no longer applies.
    started: AtomicBool,
}

/// The connection info tonic puts in each request's extensions (wrapped in
/// [`TlsConnectInfo`] with TLS).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    remote: SocketAddr,
    state: Arc<ConnState>,
}

/// An accepted connection: holds its place under `max_connections` until it closes, and
/// fails its reads once the handshake deadline passes without a request.
pub struct Guarded {
    stream: TcpStream,
    remote: SocketAddr,
    state: Arc<ConnState>,
    deadline: Option<Pin<Box<Sleep>>>,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Guarded {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            remote: self.remote,
            state: self.state.clone(),
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = &mut this.deadline {
            if this.state.started.load(Ordering::Acquire) {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                crate::metrics::global().connection_dropped("handshake_timeout");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the handshake timeout",
                )));
            }
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        crate::metrics::global().connections_open.dec();
    }
}

/// The accepted connections of a listener, under the connection cap.
pub struct Incoming {
    listener: TcpListener,
    places: Arc<Semaphore>,
    /// See [`descriptor_ceiling`].
    descriptor_ceiling: Option<u64>,
    handshake_timeout: Duration,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Connections accepted on `listener`, at most `max_connections` open at once and none
    /// on a descriptor at or above `descriptor_ceiling`, each closed if it brings no request
    /// within `handshake_timeout`.
    pub fn new(
        listener: TcpListener,
        max_connections: usize,
        descriptor_ceiling: Option<u64>,
        handshake_timeout: Duration,
    ) -> Self {
        Self {
            listener,
            places: Arc::new(Semaphore::new(max_connections)),
            descriptor_ceiling,
            handshake_timeout,
            backoff: None,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Guarded>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = &mut this.backoff {
                if backoff.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
            }
            let (stream, remote) = match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(accepted)) => accepted,
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    continue;
                }
            };
            // Closed at once: over a cap, a connection costs nothing but this accept.
            let descriptor = u64::try_from(std::os::fd::AsRawFd::as_raw_fd(&stream)).ok();
            if let (Some(fd), Some(ceiling)) = (descriptor, this.descriptor_ceiling)
                && fd >= ceiling
            {
                crate::metrics::global().connection_dropped("open_files");
                drop(stream);
                continue;
            }
            let Ok(permit) = this.places.clone().try_acquire_owned() else {
                crate::metrics::global().connection_dropped("max_connections");
                drop(stream);
                continue;
            };
            // A response is a few small frames: Nagle's algorithm would hold them back until
            // the peer acknowledges earlier ones.
            let _ = stream.set_nodelay(true);
            crate::metrics::global().connections_open.inc();
            return Poll::Ready(Some(Ok(Guarded {
                stream,
                remote,
                state: Arc::new(ConnState::default()),
                deadline: Some(Box::pin(tokio::time::sleep(this.handshake_timeout))),
                _permit: permit,
            })));
        }
    }
}

/// The lowest descriptor number a new connection may not have: the soft limit on open files
/// less `reserve` (at most half the limit). The kernel hands out the lowest free descriptor,
/// so a connection accepted at or above it means that only the reserve is left: it is closed
/// at once, whatever holds the rest (connections, or a store that grew). `None` if there is
/// no limit.
pub fn descriptor_ceiling(reserve: u64) -> Option<u64> {
    use rustix::process::{Resource, getrlimit};
    let limit = getrlimit(Resource::Nofile).current?;
    Some(limit.saturating_sub(reserve).max(limit / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_health_vault_or_open() {
        assert_eq!(route("/grpc.health.v1.Health/Check"), Route::Health);
        assert_eq!(route("/byokd.v1.Vault/Get"), Route::Vault);
        assert_eq!(
            route("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Route::Open
        );
        assert_eq!(route("/evil/x"), Route::Open);
    }

    #[test]
    fn refused_requests_are_reported_per_host_most_first_then_together() {
        let admission = Admission::new(Arc::default(), test_limits());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        for _ in 0..3 {
            admission.count_refused(Some(b));
        }
        admission.count_refused(Some(a));
        for _ in 0..2 {
            admission.count_refused(Some(c));
        }
        admission.count_refused(None);
        let report = admission.take_refused(2);
        assert_eq!(report.hosts, vec![(b, 3), (c, 2)]);
        assert_eq!(report.others, (2, 1));
        assert_eq!(admission.take_refused(2), RefusedReport::default());
    }

    fn test_limits() -> Limits {
        crate::config::Config::load(Default::default())
            .expect("defaults")
            .limits
    }
}
