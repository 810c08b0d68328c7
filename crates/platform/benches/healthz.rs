//! Requests per second on `/healthz` through the full Ferrite application, against a bare
//! actix-web server with the same handler in the same run (the platform's per-request cost:
//! middleware, tracing span, metrics).
//!
//! Run: `source scripts/env.sh && cargo bench -p ferrite-platform --bench healthz`
//! (needs Postgres and RabbitMQ running, as `scripts/setup.sh` leaves them).

use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use ferrite_platform::{Application, Settings};

const CONCURRENCY: usize = 16;
const DURATION: Duration = Duration::from_secs(5);

/// Keeps `CONCURRENCY` requests in flight for `DURATION`; returns requests per second.
async fn load(url: String) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let deadline = Instant::now() + DURATION;
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let response = client.get(&url).send().await.expect("answers");
                    assert!(response.status().is_success());
                    let _ = response.bytes().await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker.await.expect("joins");
    }
    total as f64 / DURATION.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bare = HttpServer::new(|| {
        App::new().route(
            "/healthz",
            web::get()
                .to(|| async { HttpResponse::Ok().json(serde_json::json!({"status": "ok"})) }),
        )
    })
    .bind(("127.0.0.1", 0))?;
    let bare_port = bare.addrs()[0].port();
    let bare = bare.run();
    let bare_handle = bare.handle();
    tokio::spawn(bare);

    let store = std::env::temp_dir().join(format!("ferrite-bench-{}", std::process::id()));
    let env = [
        ("FERRITE_HTTP_PORT", "0".to_owned()),
        ("FERRITE_STORE", store.display().to_string()),
        ("FERRITE_LOG_FILTER", "error".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings = Settings::load(None, &env)?;
    let application = Application::build(settings, Vec::new()).await?;
    let port = application.port();
    let stop = application.shutdown_token();
    let running = tokio::spawn(application.run_until_stopped());

    // Alternate the two so neither gets a warmer machine; the best of two runs each.
    let mut bare_rps = 0f64;
    let mut ferrite_rps = 0f64;
    for _ in 0..2 {
        bare_rps = bare_rps.max(load(format!("http://127.0.0.1:{bare_port}/healthz")).await);
        ferrite_rps = ferrite_rps.max(load(format!("http://127.0.0.1:{port}/healthz")).await);
    }
    println!(
        "/healthz, {CONCURRENCY} connections, {} s per run, best of 2",
        DURATION.as_secs()
    );
    println!("bare actix-web   {bare_rps:>10.0} req/s");
    println!("ferrite          {ferrite_rps:>10.0} req/s");
    println!("ratio ferrite/bare = {:.2}", ferrite_rps / bare_rps);

    stop.cancel();
    running.await??;
    bare_handle.stop(true).await;
    let _ = std::fs::remove_dir_all(store);
    Ok(())
}
