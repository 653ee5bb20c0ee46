//! The cancel-key map: every session registers a key after authentication (a CSPRNG draw and a
//! map insert) and drops it at the end; a CancelRequest looks one up.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pgwake_compute_manager::ComputeAddr;
use pgwake_proxy::cancel::{CancelMap, CancelTarget};
use pgwake_router::EndpointId;

fn target() -> CancelTarget {
    CancelTarget {
        endpoint: EndpointId::parse("ep-bench").unwrap(),
        addr: ComputeAddr::new("127.0.0.1:5432"),
        pid: 4242,
        secret: vec![7; 4],
    }
}

fn cancel(c: &mut Criterion) {
    let mut g = c.benchmark_group("cancel_map");
    for live in [0usize, 10_000] {
        let map = CancelMap::new();
        // Other live sessions, so the map is not trivially empty.
        let _others: Vec<_> = (0..live).map(|_| map.register(target())).collect();
        let t = target();
        g.bench_with_input(
            BenchmarkId::new("register_and_drop", live),
            &live,
            |b, _| b.iter(|| drop(map.register(black_box(t.clone())))),
        );
        let (pid, secret, _guard) = map.register(target());
        g.bench_with_input(BenchmarkId::new("lookup_hit", live), &live, |b, _| {
            b.iter(|| map.lookup(black_box(pid), black_box(&secret)).unwrap())
        });
        let wrong = vec![0u8; 4];
        g.bench_with_input(
            BenchmarkId::new("lookup_wrong_secret", live),
            &live,
            |b, _| b.iter(|| assert!(map.lookup(black_box(pid), black_box(&wrong)).is_none())),
        );
    }
    g.finish();
}

criterion_group!(benches, cancel);
criterion_main!(benches);
