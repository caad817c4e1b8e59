//! The evaluation library behind `eval-client`: the study's metrics as pure functions, the
//! report built from run folders, and its plots.

pub mod metrics;
pub mod plots;
pub mod report;
