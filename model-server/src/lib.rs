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
pub mod connections;
pub mod datasets;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod model_store;
pub mod paths;
pub mod requests;
pub mod resources;
pub mod server;
pub mod service;
pub mod worker;

pub use client::{ClientError, ClientOptions, JobStart, Session, W2sClient};
pub use config::ServerConfig;
pub use error::ServiceError;
pub use server::RunningServer;
pub use superficial_models::pin_cpu_thread_count;

/// Tells mimalloc (the binaries' global allocator) to keep freed memory for reuse instead of
/// returning it to the OS 10 ms later (`purge_delay` −1), unless `MIMALLOC_PURGE_DELAY` is set.
/// A GPT-2-small training step frees and re-allocates hundreds of MB of activations and
/// gradients; with purging, every step faulted them back in and the kernel zeroed each page
/// (67 % of a profiled step, 7.4 s against 3.0 s without). Memory stays at its peak instead,
/// as with PyTorch's caching allocator. Harmless when mimalloc is linked but not the allocator.
pub fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc.h (v2 and v3); the Rust bindings have no constant.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is thread-safe in mimalloc; -1 means "never purge".
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Runs a binary's async entry point on a multi-threaded tokio runtime, after pinning candle's
/// CPU thread count ([`pin_cpu_thread_count`]) while the process still has one thread.
///
/// # Safety
/// Changes the process environment: call it as the first statement of a synchronous `main`,
/// before any other thread exists.
pub unsafe fn run_binary<F: std::future::Future>(entry: F) -> std::io::Result<F::Output> {
    // SAFETY: the caller guarantees that no other thread exists yet.
    unsafe { pin_cpu_thread_count() };
    keep_freed_memory();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(entry))
}
