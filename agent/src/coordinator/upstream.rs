//! The client the API proxies through to rank 0's engine server on loopback.
//!
//! hyper-util's pooled client, configured for this one hop: HTTP/1.1 only, no proxy, no DNS
//! (the address is a loopback socket address, parsed once), TCP_NODELAY, and a pool that
//! keeps idle connections for reuse. reqwest, used here before, parsed a URL and ran its
//! redirect and proxy logic on every request; with it the proxy took 61 µs of CPU per request
//! against nginx's 36-45 (bench/gateway.py, same run).
//!
//! llama-server (and prima.cpp's server, of the same lineage) serves each connection on one
//! thread of a small pool (`max(slots + 2, cores - 1)` threads) for as long as the connection
//! is kept alive: a connection beyond them waits, unserved, until another connection closes
//! (after 100 requests or 5 s idle). So the proxy uses at most [`Upstream::new`]'s
//! `connections` at once and keeps no more idle: a request beyond them waits here, in order,
//! instead of on a connection the engine is not reading.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use axum::http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long an unused connection stays pooled: below the 5 s after which llama-server's
/// HTTP library closes a kept-alive connection, so the pool drops it before the engine does
/// instead of sending a request down a connection that is being closed.
const POOL_IDLE: Duration = Duration::from_secs(4);

/// How long connecting to rank 0's server may take (loopback: only a server that is gone or
/// wedged takes long).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Rank 0's engine server on this machine's loopback, cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    authority: Authority,
    /// One per connection the engine serves at once.
    connections: Arc<Semaphore>,
}

/// Connections to rank 0's server the proxy uses at most, for an engine with `slots`: its
/// HTTP threads are at least `slots + 2`, and one stays free for the coordinator's own health
/// checks and probes.
pub fn engine_connections(slots: u32) -> usize {
    slots as usize + 1
}

impl Upstream {
    pub fn new(port: u16, connections: usize) -> Result<Upstream> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(connections)
            .build(connector);
        let authority = Authority::try_from(format!("127.0.0.1:{port}"))
            .with_context(|| format!("rank 0's server port {port}"))?;
        Ok(Upstream {
            client,
            authority,
            connections: Arc::new(Semaphore::new(connections.max(1))),
        })
    }

    /// The engine's URI for a request's path and query.
    pub fn uri(&self, path: PathAndQuery) -> Uri {
        let mut parts = axum::http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        // Scheme, authority and path are each valid, so the whole is.
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// Sends `req` (its URI from [`Upstream::uri`]) once a connection is free; the response's
    /// body streams as it comes, and the connection is in use until the permit is dropped with
    /// it.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, OwnedSemaphorePermit)> {
        let permit = self
            .connections
            .clone()
            .acquire_owned()
            .await
            .context("the engine's connections are closed")?;
        let resp = self.client.request(req).await?;
        Ok((resp, permit))
    }

    /// GETs `path` and reads its JSON body, all within `timeout`.
    pub async fn get_json(
        &self,
        path: &'static str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let body = self.get(path, timeout).await?;
        serde_json::from_slice(&body).context("not JSON")
    }

    /// GETs `path` and reads its whole body, all within `timeout`; an error status is an error.
    pub async fn get(&self, path: &'static str, timeout: Duration) -> Result<Bytes> {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.method_mut() = Method::GET;
        *req.uri_mut() = self.uri(PathAndQuery::from_static(path));
        let fetched = async {
            let (resp, _connection) = self.send(req).await.context("no answer")?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .context("cannot read the body")?
                .to_bytes();
            if !status.is_success() {
                bail!("HTTP {status}");
            }
            Ok(body)
        };
        tokio::time::timeout(timeout, fetched)
            .await
            .with_context(|| format!("no answer within {} s", timeout.as_secs()))?
    }
}
