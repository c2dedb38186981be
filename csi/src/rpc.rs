//! Glue shared by the services: a span and one failure log line per RPC, and running the
//! driver's blocking operations on tokio's blocking pool inside that span.

use std::future::Future;
use std::sync::Arc;

use tonic::{Response, Status};
use tracing::Instrument;

use crate::driver::Driver;
use crate::error::CsiError;

/// Runs one RPC's body in a span named for the method; logs a failure with its code.
pub async fn rpc<T>(
    method: &'static str,
    body: impl Future<Output = Result<T, CsiError>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!("rpc", method);
    match body.instrument(span.clone()).await {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            let status = Status::from(e);
            span.in_scope(
                || tracing::warn!(code = ?status.code(), message = %status.message(), "rpc failed"),
            );
            Err(status)
        }
    }
}

/// Runs `f` on the blocking pool (mounts, mkfs, copies), in the current span.
pub async fn blocking<T: Send + 'static>(
    driver: &Arc<Driver>,
    f: impl FnOnce(&Driver) -> Result<T, CsiError> + Send + 'static,
) -> Result<T, CsiError> {
    let driver = Arc::clone(driver);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| f(&driver))).await?
}
