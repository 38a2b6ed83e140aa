//! The access log: one line per request, in nginx's `combined` format plus the router's own
//! fields (`text`) or as one JSON object (`json`), written to standard output or a file.
//!
//! The request path never waits on the log. [`AccessLog::log`] formats a borrowed [`Record`]
//! into a buffer taken from a small pool and pushes it on a bounded lock-free queue; when the
//! queue is full (in lines or in bytes) the line is dropped and counted in
//! `consul_router_access_log_dropped_total`. A dedicated OS thread drains the queue into a
//! buffer and writes it whenever the queue runs empty (at least every second under steady
//! load), hands the line buffers back to the pool, and reopens the file on request (SIGUSR1,
//! for logrotate). While lines keep coming it looks at the queue every 20 ms, so the request
//! path wakes it (one futex call) only for the first line after a quiet spell.
//! [`AccessLog::close`] writes out what is queued and stops the thread.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;

/// The Prometheus counter of lines not written: the queue was full, the log was closed, or a
/// write failed.
pub const DROPPED_METRIC: &str = "consul_router_access_log_dropped_total";

/// Buffers kept for reuse (a nap's worth of lines at 100k requests/s), and the largest
/// buffer worth keeping: at most 4 MiB are kept.
const POOL_BUFFERS: usize = 2048;
const POOL_MAX_CAPACITY: usize = 2048;
/// A fresh line buffer's capacity: a typical line fits.
const LINE_CAPACITY: usize = 512;
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

/// The access log's format (`access_log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// No access log.
    #[default]
    Off,
    /// nginx's `combined` plus `key=value` fields.
    Text,
    /// One JSON object per line.
    Json,
}

impl Format {
    /// The name used in the config and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Off => "off",
            Format::Text => "text",
            Format::Json => "json",
        }
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Format::Off),
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(format!("{s:?} is not \"off\", \"text\" or \"json\"")),
        }
    }
}

/// The client's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
    /// HTTP/2 (h2c).
    Http2,
}

impl Protocol {
    /// As nginx's `$server_protocol` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http10 => "HTTP/1.0",
            Protocol::Http11 => "HTTP/1.1",
            Protocol::Http2 => "HTTP/2.0",
        }
    }
}

/// One request, borrowed from the request core; building one allocates nothing.
///
/// Text fields that come from the client's header fields are bytes, as the HTTP/1 fast path
/// holds them (`httparse::Header::value`, `HeaderValue::as_bytes`): they may carry bytes that
/// are not UTF-8, which both formats escape. Empty fields are written as `-` in text and `""`
/// in JSON.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// When the request's head arrived.
    pub time: SystemTime,
    /// The client's address: the peer, or for a trusted peer the address `X-Real-IP` gets.
    pub client: IpAddr,
    /// The normalised host the request was routed by (empty if it had none).
    pub host: &'a str,
    /// The Consul service that took the request (empty when none did: 400, 404).
    pub service: &'a str,
    /// The Consul service ID of the instance that answered (empty when none did).
    pub instance: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The request target as the client sent it (path and query).
    pub path: &'a str,
    /// The client's protocol.
    pub protocol: Protocol,
    /// The status sent to the client.
    pub status: u16,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client (nginx's `$body_bytes_sent`).
    pub bytes_out: u64,
    /// From the request's head to the end of its response.
    pub duration: Duration,
    /// From sending the request to a backend to its response head; `None` if none answered.
    pub upstream: Option<Duration>,
    /// How many times the request was sent again (another instance or connection).
    pub retries: u32,
    /// The request's ID.
    pub request_id: &'a [u8],
    /// The `Referer` field.
    pub referer: &'a [u8],
    /// The `User-Agent` field.
    pub user_agent: &'a [u8],
}

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

/// A handle on the access log; cheap to clone. The default is a log that is off.
///
/// When the last handle is dropped, the writer writes what is queued and stops on its own;
/// [`AccessLog::close`] does the same and waits for it.
#[derive(Clone, Default)]
pub struct AccessLog {
    inner: Option<Arc<Handle>>,
}

/// What the handles share: the writer is told to stop when the last one goes.
struct Handle {
    format: Format,
    target: Option<PathBuf>,
    common: Arc<Common>,
    writer: Thread,
    done: Mutex<Option<mpsc::Receiver<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the handles and the writer thread share.
struct Common {
    queue: ArrayQueue<Msg>,
    pool: ArrayQueue<Vec<u8>>,
    queued_bytes: AtomicUsize,
    byte_budget: usize,
    dropped: AtomicU64,
    dropped_metric: metrics::Counter,
    /// The writer is (about to be) parked: pushers unpark it.
    sleeping: AtomicBool,
    /// A reopen that did not fit in the queue.
    reopen: AtomicBool,
    /// No more lines are taken; the writer drains the queue and stops.
    closing: AtomicBool,
}

enum Msg {
    Line(Vec<u8>),
    Reopen,
}

/// Where lines go.
enum Sink {
    Stdout,
    File {
        path: PathBuf,
        file: File,
    },
    #[cfg(test)]
    Test(Box<dyn Write + Send>),
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("AccessLog");
        d.field("format", &self.format());
        if let Some(h) = &self.inner {
            d.field("target", &h.target);
            d.field("dropped", &h.common.dropped.load(Ordering::Relaxed));
        }
        d.finish()
    }
}

/// Opens `path` for appending, creating it if missing.
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).create(true).open(path)
}

/// Checks that the access log file can be opened for appending, as `--check-config` does:
/// it leaves no file behind if there was none.
pub fn check_file(path: &Path) -> io::Result<()> {
    let existed = path.symlink_metadata().is_ok();
    open_append(path)?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

impl AccessLog {
    /// A log that is off: [`AccessLog::log`] does nothing.
    pub fn off() -> Self {
        AccessLog { inner: None }
    }

    /// Starts the log in `format` to `file`, or to standard output when `None`. An `Off`
    /// format opens nothing. The file is opened (appending, created if missing) before this
    /// returns, so an unwritable path is an error here.
    pub fn open(format: Format, file: Option<&Path>) -> io::Result<Self> {
        Self::open_with(format, file, Limits::default())
    }

    /// [`AccessLog::open`] with the queue's limits.
    pub fn open_with(format: Format, file: Option<&Path>, limits: Limits) -> io::Result<Self> {
        if format == Format::Off {
            return Ok(Self::off());
        }
        let sink = match file {
            None => Sink::Stdout,
            Some(path) => Sink::File {
                path: path.to_owned(),
                file: open_append(path)?,
            },
        };
        Self::spawn(format, sink, limits)
    }

    fn spawn(format: Format, sink: Sink, limits: Limits) -> io::Result<Self> {
        metrics::describe_counter!(
            DROPPED_METRIC,
            "Access log lines not written: the queue was full, the log was closed, or a write failed."
        );
        let common = Arc::new(Common {
            queue: ArrayQueue::new(limits.lines.max(1)),
            pool: ArrayQueue::new(POOL_BUFFERS),
            queued_bytes: AtomicUsize::new(0),
            byte_budget: limits.bytes,
            dropped: AtomicU64::new(0),
            dropped_metric: metrics::counter!(DROPPED_METRIC),
            sleeping: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        });
        let target = match &sink {
            Sink::File { path, .. } => Some(path.clone()),
            _ => None,
        };
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let writer = Writer {
            common: common.clone(),
            sink,
            out: Vec::with_capacity(WRITE_AT + LINE_CAPACITY),
            lines: 0,
            failing: false,
            dropped_seen: 0,
            warned: None,
            _done: done_tx,
        };
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run())?;
        Ok(AccessLog {
            inner: Some(Arc::new(Handle {
                format,
                target,
                common,
                writer: thread.thread().clone(),
                done: Mutex::new(Some(done_rx)),
                thread: Mutex::new(Some(thread)),
            })),
        })
    }

    /// The format, `Off` for a log that is off.
    pub fn format(&self) -> Format {
        self.inner.as_ref().map_or(Format::Off, |h| h.format)
    }

    /// Whether lines are written: when not, the caller may skip building a [`Record`].
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The file written, if not standard output.
    pub fn file(&self) -> Option<&Path> {
        self.inner.as_ref().and_then(|h| h.target.as_deref())
    }

    /// Lines dropped so far by this log.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |h| h.common.dropped.load(Ordering::Relaxed))
    }

    /// Formats `rec` and queues the line. Never blocks, never panics: when the queue is full
    /// the line is dropped and counted.
    pub fn log(&self, rec: &Record<'_>) {
        let Some(h) = &self.inner else { return };
        let c = &*h.common;
        if c.closing.load(Ordering::Relaxed) {
            c.drop_lines(1);
            return;
        }
        let mut buf = c
            .pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(LINE_CAPACITY));
        match h.format {
            Format::Text => write_text(rec, &mut buf),
            Format::Json => write_json(rec, &mut buf),
            Format::Off => {}
        }
        let len = buf.len();
        if c.queued_bytes
            .fetch_add(len, Ordering::Relaxed)
            .saturating_add(len)
            > c.byte_budget
        {
            c.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            c.recycle(buf);
            c.drop_lines(1);
            return;
        }
        if let Err(Msg::Line(buf)) = c.queue.push(Msg::Line(buf)) {
            c.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            c.recycle(buf);
            c.drop_lines(1);
            return;
        }
        h.wake();
    }

    /// Makes the writer reopen its file by name (after logrotate renamed it). Lines queued
    /// before this call go to the old file, unless the queue was full (then some may go to
    /// the new one); none is lost. Does nothing for standard output. Never blocks.
    pub fn reopen(&self) {
        let Some(h) = &self.inner else { return };
        if h.common.queue.push(Msg::Reopen).is_err() {
            // The queue is full: the writer is busy and sees the flag after its next line.
            h.common.reopen.store(true, Ordering::Release);
        }
        h.writer.unpark();
    }

    /// Stops taking lines, lets the writer write out the queue, and waits for it at most
    /// `timeout`. Returns whether the writer finished (also when it already had, or the log
    /// is off). Blocks: from async code, call it through `spawn_blocking`.
    pub fn close(&self, timeout: Duration) -> bool {
        let Some(h) = &self.inner else { return true };
        h.common.closing.store(true, Ordering::Release);
        h.writer.unpark();
        let mut done = h.done.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rx) = done.as_ref() else { return true };
        match rx.recv_timeout(timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            // The writer drops its sender when it exits.
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                *done = None;
                if let Some(t) = h.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = t.join();
                }
                true
            }
        }
    }
}

impl Handle {
    /// Wakes the writer if it is parked (the other half of its check in `Writer::run`).
    fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.common.sleeping.load(Ordering::Relaxed) {
            self.writer.unpark();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last handle: the writer writes what is queued and stops.
        self.common.closing.store(true, Ordering::Release);
        self.writer.unpark();
    }
}

impl Common {
    fn drop_lines(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        self.dropped_metric.increment(n);
    }

    fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() <= POOL_MAX_CAPACITY {
            buf.clear();
            let _ = self.pool.push(buf);
        }
    }
}

/// The writer thread's state.
struct Writer {
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
    fn run(mut self) {
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

// ---------------------------------------------------------------------------------------
// Formatting

/// The formatted second, cached per thread: formatting a line reads no clock and makes no
/// syscall; a new second costs one date computation.
#[derive(Clone, Copy)]
struct Stamp {
    secs: u64,
    /// `22/Nov/2026:10:00:00 +0000`
    clf: [u8; 26],
    /// `2026-11-22T10:00:00`
    iso: [u8; 19],
}

thread_local! {
    static STAMP: std::cell::Cell<Stamp> = const {
        std::cell::Cell::new(Stamp { secs: u64::MAX, clf: [0; 26], iso: [0; 19] })
    };
}

/// The latest second formatting supports: 9999-12-31T23:59:59Z.
const MAX_SECS: u64 = 253_402_300_799;

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// Seconds and milliseconds since the epoch, clamped to what the formats can show.
fn epoch(time: SystemTime) -> (u64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= MAX_SECS => (d.as_secs(), d.subsec_millis()),
        Ok(_) => (MAX_SECS, 999),
        Err(_) => (0, 0),
    }
}

fn stamp(secs: u64) -> Stamp {
    STAMP.with(|cell| {
        let s = cell.get();
        if s.secs == secs {
            return s;
        }
        let s = Stamp::new(secs);
        cell.set(s);
        s
    })
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil(days: u64) -> (u64, usize, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month as usize, day)
}

fn put2(out: &mut [u8], n: u64) {
    out[0] = b'0' + (n / 10 % 10) as u8;
    out[1] = b'0' + (n % 10) as u8;
}

fn put4(out: &mut [u8], n: u64) {
    put2(&mut out[..2], n / 100);
    put2(&mut out[2..4], n % 100);
}

impl Stamp {
    fn new(secs: u64) -> Self {
        let (year, month, day) = civil(secs / 86_400);
        let t = secs % 86_400;
        let (h, m, s) = (t / 3600, t / 60 % 60, t % 60);
        let mut clf = *b"00/Jan/0000:00:00:00 +0000";
        put2(&mut clf[0..2], day);
        clf[3..6].copy_from_slice(MONTHS[month - 1]);
        put4(&mut clf[7..11], year);
        put2(&mut clf[12..14], h);
        put2(&mut clf[15..17], m);
        put2(&mut clf[18..20], s);
        let mut iso = *b"0000-00-00T00:00:00";
        put4(&mut iso[0..4], year);
        put2(&mut iso[5..7], month as u64);
        put2(&mut iso[8..10], day);
        put2(&mut iso[11..13], h);
        put2(&mut iso[14..16], m);
        put2(&mut iso[17..19], s);
        Stamp { secs, clf, iso }
    }
}

/// Appends `n` in decimal, without allocating or formatting machinery.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Seconds with milliseconds, as nginx's `$request_time`: `0.012`.
fn push_secs(out: &mut Vec<u8>, d: Duration) {
    push_u64(out, d.as_secs());
    let ms = d.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
    ]);
}

fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        // By hand: `write!` costs several times as much, and IPv4 is the usual case.
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, octet.into());
            }
        }
        // Writing to a Vec cannot fail.
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Bytes escaped in text values.
const TEXT: u8 = 1;
/// Bytes escaped in JSON strings.
const JSON: u8 = 2;
/// Which bytes each format escapes, looked up once per byte.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let control = b < 0x20 || b == 0x7f;
        if control || b == b'"' as usize || b == b'\\' as usize {
            t[b] = TEXT | JSON;
        } else if b >= 0x80 {
            t[b] = TEXT;
        }
        b += 1;
    }
    t
};

/// A text value: bytes that are `"`, `\`, control or not ASCII become `\xHH`, as nginx's
/// default escaping does; empty becomes `-`.
fn push_text(out: &mut Vec<u8>, value: &[u8]) {
    if value.is_empty() {
        out.push(b'-');
        return;
    }
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        if ESCAPE[usize::from(b)] & TEXT != 0 {
            out.extend_from_slice(&value[start..i]);
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]);
            start = i + 1;
        }
    }
    out.extend_from_slice(&value[start..]);
}

/// A quoted text value: `"..."`, or `"-"` when empty.
fn push_quoted(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    push_text(out, value);
    out.push(b'"');
}

/// The text line: nginx's `combined`, then the router's fields.
///
/// `$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
/// "$http_referer" "$http_user_agent" host="…" service="…" instance="…" bytes_in=N rt=S.mmm
/// urt=S.mmm retries=N rid="…"`
pub fn write_text(rec: &Record<'_>, out: &mut Vec<u8>) {
    let (secs, _) = epoch(rec.time);
    push_ip(out, rec.client);
    out.extend_from_slice(b" - - [");
    out.extend_from_slice(&stamp(secs).clf);
    out.extend_from_slice(b"] \"");
    push_text(out, rec.method.as_bytes());
    out.push(b' ');
    push_text(out, rec.path.as_bytes());
    out.push(b' ');
    out.extend_from_slice(rec.protocol.as_str().as_bytes());
    out.extend_from_slice(b"\" ");
    push_u64(out, rec.status.into());
    out.push(b' ');
    push_u64(out, rec.bytes_out);
    out.push(b' ');
    push_quoted(out, rec.referer);
    out.push(b' ');
    push_quoted(out, rec.user_agent);
    out.extend_from_slice(b" host=");
    push_quoted(out, rec.host.as_bytes());
    out.extend_from_slice(b" service=");
    push_quoted(out, rec.service.as_bytes());
    out.extend_from_slice(b" instance=");
    push_quoted(out, rec.instance.as_bytes());
    out.extend_from_slice(b" bytes_in=");
    push_u64(out, rec.bytes_in);
    out.extend_from_slice(b" rt=");
    push_secs(out, rec.duration);
    out.extend_from_slice(b" urt=");
    match rec.upstream {
        Some(d) => push_secs(out, d),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" retries=");
    push_u64(out, rec.retries.into());
    out.extend_from_slice(b" rid=");
    push_quoted(out, rec.request_id);
    out.push(b'\n');
}

/// The inside of a JSON string, from valid UTF-8: `"`, `\` and control characters (DEL
/// too) escaped.
fn push_json_str(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if ESCAPE[usize::from(b)] & JSON == 0 {
            continue;
        }
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)].to_ascii_lowercase(),
                HEX[usize::from(b & 15)].to_ascii_lowercase(),
            ]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// A JSON string from bytes: each invalid UTF-8 sequence becomes U+FFFD (as
/// `String::from_utf8_lossy` reads it).
fn push_json(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    if value.is_ascii() {
        // ASCII is UTF-8: no need to look for invalid sequences.
        push_json_str(out, value);
        out.push(b'"');
        return;
    }
    for chunk in value.utf8_chunks() {
        push_json_str(out, chunk.valid().as_bytes());
        if !chunk.invalid().is_empty() {
            out.extend_from_slice(b"\\ufffd");
        }
    }
    out.push(b'"');
}

/// The JSON line: one object, keys always present and in this order.
///
/// `{"time":"2026-11-22T10:00:00.123Z","client":…,"host":…,"service":…,"instance":…,
/// "method":…,"path":…,"protocol":"HTTP/1.1","status":200,"bytes_in":0,"bytes_out":0,
/// "duration_us":0,"upstream_duration_us":0|null,"retries":0,"request_id":…,"referer":…,
/// "user_agent":…}`
pub fn write_json(rec: &Record<'_>, out: &mut Vec<u8>) {
    let (secs, ms) = epoch(rec.time);
    out.extend_from_slice(b"{\"time\":\"");
    out.extend_from_slice(&stamp(secs).iso);
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
        b'"',
    ]);
    out.extend_from_slice(b",\"client\":\"");
    push_ip(out, rec.client);
    out.extend_from_slice(b"\",\"host\":");
    push_json(out, rec.host.as_bytes());
    out.extend_from_slice(b",\"service\":");
    push_json(out, rec.service.as_bytes());
    out.extend_from_slice(b",\"instance\":");
    push_json(out, rec.instance.as_bytes());
    out.extend_from_slice(b",\"method\":");
    push_json(out, rec.method.as_bytes());
    out.extend_from_slice(b",\"path\":");
    push_json(out, rec.path.as_bytes());
    out.extend_from_slice(b",\"protocol\":\"");
    out.extend_from_slice(rec.protocol.as_str().as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    push_u64(out, rec.status.into());
    out.extend_from_slice(b",\"bytes_in\":");
    push_u64(out, rec.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    push_u64(out, rec.bytes_out);
    out.extend_from_slice(b",\"duration_us\":");
    push_u64(out, micros(rec.duration));
    out.extend_from_slice(b",\"upstream_duration_us\":");
    match rec.upstream {
        Some(d) => push_u64(out, micros(d)),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"retries\":");
    push_u64(out, rec.retries.into());
    out.extend_from_slice(b",\"request_id\":");
    push_json(out, rec.request_id);
    out.extend_from_slice(b",\"referer\":");
    push_json(out, rec.referer);
    out.extend_from_slice(b",\"user_agent\":");
    push_json(out, rec.user_agent);
    out.extend_from_slice(b"}\n");
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Condvar;

    fn record() -> Record<'static> {
        Record {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            client: "203.0.113.7".parse().unwrap(),
            host: "chat.app.example.net",
            service: "chat",
            instance: "chat-1",
            method: "GET",
            path: "/a?b=1",
            protocol: Protocol::Http11,
            status: 200,
            bytes_in: 17,
            bytes_out: 1234,
            duration: Duration::from_micros(12_345),
            upstream: Some(Duration::from_micros(10_250)),
            retries: 1,
            request_id: b"4bf92f35",
            referer: b"https://example.net/",
            user_agent: b"curl/8.0",
        }
    }

    fn text(rec: &Record<'_>) -> String {
        let mut out = Vec::new();
        write_text(rec, &mut out);
        String::from_utf8(out).expect("text lines are ASCII")
    }

    fn json(rec: &Record<'_>) -> String {
        let mut out = Vec::new();
        write_json(rec, &mut out);
        String::from_utf8(out).expect("JSON lines are UTF-8")
    }

    #[test]
    fn text_line() {
        assert_eq!(
            text(&record()),
            "203.0.113.7 - - [14/Nov/2023:22:13:20 +0000] \"GET /a?b=1 HTTP/1.1\" 200 1234 \
             \"https://example.net/\" \"curl/8.0\" host=\"chat.app.example.net\" service=\"chat\" \
             instance=\"chat-1\" bytes_in=17 rt=0.012 urt=0.010 retries=1 rid=\"4bf92f35\"\n"
        );
    }

    #[test]
    fn json_line() {
        assert_eq!(
            json(&record()),
            "{\"time\":\"2023-11-14T22:13:20.123Z\",\"client\":\"203.0.113.7\",\
             \"host\":\"chat.app.example.net\",\"service\":\"chat\",\"instance\":\"chat-1\",\
             \"method\":\"GET\",\"path\":\"/a?b=1\",\"protocol\":\"HTTP/1.1\",\"status\":200,\
             \"bytes_in\":17,\"bytes_out\":1234,\"duration_us\":12345,\
             \"upstream_duration_us\":10250,\"retries\":1,\"request_id\":\"4bf92f35\",\
             \"referer\":\"https://example.net/\",\"user_agent\":\"curl/8.0\"}\n"
        );
    }

    #[test]
    fn empty_fields_and_no_upstream() {
        let rec = Record {
            client: "2001:db8::1".parse().unwrap(),
            host: "",
            service: "",
            instance: "",
            protocol: Protocol::Http2,
            status: 404,
            bytes_in: 0,
            bytes_out: 0,
            upstream: None,
            retries: 0,
            request_id: b"",
            referer: b"",
            user_agent: b"",
            ..record()
        };
        assert_eq!(
            text(&rec),
            "2001:db8::1 - - [14/Nov/2023:22:13:20 +0000] \"GET /a?b=1 HTTP/2.0\" 404 0 \"-\" \"-\" \
             host=\"-\" service=\"-\" instance=\"-\" bytes_in=0 rt=0.012 urt=- retries=0 rid=\"-\"\n"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&rec)).unwrap();
        assert_eq!(v["client"], "2001:db8::1");
        assert_eq!(v["host"], "");
        assert_eq!(v["user_agent"], "");
        assert_eq!(v["protocol"], "HTTP/2.0");
        assert!(v["upstream_duration_us"].is_null());
    }

    #[test]
    fn escaping() {
        let nasty: &[u8] = b"a\"b\\c\nd\x01\x7f \xc3\xa9 \xff\xfe end";
        let rec = Record {
            path: "/x\"y\\z",
            host: "h\tx",
            user_agent: nasty,
            referer: b"\"quoted\"",
            request_id: b"id \xe2\x80",
            ..record()
        };
        let t = text(&rec);
        assert!(t.is_ascii(), "{t}");
        assert_eq!(t.matches('\n').count(), 1, "{t}");
        assert!(t.contains(r#""GET /x\x22y\x5Cz HTTP/1.1""#), "{t}");
        assert!(
            t.contains(r#" "a\x22b\x5Cc\x0Ad\x01\x7F \xC3\xA9 \xFF\xFE end" "#),
            "{t}"
        );
        assert!(t.contains(r#" "\x22quoted\x22" "#), "{t}");
        assert!(t.contains(r#"host="h\x09x""#), "{t}");
        assert!(t.contains(r#"rid="id \xE2\x80""#), "{t}");

        let j = json(&rec);
        assert_eq!(j.matches('\n').count(), 1, "{j}");
        assert!(
            j.contains(r#""user_agent":"a\"b\\c\nd\u0001\u007f é \ufffd\ufffd end""#),
            "{j}"
        );
        assert!(j.contains(r#""path":"/x\"y\\z""#), "{j}");
        assert!(j.contains(r#""host":"h\tx""#), "{j}");
        assert!(j.contains(r#""request_id":"id \ufffd""#), "{j}");
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["user_agent"], String::from_utf8_lossy(nasty).as_ref());
        assert_eq!(v["referer"], "\"quoted\"");
    }

    /// Splits a text line into its tokens and unescapes the quoted ones, as a log reader
    /// would: `[...]` is one token, `"..."` ends at the first `"`, `\xHH` is one byte.
    fn parse_text(line: &str) -> Vec<Vec<u8>> {
        let b = line.trim_end_matches('\n').as_bytes();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b' ' => i += 1,
                b'[' => {
                    let end = i + b[i..].iter().position(|&c| c == b']').unwrap();
                    tokens.push(b[i + 1..end].to_vec());
                    i = end + 1;
                }
                _ => {
                    // key="..." or "..." or a bare token.
                    let mut tok = Vec::new();
                    while i < b.len() && b[i] != b' ' {
                        if b[i] == b'"' {
                            i += 1;
                            while b[i] != b'"' {
                                if b[i] == b'\\' {
                                    assert_eq!(b[i + 1], b'x', "only \\xHH escapes");
                                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                                    tok.push(u8::from_str_radix(hex, 16).unwrap());
                                    i += 4;
                                } else {
                                    tok.push(b[i]);
                                    i += 1;
                                }
                            }
                            i += 1;
                        } else {
                            tok.push(b[i]);
                            i += 1;
                        }
                    }
                    tokens.push(tok);
                }
            }
        }
        tokens
    }

    #[test]
    fn text_and_json_parse_back() {
        let mut rng = fastrand::Rng::with_seed(7);
        let field = |rng: &mut fastrand::Rng| -> Vec<u8> {
            let n = rng.usize(1..24);
            let v: Vec<u8> = (0..n)
                .map(|_| match rng.u8(0..4) {
                    0 => rng.u8(..),
                    1 => *rng.choice(b"\"\\ \t\n[]=-").unwrap(),
                    _ => rng.u8(b'a'..=b'z'),
                })
                .collect();
            if v == b"-" {
                b"x".to_vec()
            } else {
                v
            }
        };
        for _ in 0..500 {
            let (referer, user_agent, request_id) =
                (field(&mut rng), field(&mut rng), field(&mut rng));
            let rec = Record {
                referer: &referer,
                user_agent: &user_agent,
                request_id: &request_id,
                ..record()
            };
            let line = text(&rec);
            let tokens = parse_text(&line);
            // addr - - time request status bytes referer ua host= service= instance= bytes_in= rt= urt= retries= rid=
            assert_eq!(tokens.len(), 17, "{line}");
            assert_eq!(tokens[7], referer, "{line}");
            assert_eq!(tokens[8], user_agent, "{line}");
            assert_eq!(
                tokens[16],
                [b"rid=".as_slice(), &request_id].concat(),
                "{line}"
            );

            let v: serde_json::Value = serde_json::from_str(&json(&rec)).unwrap();
            assert_eq!(v["referer"], String::from_utf8_lossy(&referer).as_ref());
            assert_eq!(
                v["user_agent"],
                String::from_utf8_lossy(&user_agent).as_ref()
            );
            assert_eq!(
                v["request_id"],
                String::from_utf8_lossy(&request_id).as_ref()
            );
        }
    }

    #[test]
    fn dates() {
        for (secs, clf, iso) in [
            (0, "01/Jan/1970:00:00:00 +0000", "1970-01-01T00:00:00"),
            (
                951_782_400,
                "29/Feb/2000:00:00:00 +0000",
                "2000-02-29T00:00:00",
            ),
            (
                1_709_251_199,
                "29/Feb/2024:23:59:59 +0000",
                "2024-02-29T23:59:59",
            ),
            (
                1_700_000_000,
                "14/Nov/2023:22:13:20 +0000",
                "2023-11-14T22:13:20",
            ),
            (
                MAX_SECS,
                "31/Dec/9999:23:59:59 +0000",
                "9999-12-31T23:59:59",
            ),
        ] {
            let s = Stamp::new(secs);
            assert_eq!(std::str::from_utf8(&s.clf).unwrap(), clf);
            assert_eq!(std::str::from_utf8(&s.iso).unwrap(), iso);
            // Through the cache too, twice.
            assert_eq!(stamp(secs).clf, s.clf);
            assert_eq!(stamp(secs).iso, s.iso);
        }
        assert_eq!(epoch(UNIX_EPOCH - Duration::from_secs(5)), (0, 0));
        assert_eq!(
            epoch(UNIX_EPOCH + Duration::from_secs(MAX_SECS + 1)),
            (MAX_SECS, 999)
        );
    }

    /// A sink that blocks its first write until released, and keeps what it is given.
    #[derive(Clone)]
    struct Gate {
        started: mpsc::SyncSender<()>,
        open: Arc<(Mutex<bool>, Condvar)>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Gate {
        fn new() -> (Self, mpsc::Receiver<()>) {
            let (tx, rx) = mpsc::sync_channel(1);
            let gate = Gate {
                started: tx,
                open: Arc::new((Mutex::new(false), Condvar::new())),
                out: Arc::default(),
            };
            (gate, rx)
        }

        fn release(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }

        fn lines(&self) -> Vec<String> {
            let out = self.out.lock().unwrap();
            String::from_utf8_lossy(&out)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.started.try_send(());
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn with_status(status: u16) -> Record<'static> {
        Record { status, ..record() }
    }

    /// Runs `f` on another thread and fails (rather than hanging) if it does not return.
    fn returns_at_once(f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("log() blocked while the writer was stuck");
    }

    fn metric_value(name: &str) -> f64 {
        let text = crate::metrics::handle().render();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let _ = crate::metrics::handle();
        let (gate, started) = Gate::new();
        let limits = Limits {
            lines: 4,
            bytes: usize::MAX,
        };
        let log =
            AccessLog::spawn(Format::Text, Sink::Test(Box::new(gate.clone())), limits).unwrap();
        // The writer takes the first line and sticks in its write.
        log.log(&with_status(100));
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        let l = log.clone();
        returns_at_once(move || {
            for status in 201..=210 {
                l.log(&with_status(status));
            }
        });
        assert_eq!(log.dropped(), 6);
        assert!(metric_value(DROPPED_METRIC) >= 6.0);
        gate.release();
        assert!(log.close(Duration::from_secs(10)));
        let statuses: Vec<String> = gate
            .lines()
            .iter()
            .map(|l| parse_text(l)[5].clone())
            .map(|s| String::from_utf8(s).unwrap())
            .collect();
        assert_eq!(statuses, ["100", "201", "202", "203", "204"]);
        // Closed: lines are dropped and counted, not queued.
        log.log(&record());
        assert_eq!(log.dropped(), 7);
    }

    #[test]
    fn byte_budget_drops_too() {
        let (gate, started) = Gate::new();
        let mut one = Vec::new();
        write_json(&record(), &mut one);
        let limits = Limits {
            lines: 1000,
            bytes: one.len() * 3,
        };
        let log =
            AccessLog::spawn(Format::Json, Sink::Test(Box::new(gate.clone())), limits).unwrap();
        log.log(&record());
        started.recv_timeout(Duration::from_secs(10)).unwrap();
        let l = log.clone();
        returns_at_once(move || {
            for _ in 0..10 {
                l.log(&record());
            }
        });
        assert_eq!(log.dropped(), 7);
        gate.release();
        assert!(log.close(Duration::from_secs(10)));
        assert_eq!(gate.lines().len(), 4);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cr-access-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn file_is_written_and_reopened_after_rename() {
        let dir = temp_dir("rotate");
        let path = dir.join("access.log");
        let rotated = dir.join("access.log.1");
        let log = AccessLog::open(Format::Text, Some(&path)).unwrap();
        assert_eq!(log.file(), Some(path.as_path()));
        assert!(path.exists(), "opened at start");
        log.log(&with_status(201));
        wait_for("the first line", || read_lines(&path).len() == 1);
        std::fs::rename(&path, &rotated).unwrap();
        // Still the old file until the reopen.
        log.log(&with_status(202));
        log.reopen();
        log.log(&with_status(203));
        log.log(&with_status(204));
        assert!(log.close(Duration::from_secs(10)));
        let status = |l: &String| String::from_utf8(parse_text(l)[5].clone()).unwrap();
        let old: Vec<_> = read_lines(&rotated).iter().map(status).collect();
        let new: Vec<_> = read_lines(&path).iter().map(status).collect();
        assert_eq!(old, ["201", "202"]);
        assert_eq!(new, ["203", "204"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_line_is_written_by_close_or_last_drop() {
        let dir = temp_dir("all");
        let path = dir.join("access.log");
        let log = AccessLog::open(Format::Json, Some(&path)).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for _ in 0..2500 {
                        log.log(&record());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(log.close(Duration::from_secs(10)));
        assert!(log.close(Duration::from_secs(1)), "close twice is fine");
        let lines = read_lines(&path);
        assert_eq!(lines.len() as u64 + log.dropped(), 10_000);
        // 16k lines of queue: nothing is dropped at this rate.
        assert_eq!(log.dropped(), 0);
        for l in &lines {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }

        // Dropping the last handle also writes out the queue.
        let path2 = dir.join("dropped.log");
        let log = AccessLog::open(Format::Text, Some(&path2)).unwrap();
        for _ in 0..100 {
            log.log(&record());
        }
        drop(log);
        wait_for("the lines of a dropped log", || {
            read_lines(&path2).len() == 100
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn off_and_open_errors() {
        let off = AccessLog::off();
        assert!(!off.is_on());
        off.log(&record());
        off.reopen();
        assert!(off.close(Duration::from_secs(1)));
        // Off opens nothing, even a path that could not be.
        let off = AccessLog::open(Format::Off, Some(Path::new("/nonexistent/x.log"))).unwrap();
        assert_eq!(off.format(), Format::Off);
        let e = AccessLog::open(Format::Text, Some(Path::new("/nonexistent/x.log"))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);

        let dir = temp_dir("check");
        let fresh = dir.join("fresh.log");
        check_file(&fresh).unwrap();
        assert!(!fresh.exists(), "check_file leaves nothing behind");
        std::fs::write(&fresh, "kept\n").unwrap();
        check_file(&fresh).unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "kept\n");
        assert!(check_file(&dir).is_err(), "a directory");
        assert!(check_file(&dir.join("no/such/dir.log")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn formats_parse() {
        assert_eq!("json".parse::<Format>(), Ok(Format::Json));
        assert_eq!("text".parse::<Format>(), Ok(Format::Text));
        assert_eq!("off".parse::<Format>(), Ok(Format::Off));
        assert!("JSON".parse::<Format>().unwrap_err().contains("\"JSON\""));
    }
}
