//! Training runner: jobs, attempts, leases, metrics and checkpoints.
//!
//! Owns the Postgres schema `training_runner` and the routes under /v1/jobs. A job goes
//! REST -> Postgres + JobRequested (outbox) -> the work queue's consumer admits it -> the
//! scheduler starts an attempt on a [`backend::Backend`] -> the worker process trains, writes
//! metrics and checkpoints, and records the outcome with JobFinished.

pub mod backend;
pub mod consumer;
pub mod domain;
pub mod events;
pub mod kubernetes;
pub mod local;
mod observer;
pub mod routes;
pub mod scheduler;
pub mod store;
pub mod submit;
mod transfer;
pub mod worker;
pub mod worker_env;

use std::sync::Arc;

use actix_web::web;
use ferrite_platform::amqp::ConsumerSpec;
use ferrite_platform::app::Mounted;
use ferrite_platform::settings::WorkerBackend;
use ferrite_platform::{ServiceContext, ServiceModule};
use ferrite_proto::{Event, JobRequested};
use futures::FutureExt as _;
use sqlx::migrate::Migrator;
use tokio::sync::{Notify, mpsc};

use crate::backend::Backend;
use crate::scheduler::Scheduler;

/// The service, ready to mount in its own binary or in `ferrite up`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrainingRunner;

#[derive(utoipa::OpenApi)]
#[openapi(tags((name = "training-runner", description = "Training runner: jobs, attempts, leases, metrics and checkpoints.")))]
struct Api;

#[async_trait::async_trait]
impl ServiceModule for TrainingRunner {
    fn name(&self) -> &'static str {
        "training-runner"
    }

    fn schema(&self) -> &'static str {
        worker::SCHEMA
    }

    fn migrator(&self) -> Option<Migrator> {
        Some(sqlx::migrate!("../../migrations/training_runner"))
    }

    async fn mount(&self, ctx: ServiceContext) -> anyhow::Result<Mounted> {
        let wake = Arc::new(Notify::new());
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let backend: Arc<dyn Backend> = match ctx.settings.worker.backend {
            WorkerBackend::Local => Arc::new(local::LocalBackend::new(&ctx.settings, ended_tx)?),
            WorkerBackend::Kubernetes => {
                Arc::new(kubernetes::KubernetesBackend::new(&ctx.settings, ended_tx).await?)
            }
        };
        let scheduler = Scheduler {
            pool: ctx.pool.clone(),
            backend,
            concurrency: ctx.settings.worker.concurrency,
            lease: ctx.settings.worker.lease,
            wake: wake.clone(),
        };
        let consumer = ConsumerSpec::new(
            consumer::queue_name(&ctx.settings.amqp.exchange),
            &[JobRequested::ROUTING_KEY],
            &ctx.broker,
            Arc::new(consumer::AcceptJobs { wake }),
        );

        let api = web::Data::new(routes::JobsApi {
            pool: ctx.pool.clone(),
            peers: ctx.peers.clone(),
            settings: ctx.settings.clone(),
        });
        let mut openapi = <Api as utoipa::OpenApi>::openapi();
        openapi.merge(<routes::Api as utoipa::OpenApi>::openapi());
        Ok(Mounted {
            routes: Arc::new(move |cfg| {
                cfg.app_data(api.clone());
                routes::configure(cfg);
            }),
            openapi,
            consumers: vec![consumer],
            tasks: vec![scheduler.run(ended_rx, ctx.shutdown.clone()).boxed()],
        })
    }
}
