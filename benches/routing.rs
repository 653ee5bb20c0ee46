//! RoutingTable lookups (the one shared structure every connection reads) at 1, 10k and 1M
//! endpoints: hits cycle through 4096 ids spread over the table so the cost includes cache
//! misses a real mix of clients would cause; a miss is an unknown id.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pgwake_router::{BackendSpec, EndpointId, Route, RoutingTable};
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn id(i: usize) -> EndpointId {
    // Neon-style ids: about the length real ones have.
    EndpointId::parse(&format!("ep-bench-{i:08}")).unwrap()
}

fn table(n: usize) -> RoutingTable {
    let t = RoutingTable::new();
    for i in 0..n {
        t.upsert(Route {
            endpoint: id(i),
            backend: BackendSpec::Local {
                settings: BTreeMap::new(),
            },
            idle_timeout: None,
            deep_sleep_after: None,
            allow: Vec::new(),
            max_connections: None,
        });
    }
    t
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing_lookup");
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for n in [1usize, 10_000, 1_000_000] {
        let t = table(n);
        let mut ids: Vec<EndpointId> = (0..4096).map(|i| id(i * n / 4096)).collect();
        ids.shuffle(&mut rng);
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("hit", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % ids.len();
                t.lookup(black_box(&ids[i])).unwrap()
            })
        });
        let unknown = EndpointId::parse("ep-not-in-table").unwrap();
        g.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| assert!(t.lookup(black_box(&unknown)).is_none()))
        });
        // What the proxy does per connection: validate the client's string, then look up.
        let names: Vec<String> = ids.iter().map(|i| i.as_str().to_owned()).collect();
        g.bench_with_input(BenchmarkId::new("parse_and_hit", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % names.len();
                let id = EndpointId::parse(black_box(&names[i])).unwrap();
                t.lookup(&id).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // The 1M-entry table takes a moment to build; fewer samples keep the whole run short.
    config = Criterion::default().sample_size(50);
    targets = routing
}
criterion_main!(benches);
