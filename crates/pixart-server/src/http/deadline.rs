//! How long a read handler (status, result, health, metrics) waits on the store: a stalled
//! shared queue (Redis paused, a network split) answers 503 within a second instead of holding
//! the call, so clients and load balancers see the outage and retry.

use std::future::Future;
use std::time::Duration;

use crate::core::StoreError;

/// The longest a read waits for the store.
pub const READ_DEADLINE: Duration = Duration::from_millis(500);

/// `call`, or [`StoreError::Unavailable`] after [`READ_DEADLINE`].
pub async fn read<T>(call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(READ_DEADLINE, call)
        .await
        .unwrap_or_else(|_| Err(StoreError::Unavailable(format!("no answer within {READ_DEADLINE:?}"))))
}
