//! `proxy.max_connections`: one count of open client connections shared by the proxy's
//! listeners. At the limit an accept loop stops calling `accept`, so new connections wait
//! in the kernel's backlog (and past it, the kernel refuses them), until one closes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The open-connection count and its limit.
#[derive(Debug)]
pub struct ConnLimit {
    /// 0: no limit. A reload may change it.
    max: AtomicUsize,
    open: AtomicUsize,
    /// Woken when a connection closes at the limit, or the limit changes.
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
        self.freed.notify_one();
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A slot for the next connection, once the count is under the limit. Waiting takes
    /// no CPU: the loop sleeps until a connection closes.
    pub(crate) async fn admit(self: &Arc<Self>) -> Slot {
        let mut counted = false;
        loop {
            let max = self.max.load(Ordering::Relaxed);
            let taken = self
                .open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                    (max == 0 || open < max).then_some(open + 1)
                });
            if taken.is_ok() {
                return Slot(self.clone());
            }
            if !counted {
                counted = true;
                self.limited.increment(1);
                tracing::debug!(max, "max_connections reached; new connections wait");
            }
            // A close between the check and here leaves a permit: no wake-up is lost.
            self.freed.notified().await;
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
            l.freed.notify_one();
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
}
