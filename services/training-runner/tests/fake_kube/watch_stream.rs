//! Watches: a backlog replayed from history, then live changes until closed or timed out.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use actix_web::HttpResponse;
use bytes::Bytes;
use futures::stream;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::selector::Selector;
use super::{Change, Resource, State, status_body};

/// What one open watch holds between events.
pub(super) struct WatchStream {
    backlog: VecDeque<Value>,
    changes: broadcast::Receiver<Change>,
    close: watch::Receiver<u64>,
    deadline: tokio::time::Instant,
    resource: Resource,
    namespace: String,
    selector: Selector,
}

impl WatchStream {
    async fn next_line(&mut self) -> Option<Bytes> {
        if let Some(event) = self.backlog.pop_front() {
            return Some(line(&event));
        }
        loop {
            tokio::select! {
                biased;
                _ = self.close.changed() => return None,
                _ = tokio::time::sleep_until(self.deadline) => return None,
                change = self.changes.recv() => {
                    // A lagging watch ends; the client resumes from its last version.
                    let change = change.ok()?;
                    // The close may have come between polling it and this change, which was
                    // sent after it: a closed watch must not deliver it.
                    if self.close.has_changed().unwrap_or(true) {
                        return None;
                    }
                    if let Some(event) = self.event(&change) {
                        return Some(line(&event));
                    }
                }
            }
        }
    }

    fn event(&self, change: &Change) -> Option<Value> {
        (change.resource == self.resource
            && change.namespace == self.namespace
            && self.selector.matches(&change.object))
        .then(|| json!({"type": change.kind, "object": change.object}))
    }
}

fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}

pub(super) fn watch_response(
    state: &State,
    resource: Resource,
    namespace: &str,
    selector: Selector,
    query: &HashMap<String, String>,
) -> HttpResponse {
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1800);
    let since: Option<u64> = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .and_then(|v| v.parse().ok());

    let mut store = state.lock();
    store.watches += 1;
    let mut stream = WatchStream {
        backlog: VecDeque::new(),
        changes: state.changes.subscribe(),
        close: state.close.subscribe(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        resource,
        namespace: namespace.to_owned(),
        selector,
    };
    match since {
        Some(since) if since < store.oldest_watchable => {
            stream.backlog.push_back(json!({
                "type": "ERROR",
                "object": status_body(410, "Expired", &format!("too old resource version: {since} ({})", store.oldest_watchable)),
            }));
            // The real server ends the watch after this event.
            stream.deadline = tokio::time::Instant::now();
        }
        Some(since) => {
            let backlog: Vec<Value> = store
                .history
                .iter()
                .filter(|change| change.revision > since)
                .filter_map(|change| stream.event(change))
                .collect();
            stream.backlog.extend(backlog);
        }
        // No version: every current object as ADDED, then what follows.
        None => {
            let current: Vec<Value> = store
                .objects
                .iter()
                .filter(|((r, ns, _), object)| {
                    *r == resource && ns == namespace && stream.selector.matches(object)
                })
                .map(|(_, object)| json!({"type": "ADDED", "object": object}))
                .collect();
            stream.backlog.extend(current);
        }
    }
    drop(store);

    let body = stream::unfold(stream, |mut stream| async move {
        let line = stream.next_line().await?;
        Some((Ok::<_, actix_web::Error>(line), stream))
    });
    HttpResponse::Ok()
        .content_type("application/json")
        .streaming(body)
}
