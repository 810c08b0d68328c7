//! A fake Kubernetes API server: real HTTP on loopback, enough of `batch/v1` Jobs (create,
//! get, list, delete, watch) and `v1` Pods (list) for kube's client and watcher, unmodified.
//!
//! It keeps the parts of the API's contract the backend relies on: every change gets the
//! next resource version; a watch from version R replays the changes after R, then follows
//! live ones; a watch from a version older than the last compaction gets `410 Gone` (as an
//! ERROR event, as the real server sends it); label selectors filter lists and watches.
//! Tests play the controllers: they set a Job's status, delete it, add its pod.
//!
//! Not modelled: admission (defaulting, validation), the Job controller and scheduler, RBAC,
//! field selectors, list paging (`limit` is ignored, as the real server does for
//! `resourceVersion=0` lists served from its cache), bookmarks and `sendInitialEvents`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use selector::Selector;
use watch_stream::watch_response;

mod selector;
mod watch_stream;

/// The resources the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Jobs,
    Pods,
}

impl Resource {
    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Jobs => ("batch/v1", "JobList"),
            Self::Pods => ("v1", "PodList"),
        }
    }
}

/// One change, as a watch sends it.
#[derive(Debug, Clone)]
struct Change {
    revision: u64,
    resource: Resource,
    namespace: String,
    kind: &'static str,
    object: Value,
}

type Key = (Resource, String, String);

#[derive(Debug, Default)]
struct Store {
    revision: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Watches from a revision below this get 410 Gone.
    oldest_watchable: u64,
    /// Job bodies as the client posted them.
    created: Vec<Value>,
    /// `(name, DeleteOptions body)` per Job delete request.
    deletions: Vec<(String, Value)>,
    lists: usize,
    watches: usize,
    /// Requests still to answer with 500, whatever they ask.
    failures_left: usize,
}

struct State {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch, as the real server does at its timeout.
    close: watch::Sender<u64>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a change under the lock, so watches starting concurrently see it either in
    /// their backlog or live, never both and never neither.
    fn change(&self, store: &mut Store, key: Key, kind: &'static str, mut object: Value) -> Value {
        store.revision += 1;
        object["metadata"]["resourceVersion"] = json!(store.revision.to_string());
        if kind == "DELETED" {
            store.objects.remove(&key);
        } else {
            store.objects.insert(key.clone(), object.clone());
        }
        let change = Change {
            revision: store.revision,
            resource: key.0,
            namespace: key.1,
            kind,
            object: object.clone(),
        };
        store.history.push_back(change.clone());
        // No receiver is fine: nobody watches yet.
        let _ = self.changes.send(change);
        object
    }
}

/// A running fake API server on 127.0.0.1.
pub struct FakeApiServer {
    url: String,
    state: Arc<State>,
    handle: actix_web::dev::ServerHandle,
}

impl FakeApiServer {
    pub fn start() -> Self {
        let (changes, _) = broadcast::channel(1024);
        let (close, _) = watch::channel(0);
        let state = Arc::new(State {
            store: Mutex::new(Store::default()),
            changes,
            close,
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(injected_failures))
                .app_data(data.clone())
                .app_data(web::JsonConfig::default().limit(1 << 20))
                .route(
                    "/apis/batch/v1/namespaces/{ns}/jobs",
                    web::post().to(create_job),
                )
                .route(
                    "/apis/batch/v1/namespaces/{ns}/jobs",
                    web::get().to(list_or_watch_jobs),
                )
                .route(
                    "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
                    web::get().to(get_job),
                )
                .route(
                    "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
                    web::delete().to(delete_job),
                )
                .route(
                    "/api/v1/namespaces/{ns}/pods",
                    web::get().to(list_or_watch_pods),
                )
                .default_service(web::to(|| async {
                    status_response(404, "NotFound", "the fake API server has no such path")
                }))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .expect("listen")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { url, state, handle }
    }

    /// A kube client aimed at this server, with no credentials.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().expect("server URL"));
        kube::Client::try_from(config).expect("kube client")
    }

    /// Job bodies exactly as the client posted them.
    pub fn created(&self) -> Vec<Value> {
        self.state.lock().created.clone()
    }

    pub fn deletions(&self) -> Vec<(String, Value)> {
        self.state.lock().deletions.clone()
    }

    /// Answers the next `count` requests with 500, as an overloaded API server might.
    pub fn fail_next(&self, count: usize) {
        self.state.lock().failures_left = count;
    }

    pub fn lists(&self) -> usize {
        self.state.lock().lists
    }

    pub fn watches(&self) -> usize {
        self.state.lock().watches
    }

    pub fn job(&self, namespace: &str, name: &str) -> Option<Value> {
        let key = (Resource::Jobs, namespace.to_owned(), name.to_owned());
        self.state.lock().objects.get(&key).cloned()
    }

    /// Creates a Job as another client would (one the backend did not create).
    pub fn insert_job(&self, namespace: &str, job: Value) {
        let mut store = self.state.lock();
        insert(&self.state, &mut store, Resource::Jobs, namespace, job).expect("the Job is new");
    }

    /// Sets a Job's status, as the Job controller does.
    pub fn set_job_status(&self, namespace: &str, name: &str, status: Value) {
        let mut store = self.state.lock();
        set_status(&self.state, &mut store, namespace, name, status);
    }

    /// Adds a pod, as the Job controller and kubelet do.
    pub fn insert_pod(&self, namespace: &str, pod: Value) {
        let mut store = self.state.lock();
        insert(&self.state, &mut store, Resource::Pods, namespace, pod).expect("the pod is new");
    }

    /// Runs `change` while no watch is open, as between a watch's timeout and the client's
    /// next watch; history is kept, so a watch resuming from before it replays it.
    pub fn while_unwatched(&self, change: impl FnOnce(&mut Unwatched<'_>)) {
        drop(self.unwatched(change));
    }

    /// As [`Self::while_unwatched`], then compacts history, so a watch resuming from before
    /// `change` gets 410 Gone and must re-list to learn what it did.
    pub fn while_unwatched_then_compact(&self, change: impl FnOnce(&mut Unwatched<'_>)) {
        let mut store = self.unwatched(change);
        store.history.clear();
        store.oldest_watchable = store.revision;
    }

    fn unwatched(&self, change: impl FnOnce(&mut Unwatched<'_>)) -> MutexGuard<'_, Store> {
        let mut store = self.state.lock();
        self.state.close.send_modify(|generation| *generation += 1);
        change(&mut Unwatched {
            state: &self.state,
            store: &mut store,
        });
        store
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Stopping is asynchronous; the runtime ends with the test anyway.
        drop(self.handle.stop(false));
    }
}

/// Changes made while no watch is open; see [`FakeApiServer::while_unwatched`].
pub struct Unwatched<'a> {
    state: &'a State,
    store: &'a mut Store,
}

impl Unwatched<'_> {
    pub fn set_job_status(&mut self, namespace: &str, name: &str, status: Value) {
        set_status(self.state, self.store, namespace, name, status);
    }

    pub fn delete_job(&mut self, namespace: &str, name: &str) {
        let key = (Resource::Jobs, namespace.to_owned(), name.to_owned());
        let object = self
            .store
            .objects
            .get(&key)
            .cloned()
            .expect("the Job exists");
        self.state.change(self.store, key, "DELETED", object);
    }
}

fn set_status(state: &State, store: &mut Store, namespace: &str, name: &str, status: Value) {
    let key = (Resource::Jobs, namespace.to_owned(), name.to_owned());
    let mut job = store.objects.get(&key).cloned().expect("the Job exists");
    job["status"] = status;
    state.change(store, key, "MODIFIED", job);
}

async fn injected_failures(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let fail = request.app_data::<web::Data<State>>().is_some_and(|state| {
        let mut store = state.lock();
        let fail = store.failures_left > 0;
        store.failures_left = store.failures_left.saturating_sub(1);
        fail
    });
    if fail {
        let response = status_response(500, "InternalError", "injected failure");
        return Ok(request.into_response(response).map_into_right_body());
    }
    next.call(request)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// Why the server refuses a request: status code, reason, message.
#[derive(Debug)]
struct Refusal(u16, &'static str, String);

fn insert(
    state: &State,
    store: &mut Store,
    resource: Resource,
    namespace: &str,
    mut object: Value,
) -> Result<Value, Refusal> {
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
        return Err(Refusal(
            422,
            "Invalid",
            "metadata.name: Required value".into(),
        ));
    };
    let key = (resource, namespace.to_owned(), name.clone());
    if store.objects.contains_key(&key) {
        return Err(Refusal(
            409,
            "AlreadyExists",
            format!("\"{name}\" already exists"),
        ));
    }
    object["metadata"]["namespace"] = json!(namespace);
    object["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
    object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    object["metadata"]["generation"] = json!(1);
    Ok(state.change(store, key, "ADDED", object))
}

fn status_response(code: u16, reason: &str, message: &str) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(code).expect("a valid status code");
    HttpResponse::build(status).json(status_body(code, reason, message))
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": if code < 400 { "Success" } else { "Failure" },
        "message": message,
        "reason": reason,
        "code": code,
    })
}

async fn create_job(
    state: web::Data<State>,
    namespace: web::Path<String>,
    body: web::Json<Value>,
) -> HttpResponse {
    let mut store = state.lock();
    store.created.push(body.0.clone());
    match insert(&state, &mut store, Resource::Jobs, &namespace, body.0) {
        Ok(job) => HttpResponse::Created().json(job),
        Err(Refusal(code, reason, message)) => status_response(code, reason, &message),
    }
}

async fn get_job(state: web::Data<State>, path: web::Path<(String, String)>) -> HttpResponse {
    let (namespace, name) = path.into_inner();
    let key = (Resource::Jobs, namespace, name.clone());
    match state.lock().objects.get(&key) {
        Some(job) => HttpResponse::Ok().json(job),
        None => status_response(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
    }
}

async fn delete_job(
    state: web::Data<State>,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    let (namespace, name) = path.into_inner();
    let options = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut store = state.lock();
    store.deletions.push((name.clone(), options));
    let key = (Resource::Jobs, namespace, name.clone());
    let Some(job) = store.objects.get(&key).cloned() else {
        return status_response(404, "NotFound", &format!("jobs.batch \"{name}\" not found"));
    };
    // No finalizers here, so the object goes at once, as with background propagation.
    state.change(&mut store, key, "DELETED", job);
    HttpResponse::Ok().json(status_body(200, "", ""))
}

async fn list_or_watch_jobs(
    state: web::Data<State>,
    namespace: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    list_or_watch(&state, Resource::Jobs, &namespace, &query)
}

async fn list_or_watch_pods(
    state: web::Data<State>,
    namespace: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    list_or_watch(&state, Resource::Pods, &namespace, &query)
}

fn list_or_watch(
    state: &web::Data<State>,
    resource: Resource,
    namespace: &str,
    query: &HashMap<String, String>,
) -> HttpResponse {
    let selector = match Selector::parse(query.get("labelSelector").map_or("", String::as_str)) {
        Ok(selector) => selector,
        Err(message) => return status_response(400, "BadRequest", &message),
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if watching {
        watch_response(state, resource, namespace, selector, query)
    } else {
        list_response(state, resource, namespace, &selector)
    }
}

fn list_response(
    state: &State,
    resource: Resource,
    namespace: &str,
    selector: &Selector,
) -> HttpResponse {
    let mut store = state.lock();
    store.lists += 1;
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((r, ns, _), object)| {
            *r == resource && ns == namespace && selector.matches(object)
        })
        .map(|(_, object)| object.clone())
        .collect();
    let (api_version, kind) = resource.list_kind();
    HttpResponse::Ok().json(json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": store.revision.to_string()},
        "items": items,
    }))
}
