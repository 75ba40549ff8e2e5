//! The coordinator: runs inside the rank-0 agent. It checks the nodes, plans and starts the ring,
//! watches every rank, restarts the whole ring when any rank fails, and serves the public API.
//!
//! Decisions live in the pure [`state::Supervisor`] and [`check`]; [`driver`] performs their
//! actions ([`actions`], through the [`client::Nodes`] trait) and publishes the [`view`] that the
//! [`api`] serves and consults. Requests pass the [`gateway`] (keys, rate limits, fair
//! admission, usage) before the proxy.

pub mod actions;
pub mod api;
pub mod check;
pub mod client;
pub mod compat;
pub mod dashboard;
pub mod delivery;
pub mod driver;
pub mod events;
pub mod gateway;
pub mod metrics;
pub mod placement;
pub mod progress;
pub mod state;
pub mod switch;
pub mod upstream;
pub mod view;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use client::Nodes;
use driver::{Driver, Heartbeat};
pub use view::ClusterView;

pub struct Coordinator {
    driver: Driver,
}

impl Coordinator {
    /// A coordinator switching models through `gate` (the gateway's, so requests wait on it).
    pub fn new(config: Arc<Config>, nodes: Arc<dyn Nodes>, gate: switch::ModelGate) -> Coordinator {
        let (view, _) = watch::channel(ClusterView::initial(&config));
        Coordinator {
            driver: Driver {
                nodes,
                view,
                heartbeat: Heartbeat::default(),
                activity: progress::Activity::default(),
                events: events::Events::default(),
                metrics: metrics::Metrics::default(),
                gate,
                config,
            },
        }
    }

    /// Counts the ring's restarts and rank usage into `metrics` (the API's, from its gateway),
    /// so that one `/metrics` shows both.
    pub fn with_metrics(mut self, metrics: metrics::Metrics) -> Coordinator {
        self.driver.metrics = metrics;
        self
    }

    /// Work in flight at rank 0: the API registers its requests here.
    pub fn activity(&self) -> progress::Activity {
        self.driver.activity.clone()
    }

    /// What happened to the ring: the driver emits, the API streams.
    pub fn events(&self) -> events::Events {
        self.driver.events.clone()
    }

    pub fn view(&self) -> watch::Receiver<ClusterView> {
        self.driver.view.subscribe()
    }

    /// The driver loop's liveness, for the systemd watchdog.
    pub fn heartbeat(&self) -> Heartbeat {
        self.driver.heartbeat.clone()
    }

    /// Supervises the ring until `shutdown` is cancelled (see [`Driver::run`]).
    pub async fn run(self, shutdown: CancellationToken, stop_ring_on_exit: bool) {
        self.driver.run(shutdown, stop_ring_on_exit).await
    }
}
