//! The compute manager as a service, so that N proxy replicas share one manager (one wake per
//! endpoint across all of them): a small JSON-over-HTTP API (hyper) and the client the proxy
//! uses (reqwest). Without `[compute] manager_url` the proxy uses the in-process manager; both
//! sit behind [`ComputeWaker`](crate::ComputeWaker).
//!
//! API (all JSON):
//! - `POST /v1/endpoints/{id}/wake` → `{"address": "host:port", "cold": bool}`, or an error
//!   `{"kind", "retryable", "message"}` with 404 (unknown), 429 (limits), 503 (not ready).
//! - `POST /v1/endpoints/{id}/suspend` → `{"suspended": bool}` (refused while clients are
//!   attached, reported or on the compute; see `Manager::suspend`).
//! - `GET /v1/endpoints/{id}` → status; `GET /v1/endpoints` → status of every endpoint.
//! - `POST /v1/endpoints` (body: optional `id`, `parent`, settings) → 201 with the new
//!   endpoint's `connection_uri`; `DELETE /v1/endpoints/{id}?remove_data=true`. These need the
//!   management token ([`Management`]); see `management` for the error codes.
//! - `POST /v1/activity` with `{"replica": "<id>", "ttl_ms": n, "endpoints": {"<id>": n}}` →
//!   `{"recorded": n}`: a proxy replica's live sessions per endpoint (see below). At most
//!   [`MAX_REPORT_BYTES`]; malformed bodies get 400 with the error body above.
//! - Every path answers 503 `{"kind": "not_leader", "retryable": true}` while this manager is on
//!   standby (leader election): only the leader may wake or suspend, and a standby's status
//!   would describe computes it does not run.
//!
//! Idle suspension in this mode: the manager holds no guard for the proxies' sessions (a
//! proxy's connection outlives the wake request), so three things stand in for one. A wake
//! counts as activity (it restarts the idle timer). Every replica counts its own sessions per
//! endpoint (the [`RemoteSession`](crate::RemoteSession) in a [`RemoteManager`] lease counts) and reports the counts every
//! `activity_interval` ([`RemoteManager::run_reports`]); each report holds for a ttl of three
//! intervals, so a replica that dies stops holding computes soon after, while one lost report
//! does not let a busy compute go. While any replica's unexpired count is above 0 the manager
//! neither idles nor suspends on request (`Manager::report_activity`). As a second guard,
//! before suspending the manager still asks the compute itself whether any client backend is
//! connected (`RunningCompute::client_connections`, `pg_stat_activity` for local computes;
//! Kubernetes computes cannot be asked, so for them the reports are the guard). A client
//! attached through any replica therefore keeps its compute, as long as that replica's
//! reports reach the manager.

mod client;
mod management;
mod server;
mod types;

pub use client::RemoteManager;
pub use management::{ApiToken, Management};
pub use server::{serve_api, serve_api_with, serve_http};
pub use types::{
    ActivityReport, ApiErrorKind, ErrorBody, StatusBody, WakeResponse, MAX_REPORT_BYTES,
};

#[cfg(test)]
mod tests;
