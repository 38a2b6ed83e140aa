//! Idle keep-alive connections to one instance, in a lock-free queue.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;

/// A backend connection that can wait in an [`IdlePool`].
pub trait Pooled {
    /// Whether the backend has not closed it (as far as is known without blocking).
    fn is_open(&self) -> bool;
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

/// Idle connections of one instance. The queue (256 bytes of cache-padded ends) is allocated
/// when the first connection is kept, so the thousands of instances that carry no traffic
/// cost a few bytes.
pub struct IdlePool<C> {
    queue: OnceLock<Box<SegQueue<Idle<C>>>>,
    len: AtomicUsize,
    max: usize,
}

impl<C> fmt::Debug for IdlePool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdlePool")
            .field("idle", &self.len.load(Ordering::Relaxed))
            .field("max", &self.max)
            .finish()
    }
}

impl<C: Pooled> IdlePool<C> {
    /// A pool keeping at most `max` idle connections (0 disables keep-alive reuse).
    pub fn new(max: usize) -> Self {
        IdlePool {
            queue: OnceLock::new(),
            len: AtomicUsize::new(0),
            max,
        }
    }

    /// Idle connections held now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no connection is idle.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A live idle connection, if any; closed and expired ones are dropped. It may still be
    /// finishing its last exchange (the body just ended): the caller awaits `ready()`.
    /// `now` is the caller's clock reading, so a request reads the clock once.
    pub fn take(&self, idle_timeout: Duration, now: Instant) -> Option<C> {
        let queue = self.queue.get()?;
        while let Some(idle) = queue.pop() {
            self.len.fetch_sub(1, Ordering::Relaxed);
            if idle.conn.is_open() && now.saturating_duration_since(idle.since) <= idle_timeout {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Closes connections idle longer than `idle_timeout` (or already closed by the backend).
    pub fn evict_expired(&self, idle_timeout: Duration) {
        let Some(queue) = self.queue.get() else {
            return;
        };
        for _ in 0..self.len() {
            let Some(idle) = queue.pop() else { break };
            self.len.fetch_sub(1, Ordering::Relaxed);
            if idle.conn.is_open() && idle.since.elapsed() <= idle_timeout {
                self.push(idle);
            }
        }
    }

    /// Returns a connection after its exchange finished at `now`.
    pub fn put(&self, conn: C, now: Instant) {
        if conn.is_open() {
            self.push(Idle { conn, since: now });
        }
    }

    fn push(&self, idle: Idle<C>) {
        if self.len.fetch_add(1, Ordering::Relaxed) < self.max {
            self.queue.get_or_init(Box::default).push(idle);
        } else {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
