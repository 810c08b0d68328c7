//! The training-runner service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferrite_platform::launch::serve(
        "training-runner",
        vec![Box::new(ferrite_training_runner::TrainingRunner)],
    )
    .await
}
