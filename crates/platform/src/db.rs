//! Postgres: one pool per service, confined to the service's own schema, and migrations.
//!
//! Every connection of a service's pool has `search_path` set to that service's schema, so its
//! SQL uses plain table names and cannot reach another service's tables by accident. sqlx keeps
//! its `_sqlx_migrations` table in the schema too, which lets each service migrate on its own.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection as _, PgPool};

use crate::settings::DatabaseSettings;

/// Tables every service schema has: the transactional outbox and the consumer inbox.
fn messaging_migrator() -> Migrator {
    sqlx::migrate!("../../migrations/_messaging")
}

/// Bearer tokens, shared by every service in the `auth` schema.
fn auth_migrator() -> Migrator {
    sqlx::migrate!("../../migrations/_auth")
}

/// Schema of the shared token table.
pub const AUTH_SCHEMA: &str = "auth";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("schema name `{0}` must be lowercase ASCII letters, digits and underscores")]
    InvalidSchema(String),
    #[error("cannot connect to Postgres for schema `{schema}`: {source}")]
    Connect { schema: String, source: sqlx::Error },
    #[error("cannot create schema `{schema}`: {source}")]
    CreateSchema { schema: String, source: sqlx::Error },
    #[error("migrations of schema `{schema}` failed: {source}")]
    Migrate {
        schema: String,
        source: sqlx::migrate::MigrateError,
    },
}

/// Options for a pool confined to `schema`.
fn connect_options(settings: &DatabaseSettings, schema: &str) -> Result<PgConnectOptions, DbError> {
    validate_schema(schema)?;
    let options: PgConnectOptions =
        settings
            .url
            .expose()
            .as_str()
            .parse()
            .map_err(|source| DbError::Connect {
                schema: schema.to_owned(),
                source,
            })?;
    Ok(options
        .options([("search_path", schema)])
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1)))
}

/// A pooled connection idle for longer than this is pinged before it is handed out.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Connects a pool for one service. Connections are opened lazily, so a service starts (and
/// reports unready) while Postgres is briefly away; migrations then fail loudly at start-up.
pub fn connect(settings: &DatabaseSettings, schema: &str) -> Result<PgPool, DbError> {
    let options = connect_options(settings, schema)?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        // sqlx pings every connection before handing it out by default: one round trip more on
        // every transaction (a consumer's then takes four: ping, BEGIN, inbox insert, COMMIT).
        // sqlx already pings each connection as it comes back to the pool, so one used moments
        // ago is known to be alive. One idle for a while may have lost its server (a Postgres
        // restart): only that is pinged, and a dead one is dropped for a fresh one instead of
        // failing its first query. What this gives up: a server lost within `PING_AFTER_IDLE`
        // of a connection's last use fails that connection's next query once.
        .test_before_acquire(false)
        .before_acquire(|connection, metadata| {
            Box::pin(async move {
                if metadata.idle_for > PING_AFTER_IDLE {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Creates the schema if needed, then applies the messaging tables and the service's own
/// migrations inside it. Running it again applies nothing.
#[tracing::instrument(skip_all, fields(db.schema = schema))]
pub async fn migrate(
    pool: &PgPool,
    schema: &str,
    service: Option<Migrator>,
) -> Result<(), DbError> {
    validate_schema(schema)?;
    // The name was validated above, so quoting it is enough to make it an identifier.
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .execute(pool)
        .await
        .map_err(|source| DbError::CreateSchema {
            schema: schema.to_owned(),
            source,
        })?;

    let platform = if schema == AUTH_SCHEMA {
        auth_migrator()
    } else {
        messaging_migrator()
    };
    for mut migrator in std::iter::once(platform).chain(service) {
        // Two migrators share one `_sqlx_migrations` table per schema; each must ignore the
        // other's rows. Their version ranges never overlap (platform < 100 <= services).
        migrator.set_ignore_missing(true);
        migrator
            .run(pool)
            .await
            .map_err(|source| DbError::Migrate {
                schema: schema.to_owned(),
                source,
            })?;
    }
    Ok(())
}

fn validate_schema(schema: &str) -> Result<(), DbError> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase())
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(DbError::InvalidSchema(schema.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_that_could_escape_quoting_are_refused() {
        for bad in ["", "Upper", "a\"b", "a;drop", "1abc", "a-b"] {
            assert!(validate_schema(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(validate_schema("dataset_registry").is_ok());
    }
}
