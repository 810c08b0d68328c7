//! `ferrite up` as a user runs it: bad settings are refused at once; good ones bring every
//! service up on one port, ready, and SIGTERM stops it cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use sqlx::{Connection, PgConnection};

const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[test]
fn a_malformed_database_url_and_a_bad_port_exit_non_zero_with_one_message_naming_both() {
    let output = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .arg("up")
        .env("FERRITE_DATABASE_URL", "postgres//missing-colon")
        .env("FERRITE_HTTP_PORT", "70000")
        .output()
        .expect("the binary runs");
    assert_eq!(
        output.status.code(),
        Some(2),
        "settings errors exit with status 2"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one message: {stderr}");
    assert!(lines[0].contains("FERRITE_DATABASE_URL"), "{stderr}");
    assert!(lines[0].contains("FERRITE_HTTP_PORT"), "{stderr}");
}

#[tokio::test]
async fn up_serves_all_seven_services_ready_on_one_port_and_stops_on_sigterm() {
    let database = format!("ferrite_up_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(POSTGRES_ADMIN_URL)
        .await
        .expect("Postgres runs");
    sqlx::query(&format!("CREATE DATABASE \"{database}\""))
        .execute(&mut admin)
        .await
        .expect("create");
    let store = std::env::temp_dir().join(&database);

    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .arg("up")
        .env("FERRITE_HTTP_PORT", "0")
        .env(
            "FERRITE_DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:5432/{database}"),
        )
        .env("FERRITE_AMQP_EXCHANGE", format!("ferrite.test-{database}"))
        .env("FERRITE_STORE", &store)
        .env("FERRITE_LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");

    // `ferrite up` announces its URL on stderr once /readyz says ready.
    let stderr = child.stderr.take().expect("piped");
    let url = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                line.strip_prefix("ferrite is up at ")
                    .map(|rest| rest.split(' ').next().unwrap_or("").to_owned())
            })
    });
    let url = tokio::time::timeout(Duration::from_secs(120), url)
        .await
        .expect("ready within the timeout")
        .expect("joins")
        .expect("the ready line is printed");

    let report: serde_json::Value = reqwest::get(format!("{url}/readyz"))
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(report["status"], "ready", "{report}");
    let schemas = [
        "dataset_registry",
        "training_runner",
        "feedback_collector",
        "reward_model",
        "grpo_evaluator",
        "model_registry",
        "inference_gateway",
    ];
    for schema in schemas {
        assert_eq!(
            report["checks"][format!("postgres:{schema}")],
            "ok",
            "{report}"
        );
    }
    for path in ["/healthz", "/metrics", "/openapi.json"] {
        let status = reqwest::get(format!("{url}{path}"))
            .await
            .expect("answers")
            .status();
        assert_eq!(status, 200, "{path}");
    }

    // Each service's paths, all on the one port, answer a method they do not serve with a 405
    // naming the ones they do, in the order the service registers them; a path no service
    // serves stays a 404.
    let client = reqwest::Client::new();
    for (method, path, allow) in [
        (reqwest::Method::DELETE, "/v1/datasets", "GET, HEAD"),
        (reqwest::Method::DELETE, "/v1/jobs", "POST, GET, HEAD"),
        (
            reqwest::Method::PUT,
            "/v1/registry/models",
            "POST, GET, HEAD",
        ),
        (reqwest::Method::GET, "/v1/chat/completions", "POST"),
        (reqwest::Method::POST, "/readyz", "GET, HEAD"),
    ] {
        let response = client
            .request(method.clone(), format!("{url}{path}"))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
    }
    let unknown = client
        .delete(format!("{url}/v1/nothing-here"))
        .send()
        .await
        .expect("answers");
    assert_eq!(unknown.status(), 404);

    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("joins")
        .expect("waits");
    assert!(status.success(), "SIGTERM is a clean stop: {status}");

    sqlx::query(&format!("DROP DATABASE \"{database}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop");
    let _ = std::fs::remove_dir_all(store);
}
