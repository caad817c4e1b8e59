//! The evaluation library behind `eval-client`: the study's metrics as pure functions.

pub mod metrics;
