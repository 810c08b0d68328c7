//! The shared ground of every Ferrite service.
//!
//! Each concern lives in its own module: typed [`settings`], the Postgres pool and migrations in
//! [`db`], RabbitMQ messaging with an outbox in [`amqp`], object storage in [`storage`],
//! [`telemetry`], bearer-token [`auth`], the one JSON [`error`] shape, and the HTTP
//! [`app`]lication that mounts services and their background tasks.

pub mod amqp;
pub mod app;
pub mod auth;
pub mod db;
pub mod error;
pub mod http;
pub mod launch;
pub mod metrics;
pub mod names;
pub mod peers;
pub mod secret;
pub mod settings;
pub mod storage;
pub mod telemetry;

pub use app::{Application, ServiceContext, ServiceModule};
pub use error::ApiError;
pub use secret::Secret;
pub use settings::Settings;
