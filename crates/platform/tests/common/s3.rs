//! A private s3s-fs server (a real S3-compatible store) on a free loopback port.

use std::path::PathBuf;
use std::time::Duration;

use super::{eventually, free_port};

pub const ACCESS_KEY: &str = "ferrite-test";
pub const SECRET_KEY: &str = "ferrite-test-secret";

/// An s3s-fs process serving one bucket from a temp folder; killed and removed on drop.
pub struct S3Server {
    child: std::process::Child,
    dir: PathBuf,
    pub port: u16,
    pub bucket: String,
}

impl S3Server {
    /// Starts s3s-fs from `PATH` (scripts/env.sh puts the cached build there).
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(super::unique_name("ferrite-s3"));
        let bucket = "ferrite-test".to_owned();
        // s3s-fs serves each top-level folder as a bucket.
        std::fs::create_dir_all(dir.join(&bucket)).expect("create the bucket folder");
        let port = free_port();
        let child = std::process::Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("s3s-fs is installed (scripts/setup.sh) and on PATH (scripts/env.sh)");
        eventually(Duration::from_secs(30), "s3s-fs to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        Self {
            child,
            dir,
            port,
            bucket,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment entries that point Ferrite's settings at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("FERRITE_STORE".into(), format!("s3://{}", self.bucket)),
            ("FERRITE_S3_ENDPOINT".into(), self.endpoint()),
            ("FERRITE_S3_ACCESS_KEY".into(), ACCESS_KEY.into()),
            ("FERRITE_S3_SECRET_KEY".into(), SECRET_KEY.into()),
        ]
    }

    /// Files under the bucket folder, relative to it: what really sits on the server's disk.
    pub fn files(&self) -> Vec<String> {
        fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else if let Ok(relative) = path.strip_prefix(root) {
                    out.push(relative.to_string_lossy().into_owned());
                }
            }
        }
        let root = self.dir.join(&self.bucket);
        let mut files = Vec::new();
        walk(&root, &root, &mut files);
        files.sort();
        files
    }
}

impl S3Server {
    /// Multipart uploads in progress: s3s-fs keeps their parts and manifests beside the bucket
    /// folders (`.upload_id-*`, `.upload-*`) until the upload completes or is aborted.
    pub fn pending_uploads(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".upload"))
            .collect();
        names.sort();
        names
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
