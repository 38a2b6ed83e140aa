//! A tiny backend for the demo: serves HTTP on 127.0.0.1:PORT and answers every request
//! with its name. It does not talk to Consul: `consul-router announce` runs it, registers it
//! and reports its load (see scripts/demo.sh).
//!
//! `GET /busy?secs=N` burns every CPU it may use for N seconds (1 to 300, default 10) in the
//! background and answers at once, so that its announce reports a high load and least-load
//! routes around it.
//!
//! `cargo run --example hello_backend -- NAME PORT`

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "hello".into());
    let port: u16 = args.next().unwrap_or_else(|| "0".into()).parse()?;
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("{name}: listening on {}", listener.local_addr()?);

    let serve = async {
        loop {
            let (stream, _) = listener.accept().await?;
            let name = name.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let text = answer(&name, &req);
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = serve => r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("{name}: stopping");
    Ok(())
}

/// The body for `req`: a line naming this backend; `/busy` also starts burning CPU.
fn answer(name: &str, req: &Request<hyper::body::Incoming>) -> String {
    if req.uri().path() == "/busy" {
        let secs = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("secs=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(10)
            .clamp(1, 300);
        let threads = burn(Duration::from_secs(secs));
        return format!("{name} is busy on {threads} threads for {secs} s\n");
    }
    format!(
        "hello from {name} ({} {}, client {})\n",
        req.method(),
        req.uri(),
        req.headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    )
}

/// Spins one thread per usable CPU until `time` has passed; returns the thread count.
fn burn(time: Duration) -> usize {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let end = Instant::now() + time;
    for _ in 0..threads {
        std::thread::spawn(move || {
            let mut x = 0u64;
            while Instant::now() < end {
                for i in 0..10_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                }
            }
        });
    }
    threads
}
