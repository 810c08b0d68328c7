//! Stages that act on registered versions: `register` (alias and lineage) and `deploy`.
//!
//! Training outputs are registered by the model registry itself when their job finishes; the
//! `register` stage confirms the version, optionally points an alias at it, and records its
//! lineage as the registry reports it. `deploy` serves a version through the gateway and waits
//! until `/v1/models` lists it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use serde_json::json;

use super::client::{ApiFailure, field};
use super::jobs::version_label;
use super::progress;
use super::runner::Run;
use super::spec::StageSpec;
use super::stages::{InputRules, Need, Stage, check_inputs};
use super::yaml::LineError;

/// How long a deployment may take to load its model.
const DEPLOY_PATIENCE: Duration = Duration::from_secs(300);

const MODEL_ONLY: InputRules = InputRules {
    datasets: Need::Refused,
    base_model: Need::Refused,
    model: Need::Required,
};

/// Confirms a version, moves an alias to it, records its lineage.
#[derive(Debug)]
pub struct RegisterStage;

#[async_trait]
impl Stage for RegisterStage {
    fn options(&self) -> &'static [&'static str] {
        &["alias"]
    }

    fn check(&self, stage: &StageSpec) -> Vec<LineError> {
        check_inputs(stage, MODEL_ONLY)
    }

    async fn run(&self, stage: &StageSpec, run: &mut Run) -> anyhow::Result<()> {
        let bar = progress::spinner(run.bars(), &stage.name);
        let target = Target::resolve(stage, run).await?;
        let mut details = json!({ "version": target.version });
        if let Some(alias) = stage.option("alias") {
            bar.message(&format!("alias {alias} -> {}", target.label));
            let name = field(&target.version, "model_name", "the version")?;
            let path = format!("/v1/registry/models/{name}/aliases/{alias}");
            let body = json!({ "version": target.id });
            details["alias"] = run.client().put(&path, &body).await?;
        }
        bar.message("lineage");
        let lineage = run
            .client()
            .get(&format!("/v1/registry/versions/{}/lineage", target.id))
            .await
            .context("the model registry did not return the lineage")?;
        details["lineage"] = lineage;
        bar.finish(&target.label);
        target.remember(stage, run, None, details);
        Ok(())
    }
}

/// Serves a version through the gateway.
#[derive(Debug)]
pub struct DeployStage;

#[async_trait]
impl Stage for DeployStage {
    fn options(&self) -> &'static [&'static str] {
        &["deployment"]
    }

    fn check(&self, stage: &StageSpec) -> Vec<LineError> {
        check_inputs(stage, MODEL_ONLY)
    }

    async fn run(&self, stage: &StageSpec, run: &mut Run) -> anyhow::Result<()> {
        let bar = progress::spinner(run.bars(), &stage.name);
        let target = Target::resolve(stage, run).await?;
        let name = stage.option("deployment").map_or_else(
            || format!("{}-{}", run.pipeline_name(), stage.name),
            str::to_owned,
        );
        bar.message(&format!("loading {} as `{name}`", target.label));
        let deployment = create_deployment(run, &name, &target.id).await?;
        wait_until_listed(run, &name).await?;
        bar.finish(&format!("`{name}` serves {}", target.label));
        target.remember(stage, run, Some(name), json!({ "deployment": deployment }));
        Ok(())
    }
}

/// The registry version a stage's `inputs.model` names.
struct Target {
    id: String,
    /// `name:number`.
    label: String,
    version: serde_json::Value,
}

impl Target {
    async fn resolve(stage: &StageSpec, run: &Run) -> anyhow::Result<Self> {
        let reference = stage
            .inputs
            .model
            .as_ref()
            .context("the stage has no `inputs.model`")?;
        let reference = run.resolve(&reference.value)?;
        let version = run
            .client()
            .get(&format!("/v1/registry/resolve/{reference}"))
            .await
            .with_context(|| {
                format!(
                    "stage `{}`: model `{reference}` did not resolve",
                    stage.name
                )
            })?;
        Ok(Self {
            id: field(&version, "id", "the version")?.to_owned(),
            label: version_label(&version),
            version,
        })
    }

    /// Records the version (and deployment) as what the stage acted on.
    fn remember(
        self,
        stage: &StageSpec,
        run: &mut Run,
        deployment: Option<String>,
        details: serde_json::Value,
    ) {
        let record = run.record(stage);
        record.model_version_id = Some(self.id);
        record.model_label = Some(self.label);
        record.deployment = deployment;
        record.details = details;
    }
}

/// Creates the deployment; one of the same name is replaced (a rerun may point it elsewhere).
async fn create_deployment(
    run: &Run,
    name: &str,
    version_id: &str,
) -> anyhow::Result<serde_json::Value> {
    let body = json!({ "name": name, "model": version_id });
    match run.client().post("/v1/deployments", &body).await {
        Ok(created) => Ok(created),
        Err(error) if is_conflict(&error) => {
            run.client()
                .delete(&format!("/v1/deployments/{name}"))
                .await?;
            run.client().post("/v1/deployments", &body).await
        }
        Err(error) => Err(error),
    }
}

fn is_conflict(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<ApiFailure>()
        .is_some_and(|failure| failure.status == 409)
}

async fn wait_until_listed(run: &Run, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEPLOY_PATIENCE;
    loop {
        let models = run.client().get("/v1/models").await?;
        let listed = models["data"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|model| model["id"].as_str() == Some(name));
        if listed {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "deployment `{name}` was not listed by /v1/models within {} s",
                DEPLOY_PATIENCE.as_secs()
            );
        }
        tokio::time::sleep(run.poll_interval()).await;
    }
}
