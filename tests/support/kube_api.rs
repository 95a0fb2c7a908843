//! A stand-in for the Kubernetes API server, on 127.0.0.1 over plain HTTP, for the calls
//! Strait's Kubernetes source makes: list and watch (with resourceVersions, bookmarks,
//! expiry, pagination and selectors), get, create, update, merge/JSON patch (including the
//! `status` subresource) and delete of IngressClasses, Ingresses, Services, EndpointSlices,
//! Secrets, Events (core and `events.k8s.io`), Leases and Namespaces.
//!
//! Clients reach it through an ordinary kubeconfig ([`KubeApi::kubeconfig`]), so the code
//! under test takes the same path as against a real cluster. Strait is also run against a
//! real kube-apiserver outside CI, so wherever this differs from the real server it must be
//! stricter, never more lenient: what the server refuses (loopback EndpointSlice addresses,
//! Ingress paths without a pathType, stale resourceVersions, ...) is refused here with the
//! same code, reason and message. What is not implemented is refused too (415 for strategic
//! merge and apply patches, 404 for resources it does not serve), never silently accepted.
//!
//! Objects are JSON values: each write decodes the body as the typed k8s-openapi object and
//! encodes it back, which drops unknown fields and rejects wrongly typed ones as the server
//! does, then applies the server's defaulting and validation (see `resources`).

pub mod meta;
mod patch;
pub mod resources;
pub mod selector;
mod store;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use meta::ApiError;
use meta::{now_rfc3339, FieldError};
use resources::Resource;
use selector::{FieldSelector, LabelSelector};
use store::{Change, Key, Store, Watcher};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The real server's request body limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Namespaces every cluster starts with.
const INITIAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// The stand-in server. Dropping it stops accepting and ends every open watch.
pub struct KubeApi {
    addr: SocketAddr,
    token: String,
    shared: Arc<Shared>,
    _stop: watch::Sender<()>,
}

struct Shared {
    store: Mutex<Store>,
    token: String,
    /// How often an idle watch gets a BOOKMARK. The real server's is one minute; tests can
    /// shorten it to see bookmarks without waiting.
    bookmark_every: Mutex<Duration>,
    /// Bumped to end every open watch stream, as an API server restart would.
    cut_watches: watch::Sender<u64>,
    /// Answer every request 503, as a server that is down behind its load balancer.
    unavailable: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("store lock")
    }
}

impl KubeApi {
    /// Starts a server on 127.0.0.1:0 holding the usual initial namespaces.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = format!("strait-test-{}", meta::new_uid());
        let (cut_watches, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            token: token.clone(),
            bookmark_every: Mutex::new(Duration::from_secs(60)),
            cut_watches,
            unavailable: std::sync::atomic::AtomicBool::new(false),
        });
        let api = Self {
            addr,
            token,
            shared: Arc::clone(&shared),
            _stop: watch::channel(()).0,
        };
        for ns in INITIAL_NAMESPACES {
            api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        }
        // Every cluster has the `kubernetes` Service and its EndpointSlice in `default`, so a
        // source watching all Services or slices meets them here too. The address is from
        // TEST-NET-1 (192.0.2.0/24): nothing ever listens there, and nothing should send to it.
        api.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": "10.96.0.1",
                     "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}
        }));
        api.apply(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.0.2.1"], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]
        }));
        let mut stopped = api._stop.subscribe();
        tokio::spawn(async move {
            loop {
                let (s, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stopped.changed() => break,
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
            // The accept loop ends with the handle: end the watches too, so clients see the
            // server go away rather than a stream that never speaks again.
            shared.cut_watches.send_modify(|g| *g += 1);
        });
        api
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bearer token requests must carry; anything else is 401.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Writes `dir/kubeconfig`: one cluster, one user with the token, one current context
    /// with namespace `default`. Returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: strait\n    namespace: default\ncurrent-context: stand-in\nusers:\n- name: strait\n  user:\n    token: {}\n",
            self.url(),
            self.token
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A kube-rs client built from this server's kubeconfig file (written in `dir`), the
    /// way Strait builds one.
    pub async fn client(&self, dir: &Path) -> kube::Client {
        let path = self.kubeconfig(dir);
        let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }

    /// Creates `obj`, or replaces the object of that name, with the same defaulting and
    /// validation as a client's write. Panics with the server's message if it is refused.
    pub fn apply(&self, obj: Value) -> Value {
        self.try_apply(obj)
            .unwrap_or_else(|e| panic!("apply refused: {e}"))
    }

    /// [`KubeApi::apply`] that returns the refusal instead of panicking.
    pub fn try_apply(&self, obj: Value) -> Result<Value, ApiError> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        let r = resources::RESOURCES
            .iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
            .unwrap_or_else(|| panic!("the stand-in does not serve {api_version} {kind}"));
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or(if r.namespaced { "default" } else { "" })
            .to_owned();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut st = self.shared.store();
        let key: Key = (r.storage, ns.clone(), name.clone());
        let out = match st.objects.get(&key).cloned() {
            Some(old) => {
                let mut obj = obj;
                obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                // A test's replace sets status as given, so it is two writes for resources
                // whose main endpoint ignores status, as it would be for a client.
                let status = obj.get("status").cloned();
                let (o, _) = update(&mut st, r, &ns, &name, obj.clone(), false)?;
                match status {
                    Some(s) if r.status => {
                        let mut o2 = (*o).clone();
                        o2["status"] = s;
                        update(&mut st, r, &ns, &name, r.present(&o2), true)?.0
                    }
                    _ => o,
                }
            }
            None => {
                let status = obj.get("status").cloned();
                let o = create(&mut st, r, &ns, obj)?;
                match status {
                    Some(s) if r.status => {
                        let mut o2 = (*o).clone();
                        o2["status"] = s;
                        update(&mut st, r, &ns, &name_of(&o), r.present(&o2), true)?.0
                    }
                    _ => o,
                }
            }
        };
        Ok(r.present(&out))
    }

    /// Deletes an object, as a client's DELETE would (finalizers keep it, marked for deletion).
    /// `resource` is a plural such as `"ingresses"` (or `"events.events.k8s.io"`).
    pub fn delete(&self, resource: &str, ns: &str, name: &str) -> Result<(), ApiError> {
        let r = resources::by_name(resource);
        delete(&mut self.shared.store(), r, ns, name, &Value::Null).map(|_| ())
    }

    /// The object as a client's GET would return it.
    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let r = resources::by_name(resource);
        let st = self.shared.store();
        st.objects
            .get(&(r.storage, ns.to_owned(), name.to_owned()))
            .map(|o| r.present(o))
    }

    /// Every object of a resource (all namespaces), in list order.
    pub fn list(&self, resource: &str) -> Vec<Value> {
        let r = resources::by_name(resource);
        let st = self.shared.store();
        st.objects
            .iter()
            .filter(|(k, _)| k.0 == r.storage)
            .map(|(_, o)| r.present(o))
            .collect()
    }

    /// Every Event in the store, in core `v1` form whichever API group created it.
    pub fn events(&self) -> Vec<Value> {
        self.list("events")
    }

    /// Each status written through `resource/{name}/status` (PUT or PATCH), oldest first.
    pub fn status_writes(&self, resource: &str, ns: &str, name: &str) -> Vec<Value> {
        let r = resources::by_name(resource);
        let st = self.shared.store();
        st.record
            .status_writes
            .iter()
            .filter(|(s, n, m, _)| *s == r.storage && n == ns && m == name)
            .map(|(_, _, _, v)| v.clone())
            .collect()
    }

    /// How many writes the `status` subresource of this object has taken.
    pub fn patch_count(&self, resource: &str, ns: &str, name: &str) -> usize {
        self.status_writes(resource, ns, name).len()
    }

    /// Every request answered so far: (method, path with query, status code).
    pub fn requests(&self) -> Vec<(String, String, u16)> {
        self.shared.store().record.requests.clone()
    }

    /// The store's current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Compacts history at the current version, as etcd compaction does: every older
    /// resourceVersion is expired from now on. A watch or an exact list from one gets 410
    /// Expired, and so does a `continue` token issued before. Open watches are not touched
    /// (they are past it); end them with [`KubeApi::close_watches`] to make clients resume.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// While `down`, every request gets 503 ServiceUnavailable and open watches end, as
    /// when the API server is down or restarting.
    pub fn set_unavailable(&self, down: bool) {
        self.shared
            .unavailable
            .store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            self.close_watches();
        }
    }

    /// Ends every open watch stream cleanly, as an API server restart or a load balancer
    /// idle timeout would: clients resume from the last resourceVersion they saw.
    pub fn close_watches(&self) {
        self.shared.cut_watches.send_modify(|g| *g += 1);
    }

    /// How many watch streams are open.
    pub fn open_watches(&self) -> usize {
        let mut st = self.shared.store();
        st.watchers.retain(|w| !w.tx.is_closed());
        st.watchers.len()
    }

    /// How often idle watches that asked for bookmarks get one (the real server: 1 minute).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_every.lock().unwrap() = every;
    }
}

fn name_of(o: &Value) -> String {
    o["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

// ---- HTTP -------------------------------------------------------------------------------

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(serde_json::to_vec(body).unwrap()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().to_string();
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let unavailable = shared.unavailable.load(std::sync::atomic::Ordering::SeqCst);
    let routed = if unavailable {
        Err(ApiError::unavailable())
    } else {
        route(&shared, req).await
    };
    let resp = match routed {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    shared
        .store()
        .record
        .requests
        .push((method, uri, resp.status().as_u16()));
    resp
}

/// What a request path names.
struct Target {
    r: &'static Resource,
    /// From the path; empty for cluster-wide requests.
    ns: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route()),
    };
    // `/api/v1/namespaces/{ns}/status` is the Namespace's own subresource, not a collection.
    let namespaced = rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && group.is_empty() && rest[2] == "status");
    let (ns, rest) = if namespaced {
        (rest[1].to_owned(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return Err(ApiError::no_route()),
    };
    let r = resources::find(group, version, plural).ok_or_else(ApiError::no_route)?;
    if namespaced && !r.namespaced {
        return Err(ApiError::no_route());
    }
    let status = match sub {
        None => false,
        Some("status") if r.status => true,
        Some(_) => return Err(ApiError::no_route()),
    };
    Ok(Target {
        r,
        ns,
        name: name.map(str::to_owned),
        status,
    })
}

fn query_params(req: &Request<Incoming>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in req.uri().query().unwrap_or_default().split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(unescape(k), unescape(v));
    }
    out
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_json(req: Request<Incoming>) -> Result<(String, Value), ApiError> {
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| ApiError {
            code: 413,
            reason: "RequestEntityTooLarge",
            message: format!("Request entity too large: limit is {MAX_BODY}"),
            details: None,
            continue_token: None,
        })?
        .to_bytes();
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))?
    };
    Ok((ct, v))
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        == Some(shared.token.as_str());
    if !authorized {
        return Err(ApiError::unauthorized());
    }
    let t = parse_path(req.uri().path())?;
    let q = query_params(&req);
    let method = req.method().clone();
    let r = t.r;
    match (method, &t.name) {
        (Method::GET, None) => {
            if flag(&q, "watch") {
                start_watch(shared, &t, &q)
            } else {
                let list = list(&shared.store(), &t, &q)?;
                Ok(json_response(200, &list))
            }
        }
        (Method::GET, Some(name)) => {
            let st = shared.store();
            if let Some(rv) = q
                .get("resourceVersion")
                .filter(|v| !v.is_empty() && *v != "0")
            {
                let n = parse_rv(rv)?;
                if n > st.rv {
                    return Err(ApiError::too_large_rv(n, st.rv));
                }
            }
            let o = st
                .objects
                .get(&(r.storage, t.ns.clone(), name.clone()))
                .ok_or_else(|| ApiError::not_found(r.named(), name))?;
            Ok(json_response(200, &r.present(o)))
        }
        (Method::POST, None) => {
            check_dry_run(&q)?;
            let (ct, body) = read_json(req).await?;
            json_only(&ct)?;
            let mut st = shared.store();
            let o = create(&mut st, r, &t.ns, body)?;
            Ok(json_response(201, &r.present(&o)))
        }
        (Method::PUT, Some(name)) => {
            check_dry_run(&q)?;
            let (ct, body) = read_json(req).await?;
            json_only(&ct)?;
            let mut st = shared.store();
            let (o, created) = update(&mut st, r, &t.ns, name, body, t.status)?;
            Ok(json_response(
                if created { 201 } else { 200 },
                &r.present(&o),
            ))
        }
        (Method::PATCH, Some(name)) => {
            check_dry_run(&q)?;
            let (ct, body) = read_json(req).await?;
            let mut st = shared.store();
            let o = patch(&mut st, r, &t.ns, name, &ct, &body, t.status)?;
            Ok(json_response(200, &r.present(&o)))
        }
        (Method::DELETE, Some(name)) if !t.status => {
            check_dry_run(&q)?;
            let (_, body) = read_json(req).await?;
            let mut st = shared.store();
            let (obj, pending) = delete(&mut st, r, &t.ns, name, &body)?;
            if pending {
                // Finalizers keep the object: the server answers 202 with it.
                Ok(json_response(202, &r.present(&obj)))
            } else {
                let mut details =
                    json!({"name": name, "kind": r.plural, "uid": obj["metadata"]["uid"]});
                if !r.group.is_empty() {
                    details["group"] = r.group.into();
                }
                Ok(json_response(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
                ))
            }
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn flag(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k)
        .is_some_and(|v| matches!(v.as_str(), "true" | "1" | "True" | "TRUE" | "t" | "T"))
}

/// Dry runs and strict field validation are not implemented; they are refused rather than
/// ignored, since ignoring them would accept what the real server rejects.
fn check_dry_run(q: &HashMap<String, String>) -> Result<(), ApiError> {
    if q.contains_key("dryRun") {
        return Err(ApiError::bad_request(
            "the Kubernetes stand-in does not implement dryRun",
        ));
    }
    if q.get("fieldValidation").is_some_and(|v| v == "Strict") {
        return Err(ApiError::bad_request(
            "the Kubernetes stand-in does not implement fieldValidation=Strict",
        ));
    }
    Ok(())
}

fn json_only(ct: &str) -> Result<(), ApiError> {
    if ct == "application/json" || ct.is_empty() {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(&["application/json"]))
    }
}

fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))
}

// ---- writes -----------------------------------------------------------------------------

/// The checks every body gets before decoding: it is an object of this resource's kind, in
/// the request's namespace.
fn check_body(r: &Resource, ns: &str, body: &mut Value) -> Result<(), ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    }
    let want = r.api_version();
    match body["apiVersion"].as_str() {
        None | Some("") => body["apiVersion"] = want.clone().into(),
        Some(v) if v == want => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({want})"
            )))
        }
    }
    match body["kind"].as_str() {
        None | Some("") => body["kind"] = r.kind.into(),
        Some(k) if k == r.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: the kind in the data ({k}) does not match {}",
                r.kind, r.version, r.kind, r.kind
            )))
        }
    }
    if !body["metadata"].is_object() {
        body["metadata"] = json!({});
    }
    if r.namespaced {
        match body["metadata"]["namespace"].as_str() {
            None | Some("") => body["metadata"]["namespace"] = ns.into(),
            Some(n) if n == ns => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
        }
    } else if let Some(m) = body["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    Ok(())
}

/// Decodes through the typed object and converts to the stored form.
fn decode(r: &Resource, body: Value) -> Result<Value, ApiError> {
    let v = r.decode(body).map_err(ApiError::bad_request)?;
    Ok(r.to_storage(v))
}

fn invalid(r: &Resource, name: &str, errs: Vec<FieldError>) -> Result<(), ApiError> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(r.named(), name, &errs))
    }
}

fn namespace_ready(st: &Store, r: &Resource, ns: &str, name: &str) -> Result<(), ApiError> {
    if !r.namespaced {
        return Ok(());
    }
    match st
        .objects
        .get(&("namespaces", String::new(), ns.to_owned()))
    {
        None => Err(ApiError::namespace_not_found(ns)),
        Some(n) if !n["metadata"]["deletionTimestamp"].is_null() => {
            Err(ApiError::forbidden_terminating(r.named(), name, ns))
        }
        Some(_) => Ok(()),
    }
}

fn create(st: &mut Store, r: &Resource, ns: &str, mut body: Value) -> Result<Arc<Value>, ApiError> {
    if r.namespaced && ns.is_empty() {
        // POST to a cluster-wide path of a namespaced resource.
        return Err(ApiError::method_not_allowed());
    }
    check_body(r, ns, &mut body)?;
    let rv = body["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    if !rv.is_empty() {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let mut obj = decode(r, body)?;
    let meta = &mut obj["metadata"];
    if meta["name"].as_str().unwrap_or_default().is_empty() {
        if let Some(prefix) = meta["generateName"].as_str().filter(|p| !p.is_empty()) {
            meta["name"] = format!("{prefix}{}", meta::name_suffix()).into();
        }
    }
    let name = name_of(&obj);
    namespace_ready(st, r, ns, &name)?;
    let meta = obj["metadata"].as_object_mut().unwrap();
    for k in [
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "managedFields",
    ] {
        meta.remove(k);
    }
    meta.insert("uid".into(), meta::new_uid().into());
    meta.insert("creationTimestamp".into(), now_rfc3339().into());
    if r.generation {
        meta.insert("generation".into(), 1.into());
    } else {
        meta.remove("generation");
    }
    if r.status {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    resources::default(r, &mut obj, None, &mut st.alloc);
    invalid(r, &name, resources::validate(r, &obj, None))?;
    let key: Key = (r.storage, ns.to_owned(), name.clone());
    if st.objects.contains_key(&key) {
        return Err(ApiError::already_exists(r.named(), &name));
    }
    Ok(st
        .commit(key, Some(obj))
        .expect("a write returns the object"))
}

/// PUT, to the object or its `status`. Returns the stored object and whether it was created.
fn update(
    st: &mut Store,
    r: &Resource,
    ns: &str,
    name: &str,
    mut body: Value,
    status: bool,
) -> Result<(Arc<Value>, bool), ApiError> {
    check_body(r, ns, &mut body)?;
    let body_name = body["metadata"]["name"].as_str().unwrap_or_default();
    if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let key: Key = (r.storage, ns.to_owned(), name.to_owned());
    let Some(old) = st.objects.get(&key).cloned() else {
        if r.create_on_update && !status {
            if let Some(m) = body["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            return create(st, r, ns, body).map(|o| (o, true));
        }
        return Err(ApiError::not_found(r.named(), name));
    };
    let old_rv = old["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    let meta = &body["metadata"];
    match meta["resourceVersion"].as_str().unwrap_or_default() {
        "" if !r.unconditional_update => {
            return Err(ApiError::invalid_kind(
                &if r.group.is_empty() {
                    r.plural.to_owned()
                } else {
                    format!("{}.{}", r.plural, r.group)
                },
                r.group,
                r.plural,
                name,
                &[FieldError::invalid_raw(
                    "metadata.resourceVersion",
                    "0x0",
                    "must be specified for an update",
                )],
            ));
        }
        "" => {}
        rv if rv != old_rv => return Err(ApiError::conflict(r.named(), name)),
        _ => {}
    }
    if let Some(uid) = meta["uid"].as_str().filter(|u| !u.is_empty()) {
        let old_uid = old["metadata"]["uid"].as_str().unwrap_or_default();
        if uid != old_uid {
            return Err(ApiError::conflict_because(
                r.named(),
                name,
                &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"),
            ));
        }
    }
    let decoded = decode(r, body)?;
    let mut obj = if status {
        // The status subresource takes nothing but status.
        let mut o = (*old).clone();
        o["status"] = decoded.get("status").cloned().unwrap_or(json!({}));
        o
    } else {
        let mut o = decoded;
        if r.status {
            match old.get("status") {
                Some(s) => o["status"] = s.clone(),
                None => {
                    if let Some(m) = o.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        // System fields are the server's, whatever the client sent.
        for k in [
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old["metadata"].get(k) {
                Some(v) => o["metadata"][k] = v.clone(),
                None => {
                    if let Some(m) = o["metadata"].as_object_mut() {
                        m.remove(k);
                    }
                }
            }
        }
        if let Some(m) = o["metadata"].as_object_mut() {
            m.remove("managedFields");
            m.remove("selfLink");
        }
        o
    };
    resources::default(r, &mut obj, Some(&old), &mut st.alloc);
    if r.generation && !status && resources::spec_changed(r, &obj, &old) {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        obj["metadata"]["generation"] = g.into();
    }
    invalid(r, name, resources::validate(r, &obj, Some(&old)))?;
    obj["metadata"]["resourceVersion"] = old_rv.into();
    if status {
        st.record.status_writes.push((
            r.storage,
            ns.to_owned(),
            name.to_owned(),
            r.present(&obj)["status"].clone(),
        ));
    }
    // An update that changes nothing is not written: no new resourceVersion, no event.
    if obj == *old {
        return Ok((old, false));
    }
    let finalized = !obj["metadata"]["deletionTimestamp"].is_null()
        && obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
    if finalized {
        st.commit(key, None);
        return Ok((Arc::new(obj), false));
    }
    Ok((
        st.commit(key, Some(obj))
            .expect("a write returns the object"),
        false,
    ))
}

fn patch(
    st: &mut Store,
    r: &Resource,
    ns: &str,
    name: &str,
    content_type: &str,
    body: &Value,
    status: bool,
) -> Result<Arc<Value>, ApiError> {
    let key: Key = (r.storage, ns.to_owned(), name.to_owned());
    let old = st
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(r.named(), name))?;
    // Patches apply to the object as this API version shows it.
    let mut doc = r.present(&old);
    match content_type {
        "application/merge-patch+json" => {
            if !body.is_object() {
                return Err(ApiError::bad_request(
                    "json: cannot unmarshal a merge patch that is not an object",
                ));
            }
            patch::merge(&mut doc, body);
        }
        "application/json-patch+json" => {
            doc = patch::json_patch(&doc, body).map_err(|e| ApiError {
                code: 422,
                reason: "Invalid",
                message: e,
                details: None,
                continue_token: None,
            })?;
        }
        _ => {
            return Err(ApiError::unsupported_media_type(&[
                "application/json-patch+json",
                "application/merge-patch+json",
            ]))
        }
    }
    // A patch that sets resourceVersion makes it a precondition; one that leaves it alone
    // applies to whatever is current.
    let old_rv = old["metadata"]["resourceVersion"].clone();
    match doc["metadata"]["resourceVersion"].as_str() {
        Some(rv) if old_rv.as_str() != Some(rv) => return Err(ApiError::conflict(r.named(), name)),
        _ => doc["metadata"]["resourceVersion"] = old_rv,
    }
    update(st, r, ns, name, doc, status).map(|(o, _)| o)
}

/// DELETE. Returns the object and whether it still exists, held by finalizers.
fn delete(
    st: &mut Store,
    r: &Resource,
    ns: &str,
    name: &str,
    options: &Value,
) -> Result<(Value, bool), ApiError> {
    let key: Key = (r.storage, ns.to_owned(), name.to_owned());
    let old = st
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(r.named(), name))?;
    let pre = &options["preconditions"];
    for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
        if let Some(want) = pre[field].as_str() {
            let have = old["metadata"][field].as_str().unwrap_or_default();
            if want != have {
                return Err(ApiError::conflict_because(
                    r.named(),
                    name,
                    &format!("Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}"),
                ));
            }
        }
    }
    let has_finalizers = old["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if has_finalizers {
        if old["metadata"]["deletionTimestamp"].is_null() {
            let mut o = (*old).clone();
            o["metadata"]["deletionTimestamp"] = now_rfc3339().into();
            o["metadata"]["deletionGracePeriodSeconds"] = 0.into();
            let o = st.commit(key, Some(o)).expect("a write returns the object");
            return Ok(((*o).clone(), true));
        }
        return Ok(((*old).clone(), true));
    }
    if r.plural == "namespaces" && r.group.is_empty() {
        // The namespace controller empties a deleted namespace; here that is immediate.
        let inside: Vec<Key> = st
            .objects
            .keys()
            .filter(|k| !k.1.is_empty() && k.1 == name)
            .cloned()
            .collect();
        for k in inside {
            st.commit(k, None);
        }
    }
    st.commit(key, None);
    Ok(((*old).clone(), false))
}

// ---- list -------------------------------------------------------------------------------

/// What `continue` tokens carry: the version the list is read at and the last key returned.
/// Encoded like the real server's (base64 of a small JSON document); clients treat it as
/// opaque.
fn continue_token(rv: u64, last: &Key) -> String {
    let doc =
        json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{}/{}\u{0}", last.1, last.2)});
    meta::base64url_encode(doc.to_string().as_bytes())
}

fn parse_continue(token: &str) -> Result<(u64, String, String), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token}"));
    let bytes = meta::base64url_decode(token).ok_or_else(bad)?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = doc["rv"].as_u64().ok_or_else(bad)?;
    let start = doc["start"]
        .as_str()
        .ok_or_else(bad)?
        .trim_end_matches('\u{0}');
    let (ns, name) = start.split_once('/').ok_or_else(bad)?;
    Ok((rv, ns.to_owned(), name.to_owned()))
}

/// Label and field selectors of a request, checked as the server checks them.
struct Filter {
    ns: String,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn new(t: &Target, q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?;
        for f in fields.fields() {
            if f != "metadata.name" && f != "metadata.namespace" && !t.r.fields.contains(&f) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {f}"
                )));
            }
        }
        Ok(Self {
            ns: t.ns.clone(),
            labels,
            fields,
        })
    }

    fn matches(&self, r: &Resource, key: &Key, obj: &Value) -> bool {
        (self.ns.is_empty() || key.1 == self.ns)
            && self.labels.matches(&resources::labels(obj))
            && self.fields.matches(|f| r.field(obj, f))
    }
}

fn list_options_invalid(errs: Vec<FieldError>) -> ApiError {
    ApiError::invalid_kind(
        "ListOptions.meta.k8s.io",
        "meta.k8s.io",
        "ListOptions",
        "",
        &errs,
    )
}

fn list(st: &Store, t: &Target, q: &HashMap<String, String>) -> Result<Value, ApiError> {
    let r = t.r;
    let get = |k: &str| q.get(k).map_or("", String::as_str);
    let (rv, rv_match, cont) = (
        get("resourceVersion"),
        get("resourceVersionMatch"),
        get("continue"),
    );
    // ValidateListOptions for a list.
    let mut errs = Vec::new();
    if !rv_match.is_empty() {
        if rv.is_empty() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if !cont.is_empty() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if rv_match != "Exact" && rv_match != "NotOlderThan" {
            errs.push(FieldError::not_supported(
                "resourceVersionMatch",
                rv_match,
                &["Exact", "NotOlderThan", ""],
            ));
        }
        if rv_match == "Exact" && rv == "0" {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
    }
    if q.contains_key("sendInitialEvents") {
        errs.push(FieldError::forbidden(
            "sendInitialEvents",
            "sendInitialEvents is forbidden for list",
        ));
    }
    if !errs.is_empty() {
        return Err(list_options_invalid(errs));
    }
    let filter = Filter::new(t, q)?;
    let limit: usize = match get("limit") {
        "" => 0,
        l => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit: {l}")))?,
    };

    let (at, after) = if !cont.is_empty() {
        if !rv.is_empty() && rv != "0" {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let (at, ns, name) = parse_continue(cont)?;
        if at < st.compacted {
            let mut e = ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.");
            e.continue_token = Some(continue_token(st.rv, &(r.storage, ns, name)));
            return Err(e);
        }
        (at, Some((ns, name)))
    } else if rv.is_empty() || rv == "0" {
        (st.rv, None)
    } else {
        let n = parse_rv(rv)?;
        if n > st.rv {
            return Err(ApiError::too_large_rv(n, st.rv));
        }
        // With a limit and no match, a non-zero version means Exact (the paging rules).
        let exact = rv_match == "Exact" || (rv_match.is_empty() && limit > 0);
        if exact {
            if n < st.compacted {
                return Err(ApiError::expired(format!(
                    "too old resource version: {n} ({})",
                    st.compacted
                )));
            }
            (n, None)
        } else {
            (st.rv, None)
        }
    };

    let snapshot = st.snapshot(r.storage, at);
    let matching: Vec<(&Key, &Arc<Value>)> = snapshot
        .iter()
        .filter(|(k, o)| {
            after
                .as_ref()
                .is_none_or(|(ns, name)| (&k.1, &k.2) > (ns, name))
                && filter.matches(r, k, o)
        })
        .collect();
    let page = if limit > 0 && limit < matching.len() {
        &matching[..limit]
    } else {
        &matching[..]
    };
    let items: Vec<Value> = page.iter().map(|(_, o)| list_item(r, o)).collect();
    let mut meta = json!({"resourceVersion": at.to_string()});
    if page.len() < matching.len() {
        let last = page
            .last()
            .map(|(k, _)| (*k).clone())
            .expect("limit is at least 1");
        meta["continue"] = continue_token(at, &last).into();
        // The server only knows the count when no selector filters the rest.
        if q.get("labelSelector").is_none_or(String::is_empty)
            && q.get("fieldSelector").is_none_or(String::is_empty)
        {
            meta["remainingItemCount"] = (matching.len() - page.len()).into();
        }
    }
    Ok(json!({
        "kind": format!("{}List", r.kind),
        "apiVersion": r.api_version(),
        "metadata": meta,
        "items": items,
    }))
}

/// Items of a list carry no `apiVersion`/`kind`, as the server's lists.
fn list_item(r: &Resource, stored: &Value) -> Value {
    let mut v = r.present(stored);
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

// ---- watch ------------------------------------------------------------------------------

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(r: &Resource, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": meta}),
    )
}

/// The event a watcher with `filter` sees for `c`, as the server's watch cache decides: an
/// object entering the selection is ADDED, one leaving it (or deleted) DELETED with its last
/// state at the change's version.
fn watch_event(r: &Resource, filter: &Filter, c: &Change) -> Option<Bytes> {
    let cur = c.cur.as_ref().filter(|o| filter.matches(r, &c.key, o));
    let prev = c.prev.as_ref().filter(|o| filter.matches(r, &c.key, o));
    match (cur, prev) {
        (Some(o), None) => Some(event_line("ADDED", &r.present(o))),
        (Some(o), Some(_)) => Some(event_line("MODIFIED", &r.present(o))),
        (None, Some(p)) => {
            let mut o = r.present(p);
            o["metadata"]["resourceVersion"] = c.rv.to_string().into();
            Some(event_line("DELETED", &o))
        }
        (None, None) => None,
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    t: &Target,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let r = t.r;
    let get = |k: &str| q.get(k).map_or("", String::as_str);
    let rv = get("resourceVersion");
    let mut rv_match = get("resourceVersionMatch").to_owned();
    let mut send_initial = q
        .get("sendInitialEvents")
        .map(|_| flag(q, "sendInitialEvents"));
    // SetListOptionsDefaults with the WatchList feature on (the default since 1.32): a
    // watch from "" or "0" becomes a streaming list.
    if send_initial.is_none() && rv_match.is_empty() && (rv.is_empty() || rv == "0") {
        send_initial = Some(true);
        rv_match = "NotOlderThan".into();
    }
    let mut errs = Vec::new();
    if send_initial.is_some() && rv_match != "NotOlderThan" {
        errs.push(FieldError::forbidden(
            "resourceVersionMatch",
            "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    if !rv_match.is_empty() {
        if send_initial.is_none() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        if rv_match != "NotOlderThan" {
            errs.push(FieldError::not_supported(
                "resourceVersionMatch",
                rv_match.clone(),
                &["NotOlderThan"],
            ));
        }
        if !get("continue").is_empty() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
    }
    if !errs.is_empty() {
        return Err(list_options_invalid(errs));
    }
    let filter = Filter::new(t, q)?;
    let bookmarks = flag(q, "allowWatchBookmarks");
    let timeout = match get("timeoutSeconds") {
        "" => Duration::from_secs(1800),
        s => Duration::from_secs(
            s.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {s}")))?,
        ),
    };
    let asked = if rv.is_empty() || rv == "0" {
        None
    } else {
        Some(parse_rv(rv)?)
    };

    let (lines_tx, lines_rx) = mpsc::channel::<Bytes>(256);
    let (changes_tx, changes_rx) = mpsc::unbounded_channel();
    let mut first: Vec<Bytes> = Vec::new();
    let mut end_after_first = false;
    {
        let mut st = shared.store();
        match (send_initial, asked) {
            (_, Some(n)) if n > st.rv => {
                first.push(event_line(
                    "ERROR",
                    &ApiError::too_large_rv(n, st.rv).status(),
                ));
                end_after_first = true;
            }
            (Some(true), _) => {
                for (k, o) in st.objects.iter().filter(|(k, _)| k.0 == r.storage) {
                    if filter.matches(r, k, o) {
                        first.push(event_line("ADDED", &r.present(o)));
                    }
                }
                if bookmarks {
                    first.push(bookmark(r, st.rv, true));
                }
            }
            (Some(false), None) => {}
            (_, Some(n)) if n < st.compacted => {
                // The real server answers 200 and says so in the stream.
                first.push(event_line(
                    "ERROR",
                    &ApiError::expired(format!("too old resource version: {n} ({})", st.compacted))
                        .status(),
                ));
                end_after_first = true;
            }
            (_, Some(n)) => {
                for c in st.changes_since(r.storage, n) {
                    first.extend(watch_event(r, &filter, &c));
                }
            }
            (None, None) => unreachable!("defaulted to sendInitialEvents above"),
        }
        if !end_after_first {
            st.watchers.push(Watcher {
                storage: r.storage,
                tx: changes_tx,
            });
        }
    }

    let shared2 = Arc::clone(shared);
    let every = *shared.bookmark_every.lock().unwrap();
    let mut cut = shared.cut_watches.subscribe();
    let r: &'static Resource = t.r;
    tokio::spawn(async move {
        for line in first {
            if lines_tx.send(line).await.is_err() {
                return;
            }
        }
        if end_after_first {
            return;
        }
        let mut changes_rx = changes_rx;
        let deadline = Instant::now() + timeout;
        // Like the server's watch cache: a bookmark every `every`, and one 2s before the
        // deadline so the client resumes from as late a version as possible.
        let next_bookmark = |now: Instant| {
            let beat = now + every;
            let pre = deadline.checked_sub(Duration::from_secs(2)).unwrap_or(now);
            if pre > now && pre < beat {
                pre
            } else {
                beat
            }
        };
        let mut bookmark_at = next_bookmark(Instant::now());
        loop {
            tokio::select! {
                c = changes_rx.recv() => match c {
                    Some(c) => {
                        if let Some(line) = watch_event(r, &filter, &c) {
                            if lines_tx.send(line).await.is_err() {
                                return;
                            }
                        }
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(bookmark_at), if bookmarks => {
                    // Everything up to the current version must go out before a bookmark
                    // that claims it: drain what is queued while writes are held off.
                    let (pending, rv) = {
                        let st = shared2.store();
                        let mut pending = Vec::new();
                        while let Ok(c) = changes_rx.try_recv() {
                            pending.push(c);
                        }
                        (pending, st.rv)
                    };
                    for c in pending {
                        if let Some(line) = watch_event(r, &filter, &c) {
                            if lines_tx.send(line).await.is_err() {
                                return;
                            }
                        }
                    }
                    if lines_tx.send(bookmark(r, rv, false)).await.is_err() {
                        return;
                    }
                    bookmark_at = next_bookmark(Instant::now());
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = cut.changed() => return,
                _ = lines_tx.closed() => return,
            }
        }
    });

    let stream = futures_util::stream::unfold(lines_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(resp)
}
