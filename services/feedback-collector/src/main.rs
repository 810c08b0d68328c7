//! The feedback-collector service as its own process.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferrite_platform::launch::serve(
        "feedback-collector",
        vec![Box::new(ferrite_feedback_collector::FeedbackCollector)],
    )
    .await
}
