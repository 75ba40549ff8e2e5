//! The node control API. Every route requires the cluster's shared control token: the API can
//! start engine processes, so nothing on the LAN may use it without the secret.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{ApplyError, NodeAgent, RankStatus};
use crate::auth::{bearer, Secret};
use crate::plan::RankSpec;

#[derive(Clone)]
pub(super) struct AppState {
    agent: Arc<NodeAgent>,
}

/// A path of the control API and its handlers.
pub(super) type Route = (&'static str, fn() -> MethodRouter<AppState>);

/// Every route of the control API, in one list: `router` adds them all before the token
/// check (a route added after `.layer()` would be open), and the tests send every method to
/// each of them without the token.
pub(super) const ROUTES: &[Route] = &[
    ("/v1/facts", || get(facts)),
    ("/v1/rank", || get(rank_status).put(apply).delete(stop)),
];

pub fn router(agent: Arc<NodeAgent>, token: Secret) -> Router {
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
        .with_state(AppState { agent })
}

/// Binds and serves the control API until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    agent: Arc<NodeAgent>,
    token: Secret,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} for the node control API (agent_port of rank {})",
            agent.rank
        )
    })?;
    tracing::info!(rank = agent.rank, %addr, "node control API listening");
    let app = router(agent, token);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "node control API stopped");
        }
    }))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn facts(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.agent.facts().await)
}

#[derive(Deserialize)]
struct WaitQuery {
    /// Return once the status version is greater than this…
    after: Option<u64>,
    /// …or after this many milliseconds (at most 60 s).
    wait_ms: Option<u64>,
}

/// The rank's status; with `after`, a long poll that answers on the next change.
async fn rank_status(State(s): State<AppState>, Query(q): Query<WaitQuery>) -> Json<RankStatus> {
    let mut rx = s.agent.subscribe();
    if let Some(after) = q.after {
        let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000).min(60_000));
        let _ = tokio::time::timeout(wait, rx.wait_for(|st| st.version > after)).await;
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

async fn stop(State(s): State<AppState>) -> Json<RankStatus> {
    Json(s.agent.stop().await)
}
