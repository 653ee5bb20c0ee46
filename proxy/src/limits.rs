//! Admission limits: per-client-IP connection rate and concurrency, per-endpoint connection
//! caps, and the cap on connections still in their startup. Each refusal becomes a 53300 for
//! the client and a metric; none of them touches a compute.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use pgwake_router::EndpointId;
use serde::Deserialize;

/// The `[limits]` table. Zero means "no limit" for every field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections that have not completed their startup (no StartupMessage yet) at once.
    /// Counted apart from `[proxy] max_connections`, so that sockets that never speak cannot
    /// take the places of sessions; they end at `startup_timeout`.
    #[serde(default = "default_max_pending_startups")]
    pub max_pending_startups: usize,
    /// Connections at once from one client IP (the PROXY header's address when enabled), in
    /// every state, startup included.
    #[serde(default)]
    pub max_connections_per_ip: usize,
    /// Client connections at once per endpoint (an endpoint's `max_connections` overrides).
    #[serde(default)]
    pub max_connections_per_endpoint: usize,
    /// New connections per second from one client IP (sustained rate of a token bucket).
    #[serde(default)]
    pub connections_per_ip_per_second: f64,
    /// How many connections one IP may open at once before the rate applies.
    #[serde(default)]
    pub connections_per_ip_burst: f64,
}

fn default_max_pending_startups() -> usize {
    10_000
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_pending_startups: default_max_pending_startups(),
            max_connections_per_ip: 0,
            max_connections_per_endpoint: 0,
            connections_per_ip_per_second: 0.0,
            connections_per_ip_burst: 0.0,
        }
    }
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    pub fn try_take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full_at(&self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate >= burst
    }
}

/// Entries above this are pruned (full buckets carry no information); bounds the map's
/// memory under a flood from many addresses.
const PRUNE_ABOVE: usize = 10_000;

pub struct Limits {
    /// Swapped by a config reload ([`Limits::set_config`]); copied out once per check.
    cfg: RwLock<LimitsConfig>,
    per_ip: DashMap<IpAddr, TokenBucket>,
    last_prune: Mutex<Instant>,
    per_endpoint: DashMap<EndpointId, Arc<AtomicUsize>>,
    /// Open connections per client IP; an entry lives only while its count is above zero.
    per_ip_open: Arc<DashMap<IpAddr, usize>>,
}

/// Holds one of a client IP's connection places (`max_connections_per_ip`); holds nothing
/// when there is no such limit.
pub struct IpSlot(Option<(Arc<DashMap<IpAddr, usize>>, IpAddr)>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some((map, ip)) = &self.0 else { return };
        if let dashmap::Entry::Occupied(mut e) = map.entry(*ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// Holds one of an endpoint's connection slots.
pub struct EndpointSlot(Arc<AtomicUsize>);

impl Drop for EndpointSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limits {
    pub fn new(cfg: LimitsConfig) -> Self {
        Self {
            cfg: RwLock::new(cfg),
            per_ip: DashMap::new(),
            last_prune: Mutex::new(Instant::now()),
            per_endpoint: DashMap::new(),
            per_ip_open: Arc::new(DashMap::new()),
        }
    }

    fn config(&self) -> LimitsConfig {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies to the next check; buckets already filled keep their tokens.
    pub fn set_config(&self, cfg: LimitsConfig) {
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    /// The cap on connections before their startup, `None` for no cap.
    pub fn max_pending_startups(&self) -> Option<usize> {
        let max = self.config().max_pending_startups;
        (max > 0).then_some(max)
    }

    /// Takes one of `ip`'s connection places, or `None` if it has `max_connections_per_ip`
    /// open already. Without that limit nothing is counted.
    pub fn acquire_ip(&self, ip: IpAddr) -> Option<IpSlot> {
        let max = self.config().max_connections_per_ip;
        if max == 0 {
            return Some(IpSlot(None));
        }
        let mut open = self.per_ip_open.entry(ip).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(IpSlot(Some((Arc::clone(&self.per_ip_open), ip))))
    }

    /// Client IPs with connections counted against `max_connections_per_ip`.
    pub fn ips_with_connections(&self) -> usize {
        self.per_ip_open.len()
    }

    fn burst(cfg: &LimitsConfig) -> f64 {
        if cfg.connections_per_ip_burst >= 1.0 {
            cfg.connections_per_ip_burst
        } else {
            cfg.connections_per_ip_per_second.max(1.0)
        }
    }

    /// Whether `ip` may open another connection now.
    pub fn admit_ip(&self, ip: IpAddr) -> bool {
        let cfg = self.config();
        let rate = cfg.connections_per_ip_per_second;
        if rate <= 0.0 {
            return true;
        }
        let burst = Self::burst(&cfg);
        let now = Instant::now();
        let ok = self
            .per_ip
            .entry(ip)
            .or_insert_with(|| TokenBucket::full(burst, now))
            .try_take(rate, burst, now);
        if self.per_ip.len() > PRUNE_ABOVE {
            self.prune(now, rate, burst);
        }
        ok
    }

    fn prune(&self, now: Instant, rate: f64, burst: f64) {
        let Ok(mut last) = self.last_prune.try_lock() else {
            return;
        };
        if now.saturating_duration_since(*last) < Duration::from_secs(1) {
            return;
        }
        *last = now;
        self.per_ip.retain(|_, b| !b.is_full_at(rate, burst, now));
    }

    /// Takes a connection slot of `endpoint`, or `None` if it is at its cap.
    pub fn acquire_endpoint(
        &self,
        endpoint: &EndpointId,
        route_max: Option<usize>,
    ) -> Option<EndpointSlot> {
        let max = route_max.unwrap_or_else(|| self.config().max_connections_per_endpoint);
        let counter = match self.per_endpoint.get(endpoint) {
            Some(c) => Arc::clone(&c),
            None => Arc::clone(&self.per_endpoint.entry(endpoint.clone()).or_default()),
        };
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        let slot = EndpointSlot(counter);
        if max > 0 && prev >= max {
            return None; // `slot` drops and gives the count back
        }
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(2.0, t0);
        assert!(b.try_take(1.0, 2.0, t0));
        assert!(b.try_take(1.0, 2.0, t0));
        assert!(!b.try_take(1.0, 2.0, t0));
        assert!(!b.try_take(1.0, 2.0, t0 + Duration::from_millis(500)));
        assert!(b.try_take(1.0, 2.0, t0 + Duration::from_millis(1000)));
        // Never more than the burst, however long it rested.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.try_take(1.0, 2.0, later));
        assert!(b.try_take(1.0, 2.0, later));
        assert!(!b.try_take(1.0, 2.0, later));
    }

    #[test]
    fn concurrent_connections_per_ip_are_capped_and_given_back() {
        let l = Limits::new(LimitsConfig {
            max_connections_per_ip: 2,
            ..Default::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = l.acquire_ip(a).unwrap();
        let a2 = l.acquire_ip(a).unwrap();
        assert!(l.acquire_ip(a).is_none(), "a third from the same address");
        let b1 = l.acquire_ip(b).unwrap();
        drop(a1);
        let a3 = l.acquire_ip(a).unwrap();
        drop((a2, a3, b1));
        assert_eq!(
            l.ips_with_connections(),
            0,
            "no entry outlives its connections"
        );

        let unlimited = Limits::new(LimitsConfig::default());
        let held: Vec<_> = (0..100).map(|_| unlimited.acquire_ip(a).unwrap()).collect();
        assert_eq!(
            unlimited.ips_with_connections(),
            0,
            "nothing counted without a limit"
        );
        drop(held);
    }

    #[test]
    fn ip_rate_is_per_address() {
        let l = Limits::new(LimitsConfig {
            connections_per_ip_per_second: 0.001,
            connections_per_ip_burst: 3.0,
            ..Default::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| l.admit_ip(a)));
        assert!(!l.admit_ip(a));
        assert!(l.admit_ip(b));
    }

    #[test]
    fn endpoint_cap_and_override() {
        let l = Limits::new(LimitsConfig {
            max_connections_per_endpoint: 2,
            ..Default::default()
        });
        let ep = EndpointId::parse("ep").unwrap();
        let s1 = l.acquire_endpoint(&ep, None).unwrap();
        let _s2 = l.acquire_endpoint(&ep, None).unwrap();
        assert!(l.acquire_endpoint(&ep, None).is_none());
        drop(s1);
        let _s3 = l.acquire_endpoint(&ep, None).unwrap();
        assert!(l.acquire_endpoint(&ep, Some(3)).is_some());
        let other = EndpointId::parse("other").unwrap();
        assert!(l.acquire_endpoint(&other, None).is_some());
    }

    #[test]
    fn a_new_config_applies_to_the_next_check() {
        let l = Limits::new(LimitsConfig::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..5).all(|_| l.admit_ip(ip)), "unlimited");
        l.set_config(LimitsConfig {
            max_connections_per_endpoint: 1,
            connections_per_ip_per_second: 0.001,
            connections_per_ip_burst: 1.0,
            ..LimitsConfig::default()
        });
        assert!(l.admit_ip(ip));
        assert!(!l.admit_ip(ip));
        let ep = EndpointId::parse("ep").unwrap();
        let _s = l.acquire_endpoint(&ep, None).unwrap();
        assert!(l.acquire_endpoint(&ep, None).is_none());
    }
}
