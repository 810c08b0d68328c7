//! The OpenAI-compatible surface: request reading, response shapes and event-stream framing.

pub mod request;
pub mod response;
pub mod sse;
