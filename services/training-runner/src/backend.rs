//! Where an attempt's worker runs: a child process of the runner, or a Kubernetes Job.
//!
//! A backend only starts and stops workers and reports when one has ended. The worker itself
//! (`ferrite worker --job ID --attempt N`) holds the lease, heartbeats, writes metrics and
//! checkpoints and records its own outcome in Postgres, so the runner learns the same facts
//! whichever backend ran it. A worker that ends without recording an outcome (killed, out of
//! memory, evicted) is caught by [`AttemptEnded`] at once or by lease expiry at the latest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Compute a job asks for. The Kubernetes backend turns it into the pod's requests, limits,
/// scheduling and deadline; the local backend runs every job on this machine's CPU and ignores
/// it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// `nvidia.com/gpu` to request; 0 runs on CPU.
    pub gpus: u32,
    /// CPU request and limit in Kubernetes quantity form, e.g. `"4"` or `"500m"`.
    pub cpu: Option<String>,
    /// Memory request and limit, e.g. `"16Gi"`.
    pub memory: Option<String>,
    /// Labels a node must carry.
    pub node_selector: BTreeMap<String, String>,
    /// Taints the worker tolerates.
    pub tolerations: Vec<Toleration>,
    /// The worker image; the runner's configured image when absent.
    pub image: Option<String>,
    /// Longest an attempt may run before Kubernetes stops it (`activeDeadlineSeconds`);
    /// no limit when absent. The local backend ignores it.
    pub deadline_seconds: Option<u32>,
}

/// A Kubernetes toleration, field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toleration {
    pub key: Option<String>,
    /// `Exists` or `Equal`.
    pub operator: Option<String>,
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: Option<String>,
    pub toleration_seconds: Option<i64>,
}

/// One attempt to start.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptLaunch {
    pub job_id: Uuid,
    pub attempt: u32,
    /// The job kind, for labels and logs.
    pub kind: String,
    pub resources: Resources,
}

/// A worker that is no longer running, as its backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptEnded {
    pub job_id: Uuid,
    pub attempt: u32,
    /// True when the worker exited cleanly (it then recorded its outcome itself).
    pub clean: bool,
    /// What the backend knows: an exit status, a signal, a pod's reason.
    pub detail: String,
}

/// Where the runner reports ended workers.
pub type EndedSender = mpsc::UnboundedSender<AttemptEnded>;

/// Starts and stops workers.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// `local` or `kubernetes`.
    fn name(&self) -> &'static str;
    /// Starts the attempt's worker and returns once it exists; it reports its end on the
    /// sender the backend was built with.
    async fn launch(&self, launch: &AttemptLaunch) -> anyhow::Result<()>;
    /// Stops the attempt's worker if it still runs (cancel, or a lease taken over).
    async fn stop(&self, job_id: Uuid, attempt: u32) -> anyhow::Result<()>;
    /// Workers started and not yet ended.
    async fn running(&self) -> usize;
}
