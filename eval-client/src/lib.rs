//! The evaluation library behind `eval-client`: the run-folder contract shared with `trainer`,
//! the study's metrics as pure functions, policy-collapse detection, the
//! report built from run folders, the findings across seeds, the plots, and the grading of what
//! a policy says (`generations`) and of an on-policy loop's rounds (`rounds`).

pub mod collapse;
pub mod figures;
pub mod findings;
pub mod generations;
pub mod metrics;
pub mod plots;
pub mod report;
pub mod rounds;
/// The run-folder contract (its own crate, so that writers need not link the report).
pub use superficial_run_folder as run_folder;
#[cfg(test)]
mod test_support;
