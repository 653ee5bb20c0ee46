//! Cost of one wake (a start) and one suspend of an endpoint while the manager holds state for
//! 1, 1,000 and 100,000 others: with gauges kept per transition it must not grow with them
//! (issue 10, "the growth bug"). The backend is a fake that starts and stops at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pgwake_compute_manager::{
    BackendError, Backends, ComputeAddr, ComputeBackend, Manager, ManagerConfig, ManagerMetrics,
    RunningCompute,
};
use pgwake_router::{BackendSpec, EndpointId, Route};
use tokio::sync::watch;

struct Fake;

struct FakeCompute {
    addr: ComputeAddr,
    exited: watch::Sender<bool>,
}

#[async_trait]
impl ComputeBackend for Fake {
    async fn start(&self, _route: &Route) -> Result<Box<dyn RunningCompute>, BackendError> {
        Ok(Box::new(FakeCompute {
            addr: ComputeAddr::new("127.0.0.1:5432"),
            exited: watch::channel(false).0,
        }))
    }
}

#[async_trait]
impl RunningCompute for FakeCompute {
    fn addr(&self) -> &ComputeAddr {
        &self.addr
    }
    async fn stop(&self) -> Result<(), BackendError> {
        self.exited.send_replace(true);
        Ok(())
    }
    async fn exited(&self) {
        let _ = self.exited.subscribe().wait_for(|e| *e).await;
    }
}

fn route(i: usize) -> Arc<Route> {
    Arc::new(Route {
        endpoint: EndpointId::parse(&format!("ep{i}")).unwrap(),
        backend: BackendSpec::Local {
            settings: BTreeMap::new(),
        },
        idle_timeout: None,
        deep_sleep_after: None,
        allow: Vec::new(),
        max_connections: None,
    })
}

fn transitions(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("wake_and_suspend");
    for endpoints in [1usize, 1_000, 100_000] {
        let metrics = ManagerMetrics::new(&prometheus::Registry::new()).unwrap();
        let m = Manager::new(
            ManagerConfig::default(),
            Backends::all(Arc::new(Fake)),
            metrics,
        );
        // Every endpoint woken and suspended once: the manager holds state (and metric series)
        // for each, as it does for a table whose endpoints all saw a client.
        let routes: Vec<Arc<Route>> = (0..endpoints).map(route).collect();
        rt.block_on(async {
            for r in &routes {
                drop(m.wake(r).await.unwrap());
                assert!(m.suspend(&r.endpoint).await);
            }
        });
        let r = Arc::clone(&routes[0]);
        group.bench_with_input(BenchmarkId::from_parameter(endpoints), &r, |b, r| {
            b.iter(|| {
                rt.block_on(async {
                    drop(m.wake(r).await.unwrap());
                    assert!(m.suspend(&r.endpoint).await);
                })
            })
        });
        rt.block_on(m.shutdown());
    }
    group.finish();
}

criterion_group!(benches, transitions);
criterion_main!(benches);
