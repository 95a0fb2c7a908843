//! Graceful drain of a listener's connections: on shutdown, every open connection is asked to
//! finish (HTTP/1.1 closes after the response in progress, HTTP/2 sends GOAWAY) and the
//! listener waits until all have ended.
//!
//! hyper-util's `GracefulShutdown` does the same with a `watch` channel, whose `changed()`
//! future takes the channel's mutex every time a connection is polled, that is twice per
//! keep-alive request, and on a multi-threaded runtime every worker takes that one mutex.
//! Here a poll costs one atomic load: a connection puts its task's waker in the shared list
//! once (again only if the task's waker changes), and the drain wakes them all.

use std::collections::HashMap;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Waker};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

/// A connection that can be asked to finish: hyper-util's server connections (its trait is
/// sealed, so tests implement this one).
pub(crate) trait Finish: Future {
    fn finish(self: Pin<&mut Self>);
}

impl<C: GracefulConnection> Finish for C {
    fn finish(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The drain of one listener's connections.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    draining: AtomicBool,
    /// Connections counted by the drain: every [`Watcher`] alive.
    open: AtomicUsize,
    /// Wakes [`Drain::shutdown`] when `open` reaches 0.
    closed: Notify,
    /// Ids for `wakers`.
    next_id: AtomicU64,
    /// The task waker of each connection being served.
    wakers: Mutex<HashMap<u64, Waker>>,
}

impl Shared {
    fn wakers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waker>> {
        // A panic while the lock was held left a map of wakers, which is still usable.
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drain {
    /// A new connection, counted until the returned watcher is dropped (so one still in its
    /// TLS handshake is waited for too).
    pub(crate) fn watcher(&self) -> Watcher {
        self.shared.open.fetch_add(1, Ordering::AcqRel);
        Watcher {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Connections counted now.
    pub(crate) fn count(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Asks every connection to finish, then waits until all watchers are gone.
    pub(crate) async fn shutdown(self) {
        let shared = self.shared;
        shared.draining.store(true, Ordering::Release);
        for waker in shared.wakers().values() {
            waker.wake_by_ref();
        }
        while shared.open.load(Ordering::Acquire) > 0 {
            // `notify_one` leaves a permit when nobody waits yet, so a last connection that
            // ends between the check and this wait is not missed.
            shared.closed.notified().await;
        }
    }
}

/// One connection's place in a [`Drain`].
#[derive(Debug)]
pub(crate) struct Watcher {
    shared: Arc<Shared>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if self.shared.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.closed.notify_one();
        }
    }
}

impl Watcher {
    /// Serves `conn` to its end, asking it to finish once the drain starts.
    pub(crate) async fn watch<C: Finish>(self, conn: C) -> C::Output {
        let mut conn = pin!(conn);
        let mut registered = Registration {
            shared: &self.shared,
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            waker: None,
            asked: false,
        };
        std::future::poll_fn(|cx| {
            if registered.drain_started(cx) {
                conn.as_mut().finish();
            }
            conn.as_mut().poll(cx)
        })
        .await
    }
}

/// A connection's waker in the shared list, removed when the connection ends.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
    /// The waker last put in the list.
    waker: Option<Waker>,
    /// Whether the connection has been asked to finish.
    asked: bool,
}

impl Registration<'_> {
    /// Whether the connection should be asked to finish now (true once).
    fn drain_started(&mut self, cx: &Context<'_>) -> bool {
        if self.asked {
            return false;
        }
        if !self.shared.draining.load(Ordering::Acquire) {
            if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return false;
            }
            let waker = cx.waker().clone();
            self.shared.wakers().insert(self.id, waker.clone());
            self.waker = Some(waker);
            // The drain may have started, and woken the list, before this waker was in it:
            // the lock orders this load after its flag.
            if !self.shared.draining.load(Ordering::Acquire) {
                return false;
            }
        }
        self.asked = true;
        true
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.waker.is_some() {
            self.shared.wakers().remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;
    use std::time::Duration;

    /// A connection that ends only after it was asked to finish.
    struct Conn {
        asked: Arc<AtomicBool>,
        polls: Arc<AtomicUsize>,
    }

    impl Future for Conn {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<&'static str> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.asked.load(Ordering::Relaxed) {
                Poll::Ready("finished")
            } else {
                Poll::Pending
            }
        }
    }

    impl Finish for Conn {
        fn finish(self: Pin<&mut Self>) {
            self.asked.store(true, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn shutdown_asks_idle_connections_and_waits_for_all_of_them() {
        let drain = Drain::default();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut served = Vec::new();
        for _ in 0..3 {
            let conn = Conn {
                asked: Arc::default(),
                polls: Arc::clone(&polls),
            };
            served.push(tokio::spawn(drain.watcher().watch(conn)));
        }
        // A connection still in its handshake: counted, never served.
        let handshake = drain.watcher();
        // Every connection has been polled once and is now idle (Pending, not woken).
        tokio::time::timeout(Duration::from_secs(5), async {
            while polls.load(Ordering::Relaxed) < 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("each spawned connection is polled");
        assert_eq!(drain.count(), 4);
        assert_eq!(drain.shared.wakers().len(), 3);

        let shared = Arc::clone(&drain.shared);
        let shutdown = tokio::spawn(drain.shutdown());
        for s in served {
            let out = tokio::time::timeout(Duration::from_secs(5), s)
                .await
                .expect("an idle connection is woken and asked to finish")
                .unwrap();
            assert_eq!(out, "finished");
        }
        assert!(
            shared.wakers().is_empty(),
            "ended connections leave the list"
        );
        // The test runtime has one thread: these turns let the drain run if it could.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(shared.open.load(Ordering::Acquire), 1);
        assert!(
            !shutdown.is_finished(),
            "the drain waits for the connection in its handshake"
        );
        drop(handshake);
        tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("the drain ends with the last connection")
            .unwrap();
    }

    #[tokio::test]
    async fn a_connection_that_arrives_during_the_drain_is_asked_at_once() {
        let drain = Drain::default();
        let watcher = drain.watcher();
        drain.shared.draining.store(true, Ordering::Release);
        let conn = Conn {
            asked: Arc::default(),
            polls: Arc::default(),
        };
        let out = tokio::time::timeout(Duration::from_secs(5), watcher.watch(conn))
            .await
            .expect("asked to finish on its first poll");
        assert_eq!(out, "finished");
        assert!(drain.shared.wakers().is_empty());
        assert_eq!(drain.count(), 0);
    }
}
