//! The server's refusals: an HTTP status, a stable reason and a sentence for the user.

use peerstash::api::{ApiError, Reason};

use crate::store::StoreError;

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

impl From<StoreError> for Refusal {
    /// The one place a store refusal gets its HTTP status.
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Invalid(_) => 400,
            StoreError::UnknownPeer => 401,
            StoreError::BadInvite { .. } => 403,
            StoreError::NameTaken(_) | StoreError::StaleRoot { .. } | StoreError::LatestRoot(_) => {
                409
            }
            StoreError::NotEnoughPeers(_) => 503,
            StoreError::OverQuota { .. } => 507,
            StoreError::Db(_) | StoreError::Internal(_) => return Refusal::internal(e),
        };
        Refusal::new(status, e.reason(), e.to_string())
    }
}

impl From<crate::store::db::Error> for Refusal {
    fn from(e: crate::store::db::Error) -> Self {
        Refusal::internal(format!("database: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Shortfall;

    /// The statuses clients and PROTOCOL.md know each store refusal by; a database
    /// failure tells the client nothing of it.
    #[test]
    fn store_refusals_keep_their_status_reason_and_message() {
        let cases = [
            (
                StoreError::Invalid("chunk x is named twice".into()),
                400,
                "bad_request",
            ),
            (StoreError::UnknownPeer, 401, "unknown_peer"),
            (StoreError::BadInvite { given: true }, 403, "bad_invite"),
            (StoreError::NameTaken("alice".into()), 409, "name_taken"),
            (
                StoreError::StaleRoot {
                    version: 3,
                    latest: 4,
                },
                409,
                "stale_root",
            ),
            (StoreError::LatestRoot(4), 409, "latest_root"),
            (
                StoreError::NotEnoughPeers(Shortfall::Stripe { others: 1 }),
                503,
                "not_enough_peers",
            ),
            (
                StoreError::OverQuota {
                    needed: 10,
                    used: 5,
                    quota: 12,
                    why: "lend more".into(),
                },
                507,
                "over_quota",
            ),
            (
                StoreError::Db(crate::store::db::Error::NoRows),
                500,
                "internal",
            ),
        ];
        for (e, status, reason) in cases {
            let message = e.to_string();
            let r = Refusal::from(e);
            assert_eq!((r.status, r.reason.as_str()), (status, reason), "{message}");
            if status == 500 {
                assert!(!r.message.contains("database"), "{}", r.message);
            } else {
                assert_eq!(r.message, message);
            }
        }
    }
}
