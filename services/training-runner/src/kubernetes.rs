//! The Kubernetes backend: one `batch/v1` Job per attempt, followed by a watch until it ends.
//!
//! The runner keeps every decision: a Job never retries (`backoffLimit: 0`), and a failed or
//! deleted Job is reported as [`AttemptEnded`], after which the scheduler starts the next
//! attempt as a new Job. Tests run against a fake API server (the real one cannot run here),
//! which leaves admission, scheduling and RBAC untested; the README says more.
//!
//! A runner that restarts learns its Jobs again from the watch's first list: unfinished ones
//! count as running, and those that finished while it was away are reported then (a second
//! report of an attempt already closed is a no-op for the scheduler).

mod manifest;
mod validate;
mod watch;

use anyhow::Context as _;
use ferrite_platform::Settings;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Config};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use manifest::{
    ATTEMPT_LABEL, JOB_ID_LABEL, KIND_LABEL, MANAGED_BY, MANAGED_BY_LABEL, NAME_LABEL,
    SETTINGS_SECRET, WORKER_NAME, WorkerTemplate, job_manifest, job_name,
};
pub use validate::{InvalidResources, validate_resources};
pub use watch::{AttemptKey, JobOutcome, Tracker};

use crate::backend::{AttemptLaunch, Backend, EndedSender};
use watch::{SharedTracker, Watch};

/// Starts workers as Kubernetes Jobs in `settings.worker.kubernetes_namespace`.
pub struct KubernetesBackend {
    jobs: Api<Job>,
    template: WorkerTemplate,
    tracker: SharedTracker,
    watch: JoinHandle<()>,
}

impl KubernetesBackend {
    /// Connects with the in-cluster service account, or KUBECONFIG outside a cluster.
    pub async fn new(settings: &Settings, ended: EndedSender) -> anyhow::Result<Self> {
        let config = Config::infer()
            .await
            .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
        let client = Client::try_from(config).context("cannot build the Kubernetes client")?;
        Ok(Self::with_client(client, settings, ended))
    }

    /// Uses `client` as given; tests point it at their fake API server. Starts the watch, so
    /// it must be called inside a Tokio runtime.
    pub fn with_client(client: Client, settings: &Settings, ended: EndedSender) -> Self {
        let template = WorkerTemplate::from_settings(settings);
        let jobs: Api<Job> = Api::namespaced(client.clone(), &template.namespace);
        let pods: Api<Pod> = Api::namespaced(client, &template.namespace);
        let tracker = SharedTracker::default();
        let watch = tokio::spawn(
            Watch {
                jobs: jobs.clone(),
                pods,
                tracker: tracker.clone(),
                ended,
            }
            .run(),
        );
        Self {
            jobs,
            template,
            tracker,
            watch,
        }
    }

    /// What the backend would create for `launch`.
    pub fn manifest(&self, launch: &AttemptLaunch) -> Job {
        job_manifest(&self.template, launch)
    }
}

impl Drop for KubernetesBackend {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

#[async_trait::async_trait]
impl Backend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    #[tracing::instrument(skip_all, fields(job.id = %launch.job_id, attempt = launch.attempt))]
    async fn launch(&self, launch: &AttemptLaunch) -> anyhow::Result<()> {
        // POST /v1/jobs refuses such a spec with a 400; checking again keeps one that got in
        // some other way from reaching the API server as a less helpful 422.
        validate_resources(&launch.resources)?;
        let job = self.manifest(launch);
        let name = job_name(launch.job_id, launch.attempt);
        let key = AttemptKey {
            job_id: launch.job_id,
            attempt: launch.attempt,
        };
        match self.jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            // A runner that restarted between creating the Job and recording it launches the
            // same attempt again; the Job already there is that attempt's.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = self
                    .jobs
                    .get(&name)
                    .await
                    .with_context(|| format!("cannot read the existing Job {name}"))?;
                anyhow::ensure!(
                    AttemptKey::of(&existing) == Some(key),
                    "Job {name} already exists and runs another attempt"
                );
            }
            Err(error) => {
                return Err(error).with_context(|| format!("cannot create the Job {name}"));
            }
        }
        self.tracker.lock().launched(key);
        tracing::info!(job.name = %name, namespace = %self.template.namespace, "worker Job created");
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(job.id = %job_id, attempt))]
    async fn stop(&self, job_id: Uuid, attempt: u32) -> anyhow::Result<()> {
        let name = job_name(job_id, attempt);
        self.tracker.lock().stopping(AttemptKey { job_id, attempt });
        // Background propagation removes the pod too; the watch reports the Job's end.
        match self.jobs.delete(&name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(error).with_context(|| format!("cannot delete the Job {name}")),
        }
    }

    async fn running(&self) -> usize {
        self.tracker.lock().running()
    }
}
