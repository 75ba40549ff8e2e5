//! The public HTTP API on the head node: OpenAI-compatible routes proxied to rank 0's engine
//! server, cluster status, and health probes.
//!
//! The proxy never buffers a response: bytes are forwarded as the engine produces them, so SSE
//! streams reach the client token by token, and dropping the client's connection drops the
//! upstream one (which makes the engine cancel the generation). While the ring is not serving,
//! or when it fails under a request, clients get a 503 with Retry-After instead of a hang.
//!
//! Before a request is proxied, the gateway reads its body within a size and a time limit and
//! checks it ([`gateway::request`]): a request the engine would refuse late, or misread, is
//! refused here with an OpenAI-style error. Requests read only the few fields of the view they
//! need: cloning the whole view (every node's facts) on each request cost more than the proxying.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::uri::PathAndQuery;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use http_body::Frame;
use http_body_util::{BodyDataStream, Full};
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::compat::{Rewrite, SseFramer};
use super::events::{self, Events};
use super::gateway::request::{self, Endpoint, Refusal, Rules};
use super::gateway::{self, Gateway};
use super::metrics;
use super::progress::{Activity, Work};
use super::state::Phase;
use super::upstream::{engine_connections, Upstream};
use super::ClusterView;
use crate::config::{Config, EngineKind};
use crate::server::{self, ConnLimits, Server, Signals};

/// What every request shares. axum clones the state for each request: one `Arc`, where a
/// struct of eight handles (each a reference count, the cancellation token's a mutex) showed
/// in the proxy's profile.
#[derive(Clone)]
struct ApiState(Arc<Shared>);

impl std::ops::Deref for ApiState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

struct Shared {
    view: watch::Receiver<ClusterView>,
    upstream: Upstream,
    /// Cancelled when the server's drain grace is over: responses still streaming end then.
    ending: Arc<CancellationToken>,
    activity: Activity,
    // --- gateway checks (gateway/request.rs) ---
    checks: Arc<Checks>,
    /// Keys, limits, admission: `/readyz` says why it is not ready only to a client with a key.
    gateway: Gateway,
    /// The model names rank 0's engine reports, fetched once per ring generation.
    engine_names: Arc<Mutex<Option<EngineNames>>>,
}

/// A ring generation and the model names its engine reports.
type EngineNames = (u64, Arc<[String]>);

/// What the API checks requests against, and how long their bodies may take to arrive.
#[derive(Debug, Clone, PartialEq)]
pub struct Checks {
    pub rules: Rules,
    pub body_timeout: Duration,
}

impl Checks {
    pub fn from_config(c: &Config) -> Checks {
        Checks {
            rules: Rules {
                model: c.model().name.clone(),
                ctx_size: c.model().ctx_size,
                max_body_bytes: c.api.max_body_bytes,
            },
            body_timeout: Duration::from_secs(c.api.body_timeout_s),
        }
    }
}

/// The public API's connection limits (`[api]`).
pub fn conn_limits(c: &Config) -> ConnLimits {
    ConnLimits {
        header_timeout: Duration::from_secs(c.api.header_timeout_s),
        idle_timeout: Duration::from_secs(c.api.idle_timeout_s),
        max_connections: c.api.max_connections,
        max_per_client: c.api.max_connections_per_client,
    }
}

/// The API's routes. `signals.ending` ends responses still streaming at shutdown.
pub fn router(
    view: watch::Receiver<ClusterView>,
    upstream: Upstream,
    gateway: Gateway,
    signals: &Signals,
    activity: Activity,
    checks: Checks,
    events: Events,
) -> anyhow::Result<Router> {
    let ending = Arc::new(signals.ending.clone());
    let state = ApiState(Arc::new(Shared {
        view,
        upstream,
        ending: ending.clone(),
        activity,
        checks: Arc::new(checks),
        gateway: gateway.clone(),
        engine_names: Arc::default(),
    }));
    let usage = gateway.clone();
    // The gateway (keys, limits, fair admission, usage) guards everything but the probes.
    let protected = Router::new()
        .route("/v1/chat/completions", post(proxy))
        .route("/v1/completions", post(proxy))
        .route("/v1/models", get(proxy))
        .route("/api/v1/cluster", get(cluster))
        .route(
            "/api/v1/events",
            events::route(events, signals.stopping.clone()),
        )
        .route("/metrics", get(prometheus))
        .route(
            "/api/v1/usage",
            get(move || async move { Json(usage.usage_report()) }),
        )
        .layer(middleware::from_fn_with_state(
            gateway.clone(),
            gateway::guard,
        ))
        .layer(middleware::from_fn_with_state(gateway, metrics::track));
    Ok(Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        // The page holds no data: outside the gateway (no key, no admission).
        .merge(super::dashboard::routes())
        .merge(protected)
        .fallback(|| async {
            openai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "No such route on this llm-cluster endpoint.",
            )
        })
        // The gateway ends queue waits with it (a request extension: the gateway is built
        // before the server that owns the signal).
        .layer(axum::Extension(ending))
        .with_state(state))
}

/// Listens (on the socket systemd kept across a restart, if any) and serves the API until
/// [`Server::shutdown`].
pub async fn serve(
    addr: SocketAddr,
    view: watch::Receiver<ClusterView>,
    upstream_port: u16,
    gateway: Gateway,
    activity: Activity,
    events: Events,
    config: &Config,
) -> anyhow::Result<Server> {
    let listening = server::listen(addr, "the API (api.listen)", "api").await?;
    tracing::info!(%addr, "API listening");
    let signals = Signals::default();
    let upstream = Upstream::new(upstream_port, engine_connections(config.model().slots))?;
    let app = router(
        view.clone(),
        upstream,
        gateway,
        &signals,
        activity,
        Checks::from_config(config),
        events,
    )?;
    // A socket handed back means the previous agent was serving and its clients are queued:
    // they wait (in the backlog) for this coordinator to adopt the ring rather than get 503s.
    let open = async move {
        if listening.handed_back {
            adopted(view).await;
        }
    };
    Ok(server::spawn_after(
        listening.listener,
        app,
        signals,
        "API",
        conn_limits(config),
        open,
    ))
}

/// The longest clients queued across an agent restart wait for the ring to be adopted.
const ADOPT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Resolves once a fresh coordinator serves, or shows it will not simply adopt a running ring
/// (it starts one, refuses, ...), or after [`ADOPT_WAIT`]: then the API answers, 503s included.
async fn adopted(mut view: watch::Receiver<ClusterView>) {
    let decided = |v: &ClusterView| {
        v.serving() || !matches!(v.phase, Phase::WaitingForNodes | Phase::WaitingReady)
    };
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(ADOPT_WAIT, view.wait_for(decided)).await {
        Ok(_) => tracing::info!(
            waited_s = started.elapsed().as_secs_f64(),
            "API accepting: the coordinator has taken over"
        ),
        Err(_) => tracing::warn!(
            waited_s = started.elapsed().as_secs_f64(),
            "API accepting before the ring is adopted; clients get 503 until it is"
        ),
    }
}

pub(crate) fn openai_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let body =
        json!({ "error": { "message": message, "type": kind, "param": null, "code": code } });
    (status, Json(body)).into_response()
}

fn unavailable(view: &ClusterView, message: String) -> Response {
    let r = openai_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "ring_unavailable",
        &message,
    );
    with_retry_after(r, view)
}

/// Tells the client when to come back (RFC 9110 Retry-After, in seconds).
fn with_retry_after(mut r: Response, view: &ClusterView) -> Response {
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(view.retry_after_s()));
    r
}

fn not_serving_message(view: &ClusterView) -> String {
    format!(
        "The cluster is not serving right now ({}{}). Retry shortly.",
        view.phase.as_str(),
        view.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    )
}

/// Ready or not, for anyone; why not (which may name internal addresses) only for a client
/// with an API key, when keys are configured. Without keys the whole story is at the open
/// `/api/v1/cluster`.
async fn readyz(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    let with_reason = s.gateway.knows_key(&headers);
    let (serving, retry_after, mut body) = {
        let v = s.view.borrow();
        let body = json!({ "ready": v.serving(), "phase": v.phase, "generation": v.generation });
        (v.serving(), v.retry_after_s(), (body, v.reason.clone()))
    };
    if with_reason {
        body.0["reason"] = json!(body.1);
    }
    let mut r = (
        if serving {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(body.0),
    )
        .into_response();
    if !serving {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    }
    r
}

async fn prometheus(State(s): State<ApiState>) -> Response {
    let view = s.view.borrow().clone();
    metrics::scrape(&s.gateway, &view, &s.upstream).await
}

async fn cluster(State(s): State<ApiState>) -> Json<ClusterView> {
    let models = model_states(&s);
    let mut view = s.view.borrow().clone();
    view.models = models;
    Json(view)
}

/// Resolves when the ring that was serving `generation` is no longer serving, or when the
/// server's drain grace is over: either way this response cannot go on.
fn ring_lost(
    mut view: watch::Receiver<ClusterView>,
    generation: u64,
    ending: Arc<CancellationToken>,
) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        tokio::select! {
            _ = view.wait_for(|v| v.generation != generation || !v.serving()) => {}
            _ = ending.cancelled() => {}
        }
    })
}

/// What a request needs of the view, read under the borrow instead of cloning the view.
struct Gate {
    serving: bool,
    generation: u64,
    engine: EngineKind,
}

impl Gate {
    fn read(view: &watch::Receiver<ClusterView>) -> Gate {
        let v = view.borrow();
        Gate {
            serving: v.serving(),
            generation: v.generation,
            engine: v.engine,
        }
    }
}

/// The 503 for a ring that is not serving, from the view as it is now.
fn not_serving(view: &watch::Receiver<ClusterView>) -> Response {
    let v = view.borrow().clone();
    unavailable(&v, not_serving_message(&v))
}

// --- gateway checks (gateway/request.rs) -------------------------------------------------

/// The error response for a refusal. `close`: the body was not read to its end, so the
/// connection cannot carry another request.
fn refusal(r: &Refusal, close: bool) -> Response {
    let mut resp = (r.status, Json(r.body())).into_response();
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Reads a request body whole, within the size limit and by the deadline.
pub(crate) async fn read_body(
    checks: &Checks,
    headers: &HeaderMap,
    body: Body,
    deadline: tokio::time::Instant,
) -> Result<Bytes, Response> {
    let rules = &checks.rules;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if let Err(r) = request::check_length(declared, rules) {
        drain(stream, headers, deadline);
        return Err(refusal(&r, true));
    }
    let limit = rules.max_body_bytes;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0u64;
    loop {
        let next = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(next) => next,
            Err(_) => {
                let r = request::body_timed_out(checks.body_timeout.as_secs());
                return Err(refusal(&r, true));
            }
        };
        match next {
            None => break,
            Some(Ok(chunk)) => {
                len += chunk.len() as u64;
                if len > limit {
                    drop(chunks);
                    drain(stream, headers, deadline);
                    return Err(refusal(&request::too_large(declared, rules), true));
                }
                chunks.push(chunk);
            }
            Some(Err(e)) => {
                return Err(openai_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "bad_body",
                    &format!("cannot read the request body: {e}"),
                ))
            }
        }
    }
    // Mostly one chunk: no copy then.
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.remove(0),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Reads and discards the rest of a refused body until the deadline, so the client, which
/// sends its body before it reads the answer, gets the answer instead of a connection reset
/// (closing with unread bytes resets the connection). Nothing is kept. A client that waits for
/// `100 Continue` before sending is never sent one, so there is nothing to drain.
fn drain(
    mut stream: axum::body::BodyDataStream,
    headers: &HeaderMap,
    deadline: tokio::time::Instant,
) {
    let waits_to_send = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if waits_to_send {
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout_at(deadline, async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    });
}

/// Whether `requested` is the model served: its configured name, or a name the engine reports.
async fn model_served(s: &ApiState, requested: &str, generation: u64) -> Result<(), Refusal> {
    let rules = &s.checks.rules;
    // Any configured model or alias: the gateway let the request through only once it serves.
    if requested == rules.model || s.gateway.gate().find(requested).is_some() {
        return Ok(());
    }
    request::check_model(requested, rules, &engine_names(s, generation).await)
}

/// Every configured model's state ([`ClusterView::model_states`]).
fn model_states(s: &ApiState) -> Vec<super::view::ModelState> {
    let gate = s.gateway.gate();
    let names: Vec<&[String]> = (0..gate.len()).map(|i| gate.names(i)).collect();
    s.view.borrow().model_states(&names, &gate.snapshot())
}

/// `/v1/models`: every configured model, OpenAI's fields first, and in `llm_cluster` (which
/// OpenAI clients ignore) its state (see [`super::view::ModelState`]).
fn model_listing(s: &ApiState) -> serde_json::Value {
    let data: Vec<serde_json::Value> = model_states(s)
        .into_iter()
        .map(|m| {
            json!({
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "llm-cluster",
                "llm_cluster": {
                    "state": m.state,
                    "aliases": m.aliases,
                    "missing_on": m.missing_on,
                    "transfers": m.transfers,
                },
            })
        })
        .collect();
    json!({ "object": "list", "data": data })
}

/// The names rank 0's engine reports in `/v1/models`, fetched once per generation (only
/// requests naming another model than the configured one ask).
async fn engine_names(s: &ApiState, generation: u64) -> Arc<[String]> {
    let cached = s
        .engine_names
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some((g, names)) = cached {
        if g == generation {
            return names;
        }
    }
    match s
        .upstream
        .get_json("/v1/models", Duration::from_secs(2))
        .await
    {
        Ok(v) => {
            let names: Arc<[String]> = request::engine_model_names(&v).into();
            *s.engine_names.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((generation, names.clone()));
            names
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read the engine's model names; only the configured name is known");
            Arc::from(Vec::new())
        }
    }
}

// --- end of gateway checks ----------------------------------------------------------------

async fn proxy(State(s): State<ApiState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let deadline = tokio::time::Instant::now() + s.checks.body_timeout;
    let (body, checked) = match (parts.method == Method::GET, Endpoint::of(path)) {
        (true, _) | (false, None) => (Bytes::new(), None),
        (false, Some(endpoint)) => {
            let body = match read_body(&s.checks, &parts.headers, body, deadline).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match request::check_body(endpoint, &body, &s.checks.rules) {
                Ok(c) => (body, Some(c)),
                Err(r) => return refusal(&r, false),
            }
        }
    };
    if parts.method == Method::GET && path.split('?').next() == Some("/v1/models") {
        return Json(model_listing(&s)).into_response();
    }
    let gate = Gate::read(&s.view);
    if !gate.serving {
        return not_serving(&s.view);
    }
    if let Some(model) = checked.as_ref().and_then(|c| c.model.as_deref()) {
        if let Err(r) = model_served(&s, model, gate.generation).await {
            return refusal(&r, false);
        }
    }
    // In flight until the response ends or the client goes: what the stall check watches.
    let work = s.activity.begin();
    let mut upstream = axum::http::Request::new(Full::new(body));
    *upstream.method_mut() = parts.method;
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *upstream.uri_mut() = s.upstream.uri(path_and_query);
    for h in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&h) {
            upstream.headers_mut().insert(h, v.clone());
        }
    }
    let mut lost = ring_lost(s.view.clone(), gate.generation, s.ending.clone());
    let resp = tokio::select! {
        r = s.upstream.send(upstream) => r,
        _ = &mut lost => {
            let v = s.view.borrow().clone();
            return unavailable(&v, "The ring failed while this request was waiting; it is being restarted. Retry shortly.".into());
        }
    };
    let (resp, connection) = match resp {
        Ok(r) => r,
        Err(e) => {
            let v = s.view.borrow().clone();
            tracing::warn!(error = %format!("{e:#}"), "rank 0 did not answer a proxied request");
            return unavailable(
                &v,
                "Rank 0's engine did not answer; the ring is being checked. Retry shortly.".into(),
            );
        }
    };
    let (up, incoming) = resp.into_parts();
    let mut headers = HeaderMap::new();
    for h in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = up.headers.get(&h) {
            headers.insert(h, v.clone());
        }
    }
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse {
        // Proxies between here and the client must not buffer the stream either.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    let path = parts.uri.path();
    let body = match Rewrite::for_request(gate.engine, path, || s.gateway.gate().loaded_name()) {
        None => Body::new(Passed {
            upstream: incoming,
            lost,
            sse,
            done: false,
            work,
            _connection: connection,
        }),
        Some(rw) => Body::from_stream(rewritten(
            BodyDataStream::new(incoming),
            lost,
            sse,
            rw,
            (work, connection),
        )),
    };
    let mut out = Response::new(body);
    *out.status_mut() = up.status;
    *out.headers_mut() = headers;
    out
}

/// The event that ends an SSE stream the ring cut short: clients fail instead of waiting.
fn error_event() -> Bytes {
    let e = json!({ "error": { "message": "The ring failed during this response; it is being restarted. Retry shortly.", "type": "server_error", "param": null, "code": "ring_unavailable" } });
    Bytes::from(format!("data: {e}\n\n"))
}

/// An upstream body passed on frame by frame as it arrives, its size (and so the client's
/// `Content-Length`) as the engine declared it, until the upstream ends or the ring is lost.
/// Cut short, an SSE stream ends with [`error_event`], any other body with a transport error.
struct Passed {
    upstream: Incoming,
    lost: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    sse: bool,
    done: bool,
    /// Dropped with the body: the request is then no longer in flight.
    work: Work,
    /// The engine's connection this body comes on.
    _connection: OwnedSemaphorePermit,
}

impl Passed {
    fn cut(&mut self, why: &str) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.done = true;
        tracing::warn!(error = why, "response cut short");
        if self.sse {
            return Poll::Ready(Some(Ok(Frame::data(error_event()))));
        }
        Poll::Ready(Some(Err(std::io::Error::other(why.to_string()))))
    }
}

impl http_body::Body for Passed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.upstream).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.work.progressed();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return this.cut(&e.to_string()),
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if this.lost.as_mut().poll(cx).is_ready() {
            return this.cut("ring lost");
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.upstream.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.upstream.size_hint()
    }
}

/// As [`Passed`], for an engine whose answers are rewritten ([`Rewrite`]): SSE events are
/// re-framed and rewritten one by one (still streamed), other bodies whole once they end.
fn rewritten(
    upstream: impl Stream<Item = Result<Bytes, hyper::Error>> + Send + 'static,
    lost: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    sse: bool,
    rw: Rewrite,
    (work, connection): (Work, OwnedSemaphorePermit),
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    struct St<S> {
        upstream: Pin<Box<S>>,
        lost: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        done: bool,
        rw: Rewrite,
        framer: SseFramer,
        whole: Vec<u8>,
        /// Dropped with the stream: the request is then no longer in flight.
        work: Work,
        /// The engine's connection the stream comes on.
        _connection: OwnedSemaphorePermit,
    }
    let st = St {
        upstream: Box::pin(upstream),
        lost,
        done: false,
        rw,
        framer: SseFramer::default(),
        whole: Vec::new(),
        work,
        _connection: connection,
    };
    futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let next = tokio::select! {
                biased;
                item = st.upstream.next() => item.map(|r| r.map_err(|e| e.to_string())),
                _ = &mut st.lost => Some(Err("ring lost".to_string())),
            };
            if let Some(Ok(_)) = &next {
                st.work.progressed();
            }
            match next {
                Some(Ok(chunk)) if sse => {
                    let events = st.framer.push(&chunk);
                    if events.is_empty() {
                        continue;
                    }
                    let out: String = events
                        .iter()
                        .map(|e| format!("{}\n\n", st.rw.event(e)))
                        .collect();
                    return Some((Ok(Bytes::from(out)), st));
                }
                Some(Ok(chunk)) => st.whole.extend_from_slice(&chunk),
                None => {
                    st.done = true;
                    let out = if sse {
                        st.framer
                            .finish()
                            .map(|e| format!("{}\n\n", st.rw.event(&e)).into_bytes())
                            .unwrap_or_default()
                    } else {
                        st.rw.body(&st.whole)
                    };
                    if out.is_empty() {
                        return None;
                    }
                    return Some((Ok(Bytes::from(out)), st));
                }
                Some(Err(e)) => {
                    st.done = true;
                    tracing::warn!(error = %e, "response cut short");
                    if sse {
                        return Some((Ok(error_event()), st));
                    }
                    return Some((Err(std::io::Error::other(e)), st));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tower::ServiceExt;

    fn view(phase: Phase) -> ClusterView {
        let text = "[cluster]\nname=\"t\"\nengine=\"llama-rpc\"\n[model]\npath=\"/m.gguf\"\n[[node]]\nrank=0\naddress=\"127.0.0.1\"\n";
        let c = Config::parse(text, std::path::Path::new("t")).expect("config");
        let mut v = ClusterView::initial(&c);
        v.phase = phase;
        v.reason = Some("rank 1 exited with status 1".into());
        v
    }

    fn checks() -> Checks {
        Checks {
            rules: Rules {
                model: "m".into(),
                ctx_size: 1024,
                max_body_bytes: Rules::default_max_body(1024),
            },
            body_timeout: Duration::from_secs(30),
        }
    }

    fn app(rx: watch::Receiver<ClusterView>, keys: Option<&str>) -> Router {
        // Port 1 on loopback refuses connections: no engine.
        app_to(rx, keys, Upstream::new(1, 4).expect("upstream"))
    }

    fn app_to(rx: watch::Receiver<ClusterView>, keys: Option<&str>, up: Upstream) -> Router {
        let settings = gateway::Settings {
            max_in_flight: 4,
            queue_size: 8,
            queue_timeout: Duration::from_secs(5),
            global: Default::default(),
            models: vec!["m".into()],
            keys_file: None,
            checks: Arc::new(checks()),
            gate: crate::coordinator::switch::ModelGate::for_names(vec![vec!["m".into()]], 0, 8),
        };
        let keys = keys
            .map(|k| gateway::keys::parse(k, std::path::Path::new("keys"), &["m"]).expect("keys"));
        router(
            rx,
            up,
            Gateway::new(settings, keys),
            &Signals::default(),
            Activity::default(),
            checks(),
            Events::default(),
        )
        .expect("router")
    }

    const CHAT: &str = r#"{"messages": [{"role": "user", "content": "Hi"}]}"#;

    async fn call(
        app: Router,
        path: &str,
        key: Option<&str>,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let body = if path.starts_with("/v1/chat") {
            Some(Body::from(CHAT))
        } else {
            None
        };
        send(app, path, key, body, &[]).await
    }

    /// POSTs `body` when there is one, else GETs.
    async fn send(
        app: Router,
        path: &str,
        key: Option<&str>,
        body: Option<Body>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut req = axum::http::Request::builder()
            .method(if body.is_some() { "POST" } else { "GET" })
            .uri(path);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .oneshot(req.body(body.unwrap_or_default()).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn not_serving_means_503_with_retry_after_and_an_openai_error() {
        let (_tx, rx) = watch::channel(view(Phase::BackingOff));
        let app = app(rx, None);
        let (status, headers, body) = call(app.clone(), "/v1/chat/completions", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("5")
        );
        assert_eq!(body["error"]["code"], "ring_unavailable");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("rank 1 exited"),
            "{body}"
        );
        let (status, _, body) = call(app.clone(), "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["phase"], "backing_off");
        let (status, _, _) = call(app, "/healthz", None).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn api_keys_guard_the_api_but_not_the_probes() {
        let (_tx, rx) = watch::channel(view(Phase::Serving));
        let app = app(rx, Some("sk-good\n"));
        let (status, _, body) = call(app.clone(), "/v1/models", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "invalid_api_key");
        let (status, _, _) = call(app.clone(), "/api/v1/cluster", Some("sk-bad")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, body) = call(app.clone(), "/api/v1/cluster", Some("sk-good")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["phase"], "serving");
        for path in ["/api/v1/events", "/api/v1/events?follow=false", "/metrics"] {
            let (status, _, _) = call(app.clone(), path, None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        }
        let (status, _, body) =
            call(app.clone(), "/api/v1/events?follow=false", Some("sk-good")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["events"], serde_json::json!([]));
        let (status, headers, _) = call(app.clone(), "/metrics", Some("sk-good")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], metrics::CONTENT_TYPE);
        let (status, _, _) = call(app, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK);
    }

    /// The dashboard holds no data: served without a key, and not counted as a request.
    #[tokio::test]
    async fn the_dashboard_needs_no_key_and_is_not_counted() {
        let (_tx, rx) = watch::channel(view(Phase::Serving));
        let app = app(rx, Some("sk-good\n"));
        let (status, headers, _) = call(app.clone(), "/", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.contains_key("content-security-policy"));
        let (_, _, usage) = call(app, "/api/v1/usage", Some("sk-good")).await;
        assert_eq!(usage["keys"], json!({}), "{usage}");
    }

    #[tokio::test(start_paused = true)]
    async fn queued_clients_wait_for_an_adoption_but_not_for_a_new_ring() {
        async fn waiting(tx: &watch::Sender<ClusterView>) -> tokio::task::JoinHandle<()> {
            let wait = tokio::spawn(adopted(tx.subscribe()));
            tokio::task::yield_now().await;
            wait
        }
        // Adopting: nodes checked, then waiting for rank 0, then serving.
        let (tx, _rx) = watch::channel(view(Phase::WaitingForNodes));
        let wait = waiting(&tx).await;
        tx.send_modify(|v| v.phase = Phase::WaitingReady);
        tokio::task::yield_now().await;
        assert!(
            !wait.is_finished(),
            "must wait while the ring is being adopted"
        );
        tx.send_modify(|v| v.phase = Phase::Serving);
        wait.await.expect("adopted");
        // A coordinator that starts a ring of its own will not serve soon: no wait.
        let (tx, _rx) = watch::channel(view(Phase::WaitingForNodes));
        let wait = waiting(&tx).await;
        tx.send_modify(|v| v.phase = Phase::Starting);
        wait.await.expect("decided");
        // Nothing happens: the wait is bounded.
        let (tx, _rx) = watch::channel(view(Phase::WaitingForNodes));
        let started = tokio::time::Instant::now();
        waiting(&tx).await.await.expect("bounded");
        assert_eq!(started.elapsed(), ADOPT_WAIT);
    }

    const MODELS: &str = r#"{"object":"list","data":[]}"#;

    /// A narrow stand-in for rank 0's server on a loopback port: `POST /v1/completions`
    /// answers [`MODELS`] (any JSON will do) after a pause; returns the port and the most requests it held at once.
    async fn stub_engine() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let seen = most.clone();
        let models = move || {
            let (now, most) = (now.clone(), most.clone());
            async move {
                most.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                now.fetch_sub(1, SeqCst);
                ([(header::CONTENT_TYPE, "application/json")], MODELS)
            }
        };
        let engine = Router::new().route("/v1/completions", post(models));
        tokio::spawn(async move { axum::serve(listener, engine).await });
        (port, seen)
    }

    #[tokio::test]
    async fn a_response_passes_with_its_length_and_the_engines_connections_are_bounded() {
        let (port, most) = stub_engine().await;
        let (_tx, rx) = watch::channel(view(Phase::Serving));
        let app = app_to(rx, None, Upstream::new(port, 2).expect("upstream"));
        // `/v1/models` is the coordinator's own answer: a completion is what reaches the engine.
        let get = || {
            axum::http::Request::post("/v1/completions")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"model":"m","prompt":"hi","max_tokens":1}"#))
                .expect("request")
        };
        // Passed through, not re-chunked: the client gets the engine's Content-Length.
        let resp = app.clone().oneshot(get()).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            http_body::Body::size_hint(resp.body()).exact(),
            Some(MODELS.len() as u64)
        );
        // An unread response holds its connection.
        drop(resp);
        // Six clients at once reach the engine over at most two connections at a time (each
        // in use until its response's body is read).
        let calls = (0..6).map(|_| {
            let app = app.clone();
            async move {
                let resp = app.oneshot(get()).await.expect("response");
                assert_eq!(resp.status(), StatusCode::OK);
                axum::body::to_bytes(resp.into_body(), 1 << 16)
                    .await
                    .expect("body")
            }
        });
        let bodies = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::future::join_all(calls),
        )
        .await
        .expect("every client answered");
        assert!(bodies.iter().all(|b| b == MODELS.as_bytes()));
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_rank_0_is_a_503_not_a_hang() {
        // Port 1 on loopback refuses connections: the engine is gone under a serving view.
        let (_tx, rx) = watch::channel(view(Phase::Serving));
        let app = app(rx, None);
        let (status, headers, body) = call(app, "/v1/chat/completions", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key("retry-after"));
        assert_eq!(body["error"]["type"], "server_error");
    }

    #[tokio::test]
    async fn readyz_says_why_only_to_a_client_with_a_key() {
        let (_tx, rx) = watch::channel(view(Phase::BackingOff));
        let (status, headers, body) = call(app(rx.clone(), None), "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key("retry-after"));
        assert_eq!(body["ready"], false);
        assert_eq!(body["phase"], "backing_off");
        assert!(body.get("reason").is_none(), "{body}");
        let keyed = app(rx, Some("sk-good\n"));
        let (_, _, body) = call(keyed.clone(), "/readyz", Some("sk-bad")).await;
        assert!(body.get("reason").is_none(), "{body}");
        let (_, _, body) = call(keyed, "/readyz", Some("sk-good")).await;
        assert_eq!(body["reason"], "rank 1 exited with status 1");
    }

    /// Rank 0 is unreachable (port 1) under a serving view: whatever is not a 503 was answered
    /// by the gateway before the engine was asked.
    #[tokio::test]
    async fn bad_requests_are_refused_before_the_engine_is_asked() {
        let (_tx, rx) = watch::channel(view(Phase::Serving));
        let post = |body: &'static str| Some(Body::from(body));
        let chat = "/v1/chat/completions";
        let (status, _, body) = send(
            app(rx.clone(), None),
            chat,
            None,
            post("{\"messages\": ["),
            &[],
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_json"))
        );
        let wrong = r#"{"model": "gpt-5", "messages": []}"#;
        let (status, _, body) = send(app(rx.clone(), None), chat, None, post(wrong), &[]).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("model_not_found"))
        );
        let budget = r#"{"model": "m", "messages": [], "max_tokens": 5000}"#;
        let (status, _, body) = send(app(rx.clone(), None), chat, None, post(budget), &[]).await;
        assert_eq!(
            (status, body["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some("max_tokens"))
        );
        // Too large by its declared length: refused without reading it.
        let (status, headers, body) = send(
            app(rx.clone(), None),
            chat,
            None,
            post(CHAT),
            &[("content-length", "33554432")],
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("request_too_large"))
        );
        assert_eq!(
            headers.get("connection").and_then(|v| v.to_str().ok()),
            Some("close")
        );
        // Too large as it arrives (no length declared).
        let chunks = futures_util::stream::iter(
            (0..3).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 512 * 1024]))),
        );
        let (status, _, _) = send(
            app(rx.clone(), None),
            chat,
            None,
            Some(Body::from_stream(chunks)),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        // The configured name and no name at all pass the gateway (and find no engine).
        let named = r#"{"model": "m", "messages": []}"#;
        let (status, _, _) = send(app(rx.clone(), None), chat, None, post(named), &[]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _, _) = send(app(rx, None), chat, None, post(CHAT), &[]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_a_408() {
        let (_tx, rx) = watch::channel(view(Phase::Serving));
        let stalled = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(Bytes::from_static(b"{\"messages\""))
        })
        .chain(futures_util::stream::pending());
        let started = tokio::time::Instant::now();
        let (status, _, body) = send(
            app(rx, None),
            "/v1/chat/completions",
            None,
            Some(Body::from_stream(stalled)),
            &[],
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::REQUEST_TIMEOUT, Some("request_timeout"))
        );
        assert_eq!(started.elapsed(), checks().body_timeout);
    }
}
