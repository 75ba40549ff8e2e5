//! HTTP serving with shutdown designed in, for both of the agent's servers (the node control API
//! and the head's public API).
//!
//! Shutdown has two steps, as in mini-redis: first the server stops accepting and lets what is in
//! flight finish (a completion being streamed to a client is worth finishing when only the agent
//! restarts); after a grace, handlers that would run on (long polls, streams) are told to end now
//! — a stream ends with an error event, never mid-token without a word — and the server task is
//! awaited. Only if it still has not ended is it dropped, so shutdown is always bounded.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The two shutdown signals a server's handlers may watch.
#[derive(Clone, Default)]
pub struct Signals {
    /// No new connections; requests in flight go on.
    pub stopping: CancellationToken,
    /// The grace is over: end long polls and streams now.
    pub ending: CancellationToken,
}

/// A running server and what it takes to stop it.
pub struct Server {
    name: &'static str,
    signals: Signals,
    task: tokio::task::JoinHandle<()>,
}

/// Binds `addr`, saying which setting names it when that fails.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

/// Serves `router` on `listener` until [`Server::shutdown`].
pub fn spawn(
    listener: TcpListener,
    router: Router,
    signals: Signals,
    name: &'static str,
) -> Server {
    let stopping = signals.stopping.clone();
    let task = tokio::spawn(async move {
        let res = axum::serve(listener, router)
            .with_graceful_shutdown(stopping.cancelled_owned())
            .await;
        if let Err(e) = res {
            tracing::error!(server = name, error = %e, "server stopped");
        }
    });
    Server {
        name,
        signals,
        task,
    }
}

/// How long handlers get to end after being told to, before the server task is dropped.
const ENDING_GRACE: Duration = Duration::from_secs(3);

impl Server {
    /// Stops accepting, lets requests in flight run for up to `grace`, then ends long polls and
    /// streams and waits for the server to finish. Bounded: at most `grace` + a few seconds.
    pub async fn shutdown(mut self, grace: Duration) {
        self.signals.stopping.cancel();
        if tokio::time::timeout(grace, &mut self.task).await.is_ok() {
            return;
        }
        tracing::info!(
            server = self.name,
            grace_s = grace.as_secs_f64(),
            "requests still in flight after the grace; ending them"
        );
        self.signals.ending.cancel();
        if tokio::time::timeout(ENDING_GRACE, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!(
                server = self.name,
                "server did not finish after ending its requests; dropping it"
            );
            self.task.abort();
        }
    }
}
