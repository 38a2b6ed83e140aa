//! The soak test's load generator (run by `scripts/soak.sh`): many HTTP/1.1 keep-alive
//! connections to one router, each response checked, each failure classified.
//!
//! - **Slow** connections (most of them) send a request every `--slow-min`..`--slow-max`
//!   seconds, each request's head written in three pieces `--slow-gap` ms apart.
//! - **Fast** connections send `--fast-rate` requests per second each, and close after
//!   every `--fast-close`th (`Connection: close`), so connections come and go all along.
//! - **HTTP/2** connections (`--h2`, cleartext, prior knowledge) carry `--h2-streams`
//!   request loops each, every loop at `--fast-rate`. A connection the router closed
//!   (GOAWAY) is reopened; a request hyper hands back unsent is not a failure.
//!
//! Every request is `GET /t/<conn>-<seq>` to one of the `--host NAME=SERVICE` hosts; the
//! answer must be 200 with the body `examples/hello_backend` writes, naming an instance of
//! that service (`hello from SERVICE-...`) and echoing the path. A connection the router
//! closed between requests is noticed before the next one is written and reopened: not a
//! failure. The rest are failures, by reason; those a retry could have saved are marked
//! (see [`Failure::savable`]). stdout gets a `warm` line once every connection has had an
//! answer, then the summary, ending with `RESULT sent=.. ok=.. failed=.. savable=..`.
//!
//! `soak_load --target 127.0.0.1:8080 --host a.soak.local=alpha --slow 10000 --duration 240`

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};

#[derive(Parser, Debug)]
#[command(about = "soak load generator: HTTP/1.1 keep-alive clients, every answer checked")]
struct Args {
    /// The router's address.
    #[arg(long)]
    target: SocketAddr,
    /// HOST=SERVICE: a Host to ask for and the service whose instances must answer it.
    #[arg(long = "host", required = true, value_parser = parse_host)]
    hosts: Vec<(String, String)>,
    /// Slow connections.
    #[arg(long, default_value_t = 10_000)]
    slow: u32,
    /// Fast connections.
    #[arg(long, default_value_t = 100)]
    fast: u32,
    /// A fast connection asks to close after this many requests (0: never).
    #[arg(long, default_value_t = 50)]
    fast_close: u64,
    /// Requests per second on each fast connection.
    #[arg(long, default_value_t = 10.0)]
    fast_rate: f64,
    /// Shortest pause between a slow connection's requests, in seconds.
    #[arg(long, default_value_t = 5.0)]
    slow_min: f64,
    /// Longest pause between a slow connection's requests, in seconds (keep it well under
    /// the router's `proxy.header_timeout`, or the router closes idle connections first).
    #[arg(long, default_value_t = 20.0)]
    slow_max: f64,
    /// Milliseconds between the three pieces of a slow connection's request head.
    #[arg(long, default_value_t = 300)]
    slow_gap: u64,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    h2: u32,
    /// Concurrent request loops on each HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    h2_streams: u32,
    /// Seconds over which the connections are opened.
    #[arg(long, default_value_t = 10.0)]
    ramp: f64,
    /// Seconds of load, ramp included.
    #[arg(long, default_value_t = 240)]
    duration: u64,
    /// Seconds a connect or a response may take.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
}

fn parse_host(s: &str) -> Result<(String, String), String> {
    let (h, svc) = s.split_once('=').ok_or("expected HOST=SERVICE")?;
    Ok((h.to_string(), svc.to_string()))
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    ConnectRefused,
    ConnectTimeout,
    ConnectError,
    ClosedWhileSending,
    ClosedBeforeResponse,
    ResetBeforeResponse,
    Timeout,
    ClosedMidResponse,
    BadResponse,
    H2Handshake,
    H2Stream,
    Status(u16),
    WrongBody,
}

impl Failure {
    /// A retry could have saved it: a refused connect, or the connection closed or reset
    /// after the request began and before any byte of the answer. Every request here is
    /// an idempotent GET, so a client may send it again on a new connection.
    fn savable(self) -> bool {
        matches!(
            self,
            Failure::ConnectRefused
                | Failure::ClosedWhileSending
                | Failure::ClosedBeforeResponse
                | Failure::ResetBeforeResponse
                | Failure::H2Handshake
                | Failure::H2Stream
        )
    }

    fn describe(self) -> String {
        match self {
            Failure::ConnectRefused => "connect refused".into(),
            Failure::ConnectTimeout => "connect timed out".into(),
            Failure::ConnectError => "connect failed (other error)".into(),
            Failure::ClosedWhileSending => "closed while the request was being sent".into(),
            Failure::ClosedBeforeResponse => {
                "closed after the request, before any response byte".into()
            }
            Failure::ResetBeforeResponse => {
                "reset after the request, before any response byte".into()
            }
            Failure::Timeout => "no whole response within the timeout".into(),
            Failure::ClosedMidResponse => "closed or reset in the middle of a response".into(),
            Failure::BadResponse => "malformed response".into(),
            Failure::H2Handshake => "HTTP/2 handshake failed".into(),
            Failure::H2Stream => "HTTP/2 request failed before any response".into(),
            Failure::Status(s) => format!("status {s}"),
            Failure::WrongBody => "200 with a wrong body".into(),
        }
    }
}

/// Counters shared by every connection.
#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    ok: AtomicU64,
    connects: AtomicU64,
    closed_between: AtomicU64,
    open: AtomicU64,
    warm: AtomicU64,
    /// Failures by reason, then by second since the start.
    failures: Mutex<BTreeMap<Failure, BTreeMap<u64, u64>>>,
    /// A few wrong answers, as received.
    samples: Mutex<Vec<String>>,
}

impl Stats {
    fn fail(&self, f: Failure, start: Instant) {
        let sec = start.elapsed().as_secs();
        if let Ok(mut m) = self.failures.lock() {
            *m.entry(f).or_default().entry(sec).or_default() += 1;
        }
    }

    fn sample(&self, s: String) {
        if let Ok(mut v) = self.samples.lock() {
            if v.len() < 5 {
                v.push(s);
            }
        }
    }
}

/// What one connection needs to know.
struct Plan {
    target: SocketAddr,
    host: String,
    service: String,
    slow: bool,
    start: Instant,
    end: Instant,
    timeout: Duration,
    gap: Duration,
    pause: (f64, f64),
    /// Requests after which a connection asks to close (0: never).
    close_every: u64,
}

/// A response's status, and whether the connection may carry another request.
struct Answer {
    status: u16,
    keep: bool,
    body: std::ops::Range<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration);
    let total = args.slow + args.fast;
    let mut tasks = Vec::with_capacity((total + args.h2) as usize);
    let fast_period = 1.0 / args.fast_rate.max(0.001);
    for id in 0..total {
        let (host, service) = args.hosts[id as usize % args.hosts.len()].clone();
        let slow = id < args.slow;
        let plan = Plan {
            target: args.target,
            host,
            service,
            slow,
            start,
            end,
            timeout: Duration::from_secs(args.timeout),
            gap: Duration::from_millis(args.slow_gap),
            pause: if slow {
                (args.slow_min, args.slow_max)
            } else {
                (fast_period * 0.5, fast_period * 1.5)
            },
            close_every: if slow { 0 } else { args.fast_close },
        };
        // Spread the connections' starts over the ramp.
        let at = start + Duration::from_secs_f64(args.ramp * f64::from(id) / f64::from(total));
        tasks.push(tokio::spawn(client(id, plan, at, stats.clone())));
    }
    for id in 0..args.h2 {
        let (host, service) = args.hosts[id as usize % args.hosts.len()].clone();
        let plan = Plan {
            target: args.target,
            host,
            service,
            slow: false,
            start,
            end,
            timeout: Duration::from_secs(args.timeout),
            gap: Duration::ZERO,
            pause: (fast_period * 0.5, fast_period * 1.5),
            close_every: 0,
        };
        let plan = Arc::new(plan);
        tasks.push(tokio::spawn(h2_client(
            id,
            plan,
            args.h2_streams,
            stats.clone(),
        )));
    }
    let warm_total = u64::from(total) + u64::from(args.h2 * args.h2_streams);
    let progress = tokio::spawn(progress(stats.clone(), start, warm_total));
    for t in tasks {
        t.await?;
    }
    progress.abort();
    summary(&args, &stats, start);
    Ok(())
}

/// Prints a progress line every 10 s to stderr, and `warm` to stdout once every connection
/// had an answer.
async fn progress(stats: Arc<Stats>, start: Instant, total: u64) {
    let mut said_warm = false;
    let mut next = start;
    loop {
        next += Duration::from_secs(1);
        sleep_until(next).await;
        let t = start.elapsed().as_secs();
        if !said_warm && stats.warm.load(Relaxed) >= total {
            said_warm = true;
            println!("warm t={t}");
        }
        if t % 10 == 0 {
            let failed: u64 = stats
                .failures
                .lock()
                .map(|m| m.values().flat_map(|s| s.values()).sum())
                .unwrap_or(0);
            eprintln!(
                "soak-load t={t}s open={} sent={} ok={} failed={failed} reconnects={}",
                stats.open.load(Relaxed),
                stats.sent.load(Relaxed),
                stats.ok.load(Relaxed),
                stats.closed_between.load(Relaxed),
            );
        }
    }
}

async fn client(id: u32, plan: Plan, at: Instant, stats: Arc<Stats>) {
    sleep_until(at).await;
    let mut conn: Option<TcpStream> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut req = String::with_capacity(128);
    let mut seq: u64 = 0;
    let mut warm = false;
    while Instant::now() < plan.end {
        seq += 1;
        // A connection the router closed while idle is noticed here, before writing.
        if let Some(s) = &conn {
            let mut probe = [0u8; 1];
            match s.try_read(&mut probe) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                _ => {
                    stats.closed_between.fetch_add(1, Relaxed);
                    close(&mut conn, &stats);
                }
            }
        }
        let stream = match &mut conn {
            Some(s) => s,
            None => match connect(&plan).await {
                Ok(s) => {
                    stats.connects.fetch_add(1, Relaxed);
                    stats.open.fetch_add(1, Relaxed);
                    conn.insert(s)
                }
                Err(f) => {
                    stats.sent.fetch_add(1, Relaxed);
                    stats.fail(f, plan.start);
                    pause(&plan, 1.0, 1.0).await;
                    continue;
                }
            },
        };
        let path = format!("/t/{id}-{seq}");
        let last = plan.close_every > 0 && seq % plan.close_every == 0;
        req.clear();
        use std::fmt::Write;
        let _ = write!(
            req,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: soak-load\r\n{}\r\n",
            plan.host,
            if last { "Connection: close\r\n" } else { "" }
        );
        stats.sent.fetch_add(1, Relaxed);
        let result = exchange(stream, &plan, req.as_bytes(), &mut buf).await;
        let keep = match result {
            Ok(a) => {
                check(&stats, &plan, a.status, &buf[a.body.clone()], &path);
                if !warm {
                    warm = true;
                    stats.warm.fetch_add(1, Relaxed);
                }
                a.keep && !last
            }
            Err(f) => {
                stats.fail(f, plan.start);
                false
            }
        };
        if !keep {
            close(&mut conn, &stats);
        }
        pause(&plan, plan.pause.0, plan.pause.1).await;
    }
    close(&mut conn, &stats);
}

/// One HTTP/2 connection at a time, with `streams` request loops on it; reopened when the
/// router closes it, until the end.
async fn h2_client(id: u32, plan: Arc<Plan>, streams: u32, stats: Arc<Stats>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut seq = Arc::new(AtomicU64::new(0));
    while Instant::now() < plan.end {
        let stream = match connect(&plan).await {
            Ok(s) => s,
            Err(f) => {
                stats.sent.fetch_add(1, Relaxed);
                stats.fail(f, plan.start);
                pause(&plan, 1.0, 1.0).await;
                continue;
            }
        };
        let hs = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream));
        let (sender, conn) = match timeout(plan.timeout, hs).await {
            Ok(Ok(pair)) => pair,
            _ => {
                stats.sent.fetch_add(1, Relaxed);
                stats.fail(Failure::H2Handshake, plan.start);
                pause(&plan, 1.0, 1.0).await;
                continue;
            }
        };
        stats.connects.fetch_add(1, Relaxed);
        stats.open.fetch_add(1, Relaxed);
        tokio::spawn(conn);
        let loops: Vec<_> = (0..streams)
            .map(|k| {
                let (plan, stats, seq) = (plan.clone(), stats.clone(), seq.clone());
                let sender = sender.clone();
                tokio::spawn(h2_loop(format!("h{id}-{k}"), sender, plan, stats, seq))
            })
            .collect();
        drop(sender);
        for l in loops {
            let _ = l.await;
        }
        stats.open.fetch_sub(1, Relaxed);
        if Instant::now() < plan.end {
            stats.closed_between.fetch_add(1, Relaxed);
        }
        seq = Arc::new(AtomicU64::new(seq.load(Relaxed)));
    }
}

/// Requests on one HTTP/2 connection until it closes or the end.
async fn h2_loop(
    name: String,
    mut sender: hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    seq: Arc<AtomicU64>,
) {
    use http_body_util::BodyExt;
    let mut warm = false;
    while Instant::now() < plan.end {
        if sender.ready().await.is_err() {
            return;
        }
        let n = seq.fetch_add(1, Relaxed);
        let path = format!("/t/{name}-{n}");
        let req = match hyper::Request::get(format!("http://{}{path}", plan.host))
            .body(http_body_util::Empty::new())
        {
            Ok(r) => r,
            Err(_) => return,
        };
        stats.sent.fetch_add(1, Relaxed);
        let deadline = Instant::now() + plan.timeout;
        let answer = match timeout_at(deadline, sender.try_send_request(req)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(mut e)) => {
                // Handed back unsent: the connection was closing; not a request that failed.
                if e.take_message().is_some() {
                    stats.sent.fetch_sub(1, Relaxed);
                    return;
                }
                Err(Failure::H2Stream)
            }
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                match timeout_at(deadline, resp.into_body().collect()).await {
                    Err(_) => Err(Failure::Timeout),
                    Ok(Err(_)) => Err(Failure::ClosedMidResponse),
                    Ok(Ok(b)) => Ok((status, b.to_bytes())),
                }
            }
        };
        match answer {
            Ok((status, body)) => {
                check(&stats, &plan, status, &body, &path);
                if !warm {
                    warm = true;
                    stats.warm.fetch_add(1, Relaxed);
                }
            }
            Err(f) => stats.fail(f, plan.start),
        }
        pause(&plan, plan.pause.0, plan.pause.1).await;
    }
}

/// Counts an answer to `path`: right, a status other than 200, or a wrong body.
fn check(stats: &Stats, plan: &Plan, status: u16, body: &[u8], path: &str) {
    let token = format!("(GET {path}, ");
    let prefix = format!("hello from {}-", plan.service);
    if status != 200 {
        stats.fail(Failure::Status(status), plan.start);
    } else if body.starts_with(prefix.as_bytes())
        && body.windows(token.len()).any(|w| w == token.as_bytes())
    {
        stats.ok.fetch_add(1, Relaxed);
    } else {
        stats.fail(Failure::WrongBody, plan.start);
        stats.sample(format!(
            "{} {path}: {:?}",
            plan.host,
            String::from_utf8_lossy(body)
        ));
    }
}

fn close(conn: &mut Option<TcpStream>, stats: &Stats) {
    if conn.take().is_some() {
        stats.open.fetch_sub(1, Relaxed);
    }
}

/// Sleeps a random time in `lo..hi` seconds, no later than the end.
async fn pause(plan: &Plan, lo: f64, hi: f64) {
    let secs = lo + fastrand::f64() * (hi - lo);
    let until = (Instant::now() + Duration::from_secs_f64(secs)).min(plan.end);
    sleep_until(until).await;
}

async fn connect(plan: &Plan) -> Result<TcpStream, Failure> {
    match timeout(plan.timeout, TcpStream::connect(plan.target)).await {
        Err(_) => Err(Failure::ConnectTimeout),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => Err(Failure::ConnectRefused),
        Ok(Err(_)) => Err(Failure::ConnectError),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// Sends `req` (in three pieces on a slow connection) and reads the whole answer into
/// `buf`.
async fn exchange(
    s: &mut TcpStream,
    plan: &Plan,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Answer, Failure> {
    if plan.slow {
        let a = 1 + fastrand::usize(..req.len() / 2);
        let b = a + 1 + fastrand::usize(..req.len() - a - 1);
        for (i, piece) in [&req[..a], &req[a..b], &req[b..]].into_iter().enumerate() {
            if i > 0 {
                sleep(plan.gap).await;
            }
            s.write_all(piece)
                .await
                .map_err(|_| Failure::ClosedWhileSending)?;
        }
    } else {
        s.write_all(req)
            .await
            .map_err(|_| Failure::ClosedWhileSending)?;
    }
    let deadline = Instant::now() + plan.timeout;
    buf.clear();
    loop {
        if !buf.is_empty() {
            if let Some(a) = parse(buf)? {
                return Ok(a);
            }
        }
        match timeout_at(deadline, s.read_buf(buf)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Ok(0)) if buf.is_empty() => return Err(Failure::ClosedBeforeResponse),
            Ok(Err(_)) if buf.is_empty() => return Err(Failure::ResetBeforeResponse),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(Failure::ClosedMidResponse),
            Ok(Ok(_)) => {}
        }
    }
}

/// The answer in `buf` once it is whole (a head and its Content-Length of body).
fn parse(buf: &[u8]) -> Result<Option<Answer>, Failure> {
    let mut fields = [httparse::EMPTY_HEADER; 24];
    let mut r = httparse::Response::new(&mut fields);
    let head = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Failure::BadResponse),
    };
    let status = r.code.ok_or(Failure::BadResponse)?;
    let mut len = None;
    let mut keep = r.version == Some(1);
    for f in r.headers.iter() {
        if f.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(f.value).map_err(|_| Failure::BadResponse)?;
            len = Some(
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| Failure::BadResponse)?,
            );
        } else if f.name.eq_ignore_ascii_case("connection")
            && f.value.eq_ignore_ascii_case(b"close")
        {
            keep = false;
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            // hello_backend and the router's own answers have a length.
            return Err(Failure::BadResponse);
        }
    }
    let len = len.ok_or(Failure::BadResponse)?;
    if buf.len() < head + len {
        return Ok(None);
    }
    if buf.len() > head + len {
        return Err(Failure::BadResponse);
    }
    Ok(Some(Answer {
        status,
        keep,
        body: head..head + len,
    }))
}

fn summary(args: &Args, stats: &Stats, start: Instant) {
    let failures = stats.failures.lock().map(|m| m.clone()).unwrap_or_default();
    let count = |s: &BTreeMap<u64, u64>| s.values().sum::<u64>();
    let failed: u64 = failures.values().map(count).sum();
    let savable: u64 = failures
        .iter()
        .filter(|(f, _)| f.savable())
        .map(|(_, s)| count(s))
        .sum();
    let sent = stats.sent.load(Relaxed);
    let ok = stats.ok.load(Relaxed);
    println!(
        "soak-load: {} HTTP/1.1 connections ({} slow, {} fast at {}/s) and {} HTTP/2 ({} request loops each at {}/s) to {} for {:.0} s",
        args.slow + args.fast,
        args.slow,
        args.fast,
        args.fast_rate,
        args.h2,
        args.h2_streams,
        args.fast_rate,
        args.target,
        start.elapsed().as_secs_f64()
    );
    println!("  requests sent:    {sent}");
    println!("  answered right:   {ok}");
    println!("  failed:           {failed}");
    println!(
        "  connections:      {} opened; {} closed by the router between requests and reopened (not failures; besides those the fast ones close themselves)",
        stats.connects.load(Relaxed),
        stats.closed_between.load(Relaxed)
    );
    for (f, secs) in &failures {
        let mark = if f.savable() {
            "  [a retry could have saved it]"
        } else {
            ""
        };
        println!(
            "  {:>8}  {}{mark}, at {}",
            count(secs),
            f.describe(),
            ranges(secs)
        );
    }
    if let Ok(v) = stats.samples.lock() {
        for s in v.iter() {
            println!("  wrong body: {s}");
        }
    }
    println!("RESULT sent={sent} ok={ok} failed={failed} savable={savable}");
}

/// Seconds as ranges with their counts: `t=61-63 s (120), t=140 s (3)`.
fn ranges(secs: &BTreeMap<u64, u64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u64, u64, u64)> = None;
    for (&s, &n) in secs {
        run = match run {
            Some((a, b, c)) if s <= b + 2 => Some((a, s, c + n)),
            Some((a, b, c)) => {
                out.push(range(a, b, c));
                Some((s, s, n))
            }
            None => Some((s, s, n)),
        };
    }
    if let Some((a, b, c)) = run {
        out.push(range(a, b, c));
    }
    out.join(", ")
}

fn range(a: u64, b: u64, n: u64) -> String {
    if a == b {
        format!("t={a} s ({n})")
    } else {
        format!("t={a}-{b} s ({n})")
    }
}
