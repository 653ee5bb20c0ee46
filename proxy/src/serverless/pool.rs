//! Idle, logged-in compute connections for `POST /sql`, so that a request to a running compute
//! costs a query, not a backend start and a login.
//!
//! A connection is reused only for the same endpoint, role, database, password (its SHA-256)
//! and compute address: a request never rides on a login whose password it did not present,
//! and a compute that moved or restarted gets fresh connections. Idle connections hold no
//! compute lease, so they never keep a compute awake: a suspend closes them at the compute,
//! and they are found dead (EOF) when next taken, or closed after `pool_idle_timeout`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use pgwake_router::EndpointId;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

use super::sql::CancelKey;
use crate::stream::ComputeStream;

/// Idle connections kept per key; more are closed when returned.
const MAX_IDLE_PER_KEY: usize = 8;

#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct PoolKey {
    endpoint: EndpointId,
    user: String,
    database: String,
    password: [u8; 32],
    addr: String,
}

impl PoolKey {
    pub(super) fn new(
        endpoint: &EndpointId,
        user: &str,
        database: &str,
        password: &str,
        addr: &str,
    ) -> Self {
        Self {
            endpoint: endpoint.clone(),
            user: user.to_string(),
            database: database.to_string(),
            password: Sha256::digest(password.as_bytes()).into(),
            addr: addr.to_string(),
        }
    }
}

pub(super) struct Idle {
    pub(super) conn: ComputeStream,
    pub(super) cancel: Option<CancelKey>,
    since: Instant,
}

pub(super) struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    timeout: Duration,
}

impl Pool {
    /// `timeout` zero: no pooling.
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    /// The most recently returned live connection for `key`.
    pub(super) fn take(&self, key: &PoolKey) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        let mut found = None;
        while let Some(mut c) = list.pop() {
            if c.since.elapsed() < self.timeout && still_open(&mut c.conn) {
                found = Some(c);
                break;
            }
        }
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    pub(super) fn put(&self, key: PoolKey, conn: ComputeStream, cancel: Option<CancelKey>) {
        if self.timeout.is_zero() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_KEY {
            list.push(Idle {
                conn,
                cancel,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle for longer than the timeout.
    pub(super) fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            list.retain(|c| c.since.elapsed() < self.timeout);
            !list.is_empty()
        });
    }

    pub(super) fn size(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values().map(Vec::len).sum()
    }
}

/// An idle connection has nothing to say: EOF (the compute closed it, e.g. on suspend), an
/// error or unexpected bytes all mean it cannot be used.
fn still_open(conn: &mut ComputeStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(
        std::pin::Pin::new(conn).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}
