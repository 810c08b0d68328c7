//! The OpenAI-compatible surface: request reading, response shapes and event-stream framing.

mod arguments;
pub mod request;
pub mod response;
pub mod sse;
