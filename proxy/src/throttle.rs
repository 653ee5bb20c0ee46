//! Failed logins counted per client address and per endpoint, fail2ban style: past a threshold
//! within a window, the address (or, for an endpoint under attack, every address that has
//! failed on it recently) is refused for a back-off period without running SCRAM at all.
//!
//! An endpoint ban does not lock out its owner: it applies only to addresses that failed on
//! the endpoint within the window, so a client that has not failed still gets in.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The `[auth]` throttling keys.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Failed logins from one address within `window` before it is refused; 0 disables.
    #[serde(default = "d_per_ip")]
    pub max_failures_per_ip: u32,
    /// Failed logins on one endpoint within `window` before addresses that failed on it are
    /// refused; 0 disables.
    #[serde(default = "d_per_endpoint")]
    pub max_failures_per_endpoint: u32,
    #[serde(default = "d_window", with = "humantime_serde")]
    pub window: Duration,
    /// How long a refused address (or endpoint) stays refused.
    #[serde(default = "d_ban", with = "humantime_serde")]
    pub ban: Duration,
    /// Addresses and endpoints tracked at once (memory bound under a spread-out attack).
    #[serde(default = "d_max_tracked")]
    pub max_tracked: usize,
}

fn d_per_ip() -> u32 {
    20
}
fn d_per_endpoint() -> u32 {
    200
}
fn d_window() -> Duration {
    Duration::from_secs(60)
}
fn d_ban() -> Duration {
    Duration::from_secs(300)
}
fn d_max_tracked() -> usize {
    100_000
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            max_failures_per_ip: d_per_ip(),
            max_failures_per_endpoint: d_per_endpoint(),
            window: d_window(),
            ban: d_ban(),
            max_tracked: d_max_tracked(),
        }
    }
}

/// Why a login was refused before it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    Ip,
    Endpoint,
}

impl Throttled {
    pub fn label(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Endpoint => "endpoint",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Count {
    window_start: Instant,
    failures: u32,
    banned_until: Option<Instant>,
}

impl Count {
    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|t| now < t)
    }

    fn recent(&self, now: Instant, window: Duration) -> bool {
        now.duration_since(self.window_start) < window
    }
}

#[derive(Debug)]
struct Counts<K> {
    map: HashMap<K, Count>,
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Counts<K> {
    fn get(&self, k: &K) -> Option<&Count> {
        self.map.get(k)
    }

    /// Counts one failure; true when this failure starts a ban.
    fn fail(&mut self, k: &K, now: Instant, cfg: &ThrottleConfig, max: u32) -> bool {
        if max == 0 {
            return false;
        }
        if !self.map.contains_key(k) && self.map.len() >= cfg.max_tracked {
            self.map
                .retain(|_, c| c.banned(now) || c.recent(now, cfg.window));
            if self.map.len() >= cfg.max_tracked {
                // Still full of live entries: not tracking one more is the bounded choice;
                // the per-endpoint count still sees these failures.
                return false;
            }
        }
        let c = self.map.entry(k.clone()).or_insert(Count {
            window_start: now,
            failures: 0,
            banned_until: None,
        });
        if !c.recent(now, cfg.window) {
            c.window_start = now;
            c.failures = 0;
        }
        c.failures = c.failures.saturating_add(1);
        if c.failures >= max && !c.banned(now) {
            c.banned_until = Some(now + cfg.ban);
            return true;
        }
        false
    }
}

/// The failure counters; one per proxy.
#[derive(Debug)]
pub struct Throttle {
    cfg: ThrottleConfig,
    ips: Mutex<Counts<IpAddr>>,
    endpoints: Mutex<Counts<String>>,
    /// (endpoint, address) pairs that failed within the window: who an endpoint ban refuses.
    pairs: Mutex<Counts<(String, IpAddr)>>,
}

/// What [`Throttle::failed`] started, for the log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NewBans {
    pub ip: bool,
    pub endpoint: bool,
}

impl Throttle {
    pub fn new(cfg: ThrottleConfig) -> Self {
        Self {
            cfg,
            ips: Mutex::new(Counts::default()),
            endpoints: Mutex::new(Counts::default()),
            pairs: Mutex::new(Counts::default()),
        }
    }

    /// Whether a login from `ip` to `endpoint` is to be refused now.
    pub fn check(&self, ip: IpAddr, endpoint: &str, now: Instant) -> Result<(), Throttled> {
        if lock(&self.ips).get(&ip).is_some_and(|c| c.banned(now)) {
            return Err(Throttled::Ip);
        }
        let endpoint_banned = lock(&self.endpoints)
            .get(&endpoint.to_string())
            .is_some_and(|c| c.banned(now));
        if endpoint_banned
            && lock(&self.pairs)
                .get(&(endpoint.to_string(), ip))
                .is_some_and(|c| c.recent(now, self.cfg.window) || c.banned(now))
        {
            return Err(Throttled::Endpoint);
        }
        Ok(())
    }

    /// Counts a failed login.
    pub fn failed(&self, ip: IpAddr, endpoint: &str, now: Instant) -> NewBans {
        let cfg = &self.cfg;
        let ip_ban = lock(&self.ips).fail(&ip, now, cfg, cfg.max_failures_per_ip);
        let endpoint_ban = lock(&self.endpoints).fail(
            &endpoint.to_string(),
            now,
            cfg,
            cfg.max_failures_per_endpoint,
        );
        // The pair never bans by itself; it remembers that this address failed here.
        lock(&self.pairs).fail(&(endpoint.to_string(), ip), now, cfg, u32::MAX);
        NewBans {
            ip: ip_ban,
            endpoint: endpoint_ban,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The counters stay consistent even if a holder panicked: each update is one assignment.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ThrottleConfig {
        ThrottleConfig {
            max_failures_per_ip: 3,
            max_failures_per_endpoint: 5,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
            max_tracked: 1000,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn an_address_is_refused_after_its_threshold_and_let_in_after_the_ban() {
        let t = Throttle::new(cfg());
        let t0 = Instant::now();
        assert_eq!(t.failed(ip(1), "e", t0), NewBans::default());
        t.failed(ip(1), "e", t0);
        assert!(t.check(ip(1), "e", t0).is_ok());
        assert!(t.failed(ip(1), "other", t0).ip);
        assert_eq!(t.check(ip(1), "e", t0), Err(Throttled::Ip));
        assert_eq!(t.check(ip(1), "x", t0), Err(Throttled::Ip));
        assert!(
            t.check(ip(2), "e", t0).is_ok(),
            "other addresses are served"
        );
        let later = t0 + Duration::from_secs(301);
        assert!(t.check(ip(1), "e", later).is_ok());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t = Throttle::new(cfg());
        let t0 = Instant::now();
        for i in 0..10u64 {
            t.failed(ip(1), "e", t0 + Duration::from_secs(i * 30));
        }
        // Two failures per 60 s window at most: never three.
        assert!(t.check(ip(1), "e", t0 + Duration::from_secs(300)).is_ok());
    }

    #[test]
    fn an_endpoint_ban_refuses_only_addresses_that_failed_on_it() {
        let t = Throttle::new(cfg());
        let t0 = Instant::now();
        for n in 1..=5 {
            t.failed(ip(n), "e", t0);
        }
        assert_eq!(t.check(ip(1), "e", t0), Err(Throttled::Endpoint));
        assert!(t.check(ip(1), "f", t0).is_ok());
        assert!(
            t.check(ip(99), "e", t0).is_ok(),
            "the owner is not locked out"
        );
    }

    #[test]
    fn tracking_is_bounded() {
        let t = Throttle::new(ThrottleConfig {
            max_tracked: 10,
            ..cfg()
        });
        let t0 = Instant::now();
        for n in 0..=255 {
            t.failed(ip(n), "e", t0);
        }
        assert!(lock(&t.ips).map.len() <= 10);
        assert!(lock(&t.pairs).map.len() <= 10);
        // Expired entries make room again.
        let later = t0 + Duration::from_secs(61);
        for _ in 0..3 {
            t.failed(ip(200), "z", later);
        }
        assert_eq!(t.check(ip(200), "z", later), Err(Throttled::Ip));
    }

    #[test]
    fn zero_disables() {
        let t = Throttle::new(ThrottleConfig {
            max_failures_per_ip: 0,
            max_failures_per_endpoint: 0,
            ..cfg()
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            t.failed(ip(1), "e", t0);
        }
        assert!(t.check(ip(1), "e", t0).is_ok());
    }
}
