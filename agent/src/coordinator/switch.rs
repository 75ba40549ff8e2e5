//! Several models, one ring: which model the ring runs, and when it moves to another.
//!
//! The cluster's memory holds one big model at a time, so a request for a configured model that
//! is not loaded waits here (bounded by the queue timeout) while the driver switches the ring:
//! stop letting requests for the old model through, drain what is in flight (bounded by the
//! switch grace), stop the ring, start it with the new model. [`decide`] is the pure policy
//! (residency, idle unload, the oldest waiting request first); [`ModelGate`] is the shared state
//! the gateway waits on and the driver acts on.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// What the policy sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The model the ring's config runs.
    pub loaded: usize,
    /// The ring was stopped for idleness.
    pub unloaded: bool,
    /// A switch (or a load after an unload) is under way to this model.
    pub target: Option<usize>,
    /// When `loaded` began serving (None: not served yet).
    pub loaded_since: Option<Instant>,
    pub last_request: Instant,
    /// Requests for the loaded model let through and not finished.
    pub passed: usize,
    /// Every waiting request's model and arrival, in no particular order.
    pub waiting: Vec<(usize, Instant)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Nothing,
    /// Start a switch to `to` now.
    Switch {
        to: usize,
        reason: String,
    },
    /// A request waits for `model`, but the loaded model stays until `until` (min_residency_s).
    Hold {
        model: usize,
        until: Instant,
    },
    /// Stop the ring: nobody asked for anything for idle_unload_s.
    Unload,
    /// Start the unloaded ring with `model`.
    Load {
        model: usize,
    },
}

/// The policy. Of the requests waiting for another model, the oldest decides which model comes
/// next, so no model waits behind a busier one for ever; a loaded model keeps the ring at least
/// `min_residency` (alternating requests cannot thrash it); an idle ring is stopped after
/// `idle_unload`.
pub fn decide(
    s: &Snapshot,
    now: Instant,
    min_residency: Duration,
    idle_unload: Option<Duration>,
) -> Decision {
    if s.target.is_some() {
        return Decision::Nothing;
    }
    let oldest = |other_only: bool| {
        s.waiting
            .iter()
            .filter(|(m, _)| !other_only || *m != s.loaded)
            .min_by_key(|(_, at)| *at)
            .map(|(m, _)| *m)
    };
    if s.unloaded {
        return match oldest(false) {
            Some(model) => Decision::Load { model },
            None => Decision::Nothing,
        };
    }
    if let Some(to) = oldest(true) {
        let until = s.loaded_since.map(|t| t + min_residency);
        return match until {
            Some(until) if now < until => Decision::Hold { model: to, until },
            _ => Decision::Switch {
                to,
                reason: "a request waits for it".into(),
            },
        };
    }
    match idle_unload {
        Some(idle)
            if s.passed == 0
                && s.waiting.is_empty()
                && s.loaded_since.is_some()
                && now.duration_since(s.last_request) >= idle =>
        {
            Decision::Unload
        }
        _ => Decision::Nothing,
    }
}

/// Whether a request for `model` may go on to the ring now.
pub fn may_pass(s: &Snapshot, model: usize) -> bool {
    s.loaded == model && s.target.is_none() && !s.unloaded
}

#[derive(Debug)]
struct Shared {
    snap: Snapshot,
    next_id: u64,
    /// Waiter ids, parallel to `snap.waiting`.
    ids: Vec<u64>,
    /// When the loaded model may be switched away from, while a request waits for another.
    hold_until: Option<Instant>,
}

/// The shared state: the gateway lets requests through or makes them wait; the driver moves the
/// ring. Every change bumps a watch so waiters and the driver look again at once.
#[derive(Clone)]
pub struct ModelGate {
    inner: Arc<Mutex<Shared>>,
    changed: watch::Sender<u64>,
    /// Names and aliases, by model index (the config's order).
    names: Arc<[Vec<String>]>,
    max_waiting: usize,
}

/// Why a request could not wait for its model.
#[derive(Debug, Clone, PartialEq)]
pub enum NotLoaded {
    /// Waited the queue timeout; come back after `retry_after_s`.
    TimedOut { retry_after_s: u64 },
    /// As many requests wait for a model as the queue holds.
    Full,
}

impl std::fmt::Debug for ModelGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelGate")
            .field("state", &self.snapshot())
            .finish()
    }
}

/// A request for the loaded model on its way through the ring: the drain waits for these.
pub struct Passed {
    gate: ModelGate,
}

impl Drop for Passed {
    fn drop(&mut self) {
        // Only the last one out is news: a drain waits for none in flight, nothing else reads
        // the count. (Notifying each would wake the driver and every waiter per request.)
        self.gate.update_if(|s| {
            s.snap.passed = s.snap.passed.saturating_sub(1);
            (s.snap.passed == 0, ())
        });
    }
}

/// A waiting request's place, removed however the wait ends.
struct Waiting {
    gate: ModelGate,
    id: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let id = self.id;
        self.gate.update(|s| {
            if let Some(i) = s.ids.iter().position(|x| *x == id) {
                s.ids.remove(i);
                s.snap.waiting.remove(i);
            }
        });
    }
}

impl ModelGate {
    pub fn new(config: &crate::config::Config) -> ModelGate {
        let names: Vec<Vec<String>> = config
            .models
            .iter()
            .map(|m| m.names().cloned().collect())
            .collect();
        ModelGate::for_names(names, config.loaded, config.api.queue_size as usize)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Model `model`'s name, then its aliases.
    pub fn names(&self, model: usize) -> &[String] {
        self.names.get(model).map_or(&[], |n| n.as_slice())
    }

    /// A gate for models known by `names` (name first, then aliases), `loaded` serving.
    pub fn for_names(names: Vec<Vec<String>>, loaded: usize, max_waiting: usize) -> ModelGate {
        let (changed, _) = watch::channel(0);
        ModelGate {
            inner: Arc::new(Mutex::new(Shared {
                snap: Snapshot {
                    loaded,
                    unloaded: false,
                    target: None,
                    loaded_since: None,
                    last_request: Instant::now(),
                    passed: 0,
                    waiting: Vec::new(),
                },
                next_id: 0,
                ids: Vec::new(),
                hold_until: None,
            })),
            changed,
            names: names.into(),
            max_waiting,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update<R>(&self, f: impl FnOnce(&mut Shared) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.send_modify(|v| *v += 1);
        r
    }

    /// Runs `f`, notifying when it says it changed something.
    fn update_if<R>(&self, f: impl FnOnce(&mut Shared) -> (bool, R)) -> R {
        let (changed, r) = f(&mut self.lock());
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
        r
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().snap.clone()
    }

    /// Wakes whenever the gate changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The index of the model a client names.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n.iter().any(|x| x == name))
    }

    pub fn name(&self, model: usize) -> &str {
        self.names
            .get(model)
            .and_then(|n| n.first())
            .map_or("", |n| n.as_str())
    }

    /// The name of the model the ring runs (or is switching to).
    pub fn loaded_name(&self) -> String {
        let m = {
            let s = self.lock();
            s.snap.target.unwrap_or(s.snap.loaded)
        };
        self.name(m).to_string()
    }

    /// Lets a request for `model` (None: whatever is loaded) through once that model serves, or
    /// refuses it when `timeout` passes first.
    pub async fn pass(&self, model: Option<usize>, timeout: Duration) -> Result<Passed, NotLoaded> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.subscribe();
        let mut waiting: Option<Waiting> = None;
        loop {
            // Only a change notifies: a waiter looking again must not wake the others.
            let outcome = self.update_if(|s| {
                s.snap.last_request = Instant::now();
                let m = model.unwrap_or(s.snap.loaded);
                if may_pass(&s.snap, m) {
                    // Nobody waits for a request to pass (a waiter's own leaving notifies).
                    s.snap.passed += 1;
                    return (false, Ok(None));
                }
                if waiting.is_none() {
                    if s.snap.waiting.len() >= self.max_waiting {
                        return (false, Err(NotLoaded::Full));
                    }
                    s.next_id += 1;
                    s.ids.push(s.next_id);
                    s.snap.waiting.push((m, Instant::now()));
                    return (true, Ok(Some(s.next_id)));
                }
                (false, Ok(Some(0)))
            });
            match outcome {
                Err(e) => return Err(e),
                Ok(None) => {
                    drop(waiting);
                    return Ok(Passed { gate: self.clone() });
                }
                Ok(Some(id)) => {
                    if waiting.is_none() {
                        waiting = Some(Waiting {
                            gate: self.clone(),
                            id,
                        });
                    }
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let hold = self.lock().hold_until;
                // When the residency ends, plus a moment for the switch to begin.
                let retry_after_s = hold
                    .map(|h| h.saturating_duration_since(Instant::now()).as_secs() + 1)
                    .unwrap_or(timeout.as_secs().max(1));
                return Err(NotLoaded::TimedOut { retry_after_s });
            }
        }
    }

    /// The driver: a switch (or load) to `to` begins; requests for the old model wait from now.
    pub fn begin(&self, to: usize) {
        self.update(|s| {
            s.snap.target = Some(to);
            s.hold_until = None;
        });
    }

    /// The driver: the ring serves `model` (after a switch, a load, the first start or a
    /// restart after a failure).
    pub fn serving(&self, model: usize) {
        self.update(|s| {
            let switched = s.snap.target.is_some() || s.snap.loaded_since.is_none();
            s.snap.loaded = model;
            s.snap.target = None;
            s.snap.unloaded = false;
            if switched {
                s.snap.loaded_since = Some(Instant::now());
            }
        });
    }

    /// The driver: the ring was stopped for idleness.
    pub fn unloaded(&self) {
        self.update(|s| {
            s.snap.unloaded = true;
            s.snap.loaded_since = None;
        });
    }

    pub fn hold(&self, until: Instant) {
        let mut s = self.lock();
        s.hold_until = Some(until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(now: Instant) -> Snapshot {
        Snapshot {
            loaded: 0,
            unloaded: false,
            target: None,
            loaded_since: Some(now - Duration::from_secs(100)),
            last_request: now,
            passed: 0,
            waiting: vec![],
        }
    }

    const RES: Duration = Duration::from_secs(30);

    #[test]
    fn a_request_for_another_model_switches_after_the_residency() {
        let now = Instant::now();
        let mut s = snap(now);
        assert_eq!(decide(&s, now, RES, None), Decision::Nothing);
        s.waiting = vec![(1, now)];
        assert!(matches!(
            decide(&s, now, RES, None),
            Decision::Switch { to: 1, .. }
        ));
        s.loaded_since = Some(now - Duration::from_secs(10));
        assert_eq!(
            decide(&s, now, RES, None),
            Decision::Hold {
                model: 1,
                until: now + Duration::from_secs(20)
            }
        );
        // Requests for the loaded model never switch.
        s.waiting = vec![(0, now)];
        assert_eq!(decide(&s, now, RES, None), Decision::Nothing);
    }

    #[test]
    fn the_oldest_waiting_request_picks_the_next_model() {
        let now = Instant::now();
        let mut s = snap(now);
        let t = |s: u64| now - Duration::from_secs(s);
        s.waiting = vec![(2, t(1)), (1, t(5)), (2, t(2)), (2, t(3))];
        assert!(matches!(
            decide(&s, now, RES, None),
            Decision::Switch { to: 1, .. }
        ));
        // Waiting for the loaded model does not count as older demand for another.
        s.waiting.push((0, t(50)));
        assert!(matches!(
            decide(&s, now, RES, None),
            Decision::Switch { to: 1, .. }
        ));
    }

    #[test]
    fn nothing_new_while_a_switch_is_under_way() {
        let now = Instant::now();
        let mut s = snap(now);
        s.target = Some(1);
        s.waiting = vec![(2, now)];
        assert_eq!(decide(&s, now, RES, None), Decision::Nothing);
        assert!(
            !may_pass(&s, 0),
            "the old model's requests wait during a switch"
        );
        assert!(!may_pass(&s, 1), "the new model's too, until it serves");
    }

    #[test]
    fn an_idle_ring_unloads_and_the_next_request_loads_its_model() {
        let now = Instant::now();
        let idle = Some(Duration::from_secs(60));
        let mut s = snap(now);
        s.last_request = now - Duration::from_secs(59);
        assert_eq!(decide(&s, now, RES, idle), Decision::Nothing);
        s.last_request = now - Duration::from_secs(61);
        assert_eq!(decide(&s, now, RES, None), Decision::Nothing);
        assert_eq!(decide(&s, now, RES, idle), Decision::Unload);
        s.passed = 1;
        assert_eq!(
            decide(&s, now, RES, idle),
            Decision::Nothing,
            "work in flight"
        );
        s.passed = 0;
        s.unloaded = true;
        assert!(!may_pass(&s, 0));
        assert_eq!(decide(&s, now, RES, idle), Decision::Nothing);
        s.waiting = vec![(1, now)];
        assert_eq!(decide(&s, now, RES, idle), Decision::Load { model: 1 });
    }

    fn gate(queue: u32) -> ModelGate {
        let text = format!(
            "[cluster]\nname = \"lab\"\nengine = \"llama-rpc\"\n[api]\nqueue_size = {queue}\n\
             [[models]]\nname = \"a\"\npath = \"/m/a.gguf\"\n\
             [[models]]\nname = \"b\"\naliases = [\"bee\"]\npath = \"/m/b.gguf\"\n\
             [[node]]\nrank = 0\naddress = \"127.0.0.1\"\n"
        );
        let c = crate::config::Config::parse(&text, std::path::Path::new("c.toml"))
            .expect("valid config");
        ModelGate::new(&c)
    }

    #[tokio::test]
    async fn a_waiting_request_passes_once_its_model_serves_and_never_before() {
        let g = gate(4);
        assert_eq!(g.find("bee"), Some(1));
        let p = g
            .pass(Some(0), Duration::from_secs(1))
            .await
            .expect("loaded");
        assert_eq!(g.snapshot().passed, 1);
        drop(p);
        assert_eq!(g.snapshot().passed, 0);
        let waiter = {
            let g = g.clone();
            tokio::spawn(async move { g.pass(Some(1), Duration::from_secs(30)).await.is_ok() })
        };
        while g.snapshot().waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        g.begin(1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "no pass while the switch runs");
        g.serving(1);
        assert!(waiter.await.expect("joined"));
        assert!(g.snapshot().waiting.is_empty());
        assert_eq!(g.snapshot().loaded, 1);
    }

    #[tokio::test]
    async fn a_wait_ends_in_bounded_time_with_retry_after_and_the_queue_is_bounded() {
        let g = gate(1);
        g.hold(Instant::now() + Duration::from_secs(20));
        let first = {
            let g = g.clone();
            tokio::spawn(async move { g.pass(Some(1), Duration::from_millis(300)).await.err() })
        };
        while g.snapshot().waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            g.pass(Some(1), Duration::from_secs(1)).await.err(),
            Some(NotLoaded::Full)
        );
        match first.await.expect("joined") {
            Some(NotLoaded::TimedOut { retry_after_s }) => {
                assert!((19..=21).contains(&retry_after_s), "{retry_after_s}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(g.snapshot().waiting.is_empty(), "the waiter left the queue");
    }
}
