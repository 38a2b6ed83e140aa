//! Hot-path benchmarks: host lookup in a 2,000-service table, each strategy's pick, header
//! rewriting, and a table rebuild for 2,000 services x 5 instances.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};

use consul_router::balance::{Exclude, Strategy};
use consul_router::proxy::fields::{self, Forwarding, PeerText, Scheme};
use consul_router::proxy::{h1, h2};
use consul_router::routing::{
    build, normalize, BuildOptions, Health, InstanceSpec, StateRegistry, MAX_HOST,
};

fn catalog(services: usize, instances: usize) -> BTreeMap<Arc<str>, Arc<[InstanceSpec]>> {
    (0..services)
        .map(|s| {
            let specs: Vec<InstanceSpec> = (0..instances)
                .map(|i| InstanceSpec {
                    id: format!("svc{s}-{i}"),
                    node: format!("node{}", i % 5),
                    address: format!("10.0.{}.{}", s % 250, i + 1),
                    port: 8000 + i as u16,
                    tags: vec![format!("router.strategy={}", Strategy::ALL[s % 4])],
                    load: Some((i * 7 % 10) as f64),
                    weight_passing: 1,
                    weight_warning: 1,
                    health: Health::Passing,
                })
                .collect();
            (Arc::from(format!("svc{s}").as_str()), Arc::from(specs))
        })
        .collect()
}

fn opts() -> BuildOptions {
    BuildOptions {
        domains: vec!["app.example.net".into()],
        default_strategy: Strategy::Random,
        include_warning: false,
        max_idle_per_instance: 64,
        exclude_services: vec![],
        expose: consul_router::config::Expose::All,
        static_services: Default::default(),
        dns_ttl: std::time::Duration::from_secs(30),
    }
}

fn benches(c: &mut Criterion) {
    let cat = catalog(2_000, 5);
    let mut reg = StateRegistry::default();
    let table = build(&cat, &Default::default(), &opts(), &mut reg);

    c.bench_function("lookup/2000-services/normalize+lookup", |b| {
        b.iter(|| {
            let mut buf = [0u8; MAX_HOST + 2];
            let host = normalize(black_box(b"Svc1234.App.Example.NET:8080"), &mut buf).unwrap();
            black_box(table.lookup(host).is_some())
        })
    });

    for (s, name) in [
        (0, "random"),
        (1, "ip-hash"),
        (2, "url-hash"),
        (3, "least-load"),
    ] {
        let svc = table.services[format!("svc{s}").as_str()].clone();
        assert_eq!(svc.strategy().as_str(), name);
        let mut key = 0u64;
        c.bench_function(&format!("pick/{name}/5-instances"), |b| {
            b.iter(|| {
                key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                black_box(svc.pick(black_box(key), Exclude::default()))
            })
        });
    }

    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "chat.app.example.net"),
        ("user-agent", "curl/8.0"),
        ("accept", "*/*"),
        ("connection", "keep-alive"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    let trusted = vec!["127.0.0.0/8".parse().unwrap()];
    let peer = "127.0.0.1".parse().unwrap();
    let host = HeaderValue::from_static("chat.app.example.net");
    // The HTTP/1 fast path: parse a typical head from nginx in place and write the backend's.
    let raw = b"GET /api/messages?room=7 HTTP/1.1\r\nHost: chat.app.example.net\r\n\
        Connection: keep-alive\r\nX-Real-IP: 203.0.113.7\r\nX-Forwarded-For: 203.0.113.7\r\n\
        X-Forwarded-Proto: https\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\
        Accept: text/html,application/xhtml+xml\r\nAccept-Language: en-US,en;q=0.5\r\n\
        Accept-Encoding: gzip, deflate, br\r\nCookie: session=abcdef0123456789\r\n\r\n";
    let peer_text = PeerText::new(peer);
    let mut out = Vec::with_capacity(1024);
    c.bench_function("headers/h1-parse+rewrite", |b| {
        b.iter(|| {
            let mut slots = h1::head::slots();
            let head = h1::request::parse_request(black_box(raw), &mut slots)
                .unwrap()
                .unwrap();
            // As the fast path does for a trusted peer: the client from the chain, as text.
            let ip = fields::client_ip_in(head.forwarded_for(), peer, &trusted);
            let client = PeerText::new(ip);
            let fwd = Forwarding {
                peer: &peer_text,
                trusted: true,
                client: &client,
                drop_underscores: false,
                request_id: b"5f3a9c01-1a-7",
                scheme: Scheme::Http,
                port: "80",
            };
            out.clear();
            head.write_backend(&mut out, &fwd);
            black_box(out.len())
        })
    });

    c.bench_function("headers/httparse-only", |b| {
        b.iter(|| {
            let mut h = [httparse::EMPTY_HEADER; 100];
            let mut r = httparse::Request::new(&mut h);
            black_box(r.parse(black_box(raw)).unwrap());
        })
    });
    c.bench_function("headers/h2-rewrite", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                let chain = h
                    .get_all("x-forwarded-for")
                    .iter()
                    .map(HeaderValue::as_bytes);
                let ip = fields::client_ip_in(chain, peer, &trusted);
                let client = PeerText::new(ip);
                let fwd = Forwarding {
                    peer: &peer_text,
                    trusted: true,
                    client: &client,
                    drop_underscores: false,
                    request_id: b"5f3a9c01-1a-7",
                    scheme: Scheme::Http,
                    port: "80",
                };
                h2::fields::rewrite_request(&mut h, &fwd, &host, &[]);
                black_box((h, ip))
            },
            criterion::BatchSize::SmallInput,
        )
    });

    let mut group = c.benchmark_group("rebuild");
    group.sample_size(20);
    group.bench_function("2000-services-x5", |b| {
        b.iter(|| black_box(build(&cat, &Default::default(), &opts(), &mut reg)))
    });
    group.finish();
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
