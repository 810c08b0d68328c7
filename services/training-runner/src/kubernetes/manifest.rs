//! The `batch/v1` Job that runs one attempt's worker, built from settings and the job's spec.
//!
//! Building is a pure function so the same manifest can be asserted on in tests and rendered
//! to YAML for `kubernetes-validate`. Secrets never appear in it: the worker's credentials
//! come from a Secret by reference, and only plain settings are written inline.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ferrite_platform::Settings;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretEnvSource,
    SecurityContext, Toleration as KubeToleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use uuid::Uuid;

use crate::backend::{AttemptLaunch, Resources, Toleration};
use crate::worker_env::worker_env;

/// Label every worker Job carries; the watch selects on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "ferrite";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const WORKER_NAME: &str = "ferrite-worker";
pub const JOB_ID_LABEL: &str = "ferrite.dev/job-id";
pub const ATTEMPT_LABEL: &str = "ferrite.dev/attempt";
pub const KIND_LABEL: &str = "ferrite.dev/kind";

/// The Secret whose keys become the worker's environment (`FERRITE_DATABASE_URL`,
/// `FERRITE_S3_ACCESS_KEY`, `FERRITE_S3_SECRET_KEY`, ...). The operator creates it.
pub const SETTINGS_SECRET: &str = "ferrite-settings";

/// Finished Jobs stay a day for `kubectl describe`; the runner has recorded all it needs.
const TTL_SECONDS_AFTER_FINISHED: i32 = 86_400;
/// Where the scratch volume is mounted when the runner has no scratch folder configured.
const DEFAULT_SCRATCH_DIR: &str = "/var/lib/ferrite/scratch";
/// An unprivileged uid and gid; any non-zero id works with `runAsNonRoot`.
const WORKER_UID: i64 = 10_001;
const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// What every worker Job shares, taken from the runner's settings once.
#[derive(Debug, Clone)]
pub struct WorkerTemplate {
    pub namespace: String,
    pub image: String,
    /// Mount point of the scratch volume, passed to the worker as its scratch folder.
    pub scratch_dir: PathBuf,
    /// Plain (non-secret) settings, written inline.
    pub env: Vec<(String, String)>,
    /// The Secret the rest of the environment comes from.
    pub secret: String,
}

impl WorkerTemplate {
    /// The template for `settings`: the worker gets the storage, lease, telemetry and API
    /// settings it needs to do its work; credentials stay in [`SETTINGS_SECRET`].
    pub fn from_settings(settings: &Settings) -> Self {
        let scratch_dir = settings
            .worker
            .scratch_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SCRATCH_DIR));
        Self {
            namespace: settings.worker.kubernetes_namespace.clone(),
            image: settings.worker.image.clone(),
            env: worker_env(settings, Some(&scratch_dir)).plain,
            scratch_dir,
            secret: SETTINGS_SECRET.to_owned(),
        }
    }
}

/// The Job's name: `ferrite-job-<job id>-<attempt>`, the id as 32 hex digits. A shorter
/// prefix of a time-ordered (v7) id would be shared by jobs created within a minute; this
/// one stays within the 63 characters a Job name may have (55 at most).
pub fn job_name(job_id: Uuid, attempt: u32) -> String {
    format!("ferrite-job-{}-{attempt}", job_id.simple())
}

/// Labels of the attempt's Job and its pod.
pub fn labels(launch: &AttemptLaunch) -> BTreeMap<String, String> {
    [
        (NAME_LABEL, WORKER_NAME.to_owned()),
        (MANAGED_BY_LABEL, MANAGED_BY.to_owned()),
        (JOB_ID_LABEL, launch.job_id.to_string()),
        (ATTEMPT_LABEL, launch.attempt.to_string()),
        (KIND_LABEL, launch.kind.clone()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect()
}

/// The Job that runs `launch`'s worker.
pub fn job_manifest(template: &WorkerTemplate, launch: &AttemptLaunch) -> Job {
    let labels = labels(launch);
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(launch.job_id, launch.attempt)),
            namespace: Some(template.namespace.clone()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            // The runner owns retries: a failed pod ends the attempt, and the next attempt
            // resumes from the last checkpoint under a new Job.
            backoff_limit: Some(0),
            ttl_seconds_after_finished: Some(TTL_SECONDS_AFTER_FINISHED),
            active_deadline_seconds: launch.resources.deadline_seconds.map(i64::from),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(template, launch)),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

fn pod_spec(template: &WorkerTemplate, launch: &AttemptLaunch) -> PodSpec {
    let resources = &launch.resources;
    PodSpec {
        restart_policy: Some("Never".to_owned()),
        // The worker talks to Postgres and object storage, never to the Kubernetes API.
        automount_service_account_token: Some(false),
        containers: vec![worker_container(template, launch)],
        node_selector: (!resources.node_selector.is_empty())
            .then(|| resources.node_selector.clone()),
        tolerations: (!resources.tolerations.is_empty())
            .then(|| resources.tolerations.iter().map(kube_toleration).collect()),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            fs_group: Some(WORKER_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![empty_dir("scratch"), empty_dir("tmp")]),
        ..PodSpec::default()
    }
}

fn worker_container(template: &WorkerTemplate, launch: &AttemptLaunch) -> Container {
    let image = launch
        .resources
        .image
        .clone()
        .unwrap_or_else(|| template.image.clone());
    Container {
        name: "worker".to_owned(),
        image: Some(image),
        command: Some(vec![
            "ferrite".to_owned(),
            "worker".to_owned(),
            "--job".to_owned(),
            launch.job_id.to_string(),
            "--attempt".to_owned(),
            launch.attempt.to_string(),
        ]),
        env: Some(
            template
                .env
                .iter()
                .map(|(name, value)| EnvVar {
                    name: name.clone(),
                    value: Some(value.clone()),
                    value_from: None,
                })
                .collect(),
        ),
        env_from: Some(vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: template.secret.clone(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        resources: Some(resource_requirements(&launch.resources)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "scratch".to_owned(),
                mount_path: template.scratch_dir.display().to_string(),
                ..VolumeMount::default()
            },
            // Libraries write temporary files; the root file system is read-only.
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

/// CPU and memory are requested and limited alike (a worker's need does not burst); GPUs are
/// extended resources, which Kubernetes takes from the limit alone.
fn resource_requirements(resources: &Resources) -> ResourceRequirements {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (name, value) in [("cpu", &resources.cpu), ("memory", &resources.memory)] {
        if let Some(value) = value {
            requests.insert(name.to_owned(), Quantity(value.clone()));
            limits.insert(name.to_owned(), Quantity(value.clone()));
        }
    }
    if resources.gpus > 0 {
        limits.insert(
            GPU_RESOURCE.to_owned(),
            Quantity(resources.gpus.to_string()),
        );
    }
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    }
}

fn kube_toleration(toleration: &Toleration) -> KubeToleration {
    KubeToleration {
        key: toleration.key.clone(),
        operator: toleration.operator.clone(),
        value: toleration.value.clone(),
        effect: toleration.effect.clone(),
        toleration_seconds: toleration.toleration_seconds,
    }
}
