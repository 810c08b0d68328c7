//! The grpo-evaluator service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferrite_platform::launch::serve(
        "grpo-evaluator",
        vec![Box::new(ferrite_grpo_evaluator::GrpoEvaluator)],
    )
    .await
}
