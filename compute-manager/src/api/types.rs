//! The API's request and response bodies, shared by the server and its client.

use std::collections::HashMap;

use pgwake_router::EndpointId;
use serde::{Deserialize, Serialize};

use crate::{EndpointStats, WakeErrorKind};

#[derive(Debug, Serialize, Deserialize)]
pub struct WakeResponse {
    pub address: String,
    pub cold: bool,
}

/// The `kind` of an [`ErrorBody`]: a failed wake's kind, or what was wrong with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    Wake(WakeErrorKind),
    BadEndpoint,
    UnknownEndpoint,
    NotFound,
    BadReport,
}

impl ApiErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wake(k) => k.as_str(),
            Self::BadEndpoint => "bad_endpoint",
            Self::UnknownEndpoint => "unknown_endpoint",
            Self::NotFound => "not_found",
            Self::BadReport => "bad_report",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: String,
    pub retryable: bool,
    /// Already stripped of internals (it is what a client may be shown).
    pub message: String,
    /// With a `timeout`: why the platform had not started the compute yet. Absent from older
    /// managers' answers, ignored by older proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocker: Option<BlockerBody>,
}

/// A [`crate::StartBlocker`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlockerBody {
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The most an activity report may be: some 20,000 endpoints at once, far beyond one proxy's
/// working set, and small enough that a bad client cannot make the manager buffer much.
pub const MAX_REPORT_BYTES: usize = 1 << 20;

/// Replica ids are opaque labels for logs and the per-endpoint map; longer ones are refused
/// so that one report cannot fill the manager's memory with keys.
pub(super) const MAX_REPLICA_ID_LEN: usize = 128;

/// `POST /v1/activity`: one proxy replica's live sessions per endpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct ActivityReport {
    /// Chosen at random when the replica starts: a restarted replica is a new one, and the
    /// old one's counts expire with their ttl.
    pub replica: String,
    /// How long the counts hold without a newer report.
    pub ttl_ms: u64,
    pub endpoints: HashMap<String, usize>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusBody {
    pub endpoint: String,
    pub phase: String,
    pub attached: usize,
    pub waiting: usize,
    pub starts: u64,
    pub start_failures: u64,
    /// Running computes taken over from a previous manager (`Manager::adopt_running`).
    #[serde(default)]
    pub adoptions: u64,
    pub suspends: u64,
    pub crashes: u64,
    pub busy_deferrals: u64,
    /// Sessions proxy replicas report attached to the compute (`POST /v1/activity`).
    #[serde(default)]
    pub remote_sessions: usize,
    pub address: Option<String>,
    /// Where the compute is: `running`, `frozen` (light sleep) or `stopped`. Absent from
    /// older managers' answers.
    #[serde(default)]
    pub tier: String,
}

impl StatusBody {
    pub(super) fn new(id: &EndpointId, s: EndpointStats) -> Self {
        Self {
            endpoint: id.to_string(),
            phase: s.phase.as_str().into(),
            attached: s.attached,
            waiting: s.waiting,
            starts: s.starts,
            start_failures: s.start_failures,
            adoptions: s.adoptions,
            suspends: s.suspends,
            crashes: s.crashes,
            busy_deferrals: s.busy_deferrals,
            remote_sessions: s.remote_sessions,
            address: s.addr.map(|a| a.to_string()),
            tier: s.phase.tier().as_str().into(),
        }
    }
}
