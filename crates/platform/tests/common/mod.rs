//! Test support: a Postgres database per test, per-test AMQP names, private RabbitMQ nodes.
//!
//! The shared RabbitMQ (127.0.0.1:5672) and Postgres (127.0.0.1:5432) run on every development
//! and CI machine. Tests never stop them: a test that needs the broker to go away starts a
//! [`PrivateRabbit`] of its own.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferrite_platform::Secret;
use ferrite_platform::settings::AmqpSettings;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// The broker every session starts; tests use their own exchange and queue names on it.
pub const SHARED_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The server's maintenance database, used to create and drop test databases.
pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The messaging migration the platform runs in every service schema.
pub const MESSAGING_MIGRATION: &str =
    include_str!("../../../../migrations/_messaging/1_outbox_and_inbox.sql");

/// A name no other test or run uses: `<prefix>-<32 hex digits>`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

/// AMQP settings with a fresh events exchange, so parallel tests never see each other's
/// messages, and a short reconnect delay to keep restart tests quick.
pub fn amqp_settings(url: &str, max_deliveries: u32) -> AmqpSettings {
    AmqpSettings {
        url: Secret::new(url::Url::parse(url).expect("test AMQP URLs are valid")),
        exchange: unique_name("ferrite.test"),
        prefetch: 8,
        max_deliveries,
        reconnect_delay: Duration::from_millis(100),
    }
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after `timeout`, which only
/// bounds a hung test and is never what a test measures.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let waited = tokio::time::timeout(timeout, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// A database of its own for one test, with the messaging tables in `public`.
pub struct TestDatabase {
    pub name: String,
    pub pool: PgPool,
}

impl TestDatabase {
    /// Creates `ferrite_test_<uuid>` and runs the messaging migration in it.
    pub async fn create() -> Self {
        let name = format!("ferrite_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(POSTGRES_ADMIN_URL)
            .await
            .expect("Postgres is running on 127.0.0.1:5432");
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let pool = PgPool::connect(&database_url(&name))
            .await
            .expect("connect to the test database");
        sqlx::raw_sql(MESSAGING_MIGRATION)
            .execute(&pool)
            .await
            .expect("run the messaging migration");
        Self { name, pool }
    }

    /// Closes the pool and drops the database.
    pub async fn drop(self) {
        self.pool.close().await;
        let mut admin = PgConnection::connect(POSTGRES_ADMIN_URL)
            .await
            .expect("Postgres is running");
        sqlx::query(&format!(
            r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
            self.name
        ))
        .execute(&mut admin)
        .await
        .expect("drop the test database");
    }
}

fn database_url(name: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

/// Ready messages in `queue` (not those delivered and unacknowledged), by a passive declare.
pub async fn ready_messages(url: &str, queue: &str) -> u32 {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue, passive, FieldTable::default())
        .await
        .expect("the queue exists");
    let _ = connection.close(200, "done").await;
    declared.message_count()
}

/// Takes one message from `queue` (acknowledging it), if there is one.
pub async fn take_message(url: &str, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    let options = lapin::options::BasicGetOptions { no_ack: true };
    let message = channel.basic_get(queue, options).await.expect("basic.get");
    let _ = connection.close(200, "done").await;
    message
}

/// Deletes a test's queues (with their dead-letter queues) and exchanges from a broker.
pub async fn delete_topology(url: &str, settings: &AmqpSettings, queues: &[&str]) {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("open a channel");
    for queue in queues {
        for name in [
            (*queue).to_owned(),
            ferrite_platform::amqp::dead_letter_queue(queue),
        ] {
            channel
                .queue_delete(&name, QueueDeleteOptions::default())
                .await
                .expect("delete a test queue");
        }
    }
    for exchange in [
        settings.exchange.clone(),
        ferrite_platform::amqp::dead_letter_exchange(settings),
    ] {
        channel
            .exchange_delete(&exchange, ExchangeDeleteOptions::default())
            .await
            .expect("delete a test exchange");
    }
    let _ = connection.close(200, "done").await;
}

/// A RabbitMQ node of one test's own, on its own ports and state folder, that the test may
/// stop and start again. The node's state survives [`PrivateRabbit::stop`], so durable queues
/// and persistent messages are there after [`PrivateRabbit::start_again`], as after a real
/// broker restart. Dropping it kills the node and deletes its folder.
pub struct PrivateRabbit {
    dir: PathBuf,
    node_name: String,
    port: u16,
    dist_port: u16,
    running: Option<RunningNode>,
}

struct RunningNode {
    /// The `rabbitmq-server` script, which waits on the Erlang VM.
    script: tokio::process::Child,
    /// The Erlang VM itself, read from the pid file; signals go here.
    vm_pid: u32,
}

/// Where the Debian package puts the real start script (the one in /usr/sbin re-runs it as
/// the `rabbitmq` user, which could not write our state folder and would hide the pid).
const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// Boot takes 7-10 s on an idle machine and several times that while others compile.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

impl PrivateRabbit {
    /// Starts a node and waits until it accepts connections.
    pub async fn start() -> Self {
        let suffix = Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("ferrite-rabbit-{suffix}"));
        std::fs::create_dir_all(&dir).expect("create the node's folder");
        let port = free_port();
        let dist_port = free_port();
        // The package's config file pins port 5672; this one replaces it.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\n"),
        )
        .expect("write rabbitmq.conf");
        // No plugins: the management and Prometheus listeners would need ports of their own.
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        let mut rabbit = Self {
            dir,
            node_name: format!("ferrite-test-{suffix}@localhost"),
            port,
            dist_port,
            running: None,
        };
        rabbit.start_again().await;
        rabbit
    }

    /// `amqp://` URL of the node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the node (again, after [`PrivateRabbit::stop`]) on the same port and state.
    pub async fn start_again(&mut self) {
        assert!(self.running.is_none(), "the node is already running");
        let pid_file = self.dir.join("rabbit.pid");
        let _ = std::fs::remove_file(&pid_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the node's log");
        let log_err = log.try_clone().expect("clone the log handle");
        let script = tokio::process::Command::new(RABBITMQ_SERVER)
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node_name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_LOGS", "-")
            .env("RABBITMQ_PID_FILE", &pid_file)
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            // The package's env file names the shared node; an absent file means no overrides.
            .env(
                "RABBITMQ_CONF_ENV_FILE",
                self.dir.join("no-rabbitmq-env.conf"),
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .expect("start rabbitmq-server");
        let mut running = RunningNode { script, vm_pid: 0 };

        let booted = tokio::time::timeout(BOOT_TIMEOUT, async {
            loop {
                if let Ok(Some(status)) = running.script.try_wait() {
                    return Err(format!("rabbitmq-server exited with {status}"));
                }
                let listening = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok();
                let pid = std::fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|text| text.trim().parse().ok());
                if let (true, Some(pid)) = (listening, pid) {
                    return Ok(pid);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        match booted {
            Ok(Ok(pid)) => running.vm_pid = pid,
            Ok(Err(problem)) => panic!("{problem}; log:\n{}", self.log_tail()),
            Err(_) => panic!(
                "RabbitMQ did not boot within {BOOT_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            ),
        }
        self.running = Some(running);
    }

    /// Stops the node gracefully (SIGTERM to the VM) and waits until it has exited.
    pub async fn stop(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        signal(running.vm_pid, "TERM");
        let exited = tokio::time::timeout(Duration::from_secs(60), running.script.wait()).await;
        if exited.is_err() {
            signal(running.vm_pid, "KILL");
            let _ = running.script.wait().await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if let Some(mut running) = self.running.take() {
            signal(running.vm_pid, "KILL");
            let _ = running.script.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends a signal to one process by id, with the `kill` command (the crate forbids unsafe, so
/// no libc).
fn signal(pid: u32, name: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A port free right now. Another process could take it before the node binds it; the
/// ephemeral range makes that unlikely, and a clash fails the boot loudly, not silently.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener
        .local_addr()
        .expect("a bound socket has an address")
        .port()
}

pub mod app;
pub mod consumer;
pub mod s3;
