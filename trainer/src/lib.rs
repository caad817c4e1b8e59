//! The trainer library: the study specification, HH data loading and validation, and the study
//! runner that drives a model server over gRPC.

pub mod data;
pub mod progress;
pub mod sandbox;
pub mod spec;
pub mod study;
