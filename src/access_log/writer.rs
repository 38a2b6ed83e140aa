//! The writer thread: drains the queue into one buffer, writes it out in batches, reopens
//! the file on request (SIGUSR1), and counts the lines a failed write lost.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::queue::{Common, Msg, LINE_CAPACITY};

/// The writer's output buffer is written out once it holds this much.
const WRITE_AT: usize = 64 * 1024;
/// Under steady load (the queue never runs empty) the writer still writes at least this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// After writing a batch the writer waits this long before looking at the queue again, so
/// that under load it writes a batch per nap rather than a line per request, and the request
/// path never wakes it.
const NAP: Duration = Duration::from_millis(20);
/// At most one warning about dropped lines per this period.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where lines go.
pub(super) enum Sink {
    /// Standard output.
    Stdout,
    /// A file, reopened by name on request.
    File {
        /// Its name.
        path: PathBuf,
        /// The open file.
        file: File,
    },
    /// Any writer, for tests.
    #[cfg(test)]
    Test(Box<dyn Write + Send>),
}

/// Opens `path` for appending, creating it if missing.
pub(super) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).create(true).open(path)
}

/// The writer thread's state.
pub(super) struct Writer {
    common: Arc<Common>,
    sink: Sink,
    out: Vec<u8>,
    /// Lines in `out`.
    lines: u64,
    /// The last write failed (warn once per failing streak).
    failing: bool,
    dropped_seen: u64,
    warned: Option<Instant>,
    /// Dropped when the thread ends, which tells `close` it did.
    _done: mpsc::Sender<()>,
}

impl Writer {
    /// A writer of `common`'s queue to `sink`; `done` is dropped when its thread ends.
    pub(super) fn new(common: Arc<Common>, sink: Sink, done: mpsc::Sender<()>) -> Self {
        Writer {
            common,
            sink,
            out: Vec::with_capacity(WRITE_AT + LINE_CAPACITY),
            lines: 0,
            failing: false,
            dropped_seen: 0,
            warned: None,
            _done: done,
        }
    }

    /// The thread's loop, until the log closes and the queue is written out.
    pub(super) fn run(mut self) {
        let mut last_write = Instant::now();
        loop {
            let mut taken = 0usize;
            while let Some(msg) = self.common.queue.pop() {
                taken += 1;
                match msg {
                    Msg::Line(buf) => {
                        self.common
                            .queued_bytes
                            .fetch_sub(buf.len(), Ordering::Relaxed);
                        self.out.extend_from_slice(&buf);
                        self.lines += 1;
                        self.common.recycle(buf);
                        if self.out.len() >= WRITE_AT {
                            self.write_out();
                            last_write = Instant::now();
                        }
                    }
                    Msg::Reopen => self.reopen(),
                }
                if self.common.reopen.load(Ordering::Acquire) {
                    self.reopen();
                }
                if !self.out.is_empty() && last_write.elapsed() >= FLUSH_EVERY {
                    self.write_out();
                    last_write = Instant::now();
                }
            }
            // The queue ran empty: write what we have.
            self.write_out();
            last_write = Instant::now();
            if self.common.reopen.load(Ordering::Acquire) {
                self.reopen();
            }
            self.warn_drops();
            if self.common.closing.load(Ordering::Acquire) {
                if self.common.queue.is_empty() {
                    break;
                }
                continue;
            }
            if taken > 0 {
                // Lines are coming: let the next batch gather for a moment. Pushers do not
                // wake a napping writer, so a busy router makes no syscall to log (the queue
                // holds far more than a nap's worth of lines at any rate the proxy reaches).
                std::thread::park_timeout(NAP);
                continue;
            }
            // A nap brought nothing: sleep until a pusher wakes us.
            self.common.sleeping.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if self.common.queue.is_empty()
                && !self.common.closing.load(Ordering::Acquire)
                && !self.common.reopen.load(Ordering::Acquire)
            {
                std::thread::park_timeout(FLUSH_EVERY);
            }
            self.common.sleeping.store(false, Ordering::Relaxed);
        }
        self.write_out();
    }

    /// Writes `out` to the sink; on failure its lines are counted as dropped.
    fn write_out(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let result = match &mut self.sink {
            Sink::Stdout => {
                let mut lock = io::stdout().lock();
                lock.write_all(&self.out).and_then(|()| lock.flush())
            }
            Sink::File { file, .. } => file.write_all(&self.out),
            #[cfg(test)]
            Sink::Test(w) => w.write_all(&self.out).and_then(|()| w.flush()),
        };
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !self.failing {
                    tracing::error!(error = %e, lines = self.lines, "access log: write failed; lines are dropped until a write succeeds");
                }
                self.failing = true;
                self.common.drop_lines(self.lines);
                // Not counted again by `warn_drops`.
                self.dropped_seen += self.lines;
            }
        }
        self.out.clear();
        self.lines = 0;
    }

    fn reopen(&mut self) {
        self.common.reopen.store(false, Ordering::Release);
        self.write_out();
        if let Sink::File { path, file } = &mut self.sink {
            match open_append(path) {
                Ok(f) => {
                    *file = f;
                    tracing::info!(path = %path.display(), "access log reopened");
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "access log: cannot reopen; still writing to the old file");
                }
            }
        }
    }

    /// Warns, at most every `WARN_EVERY`, that lines were dropped because the queue was full.
    fn warn_drops(&mut self) {
        let dropped = self.common.dropped.load(Ordering::Relaxed);
        if dropped <= self.dropped_seen {
            return;
        }
        if self.warned.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        tracing::warn!(
            lines = dropped - self.dropped_seen,
            "access log: queue full, lines dropped (the output is slower than the requests)"
        );
        self.dropped_seen = dropped;
        self.warned = Some(Instant::now());
    }
}
