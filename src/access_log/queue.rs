//! The bounded lock-free queue between the request path and the writer, and the pool of
//! line buffers that goes round between them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;

use super::DROPPED_METRIC;

/// Buffers kept for reuse (a nap's worth of lines at 100k requests/s), and the largest
/// buffer worth keeping: at most 4 MiB are kept.
const POOL_BUFFERS: usize = 2048;
const POOL_MAX_CAPACITY: usize = 2048;
/// A fresh line buffer's capacity: a typical line fits.
pub(super) const LINE_CAPACITY: usize = 512;

/// How much the queue holds before lines are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Lines queued (at least 1).
    pub lines: usize,
    /// Bytes queued.
    pub bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            lines: 16 * 1024,
            bytes: 16 * 1024 * 1024,
        }
    }
}

/// What the handles and the writer thread share.
pub(super) struct Common {
    pub(super) queue: ArrayQueue<Msg>,
    pool: ArrayQueue<Vec<u8>>,
    pub(super) queued_bytes: AtomicUsize,
    byte_budget: usize,
    pub(super) dropped: AtomicU64,
    dropped_metric: metrics::Counter,
    /// The writer is (about to be) parked: pushers unpark it.
    pub(super) sleeping: AtomicBool,
    /// A reopen that did not fit in the queue.
    pub(super) reopen: AtomicBool,
    /// No more lines are taken; the writer drains the queue and stops.
    pub(super) closing: AtomicBool,
}

/// What the queue carries to the writer.
pub(super) enum Msg {
    /// One formatted line.
    Line(Vec<u8>),
    /// Reopen the file, after the lines queued before.
    Reopen,
}

impl Common {
    /// An empty queue and pool, within `limits`.
    pub(super) fn new(limits: Limits) -> Self {
        Common {
            queue: ArrayQueue::new(limits.lines.max(1)),
            pool: ArrayQueue::new(POOL_BUFFERS),
            queued_bytes: AtomicUsize::new(0),
            byte_budget: limits.bytes,
            dropped: AtomicU64::new(0),
            dropped_metric: metrics::counter!(DROPPED_METRIC),
            sleeping: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        }
    }

    /// An empty line buffer: a pooled one if any.
    pub(super) fn buffer(&self) -> Vec<u8> {
        self.pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(LINE_CAPACITY))
    }

    /// Queues a formatted line; when the queue is full, in lines or bytes, the line is
    /// dropped and counted. Returns whether it was queued.
    pub(super) fn push_line(&self, buf: Vec<u8>) -> bool {
        let len = buf.len();
        if self
            .queued_bytes
            .fetch_add(len, Ordering::Relaxed)
            .saturating_add(len)
            > self.byte_budget
        {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.recycle(buf);
            self.drop_lines(1);
            return false;
        }
        if let Err(Msg::Line(buf)) = self.queue.push(Msg::Line(buf)) {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.recycle(buf);
            self.drop_lines(1);
            return false;
        }
        true
    }

    /// Counts `n` lines lost.
    pub(super) fn drop_lines(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        self.dropped_metric.increment(n);
    }

    /// Gives a line buffer back to the pool, unless it grew too large to keep.
    pub(super) fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() <= POOL_MAX_CAPACITY {
            buf.clear();
            let _ = self.pool.push(buf);
        }
    }
}
