use std::sync::Arc;
use std::time::Duration;

/// Which side a failure belongs to, for metrics and for what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorSource {
    Client,
    Compute,
    Internal,
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
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Config(String),
}

impl BackendError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Short, stable name for metrics labels and the client message.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BinariesNotFound(_) | Self::Config(_) => "misconfigured",
            Self::DataDir { .. } | Self::InitdbFailed { .. } => "data_directory",
            Self::DataMissing { .. } => "data_missing",
            Self::DataDirBusy(_) => "data_directory_busy",
            Self::StartFailed { .. } => "start_failed",
            Self::StartTimeout(_) => "start_timeout",
            Self::Io { .. } => "io",
        }
    }

    /// Whether trying again later could help without an operator's intervention.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::StartTimeout(_)
                | Self::Io { .. }
                | Self::StartFailed { .. }
                | Self::DataDirBusy(_)
        )
    }

    /// Whether the failed start got as far as postgres's own start-up: postgres ran and failed
    /// or hung there (`StartFailed`, `StartTimeout`), which costs what a start costs and may be
    /// a crash loop. The others failed before that and cheaply: binaries or configuration, the
    /// data root and directory checks, initdb, postgres exiting at once because a previous
    /// compute still holds the directory (`DataDirBusy`) or because it refuses the directory.
    /// A `StartTimeout` may include waiting for a previous compute to exit.
    pub fn reached_startup(&self) -> bool {
        matches!(self, Self::StartFailed { .. } | Self::StartTimeout(_))
    }
}

/// Why a client could not be given a running compute.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WakeError {
    #[error("compute failed to start: {0}")]
    Backend(Arc<BackendError>),
    #[error("compute not ready within {0:?}")]
    Timeout(Duration),
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
            Self::Backend(e) if e.kind() == "misconfigured" => ErrorSource::Internal,
            Self::Backend(_) | Self::Timeout(_) => ErrorSource::Compute,
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
            | Self::QueueFull
            | Self::RateLimited
            | Self::ShuttingDown
            | Self::ManagerUnavailable(_)
            | Self::NotLeader => true,
            Self::Remote { retryable, .. } => *retryable,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Backend(e) => e.kind(),
            Self::Timeout(_) => "timeout",
            Self::QueueFull => "queue_full",
            Self::RateLimited => "rate_limited",
            Self::ShuttingDown => "shutting_down",
            Self::ManagerUnavailable(_) => "manager_unavailable",
            Self::NotLeader => "not_leader",
            Self::Remote { .. } => "remote",
        }
    }

    /// What the client is told: the cause class, never paths, commands or log lines.
    pub fn user_message(&self) -> String {
        match self {
            Self::Backend(e) => format!(
                "the compute could not be started ({}); the operator has the details",
                e.kind().replace('_', " ")
            ),
            Self::Timeout(d) => format!("the compute did not become ready within {}s", d.as_secs()),
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
