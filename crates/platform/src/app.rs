//! The HTTP application: mounts one or more services on one port with their background work.
//!
//! A service binary builds an [`Application`] from its one [`ServiceModule`]; `ferrite up` builds
//! one from all seven. Either way each service gets the same routes, its own Postgres schema,
//! an outbox relay and its consumers, and the process shares one broker connection, one store,
//! one metric registry and one token table.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use futures::future::BoxFuture;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, Broker, ConsumerSpec};
use crate::auth::{self, Auth};
use crate::db;
use crate::error::{path_config, payload_config, query_config};
use crate::http::{self, JsonLimit, Readiness};
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::settings::Settings;
use crate::storage::Storage;

/// What a service is given to build its routes and background work.
#[derive(Clone)]
pub struct ServiceContext {
    /// A pool confined to the service's own schema.
    pub pool: PgPool,
    pub broker: Broker,
    pub storage: Storage,
    pub metrics: Metrics,
    pub auth: Auth,
    pub settings: Arc<Settings>,
    /// The other services' REST APIs, authenticated as this service.
    pub peers: Peers,
    /// Cancelled when the process begins to shut down.
    pub shutdown: CancellationToken,
}

/// Routes that a service adds to every HTTP worker.
pub type Routes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// What a built service contributes to the application.
pub struct Mounted {
    pub routes: Routes,
    pub openapi: utoipa::openapi::OpenApi,
    pub consumers: Vec<ConsumerSpec>,
    /// Long-running work such as a training worker; each must return once `shutdown` fires.
    pub tasks: Vec<BoxFuture<'static, anyhow::Result<()>>>,
}

impl Mounted {
    /// A service with routes only.
    pub fn routes(routes: Routes, openapi: utoipa::openapi::OpenApi) -> Self {
        Self {
            routes,
            openapi,
            consumers: Vec::new(),
            tasks: Vec::new(),
        }
    }
}

/// One Ferrite service, as a binary or as part of `ferrite up`.
#[async_trait::async_trait]
pub trait ServiceModule: Send + Sync {
    /// Kebab-case name, e.g. `dataset-registry`.
    fn name(&self) -> &'static str;
    /// The Postgres schema the service owns, e.g. `dataset_registry`.
    fn schema(&self) -> &'static str;
    /// The service's own migrations, with versions of 100 and above.
    fn migrator(&self) -> Option<Migrator>;
    /// Builds state, routes and background work; called once, after migrations.
    async fn mount(&self, ctx: ServiceContext) -> anyhow::Result<Mounted>;
}

/// A running HTTP server with its services' background work.
pub struct Application {
    address: std::net::SocketAddr,
    server: actix_web::dev::Server,
    shutdown: CancellationToken,
    background: Vec<JoinHandle<()>>,
    auth: Auth,
    peers: Vec<Peers>,
}

impl Application {
    /// Connects everything, migrates every schema, starts consumers and binds the port.
    /// Postgres must be reachable; RabbitMQ may come later (`/readyz` says so meanwhile).
    pub async fn build(
        settings: Settings,
        modules: Vec<Box<dyn ServiceModule>>,
    ) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new();
        let storage = Storage::from_settings(&settings.store).context("object storage")?;
        let broker = Broker::start(settings.amqp.clone(), shutdown.child_token());

        let auth_pool = db::connect(&settings.database, db::AUTH_SCHEMA)?;
        db::migrate(&auth_pool, db::AUTH_SCHEMA, None).await?;
        let auth = Auth::new(auth_pool.clone());
        if let Some(token) = &settings.auth.bootstrap_admin_token {
            auth.ensure_admin(token)
                .await
                .context("cannot register the bootstrap admin token")?;
        }

        // Bound before the services mount, so their peer client knows this process's address.
        let listener =
            TcpListener::bind((settings.http.host, settings.http.port)).with_context(|| {
                format!("cannot bind {}:{}", settings.http.host, settings.http.port)
            })?;
        let address = listener.local_addr()?;
        let api_url = match &settings.http.api_url {
            Some(url) => url.clone(),
            None => url::Url::parse(&format!("http://{address}")).context("local API URL")?,
        };
        let mut peer_clients = Vec::new();

        let mut openapi = <http::OperationsApi as utoipa::OpenApi>::openapi();
        openapi.merge(<auth::AuthApi as utoipa::OpenApi>::openapi());
        let mut routes: Vec<Routes> = Vec::new();
        let mut background = Vec::new();
        let mut pools = vec![(db::AUTH_SCHEMA, auth_pool)];
        for module in modules {
            let pool = db::connect(&settings.database, module.schema())?;
            db::migrate(&pool, module.schema(), module.migrator()).await?;
            let peers = Peers::start(&auth, module.name(), api_url.clone())
                .await
                .context("cannot issue the service token")?;
            peer_clients.push(peers.clone());
            let ctx = ServiceContext {
                peers,
                pool: pool.clone(),
                broker: broker.clone(),
                storage: storage.clone(),
                metrics: metrics.clone(),
                auth: auth.clone(),
                settings: settings.clone(),
                shutdown: shutdown.child_token(),
            };
            let mounted = module
                .mount(ctx)
                .await
                .with_context(|| format!("cannot start service {}", module.name()))?;

            // Queues first: the relay may publish at once, and an event sent before its queue
            // exists would be dropped as unroutable.
            for consumer in &mounted.consumers {
                broker
                    .register_queue(&consumer.queue, &consumer.bindings)
                    .await
                    .with_context(|| format!("cannot declare queue {}", consumer.queue))?;
            }
            background.push(amqp::spawn_outbox_relay(
                pool.clone(),
                broker.clone(),
                shutdown.child_token(),
            ));
            for consumer in mounted.consumers {
                background.push(amqp::spawn_consumer(
                    broker.clone(),
                    pool.clone(),
                    consumer,
                    shutdown.child_token(),
                ));
            }
            let name = module.name();
            for task in mounted.tasks {
                background.push(tokio::spawn(async move {
                    if let Err(e) = task.await {
                        tracing::error!(service = name, error = ?e, "background task failed");
                    }
                }));
            }
            merge_openapi(&mut openapi, mounted.openapi, name)?;
            routes.push(mounted.routes);
            pools.push((module.schema(), pool));
            tracing::info!(service = name, "service mounted");
        }

        let readiness = Readiness {
            pools,
            broker: broker.clone(),
            storage: storage.clone(),
        };
        let state = SharedState {
            metrics,
            auth: auth.clone(),
            readiness,
            openapi: Arc::new(openapi),
            json_limit_bytes: settings.http.json_limit_bytes,
        };
        let server = HttpServer::new(move || {
            let state = state.clone();
            let routes = routes.clone();
            App::new()
                .wrap(actix_web::middleware::from_fn(http::observe))
                .app_data(JsonLimit(state.json_limit_bytes))
                .app_data(path_config())
                .app_data(query_config())
                .app_data(payload_config(state.json_limit_bytes))
                .app_data(web::Data::new(state.metrics))
                .app_data(web::Data::new(state.auth))
                .app_data(web::Data::new(state.readiness))
                .app_data(web::Data::from(state.openapi))
                .configure(http::operation_routes)
                .configure(auth::routes)
                .configure(move |cfg| routes.iter().for_each(|r| r(cfg)))
                .default_service(web::to(not_found))
        })
        .disable_signals()
        .shutdown_timeout(settings.http.shutdown_grace.as_secs())
        .listen(listener)?
        .run();

        tracing::info!(http.address = %address, "listening");
        Ok(Self {
            address,
            server,
            shutdown,
            background,
            auth,
            peers: peer_clients,
        })
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The bound address, with the real port when port 0 was asked for.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Cancelling this token shuts the application down, as SIGTERM does.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until SIGINT, SIGTERM or the shutdown token. In-flight requests finish within the
    /// grace period; consumers stop taking messages, and unacknowledged ones go back to queue.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = termination_signal() => {
                    tracing::info!("termination signal received, shutting down");
                    shutdown.cancel();
                }
            }
            handle.stop(true).await;
        });

        let served = self.server.await;
        self.shutdown.cancel();
        for task in self.background {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a background task ended abnormally");
            }
        }
        for peers in &self.peers {
            peers.stop(&self.auth).await;
        }
        served.context("HTTP server failed")
    }
}

#[derive(Clone)]
struct SharedState {
    metrics: Metrics,
    auth: Auth,
    readiness: Readiness,
    openapi: Arc<utoipa::openapi::OpenApi>,
    json_limit_bytes: usize,
}

async fn not_found(
    req: actix_web::HttpRequest,
) -> Result<actix_web::HttpResponse, crate::ApiError> {
    Err(crate::ApiError::not_found("route", req.path()))
}

async fn termination_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// Adds a service's OpenAPI document to the process's. utoipa keeps the first of two schemas
/// that share a name, so two services each defining, say, a `Lineage` would publish one
/// service's under the other's routes; that is refused at start-up, naming both.
fn merge_openapi(
    into: &mut utoipa::openapi::OpenApi,
    from: utoipa::openapi::OpenApi,
    service: &str,
) -> anyhow::Result<()> {
    if let (Some(have), Some(adding)) = (&into.components, &from.components) {
        for (name, schema) in &adding.schemas {
            if let Some(existing) = have.schemas.get(name)
                && serde_json::to_value(existing)? != serde_json::to_value(schema)?
            {
                anyhow::bail!(
                    "{service} defines an OpenAPI schema `{name}` unlike the one already \
                     published under that name; give one of them another (`#[schema(as = ...)]`)"
                );
            }
        }
    }
    into.merge(from);
    Ok(())
}

#[cfg(test)]
mod tests {
    use utoipa::openapi::{ComponentsBuilder, OpenApi, OpenApiBuilder};

    use super::merge_openapi;

    mod datasets {
        #[derive(utoipa::ToSchema)]
        #[expect(dead_code, reason = "only its schema is used")]
        pub struct Lineage {
            pub derived_from: Vec<String>,
        }
    }

    mod models {
        #[derive(utoipa::ToSchema)]
        #[expect(dead_code, reason = "only its schema is used")]
        pub struct Lineage {
            pub base_version: Option<String>,
        }
    }

    fn document_with<S: utoipa::ToSchema>() -> OpenApi {
        let components = ComponentsBuilder::new().schema_from::<S>().build();
        OpenApiBuilder::new().components(Some(components)).build()
    }

    #[test]
    fn two_services_publishing_unlike_schemas_under_one_name_are_refused() {
        let mut openapi = document_with::<datasets::Lineage>();
        let error = merge_openapi(&mut openapi, document_with::<models::Lineage>(), "models")
            .expect_err("the second Lineage differs");
        assert!(error.to_string().contains("`Lineage`"), "{error}");

        // The same schema twice (a type both services share) is no conflict.
        merge_openapi(&mut openapi, document_with::<datasets::Lineage>(), "again")
            .expect("identical schemas merge");
    }
}
