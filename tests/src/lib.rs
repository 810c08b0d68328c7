//! End-to-end tests across services live in this crate's tests/ folder.
