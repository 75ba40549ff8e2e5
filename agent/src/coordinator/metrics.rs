//! Prometheus metrics (`/metrics`, OpenMetrics text): the gateway's requests, latencies and
//! tokens, the ring's phase, nodes and ranks, and rank 0's engine's own metrics under
//! [`ENGINE_PREFIX`].
//!
//! What is counted as it happens (requests, durations, time to first token, restarts, switches,
//! transfers) lives in one long-lived registry. What already has a home elsewhere is read at
//! scrape time and not counted twice: tokens and refusals from the gateway's usage accounting,
//! in-flight and queued from its admission, the ring and its nodes from the cluster view, rank
//! CPU and memory from the driver's last samples. Building the scrape-time part and renaming the
//! engine's metrics are pure; the middleware ([`track`]) and the engine fetch are thin.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::upstream::Upstream;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode_registry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::gateway::admission::Snapshot;
use super::gateway::usage::Counters;
use super::gateway::Gateway;
use super::state::Phase;
use super::view::ClusterView;
use crate::proto::{ClusterEvent, EventDetail, RankPhase};

/// The content type of OpenMetrics text, which Prometheus asks for and parses.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The prefix of every metric of our own.
pub const PREFIX: &str = "llm_cluster";
/// Rank 0's engine's metrics (llama-server's `--metrics`) are re-exported under this prefix.
pub const ENGINE_PREFIX: &str = "llm_engine_";
/// How long a scrape waits for the engine's metrics before it answers without them.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(3);

/// The routes requests are counted by; any other path counts as `other`, so that a client
/// probing random paths cannot grow the label set.
const ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/api/v1/cluster",
    "/api/v1/usage",
    "/api/v1/events",
    "/metrics",
];

/// Node states as `/api/v1/cluster` shows them.
const NODE_STATES: &[&str] = &[
    "unknown",
    "unreachable",
    RankPhase::Idle.as_str(),
    RankPhase::Running.as_str(),
    RankPhase::Exited.as_str(),
    RankPhase::FailedToStart.as_str(),
];

/// The `route` label of `path`.
pub fn route_label(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("other")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    rank: u32,
    address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeStateLabels {
    rank: u32,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabels {
    rank: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    cluster: String,
    engine: String,
    model: String,
}

/// What the driver last sampled of one rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RankSample {
    pub cpu_usec: Option<u64>,
    pub memory_bytes: Option<u64>,
}

fn duration_histogram() -> Histogram {
    // 10 ms .. ~4 min: a models listing up to a long generation.
    Histogram::new(exponential_buckets(0.01, 2.5, 12))
}

fn ttft_histogram() -> Histogram {
    // 5 ms .. ~2 min: a cached prompt up to a long prefill on a slow ring.
    Histogram::new(exponential_buckets(0.005, 2.5, 12))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
    ttft: HistogramFamily<RouteLabels>,
    restarts: Family<CauseLabels, Counter>,
    switches: Counter,
    transfers: Family<ResultLabels, Counter>,
    ranks: Mutex<BTreeMap<u32, RankSample>>,
}

/// The metrics counted as things happen (cheap to clone; one per coordinator).
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests to the API's routes by route, HTTP status and API key name",
            requests.clone(),
        );
        let duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response (its last byte for generation routes)",
            duration.clone(),
        );
        let ttft: HistogramFamily<RouteLabels> = Family::new_with_constructor(ttft_histogram);
        registry.register(
            "time_to_first_token_seconds",
            "Time from a streamed generation request's arrival to its first event",
            ttft.clone(),
        );
        let restarts = Family::<CauseLabels, Counter>::default();
        registry.register(
            "ring_restarts",
            "Ring failures that restart the ring, by cause (rank_exited, start_failed, not_ready, node_lost, stalled)",
            restarts.clone(),
        );
        let switches = Counter::default();
        registry.register(
            "model_switches",
            "Model switches of the ring",
            switches.clone(),
        );
        let transfers = Family::<ResultLabels, Counter>::default();
        // Both results from the start, so a rate() over them has a zero to begin from.
        for result in ["done", "failed"] {
            drop(transfers.get_or_create(&ResultLabels {
                result: result.into(),
            }));
        }
        registry.register(
            "model_transfers",
            "Model file deliveries to nodes that ended, by result (done: verified and in place)",
            transfers.clone(),
        );
        Metrics(Arc::new(Inner {
            registry,
            requests,
            duration,
            ttft,
            restarts,
            switches,
            transfers,
            ranks: Mutex::default(),
        }))
    }
}

impl Metrics {
    fn request(&self, route: &str, status: StatusCode, key: &str) {
        self.0
            .requests
            .get_or_create(&RequestLabels {
                route: route.into(),
                status: status.as_u16(),
                key: key.into(),
            })
            .inc();
    }

    fn duration(&self, route: &str, d: Duration) {
        self.0
            .duration
            .get_or_create(&RouteLabels {
                route: route.into(),
            })
            .observe(d.as_secs_f64());
    }

    fn first_token(&self, route: &str, d: Duration) {
        self.0
            .ttft
            .get_or_create(&RouteLabels {
                route: route.into(),
            })
            .observe(d.as_secs_f64());
    }

    /// Counts what an event of the ring means for the counters.
    pub fn event(&self, e: &ClusterEvent) {
        match &e.detail {
            EventDetail::Failure { cause, .. }
                if !matches!(cause.as_str(), "refused" | "crash_loop") =>
            {
                self.0
                    .restarts
                    .get_or_create(&CauseLabels {
                        cause: cause.clone(),
                    })
                    .inc();
            }
            EventDetail::Switch { .. } => {
                self.0.switches.inc();
            }
            EventDetail::Transfer { fields } => {
                if let Some(result) = fields
                    .get("state")
                    .and_then(|s| s.as_str())
                    .filter(|s| matches!(*s, "done" | "failed"))
                {
                    self.0
                        .transfers
                        .get_or_create(&ResultLabels {
                            result: result.into(),
                        })
                        .inc();
                }
            }
            _ => {}
        }
    }

    #[cfg(test)]
    pub fn restarts_of(&self, cause: &str) -> u64 {
        self.0
            .restarts
            .get(&CauseLabels {
                cause: cause.into(),
            })
            .map_or(0, |c| c.get())
    }

    /// The driver's latest samples of every rank.
    pub fn set_ranks(&self, samples: BTreeMap<u32, RankSample>) {
        *self.0.ranks.lock().unwrap_or_else(|e| e.into_inner()) = samples;
    }

    fn ranks(&self) -> BTreeMap<u32, RankSample> {
        self.0
            .ranks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The whole exposition: counted metrics, the scrape-time ones from `now`, and the engine's
    /// (already renamed), then `# EOF`.
    pub fn render(&self, now: &Now<'_>, engine: Option<&str>) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a metric that could not be encoded is left out.
        let _ = encode_registry(&mut out, &self.0.registry);
        let _ = encode_registry(
            &mut out,
            &scrape_registry(now, &self.ranks(), engine.is_some()),
        );
        if let Some(e) = engine {
            out.push_str(e);
        }
        out.push_str("# EOF\n");
        out
    }
}

/// What a scrape reads from elsewhere.
pub struct Now<'a> {
    pub view: &'a ClusterView,
    pub usage: &'a BTreeMap<String, Counters>,
    pub admission: &'a Snapshot,
}

fn gauge_of(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// The metrics read at scrape time, as a registry of their own.
fn scrape_registry(now: &Now<'_>, ranks: &BTreeMap<u32, RankSample>, engine_up: bool) -> Registry {
    let mut r = Registry::with_prefix(PREFIX);
    let v = now.view;
    let info = Family::<InfoLabels, Gauge>::default();
    info.get_or_create(&InfoLabels {
        cluster: v.cluster.clone(),
        engine: v.engine.as_str().to_string(),
        model: v.model.name.clone(),
    })
    .set(1);
    r.register(
        "cluster_info",
        "The cluster, its engine and model (always 1)",
        info,
    );

    let tokens = |pick: fn(&Counters) -> u64| {
        let f = Family::<KeyLabels, Counter>::default();
        for (key, c) in now.usage {
            f.get_or_create(&KeyLabels { key: key.clone() })
                .inc_by(pick(c));
        }
        f
    };
    r.register(
        "prompt_tokens",
        "Prompt tokens by API key name, as the engine reported them (the gateway's usage)",
        tokens(|c| c.prompt_tokens),
    );
    r.register(
        "completion_tokens",
        "Completion tokens by API key name, as the engine reported them (the gateway's usage)",
        tokens(|c| c.completion_tokens),
    );
    r.register(
        "rate_limited",
        "Requests answered 429 by API key name",
        tokens(|c| c.rate_limited),
    );
    r.register(
        "queue_rejected",
        "Requests answered 503 by admission (queue full or timed out) by API key name",
        tokens(|c| c.queue_rejected),
    );
    r.register(
        "in_flight",
        "Generation requests at the engine",
        gauge_of(now.admission.in_flight as i64),
    );
    r.register(
        "queued",
        "Generation requests waiting for a place at the engine",
        gauge_of(now.admission.queued as i64),
    );
    r.register(
        "max_in_flight",
        "Generation requests the engine takes at once (api.max_in_flight)",
        gauge_of(now.admission.max_in_flight as i64),
    );

    let phase = Family::<PhaseLabels, Gauge>::default();
    for p in Phase::ALL {
        phase
            .get_or_create(&PhaseLabels {
                phase: p.as_str().into(),
            })
            .set(i64::from(p == v.phase));
    }
    r.register(
        "ring_phase",
        "The ring's phase (1 for the current one)",
        phase,
    );
    r.register(
        "ring_generation",
        "The ring's generation",
        gauge_of(v.generation as i64),
    );
    r.register(
        "ring_failures",
        "Failed attempts since the ring last served stably",
        gauge_of(i64::from(v.failures)),
    );

    let up = Family::<NodeLabels, Gauge>::default();
    let state = Family::<NodeStateLabels, Gauge>::default();
    for n in &v.nodes {
        up.get_or_create(&NodeLabels {
            rank: n.rank,
            address: n.address.clone(),
        })
        .set(i64::from(n.reachable));
        for s in NODE_STATES {
            state
                .get_or_create(&NodeStateLabels {
                    rank: n.rank,
                    state: (*s).into(),
                })
                .set(i64::from(n.state == *s));
        }
    }
    r.register("node_up", "Whether the node's agent answers", up);
    r.register(
        "node_state",
        "The node's rank state (1 for the current one)",
        state,
    );

    let cpu = Family::<RankLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    let memory = Family::<RankLabels, Gauge>::default();
    for (rank, s) in ranks {
        if let Some(us) = s.cpu_usec {
            cpu.get_or_create(&RankLabels { rank: *rank })
                .inc_by(us as f64 / 1e6);
        }
        if let Some(b) = s.memory_bytes {
            memory
                .get_or_create(&RankLabels { rank: *rank })
                .set(i64::try_from(b).unwrap_or(i64::MAX));
        }
    }
    r.register(
        "rank_cpu_seconds",
        "CPU time the running rank has used (its unit's cgroup under systemd)",
        cpu,
    );
    r.register(
        "rank_memory_bytes",
        "Memory the running rank uses (resident set; its unit's cgroup under systemd)",
        memory,
    );
    r.register(
        "engine_metrics_up",
        "Whether rank 0's engine's own metrics were read for this scrape",
        gauge_of(i64::from(engine_up)),
    );
    r
}

/// A metric name made valid and prefixed: the engine's namespace (`llamacpp:`) gives way to
/// `prefix`.
fn engine_name(name: &str, prefix: &str) -> String {
    let base = name.rsplit(':').next().unwrap_or(name);
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}{clean}")
}

/// The engine's exposition (Prometheus text, as llama-server writes it) renamed under `prefix`
/// and made valid OpenMetrics: a counter's family is named without `_total` and its samples
/// with it, other comments are dropped.
pub fn engine_metrics(text: &str, prefix: &str) -> String {
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, ty)) = rest.split_once(' ') {
                types.insert(name, ty.trim());
            }
        }
    }
    let family = |name: &str| -> (String, &str) {
        let ty = types.get(name).copied().unwrap_or("unknown");
        let renamed = engine_name(name, prefix);
        match ty {
            "counter" => (
                renamed
                    .strip_suffix("_total")
                    .unwrap_or(&renamed)
                    .to_string(),
                "counter",
            ),
            "gauge" | "histogram" | "summary" => (renamed, ty),
            _ => (renamed, "unknown"),
        }
    };
    let mut out = String::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", family(name).0));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (f, ty) = family(name);
            out.push_str(&format!("# TYPE {f} {ty}\n"));
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let (name, rest) = line.split_at(end);
            let (f, ty) = family(name);
            let sample = if ty == "counter" {
                format!("{f}_total")
            } else {
                engine_name(name, prefix)
            };
            out.push_str(&format!("{sample}{rest}\n"));
        }
    }
    out
}

/// Rank 0's engine's metrics, renamed; `None` when the engine does not answer in time.
pub async fn fetch_engine(upstream: &Upstream) -> Option<String> {
    match upstream.get("/metrics", ENGINE_TIMEOUT).await {
        Ok(body) => Some(engine_metrics(
            &String::from_utf8_lossy(&body),
            ENGINE_PREFIX,
        )),
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "the engine's /metrics did not answer");
            None
        }
    }
}

/// The `/metrics` response for this moment.
pub async fn scrape(gateway: &Gateway, view: &ClusterView, upstream: &Upstream) -> Response {
    let engine = if view.serving() {
        fetch_engine(upstream).await
    } else {
        None
    };
    let (usage, admission) = gateway.usage_snapshot();
    let now = Now {
        view,
        usage: &usage,
        admission: &admission,
    };
    let text = gateway.metrics().render(&now, engine.as_deref());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

#[derive(Clone)]
struct Exporter {
    gateway: Gateway,
    view: tokio::sync::watch::Receiver<ClusterView>,
    upstream: Upstream,
}

/// Serves only `/metrics`, without API keys, on `addr` (`api.metrics_listen`).
pub async fn serve(
    addr: std::net::SocketAddr,
    gateway: Gateway,
    view: tokio::sync::watch::Receiver<ClusterView>,
    upstream_port: u16,
) -> anyhow::Result<crate::server::Server> {
    let listener = crate::server::bind(addr, "the metrics (api.metrics_listen)").await?;
    tracing::info!(%addr, "metrics listening");
    // Its own connection to the engine: a scrape never waits behind the proxy's requests.
    let state = Exporter {
        gateway,
        view,
        upstream: Upstream::new(upstream_port, 1)?,
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|State(s): State<Exporter>| async move {
                let view = s.view.borrow().clone();
                scrape(&s.gateway, &view, &s.upstream).await
            }),
        )
        .with_state(state);
    Ok(crate::server::spawn(
        listener,
        app,
        crate::server::Signals::default(),
        "metrics",
    ))
}

/// The middleware that counts every request to the protected routes and times it. It runs
/// outside the gateway's guard, so refusals (401, 429, 503) are counted too.
pub async fn track(State(gw): State<Gateway>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = route_label(req.uri().path());
    let key = gw.caller_name(req.headers());
    let resp = next.run(req).await;
    let metrics = gw.metrics();
    metrics.request(route, resp.status(), &key);
    let generating = matches!(route, "/v1/chat/completions" | "/v1/completions");
    if !generating || !resp.status().is_success() {
        metrics.duration(route, started.elapsed());
        return resp;
    }
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let (parts, body) = resp.into_parts();
    let timed = Timed {
        inner: body,
        metrics,
        route,
        started,
        first_pending: sse,
        ended: false,
    };
    Response::from_parts(parts, Body::new(timed))
}

/// A generation's body, timed: its first chunk (the first token of a stream) and its end. A
/// body of its own (not a stream) so that the engine's Content-Length passes through.
struct Timed {
    inner: Body,
    metrics: Metrics,
    route: &'static str,
    started: Instant,
    first_pending: bool,
    ended: bool,
}

impl Timed {
    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.metrics.duration(self.route, self.started.elapsed());
        }
    }
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let item = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        match &item {
            Some(Ok(frame)) => {
                let data = frame.data_ref().is_some_and(|c| !c.is_empty());
                if this.first_pending && data {
                    this.first_pending = false;
                    this.metrics.first_token(this.route, this.started.elapsed());
                }
            }
            Some(Err(_)) | None => this.end(),
        }
        std::task::Poll::Ready(item)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        // A client that left: the request lasted until then.
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const LLAMA: &str = "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n\
# TYPE llamacpp:prompt_tokens_total counter\n\
llamacpp:prompt_tokens_total 46\n\
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.\n\
# TYPE llamacpp:kv_cache_usage_ratio gauge\n\
llamacpp:kv_cache_usage_ratio 0.25\n\
# HELP llamacpp:n_decode_total Total number of llama_decode() calls\n\
# TYPE llamacpp:n_decode_total counter\n\
llamacpp:n_decode_total 9\n";

    #[test]
    fn the_engines_metrics_are_renamed_into_valid_openmetrics() {
        let out = engine_metrics(LLAMA, ENGINE_PREFIX);
        assert_eq!(
            out,
            "# HELP llm_engine_prompt_tokens Number of prompt tokens processed.\n\
# TYPE llm_engine_prompt_tokens counter\n\
llm_engine_prompt_tokens_total 46\n\
# HELP llm_engine_kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.\n\
# TYPE llm_engine_kv_cache_usage_ratio gauge\n\
llm_engine_kv_cache_usage_ratio 0.25\n\
# HELP llm_engine_n_decode Total number of llama_decode() calls\n\
# TYPE llm_engine_n_decode counter\n\
llm_engine_n_decode_total 9\n"
        );
        // A counter without `_total`, labels, an untyped sample and stray comments.
        let odd = "# TYPE x:n_tokens_max counter\nx:n_tokens_max{slot=\"0\"} 3\n# a comment\n\nx:plain 1\n";
        assert_eq!(
            engine_metrics(odd, "p_"),
            "# TYPE p_n_tokens_max counter\np_n_tokens_max_total{slot=\"0\"} 3\np_plain 1\n"
        );
    }

    fn view() -> ClusterView {
        let text = "[cluster]\nname=\"t\"\nengine=\"llama-rpc\"\n[model]\npath=\"/m.gguf\"\n\
                    [[node]]\nrank=0\naddress=\"127.0.0.1\"\nagent_port=7701\n\
                    [[node]]\nrank=1\naddress=\"127.0.0.1\"\nagent_port=7702\n";
        let c = Config::parse(text, std::path::Path::new("t")).expect("config");
        let mut v = ClusterView::initial(&c);
        v.phase = Phase::Serving;
        v.generation = 4;
        v.nodes[0].state = "running".into();
        v.nodes[0].reachable = true;
        v
    }

    #[test]
    fn a_scrape_shows_the_ring_the_gateway_and_what_was_counted() {
        let m = Metrics::default();
        m.request("/v1/chat/completions", StatusCode::OK, "alice");
        m.request("/v1/chat/completions", StatusCode::OK, "alice");
        m.request(
            "/api/v1/cluster",
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        );
        m.duration("/v1/chat/completions", Duration::from_millis(300));
        m.first_token("/v1/chat/completions", Duration::from_millis(40));
        m.event(&ClusterEvent {
            seq: 1,
            at: "t".into(),
            generation: Some(3),
            rank: Some(1),
            message: "m".into(),
            detail: EventDetail::Failure {
                reason: "rank 1 exited".into(),
                cause: "rank_exited".into(),
            },
        });
        m.set_ranks(BTreeMap::from([(
            1,
            RankSample {
                cpu_usec: Some(2_500_000),
                memory_bytes: Some(1 << 20),
            },
        )]));
        let usage = BTreeMap::from([(
            "alice".to_string(),
            Counters {
                requests: 2,
                prompt_tokens: 31,
                completion_tokens: 7,
                rate_limited: 0,
                queue_rejected: 1,
            },
        )]);
        let admission = Snapshot {
            max_in_flight: 4,
            queue_size: 8,
            in_flight: 1,
            queued: 2,
            clients: BTreeMap::new(),
        };
        let v = view();
        let now = Now {
            view: &v,
            usage: &usage,
            admission: &admission,
        };
        let out = m.render(&now, Some(&engine_metrics(LLAMA, ENGINE_PREFIX)));
        for line in [
            "llm_cluster_requests_total{route=\"/v1/chat/completions\",status=\"200\",key=\"alice\"} 2",
            "llm_cluster_requests_total{route=\"/api/v1/cluster\",status=\"401\",key=\"unauthenticated\"} 1",
            "llm_cluster_request_duration_seconds_count{route=\"/v1/chat/completions\"} 1",
            "llm_cluster_time_to_first_token_seconds_count{route=\"/v1/chat/completions\"} 1",
            "llm_cluster_ring_restarts_total{cause=\"rank_exited\"} 1",
            "llm_cluster_model_switches_total 0",
            "llm_cluster_model_transfers_total{result=\"done\"} 0",
            "llm_cluster_model_transfers_total{result=\"failed\"} 0",
            "llm_cluster_prompt_tokens_total{key=\"alice\"} 31",
            "llm_cluster_completion_tokens_total{key=\"alice\"} 7",
            "llm_cluster_queue_rejected_total{key=\"alice\"} 1",
            "llm_cluster_in_flight 1",
            "llm_cluster_queued 2",
            "llm_cluster_ring_phase{phase=\"serving\"} 1",
            "llm_cluster_ring_phase{phase=\"refused\"} 0",
            "llm_cluster_ring_generation 4",
            "llm_cluster_node_up{rank=\"0\",address=\"127.0.0.1\"} 1",
            "llm_cluster_node_up{rank=\"1\",address=\"127.0.0.1\"} 0",
            "llm_cluster_node_state{rank=\"0\",state=\"running\"} 1",
            "llm_cluster_node_state{rank=\"1\",state=\"unknown\"} 1",
            "llm_cluster_rank_cpu_seconds_total{rank=\"1\"} 2.5",
            "llm_cluster_rank_memory_bytes{rank=\"1\"} 1048576",
            "llm_cluster_engine_metrics_up 1",
            "llm_cluster_cluster_info{cluster=\"t\",engine=\"llama-rpc\",model=\"m\"} 1",
            "llm_engine_prompt_tokens_total 46",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in:\n{out}");
        }
        assert!(out.ends_with("# EOF\n"));
        assert_eq!(out.matches("# EOF").count(), 1, "{out}");
    }

    #[test]
    fn unknown_paths_share_one_label() {
        assert_eq!(route_label("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(route_label("/random/123"), "other");
    }
}
