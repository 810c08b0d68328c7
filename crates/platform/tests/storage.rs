//! Object storage against a real S3-compatible server (s3s-fs) and a local folder.

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::s3::S3Server;
use ferrite_platform::Settings;
use ferrite_platform::storage::{ObjectKey, Storage, StorageError};

fn s3_storage(server: &S3Server) -> Storage {
    let env = server.env().into_iter().collect();
    let settings = Settings::load(None, &env).expect("valid settings");
    Storage::from_settings(&settings.store).expect("store configured")
}

fn key(text: &str) -> ObjectKey {
    ObjectKey::parse(text).expect("a valid key")
}

/// A store in a fresh local folder, and that folder, which the store creates.
fn local_storage() -> (Storage, PathBuf) {
    let root = std::env::temp_dir().join(common::unique_name("ferrite-local-store"));
    let env = [("FERRITE_STORE".to_owned(), root.display().to_string())]
        .into_iter()
        .collect();
    let settings = Settings::load(None, &env).expect("valid settings");
    let storage = Storage::from_settings(&settings.store).expect("store configured");
    (storage, root)
}

/// Every folder under `root`, relative to it, sorted.
fn folders(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).expect("a readable folder") {
            let path = entry.expect("a readable entry").path();
            if path.is_dir() {
                let relative = path.strip_prefix(root).expect("under the root");
                found.push(relative.display().to_string());
                pending.push(path);
            }
        }
    }
    found.sort();
    found
}

#[tokio::test]
async fn deleting_the_last_object_under_a_prefix_leaves_no_empty_folder_in_a_local_store() {
    let (storage, root) = local_storage();
    let checkpoint = |step: u32| key(&format!("checkpoints/job-1/step-{step}/model.safetensors"));
    for step in [100, 200] {
        storage
            .put(&checkpoint(step), Bytes::from_static(b"weights"))
            .await
            .expect("put");
    }
    let job = ["checkpoints", "checkpoints/job-1"];
    assert_eq!(
        folders(&root),
        [
            &job[..],
            &["checkpoints/job-1/step-100", "checkpoints/job-1/step-200"]
        ]
        .concat()
    );

    // Regression: pruning the older checkpoint, as the training runner does, left its empty
    // folder behind. The job's folder stays: it still holds the newer checkpoint.
    storage.delete(&checkpoint(100)).await.expect("delete");
    assert_eq!(
        folders(&root),
        [&job[..], &["checkpoints/job-1/step-200"]].concat()
    );

    // The last object under `checkpoints` goes, and every folder up to the root with it.
    storage.delete(&checkpoint(200)).await.expect("delete");
    assert_eq!(folders(&root), Vec::<String>::new());
    assert!(root.is_dir(), "the store's root stays");

    // The readiness probe writes and deletes an object in the root itself, the root's only
    // entry: deleting it must not take the root, or the next write would fail.
    storage.check().await.expect("the store takes writes");
    assert!(root.is_dir(), "the store's root stays");
    storage.check().await.expect("the store still takes writes");
    std::fs::remove_dir_all(&root).expect("remove the test folder");
}

#[tokio::test]
async fn put_get_list_and_delete_work_against_s3s_fs() {
    let server = S3Server::start().await;
    let storage = s3_storage(&server);
    storage.check().await.expect("the server answers");

    storage
        .put(
            &key("datasets/a/data.jsonl"),
            Bytes::from_static(b"{\"x\":1}\n"),
        )
        .await
        .expect("put");
    storage
        .put(&key("datasets/b/data.jsonl"), Bytes::from_static(b"{}\n"))
        .await
        .expect("put");
    storage
        .put(&key("models/m/config.json"), Bytes::from_static(b"{}"))
        .await
        .expect("put");

    let got = storage
        .get(&key("datasets/a/data.jsonl"))
        .await
        .expect("get");
    assert_eq!(&got[..], b"{\"x\":1}\n");

    let listed = storage.list(&key("datasets")).await.expect("list");
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["datasets/a/data.jsonl", "datasets/b/data.jsonl"]);
    assert_eq!(listed[0].size_bytes, 8, "8 bytes were written");

    storage
        .delete(&key("datasets/a/data.jsonl"))
        .await
        .expect("delete");
    assert!(
        !storage
            .exists(&key("datasets/a/data.jsonl"))
            .await
            .expect("head")
    );
    assert!(matches!(
        storage.get(&key("datasets/a/data.jsonl")).await,
        Err(StorageError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_20_mb_object_goes_up_in_parts_and_comes_back_identical() {
    let server = S3Server::start().await;
    let storage = s3_storage(&server);
    // 20 MiB of a non-repeating pattern: a part stitched in the wrong order would not match.
    let body: Vec<u8> = (0..20u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(1_000_003)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();

    let written = storage
        .put_stream(
            &key("checkpoints/big.safetensors"),
            futures::stream::iter(chunks),
        )
        .await
        .expect("multipart upload");
    assert_eq!(written, body.len() as u64);

    let back = storage
        .get(&key("checkpoints/big.safetensors"))
        .await
        .expect("get");
    assert_eq!(back.len(), body.len());
    assert!(back[..] == body[..], "the bytes round-trip unchanged");
    assert_eq!(
        server.files(),
        ["checkpoints/big.safetensors"],
        "no part files are left behind"
    );
}

#[tokio::test]
async fn a_failed_multipart_upload_leaves_nothing_on_the_server() {
    let server = S3Server::start().await;
    let storage = s3_storage(&server);
    let chunks = vec![
        Ok(Bytes::from(vec![7u8; 9 * 1024 * 1024])),
        Err(std::io::Error::other("the client went away")),
    ];
    let result = storage
        .put_stream(&key("uploads/partial"), futures::stream::iter(chunks))
        .await;
    assert!(
        matches!(result, Err(StorageError::Body { .. })),
        "{result:?}"
    );
    assert!(!storage.exists(&key("uploads/partial")).await.expect("head"));
    assert!(
        server.files().iter().all(|f| !f.starts_with("uploads/")),
        "{:?}",
        server.files()
    );
}

#[test]
fn keys_that_escape_the_bucket_are_refused_before_any_request() {
    for bad in ["../etc/passwd", "/abs", "a//b", "a/./b", ""] {
        let error = ObjectKey::parse(bad).expect_err("refused");
        assert!(error.to_string().contains("invalid object key"), "{error}");
    }
}
