//! The kinds of stage, each one type behind the [`Stage`] trait.
//!
//! A stage says which options and inputs it takes, checks them locally, and runs against the
//! services. Adding a kind of stage (a ranking campaign, a reward model, PPO) is one more type
//! here and one more arm in [`for_kind`]; the parser, runner, state and report stay as they are.

use async_trait::async_trait;

use super::jobs;
use super::runner::Run;
use super::spec::{StageKind, StageSpec};
use super::yaml::LineError;

/// One kind of stage.
#[async_trait]
pub trait Stage: Sync {
    /// Keys a stage of this kind may carry besides `name`, `kind` and `inputs`.
    fn options(&self) -> &'static [&'static str];

    /// Problems that can be found without asking any service, each at its line.
    fn check(&self, stage: &StageSpec) -> Vec<LineError>;

    /// Runs the stage to its end, recording what it produced in `run`'s state for `stage`.
    async fn run(&self, stage: &StageSpec, run: &mut Run) -> anyhow::Result<()>;
}

/// The implementation of a kind.
pub fn for_kind(kind: StageKind) -> &'static dyn Stage {
    match kind {
        StageKind::Tokenizer
        | StageKind::Pretrain
        | StageKind::Sft
        | StageKind::Lora
        | StageKind::Qlora => &jobs::TrainingStage,
        StageKind::Register => &super::publish::RegisterStage,
        StageKind::Deploy => &super::publish::DeployStage,
    }
}

/// Which inputs a kind needs and which it refuses.
#[derive(Debug, Clone, Copy)]
pub struct InputRules {
    pub datasets: Need,
    pub base_model: Need,
    pub model: Need,
}

/// Whether an input must or must not be given (anything else is optional).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Required,
    Refused,
}

/// Checks a stage's inputs against its kind's rules.
pub fn check_inputs(stage: &StageSpec, rules: InputRules) -> Vec<LineError> {
    let mut problems = Vec::new();
    let given = [
        (
            "datasets",
            rules.datasets,
            !stage.inputs.datasets.is_empty(),
        ),
        (
            "base_model",
            rules.base_model,
            stage.inputs.base_model.is_some(),
        ),
        ("model", rules.model, stage.inputs.model.is_some()),
    ];
    for (name, need, present) in given {
        let kind = stage.kind.as_str();
        match (need, present) {
            (Need::Required, false) => problems.push(LineError::new(
                stage.line_of("inputs"),
                format!("a `{kind}` stage needs `inputs.{name}`"),
            )),
            (Need::Refused, true) => problems.push(LineError::new(
                stage.line_of(&format!("inputs.{name}")),
                format!("a `{kind}` stage takes no `inputs.{name}`"),
            )),
            _ => {}
        }
    }
    problems
}
