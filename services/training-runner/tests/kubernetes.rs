//! The Kubernetes backend against a fake API server on loopback: the Jobs it creates, and the
//! attempt ends it reports as the tests move those Jobs along, as the Job controller would.

mod fake_kube;

use std::collections::BTreeMap;
use std::time::Duration;

use fake_kube::FakeApiServer;
use ferrite_platform::Settings;
use ferrite_training_runner::backend::{
    AttemptEnded, AttemptLaunch, Backend, Resources, Toleration,
};
use ferrite_training_runner::kubernetes::{
    KubernetesBackend, WorkerTemplate, job_manifest, job_name,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use uuid::Uuid;

const NAMESPACE: &str = "training";
/// Long enough for a loaded two-core CI machine; a healthy run takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(30);

fn settings() -> Settings {
    let env: BTreeMap<String, String> = [
        ("FERRITE_WORKER_BACKEND", "kubernetes"),
        ("FERRITE_KUBERNETES_NAMESPACE", NAMESPACE),
        ("FERRITE_WORKER_IMAGE", "registry.example/ferrite:1.2.3"),
        ("FERRITE_STORE", "s3://ferrite-artifacts"),
        ("FERRITE_S3_ENDPOINT", "http://minio.storage:9000"),
        ("FERRITE_S3_ACCESS_KEY", "AKIA-NEVER-INLINED"),
        ("FERRITE_S3_SECRET_KEY", "secret-never-inlined"),
        (
            "FERRITE_DATABASE_URL",
            "postgres://ferrite:password-never-inlined@db:5432/ferrite",
        ),
        ("FERRITE_WORKER_LEASE_SECONDS", "45"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    Settings::load(None, &env).expect("valid settings")
}

fn cpu_launch() -> AttemptLaunch {
    AttemptLaunch {
        job_id: Uuid::now_v7(),
        attempt: 1,
        kind: "sft".to_owned(),
        resources: Resources {
            cpu: Some("2".to_owned()),
            memory: Some("8Gi".to_owned()),
            ..Resources::default()
        },
    }
}

fn gpu_launch() -> AttemptLaunch {
    AttemptLaunch {
        job_id: Uuid::now_v7(),
        attempt: 2,
        kind: "qlora".to_owned(),
        resources: Resources {
            gpus: 2,
            cpu: Some("8".to_owned()),
            memory: Some("64Gi".to_owned()),
            node_selector: BTreeMap::from([(
                "nvidia.com/gpu.product".to_owned(),
                "NVIDIA-H100-80GB-HBM3".to_owned(),
            )]),
            tolerations: vec![
                Toleration {
                    key: Some("nvidia.com/gpu".to_owned()),
                    operator: Some("Exists".to_owned()),
                    value: None,
                    effect: Some("NoSchedule".to_owned()),
                    toleration_seconds: None,
                },
                Toleration {
                    key: Some("spot".to_owned()),
                    operator: Some("Equal".to_owned()),
                    value: Some("true".to_owned()),
                    effect: Some("NoExecute".to_owned()),
                    toleration_seconds: Some(300),
                },
            ],
            image: None,
            deadline_seconds: Some(7200),
        },
    }
}

fn custom_image_launch() -> AttemptLaunch {
    AttemptLaunch {
        job_id: Uuid::now_v7(),
        attempt: 1,
        kind: "pretrain".to_owned(),
        resources: Resources {
            image: Some("registry.example/ferrite-cuda:2.0.0".to_owned()),
            ..Resources::default()
        },
    }
}

struct Harness {
    server: FakeApiServer,
    backend: KubernetesBackend,
    ended: mpsc::UnboundedReceiver<AttemptEnded>,
}

impl Harness {
    fn start() -> Self {
        Self::start_with(FakeApiServer::start())
    }

    fn start_with(server: FakeApiServer) -> Self {
        let (sender, ended) = mpsc::unbounded_channel();
        let backend = KubernetesBackend::with_client(server.client(), &settings(), sender);
        Self {
            server,
            backend,
            ended,
        }
    }

    /// A backend whose watch is open and which runs `launch`'s Job.
    async fn running(launch: &AttemptLaunch) -> Self {
        let harness = Self::start();
        harness.backend.launch(launch).await.expect("launch");
        harness.watching().await;
        harness.running_becomes(1).await;
        harness
    }

    async fn next_ended(&mut self) -> AttemptEnded {
        tokio::time::timeout(PATIENCE, self.ended.recv())
            .await
            .expect("an attempt end is reported")
            .expect("the backend keeps its sender")
    }

    /// Waits until the backend's watch is open, so later changes reach it live.
    async fn watching(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.server.watches() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the backend never watched"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn running_becomes(&self, expected: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.backend.running().await != expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "running() stayed {} instead of {expected}",
                self.backend.running().await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn condition(kind: &str, reason: &str, message: &str) -> Value {
    json!({
        "conditions": [{
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": "2026-01-01T00:10:00Z",
        }],
    })
}

fn complete() -> Value {
    json!({
        "succeeded": 1,
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"},
            {"type": "Complete", "status": "True"},
        ],
    })
}

#[tokio::test]
async fn launch_posts_a_job_with_gpus_selectors_tolerations_labels_and_secret_env() {
    let harness = Harness::start();
    let launch = gpu_launch();

    harness.backend.launch(&launch).await.expect("launch");

    let created = harness.server.created();
    assert_eq!(created.len(), 1);
    let job = &created[0];
    let name = format!("ferrite-job-{}-2", launch.job_id.simple());
    assert_eq!(job["apiVersion"], "batch/v1");
    assert_eq!(job["kind"], "Job");
    assert_eq!(job["metadata"]["name"], name.as_str());
    assert_eq!(job["metadata"]["namespace"], NAMESPACE);
    let labels = &job["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "ferrite-worker");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "ferrite");
    assert_eq!(
        labels["ferrite.dev/job-id"],
        launch.job_id.to_string().as_str()
    );
    assert_eq!(labels["ferrite.dev/attempt"], "2");
    assert_eq!(labels["ferrite.dev/kind"], "qlora");

    let spec = &job["spec"];
    assert_eq!(spec["backoffLimit"], 0);
    assert_eq!(spec["activeDeadlineSeconds"], 7200);
    assert!(
        spec["ttlSecondsAfterFinished"]
            .as_i64()
            .is_some_and(|ttl| ttl > 0)
    );
    let pod = &spec["template"]["spec"];
    assert_eq!(spec["template"]["metadata"]["labels"], *labels);
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(
        pod["nodeSelector"],
        json!({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    );
    assert_eq!(
        pod["tolerations"],
        json!([
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
             "tolerationSeconds": 300},
        ])
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    let container = &pod["containers"][0];
    assert_eq!(container["image"], "registry.example/ferrite:1.2.3");
    assert_eq!(
        container["command"],
        json!([
            "ferrite",
            "worker",
            "--job",
            launch.job_id.to_string(),
            "--attempt",
            "2"
        ])
    );
    assert_eq!(
        container["resources"],
        json!({
            "requests": {"cpu": "8", "memory": "64Gi"},
            "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
        })
    );
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["envFrom"],
        json!([{"secretRef": {"name": "ferrite-settings", "optional": false}}])
    );
    let env: BTreeMap<&str, &str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|var| {
            (
                var["name"].as_str().expect("name"),
                var["value"].as_str().expect("value"),
            )
        })
        .collect();
    assert_eq!(env["FERRITE_STORE"], "s3://ferrite-artifacts");
    assert_eq!(env["FERRITE_S3_ENDPOINT"], "http://minio.storage:9000/");
    assert_eq!(env["FERRITE_WORKER_LEASE_SECONDS"], "45");
    let scratch = env["FERRITE_WORKER_SCRATCH_DIR"];
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"] == scratch && m["name"] == "scratch")
    );

    // Credentials come only from the Secret: no value of the settings' secrets is inlined.
    let text = job.to_string();
    for secret in [
        "AKIA-NEVER-INLINED",
        "secret-never-inlined",
        "password-never-inlined",
    ] {
        assert!(!text.contains(secret), "{secret} leaked into the manifest");
    }
    for name in [
        "FERRITE_DATABASE_URL",
        "FERRITE_S3_ACCESS_KEY",
        "FERRITE_S3_SECRET_KEY",
    ] {
        assert!(!env.contains_key(name), "{name} is inlined");
    }
}

#[tokio::test]
async fn cpu_only_job_has_no_gpu_limit_and_a_custom_image_replaces_the_default() {
    let harness = Harness::start();
    let cpu = cpu_launch();
    let custom = custom_image_launch();

    harness.backend.launch(&cpu).await.expect("launch CPU");
    harness
        .backend
        .launch(&custom)
        .await
        .expect("launch custom image");

    let created = harness.server.created();
    let cpu_pod = &created[0]["spec"]["template"]["spec"];
    assert_eq!(
        cpu_pod["containers"][0]["resources"],
        json!({"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}})
    );
    assert!(cpu_pod.get("nodeSelector").is_none());
    assert!(cpu_pod.get("tolerations").is_none());
    assert!(created[0]["spec"].get("activeDeadlineSeconds").is_none());
    let custom_container = &created[1]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        custom_container["image"],
        "registry.example/ferrite-cuda:2.0.0"
    );
    assert!(
        custom_container
            .get("resources")
            .is_none_or(|r| r == &json!({}))
    );
}

#[tokio::test]
async fn a_complete_job_is_reported_clean_once() {
    let mut harness = Harness::start();
    let first = cpu_launch();
    let second = gpu_launch();
    harness.backend.launch(&first).await.expect("launch");
    harness.watching().await;
    harness.running_becomes(1).await;

    let name = job_name(first.job_id, first.attempt);
    harness.server.set_job_status(NAMESPACE, &name, complete());
    let ended = harness.next_ended().await;
    assert_eq!(
        (ended.job_id, ended.attempt, ended.clean),
        (first.job_id, 1, true)
    );
    harness.running_becomes(0).await;

    // Later sightings of the finished Job stay silent: the next report is the second job's.
    harness.server.set_job_status(NAMESPACE, &name, complete());
    harness.backend.launch(&second).await.expect("launch");
    let second_name = job_name(second.job_id, second.attempt);
    harness.server.set_job_status(
        NAMESPACE,
        &second_name,
        condition(
            "Failed",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ),
    );
    let ended = harness.next_ended().await;
    assert_eq!((ended.job_id, ended.clean), (second.job_id, false));
    assert!(
        ended.detail.contains("BackoffLimitExceeded"),
        "{}",
        ended.detail
    );
}

#[tokio::test]
async fn a_failed_job_reports_its_reason_and_the_pod_termination() {
    let mut harness = Harness::start();
    let launch = gpu_launch();
    harness.backend.launch(&launch).await.expect("launch");
    let name = job_name(launch.job_id, launch.attempt);
    harness.server.insert_pod(
        NAMESPACE,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": format!("{name}-x7k2p"),
                "labels": {"batch.kubernetes.io/job-name": name},
            },
            "status": {
                "phase": "Failed",
                "containerStatuses": [{
                    "name": "worker",
                    "image": "registry.example/ferrite:1.2.3",
                    "imageID": "",
                    "ready": false,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                }],
            },
        }),
    );

    harness.server.set_job_status(
        NAMESPACE,
        &name,
        condition(
            "Failed",
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ),
    );

    let ended = harness.next_ended().await;
    assert_eq!(
        (ended.job_id, ended.attempt, ended.clean),
        (launch.job_id, 2, false)
    );
    assert_eq!(
        ended.detail,
        "Kubernetes Job failed: DeadlineExceeded: Job was active longer than specified deadline; \
         container worker OOMKilled (exit code 137)"
    );
    harness.running_becomes(0).await;
}

#[tokio::test]
async fn stop_deletes_the_job_in_the_background_and_the_end_is_reported() {
    let mut harness = Harness::start();
    let launch = cpu_launch();
    harness.backend.launch(&launch).await.expect("launch");
    harness.watching().await;

    harness
        .backend
        .stop(launch.job_id, launch.attempt)
        .await
        .expect("stop");

    let name = job_name(launch.job_id, launch.attempt);
    let deletions = harness.server.deletions();
    assert_eq!(deletions.len(), 1);
    assert_eq!(deletions[0].0, name);
    assert_eq!(deletions[0].1["propagationPolicy"], "Background");
    assert!(harness.server.job(NAMESPACE, &name).is_none());
    let ended = harness.next_ended().await;
    assert_eq!((ended.job_id, ended.clean), (launch.job_id, false));
    assert_eq!(
        ended.detail,
        "Kubernetes Job deleted: stopped by the runner"
    );
    harness.running_becomes(0).await;

    // Stopping what is already gone is not an error.
    harness
        .backend
        .stop(launch.job_id, launch.attempt)
        .await
        .expect("second stop");
}

#[tokio::test]
async fn an_end_missed_while_unwatched_is_found_by_the_relist_after_410_gone() {
    let launch = cpu_launch();
    let mut harness = Harness::running(&launch).await;
    let lists_before = harness.server.lists();

    let name = job_name(launch.job_id, launch.attempt);
    harness
        .server
        .while_unwatched_then_compact(|api| api.set_job_status(NAMESPACE, &name, complete()));

    let ended = harness.next_ended().await;
    assert_eq!((ended.job_id, ended.clean), (launch.job_id, true));
    assert!(
        harness.server.lists() > lists_before,
        "the watcher learned of the end without re-listing, so 410 Gone was not exercised"
    );
}

#[tokio::test]
async fn a_watch_that_times_out_resumes_from_its_resource_version_without_a_relist() {
    let launch = cpu_launch();
    let mut harness = Harness::running(&launch).await;
    let (lists_before, watches_before) = (harness.server.lists(), harness.server.watches());

    let name = job_name(launch.job_id, launch.attempt);
    harness
        .server
        .while_unwatched(|api| api.set_job_status(NAMESPACE, &name, complete()));

    let ended = harness.next_ended().await;
    assert_eq!((ended.job_id, ended.clean), (launch.job_id, true));
    // The change came from the replayed history of a new watch, not from a list.
    assert!(harness.server.watches() > watches_before);
    assert_eq!(harness.server.lists(), lists_before);
}

#[tokio::test]
async fn api_server_errors_fail_a_launch_and_the_watch_recovers_from_them() {
    let launch = cpu_launch();
    let mut harness = Harness::running(&launch).await;

    harness.server.fail_next(1);
    let refused = gpu_launch();
    let error = harness.backend.launch(&refused).await.expect_err("500");
    assert!(
        format!("{error:#}").contains("cannot create the Job"),
        "{error:#}"
    );
    assert_eq!(harness.backend.running().await, 1);

    // The watch's next requests fail too; its backoff retries until one succeeds.
    let watches_before = harness.server.watches();
    harness.server.fail_next(2);
    let name = job_name(launch.job_id, launch.attempt);
    harness
        .server
        .while_unwatched(|api| api.set_job_status(NAMESPACE, &name, complete()));
    let ended = harness.next_ended().await;
    assert_eq!((ended.job_id, ended.clean), (launch.job_id, true));
    assert!(harness.server.watches() > watches_before);
}

#[tokio::test]
async fn a_job_deleted_while_unwatched_ends_its_attempt() {
    let launch = gpu_launch();
    let mut harness = Harness::running(&launch).await;

    let name = job_name(launch.job_id, launch.attempt);
    harness
        .server
        .while_unwatched_then_compact(|api| api.delete_job(NAMESPACE, &name));

    let ended = harness.next_ended().await;
    assert_eq!((ended.job_id, ended.clean), (launch.job_id, false));
    assert_eq!(ended.detail, "Kubernetes Job deleted before it finished");
    harness.running_becomes(0).await;
}

#[tokio::test]
async fn a_restarted_runner_counts_running_jobs_and_reports_those_that_ended_while_away() {
    let server = FakeApiServer::start();
    let template = WorkerTemplate::from_settings(&settings());
    let still_running = cpu_launch();
    let ended_while_away = gpu_launch();
    for launch in [&still_running, &ended_while_away] {
        server.insert_job(
            NAMESPACE,
            serde_json::to_value(job_manifest(&template, launch)).expect("json"),
        );
    }
    server.set_job_status(
        NAMESPACE,
        &job_name(ended_while_away.job_id, ended_while_away.attempt),
        complete(),
    );
    // Managed by ferrite but without attempt labels: not a worker, never counted.
    server.insert_job(
        NAMESPACE,
        json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "cleanup", "labels": {"app.kubernetes.io/managed-by": "ferrite"}},
        }),
    );
    let mut harness = Harness::start_with(server);

    let ended = harness.next_ended().await;
    assert_eq!((ended.job_id, ended.clean), (ended_while_away.job_id, true));
    harness.running_becomes(1).await;
    harness.server.set_job_status(
        NAMESPACE,
        &job_name(still_running.job_id, still_running.attempt),
        complete(),
    );
    let ended = harness.next_ended().await;
    assert_eq!((ended.job_id, ended.clean), (still_running.job_id, true));
    harness.running_becomes(0).await;
}

#[tokio::test]
async fn launching_an_attempt_twice_keeps_one_job_and_a_name_clash_is_refused() {
    let harness = Harness::start();
    let launch = cpu_launch();

    harness.backend.launch(&launch).await.expect("first launch");
    harness
        .backend
        .launch(&launch)
        .await
        .expect("same attempt again");
    assert_eq!(
        harness.server.created().len(),
        2,
        "the second create reached the server"
    );
    harness.running_becomes(1).await;

    let clash = gpu_launch();
    let name = job_name(clash.job_id, clash.attempt);
    harness.server.insert_job(
        NAMESPACE,
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}}),
    );
    let error = harness
        .backend
        .launch(&clash)
        .await
        .expect_err("name clash");
    assert!(
        format!("{error:#}").contains("another attempt"),
        "{error:#}"
    );
}

#[tokio::test]
async fn a_spec_the_api_server_would_refuse_never_reaches_it() {
    let harness = Harness::start();
    let mut launch = cpu_launch();
    launch.resources.memory = Some("16GB".to_owned());

    let error = harness.backend.launch(&launch).await.expect_err("16GB");

    assert!(
        format!("{error:#}").contains("resources.memory"),
        "{error:#}"
    );
    assert!(harness.server.created().is_empty());
    assert_eq!(harness.backend.running().await, 0);
}

/// The worker in the pod loads its settings from the manifest's variables plus the Secret's;
/// it must arrive at the runner's store, lease and credentials, with the scratch folder
/// where the volume is mounted.
#[test]
fn the_worker_loads_the_runners_settings_from_the_manifest_and_the_secret() {
    let runner = settings();
    let job = job_manifest(&WorkerTemplate::from_settings(&runner), &gpu_launch());
    let container = &job
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
        .containers[0];
    let mut env: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .map(|var| (var.name.clone(), var.value.clone().unwrap_or_default()))
        .collect();
    // What the operator puts in the `ferrite-settings` Secret.
    env.extend([
        (
            "FERRITE_DATABASE_URL".to_owned(),
            runner.database.url.expose().to_string(),
        ),
        (
            "FERRITE_S3_ACCESS_KEY".to_owned(),
            "AKIA-NEVER-INLINED".to_owned(),
        ),
        (
            "FERRITE_S3_SECRET_KEY".to_owned(),
            "secret-never-inlined".to_owned(),
        ),
    ]);

    let worker = Settings::load(None, &env).expect("the worker's settings load");

    assert_eq!(worker.store.location, runner.store.location);
    assert_eq!(worker.store.s3_endpoint, runner.store.s3_endpoint);
    assert_eq!(worker.worker.lease, runner.worker.lease);
    assert_eq!(
        worker.database.url.expose().as_str(),
        runner.database.url.expose().as_str()
    );
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let scratch = worker.worker.scratch_dir.expect("a scratch folder");
    assert!(
        mounts
            .iter()
            .any(|m| std::path::Path::new(&m.mount_path) == scratch),
        "{scratch:?} is not a mounted volume"
    );
}

/// Writes the manifests of representative specs as YAML for `scripts/test-k8s-manifests.sh`.
/// Without `FERRITE_K8S_MANIFEST_DIR` (a plain `--include-ignored` run) it writes to a temporary
/// folder, which still checks that every manifest serialises.
#[test]
#[ignore = "writes files; run by scripts/test-k8s-manifests.sh with FERRITE_K8S_MANIFEST_DIR"]
fn dump_manifests() {
    let temporary = tempfile::tempdir().expect("a temporary folder");
    let folder = std::env::var_os("FERRITE_K8S_MANIFEST_DIR")
        .map_or_else(|| temporary.path().to_path_buf(), std::path::PathBuf::from);
    std::fs::create_dir_all(&folder).expect("create the folder");
    let template = WorkerTemplate::from_settings(&settings());
    for (name, launch) in [
        ("cpu-only", cpu_launch()),
        ("gpus-node-selector-tolerations", gpu_launch()),
        ("custom-image", custom_image_launch()),
    ] {
        let yaml = serde_yaml::to_string(&job_manifest(&template, &launch)).expect("yaml");
        std::fs::write(folder.join(format!("{name}.yaml")), yaml).expect("write");
    }
}

/// A real cluster is reached over TLS, which the loopback fake does not exercise. Building
/// the client sets up rustls; with no crypto provider chosen (ring and aws-lc-rs both or
/// neither compiled in), this panics instead of connecting.
#[tokio::test]
async fn a_client_for_an_https_api_server_can_be_built() {
    let config = kube::Config::new("https://127.0.0.1:6443".parse().expect("URL"));
    let client = kube::Client::try_from(config);
    assert!(client.is_ok(), "{:?}", client.err());
}
