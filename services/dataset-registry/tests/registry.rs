//! The dataset registry against real Postgres, RabbitMQ and an s3s-fs store.

#[path = "../../../crates/platform/tests/common/mod.rs"]
mod common;
mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use support::{gzip, sft_jsonl, spawn};

/// Asserts a refused upload left nothing: no object on the store's disk, no row anywhere.
async fn assert_nothing_kept(registry: &support::Registry, case: &str) {
    assert_eq!(registry.s3.files(), Vec::<String>::new(), "{case}: store");
    assert_eq!(
        registry.s3.pending_uploads(),
        Vec::<String>::new(),
        "{case}: multipart parts"
    );
    assert_eq!(
        registry.row_counts().await,
        [0, 0, 0, 0],
        "{case}: database"
    );
}

fn first_problem(body: &Value) -> &Value {
    &body["error"]["problems"][0]
}

#[tokio::test]
async fn bad_uploads_name_their_problem_and_leave_nothing_behind() {
    // 64 bytes per line and 1 MiB per upload: the smallest limits the settings accept.
    let registry = spawn(&[
        ("FERRITE_DATASET_MAX_LINE_BYTES", "64"),
        ("FERRITE_DATASET_MAX_UPLOAD_BYTES", "1048576"),
    ])
    .await;

    let bad_line = b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\"}\n";
    let (status, body) = registry
        .upload("demo", "kind=sft", bad_line.to_vec(), false)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(first_problem(&body)["line"], 2);
    assert_eq!(first_problem(&body)["field"], "output");
    assert_eq!(body["error"]["param"], "line 2");
    assert_nothing_kept(&registry, "bad line").await;

    let not_utf8 = b"first\nsecond\nthird \xc3\x28 line\n".to_vec();
    let (status, body) = registry.upload("demo", "kind=text", not_utf8, false).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(first_problem(&body)["line"], 3);
    assert!(
        first_problem(&body)["message"]
            .as_str()
            .unwrap_or("")
            .contains("UTF-8")
    );
    assert_nothing_kept(&registry, "invalid UTF-8").await;

    let long = format!("short\n{}\nshort\n", "x".repeat(65)).into_bytes();
    let (status, body) = registry.upload("demo", "kind=text", long, false).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(first_problem(&body)["line"], 2);
    assert!(
        first_problem(&body)["message"]
            .as_str()
            .unwrap_or("")
            .contains("64 bytes")
    );
    assert_nothing_kept(&registry, "over-long line").await;

    let (status, body) = registry
        .upload("demo", "kind=rlhf", sft_jsonl(3), false)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "kind");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("rlhf")
    );
    assert_nothing_kept(&registry, "unknown kind").await;

    // 16 MiB of short lines compress to a few kB and inflate far past the 1 MiB limit.
    let bomb = gzip(&b"hello\n".repeat(16 * 1024 * 1024 / 6));
    assert!(bomb.len() < 64 * 1024, "the bomb is small on the wire");
    let (status, body) = registry.upload("demo", "kind=text", bomb, true).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "upload_too_large");
    assert_nothing_kept(&registry, "gzip bomb").await;

    // A body that claims gzip but is not.
    let (status, body) = registry
        .upload("demo", "kind=text", b"plain words\n".repeat(100), true)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "unreadable_body");
    assert_nothing_kept(&registry, "corrupt gzip").await;

    // A plain body declaring more than the limit is refused before it is read.
    let (status, body) = registry
        .upload("demo", "kind=text", b"x\n".repeat(600 * 1024), false)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_nothing_kept(&registry, "declared length").await;

    // 250 rows each missing `output`: 100 problems listed, all 250 counted.
    let many: Vec<u8> = "{\"instruction\": \"x\"}\n".repeat(250).into_bytes();
    let (status, body) = registry.upload("demo", "kind=sft", many, false).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"]["problems"].as_array().map(Vec::len),
        Some(100)
    );
    assert_eq!(body["error"]["problems_total"], 250);
    assert_nothing_kept(&registry, "many problems").await;

    registry.stop().await;
}

#[tokio::test]
async fn the_same_bytes_are_the_same_version() {
    let registry = spawn(&[]).await;
    let bytes = sft_jsonl(10);

    let (status, first) = registry
        .upload("pairs", "kind=sft", bytes.clone(), false)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["number"], 1);
    assert_eq!(first["rows"], 10);
    assert_eq!(first["format"], "jsonl");
    assert_eq!(first["bytes"], bytes.len());
    let sha = sha256_hex(&bytes);
    assert_eq!(first["sha256"], sha);
    assert_eq!(first["object_key"], format!("datasets/{sha}"));

    // Again, plain and gzipped: the hash is of the inflated bytes, so the same version.
    let (status, again) = registry
        .upload("pairs", "kind=sft", bytes.clone(), false)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["id"], first["id"]);
    let (status, zipped) = registry
        .upload("pairs", "kind=sft", gzip(&bytes), true)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(zipped["id"], first["id"]);

    let (status, second) = registry
        .upload("pairs", "kind=sft", sft_jsonl(11), false)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(second["number"], 2);
    assert_eq!(
        registry.content(first["id"].as_str().unwrap_or("")).await,
        bytes
    );

    // One object per distinct content, nothing left under uploads/.
    let files = registry.s3.files();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files.iter().all(|f| f.starts_with("datasets/")),
        "{files:?}"
    );

    // Another kind under the same name is a conflict.
    let (status, body) = registry
        .upload("pairs", "kind=text", b"plain text\n".to_vec(), false)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Two versions created, two events in the outbox.
    assert_eq!(registry.row_counts().await, [1, 2, 0, 2]);
    registry.stop().await;
}

#[tokio::test]
async fn character_statistics_are_recorded_per_version() {
    let registry = spawn(&[]).await;
    // Non-empty lines of 1, 2, ..., 10 characters ("é" is one character, two bytes).
    let text: String = (1..=10).map(|n| format!("{}\n\n", "é".repeat(n))).collect();
    let (status, version) = registry
        .upload("letters", "kind=text", text.into_bytes(), false)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{version}");
    assert_eq!(version["rows"], 10);
    // Nearest rank: p50 is the 5th of 10 sorted values, p90 the 9th; mean 55 / 10.
    assert_eq!(
        version["stats"],
        json!({"min": 1, "p50": 5, "p90": 9, "max": 10, "mean": 5.5, "total": 55})
    );
    registry.stop().await;
}

#[tokio::test]
async fn every_kind_accepts_its_schema_in_json_and_jsonl() {
    let registry = spawn(&[]).await;
    let rows = [
        (
            "chat",
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        ),
        (
            "chat",
            json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}),
        ),
        (
            "preference",
            json!({"prompt": "q", "chosen": "good", "rejected": "bad"}),
        ),
        (
            "ranking",
            json!({"prompt": "q", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]}),
        ),
        ("prompts", json!({"prompt": "2 + 2?", "answer": "4"})),
        ("sft", json!({"prompt": "q", "completion": "a"})),
    ];
    for (i, (kind, row)) in rows.iter().enumerate() {
        let array = serde_json::to_vec_pretty(&json!([row, row])).unwrap_or_default();
        let (status, body) = registry
            .upload(
                &format!("{kind}-{i}"),
                &format!("kind={kind}"),
                array,
                false,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{kind}: {body}");
        assert_eq!(
            (body["format"].clone(), body["rows"].clone()),
            (json!("json"), json!(2))
        );
        let line = format!("{row}\n").into_bytes();
        let (status, body) = registry
            .upload(
                &format!("{kind}-{i}-l"),
                &format!("kind={kind}"),
                line,
                false,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{kind}: {body}");
        assert_eq!(body["format"], "jsonl");
    }
    registry.stop().await;
}

#[tokio::test]
async fn a_split_is_deterministic_disjoint_and_derived() {
    let registry = spawn(&[]).await;
    let bytes = sft_jsonl(100);
    let (_, source) = registry
        .upload("qa", "kind=sft", bytes.clone(), false)
        .await;
    let id = source["id"].as_str().unwrap_or_default().to_owned();
    let path = format!("/v1/datasets/versions/{id}/split");
    let request = json!({"eval_fraction": 0.2, "seed": 7});

    let (status, split) = registry
        .call(Method::POST, &path, Some(request.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{split}");
    assert_eq!(split["train"]["dataset_name"], "qa-train");
    assert_eq!(split["eval"]["dataset_name"], "qa-eval");
    // round(100 * 0.2) = 20 rows to eval, the other 80 to train.
    assert_eq!(split["train"]["rows"], 80);
    assert_eq!(split["eval"]["rows"], 20);
    assert_eq!(split["eval"]["derived_from"], source["id"]);
    assert_eq!(split["eval"]["derivation"]["split"], "eval");

    let lines = |bytes: Vec<u8>| -> std::collections::BTreeSet<String> {
        String::from_utf8(bytes)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let train = lines(
        registry
            .content(split["train"]["id"].as_str().unwrap_or(""))
            .await,
    );
    let eval = lines(
        registry
            .content(split["eval"]["id"].as_str().unwrap_or(""))
            .await,
    );
    assert!(train.is_disjoint(&eval));
    let union: std::collections::BTreeSet<String> = train.union(&eval).cloned().collect();
    assert_eq!(union, lines(bytes));

    let (_, again) = registry.call(Method::POST, &path, Some(request)).await;
    assert_eq!(
        again["eval"]["id"], split["eval"]["id"],
        "same seed, same version"
    );
    let (_, other) = registry
        .call(
            Method::POST,
            &path,
            Some(json!({"eval_fraction": 0.2, "seed": 8})),
        )
        .await;
    assert_ne!(
        other["eval"]["sha256"], split["eval"]["sha256"],
        "another seed"
    );

    let eval_id = split["eval"]["id"].as_str().unwrap_or_default();
    let (status, lineage) = registry
        .get(&format!("/v1/datasets/versions/{eval_id}/lineage"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lineage["derived_from"][0]["id"], source["id"]);
    assert_eq!(lineage["derived_from"].as_array().map(Vec::len), Some(1));

    let (status, body) = registry
        .call(
            Method::POST,
            &path,
            Some(json!({"eval_fraction": 1.5, "seed": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "eval_fraction");
    registry.stop().await;
}

#[tokio::test]
async fn aliases_and_every_reference_form_resolve() {
    let registry = spawn(&[]).await;
    let (_, v1) = registry
        .upload("corpus", "kind=text", b"one\n".to_vec(), false)
        .await;
    let (_, v2) = registry
        .upload("corpus", "kind=text", b"two\n".to_vec(), false)
        .await;

    let (status, moved) = registry
        .call(
            Method::PUT,
            "/v1/datasets/corpus/aliases/champion",
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    let v2_id = v2["id"].as_str().unwrap_or_default();
    for (reference, expected) in [
        ("corpus", &v2),
        ("corpus:1", &v1),
        ("corpus@champion", &v1),
        (v2_id, &v2),
    ] {
        let (status, version) = registry
            .get(&format!("/v1/datasets/resolve/{reference}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{reference}: {version}");
        assert_eq!(version["id"], expected["id"], "{reference}");
    }
    // Moving the alias by version id.
    registry
        .call(
            Method::PUT,
            "/v1/datasets/corpus/aliases/champion",
            Some(json!({"version": v2_id})),
        )
        .await;
    let (_, version) = registry.get("/v1/datasets/resolve/corpus@champion").await;
    assert_eq!(version["id"], v2["id"]);
    let (_, dataset) = registry.get("/v1/datasets/corpus").await;
    assert_eq!(dataset["aliases"], json!({"champion": 2}));
    assert_eq!(dataset["versions"], 2);

    let (status, _) = registry
        .call(Method::DELETE, "/v1/datasets/corpus/aliases/champion", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for missing in ["corpus@champion", "corpus:3", "nothing"] {
        let (status, _) = registry
            .get(&format!("/v1/datasets/resolve/{missing}"))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    }
    let (status, body) = registry
        .call(
            Method::PUT,
            "/v1/datasets/corpus/aliases/x",
            Some(json!({"version": 9})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (_, listed) = registry.get("/v1/datasets").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let (_, versions) = registry.get("/v1/datasets/corpus/versions").await;
    assert_eq!(versions.as_array().map(Vec::len), Some(2));
    registry.stop().await;
}

#[tokio::test]
async fn reading_needs_a_token_and_the_routes_are_documented() {
    let registry = spawn(&[]).await;
    let (status, body) = registry
        .app
        .call(Method::GET, "/v1/datasets", None, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, openapi) = registry
        .app
        .call(Method::GET, "/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/datasets/{name}/versions",
        "/v1/datasets/resolve/{reference}",
        "/v1/datasets/versions/{id}/split",
    ] {
        assert!(openapi["paths"].get(path).is_some(), "{path} is documented");
    }
    registry.stop().await;
}

#[tokio::test]
async fn a_wrong_method_is_a_405_naming_the_served_ones_and_a_wrong_type_names_its_field() {
    let registry = spawn(&[]).await;
    let cases = [
        (Method::DELETE, "/v1/datasets", "GET, HEAD"),
        (Method::PATCH, "/v1/datasets/qa/aliases/prod", "PUT, DELETE"),
        (Method::PUT, "/v1/datasets/qa/versions", "GET, HEAD, POST"),
    ];
    for (method, path, served) in cases {
        let (status, body) = registry.call(method.clone(), path, None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(body["error"]["code"], "method_not_allowed");
        // The order the routes register them in (`routes::configure`), as in `Allow`.
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.ends_with(&format!("it serves {served}")),
            "{message}"
        );
    }
    let (status, _) = registry.get("/v1/datasets/qa/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an unknown path stays a 404");

    // Regression: a field of the wrong type came back with `param: null`. The check on the
    // version comes after the body is parsed, so any id does.
    let id = uuid::Uuid::nil();
    let (status, body) = registry
        .call(
            Method::POST,
            &format!("/v1/datasets/versions/{id}/split"),
            Some(json!({"eval_fraction": "a fifth", "seed": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "eval_fraction");
    assert_eq!(body["error"]["code"], "invalid_value");
    registry.stop().await;
}

#[tokio::test]
#[ignore = "needs data/ from scripts/fetch-data.sh"]
async fn the_real_instruction_and_chat_data_upload_with_their_record_counts() {
    let registry = spawn(&[]).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");

    // alpaca_en_demo.json is one JSON array of 999 Alpaca records (data/sft/.ferrite-sft.json).
    let alpaca = std::fs::read(root.join("sft/alpaca_en_demo.json")).expect("fetched data");
    let (status, version) = registry.upload("alpaca", "kind=sft", alpaca, false).await;
    assert_eq!(status, StatusCode::CREATED, "{version}");
    assert_eq!(
        (version["format"].as_str(), version["rows"].as_u64()),
        (Some("json"), Some(999))
    );

    // chitchat.jsonl holds the 4,017 of ChitChat's 7,168 conversations that have two or more
    // turns, one per line (data/chat/.ferrite-chat.json); the other 3,151 are not in the file.
    let chat = std::fs::read(root.join("chat/chitchat.jsonl")).expect("fetched data");
    let (status, version) = registry
        .upload("chitchat", "kind=chat", gzip(&chat), true)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{version}");
    assert_eq!(version["rows"], 4017);
    assert_eq!(version["sha256"], sha256_hex(&chat));
    registry.stop().await;
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test]
async fn a_multipart_upload_is_stored_whole_or_aborted_without_a_trace() {
    // Parts of 5 MiB (the smallest S3 allows); 12 MiB of lines take three parts.
    let registry = spawn(&[("FERRITE_MULTIPART_PART_BYTES", "5242880")]).await;
    let line = format!("{}\n", "all work and no play ".repeat(3));
    let mut big = line.repeat(12 * 1024 * 1024 / line.len()).into_bytes();

    // The last line is bad, so every part has gone up before the problem is seen.
    let mut broken = big.clone();
    broken.extend_from_slice(b"\xff\n");
    let (status, body) = registry.upload("big", "kind=text", broken, false).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_nothing_kept(&registry, "aborted multipart upload").await;

    big.extend_from_slice(b"the end\n");
    let (status, version) = registry
        .upload("big", "kind=text", big.clone(), false)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{version}");
    assert_eq!(version["bytes"], big.len());
    let stored = registry
        .content(version["id"].as_str().unwrap_or_default())
        .await;
    assert_eq!(sha256_hex(&stored), sha256_hex(&big));
    registry.stop().await;
}

#[tokio::test]
async fn a_new_version_is_announced_through_the_outbox() {
    use prost::Message as _;

    let registry = spawn(&[]).await;
    let (_, version) = registry
        .upload("events", "kind=sft", sft_jsonl(3), false)
        .await;
    let pool = registry.pool().await;
    // The relay marks the row once the broker has confirmed the message.
    common::eventually(
        std::time::Duration::from_secs(30),
        "the event to be confirmed by RabbitMQ",
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT delivered_at IS NOT NULL FROM outbox WHERE routing_key = $1",
            )
            .bind("dataset.version_created")
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
        },
    )
    .await;
    let body: Vec<u8> = sqlx::query_scalar("SELECT body FROM outbox")
        .fetch_one(&pool)
        .await
        .expect("one event");
    let event = ferrite_proto::DatasetVersionCreated::decode(body.as_slice()).expect("decodes");
    assert_eq!(event.version_id, version["id"].as_str().unwrap_or_default());
    assert_eq!(event.dataset_name, "events");
    assert_eq!((event.kind.as_str(), event.rows), ("sft", 3));
    assert_eq!(event.sha256, version["sha256"].as_str().unwrap_or_default());
    pool.close().await;
    registry.stop().await;
}
