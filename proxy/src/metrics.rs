use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The proxy's metrics, registered on the one registry the binary passes down. Every label
/// value comes from an enum-like `&'static str`, never from the client.
#[derive(Clone)]
pub struct ProxyMetrics {
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub closed: IntCounterVec,
    pub errors: IntCounterVec,
    pub bytes: IntCounterVec,
    pub cancels: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
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
            cancels: IntCounterVec::new(
                Opts::new("pgwake_cancel_requests_total", "Cancel requests by outcome"),
                &["outcome"],
            )?,
            tls_handshakes: IntCounterVec::new(
                Opts::new("pgwake_tls_handshakes_total", "TLS handshakes by outcome"),
                &["outcome"],
            )?,
        };
        registry.register(Box::new(m.tls_handshakes.clone()))?;
        registry.register(Box::new(m.cancels.clone()))?;
        registry.register(Box::new(m.accepted.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        registry.register(Box::new(m.closed.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        Ok(m)
    }
}
