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

mod format;
mod queue;
mod time;
mod writer;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{fence, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, SystemTime};

pub use format::{push_u64, write_json, write_text};
pub use queue::Limits;

use queue::{Common, Msg};
use writer::{open_append, Sink, Writer};

/// The Prometheus counter of lines not written: the queue was full, the log was closed, or a
/// write failed.
pub const DROPPED_METRIC: &str = "consul_router_access_log_dropped_total";

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
    /// The TLS version of the client's connection (`TLSv1.3`); empty on a plain one.
    pub tls_version: &'a str,
    /// The protocol ALPN chose on the client's TLS connection (`h2`); empty when none.
    pub alpn: &'a str,
    /// Forward auth's decision (`allowed`, `cached`, `denied`, `error`); empty when the
    /// service has none.
    pub auth: &'a str,
}

/// Empty fields, the epoch and the unspecified address: a base for `..Default::default()`.
impl Default for Record<'_> {
    fn default() -> Self {
        Record {
            time: std::time::UNIX_EPOCH,
            client: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            host: "",
            service: "",
            instance: "",
            method: "",
            path: "",
            protocol: Protocol::Http11,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            upstream: None,
            retries: 0,
            request_id: b"",
            referer: b"",
            user_agent: b"",
            tls_version: "",
            alpn: "",
            auth: "",
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
        let common = Arc::new(Common::new(limits));
        let target = match &sink {
            Sink::File { path, .. } => Some(path.clone()),
            _ => None,
        };
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let writer = Writer::new(common.clone(), sink, done_tx);
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
        let mut buf = c.buffer();
        match h.format {
            Format::Text => write_text(rec, &mut buf),
            Format::Json => write_json(rec, &mut buf),
            Format::Off => {}
        }
        if c.push_line(buf) {
            h.wake();
        }
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

#[cfg(test)]
mod tests {
    use super::format::tests::{parse_text, record};
    use super::*;
    use std::io::Write;
    use std::sync::Condvar;
    use std::time::Instant;

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
