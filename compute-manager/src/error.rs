use std::sync::Arc;
use std::time::Duration;

/// Which side a failure belongs to, for metrics and for what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorSource {
    Client,
    Compute,
    Internal,
}

/// What kind of failure a [`BackendError`] is: for metrics labels, logs, the client message
/// and the API's `kind` field (whose strings are a wire format: they never change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendErrorKind {
    /// Not fixable by retrying: the operator must change the configuration.
    Misconfigured,
    DataDirectory,
    /// Data pgwake once had is gone: refused, never re-created.
    DataMissing,
    /// A previous compute still holds the data directory.
    DataDirectoryBusy,
    StartFailed,
    StartTimeout,
    Io,
}

impl BackendErrorKind {
    pub const ALL: [Self; 7] = [
        Self::Misconfigured,
        Self::DataDirectory,
        Self::DataMissing,
        Self::DataDirectoryBusy,
        Self::StartFailed,
        Self::StartTimeout,
        Self::Io,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Misconfigured => "misconfigured",
            Self::DataDirectory => "data_directory",
            Self::DataMissing => "data_missing",
            Self::DataDirectoryBusy => "data_directory_busy",
            Self::StartFailed => "start_failed",
            Self::StartTimeout => "start_timeout",
            Self::Io => "io",
        }
    }
}

/// A backend could not start or stop a compute. The `Display` text is for operators' logs;
/// clients only ever see [`WakeError::user_message`].
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("postgres binaries not found: {0}")]
    BinariesNotFound(String),
    #[error("data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    /// Data pgwake once had is gone (a data root or an endpoint's data directory deleted, or on
    /// a volume that is not mounted): refused, never replaced by an empty database.
    #[error("data missing: {path}: {reason}")]
    DataMissing { path: String, reason: String },
    /// A previous postgres of this data directory still holds it (its lock file or shared
    /// memory), and did not go away in time.
    #[error("data directory still held by a previous compute: {0}")]
    DataDirBusy(String),
    #[error("initdb failed ({status}): {output}")]
    InitdbFailed { status: String, output: String },
    #[error("compute exited during start-up ({status}): {log_tail}")]
    StartFailed { status: String, log_tail: String },
    #[error("compute did not become ready within {0:?}")]
    StartTimeout(Duration),
    /// The platform refuses to run the compute until someone fixes something (an image that
    /// cannot be pulled, a crash loop, a pod that cannot be created): `blocker` is what the
    /// client may be told, `message` the platform's full text for the operator.
    #[error("compute could not start ({blocker}): {message}")]
    Blocked {
        blocker: StartBlocker,
        message: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Config(String),
    /// A frozen compute did not answer once let run again (light sleep); it is stopped and
    /// a new one started.
    #[error("frozen compute did not come back: {0}")]
    ThawFailed(String),
}

impl BackendError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The class of failure, for metrics labels and the client message.
    pub fn kind(&self) -> BackendErrorKind {
        match self {
            Self::BinariesNotFound(_) | Self::Config(_) => BackendErrorKind::Misconfigured,
            Self::DataDir { .. } | Self::InitdbFailed { .. } => BackendErrorKind::DataDirectory,
            Self::DataMissing { .. } => BackendErrorKind::DataMissing,
            Self::DataDirBusy(_) => BackendErrorKind::DataDirectoryBusy,
            Self::StartFailed { .. } | Self::Blocked { .. } | Self::ThawFailed(_) => {
                BackendErrorKind::StartFailed
            }
            Self::StartTimeout(_) => BackendErrorKind::StartTimeout,
            Self::Io { .. } => BackendErrorKind::Io,
        }
    }

    /// Whether trying again later could help without an operator's intervention.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::StartTimeout(_)
                | Self::Io { .. }
                | Self::StartFailed { .. }
                | Self::Blocked { .. }
                | Self::DataDirBusy(_)
                | Self::ThawFailed(_)
        )
    }

    /// Whether the failed start got as far as postgres's own start-up: postgres ran and failed
    /// or hung there (`StartFailed`, `StartTimeout`), which costs what a start costs and may be
    /// a crash loop. The others failed before that and cheaply: binaries or configuration, the
    /// data root and directory checks, initdb, postgres exiting at once because a previous
    /// compute still holds the directory (`DataDirBusy`) or because it refuses the directory.
    /// A `StartTimeout` may include waiting for a previous compute to exit.
    pub fn reached_startup(&self) -> bool {
        matches!(
            self,
            Self::StartFailed { .. } | Self::StartTimeout(_) | Self::Blocked { .. }
        )
    }
}

/// Why a platform does not run a compute, in words a client may see: the platform's own reason
/// word (`Unschedulable`, `ImagePullBackOff`, `FailedCreate`) and a short class of the cause
/// (`insufficient memory`, `quota exceeded`), never names, addresses or the platform's message.
/// Built only from a reason word kept to letters and a detail from a fixed list, so
/// nothing else can get in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartBlocker {
    reason: String,
    detail: Option<&'static str>,
}

/// Every detail a [`StartBlocker`] may carry.
pub const BLOCKER_DETAILS: &[&str] = &[
    "insufficient cpu",
    "insufficient memory",
    "insufficient resources",
    "volume not bound",
    "no node matches",
    "quota exceeded",
    "Pod Security",
    "admission webhook",
    "image not found",
    "image pull not authorized",
];

/// Longest reason word kept (Kubernetes' own are CamelCase words well under this).
const MAX_REASON: usize = 64;

impl StartBlocker {
    pub fn new(reason: &str, detail: Option<&'static str>) -> Self {
        let mut reason: String = reason
            .chars()
            .filter(char::is_ascii_alphabetic)
            .take(MAX_REASON)
            .collect();
        if reason.is_empty() {
            reason.push_str("Unknown");
        }
        Self { reason, detail }
    }

    /// A blocker read from another manager's answer: the detail only if it is one this
    /// version knows (so the wire cannot put anything else in front of a client).
    pub fn from_wire(reason: &str, detail: Option<&str>) -> Self {
        let detail = detail.and_then(|d| BLOCKER_DETAILS.iter().copied().find(|k| *k == d));
        Self::new(reason, detail)
    }

    /// The platform's reason word.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    pub fn detail(&self) -> Option<&'static str> {
        self.detail
    }
}

impl std::fmt::Display for StartBlocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.detail {
            Some(d) => write!(f, "{} ({d})", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// What kind of failure a [`WakeError`] is: for metrics labels, logs and the manager API's
/// `kind` field, whose strings are a wire format between proxy and manager versions (they
/// never change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WakeErrorKind {
    Backend(BackendErrorKind),
    Timeout,
    QueueFull,
    RateLimited,
    ShuttingDown,
    ManagerUnavailable,
    NotLeader,
    Remote,
}

impl WakeErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backend(k) => k.as_str(),
            Self::Timeout => "timeout",
            Self::QueueFull => "queue_full",
            Self::RateLimited => "rate_limited",
            Self::ShuttingDown => "shutting_down",
            Self::ManagerUnavailable => "manager_unavailable",
            Self::NotLeader => "not_leader",
            Self::Remote => "remote",
        }
    }

    /// The kind an API error body names, if it is one this version knows.
    pub fn from_wire(kind: &str) -> Option<Self> {
        const OTHERS: [WakeErrorKind; 7] = [
            WakeErrorKind::Timeout,
            WakeErrorKind::QueueFull,
            WakeErrorKind::RateLimited,
            WakeErrorKind::ShuttingDown,
            WakeErrorKind::ManagerUnavailable,
            WakeErrorKind::NotLeader,
            WakeErrorKind::Remote,
        ];
        BackendErrorKind::ALL
            .into_iter()
            .map(Self::Backend)
            .chain(OTHERS)
            .find(|k| k.as_str() == kind)
    }
}

/// Why a client could not be given a running compute.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WakeError {
    #[error("compute failed to start: {0}")]
    Backend(Arc<BackendError>),
    #[error("compute not ready within {0:?}")]
    Timeout(Duration),
    /// Not ready within the wait, and the platform says why (a pod that cannot be scheduled,
    /// a volume that does not bind, an image still being pulled).
    #[error("compute not ready within {after:?}: {blocker}")]
    Stalled {
        after: Duration,
        blocker: StartBlocker,
    },
    #[error("too many clients waiting for this endpoint")]
    QueueFull,
    #[error("endpoint started too often recently")]
    RateLimited,
    #[error("compute manager is shutting down")]
    ShuttingDown,
    #[error("compute manager unreachable: {0}")]
    ManagerUnavailable(String),
    /// This manager is on standby (leader election): another one wakes computes.
    #[error("compute manager is not the leader")]
    NotLeader,
    /// A failure reported by a remote manager; `message` is already client-safe.
    #[error("compute manager: {message}")]
    Remote { retryable: bool, message: String },
}

impl WakeError {
    pub fn source_side(&self) -> ErrorSource {
        match self {
            Self::Backend(e) if e.kind() == BackendErrorKind::Misconfigured => {
                ErrorSource::Internal
            }
            Self::Backend(_) | Self::Timeout(_) | Self::Stalled { .. } => ErrorSource::Compute,
            Self::QueueFull | Self::RateLimited => ErrorSource::Client,
            Self::ShuttingDown | Self::ManagerUnavailable(_) | Self::NotLeader => {
                ErrorSource::Internal
            }
            Self::Remote { .. } => ErrorSource::Compute,
        }
    }

    pub fn retryable(&self) -> bool {
        match self {
            Self::Backend(e) => e.retryable(),
            Self::Timeout(_)
            | Self::Stalled { .. }
            | Self::QueueFull
            | Self::RateLimited
            | Self::ShuttingDown
            | Self::ManagerUnavailable(_)
            | Self::NotLeader => true,
            Self::Remote { retryable, .. } => *retryable,
        }
    }

    pub fn kind(&self) -> WakeErrorKind {
        match self {
            Self::Backend(e) => WakeErrorKind::Backend(e.kind()),
            Self::Timeout(_) | Self::Stalled { .. } => WakeErrorKind::Timeout,
            Self::QueueFull => WakeErrorKind::QueueFull,
            Self::RateLimited => WakeErrorKind::RateLimited,
            Self::ShuttingDown => WakeErrorKind::ShuttingDown,
            Self::ManagerUnavailable(_) => WakeErrorKind::ManagerUnavailable,
            Self::NotLeader => WakeErrorKind::NotLeader,
            Self::Remote { .. } => WakeErrorKind::Remote,
        }
    }

    /// What the client is told: the cause class, never paths, commands or log lines.
    pub fn user_message(&self) -> String {
        match self {
            Self::Backend(e) => match &**e {
                BackendError::Blocked { blocker, .. } => {
                    format!("the compute could not start: {blocker}")
                }
                e => format!(
                    "the compute could not be started ({}); the operator has the details",
                    e.kind().as_str().replace('_', " ")
                ),
            },
            Self::Timeout(d) => format!("the compute did not become ready within {}s", d.as_secs()),
            Self::Stalled { after, blocker } => format!(
                "the compute did not become ready within {}s: {blocker}",
                after.as_secs()
            ),
            Self::QueueFull => "too many clients are waiting for this endpoint to start".into(),
            Self::RateLimited => {
                "the endpoint was started too often recently; retry in a minute".into()
            }
            Self::ShuttingDown => "the proxy is shutting down".into(),
            Self::ManagerUnavailable(_) => {
                "the compute manager is not reachable; retry shortly".into()
            }
            Self::NotLeader => "the compute manager is failing over; retry shortly".into(),
            Self::Remote { message, .. } => message.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API's `kind` strings are read by other versions of the proxy: these must not change.
    #[test]
    fn kinds_keep_their_wire_names_and_read_back() {
        let wire = [
            (
                WakeErrorKind::Backend(BackendErrorKind::Misconfigured),
                "misconfigured",
            ),
            (
                WakeErrorKind::Backend(BackendErrorKind::DataDirectory),
                "data_directory",
            ),
            (
                WakeErrorKind::Backend(BackendErrorKind::StartFailed),
                "start_failed",
            ),
            (
                WakeErrorKind::Backend(BackendErrorKind::StartTimeout),
                "start_timeout",
            ),
            (WakeErrorKind::Backend(BackendErrorKind::Io), "io"),
            (WakeErrorKind::Timeout, "timeout"),
            (WakeErrorKind::QueueFull, "queue_full"),
            (WakeErrorKind::RateLimited, "rate_limited"),
            (WakeErrorKind::ShuttingDown, "shutting_down"),
            (WakeErrorKind::ManagerUnavailable, "manager_unavailable"),
            (WakeErrorKind::NotLeader, "not_leader"),
            (WakeErrorKind::Remote, "remote"),
        ];
        for (kind, name) in wire {
            assert_eq!(kind.as_str(), name);
            assert_eq!(WakeErrorKind::from_wire(name), Some(kind));
        }
        assert_eq!(WakeErrorKind::from_wire("bad_endpoint"), None);
    }

    #[test]
    fn a_start_blocker_shows_only_its_reason_word_and_detail_class() {
        let b = StartBlocker::new("Unschedulable", Some("insufficient memory"));
        let e = WakeError::Backend(Arc::new(BackendError::Blocked {
            blocker: b.clone(),
            message: "0/3 nodes are available: 3 Insufficient memory. pod pgwake-demo-0".into(),
        }));
        assert_eq!(
            e.user_message(),
            "the compute could not start: Unschedulable (insufficient memory)"
        );
        let e = WakeError::Stalled {
            after: Duration::from_secs(5),
            blocker: StartBlocker::new("Bad reason: 10.0.0.1/pod-x", None),
        };
        assert_eq!(
            e.user_message(),
            "the compute did not become ready within 5s: Badreasonpodx"
        );
        assert_eq!(e.kind(), WakeErrorKind::Timeout);
        assert!(e.retryable());
    }

    #[test]
    fn only_a_misconfiguration_is_internal() {
        let misconfigured = WakeError::Backend(Arc::new(BackendError::Config("x".into())));
        assert_eq!(misconfigured.source_side(), ErrorSource::Internal);
        let timeout = WakeError::Backend(Arc::new(BackendError::StartTimeout(Duration::ZERO)));
        assert_eq!(timeout.source_side(), ErrorSource::Compute);
    }
}
