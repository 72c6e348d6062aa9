//! The server's refusals: an HTTP status, a stable reason and a sentence for the user.

use peerstash::api::{ApiError, Reason};

/// A request the server refuses (or failed to serve). Becomes an HTTP status with an
/// [`ApiError`] body.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {reason}: {message}")]
pub struct Refusal {
    /// HTTP status code.
    pub status: u16,
    /// Why: its stable name goes on the wire.
    pub reason: Reason,
    /// What went wrong and what to do next.
    pub message: String,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl Refusal {
    /// A refusal with `status`, `reason` and `message`.
    pub fn new(status: u16, reason: Reason, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same refusal, telling the client when to retry.
    pub fn retry_after(mut self, secs: u64) -> Refusal {
        self.retry_after = Some(secs);
        self
    }

    /// 400 with reason `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(400, Reason::BadRequest, message)
    }

    /// 500 with reason `internal`; the detail goes to the log, not to the client.
    pub fn internal(detail: impl std::fmt::Display) -> Refusal {
        tracing::error!("internal error: {detail}");
        Refusal::new(
            500,
            Reason::Internal,
            "the server failed to handle this request; try again, and tell the operator if it persists",
        )
    }

    /// The body sent to the client.
    pub fn body(&self) -> ApiError {
        ApiError {
            reason: self.reason.as_str().to_string(),
            message: self.message.clone(),
        }
    }
}

impl From<rusqlite::Error> for Refusal {
    fn from(e: rusqlite::Error) -> Self {
        Refusal::internal(format!("database: {e}"))
    }
}
