//! Connections: how many are open, how long each may go without doing anything useful, and
//! what a request learns of the one it came on.
//!
//! - [`Incoming`] accepts at most `max_connections` at once, and none once the process's open
//!   files reach the limit less a reserve kept for the store ([`descriptor_ceiling`]); a
//!   connection over either cap is closed as soon as it is accepted.
//! - [`Guarded`] is an accepted connection. It keeps a record of its streams
//!   ([`StreamGuard`], taken by admission for each request) and is closed (its reads and writes
//!   fail, which ends every stream on it) when:
//!   - no request arrives within the handshake timeout (TLS handshake, HTTP/2 preface, the
//!     first request's headers);
//!   - no request is in progress for the idle timeout;
//!   - a response makes no progress for the stall timeout: a frame handed to the transport is
//!     not taken (the peer grants no HTTP/2 flow-control credit), or the socket accepts no
//!     bytes (the peer reads nothing).
//!
//!   It also gathers what the transport writes until a flush, and puts the first flush of a
//!   batch off by one turn of its task, so that the responses of one commit group leave in
//!   one write instead of one each (BENCHMARKS.md, "Responses that leave together").
//! - [`Tracked`] is a response body under that watch: it hands the transport at most
//!   [`PIECE`] bytes at a time (so that a response the peer does not read is seen as stalled
//!   instead of disappearing into the transport's buffers), holds the admission permit of its
//!   request until it ends, and may end a stream that lasts too long.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::transport::server::{Connected, TlsConnectInfo};

use crate::auth::CertIdentity;

/// How long the accept loop pauses after an error (out of file descriptors, say), instead of
/// spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The most of a response body handed to the transport at once.
pub const PIECE: usize = 16 * 1024;
/// The most a connection buffers before it writes to its socket.
const OUT_BUFFER: usize = 64 * 1024;

/// How long a connection may go without doing something useful.
#[derive(Debug, Clone, Copy)]
pub struct ConnTimeouts {
    /// From accept to the first request's headers.
    pub handshake: Duration,
    /// With no request in progress.
    pub idle: Duration,
    /// A response that the peer does not take.
    pub stall: Duration,
}

impl ConnTimeouts {
    /// How often a connection with requests in progress looks at them.
    fn period(&self) -> Duration {
        (self.stall.min(self.idle) / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// The record of a connection's streams, shared by the connection and its requests.
#[derive(Debug)]
struct ConnState {
    activity: Mutex<Activity>,
}

#[derive(Debug)]
struct Activity {
    /// A request has arrived: the handshake deadline no longer applies.
    started: bool,
    /// Requests in progress: admitted and their response not yet ended.
    streams: usize,
    /// Of those, streams without credentials that may last (see [`StreamGuard::lasting`]).
    lasting: usize,
    /// When `streams` last became zero.
    idle_since: Instant,
    /// Streams that handed a frame to the transport and were not asked for the next one
    /// since: stream id, and when.
    waiting: Vec<(u64, Instant)>,
    next_id: u64,
}

impl ConnState {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            activity: Mutex::new(Activity {
                started: false,
                streams: 0,
                lasting: 0,
                idle_since: Instant::now(),
                waiting: Vec::new(),
                next_id: 0,
            }),
        })
    }

    fn activity(&self) -> MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the transport knows of a request's connection.
pub struct Connection {
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// The peer's address as text (as the audit trail records it).
    pub peer_text: Option<Arc<str>>,
    /// The identities in the client certificate (mutual TLS).
    pub certs: Vec<CertIdentity>,
    state: Option<Arc<ConnState>>,
}

impl Connection {
    /// The connection a request came on, from the request's extensions.
    pub fn of(extensions: &http::Extensions) -> Self {
        // With TLS, tonic inserts both; the TLS one carries the client certificate.
        if let Some(tls) = extensions.get::<TlsConnectInfo<ConnInfo>>() {
            let info = tls.get_ref();
            return Connection {
                peer: Some(info.remote),
                peer_text: Some(info.remote_text.clone()),
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
                peer_text: Some(info.remote_text.clone()),
                certs: Vec::new(),
                state: Some(info.state.clone()),
            },
            None => Connection {
                peer: None,
                peer_text: None,
                certs: Vec::new(),
                state: None,
            },
        }
    }

    /// Records a new stream on this connection; `lasting` ones count against `max_lasting`
    /// (`None`: over it). Without a connection record (not over TCP), a guard that records
    /// nothing.
    pub fn open_stream(&self, lasting: bool, max_lasting: usize) -> Option<StreamGuard> {
        let Some(state) = &self.state else {
            return Some(StreamGuard { state: None });
        };
        let mut activity = state.activity();
        activity.started = true;
        if lasting && activity.lasting >= max_lasting {
            return None;
        }
        activity.streams += 1;
        activity.lasting += usize::from(lasting);
        let id = activity.next_id;
        activity.next_id += 1;
        Some(StreamGuard {
            state: Some((state.clone(), id, lasting)),
        })
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

/// One request in progress on a connection, until dropped (with its response body).
pub struct StreamGuard {
    /// The connection, the stream's id, and whether it is a lasting stream without
    /// credentials.
    state: Option<(Arc<ConnState>, u64, bool)>,
}

impl StreamGuard {
    /// The stream handed a frame to the transport (`true`), or was asked for the next one.
    fn waiting(&self, waiting: bool) {
        let Some((state, id, _)) = &self.state else {
            return;
        };
        let mut activity = state.activity();
        activity.waiting.retain(|(other, _)| other != id);
        if waiting {
            activity.waiting.push((*id, Instant::now()));
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let Some((state, id, lasting)) = &self.state else {
            return;
        };
        let mut activity = state.activity();
        activity.waiting.retain(|(other, _)| other != id);
        activity.streams = activity.streams.saturating_sub(1);
        activity.lasting = activity.lasting.saturating_sub(usize::from(*lasting));
        if activity.streams == 0 {
            activity.idle_since = Instant::now();
        }
    }
}

/// A response body under watch: see the module documentation.
pub struct Tracked {
    inner: Body,
    guard: StreamGuard,
    /// The guard says this stream is waiting for the transport.
    marked: bool,
    /// Of a data frame, what is still to be handed out.
    rest: Bytes,
    /// The request's admission permits, released when the body ends.
    permits: Vec<OwnedSemaphorePermit>,
    /// When the stream is ended (`DEADLINE_EXCEEDED`), however it is doing.
    lifetime: Option<Pin<Box<Sleep>>>,
    ended: bool,
}

impl Tracked {
    /// `inner`, watched by `guard`, holding `permits` until it ends, and ended after
    /// `lifetime` if given.
    pub fn new(
        inner: Body,
        guard: StreamGuard,
        permits: Vec<OwnedSemaphorePermit>,
        lifetime: Option<Duration>,
    ) -> Self {
        Self {
            inner,
            guard,
            marked: false,
            rest: Bytes::new(),
            permits,
            lifetime: lifetime.map(|d| Box::pin(tokio::time::sleep(d))),
            ended: false,
        }
    }

    fn next_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if !self.rest.is_empty() {
            let piece = self.rest.split_to(PIECE.min(self.rest.len()));
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        if let Some(lifetime) = &mut self.lifetime
            && lifetime.as_mut().poll(cx).is_ready()
        {
            self.ended = true;
            self.permits.clear();
            let status = tonic::Status::deadline_exceeded("the stream was open too long");
            let mut trailers = http::HeaderMap::new();
            return Poll::Ready(Some(match status.add_header(&mut trailers) {
                Ok(()) => Ok(Frame::trailers(trailers)),
                Err(status) => Err(status),
            }));
        }
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            None => {
                self.ended = true;
                self.permits.clear();
                Poll::Ready(None)
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    if data.len() > PIECE {
                        self.rest = data.split_off(PIECE);
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if this.marked {
            this.marked = false;
            this.guard.waiting(false);
        }
        let frame = ready!(this.next_frame(cx));
        if matches!(&frame, Some(Ok(frame)) if frame.is_data()) {
            this.marked = true;
            this.guard.waiting(true);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.rest.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// The connection info a request finds in its extensions (wrapped in [`TlsConnectInfo`]
/// with TLS).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    remote: SocketAddr,
    /// `remote` as text, written once for the connection's requests.
    remote_text: Arc<str>,
    state: Arc<ConnState>,
}

/// An accepted connection: holds its place under its listener's cap until it closes, and is
/// closed when one of its [`ConnTimeouts`] passes.
pub struct Guarded {
    stream: TcpStream,
    remote: SocketAddr,
    remote_text: Arc<str>,
    state: Arc<ConnState>,
    timeouts: ConnTimeouts,
    opened: Instant,
    /// Since when the socket has accepted no bytes.
    write_blocked_since: Option<Instant>,
    /// Wakes the connection for its next look at the deadlines; `None` when it fired.
    timer: Pin<Box<Sleep>>,
    timer_armed: bool,
    open_gauge: bool,
    /// Bytes the transport wrote that the socket has not taken yet (see [`Guarded::poll_flush`]).
    out: Vec<u8>,
    /// The flush asked for `out` was put off once already.
    flush_deferred: bool,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Guarded {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info()
    }
}

impl Guarded {
    /// What a request on this connection finds in its extensions.
    pub fn info(&self) -> ConnInfo {
        ConnInfo {
            remote: self.remote,
            remote_text: self.remote_text.clone(),
            state: self.state.clone(),
        }
    }

    /// An error if one of the connection's deadlines passed; otherwise, arms the timer for
    /// the next look.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let now = Instant::now();
        let (fatal, look) = self.deadlines(now);
        if let Some((at, reason)) = fatal
            && at <= now
        {
            crate::metrics::global().connection_dropped(reason);
            return Err(io::Error::new(io::ErrorKind::TimedOut, reason));
        }
        let next = match (fatal, look) {
            (Some((at, _)), Some(look)) => at.min(look),
            (Some((at, _)), None) => at,
            (None, Some(look)) => look,
            (None, None) => return Ok(()),
        };
        // An armed timer that fires sooner only brings the next look forward.
        if !self.timer_armed || self.timer.deadline() > next {
            self.timer.as_mut().reset(next);
            self.timer_armed = true;
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            self.timer_armed = false;
            cx.waker().wake_by_ref();
        }
        Ok(())
    }

    /// The first deadline that closes the connection and why, and when to look again
    /// without one (requests in progress change what the deadlines are).
    fn deadlines(&self, now: Instant) -> (Option<(Instant, &'static str)>, Option<Instant>) {
        let activity = self.state.activity();
        let mut fatal: Option<(Instant, &'static str)> = None;
        let mut consider = |at: Instant, reason: &'static str| {
            if fatal.is_none_or(|(first, _)| at < first) {
                fatal = Some((at, reason));
            }
        };
        let mut look = None;
        if !activity.started {
            consider(self.opened + self.timeouts.handshake, "handshake_timeout");
        } else if activity.streams == 0 {
            consider(activity.idle_since + self.timeouts.idle, "idle_timeout");
        } else {
            if let Some(oldest) = activity.waiting.iter().map(|(_, since)| *since).min() {
                consider(oldest + self.timeouts.stall, "stalled");
            }
            look = Some(now + self.timeouts.period());
        }
        if let Some(since) = self.write_blocked_since {
            consider(since + self.timeouts.stall, "stalled");
        }
        (fatal, look)
    }

    /// Hands `out` to the socket; `Pending` while the socket takes no more.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let result = Pin::new(&mut self.stream).poll_write(cx, &self.out);
            match ready!(self.written(cx, result)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `bufs` into `out`, as much as fits (at least one byte, once `out` is drained).
    fn poll_buffer(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.out.len() + total > OUT_BUFFER && !self.out.is_empty() {
            ready!(self.poll_drain(cx))?;
        }
        let room = OUT_BUFFER.saturating_sub(self.out.len()).max(1);
        let mut taken = 0;
        for buf in bufs {
            let n = buf.len().min(room - taken);
            self.out.extend_from_slice(&buf[..n]);
            taken += n;
            if taken == room {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }

    fn written<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => {
                if self.write_blocked_since.is_none() {
                    self.write_blocked_since = Some(Instant::now());
                }
                self.check(cx)?;
                Poll::Pending
            }
            ready => {
                self.write_blocked_since = None;
                ready
            }
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
        this.check(cx)?;
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_buffer(cx, &[io::IoSlice::new(buf)])
    }

    /// Writes what the transport buffered. The first flush of a batch is put off once (the
    /// connection's task yields): responses that other tasks finish meanwhile (a commit group
    /// answers many at once) then leave in the same write, instead of one system call and
    /// one wake-up of the peer for each.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.out.is_empty() && !this.flush_deferred {
            this.flush_deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.flush_deferred = false;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_buffer(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.open_gauge {
            crate::metrics::global().connections_open.dec();
        }
    }
}

/// The accepted connections of a listener, under its connection cap.
pub struct Incoming {
    listener: TcpListener,
    places: Arc<Semaphore>,
    /// See [`descriptor_ceiling`].
    descriptor_ceiling: Option<u64>,
    timeouts: ConnTimeouts,
    /// Counted in `byokd_connections_open` (the main port's).
    open_gauge: bool,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Connections accepted on `listener`: at most `max_connections` open at once, none on a
    /// descriptor at or above `descriptor_ceiling`, each closed when one of `timeouts`
    /// passes. `open_gauge`: counted in `byokd_connections_open`.
    pub fn new(
        listener: TcpListener,
        max_connections: usize,
        descriptor_ceiling: Option<u64>,
        timeouts: ConnTimeouts,
        open_gauge: bool,
    ) -> Self {
        Self {
            listener,
            places: Arc::new(Semaphore::new(max_connections)),
            descriptor_ceiling,
            timeouts,
            open_gauge,
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
            if this.open_gauge {
                crate::metrics::global().connections_open.inc();
            }
            let opened = Instant::now();
            return Poll::Ready(Some(Ok(Guarded {
                stream,
                remote,
                remote_text: remote.to_string().into(),
                state: ConnState::new(),
                timeouts: this.timeouts,
                opened,
                write_blocked_since: None,
                timer: Box::pin(tokio::time::sleep_until(opened + this.timeouts.handshake)),
                timer_armed: false,
                open_gauge: this.open_gauge,
                out: Vec::new(),
                flush_deferred: false,
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
    use std::task::Waker;
    use tokio::io::AsyncReadExt;

    /// A connection accepted on loopback, and its peer.
    async fn pair() -> (Guarded, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let timeouts = ConnTimeouts {
            handshake: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            stall: Duration::from_secs(60),
        };
        let mut incoming = Incoming::new(listener, 4, None, timeouts, false);
        let guarded = std::future::poll_fn(|cx| Pin::new(&mut incoming).poll_next(cx))
            .await
            .unwrap()
            .unwrap();
        (guarded, peer)
    }

    fn poll_flush(conn: &mut Guarded) -> Poll<io::Result<()>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(conn).poll_flush(&mut cx)
    }

    fn poll_write(conn: &mut Guarded, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(conn).poll_write(&mut cx, buf)
    }

    /// Whatever the peer can read now, without waiting.
    async fn readable_now(peer: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(50), peer.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return got,
            }
        }
    }

    #[tokio::test]
    async fn writes_before_a_deferred_flush_leave_together() {
        let (mut conn, mut peer) = pair().await;
        assert!(matches!(
            poll_write(&mut conn, b"first "),
            Poll::Ready(Ok(6))
        ));
        // The first flush yields: nothing has left yet.
        assert!(poll_flush(&mut conn).is_pending());
        assert!(readable_now(&mut peer).await.is_empty());
        // What another task adds meanwhile leaves with it, at the next flush.
        assert!(matches!(
            poll_write(&mut conn, b"second"),
            Poll::Ready(Ok(6))
        ));
        assert!(matches!(poll_flush(&mut conn), Poll::Ready(Ok(()))));
        assert_eq!(readable_now(&mut peer).await, b"first second");
        // A flush with nothing buffered does not yield.
        assert!(matches!(poll_flush(&mut conn), Poll::Ready(Ok(()))));
        // The next batch is put off once again.
        assert!(matches!(
            poll_write(&mut conn, b"third"),
            Poll::Ready(Ok(5))
        ));
        assert!(poll_flush(&mut conn).is_pending());
        assert!(matches!(poll_flush(&mut conn), Poll::Ready(Ok(()))));
        assert_eq!(readable_now(&mut peer).await, b"third");
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_stops_the_writer_with_at_most_a_buffer_held() {
        let (mut conn, _peer) = pair().await;
        let chunk = vec![7u8; 256 * 1024];
        let mut accepted = 0usize;
        let blocked = loop {
            match poll_write(&mut conn, &chunk) {
                Poll::Ready(Ok(n)) => {
                    assert!(n > 0 && n <= OUT_BUFFER);
                    accepted += n;
                    assert!(accepted < 256 * 1024 * 1024, "the socket never pushed back");
                }
                Poll::Ready(Err(e)) => panic!("write failed: {e}"),
                Poll::Pending => break true,
            }
        };
        assert!(blocked);
        assert!(conn.out.len() <= OUT_BUFFER);
        assert!(conn.write_blocked_since.is_some());
        assert!(poll_flush(&mut conn).is_pending());
    }

    #[tokio::test]
    async fn shutdown_sends_what_was_buffered() {
        let (mut conn, mut peer) = pair().await;
        assert!(matches!(
            poll_write(&mut conn, b"last words"),
            Poll::Ready(Ok(10))
        ));
        std::future::poll_fn(|cx| Pin::new(&mut conn).poll_shutdown(cx))
            .await
            .unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }
}
