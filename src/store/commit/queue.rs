//! The writer's queue, and the watchdog that empties it of commits while a write stalls.
//!
//! The writer takes messages from the queue between groups. While it is inside a group's
//! write that has taken longer than [`STALL`], the watchdog takes the queued commits out and
//! refuses them (they were not applied: nothing of them is written), and keeps every other
//! message, in order, for the writer. A message is taken by exactly one of the two.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::{Message, STALL, Status, stalled};

/// The queue of messages for the writer.
pub(super) struct Queue<A> {
    rx: Mutex<mpsc::Receiver<Message<A>>>,
    /// Messages other than commits that the watchdog took out, in order: they come first.
    held: Mutex<VecDeque<Message<A>>>,
    /// Set when the writer stops.
    stopped: AtomicBool,
}

impl<A: Send + 'static> Queue<A> {
    /// The queue of `rx`, and its watchdog (a thread that checks every [`STALL`] / 4).
    pub(super) fn start(
        rx: mpsc::Receiver<Message<A>>,
        status: Arc<Status>,
    ) -> std::io::Result<Arc<Self>> {
        let queue = Arc::new(Self {
            rx: Mutex::new(rx),
            held: Mutex::new(VecDeque::new()),
            stopped: AtomicBool::new(false),
        });
        let watched = queue.clone();
        std::thread::Builder::new()
            .name("byokd-store-watchdog".into())
            .spawn(move || {
                while !watched.stopped.load(Ordering::Acquire) {
                    std::thread::sleep(STALL / 4);
                    watched.refuse_while_stalled(&status);
                }
            })?;
        Ok(queue)
    }

    /// The next message, waiting for one; `None` once every sender is gone.
    pub(super) fn recv(&self) -> Option<Message<A>> {
        // `held` is read under the receiver's lock, which the watchdog holds while it moves
        // messages there: none can arrive in `held` while the writer waits on the receiver.
        let mut rx = self.rx();
        if let Some(message) = self.held().pop_front() {
            return Some(message);
        }
        rx.blocking_recv()
    }

    /// The next message, if one is queued.
    pub(super) fn try_recv(&self) -> Option<Message<A>> {
        let mut rx = self.rx();
        if let Some(message) = self.held().pop_front() {
            return Some(message);
        }
        rx.try_recv().ok()
    }

    /// Tells the watchdog to stop.
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// If the group being written has taken longer than [`STALL`], refuses the commits
    /// queued behind it.
    fn refuse_while_stalled(&self, status: &Status) {
        if status.writing_for().is_none_or(|w| w <= STALL) {
            return;
        }
        // The writer holds the receiver only between groups: then nothing is stalled.
        let Ok(mut rx) = self.rx.try_lock() else {
            return;
        };
        while let Ok(message) = rx.try_recv() {
            // The stall may have ended since it was seen: a commit sent after it ended (its
            // caller may have waited for the stalled one) goes to the writer, in order.
            let waited = match status.writing_for() {
                Some(waited) if waited > STALL => waited,
                _ => {
                    self.held().push_back(message);
                    continue;
                }
            };
            match message {
                Message::Commit(_, reply) => {
                    // The caller may have gone away; nothing of its commit was written.
                    let _ = reply.send(Err(stalled(waited)));
                }
                other => self.held().push_back(other),
            }
        }
    }

    fn rx(&self) -> MutexGuard<'_, mpsc::Receiver<Message<A>>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn held(&self) -> MutexGuard<'_, VecDeque<Message<A>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}
