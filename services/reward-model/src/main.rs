//! The reward-model service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferrite_platform::launch::serve(
        "reward-model",
        vec![Box::new(ferrite_reward_model::RewardModel)],
    )
    .await
}
