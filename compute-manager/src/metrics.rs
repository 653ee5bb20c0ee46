use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The manager's metrics, registered once on the registry the binary passes down. Labels come
/// from enums or from endpoint ids (validated, bounded by the routing table), never from
/// client-supplied strings.
#[derive(Clone)]
pub struct ManagerMetrics {
    pub wakes: IntCounterVec,
    pub wake_seconds: HistogramVec,
    pub starts: IntCounterVec,
    /// Computes found running and taken over (`Manager::adopt_running`), by outcome.
    pub adoptions: IntCounterVec,
    pub suspends: IntCounterVec,
    pub crashes: IntCounterVec,
    pub held_clients: IntGauge,
    pub computes: IntGaugeVec,
    /// 1 for the endpoint's current state, 0 for the others (the usual Prometheus "enum"
    /// pattern); endpoints are bounded by the routing table.
    pub endpoint_state: IntGaugeVec,
    /// Wake time by the tier the compute was in when the client arrived (running, frozen,
    /// stopped): `wake_seconds` keeps its cold/warm split, this one shows what light sleep
    /// buys.
    pub wake_tier_seconds: HistogramVec,
    /// Computes put into light sleep, by outcome (`ok`, or `refused`: stopped instead).
    pub freezes: IntCounterVec,
    /// Frozen computes let run again by a wake, by outcome (`ok`, or `failed`: stopped and
    /// started again).
    pub thaws: IntCounterVec,
}

impl ManagerMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            wakes: IntCounterVec::new(
                Opts::new("pgwake_wake_requests_total", "Wake requests by outcome"),
                &["outcome"],
            )?,
            wake_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "pgwake_wake_duration_seconds",
                    "Time a client waited for a running compute",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
                &["kind"],
            )?,
            starts: IntCounterVec::new(
                Opts::new("pgwake_compute_starts_total", "Compute starts by outcome"),
                &["outcome"],
            )?,
            adoptions: IntCounterVec::new(
                Opts::new(
                    "pgwake_compute_adoptions_total",
                    "Running computes taken over from a previous manager, by outcome",
                ),
                &["outcome"],
            )?,
            suspends: IntCounterVec::new(
                Opts::new(
                    "pgwake_compute_suspends_total",
                    "Compute suspends by reason",
                ),
                &["reason"],
            )?,
            crashes: IntCounterVec::new(
                Opts::new(
                    "pgwake_compute_crashes_total",
                    "Computes that exited without being asked to",
                ),
                &["endpoint"],
            )?,
            held_clients: IntGauge::new(
                "pgwake_held_clients",
                "Clients waiting for a compute to start",
            )?,
            computes: IntGaugeVec::new(
                Opts::new("pgwake_computes", "Managed computes by state"),
                &["state"],
            )?,
            endpoint_state: IntGaugeVec::new(
                Opts::new(
                    "pgwake_endpoint_state",
                    "State of each managed endpoint's compute",
                ),
                &["endpoint", "state"],
            )?,
            wake_tier_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "pgwake_wake_tier_duration_seconds",
                    "Time a client waited for a running compute, by the tier it found the compute in",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0,
                ]),
                &["tier"],
            )?,
            freezes: IntCounterVec::new(
                Opts::new(
                    "pgwake_compute_freezes_total",
                    "Idle computes put into light sleep (frozen), by outcome",
                ),
                &["outcome"],
            )?,
            thaws: IntCounterVec::new(
                Opts::new(
                    "pgwake_compute_thaws_total",
                    "Frozen computes let run again by a wake, by outcome",
                ),
                &["outcome"],
            )?,
        };
        registry.register(Box::new(m.wake_tier_seconds.clone()))?;
        registry.register(Box::new(m.freezes.clone()))?;
        registry.register(Box::new(m.thaws.clone()))?;
        registry.register(Box::new(m.endpoint_state.clone()))?;
        registry.register(Box::new(m.wakes.clone()))?;
        registry.register(Box::new(m.wake_seconds.clone()))?;
        registry.register(Box::new(m.starts.clone()))?;
        registry.register(Box::new(m.adoptions.clone()))?;
        registry.register(Box::new(m.suspends.clone()))?;
        registry.register(Box::new(m.crashes.clone()))?;
        registry.register(Box::new(m.held_clients.clone()))?;
        registry.register(Box::new(m.computes.clone()))?;
        Ok(m)
    }
}
