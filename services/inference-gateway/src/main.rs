//! The inference-gateway service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferrite_platform::launch::serve(
        "inference-gateway",
        vec![Box::new(ferrite_inference_gateway::InferenceGateway)],
    )
    .await
}
