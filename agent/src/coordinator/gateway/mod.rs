//! The gateway: what a request passes before the proxy sends it to rank 0's engine.
//!
//! One axum middleware ([`guard`]) over the API's protected routes, in this order, each step
//! cheap before the next one costs more: the API key (from the headers), its rate limits and
//! the cluster's ([`limits`]), the body (read whole: only then does hyper notice a client that
//! hangs up while it waits), the models the key may use, and, for generation requests, a fair
//! place at the engine ([`admission`]). The response passes through a [`usage::Meter`] that
//! charges tokens to the limits as they stream and records usage per key; its end releases
//! the place at the engine. Queued requests are not in flight at rank 0, so the stall check
//! only sees the ones admitted.
//!
//! The keys file ([`keys`]) is re-read when it changes and on SIGHUP; a bad file is logged
//! problem by problem (file:line:col) and the keys loaded before stay in force.

pub mod admission;
pub mod keys;
pub mod limits;
pub mod request;
pub mod usage;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::bearer;
use crate::config::{Config, ConfigError, Problem};
use admission::{Admission, Permit, Refusal};
use keys::{KeyLimits, KeySet};
use limits::{Kind, Limits, Rates, Report, Scope, Verdict};
use usage::{Meter, Usage};

use super::api::{openai_error, read_body, Checks};
use super::metrics::Metrics;
use super::switch::{ModelGate, NotLoaded, Passed};

/// How often the keys file is checked for a change (a stat, nothing more).
const KEYS_POLL: Duration = Duration::from_secs(1);

/// Retry-After for a full queue or a queue timeout: the queue turns over in seconds, and a
/// client that comes back sooner finds it as full as it left it.
const QUEUE_RETRY_AFTER_S: u64 = 2;

/// The name usage and limits are kept under when the API has no keys.
pub const ANONYMOUS: &str = "anonymous";

/// What the gateway enforces, from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_in_flight: u32,
    pub queue_size: u32,
    pub queue_timeout: Duration,
    /// Over all keys together.
    pub global: Rates,
    /// The model names this cluster serves (what a key's `models` may list).
    pub models: Vec<String>,
    pub keys_file: Option<PathBuf>,
    /// How a body is read (size bound from the context, timeout): the same rules as the proxy's,
    /// since the guard reads the body first.
    pub checks: Arc<Checks>,
    /// Requests for a configured model that is not loaded wait here for the switch.
    pub gate: ModelGate,
}

impl Settings {
    pub fn from_config(c: &Config) -> Settings {
        Settings {
            gate: ModelGate::new(c),
            max_in_flight: c.api.max_in_flight,
            queue_size: c.api.queue_size,
            queue_timeout: Duration::from_secs(c.api.queue_timeout_s),
            global: Rates {
                requests_per_minute: c.api.requests_per_minute,
                tokens_per_minute: c.api.tokens_per_minute,
            },
            models: crate::check_config::model_names(c),
            keys_file: c.api.api_keys_file.clone(),
            checks: Arc::new(Checks::from_config(c)),
        }
    }
}

/// The gateway's state, shared by every request (cheap to clone).
#[derive(Clone)]
pub struct Gateway(Arc<Shared>);

struct Shared {
    settings: Settings,
    /// `None`: the API is open.
    keys: RwLock<Option<Arc<KeySet>>>,
    limits: Mutex<Limits>,
    admission: Admission,
    usage: Mutex<Usage>,
    started: std::time::SystemTime,
    /// Requests and latencies as counted at the API (`/metrics`).
    metrics: Metrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters and buckets stay usable after a panic elsewhere: each change is one step.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads and checks a keys file.
pub fn load_keys(path: &Path, models: &[String]) -> Result<KeySet, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        source: path.to_path_buf(),
        problems: vec![Problem::general(format!(
            "cannot read the API keys file (api.api_keys_file): {e}"
        ))],
    })?;
    let models: Vec<&str> = models.iter().map(String::as_str).collect();
    keys::parse(&text, path, &models)
}

impl Gateway {
    pub fn new(settings: Settings, keys: Option<KeySet>) -> Gateway {
        let admission = Admission::new(
            settings.max_in_flight,
            settings.queue_size,
            settings.queue_timeout,
        );
        Gateway(Arc::new(Shared {
            settings,
            keys: RwLock::new(keys.map(Arc::new)),
            limits: Mutex::new(Limits::default()),
            admission,
            usage: Mutex::new(Usage::default()),
            started: std::time::SystemTime::now(),
            metrics: Metrics::default(),
        }))
    }

    /// Which model serves and who waits: shared with the coordinator, which switches.
    pub fn gate(&self) -> ModelGate {
        self.0.settings.gate.clone()
    }

    /// The gateway for `config`, with its keys file loaded (a bad one fails the start).
    pub fn from_config(config: &Config) -> Result<Gateway, ConfigError> {
        let settings = Settings::from_config(config);
        let keys = match &settings.keys_file {
            Some(p) => Some(load_keys(p, &settings.models)?),
            None => None,
        };
        Ok(Gateway::new(settings, keys))
    }

    fn keys(&self) -> Option<Arc<KeySet>> {
        self.0
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the keys file; a bad file is logged and the current keys stay.
    pub fn reload(&self, why: &str) -> bool {
        let Some(path) = &self.0.settings.keys_file else {
            return false;
        };
        match load_keys(path, &self.0.settings.models) {
            Ok(set) => {
                let names: Vec<String> = set.iter().map(|k| k.name.clone()).collect();
                lock(&self.0.limits).retain(|k| names.iter().any(|n| n == k));
                tracing::info!(file = %path.display(), keys = set.len(), reason = why, names = %names.join(","), "API keys reloaded");
                *self.0.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
                true
            }
            Err(e) => {
                for problem in e.to_string().lines() {
                    tracing::error!(reason = why, "API keys file rejected: {problem}");
                }
                let kept = self.keys().map_or(0, |k| k.len());
                tracing::warn!(file = %path.display(), kept, "keeping the API keys loaded before");
                false
            }
        }
    }

    /// Reloads the keys file whenever it changes and on SIGHUP, until the gateway is dropped.
    pub fn spawn_reload(&self) -> Option<tokio::task::JoinHandle<()>> {
        let path = self.0.settings.keys_file.clone()?;
        let weak = Arc::downgrade(&self.0);
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP; the API keys file is still reloaded when it changes");
                None
            }
        };
        let mut seen = stamp(&path);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEYS_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    _ = tick.tick() => {
                        let now = stamp(&path);
                        if now == seen {
                            if weak.strong_count() == 0 {
                                return;
                            }
                            continue;
                        }
                        seen = now;
                        "the file changed"
                    }
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                        seen = stamp(&path);
                        "SIGHUP"
                    }
                };
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                Gateway(shared).reload(why);
            }
        }))
    }

    /// `GET /api/v1/usage`: usage per key since the agent started, and the admission queue.
    /// Whether `headers` carry one of the configured keys (false when the API has none): who may
    /// read the details `/readyz` keeps from everyone else.
    pub fn knows_key(&self, headers: &HeaderMap) -> bool {
        self.keys().is_some_and(|set| {
            bearer(headers.get(header::AUTHORIZATION)).is_some_and(|t| set.identify(t).is_some())
        })
    }

    /// The name requests are counted under: the key's, [`ANONYMOUS`] on an open API, or
    /// `unauthenticated` for a request without a known key.
    pub fn caller_name(&self, headers: &HeaderMap) -> String {
        match self.keys() {
            None => ANONYMOUS.into(),
            Some(set) => bearer(headers.get(header::AUTHORIZATION))
                .and_then(|t| set.identify(t))
                .map_or_else(|| "unauthenticated".into(), |k| k.name.clone()),
        }
    }

    /// The metrics this gateway's API counts (the coordinator adds the ring's).
    pub fn metrics(&self) -> Metrics {
        self.0.metrics.clone()
    }

    /// Usage per key and the admission's state, as `/metrics` reads them.
    pub fn usage_snapshot(&self) -> (BTreeMap<String, usage::Counters>, admission::Snapshot) {
        (lock(&self.0.usage).snapshot(), self.0.admission.snapshot())
    }

    pub fn usage_report(&self) -> serde_json::Value {
        let since = self
            .0
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "since": since,
            "keys": lock(&self.0.usage).snapshot(),
            "admission": self.0.admission.snapshot(),
        })
    }
}

/// What identifies a file's version: a change to any of it means a new file.
fn stamp(path: &Path) -> Option<(u64, u64, u64, i64, i64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Takes a slot at the engine: admitted through the queue.
    Generate,
    /// Rate limited, answered at once.
    Listing,
    /// Authenticated only (status and usage must answer under any load).
    Status,
}

impl Route {
    fn of(method: &Method, path: &str) -> Route {
        match path {
            "/v1/chat/completions" | "/v1/completions" if method == Method::POST => Route::Generate,
            p if p.starts_with("/v1/") => Route::Listing,
            _ => Route::Status,
        }
    }
}

/// Who sent a request: its key, or nobody on an open API.
struct Caller {
    name: String,
    key: Option<keys::Key>,
}

impl Caller {
    fn limits(&self) -> KeyLimits {
        self.key.as_ref().map(|k| k.limits).unwrap_or_default()
    }
}

/// The middleware over the API's protected routes (see the module comment).
pub async fn guard(State(gw): State<Gateway>, req: Request, next: Next) -> Response {
    let route = Route::of(req.method(), req.uri().path());
    let caller = match gw.keys() {
        None => Caller {
            name: ANONYMOUS.into(),
            key: None,
        },
        Some(set) => match bearer(req.headers().get(header::AUTHORIZATION))
            .and_then(|t| set.identify(t))
        {
            Some(k) => Caller {
                name: k.name.clone(),
                key: Some(k.clone()),
            },
            None => {
                return openai_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "invalid_api_key",
                    "Incorrect or missing API key: send `Authorization: Bearer <key>` with a key from the cluster's API keys file.",
                )
            }
        },
    };
    if route == Route::Status {
        return next.run(req).await;
    }
    let limits = caller.limits();
    let rates = Rates {
        requests_per_minute: limits.requests_per_minute,
        tokens_per_minute: limits.tokens_per_minute,
    };
    let verdict =
        lock(&gw.0.limits).check(&caller.name, rates, gw.0.settings.global, Instant::now());
    let report = match verdict {
        Verdict::Allowed(r) => r,
        Verdict::Limited {
            kind,
            scope,
            retry_after,
            report,
        } => {
            lock(&gw.0.usage).entry(&caller.name).rate_limited += 1;
            tracing::debug!(key = %caller.name, kind = kind.as_str(), "rate limited");
            return rate_limited(&caller.name, kind, scope, retry_after, &report);
        }
    };
    lock(&gw.0.usage).entry(&caller.name).requests += 1;
    if route == Route::Listing {
        let mut resp = next.run(req).await;
        rate_headers(resp.headers_mut(), &report);
        return resp;
    }
    let (parts, body) = req.into_parts();
    // Bounded like the proxy's own read: by the context's size and the body timeout.
    let checks = &gw.0.settings.checks;
    let deadline = Instant::now() + checks.body_timeout;
    let body = match read_body(checks, &parts.headers, body, deadline).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    if let Some(key) = caller.key.as_ref().filter(|k| k.models.is_some()) {
        let asked = requested_model(&body)
            .or_else(|| gw.0.settings.models.first().cloned())
            .unwrap_or_default();
        if !key.may_use(&asked) {
            return openai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                &format!("The model `{asked}` does not exist or you do not have access to it."),
            );
        }
    }
    // Fair between keys; with no keys, between client addresses where the server knows them.
    let client = match parts.extensions.get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(addr)) if caller.name == ANONYMOUS => addr.ip().to_string(),
        _ => caller.name.clone(),
    };
    // The server's "end now" signal (see `api::router`): at shutdown a request still waiting
    // gets its 503 at once instead of holding the drain up.
    let ending = parts
        .extensions
        .get::<Arc<CancellationToken>>()
        .cloned()
        .unwrap_or_default();
    // A configured model that is not loaded waits for the switch here, before it takes a
    // place in the admission queue (which the loaded model's requests keep using meanwhile).
    // A name no model answers to goes on as today: the proxy answers 404 model_not_found.
    let gate = &gw.0.settings.gate;
    let wanted = requested_model(&body).and_then(|n| gate.find(&n));
    let timeout = gw.0.settings.queue_timeout;
    let passed = tokio::select! {
        r = gate.pass(wanted, timeout) => r,
        _ = ending.cancelled() => Err(NotLoaded::TimedOut { retry_after_s: QUEUE_RETRY_AFTER_S }),
    };
    let passed = match passed {
        Ok(p) => p,
        Err(e) => {
            lock(&gw.0.usage).entry(&caller.name).queue_rejected += 1;
            let mut resp = model_refusal(&e, wanted.map(|m| gate.name(m)).unwrap_or(""), timeout);
            rate_headers(resp.headers_mut(), &report);
            return resp;
        }
    };
    let entered = tokio::select! {
        r = gw.0.admission.enter(&client, limits.max_concurrent) => r,
        _ = ending.cancelled() => Err(Refusal::ShuttingDown),
    };
    let permit = match entered {
        Ok(p) => p,
        Err(refusal) => {
            lock(&gw.0.usage).entry(&caller.name).queue_rejected += 1;
            let mut resp = queue_refusal(refusal, gw.0.settings.queue_timeout);
            rate_headers(resp.headers_mut(), &report);
            return resp;
        }
    };
    let prompt_estimate = body.len() as u64 / 4;
    let resp = next.run(Request::from_parts(parts, Body::from(body))).await;
    let (mut parts, body) = resp.into_parts();
    rate_headers(&mut parts.headers, &report);
    if !parts.status.is_success() {
        // An engine's refusal is whole by now; the slot is free again.
        return Response::from_parts(parts, body);
    }
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let metered = Metered {
        inner: body,
        meter: Meter::new(sse),
        account: Some(Account {
            gw: gw.clone(),
            key: caller.name,
            charged: 0,
            prompt_estimate,
            _permit: permit,
            _passed: passed,
        }),
    };
    Response::from_parts(parts, Body::new(metered))
}

/// The `model` a request body names, if it is JSON with one.
fn requested_model(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Asked {
        model: Option<String>,
    }
    serde_json::from_slice::<Asked>(body).ok()?.model
}

fn header_value(v: impl ToString) -> HeaderValue {
    // Numbers and durations only: always valid header text.
    HeaderValue::from_str(&v.to_string()).unwrap_or(HeaderValue::from_static("0"))
}

/// OpenAI's `x-ratelimit-*` headers for the limits that apply.
fn rate_headers(h: &mut HeaderMap, r: &Report) {
    for (figures, kind) in [(r.requests, "requests"), (r.tokens, "tokens")] {
        let Some(f) = figures else { continue };
        for (name, value) in [
            ("limit", header_value(f.limit)),
            ("remaining", header_value(f.remaining)),
            ("reset", header_value(limits::format_reset(f.reset))),
        ] {
            if let Ok(n) = HeaderName::try_from(format!("x-ratelimit-{name}-{kind}")) {
                h.insert(n, value);
            }
        }
    }
}

fn rate_limited(
    key: &str,
    kind: Kind,
    scope: Scope,
    retry_after: Duration,
    report: &Report,
) -> Response {
    let limit = match kind {
        Kind::Requests => report.requests.map(|f| f.limit),
        Kind::Tokens => report.tokens.map(|f| f.limit),
    }
    .unwrap_or(0);
    let whose = match scope {
        Scope::Key => format!("on API key `{key}`"),
        Scope::Global => "on this cluster (all keys together)".into(),
    };
    let secs = limits::retry_after_secs(retry_after);
    let message = format!(
        "Rate limit reached for {} per minute {whose}: limit {limit}. Please try again in {secs}s.",
        kind.as_str()
    );
    let body = json!({ "error": { "message": message, "type": kind.as_str(), "param": null, "code": "rate_limit_exceeded" } });
    let mut resp = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, header_value(secs));
    h.insert(
        HeaderName::from_static("retry-after-ms"),
        header_value(retry_after.as_millis().max(1)),
    );
    rate_headers(h, report);
    resp
}

fn queue_refusal(refusal: Refusal, timeout: Duration) -> Response {
    let (code, message) = match refusal {
        Refusal::Full => (
            "queue_full",
            "The cluster is busy: every engine slot is taken and the queue is full. Retry shortly."
                .to_string(),
        ),
        Refusal::Displaced => (
            "queue_full",
            "The cluster is busy: the queue is full and this key holds most of it. Retry shortly."
                .to_string(),
        ),
        Refusal::ShuttingDown => (
            "shutting_down",
            "The API is restarting or stopping; retry shortly.".to_string(),
        ),
        Refusal::TimedOut => (
            "queue_timeout",
            format!(
                "The cluster is busy: this request waited {} s for an engine slot. Retry shortly.",
                timeout.as_secs()
            ),
        ),
    };
    unavailable(code, &message, QUEUE_RETRY_AFTER_S)
}

/// The 503 for a request whose model did not come in time (or had no room to wait).
fn model_refusal(e: &NotLoaded, model: &str, timeout: Duration) -> Response {
    let (code, message, retry) = match e {
        NotLoaded::TimedOut { retry_after_s } => (
            "model_switching",
            format!(
                "The model `{model}` is not loaded yet: the ring serves one model at a time and \
                 this request waited {} s for the switch. Retry after {retry_after_s} s.",
                timeout.as_secs()
            ),
            *retry_after_s,
        ),
        NotLoaded::Full => (
            "queue_full",
            format!("The model `{model}` is not loaded and the queue of requests waiting for a model is full. Retry shortly."),
            QUEUE_RETRY_AFTER_S,
        ),
    };
    unavailable(code, &message, retry.max(1))
}

/// A 503 in OpenAI's error shape with `Retry-After`: the gateway's answer whenever a request
/// cannot be served now but can later.
fn unavailable(code: &str, message: &str, retry_after_s: u64) -> Response {
    let mut resp = openai_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        code,
        message,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    resp
}

/// A response's accounting: tokens charged so far, and the place at the engine it holds.
struct Account {
    gw: Gateway,
    key: String,
    charged: u64,
    /// Charged as prompt tokens when the engine does not say (about 4 bytes a token).
    prompt_estimate: u64,
    _permit: Permit,
    /// Holds off a switch away from this request's model until the response ends.
    _passed: Passed,
}

impl Account {
    fn charge(&mut self, tokens: u64) {
        self.charged += tokens;
        lock(&self.gw.0.limits).charge_tokens(&self.key, tokens as f64, Instant::now());
    }

    /// The response ended (or its client left): charge what it really used, record it, and
    /// free the place at the engine (the permit drops with the account).
    fn settle(mut self, meter: &mut Meter) {
        let mut t = meter.finish();
        if !meter.was_reported() {
            t.prompt = self.prompt_estimate;
        }
        let total = t.prompt + t.completion;
        let difference = total as f64 - self.charged as f64;
        lock(&self.gw.0.limits).charge_tokens(&self.key, difference, Instant::now());
        let mut usage = lock(&self.gw.0.usage);
        let c = usage.entry(&self.key);
        c.prompt_tokens += t.prompt;
        c.completion_tokens += t.completion;
        self.charged = total;
    }
}

/// A response body passed on frame by frame through a [`Meter`], its size hint kept (so a
/// body of known length keeps its `Content-Length` instead of being re-chunked).
struct Metered {
    inner: Body,
    meter: Meter,
    account: Option<Account>,
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let item = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &item {
            Some(Ok(frame)) => {
                if let Some(chunk) = frame.data_ref() {
                    let n = this.meter.feed(chunk);
                    if n > 0 {
                        if let Some(a) = this.account.as_mut() {
                            a.charge(n);
                        }
                    }
                }
            }
            Some(Err(_)) | None => {
                if let Some(a) = this.account.take() {
                    a.settle(&mut this.meter);
                }
            }
        }
        Poll::Ready(item)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if let Some(a) = self.account.take() {
            a.settle(&mut self.meter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use axum::Router;
    use tower::ServiceExt;

    const ALICE: &str = "sk-alice-0123456789abcdef";
    const BOB: &str = "sk-bob-0123456789abcdef";

    /// A narrow stand-in for the proxy (no engine): answers a chat with a two-token stream
    /// whose last event carries llama-server's timings.
    fn stub_engine(gw: Gateway) -> Router {
        let sse = || async {
            let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                        data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
                        data: {\"choices\":[],\"timings\":{\"cache_n\":0,\"prompt_n\":8,\"predicted_n\":2}}\n\n\
                        data: [DONE]\n\n";
            ([(header::CONTENT_TYPE, "text/event-stream")], body)
        };
        Router::new()
            .route("/v1/chat/completions", post(sse))
            .route("/v1/models", get(|| async { "{}" }))
            .route(
                "/api/v1/usage",
                get({
                    let gw = gw.clone();
                    move || async move { Json(gw.usage_report()) }
                }),
            )
            .layer(axum::middleware::from_fn_with_state(gw, guard))
    }

    fn gateway(keys: &str) -> Gateway {
        let set = keys::parse(keys, Path::new("keys.toml"), &["smol"]).expect("keys");
        Gateway::new(
            Settings {
                max_in_flight: 2,
                queue_size: 4,
                queue_timeout: Duration::from_secs(5),
                global: Rates::default(),
                models: vec!["smol".into()],
                keys_file: None,
                checks: Arc::new(test_checks()),
                gate: crate::coordinator::switch::ModelGate::for_names(
                    vec![vec!["smol".into()]],
                    0,
                    8,
                ),
            },
            Some(set),
        )
    }

    async fn send(
        app: &Router,
        key: &str,
        path: &str,
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let method = if path.contains("chat") { "POST" } else { "GET" };
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(body.to_string()))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.expect("body");
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    fn h<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_request_limit_is_a_429_with_openais_headers_until_the_refill() {
        let app = stub_engine(gateway(&format!(
            "[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\nrequests_per_minute = 2\n\
             [[key]]\nname = \"bob\"\nkey = \"{BOB}\"\n"
        )));
        let (s, headers, _) = send(&app, ALICE, "/v1/chat/completions", "{}").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h(&headers, "x-ratelimit-limit-requests"), "2");
        assert_eq!(h(&headers, "x-ratelimit-remaining-requests"), "1");
        assert_eq!(h(&headers, "x-ratelimit-reset-requests"), "30s");
        assert_eq!(send(&app, ALICE, "/v1/models", "").await.0, StatusCode::OK);
        let (s, headers, body) = send(&app, ALICE, "/v1/chat/completions", "{}").await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(h(&headers, "retry-after"), "30");
        assert_eq!(h(&headers, "retry-after-ms"), "30000");
        assert_eq!(h(&headers, "x-ratelimit-remaining-requests"), "0");
        assert_eq!(h(&headers, "x-ratelimit-reset-requests"), "1m0s");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "requests");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("`alice`"),
            "{v}"
        );
        // Bob has no limits and no headers; alice is served again after the refill.
        let (s, headers, _) = send(&app, BOB, "/v1/chat/completions", "{}").await;
        assert_eq!(s, StatusCode::OK);
        assert!(headers.get("x-ratelimit-limit-requests").is_none());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            send(&app, ALICE, "/v1/chat/completions", "{}").await.0,
            StatusCode::OK
        );
        // Usage counts every key's requests, tokens and refusals.
        let (_, _, usage) = send(&app, BOB, "/api/v1/usage", "").await;
        let u: serde_json::Value = serde_json::from_str(&usage).expect("json");
        assert_eq!(u["keys"]["alice"]["requests"], 3);
        assert_eq!(u["keys"]["alice"]["rate_limited"], 1);
        assert_eq!(u["keys"]["alice"]["prompt_tokens"], 16);
        assert_eq!(u["keys"]["alice"]["completion_tokens"], 4);
        assert_eq!(u["keys"]["bob"]["requests"], 1);
        assert_eq!(u["admission"]["in_flight"], 0, "every response ended: {u}");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_streamed_count_against_the_token_limit() {
        let app = stub_engine(gateway(&format!(
            "[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\ntokens_per_minute = 15\n"
        )));
        // 10 tokens a request (8 prompt + 2 completion): the second leaves alice 5 in debt.
        assert_eq!(
            send(&app, ALICE, "/v1/chat/completions", "{}").await.0,
            StatusCode::OK
        );
        let (s, headers, _) = send(&app, ALICE, "/v1/chat/completions", "{}").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h(&headers, "x-ratelimit-remaining-tokens"), "5");
        let (s, headers, body) = send(&app, ALICE, "/v1/chat/completions", "{}").await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(h(&headers, "x-ratelimit-limit-tokens"), "15");
        assert_eq!(h(&headers, "x-ratelimit-remaining-tokens"), "0");
        // 6 tokens short at 0.25 a second.
        assert_eq!(h(&headers, "retry-after"), "24");
        assert!(body.contains("\"type\":\"tokens\""), "{body}");
    }

    #[tokio::test]
    async fn at_shutdown_a_waiting_request_is_answered_at_once() {
        let gw = Gateway::new(
            Settings {
                max_in_flight: 1,
                queue_size: 1,
                queue_timeout: Duration::from_secs(3600),
                global: Rates::default(),
                models: vec!["smol".into()],
                keys_file: None,
                checks: Arc::new(test_checks()),
                gate: crate::coordinator::switch::ModelGate::for_names(
                    vec![vec!["smol".into()]],
                    0,
                    8,
                ),
            },
            None,
        );
        let ending = CancellationToken::new();
        // A narrow stand-in for a response that streams for ever: it holds the one place.
        let endless = || async {
            let s = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
            (
                [(header::CONTENT_TYPE, "text/event-stream")],
                Body::from_stream(s),
            )
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(endless))
            .layer(axum::middleware::from_fn_with_state(gw.clone(), guard))
            .layer(axum::Extension(Arc::new(ending.clone())));
        let req = || {
            axum::http::Request::post("/v1/chat/completions")
                .body(Body::from("{}"))
                .expect("request")
        };
        let running = app.clone().oneshot(req()).await.expect("response");
        assert_eq!(running.status(), StatusCode::OK);
        let waiting = tokio::spawn(app.clone().oneshot(req()));
        while gw.0.admission.snapshot().queued == 0 {
            tokio::task::yield_now().await;
        }
        let full = app.clone().oneshot(req()).await.expect("response");
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h(full.headers(), "retry-after"), "2");
        ending.cancel();
        let resp = waiting.await.expect("task").expect("response");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .expect("body");
        assert!(String::from_utf8_lossy(&body).contains("shutting_down"));
        drop(running);
        let snap = gw.0.admission.snapshot();
        assert_eq!((snap.in_flight, snap.queued), (0, 0));
        let u = gw.usage_report();
        assert_eq!(u["keys"][ANONYMOUS]["queue_rejected"], 2, "{u}");
    }

    #[tokio::test]
    async fn a_key_names_only_its_models_and_a_wrong_key_is_a_401() {
        let app = stub_engine(gateway(&format!(
            "[[key]]\nname = \"alice\"\nkey = \"{ALICE}\"\nmodels = [\"smol\"]\n"
        )));
        let (s, _, body) = send(&app, ALICE, "/v1/chat/completions", r#"{"model":"gpt-5"}"#).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(body.contains("model_not_found"), "{body}");
        let ok = send(&app, ALICE, "/v1/chat/completions", r#"{"model":"smol"}"#).await;
        assert_eq!(ok.0, StatusCode::OK);
        let (s, _, body) = send(&app, BOB, "/v1/chat/completions", "{}").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(body.contains("invalid_api_key"), "{body}");
    }

    /// Body rules for the tests: the model `smol`, a 1024-token context.
    fn test_checks() -> Checks {
        Checks {
            rules: super::request::Rules {
                model: "smol".into(),
                ctx_size: 1024,
                max_body_bytes: super::request::Rules::default_max_body(1024),
            },
            body_timeout: Duration::from_secs(30),
        }
    }
}
