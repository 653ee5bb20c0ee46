//! The API's request and response bodies, shared by the server and its client.

use std::collections::HashMap;

use pgwake_router::EndpointId;
use serde::{Deserialize, Serialize};

use crate::provision::{EndpointBody, EndpointOrigin, ProvisionErrorKind};
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
    /// A management request without the right bearer token.
    Unauthorized,
    /// A management request to a manager with no management token configured.
    ManagementDisabled,
    /// A body that is not the JSON the path takes.
    BadRequest,
    Provision(ProvisionErrorKind),
}

impl ApiErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wake(k) => k.as_str(),
            Self::BadEndpoint => "bad_endpoint",
            Self::UnknownEndpoint => "unknown_endpoint",
            Self::NotFound => "not_found",
            Self::BadReport => "bad_report",
            Self::Unauthorized => "unauthorized",
            Self::ManagementDisabled => "management_disabled",
            Self::BadRequest => "bad_request",
            Self::Provision(k) => k.as_str(),
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

/// The most a create request's body may be: a few settings.
pub const MAX_CREATE_BYTES: usize = 64 * 1024;

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
    /// With the management API on: which backend runs it, where it is defined, what it was
    /// branched from, and how to connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<EndpointOrigin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_uri: Option<String>,
}

impl StatusBody {
    /// An endpoint the manager has not woken since it started.
    pub(super) fn never_woken(id: &EndpointId) -> Self {
        Self::new(
            id,
            EndpointStats {
                phase: crate::Phase::Suspended,
                attached: 0,
                waiting: 0,
                starts: 0,
                start_failures: 0,
                adoptions: 0,
                suspends: 0,
                crashes: 0,
                busy_deferrals: 0,
                remote_sessions: 0,
                addr: None,
                freezes: 0,
                thaws: 0,
                frozen_memory: None,
            },
        )
    }

    pub(super) fn with_management(mut self, e: EndpointBody) -> Self {
        self.backend = Some(e.backend.as_str().into());
        self.origin = Some(e.origin);
        self.parent = e.parent;
        self.connection_uri = Some(e.connection_uri);
        self
    }

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
            backend: None,
            origin: None,
            parent: None,
            connection_uri: None,
        }
    }
}
