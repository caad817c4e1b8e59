//! The model server library: configuration, the device worker that owns models, the tonic
//! services of `w2s.v1`, server assembly, and the client library the other binaries use.
//!
//! Data flow of a request: tonic service ([`service`]) → bounded channel → device worker thread
//! ([`worker`]) → `superficial_models` → reply on a oneshot channel → protobuf response.

pub mod client;
pub mod config;
pub mod error;
pub mod paths;
pub mod server;
pub mod service;
pub mod worker;

pub use client::{ClientError, Session, W2sClient};
pub use config::ServerConfig;
pub use error::ServiceError;
pub use server::RunningServer;
