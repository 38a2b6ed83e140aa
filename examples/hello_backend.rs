//! A tiny backend for the demo: serves HTTP on 127.0.0.1, registers itself in Consul under
//! `hello` (random), `hello-ip` (ip-hash), `hello-url` (url-hash) and `hello-load`
//! (least-load) with a TTL check it keeps passing, and deregisters on Ctrl-C.
//!
//! `cargo run --example hello_backend -- NAME LOAD [CONSUL_URL]`

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use consul_router::config::{Config, Overrides};
use consul_router::consul::types::{Registration, TtlCheck};
use consul_router::consul::ConsulClient;

const SERVICES: [(&str, &str); 4] = [
    ("hello", "random"),
    ("hello-ip", "ip-hash"),
    ("hello-url", "url-hash"),
    ("hello-load", "least-load"),
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "hello-1".into());
    let load = args.next().unwrap_or_else(|| "1".into());
    let consul_url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8500".into());

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let cfg = Config::from_file(
        Default::default(),
        &Overrides {
            consul: Some(consul_url),
            ..Default::default()
        },
    )?;
    let consul = ConsulClient::new(&cfg.consul)?;
    for (svc, strategy) in SERVICES {
        let id = format!("{svc}-{name}");
        consul
            .register(&Registration {
                id: id.clone(),
                name: svc.into(),
                tags: vec![format!("router.strategy={strategy}")],
                address: "127.0.0.1".into(),
                port,
                meta: [("load".to_string(), load.clone())].into(),
                check: Some(TtlCheck {
                    check_id: format!("{id}-ttl"),
                    ttl: "15s".into(),
                    status: "passing".into(),
                    deregister_after: Some("1m".into()),
                }),
                ..Default::default()
            })
            .await?;
    }
    println!("{name}: listening on 127.0.0.1:{port}, registered with load {load}");

    let heartbeat = {
        let consul = consul.clone();
        let name = name.clone();
        tokio::spawn(async move {
            loop {
                for (svc, _) in SERVICES {
                    let _ = consul
                        .update_check(&format!("{svc}-{name}-ttl"), "passing", "alive")
                        .await;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };

    let serve = async {
        loop {
            let (stream, _) = listener.accept().await?;
            let name = name.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let text = format!(
                        "hello from {name} ({} {}, client {})\n",
                        req.method(),
                        req.uri(),
                        req.headers()
                            .get("x-forwarded-for")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                    );
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
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
    heartbeat.abort();
    for (svc, _) in SERVICES {
        let _ = consul.deregister(&format!("{svc}-{name}")).await;
    }
    println!("{name}: deregistered");
    Ok(())
}
