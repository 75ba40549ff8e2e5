//! The public HTTP API on the head node: OpenAI-compatible routes proxied to rank 0's engine
//! server, cluster status, and health probes.
//!
//! The proxy never buffers a response: bytes are forwarded as the engine produces them, so SSE
//! streams reach the client token by token, and dropping the client's connection drops the
//! upstream one (which makes the engine cancel the generation). While the ring is not serving,
//! or when it fails under a request, clients get a 503 with Retry-After instead of a hang.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::compat::{Rewrite, SseFramer};
use super::gateway::{self, Gateway};
use super::progress::{Activity, Work};
use super::state::Phase;
use super::ClusterView;
use crate::server::{self, Server, Signals};

/// Largest request body accepted (a long prompt is far smaller).
pub(crate) const MAX_BODY: usize = 32 * 1024 * 1024;

#[derive(Clone)]
struct ApiState {
    view: watch::Receiver<ClusterView>,
    http: reqwest::Client,
    upstream: Arc<str>,
    /// Cancelled when the server's drain grace is over: responses still streaming end then.
    ending: CancellationToken,
    activity: Activity,
}

/// The API's routes. `signals.ending` ends responses still streaming at shutdown.
pub fn router(
    view: watch::Receiver<ClusterView>,
    upstream_port: u16,
    gateway: Gateway,
    signals: &Signals,
    activity: Activity,
) -> anyhow::Result<Router> {
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()?;
    let state = ApiState {
        view,
        http,
        upstream: format!("http://127.0.0.1:{upstream_port}").into(),
        ending: signals.ending.clone(),
        activity,
    };
    let usage = gateway.clone();
    // The gateway (keys, limits, fair admission, usage) guards everything but the probes.
    let protected = Router::new()
        .route("/v1/chat/completions", post(proxy))
        .route("/v1/completions", post(proxy))
        .route("/v1/models", get(proxy))
        .route("/api/v1/cluster", get(cluster))
        .route(
            "/api/v1/usage",
            get(move || async move { Json(usage.usage_report()) }),
        )
        .layer(middleware::from_fn_with_state(gateway, gateway::guard));
    Ok(Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
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
        .layer(axum::Extension(signals.ending.clone()))
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
) -> anyhow::Result<Server> {
    let listening = server::listen(addr, "the API (api.listen)", "api").await?;
    tracing::info!(%addr, "API listening");
    let signals = Signals::default();
    let app = router(view.clone(), upstream_port, gateway, &signals, activity)?;
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

async fn readyz(State(s): State<ApiState>) -> Response {
    let v = s.view.borrow().clone();
    let body = json!({ "phase": v.phase, "generation": v.generation, "reason": v.reason });
    if v.serving() {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        with_retry_after(
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response(),
            &v,
        )
    }
}

async fn cluster(State(s): State<ApiState>) -> Json<ClusterView> {
    Json(s.view.borrow().clone())
}

/// Resolves when the ring that was serving `generation` is no longer serving, or when the
/// server's drain grace is over: either way this response cannot go on.
fn ring_lost(
    mut view: watch::Receiver<ClusterView>,
    generation: u64,
    ending: CancellationToken,
) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        tokio::select! {
            _ = view.wait_for(|v| v.generation != generation || !v.serving()) => {}
            _ = ending.cancelled_owned() => {}
        }
    })
}

async fn proxy(State(s): State<ApiState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_body",
                &format!("cannot read the request body: {e}"),
            )
        }
    };
    let view = s.view.borrow().clone();
    if !view.serving() {
        return unavailable(&view, not_serving_message(&view));
    }
    // In flight until the response ends or the client goes: what the stall check watches.
    let work = s.activity.begin();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut upstream = s
        .http
        .request(parts.method.clone(), format!("{}{path}", s.upstream))
        .body(body);
    for h in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&h) {
            upstream = upstream.header(h, v);
        }
    }
    let mut lost = ring_lost(s.view.clone(), view.generation, s.ending.clone());
    let resp = tokio::select! {
        r = upstream.send() => r,
        _ = &mut lost => {
            let v = s.view.borrow().clone();
            return unavailable(&v, "The ring failed while this request was waiting; it is being restarted. Retry shortly.".into());
        }
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let v = s.view.borrow().clone();
            tracing::warn!(error = %e, "rank 0 did not answer a proxied request");
            return unavailable(
                &v,
                "Rank 0's engine did not answer; the ring is being checked. Retry shortly.".into(),
            );
        }
    };
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for h in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = resp.headers().get(&h) {
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
    let rewrite = Rewrite::for_request(view.engine, path, &view.model.name);
    let stream = forward(resp.bytes_stream(), lost, sse, rewrite, work);
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// Forwards upstream chunks until the upstream ends or the ring is lost. An SSE stream that is
/// cut short ends with an OpenAI-style error event so clients fail instead of waiting; any other
/// body ends with a transport error. With a [`Rewrite`], SSE events are re-framed and rewritten
/// one by one (still streamed), and other bodies are rewritten whole once they end.
fn forward(
    upstream: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
    lost: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    sse: bool,
    rewrite: Option<Rewrite>,
    work: Work,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    struct St<S> {
        upstream: Pin<Box<S>>,
        lost: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        done: bool,
        rewrite: Option<Rewrite>,
        framer: SseFramer,
        whole: Vec<u8>,
        /// Dropped with the stream: the request is then no longer in flight.
        work: Work,
    }
    let error_event = || {
        let e = json!({ "error": { "message": "The ring failed during this response; it is being restarted. Retry shortly.", "type": "server_error", "param": null, "code": "ring_unavailable" } });
        Bytes::from(format!("data: {e}\n\n"))
    };
    let st = St {
        upstream: Box::pin(upstream),
        lost,
        done: false,
        rewrite,
        framer: SseFramer::default(),
        whole: Vec::new(),
        work,
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
            match (next, &st.rewrite) {
                (Some(Ok(chunk)), None) => return Some((Ok(chunk), st)),
                (Some(Ok(chunk)), Some(rw)) if sse => {
                    let events = st.framer.push(&chunk);
                    if events.is_empty() {
                        continue;
                    }
                    let out: String = events
                        .iter()
                        .map(|e| format!("{}\n\n", rw.event(e)))
                        .collect();
                    return Some((Ok(Bytes::from(out)), st));
                }
                (Some(Ok(chunk)), Some(_)) => st.whole.extend_from_slice(&chunk),
                (None, None) => return None,
                (None, Some(rw)) => {
                    st.done = true;
                    let out = if sse {
                        st.framer
                            .finish()
                            .map(|e| format!("{}\n\n", rw.event(&e)).into_bytes())
                            .unwrap_or_default()
                    } else {
                        rw.body(&st.whole)
                    };
                    if out.is_empty() {
                        return None;
                    }
                    return Some((Ok(Bytes::from(out)), st));
                }
                (Some(Err(e)), _) => {
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

    fn settings() -> gateway::Settings {
        gateway::Settings {
            max_in_flight: 4,
            queue_size: 8,
            queue_timeout: std::time::Duration::from_secs(5),
            global: Default::default(),
            models: vec!["t".into()],
            keys_file: None,
        }
    }

    fn open_gateway() -> Gateway {
        Gateway::new(settings(), None)
    }

    async fn call(
        app: Router,
        path: &str,
        key: Option<&str>,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let mut req = axum::http::Request::builder()
            .method(if path.starts_with("/v1/chat") {
                "POST"
            } else {
                "GET"
            })
            .uri(path);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let resp = app
            .oneshot(req.body(Body::from("{}")).expect("request"))
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
        let app = router(
            rx,
            1,
            open_gateway(),
            &Signals::default(),
            Activity::default(),
        )
        .expect("router");
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
        let keys =
            gateway::keys::parse("sk-good\n", std::path::Path::new("keys"), &["t"]).expect("keys");
        let gw = Gateway::new(settings(), Some(keys));
        let app = router(rx, 1, gw, &Signals::default(), Activity::default()).expect("router");
        let (status, _, body) = call(app.clone(), "/v1/models", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "invalid_api_key");
        let (status, _, _) = call(app.clone(), "/api/v1/cluster", Some("sk-bad")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, body) = call(app.clone(), "/api/v1/cluster", Some("sk-good")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["phase"], "serving");
        let (status, _, _) = call(app, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK);
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

    #[tokio::test]
    async fn an_unreachable_rank_0_is_a_503_not_a_hang() {
        // Port 1 on loopback refuses connections: the engine is gone under a serving view.
        let (_tx, rx) = watch::channel(view(Phase::Serving));
        let app = router(
            rx,
            1,
            open_gateway(),
            &Signals::default(),
            Activity::default(),
        )
        .expect("router");
        let (status, headers, body) = call(app, "/v1/chat/completions", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key("retry-after"));
        assert_eq!(body["error"]["type"], "server_error");
    }
}
