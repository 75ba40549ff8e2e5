//! How the coordinator talks to node agents: the [`Nodes`] trait the driver is written against,
//! and [`NodeClient`], its implementation over the token-authenticated control API. The trait
//! exists so the driver loop can be tested against a fake cluster (stale answers, lost nodes,
//! start ordering) without processes or sockets.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;

use super::check::{FactsError, NodeReport};
use crate::proto::{
    FactsVersion, FetchRequest, LinkReport, NodeFacts, RankPlacement, RankSpec, RankStatus,
    RankUsage, TransferFact, WaitQuery, STOP_GRACE,
};

#[async_trait]
pub trait Nodes: Send + Sync + 'static {
    /// The node's facts, or why they are not to be had.
    async fn facts(&self, addr: SocketAddr) -> NodeReport;
    /// The rank's status; with `after`, a long poll answered on the first change after that
    /// version or after `wait`.
    async fn rank_status(
        &self,
        addr: SocketAddr,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<RankStatus>;
    /// Makes `spec` the node's running rank.
    async fn apply(&self, addr: SocketAddr, spec: &RankSpec) -> Result<RankStatus>;
    /// Stops the node's rank.
    async fn stop(&self, addr: SocketAddr) -> Result<RankStatus>;
    /// The CPU time the node's rank has used.
    async fn usage(&self, addr: SocketAddr) -> Result<RankUsage>;
    /// Whether the node reaches every rank its engine will connect to.
    async fn links(&self, addr: SocketAddr) -> Result<LinkReport>;
    /// The placement prima's rank 0 printed when it scheduled the ring.
    async fn placement(&self, addr: SocketAddr) -> Result<RankPlacement>;
    /// Asks the node to fetch a model file from another node; the transfer as it stands.
    async fn fetch(&self, addr: SocketAddr, req: &FetchRequest) -> Result<TransferFact>;
    /// Whether rank 0's engine server, on this machine's loopback `port`, reports healthy.
    async fn head_healthy(&self, port: u16) -> bool;
    /// Sends a one-token completion through the ring (rank 0's server on loopback `port`) and
    /// returns once rank 0 answered, whatever it answered: an answer is progress.
    async fn probe(&self, port: u16) -> Result<()>;
}

#[derive(Clone)]
pub struct NodeClient {
    http: reqwest::Client,
    token: String,
    /// `https` under `[tls]`: the node must show a certificate from the cluster CA for its
    /// configured address, and this client shows rank 0's.
    scheme: &'static str,
}

impl NodeClient {
    pub fn new(token: String, tls: Option<rustls::ClientConfig>) -> Result<NodeClient> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(3));
        let scheme = match tls {
            Some(config) => {
                builder = builder.use_preconfigured_tls(config);
                "https"
            }
            None => "http",
        };
        let http = builder.build().context("cannot build the HTTP client")?;
        Ok(NodeClient {
            http,
            token,
            scheme,
        })
    }

    /// The client of a program on node `rank` that talks to node agents (the coordinator is
    /// rank 0's; a node fetching a model file, `llm-agent model pull`): the token from
    /// `cluster.token_file`, and under `[tls]` that node's certificate.
    pub fn for_rank(config: &crate::config::Config, rank: u32) -> Result<NodeClient> {
        let token = crate::auth::load_token(&config.cluster.token_file)?;
        let tls = crate::tls::client_config_for(config, rank).with_context(|| {
            format!("rank {rank}: cannot set up TLS for connections to the nodes")
        })?;
        NodeClient::new(token, tls)
    }

    fn url(&self, addr: SocketAddr, path: &str) -> String {
        format!("{}://{addr}{path}", self.scheme)
    }

    /// A request to node `addr`'s control API, with the token, for callers that read the answer
    /// themselves (a streamed model file; a status code to tell apart).
    pub fn request(
        &self,
        method: reqwest::Method,
        addr: SocketAddr,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(addr, path))
            .bearer_auth(&self.token)
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        bail!("HTTP {status}: {}", body.trim())
    }

    async fn facts_value(&self, addr: SocketAddr) -> Result<serde_json::Value> {
        let resp = self
            .http
            .get(self.url(addr, "/v1/facts"))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(20))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }
}

#[async_trait]
impl Nodes for NodeClient {
    async fn facts(&self, addr: SocketAddr) -> NodeReport {
        let value = self
            .facts_value(addr)
            .await
            .map_err(|e| FactsError::Unreachable(format!("{e:#}")))?;
        // The versions first: a node of another version is refused by name, not by parse error.
        let version: FactsVersion = serde_json::from_value(value.clone()).unwrap_or(FactsVersion {
            agent_version: None,
            protocol_version: None,
        });
        serde_json::from_value::<NodeFacts>(value).map_err(|e| FactsError::Unreadable {
            agent_version: version.agent_version,
            protocol_version: version.protocol_version,
            error: e.to_string(),
        })
    }

    async fn rank_status(
        &self,
        addr: SocketAddr,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<RankStatus> {
        let mut req = self
            .http
            .get(self.url(addr, "/v1/rank"))
            .bearer_auth(&self.token);
        if after.is_some() {
            req = req.query(&WaitQuery {
                after,
                wait_ms: Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
            });
        }
        let resp = req.timeout(wait + Duration::from_secs(5)).send().await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    async fn apply(&self, addr: SocketAddr, spec: &RankSpec) -> Result<RankStatus> {
        let resp = self
            .http
            .put(self.url(addr, "/v1/rank"))
            .bearer_auth(&self.token)
            .json(spec)
            .timeout(Duration::from_secs(60))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    async fn stop(&self, addr: SocketAddr) -> Result<RankStatus> {
        let resp = self
            .http
            .delete(self.url(addr, "/v1/rank"))
            .bearer_auth(&self.token)
            .timeout(STOP_GRACE + Duration::from_secs(15))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    async fn usage(&self, addr: SocketAddr) -> Result<RankUsage> {
        let resp = self
            .http
            .get(self.url(addr, "/v1/rank/usage"))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(3))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    async fn links(&self, addr: SocketAddr) -> Result<LinkReport> {
        let resp = self
            .http
            .get(self.url(addr, "/v1/links"))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    async fn placement(&self, addr: SocketAddr) -> Result<RankPlacement> {
        let resp = self
            .http
            .get(self.url(addr, "/v1/rank/placement"))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(15))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    async fn fetch(&self, addr: SocketAddr, req: &FetchRequest) -> Result<TransferFact> {
        let resp = self
            .http
            .post(self.url(addr, crate::proto::TRANSFERS_ROUTE))
            .bearer_auth(&self.token)
            .json(req)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    async fn probe(&self, port: u16) -> Result<()> {
        // llama.cpp's and prima.cpp's native completion route; one token runs every layer, so
        // every rank. No prompt cache: the prompt is evaluated, not looked up.
        let body = serde_json::json!({"prompt": "1", "n_predict": 1, "cache_prompt": false});
        self.http
            .post(format!("http://127.0.0.1:{port}/completion"))
            .json(&body)
            .send()
            .await?
            .bytes()
            .await?;
        Ok(())
    }

    async fn head_healthy(&self, port: u16) -> bool {
        let url = format!("http://127.0.0.1:{port}/health");
        match self
            .http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }
}
