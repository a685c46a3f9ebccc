//! Admission: what a request must show before it costs byokd anything that other callers
//! need. (What a connection must show is in [`crate::connection`].)
//!
//! The caller is authenticated from the headers first (bearer token, client certificate).
//! Then each request takes a place in exactly one pool, and keeps it until its response has
//! ended (not only until the handler returns: a response the peer does not read still holds
//! memory), with nothing queued (none free: `RESOURCE_EXHAUSTED` at once):
//!
//! | Route | Pool | Also |
//! |---|---|---|
//! | vault, authenticated | `max_concurrent_requests`, and `max_concurrent_requests_per_principal` of them | body within `request_body_timeout` |
//! | vault `WatchAudit`, authenticated | the vault's watch caps | slot only until the stream starts |
//! | vault without valid credentials, reflection, unknown paths | `max_concurrent_unauthenticated` | rate per peer host; ended after the request timeout |
//! | health `Watch` | `max_health_watch_streams` | rate per peer host |
//! | health `Check` | none (probes must get through) | |
//! | ops `/metrics` | [`MAX_SCRAPES`] | |
//!
//! Streams without credentials that may last (all but vault requests and health checks)
//! count against `max_unauthenticated_streams_per_connection` as well. Requests refused for
//! the unauthenticated rate are only counted here: [`Admission::take_refused`] feeds one
//! audit entry per host and interval. The authentication result travels to the service in
//! the request's extensions ([`Admitted`]), so the vault neither repeats it nor sees
//! transport types.
//!
//! Every refusal is counted in `byokd_admission_refused_total{reason}`.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::auth::{AuthError, Principal, Principals, RateLimit};
use crate::config::Limits;
use crate::connection::{Connection, Tracked};
use crate::model::PrincipalId;
use crate::ratelimit::Buckets;

/// Peer hosts whose refused requests are counted one by one until the next report; the
/// rest are counted together.
const MAX_REFUSED_HOSTS: usize = 10_000;
/// Room for the gRPC frame header and some slack on top of the largest message.
const BODY_SLACK: usize = 1024;
/// `/metrics` scrapes served at once on the ops port.
pub const MAX_SCRAPES: usize = 4;

/// What admission decided about a request, for the service: who is calling, from where.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The authenticated principal, or why the caller is not one.
    pub principal: Result<Principal, AuthError>,
    /// The peer's address, as text.
    pub peer: Option<Arc<str>>,
    /// When the request arrived (its deadline counts from then).
    pub arrived: std::time::Instant,
}

/// The limits admission enforces, and its state.
pub struct Admission {
    principals: Arc<Principals>,
    limits: Limits,
    /// How long a stream without credentials may last.
    stream_lifetime: Duration,
    slots: Arc<Semaphore>,
    unauthenticated_slots: Arc<Semaphore>,
    health_watches: Arc<Semaphore>,
    scrapes: Arc<Semaphore>,
    /// Slots per principal (principals are configured: the map is bounded).
    principal_slots: Mutex<HashMap<PrincipalId, Arc<Semaphore>>>,
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
    PrincipalBusy,
    UnauthenticatedBusy,
    UnauthenticatedRate,
    StreamsPerConnection,
    HealthWatches,
    Scrapes,
    BodyTimeout,
    BodyTooLarge,
    BodyBroken,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::PrincipalBusy => "principal_busy",
            Refusal::UnauthenticatedBusy => "unauthenticated_busy",
            Refusal::UnauthenticatedRate => "unauthenticated_rate",
            Refusal::StreamsPerConnection => "streams_per_connection",
            Refusal::HealthWatches => "health_watches",
            Refusal::Scrapes => "scrapes",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::BodyBroken => "body_broken",
        }
    }

    fn status(self) -> tonic::Status {
        match self {
            Refusal::Busy => tonic::Status::resource_exhausted("server busy; retry later"),
            Refusal::PrincipalBusy => tonic::Status::resource_exhausted(
                "too many requests of this principal in flight; retry later",
            ),
            Refusal::UnauthenticatedBusy => tonic::Status::resource_exhausted(
                "too many requests without valid credentials in flight; retry later",
            ),
            Refusal::UnauthenticatedRate => tonic::Status::resource_exhausted(
                "too many requests without valid credentials from this host; retry later",
            ),
            Refusal::StreamsPerConnection => tonic::Status::resource_exhausted(
                "too many streams without credentials on this connection",
            ),
            Refusal::HealthWatches => {
                tonic::Status::resource_exhausted("too many health watches; retry later")
            }
            Refusal::Scrapes => tonic::Status::resource_exhausted("too many scrapes at once"),
            Refusal::BodyTimeout => {
                tonic::Status::deadline_exceeded("the request body did not arrive in time")
            }
            Refusal::BodyTooLarge => tonic::Status::resource_exhausted("request too large"),
            Refusal::BodyBroken => tonic::Status::cancelled("the request body was not received"),
        }
    }

    fn response(self, grpc: bool) -> http::Response<Body> {
        if grpc {
            return self.status().into_http();
        }
        let mut response = http::Response::new(Body::new(http_body_util::Full::new(
            bytes::Bytes::from(format!("{}\n", self.status().message())),
        )));
        *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        response
    }
}

/// What kind of path a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `grpc.health.v1.Health/Check` (and any other unary health method): for probes, no
    /// credentials, no pool.
    HealthCheck,
    /// `grpc.health.v1.Health/Watch`: no credentials, lasts.
    HealthWatch,
    /// `byokd.v1.Vault`, unary: authenticated.
    Vault,
    /// `byokd.v1.Vault/WatchAudit`: authenticated, lasts; capped by the vault.
    VaultWatch,
    /// `/metrics` on the ops port.
    Metrics,
    /// Anything else (reflection, unknown paths): no credentials.
    Open,
}

fn route(path: &str, ops: bool) -> Route {
    if path == "/grpc.health.v1.Health/Watch" {
        Route::HealthWatch
    } else if path.starts_with("/grpc.health.v1.Health/") {
        Route::HealthCheck
    } else if path == "/byokd.v1.Vault/WatchAudit" {
        Route::VaultWatch
    } else if path.starts_with("/byokd.v1.Vault/") {
        Route::Vault
    } else if ops && path == "/metrics" {
        Route::Metrics
    } else {
        Route::Open
    }
}

impl Route {
    /// A stream without credentials that may last: counted per connection.
    fn lasting(self) -> bool {
        matches!(self, Route::HealthWatch | Route::Open)
    }
}

/// A request's place in a pool without credentials: its permit (if the pool has any) and
/// how long it may last.
type Place = (Option<OwnedSemaphorePermit>, Option<Duration>);

/// A permit of `pool`, or `refusal`.
fn pool(pool: &Arc<Semaphore>, refusal: Refusal) -> Result<Option<OwnedSemaphorePermit>, Refusal> {
    pool.clone()
        .try_acquire_owned()
        .map(Some)
        .map_err(|_| refusal)
}

/// A request admitted: the permits it holds until its response ends, and its body.
struct Admit {
    permits: Vec<OwnedSemaphorePermit>,
    /// The permits are released when the handler returns, not when the response ends.
    release_early: bool,
    /// How long the stream may last.
    lifetime: Option<Duration>,
    body: Body,
}

impl Admission {
    /// Admission for `principals` under `limits`; streams without credentials end after
    /// `stream_lifetime`.
    pub fn new(
        principals: Arc<Principals>,
        limits: Limits,
        stream_lifetime: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            principals,
            stream_lifetime,
            slots: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            unauthenticated_slots: Arc::new(Semaphore::new(limits.max_concurrent_unauthenticated)),
            health_watches: Arc::new(Semaphore::new(limits.max_health_watch_streams)),
            scrapes: Arc::new(Semaphore::new(MAX_SCRAPES)),
            principal_slots: Mutex::default(),
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

    /// The slots of one principal.
    fn principal_slots(&self, principal: &Principal) -> Arc<Semaphore> {
        let mut slots = self
            .principal_slots
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        slots
            .entry(principal.id.clone())
            .or_insert_with(|| {
                Arc::new(Semaphore::new(
                    self.limits.max_concurrent_requests_per_principal,
                ))
            })
            .clone()
    }

    /// The unauthenticated rate of the peer host: an error if it is spent.
    fn take_unauthenticated_rate(&self, connection: &Connection) -> Result<(), Refusal> {
        let host = connection.peer.map(|p| p.ip());
        let limit: RateLimit = self.limits.unauthenticated_rate_limit;
        // Requests without a peer address (never over TCP) share one bucket.
        let key = host.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if self.unauthenticated_rate.take(&key, limit) {
            Ok(())
        } else {
            self.count_refused(host);
            Err(Refusal::UnauthenticatedRate)
        }
    }

    /// The place of a request that needs no credentials (its permit, if its pool has one, and
    /// how long it may last); `None` for a vault request.
    fn place_without_credentials(
        &self,
        route: Route,
        connection: &Connection,
    ) -> Result<Option<Place>, Refusal> {
        Ok(Some(match route {
            Route::HealthCheck => (None, None),
            Route::Metrics => (pool(&self.scrapes, Refusal::Scrapes)?, None),
            Route::HealthWatch => {
                self.take_unauthenticated_rate(connection)?;
                (pool(&self.health_watches, Refusal::HealthWatches)?, None)
            }
            Route::Open => {
                self.take_unauthenticated_rate(connection)?;
                let permit = pool(&self.unauthenticated_slots, Refusal::UnauthenticatedBusy)?;
                (permit, Some(self.stream_lifetime))
            }
            Route::Vault | Route::VaultWatch => return Ok(None),
        }))
    }

    /// Decides on a request: the pool place it holds, or a refusal.
    async fn admit(
        &self,
        route: Route,
        connection: &Connection,
        parts: &mut http::request::Parts,
        body: Body,
    ) -> Result<Admit, Refusal> {
        let arrived = std::time::Instant::now();
        if let Some((permit, lifetime)) = self.place_without_credentials(route, connection)? {
            // May stream its request (reflection does): passed on as it is.
            return Ok(Admit {
                permits: permit.into_iter().collect(),
                release_early: false,
                lifetime,
                body,
            });
        }
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            // Present but not text: something that fails as malformed, not as missing.
            .map(|v| v.to_str().unwrap_or(""));
        let principal = self
            .principals
            .authenticate(header, &connection.certs)
            .cloned();
        let permit = if principal.is_ok() {
            Ok(None)
        } else {
            self.take_unauthenticated_rate(connection)
                .and_then(|()| pool(&self.unauthenticated_slots, Refusal::UnauthenticatedBusy))
        };
        // Vault requests are unary: the whole body, in time, also before a refusal (a
        // response that leaves the body unread ends in a stream reset, and many resets end
        // the whole connection, other callers' streams included).
        let body = self.read_body(body).await;
        let permit = permit?;
        let body = body?;
        let permits = match (permit, &principal) {
            (Some(permit), _) => vec![permit],
            (None, Ok(who)) => {
                // One principal's requests (responses it does not read, say) cannot take
                // every slot.
                let own = self
                    .principal_slots(who)
                    .try_acquire_owned()
                    .map_err(|_| Refusal::PrincipalBusy)?;
                let slot = self
                    .slots
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refusal::Busy)?;
                vec![own, slot]
            }
            (None, Err(_)) => Vec::new(),
        };
        parts.extensions.insert(Admitted {
            principal,
            peer: connection.peer_text.clone(),
            arrived,
        });
        Ok(Admit {
            permits,
            release_early: route == Route::VaultWatch,
            lifetime: None,
            body,
        })
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
pub struct AdmissionLayer {
    admission: Arc<Admission>,
    ops: bool,
}

impl AdmissionLayer {
    /// Admission for the main port.
    pub fn main(admission: Arc<Admission>) -> Self {
        Self {
            admission,
            ops: false,
        }
    }

    /// Admission for the ops port (`/metrics` and health).
    pub fn ops(admission: Arc<Admission>) -> Self {
        Self {
            admission,
            ops: true,
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            admission: self.admission.clone(),
            ops: self.ops,
        }
    }
}

/// A service behind admission.
#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    admission: Arc<Admission>,
    ops: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> Service<http::Request<B>> for AdmissionService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone is ready only after poll_ready; the polled one serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let admission = self.admission.clone();
        let ops = self.ops;
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let route = route(parts.uri.path(), ops);
            let grpc = route != Route::Metrics;
            let connection = Connection::of(&parts.extensions);
            let Some(guard) = connection.open_stream(
                route.lasting(),
                admission.limits.max_unauthenticated_streams_per_connection,
            ) else {
                let refusal = Refusal::StreamsPerConnection;
                crate::metrics::global().admission_refused(refusal.reason());
                return Ok(refusal.response(grpc));
            };
            match admission
                .admit(route, &connection, &mut parts, Body::new(body))
                .await
            {
                Ok(admitted) => {
                    let mut permits = admitted.permits;
                    let response = inner
                        .call(http::Request::from_parts(parts, admitted.body))
                        .await
                        .map_err(Into::into)?;
                    if admitted.release_early {
                        permits.clear();
                    }
                    Ok(response.map(|body| {
                        Body::new(Tracked::new(body, guard, permits, admitted.lifetime))
                    }))
                }
                Err(refusal) => {
                    crate::metrics::global().admission_refused(refusal.reason());
                    Ok(refusal.response(grpc))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_by_service_method_and_port() {
        assert_eq!(
            route("/grpc.health.v1.Health/Check", false),
            Route::HealthCheck
        );
        assert_eq!(
            route("/grpc.health.v1.Health/Watch", true),
            Route::HealthWatch
        );
        assert_eq!(route("/byokd.v1.Vault/Get", false), Route::Vault);
        assert_eq!(
            route("/byokd.v1.Vault/WatchAudit", false),
            Route::VaultWatch
        );
        assert_eq!(
            route(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                false
            ),
            Route::Open
        );
        assert_eq!(route("/metrics", true), Route::Metrics);
        assert_eq!(route("/metrics", false), Route::Open);
        assert_eq!(route("/evil/x", false), Route::Open);
    }

    #[test]
    fn refused_requests_are_reported_per_host_most_first_then_together() {
        let admission = Admission::new(Arc::default(), test_limits(), Duration::from_secs(30));
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
