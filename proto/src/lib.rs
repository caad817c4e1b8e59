//! Generated code for the `w2s.v1` gRPC API. The `.proto` files beside this crate are the
//! public contract; this crate only compiles them.

#![allow(clippy::all, clippy::pedantic)]

pub mod codec;

/// Messages and services of package `w2s.v1`.
pub mod v1 {
    tonic::include_proto!("w2s.v1");
}

/// Encoded `FileDescriptorSet` of every `w2s.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/w2s_descriptor.bin"));
