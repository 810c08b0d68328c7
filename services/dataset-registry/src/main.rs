//! The dataset-registry service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferrite_platform::launch::serve(
        "dataset-registry",
        vec![Box::new(ferrite_dataset_registry::DatasetRegistry)],
    )
    .await
}
