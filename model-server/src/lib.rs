//! The model server library: configuration, the device worker that owns models and training
//! jobs, datasets, the tonic services of `w2s.v1`, metrics, authentication, server assembly, and
//! the client library the other binaries use.
//!
//! Data flow of a request: tonic service ([`service`]) → bounded channel → device worker thread
//! ([`worker`]: dynamic batching, then `superficial_models`) → reply on a oneshot channel →
//! protobuf response. Training jobs ([`jobs`]) run on the same thread between batches.

pub mod auth;
pub mod client;
pub mod config;
pub mod datasets;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod paths;
pub mod server;
pub mod service;
pub mod worker;

pub use client::{ClientError, ClientOptions, Session, W2sClient};
pub use config::ServerConfig;
pub use error::ServiceError;
pub use server::RunningServer;
pub use superficial_models::pin_cpu_thread_count;

/// Runs a binary's async entry point on a multi-threaded tokio runtime, after pinning candle's
/// CPU thread count ([`pin_cpu_thread_count`]) while the process still has one thread.
///
/// # Safety
/// Changes the process environment: call it as the first statement of a synchronous `main`,
/// before any other thread exists.
pub unsafe fn run_binary<F: std::future::Future>(entry: F) -> std::io::Result<F::Output> {
    // SAFETY: the caller guarantees that no other thread exists yet.
    unsafe { pin_cpu_thread_count() };
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(entry))
}
