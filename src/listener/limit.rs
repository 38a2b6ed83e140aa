//! `proxy.max_connections`: one count of open client connections shared by the proxy's
//! listeners. At the limit an accept loop stops calling `accept`, so new connections wait
//! in the kernel's backlog (and past it, the kernel refuses them), until one closes.
//! A loop waits for room without holding a slot and takes its slot after `accept`, so
//! idle listeners do not eat into the limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The open-connection count and its limit.
#[derive(Debug)]
pub struct ConnLimit {
    /// 0: no limit. A reload may change it.
    max: AtomicUsize,
    open: AtomicUsize,
    /// Wakes every waiting loop when a connection closes at the limit, or the limit
    /// changes: each looks again (waking one could pick a loop whose listener is idle).
    freed: Notify,
    /// `consul_router_connections_limited_total`: times an accept loop paused at the limit.
    limited: metrics::Counter,
}

impl ConnLimit {
    /// A count with at most `max` open connections (0: no limit).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnLimit {
            max: AtomicUsize::new(max),
            open: AtomicUsize::new(0),
            freed: Notify::new(),
            limited: metrics::counter!("consul_router_connections_limited_total"),
        })
    }

    /// Puts a new limit in force (a reload); paused accept loops look again.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.freed.notify_waiters();
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Resolves once the count is under the limit, taking nothing: an accept loop calls
    /// it before `accept`, then [`ConnLimit::admit`] for the connection it accepted.
    pub(crate) async fn room(&self) {
        self.until(|| {
            let max = self.max.load(Ordering::Relaxed);
            (max == 0 || self.open.load(Ordering::Acquire) < max).then_some(())
        })
        .await;
    }

    /// A slot for a connection, once the count is under the limit. Waiting takes no CPU:
    /// the loop sleeps until a connection closes.
    pub(crate) async fn admit(self: &Arc<Self>) -> Slot {
        self.until(|| {
            let max = self.max.load(Ordering::Relaxed);
            self.open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                    (max == 0 || open < max).then_some(open + 1)
                })
                .ok()
                .map(|_| Slot(self.clone()))
        })
        .await
    }

    /// Runs `attempt` until it gives a value, sleeping on `freed` in between.
    async fn until<T>(&self, mut attempt: impl FnMut() -> Option<T>) -> T {
        let mut counted = false;
        loop {
            // Registered before the attempt: a close between the two still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(t) = attempt() {
                return t;
            }
            if !counted {
                counted = true;
                self.limited.increment(1);
                tracing::debug!("max_connections reached; new connections wait");
            }
            freed.await;
        }
    }
}

/// One open connection of a [`ConnLimit`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<ConnLimit>);

impl Drop for Slot {
    fn drop(&mut self) {
        let l = &self.0;
        let before = l.open.fetch_sub(1, Ordering::AcqRel);
        let max = l.max.load(Ordering::Relaxed);
        // Only at the limit can an accept loop be waiting; below it, no wake-up is needed.
        if max != 0 && before >= max {
            l.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_at_the_limit_until_a_slot_is_freed() {
        let limit = ConnLimit::new(2);
        let a = limit.admit().await;
        let _b = limit.admit().await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), limit.admit()).await;
        assert!(waiting.is_err(), "a third slot at a limit of 2");
        let third = tokio::spawn({
            let limit = limit.clone();
            async move { limit.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished());
        drop(a);
        let _c = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("admitted once a slot is freed")
            .unwrap();
        assert_eq!(limit.open(), 2);
        // A raised limit lets a waiting loop go on.
        let fourth = tokio::spawn({
            let limit = limit.clone();
            async move { limit.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        limit.set_max(0);
        let _d = tokio::time::timeout(Duration::from_secs(5), fourth)
            .await
            .expect("admitted without a limit")
            .unwrap();
        assert_eq!(limit.open(), 3);
    }

    fn waiter(limit: &Arc<ConnLimit>) -> tokio::task::JoinHandle<Slot> {
        let limit = limit.clone();
        tokio::spawn(async move { limit.admit().await })
    }

    #[tokio::test]
    async fn every_waiting_loop_is_admitted_when_slots_free() {
        let limit = ConnLimit::new(2);
        let a = limit.admit().await;
        let b = limit.admit().await;
        let (w1, w2) = (waiter(&limit), waiter(&limit));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!w1.is_finished() && !w2.is_finished());
        // The second close finds the count below the limit: it must still wake the other.
        drop(a);
        drop(b);
        for w in [w1, w2] {
            let _slot = tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .expect("each waiter admitted")
                .unwrap();
        }
        assert_eq!(limit.open(), 0);
    }

    #[tokio::test]
    async fn waiting_for_room_takes_no_slot() {
        // Two idle listeners at max_connections = 1: neither holds the one slot.
        let limit = ConnLimit::new(1);
        limit.room().await;
        limit.room().await;
        assert_eq!(limit.open(), 0);
        let held = limit.admit().await;
        let room = tokio::spawn({
            let limit = limit.clone();
            async move { limit.room().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!room.is_finished(), "room at the limit");
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), room)
            .await
            .expect("room once the slot is freed")
            .unwrap();
    }
}
