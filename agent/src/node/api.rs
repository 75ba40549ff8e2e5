//! The node control API. Every route requires the cluster's shared control token: the API can
//! start engine processes, so nothing on the LAN may use it without the secret.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use axum::extract::{Path, Query, Request, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use serde_json::json;

use super::{ApplyError, NodeAgent};
use crate::auth::{bearer, Secret};
use crate::proto::{
    FetchRequest, RankPlacement, RankSpec, RankStatus, RankUsage, WaitQuery, MAX_WAIT,
};
use crate::server::{self, Server, Signals};

#[derive(Clone)]
pub(super) struct AppState {
    agent: Arc<NodeAgent>,
    /// Long polls answer at once when the server is stopping.
    stopping: CancellationToken,
}

/// A path of the control API and its handlers.
pub(super) type Route = (&'static str, fn() -> MethodRouter<AppState>);

/// Every route of the control API, in one list: `router` adds them all before the token
/// check (a route added after `.layer()` would be open), and the tests send every method to
/// each of them without the token.
pub(super) const ROUTES: &[Route] = &[
    ("/v1/facts", || get(facts)),
    ("/v1/rank", || get(rank_status).put(apply).delete(stop)),
    ("/v1/rank/usage", || get(usage)),
    ("/v1/rank/placement", || get(placement)),
    ("/v1/links", || get(links)),
    (crate::proto::TRANSFERS_ROUTE, || get(transfers).post(fetch)),
    ("/v1/models/{name}/file", || get(model_file)),
];

pub fn router(agent: Arc<NodeAgent>, token: Secret, stopping: CancellationToken) -> Router {
    let token = Arc::new(token);
    ROUTES
        .iter()
        .fold(Router::new(), |r, (path, methods)| r.route(path, methods()))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let token = token.clone();
            async move {
                match bearer(req.headers().get(axum::http::header::AUTHORIZATION)) {
                    Some(t) if token.matches(t) => next.run(req).await,
                    _ => error(StatusCode::UNAUTHORIZED, "missing or wrong control token"),
                }
            }
        }))
        .with_state(AppState { agent, stopping })
}

/// Binds and serves the control API until [`Server::shutdown`].
/// With `tls`, only clients with a certificate from the cluster CA complete a connection.
pub async fn serve(
    addr: SocketAddr,
    agent: Arc<NodeAgent>,
    token: Secret,
    tls: Option<crate::tls::Acceptor>,
) -> anyhow::Result<Server> {
    let what = format!("the node control API (agent_port of rank {})", agent.rank);
    let listener = server::bind(addr, &what).await?;
    let mode = if tls.is_some() {
        "mutual TLS"
    } else {
        "plain HTTP"
    };
    tracing::info!(rank = agent.rank, %addr, transport = mode, "node control API listening");
    let signals = Signals::default();
    let app = router(agent, token, signals.stopping.clone());
    Ok(server::spawn_control(
        listener,
        app,
        signals,
        "node control API",
        tls,
    ))
}

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn facts(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.agent.facts().await)
}

/// The rank's status; with `after`, a long poll that answers on the next change.
async fn rank_status(State(s): State<AppState>, Query(q): Query<WaitQuery>) -> Json<RankStatus> {
    let mut rx = s.agent.subscribe();
    if let Some(after) = q.after {
        let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000)).min(MAX_WAIT);
        tokio::select! {
            _ = tokio::time::timeout(wait, rx.wait_for(|st| st.version > after)) => {}
            _ = s.stopping.cancelled() => {}
        }
    }
    let st = rx.borrow().clone();
    Json(st)
}

async fn apply(State(s): State<AppState>, Json(spec): Json<RankSpec>) -> Response {
    match s.agent.apply(spec).await {
        Ok(st) => Json(st).into_response(),
        Err(e @ (ApplyError::Stale { .. } | ApplyError::Conflict(_))) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e @ ApplyError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn links(State(s): State<AppState>) -> Response {
    match s.agent.check_links().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn placement(State(s): State<AppState>) -> Json<RankPlacement> {
    Json(s.agent.placement().await)
}

async fn usage(State(s): State<AppState>) -> Json<RankUsage> {
    Json(s.agent.usage())
}

async fn stop(State(s): State<AppState>) -> Json<RankStatus> {
    Json(s.agent.stop().await)
}

/// Every model delivery to this node since its agent started.
async fn transfers(State(s): State<AppState>) -> Response {
    Json(s.agent.deliveries.all()).into_response()
}

/// Starts fetching a model's file from another node (202), or answers with the fetch already
/// running for it.
async fn fetch(State(s): State<AppState>, Json(req): Json<FetchRequest>) -> Response {
    match s.agent.fetch_model(&req) {
        Ok(fact) => (StatusCode::ACCEPTED, Json(fact)).into_response(),
        Err((status, why)) => error(status, why),
    }
}

/// This node's copy of a model, for another node's fetch.
async fn model_file(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    s.agent.serve_model_file(&name, &headers).await
}
