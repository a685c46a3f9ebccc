//! The live audit feed of a store that several processes write: every replica's entries, in
//! seq order, as they commit.
//!
//! Each group that appends entries sends a NOTIFY in its transaction (so it is delivered only
//! if the group commits), naming its last entry. A follower task LISTENs on a connection of
//! its own and, woken by a notification of entries it has not passed on or by a one-second
//! tick, reads the entries after the last one it passed on from the table, which is the source
//! of truth. This process's own commits, which come committed and in order, it passes on as
//! they are when they follow the last entry passed on, and reads the table when they do not
//! (another replica's entries came in between). After a lost
//! connection it connects and LISTENs again and then reads what it missed: a notification
//! sent meanwhile costs nothing. Entries become visible in seq order (groups commit one after
//! another under the writers' lock), so what it passes on has no gaps.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{Notify, broadcast, watch};
use tokio_postgres::AsyncMessage;

use super::Target;

use crate::model::AuditRecord;
use crate::store::StoreError;
use crate::store::codec;

use super::unavailable;

/// Entries read per statement.
const PAGE: i64 = 1024;
/// How often the table is read without a notification.
const TICK: Duration = Duration::from_secs(1);
/// The longest wait between attempts to reconnect.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The feed: subscribers, the latest entry passed on, and the follower task.
pub(super) struct Feed {
    sender: broadcast::Sender<Arc<AuditRecord>>,
    head: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

/// The channel a schema's groups notify.
pub(super) fn channel(schema: &str) -> String {
    format!("byokd_audit_{schema}")
}

impl Feed {
    /// Starts following the trail of `schema` after entry `head`; `own` carries this
    /// process's own commits (a wake-up only: entries are read from the table).
    pub(super) fn start(
        target: Target,
        pool: Pool,
        schema: &str,
        head: u64,
        capacity: usize,
        own: broadcast::Receiver<Arc<AuditRecord>>,
    ) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        let head = Arc::new(AtomicU64::new(head));
        let (stop, stopped) = watch::channel(false);
        let follower = Follower {
            target,
            pool,
            channel: channel(schema),
            read: format!(
                "SELECT seq, record FROM {schema}.audit WHERE seq > $1 ORDER BY seq LIMIT $2"
            ),
            sender: sender.clone(),
            head: head.clone(),
            stopped,
        };
        tokio::spawn(follower.run(own));
        Self { sender, head, stop }
    }

    /// Entries from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Arc<AuditRecord>> {
        self.sender.subscribe()
    }

    /// The latest entry passed on.
    pub(super) fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Stops the follower.
    pub(super) fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

struct Follower {
    target: Target,
    pool: Pool,
    channel: String,
    read: String,
    sender: broadcast::Sender<Arc<AuditRecord>>,
    head: Arc<AtomicU64>,
    stopped: watch::Receiver<bool>,
}

impl Follower {
    async fn run(mut self, mut own: broadcast::Receiver<Arc<AuditRecord>>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let notified = Arc::new(Notify::new());
            let notified_up_to = Arc::new(AtomicU64::new(0));
            let (client, pump) = match self.listen(notified.clone(), notified_up_to.clone()).await {
                Ok(listening) => listening,
                Err(e) => {
                    tracing::warn!(error = %e, "audit feed: cannot LISTEN; trying again");
                    crate::metrics::global().store_listen_reconnects.inc();
                    if self.pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut read = true;
            let mut own_open = true;
            loop {
                if read && let Err(e) = self.pass_on().await {
                    tracing::warn!(error = %e, "audit feed: cannot read the trail");
                }
                self.gauge_pool();
                read = tokio::select! {
                    () = notified.notified() => {
                        notified_up_to.load(Ordering::Acquire) > self.head.load(Ordering::Acquire)
                    }
                    received = own.recv(), if own_open => {
                        own_open = !matches!(received, Err(broadcast::error::RecvError::Closed));
                        !self.pass_own(received, &mut own)
                    }
                    () = tokio::time::sleep(TICK) => true,
                    _ = self.stopped.changed() => {
                        pump.abort();
                        return;
                    }
                };
                if pump.is_finished() {
                    tracing::warn!("audit feed: the LISTEN connection ended; reconnecting");
                    crate::metrics::global().store_listen_reconnects.inc();
                    break;
                }
            }
            drop(client);
        }
    }

    /// Connects and LISTENs; the connection's messages wake `notified`.
    async fn listen(
        &self,
        notified: Arc<Notify>,
        up_to: Arc<AtomicU64>,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let (client, mut connection) = self.target.config.connect(self.target.tls.clone()).await?;
        let pump = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        // The group's last entry (anything unreadable: read the table).
                        let last = n.payload().parse().unwrap_or(u64::MAX);
                        up_to.fetch_max(last, Ordering::AcqRel);
                        notified.notify_one();
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        });
        if let Err(e) = client
            .batch_execute(&format!("LISTEN {}", self.channel))
            .await
        {
            pump.abort();
            return Err(e);
        }
        Ok((client, pump))
    }

    /// Passes on the entries after the last one passed on.
    async fn pass_on(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let statement = client
            .prepare_cached(&self.read)
            .await
            .map_err(unavailable)?;
        loop {
            let last = self.head.load(Ordering::Acquire);
            let rows = client
                .query(&statement, &[&(last as i64), &PAGE])
                .await
                .map_err(unavailable)?;
            for row in &rows {
                let seq: i64 = row.get(0);
                let record: AuditRecord =
                    codec::decode(&codec::audit_key(seq as u64), row.get::<_, &[u8]>(1))?;
                self.head.fetch_max(record.seq, Ordering::AcqRel);
                // No subscriber is fine; a lagging one is told so by the channel.
                let _ = self.sender.send(Arc::new(record));
            }
            if (rows.len() as i64) < PAGE {
                return Ok(());
            }
        }
    }

    /// Passes on this process's own committed entries that follow the last one passed on
    /// (`received`, then any queued behind it). False if the table must be read: an entry
    /// does not follow on (another replica's came in between), or some were missed.
    fn pass_own(
        &self,
        mut received: Result<Arc<AuditRecord>, broadcast::error::RecvError>,
        own: &mut broadcast::Receiver<Arc<AuditRecord>>,
    ) -> bool {
        loop {
            let record = match received {
                Ok(record) => record,
                Err(broadcast::error::RecvError::Closed) => return true,
                Err(broadcast::error::RecvError::Lagged(_)) => return false,
            };
            let head = self.head.load(Ordering::Acquire);
            if record.seq == head + 1 {
                self.head.store(record.seq, Ordering::Release);
                // No subscriber is fine; a lagging one is told so by the channel.
                let _ = self.sender.send(record);
            } else if record.seq > head {
                return false;
            }
            received = match own.try_recv() {
                Ok(record) => Ok(record),
                Err(broadcast::error::TryRecvError::Empty) => return true,
                Err(broadcast::error::TryRecvError::Closed) => {
                    Err(broadcast::error::RecvError::Closed)
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
            };
        }
    }

    /// Sets the read pool's gauges (the feed's tick is their clock).
    fn gauge_pool(&self) {
        let status = self.pool.status();
        let pool = &crate::metrics::global().store_pool;
        let set = |state, n: usize| {
            pool.get_or_create(&crate::metrics::PoolLabels { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        set("open", status.size);
        set("idle", status.available);
        set("waiting", status.waiting);
    }

    /// Waits `pause`; true if the feed is stopping.
    async fn pause(&mut self, pause: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(pause) => *self.stopped.borrow(),
            _ = self.stopped.changed() => true,
        }
    }
}
