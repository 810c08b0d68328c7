//! The training-runner service as its own process; `worker --job ID --attempt N` runs one
//! attempt instead (what the local backend starts).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        return match ferrite_training_runner::worker::WorkerArgs::parse(&args[1..]) {
            Ok(worker) => worker.run("training-runner-worker").await,
            Err(problem) => {
                eprintln!("ferrite-training-runner worker: {problem}");
                ExitCode::from(2)
            }
        };
    }
    ferrite_platform::launch::serve(
        "training-runner",
        vec![Box::new(ferrite_training_runner::TrainingRunner)],
    )
    .await
}
