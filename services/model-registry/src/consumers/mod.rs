//! The registry's consumers.

pub mod job_finished;
