//! HTTP routes of the gateway.

pub mod deployments;
pub mod openai;
