//! The model-registry service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferrite_platform::launch::serve(
        "model-registry",
        vec![Box::new(ferrite_model_registry::ModelRegistry)],
    )
    .await
}
