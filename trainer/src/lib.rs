//! The trainer library: what the `trainer` binary needs besides gRPC — reading and validating
//! HH-format preference data.

pub mod data;
