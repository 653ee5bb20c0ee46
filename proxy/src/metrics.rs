use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The proxy's metrics, registered on the one registry the binary passes down. Every label
/// value comes from an enum-like `&'static str`, never from the client.
#[derive(Clone)]
pub struct ProxyMetrics {
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub closed: IntCounterVec,
    pub errors: IntCounterVec,
    pub bytes: IntCounterVec,
    /// Of `bytes`, what splice(2) moved without copying it through user space: how much of
    /// the traffic is zero-copy (bulk on plain TCP) as opposed to copied (small messages, TLS).
    pub spliced: IntCounterVec,
    pub cancels: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    /// `POST /sql` requests by HTTP status and kind (`ok` or the error's kind).
    pub sql_requests: IntCounterVec,
    pub sql_seconds: Histogram,
    /// Idle compute connections in the `/sql` pool.
    pub sql_pool_idle: IntGauge,
    /// Client sessions handed to each relay thread (`[proxy] relay_threads`), by thread index.
    pub relay_sessions: IntCounterVec,
    /// Spare compute connections by what became of them (`[proxy] spare_max_age`).
    pub spares: IntCounterVec,
}

impl ProxyMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            accepted: IntCounter::new(
                "pgwake_connections_accepted_total",
                "Client connections accepted",
            )?,
            active: IntGauge::new("pgwake_connections_active", "Client connections open")?,
            closed: IntCounterVec::new(
                Opts::new(
                    "pgwake_connections_closed_total",
                    "Client connections closed",
                ),
                &["outcome"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "pgwake_connection_errors_total",
                    "Connections ended by an error, by kind and side",
                ),
                &["kind", "side"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new("pgwake_forwarded_bytes_total", "Bytes relayed"),
                &["direction"],
            )?,
            spliced: IntCounterVec::new(
                Opts::new(
                    "pgwake_spliced_bytes_total",
                    "Of the bytes relayed, those moved by splice(2) without a copy",
                ),
                &["direction"],
            )?,
            cancels: IntCounterVec::new(
                Opts::new("pgwake_cancel_requests_total", "Cancel requests by outcome"),
                &["outcome"],
            )?,
            tls_handshakes: IntCounterVec::new(
                Opts::new("pgwake_tls_handshakes_total", "TLS handshakes by outcome"),
                &["outcome"],
            )?,
            sql_requests: IntCounterVec::new(
                Opts::new(
                    "pgwake_sql_requests_total",
                    "SQL-over-HTTP requests by status and kind",
                ),
                &["status", "kind"],
            )?,
            sql_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "pgwake_sql_request_seconds",
                    "SQL-over-HTTP request latency, wake included",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            )?,
            sql_pool_idle: IntGauge::new(
                "pgwake_sql_pool_idle_connections",
                "Idle compute connections in the SQL-over-HTTP pool",
            )?,
            relay_sessions: IntCounterVec::new(
                Opts::new(
                    "pgwake_relay_sessions_total",
                    "Client connections handed to each relay thread",
                ),
                &["relay"],
            )?,
            spares: IntCounterVec::new(
                Opts::new(
                    "pgwake_spare_connections_total",
                    "Compute connections opened ahead of a client, by outcome (used, expired, dead, moved)",
                ),
                &["outcome"],
            )?,
        };
        registry.register(Box::new(m.spares.clone()))?;
        registry.register(Box::new(m.relay_sessions.clone()))?;
        registry.register(Box::new(m.sql_pool_idle.clone()))?;
        registry.register(Box::new(m.sql_requests.clone()))?;
        registry.register(Box::new(m.sql_seconds.clone()))?;
        registry.register(Box::new(m.tls_handshakes.clone()))?;
        registry.register(Box::new(m.cancels.clone()))?;
        registry.register(Box::new(m.accepted.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        registry.register(Box::new(m.closed.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.spliced.clone()))?;
        Ok(m)
    }
}
