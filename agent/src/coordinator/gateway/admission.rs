//! Fair admission to the engine: at most `max_in_flight` generation requests at rank 0, a
//! bounded queue in front, and the queue served round-robin across clients (API keys), so one
//! client's 200 waiting requests delay another client's one by at most one turn.
//!
//! [`Scheduler`] is the pure decision: who is admitted, who waits, who is turned away. When the
//! queue is full, a client with fewer requests waiting than the one holding the most takes the
//! place of that client's newest: a flood fills the queue, but cannot keep others out of it.
//! [`Admission`] runs it for the API: a waiting request holds a ticket; leaving the queue (the
//! client hung up, the queue timeout passed) gives the place back at once, and the end of a
//! response (its [`Permit`] dropped) admits the next.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;

pub type Ticket = u64;

#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// At the engine now.
    Admitted(Ticket),
    /// Waiting; `evicted` is another client's newest waiting ticket it displaced.
    Queued {
        ticket: Ticket,
        evicted: Option<Ticket>,
    },
    /// No place in the queue.
    Full,
}

#[derive(Debug, Default)]
struct Client {
    running: usize,
    waiting: VecDeque<Ticket>,
    /// Most running at once.
    limit: usize,
}

/// The admission state. Tickets are numbered in arrival order.
#[derive(Debug)]
pub struct Scheduler {
    max_in_flight: usize,
    queue_size: usize,
    running: usize,
    waiting: usize,
    clients: HashMap<String, Client>,
    /// Clients with requests waiting, in turn order: the front is served first.
    turns: VecDeque<String>,
    /// Every live ticket: its client, and whether it runs.
    tickets: HashMap<Ticket, (String, bool)>,
    next: Ticket,
}

impl Scheduler {
    pub fn new(max_in_flight: usize, queue_size: usize) -> Scheduler {
        Scheduler {
            max_in_flight: max_in_flight.max(1),
            queue_size,
            running: 0,
            waiting: 0,
            clients: HashMap::new(),
            turns: VecDeque::new(),
            tickets: HashMap::new(),
            next: 0,
        }
    }

    /// A request from `client`, who may run `limit` at once (`None`: up to `max_in_flight`).
    pub fn arrive(&mut self, client: &str, limit: Option<u32>) -> Arrival {
        let ticket = self.next;
        self.next += 1;
        let limit = limit.map_or(usize::MAX, |l| l.max(1) as usize);
        let c = self.clients.entry(client.to_string()).or_default();
        c.limit = limit;
        // Only when nobody of this client waits: a client's requests keep their order.
        if self.running < self.max_in_flight && c.running < c.limit && c.waiting.is_empty() {
            c.running += 1;
            self.running += 1;
            self.tickets.insert(ticket, (client.to_string(), true));
            return Arrival::Admitted(ticket);
        }
        let mut evicted = None;
        if self.waiting >= self.queue_size {
            let mine = c.waiting.len();
            let longest = self
                .clients
                .iter()
                .filter(|(name, _)| name.as_str() != client)
                .max_by_key(|(_, other)| other.waiting.len())
                .filter(|(_, other)| other.waiting.len() > mine + 1)
                .map(|(name, _)| name.clone());
            let Some(victim) = longest else {
                self.forget_if_idle(client);
                return Arrival::Full;
            };
            let t = self
                .clients
                .get_mut(&victim)
                .and_then(|v| v.waiting.pop_back());
            if let Some(t) = t {
                self.tickets.remove(&t);
                self.waiting -= 1;
                evicted = Some(t);
            }
            self.drop_turn_if_empty(&victim);
        }
        let c = self.clients.entry(client.to_string()).or_default();
        c.waiting.push_back(ticket);
        if c.waiting.len() == 1 {
            self.turns.push_back(client.to_string());
        }
        self.waiting += 1;
        self.tickets.insert(ticket, (client.to_string(), false));
        Arrival::Queued { ticket, evicted }
    }

    /// `ticket` ends: its response finished, or it left the queue. Returns the tickets admitted
    /// in its place. Unknown tickets (already ended, evicted) are ignored.
    pub fn finish(&mut self, ticket: Ticket) -> Vec<Ticket> {
        let Some((client, running)) = self.tickets.remove(&ticket) else {
            return Vec::new();
        };
        if let Some(c) = self.clients.get_mut(&client) {
            if running {
                c.running -= 1;
                self.running -= 1;
            } else if let Some(i) = c.waiting.iter().position(|&t| t == ticket) {
                c.waiting.remove(i);
                self.waiting -= 1;
            }
        }
        self.drop_turn_if_empty(&client);
        self.forget_if_idle(&client);
        self.dispatch()
    }

    /// Admits waiting tickets while there is room, one per client per turn.
    fn dispatch(&mut self) -> Vec<Ticket> {
        let mut admitted = Vec::new();
        while self.running < self.max_in_flight {
            // The first client in turn order that may run one more.
            let Some(i) = self.turns.iter().position(|name| {
                self.clients
                    .get(name)
                    .is_some_and(|c| c.running < c.limit && !c.waiting.is_empty())
            }) else {
                break;
            };
            let Some(name) = self.turns.remove(i) else {
                break;
            };
            let Some(c) = self.clients.get_mut(&name) else {
                continue;
            };
            let Some(t) = c.waiting.pop_front() else {
                continue;
            };
            c.running += 1;
            self.running += 1;
            self.waiting -= 1;
            if !c.waiting.is_empty() {
                self.turns.push_back(name.clone());
            }
            if let Some(entry) = self.tickets.get_mut(&t) {
                entry.1 = true;
            }
            admitted.push(t);
        }
        admitted
    }

    fn drop_turn_if_empty(&mut self, client: &str) {
        if self
            .clients
            .get(client)
            .is_none_or(|c| c.waiting.is_empty())
        {
            self.turns.retain(|n| n != client);
        }
    }

    /// Clients are kept only while they have requests (clients may be addresses: unbounded).
    fn forget_if_idle(&mut self, client: &str) {
        if self
            .clients
            .get(client)
            .is_some_and(|c| c.running == 0 && c.waiting.is_empty())
        {
            self.clients.remove(client);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            max_in_flight: self.max_in_flight,
            queue_size: self.queue_size,
            in_flight: self.running,
            queued: self.waiting,
            clients: self
                .clients
                .iter()
                .map(|(n, c)| {
                    (
                        n.clone(),
                        ClientSnapshot {
                            in_flight: c.running,
                            queued: c.waiting.len(),
                        },
                    )
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    pub max_in_flight: usize,
    pub queue_size: usize,
    pub in_flight: usize,
    pub queued: usize,
    pub clients: BTreeMap<String, ClientSnapshot>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClientSnapshot {
    pub in_flight: usize,
    pub queued: usize,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Full,
    /// Another client with fewer requests waiting took its place in a full queue.
    Displaced,
    TimedOut,
    /// The server stops: waiting requests are answered at once.
    ShuttingDown,
}

enum Outcome {
    Admitted,
    Displaced,
}

struct Inner {
    scheduler: Scheduler,
    waiters: HashMap<Ticket, oneshot::Sender<Outcome>>,
}

impl Inner {
    /// Ends `ticket` and tells the tickets admitted in its place; a waiter that is gone by then
    /// gives its place on at once.
    fn finish(&mut self, ticket: Ticket) {
        let mut admitted = self.scheduler.finish(ticket);
        while let Some(t) = admitted.pop() {
            let told = self
                .waiters
                .remove(&t)
                .is_some_and(|w| w.send(Outcome::Admitted).is_ok());
            if !told {
                admitted.extend(self.scheduler.finish(t));
            }
        }
    }
}

/// The scheduler shared by the API's requests.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
}

/// A request's place at the engine; dropping it (the response ended) admits the next.
pub struct Permit {
    inner: Arc<Mutex<Inner>>,
    ticket: Ticket,
}

impl Drop for Permit {
    fn drop(&mut self) {
        lock(&self.inner).finish(self.ticket);
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // The state stays consistent across a panic elsewhere: every change is made under the
    // lock in one step.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Admission {
    pub fn new(max_in_flight: u32, queue_size: u32, timeout: Duration) -> Admission {
        Admission {
            inner: Arc::new(Mutex::new(Inner {
                scheduler: Scheduler::new(max_in_flight as usize, queue_size as usize),
                waiters: HashMap::new(),
            })),
            timeout,
        }
    }

    /// Waits for a place at the engine, at most the queue timeout. Cancel-safe: a request
    /// dropped while waiting (its client left) leaves the queue.
    pub async fn enter(&self, client: &str, limit: Option<u32>) -> Result<Permit, Refusal> {
        let (ticket, rx) = {
            let mut inner = lock(&self.inner);
            match inner.scheduler.arrive(client, limit) {
                Arrival::Admitted(ticket) => {
                    return Ok(Permit {
                        inner: self.inner.clone(),
                        ticket,
                    })
                }
                Arrival::Full => return Err(Refusal::Full),
                Arrival::Queued { ticket, evicted } => {
                    if let Some(w) = evicted.and_then(|e| inner.waiters.remove(&e)) {
                        let _ = w.send(Outcome::Displaced);
                    }
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.insert(ticket, tx);
                    (ticket, rx)
                }
            }
        };
        // From here the ticket is the permit's: its drop ends the ticket, waiting or admitted.
        let permit = Permit {
            inner: self.inner.clone(),
            ticket,
        };
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Outcome::Admitted)) => Ok(permit),
            Ok(Ok(Outcome::Displaced)) => Err(Refusal::Displaced),
            // The sender is only dropped with its ticket ended: counts as displaced.
            Ok(Err(_)) => Err(Refusal::Displaced),
            Err(_) => {
                lock(&self.inner).waiters.remove(&ticket);
                Err(Refusal::TimedOut)
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        lock(&self.inner).scheduler.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(a: Arrival) -> Ticket {
        match a {
            Arrival::Admitted(t) | Arrival::Queued { ticket: t, .. } => t,
            Arrival::Full => panic!("full"),
        }
    }

    #[test]
    fn one_clients_flood_does_not_starve_anothers_request() {
        let mut s = Scheduler::new(1, 300);
        let first = ticket(s.arrive("flood", None));
        let flood: Vec<Ticket> = (0..200).map(|_| ticket(s.arrive("flood", None))).collect();
        let mine = ticket(s.arrive("me", None));
        // The running request ends: the queue's oldest of "flood" goes, then "me", not 199 later.
        assert_eq!(s.finish(first), vec![flood[0]]);
        assert_eq!(s.finish(flood[0]), vec![mine]);
        assert_eq!(s.finish(mine), vec![flood[1]]);
        assert_eq!(s.snapshot().queued, 198);
    }

    #[test]
    fn round_robin_across_three_clients_keeps_each_clients_order() {
        let mut s = Scheduler::new(1, 100);
        let running = ticket(s.arrive("a", None));
        let a: Vec<_> = (0..3).map(|_| ticket(s.arrive("a", None))).collect();
        let b: Vec<_> = (0..2).map(|_| ticket(s.arrive("b", None))).collect();
        let c = ticket(s.arrive("c", None));
        let mut order = Vec::new();
        let mut last = running;
        loop {
            let next = s.finish(last);
            match next.as_slice() {
                [t] => {
                    order.push(*t);
                    last = *t;
                }
                [] => break,
                more => panic!("admitted {more:?} with max_in_flight 1"),
            }
        }
        assert_eq!(order, vec![a[0], b[0], c, a[1], b[1], a[2]]);
    }

    #[test]
    fn max_concurrent_holds_a_key_back_without_holding_others() {
        let mut s = Scheduler::new(4, 10);
        let a1 = ticket(s.arrive("a", Some(1)));
        assert!(matches!(s.arrive("a", Some(1)), Arrival::Queued { .. }));
        // Room at the engine, but "a" is at its limit: "b" goes in directly.
        assert!(matches!(s.arrive("b", None), Arrival::Admitted(_)));
        let snap = s.snapshot();
        assert_eq!((snap.in_flight, snap.queued), (2, 1));
        assert_eq!(s.finish(a1).len(), 1, "a's next runs when its first ends");
    }

    #[test]
    fn a_full_queue_turns_away_or_displaces_the_longest_clients_newest() {
        let mut s = Scheduler::new(1, 3);
        ticket(s.arrive("flood", None));
        let f: Vec<_> = (0..3).map(|_| ticket(s.arrive("flood", None))).collect();
        assert_eq!(s.arrive("flood", None), Arrival::Full);
        // "me" has nothing waiting, "flood" has 3: flood's newest gives way.
        match s.arrive("me", None) {
            Arrival::Queued { evicted, .. } => assert_eq!(evicted, Some(f[2])),
            a => panic!("{a:?}"),
        }
        // 2 against 1: no longer worth displacing anyone.
        assert_eq!(s.arrive("me", None), Arrival::Full);
        assert_eq!(s.snapshot().queued, 3);
        // With no queue at all, the engine's places are all there is.
        let mut s = Scheduler::new(1, 0);
        ticket(s.arrive("a", None));
        assert_eq!(s.arrive("b", None), Arrival::Full);
    }

    #[test]
    fn a_ticket_that_leaves_the_queue_gives_its_place_back() {
        let mut s = Scheduler::new(1, 2);
        let run = ticket(s.arrive("a", None));
        let gone = ticket(s.arrive("a", None));
        let stays = ticket(s.arrive("b", None));
        assert!(s.finish(gone).is_empty(), "leaving admits nobody");
        assert_eq!(s.snapshot().queued, 1);
        assert_eq!(s.finish(run), vec![stays]);
        assert!(s.finish(gone).is_empty(), "ending twice is harmless");
        s.finish(stays);
        assert_eq!(s.snapshot().clients.len(), 0, "idle clients are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_requests_are_admitted_timed_out_or_dropped() {
        let adm = Admission::new(1, 8, Duration::from_secs(5));
        let first = adm.enter("a", None).await.expect("admitted");
        // A waiter whose client leaves (its future dropped) leaves the queue.
        let gone = tokio::spawn({
            let adm = adm.clone();
            async move { adm.enter("a", None).await.map(|_| ()) }
        });
        let waiting = tokio::spawn({
            let adm = adm.clone();
            async move { adm.enter("b", None).await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert_eq!(adm.snapshot().queued, 2);
        gone.abort();
        let _ = gone.await;
        assert_eq!(adm.snapshot().queued, 1);
        drop(first);
        assert_eq!(waiting.await.expect("task"), Ok(()));
        // Nobody ends: the wait is bounded by the queue timeout.
        let _held = adm.enter("a", None).await.expect("admitted");
        let started = tokio::time::Instant::now();
        assert_eq!(adm.enter("b", None).await.err(), Some(Refusal::TimedOut));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(adm.snapshot().queued, 0);
    }
}
