//! Child processes: output captured line by line while they run, signals, waits with a
//! limit, and never left behind.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use super::wait::POLL;

/// What a child wrote on one of its pipes so far, in whole lines (a last unterminated line
/// arrives at EOF). A length is a mark: [`Captured::since`] and the `*_since` waits look
/// only at what came after it.
#[derive(Clone, Debug, Default)]
pub struct Captured(Arc<Pipe>);

#[derive(Debug, Default)]
struct Pipe {
    bytes: Mutex<Vec<u8>>,
    /// The writing end is closed: everything is in.
    eof: AtomicBool,
}

impl Captured {
    /// Reads `pipe` on a thread of its own until EOF.
    pub fn read_from(pipe: impl Read + Send + 'static) -> Captured {
        let captured = Captured::default();
        let to = captured.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => to.0.bytes.lock().unwrap().extend_from_slice(&line),
                }
            }
            to.0.eof.store(true, Ordering::Release);
        });
        captured
    }

    /// Whether the writing end is closed (the child, and whatever inherited the pipe, exited).
    pub fn ended(&self) -> bool {
        self.0.eof.load(Ordering::Acquire)
    }

    /// Everything, once the writing end is closed (5 s at most, then what came).
    pub async fn in_full(&self) -> String {
        let start = Instant::now();
        while !self.ended() && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(POLL).await;
        }
        self.text()
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.bytes.lock().unwrap()).into_owned()
    }

    /// A mark: the length so far.
    pub fn len(&self) -> usize {
        self.0.bytes.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What came after `mark`.
    pub fn since(&self, mark: usize) -> String {
        let b = self.0.bytes.lock().unwrap();
        String::from_utf8_lossy(&b[mark.min(b.len())..]).into_owned()
    }

    /// The first line after `mark` that `pred` accepts.
    pub fn find_line(&self, mark: usize, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.since(mark)
            .lines()
            .find(|l| pred(l))
            .map(str::to_owned)
    }

    /// Waits for a line `pred` accepts; panics after `limit`, showing what came.
    pub async fn wait_line(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        self.wait_line_since(0, limit, what, pred).await
    }

    /// [`Captured::wait_line`] among the lines after `mark`.
    pub async fn wait_line_since(
        &self,
        mark: usize,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.find_line(mark, &pred) {
                return line;
            }
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}; got:\n{}",
                    self.since(mark)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// What to do with a child still running when its [`Process`] is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDrop {
    /// SIGKILL.
    Kill,
    /// SIGTERM, then SIGKILL if it has not exited within the grace (for a child that must
    /// pass the signal on, or clean up, before it goes).
    Term(Duration),
}

/// A child process whose standard output and error are captured as it runs; stopped on
/// drop (see [`OnDrop`]), so a failing test leaves nothing running.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Mutex<Option<Child>>,
    pid: u32,
    status: Mutex<Option<ExitStatus>>,
    pub stdout: Captured,
    pub stderr: Captured,
    on_drop: OnDrop,
    /// Whatever must outlive the child (its directory, say): dropped after it is stopped.
    keep: Vec<Box<dyn std::fmt::Debug + Send + Sync>>,
}

impl Process {
    /// Spawns `cmd` with standard input from /dev/null and both outputs captured.
    pub fn spawn(name: &str, cmd: &mut Command) -> Process {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({:?}): {e}", cmd.get_program()));
        let stdout = Captured::read_from(child.stdout.take().expect("stdout"));
        let stderr = Captured::read_from(child.stderr.take().expect("stderr"));
        Process {
            name: name.to_owned(),
            pid: child.id(),
            child: Mutex::new(Some(child)),
            status: Mutex::new(None),
            stdout,
            stderr,
            on_drop: OnDrop::Kill,
            keep: Vec::new(),
        }
    }

    /// What to do if it still runs when dropped (SIGKILL unless told otherwise).
    pub fn on_drop(mut self, what: OnDrop) -> Self {
        self.on_drop = what;
        self
    }

    /// Keeps `thing` until the child is gone (e.g. the directory it works in).
    pub fn keep(mut self, thing: impl std::fmt::Debug + Send + Sync + 'static) -> Self {
        self.keep.push(Box::new(thing));
        self
    }

    pub fn id(&self) -> u32 {
        self.pid
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.pid as i32).expect("a child's pid")
    }

    /// Sends `sig` (the child must not have been reaped yet).
    pub fn signal(&self, sig: Signal) {
        assert!(
            self.status.lock().unwrap().is_none(),
            "{} has exited already",
            self.name
        );
        kill_process(self.pid(), sig).unwrap_or_else(|e| panic!("signal {}: {e}", self.name));
    }

    /// Its exit status, if it has exited.
    pub fn try_exit(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().unwrap();
        if status.is_none() {
            let mut child = self.child.lock().unwrap();
            if let Some(s) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                *status = Some(s);
                *child = None;
            }
        }
        *status
    }

    /// Waits for it to exit; panics after `limit`, showing its output.
    pub async fn wait_exit(&self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_exit() {
                return s;
            }
            if start.elapsed() > limit {
                panic!(
                    "{} did not exit within {limit:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for a line on either output that `pred` accepts; panics if the child exits
    /// first or after `limit`, showing its output.
    pub async fn wait_line(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let found = self.stdout.find_line(0, &pred);
            if let Some(line) = found.or_else(|| self.stderr.find_line(0, &pred)) {
                return line;
            }
            if let Some(s) = self.try_exit() {
                // Whatever it wrote last may still be in the pipes.
                self.stdout.in_full().await;
                self.stderr.in_full().await;
                let found = self.stdout.find_line(0, &pred);
                if let Some(line) = found.or_else(|| self.stderr.find_line(0, &pred)) {
                    return line;
                }
                panic!(
                    "{} exited ({s}) before {what}\n{}",
                    self.name,
                    self.output()
                );
            }
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what} from {}\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `addr` accepts connections; panics if the child exits first or after
    /// `limit`.
    pub async fn wait_listening(&self, addr: SocketAddr, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_exit() {
                panic!(
                    "{} exited ({s}) before listening on {addr}\n{}",
                    self.name,
                    self.output()
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            if start.elapsed() > limit {
                panic!(
                    "{} did not listen on {addr} within {limit:?}\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGTERM, then its exit status and both outputs in full, once it has exited (within
    /// `limit`) and closed its pipes.
    pub async fn stop(self, limit: Duration) -> (i32, String, String) {
        self.signal(Signal::TERM);
        let status = self.wait_exit(limit).await;
        (
            status.code().unwrap_or(-1),
            self.stdout_in_full().await,
            self.stderr_in_full().await,
        )
    }

    /// Its standard output once the pipe is closed (after the child and anything that
    /// inherited it exited; 5 s at most).
    pub async fn stdout_in_full(&self) -> String {
        self.stdout.in_full().await
    }

    pub async fn stderr_in_full(&self) -> String {
        self.stderr.in_full().await
    }

    /// Both outputs so far, labelled, for failure messages.
    pub fn output(&self) -> String {
        format!(
            "--- {name} stdout ---\n{}\n--- {name} stderr ---\n{}",
            self.stdout.text(),
            self.stderr.text(),
            name = self.name
        )
    }

    /// Stops it now, as on drop.
    pub fn kill(&self) {
        let Some(mut child) = self.child.lock().unwrap().take() else {
            return;
        };
        if let OnDrop::Term(grace) = self.on_drop {
            let _ = kill_process(self.pid(), Signal::TERM);
            if let Some(s) = wait_child(&mut child, grace) {
                *self.status.lock().unwrap() = Some(s);
                return;
            }
        }
        let _ = child.kill();
        if let Ok(s) = child.wait() {
            *self.status.lock().unwrap() = Some(s);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

/// Polls `child` until it exits (its status) or `limit` passes (`None`), blocking the thread.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Runs `cmd` to its end: its exit status (-1 if killed by a signal) and its standard
/// output followed by its standard error.
pub fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("run the command");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// [`run`] off the runtime's threads.
pub async fn output(mut cmd: Command) -> (i32, String) {
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .expect("command task")
}
