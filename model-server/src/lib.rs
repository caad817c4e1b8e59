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
