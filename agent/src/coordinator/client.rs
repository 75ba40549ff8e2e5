//! The coordinator's client for node control APIs.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::node::facts::NodeFacts;
use crate::node::RankStatus;
use crate::plan::RankSpec;

#[derive(Clone)]
pub struct NodeClient {
    http: reqwest::Client,
    token: String,
}

impl NodeClient {
    pub fn new(token: String) -> Result<NodeClient> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(NodeClient { http, token })
    }

    fn url(addr: SocketAddr, path: &str) -> String {
        format!("http://{addr}{path}")
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        bail!("HTTP {status}: {}", body.trim())
    }

    pub async fn facts(&self, addr: SocketAddr) -> Result<NodeFacts> {
        let resp = self
            .http
            .get(Self::url(addr, "/v1/facts"))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(20))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// Long-polls the rank status: answers on the first change after `after`, or after `wait`.
    pub async fn rank_status(
        &self,
        addr: SocketAddr,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<RankStatus> {
        let mut req = self
            .http
            .get(Self::url(addr, "/v1/rank"))
            .bearer_auth(&self.token);
        if let Some(v) = after {
            req = req.query(&[("after", v), ("wait_ms", wait.as_millis() as u64)]);
        }
        let resp = req.timeout(wait + Duration::from_secs(5)).send().await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn apply(&self, addr: SocketAddr, spec: &RankSpec) -> Result<RankStatus> {
        let resp = self
            .http
            .put(Self::url(addr, "/v1/rank"))
            .bearer_auth(&self.token)
            .json(spec)
            .timeout(Duration::from_secs(60))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn stop(&self, addr: SocketAddr) -> Result<RankStatus> {
        let resp = self
            .http
            .delete(Self::url(addr, "/v1/rank"))
            .bearer_auth(&self.token)
            .timeout(crate::node::STOP_GRACE + Duration::from_secs(15))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }
}
