//! The per-connection parsing work before a route is known: the StartupMessage body, then the
//! endpoint id out of `options`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgwake_proxy::options::extract_endpoint;
use pgwake_proxy::wire::{parse_startup_body, StartupMessage, StartupPacket};

/// What libpq 17 sends for `psql "host=... user=postgres dbname=postgres options=endpoint=demo"`.
fn libpq_body(options: &str) -> Vec<u8> {
    let msg = StartupMessage {
        major: 3,
        minor: 0,
        params: [
            ("user", "postgres"),
            ("database", "postgres"),
            ("options", options),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
        ]
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect(),
    };
    let mut buf = bytes::BytesMut::new();
    msg.encode(&mut buf);
    buf[4..].to_vec()
}

fn startup(c: &mut Criterion) {
    let mut g = c.benchmark_group("startup");
    for (name, options) in [
        ("endpoint_only", "endpoint=ep-cool-darkness-123456"),
        (
            "with_settings",
            "-c statement_timeout=5s -c search_path=app\\ schema endpoint=ep-cool-darkness-123456",
        ),
    ] {
        let body = libpq_body(options);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("parse_body/{name}"), |b| {
            b.iter(|| parse_startup_body(black_box(&body)).unwrap())
        });
        g.bench_function(format!("extract_endpoint/{name}"), |b| {
            b.iter(|| extract_endpoint(black_box(options)).unwrap())
        });
        // Both, as conn.rs does them for every client.
        g.bench_function(format!("parse_and_extract/{name}"), |b| {
            b.iter(|| {
                let StartupPacket::Startup(m) = parse_startup_body(black_box(&body)).unwrap()
                else {
                    unreachable!()
                };
                extract_endpoint(m.get("options").unwrap()).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, startup);
criterion_main!(benches);
