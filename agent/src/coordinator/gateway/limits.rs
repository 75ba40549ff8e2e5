//! Rate limits: token buckets per key and over all keys, for requests and for tokens. Pure:
//! every decision takes the time as an argument.
//!
//! A bucket holds up to a minute's allowance and refills continuously. A request takes one
//! from the request buckets up front. Tokens are known only as the engine produces them, so
//! the token buckets are charged afterwards — while a stream runs, one per chunk, then set right
//! with the engine's reported usage — and may go below zero; a request is admitted while every
//! token bucket it draws on holds at least one token. (That is why this is not the `governor`
//! crate: its GCRA cells can only be taken before the fact, never charged after it or refunded.)

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// A limit per minute, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Bucket {
    per_minute: u32,
    level: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(per_minute: u32, now: Instant) -> Bucket {
        Bucket {
            per_minute,
            level: f64::from(per_minute),
            at: now,
        }
    }

    fn capacity(&self) -> f64 {
        f64::from(self.per_minute)
    }

    fn per_sec(&self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.per_sec()).min(self.capacity());
        self.at = now;
    }

    /// How long until `n` are available (zero when they are).
    fn wait_for(&self, n: f64) -> Duration {
        if self.level >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - self.level) / self.per_sec())
        }
    }

    /// Charges `n` (negative: a refund), below zero if need be.
    fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level - n).min(self.capacity());
    }

    fn set_limit(&mut self, per_minute: u32, now: Instant) {
        self.refill(now);
        self.per_minute = per_minute;
        self.level = self.level.min(self.capacity());
    }

    fn figures(&self) -> Figures {
        Figures {
            limit: self.per_minute,
            remaining: self.level.max(0.0).floor() as u64,
            reset: self.wait_for(self.capacity()),
        }
    }
}

/// One limit's state as OpenAI's `x-ratelimit-*` headers show it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    pub limit: u32,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// The tighter of the limits a request draws on, per kind (absent: no limit of that kind).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Report {
    pub requests: Option<Figures>,
    pub tokens: Option<Figures>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
        }
    }
}

/// Whose limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    /// The cluster's, over all keys.
    Global,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allowed(Report),
    Limited {
        kind: Kind,
        scope: Scope,
        retry_after: Duration,
        report: Report,
    },
}

#[derive(Debug, Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl Buckets {
    /// Follows the configured rates, keeping what was used so far.
    fn sync(&mut self, rates: Rates, now: Instant) {
        for (slot, rate) in [
            (&mut self.requests, rates.requests_per_minute),
            (&mut self.tokens, rates.tokens_per_minute),
        ] {
            match (slot.as_mut(), rate) {
                (_, None) => *slot = None,
                (None, Some(r)) => *slot = Some(Bucket::new(r, now)),
                (Some(b), Some(r)) => {
                    if b.per_minute != r {
                        b.set_limit(r, now);
                    }
                }
            }
        }
    }

    fn refill(&mut self, now: Instant) {
        for b in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            b.refill(now);
        }
    }
}

/// Every key's buckets and the global ones.
#[derive(Debug, Default)]
pub struct Limits {
    global: Buckets,
    keys: HashMap<String, Buckets>,
}

impl Limits {
    /// Takes one request for `key` (limited by `rates`) if every bucket it draws on allows it.
    pub fn check(&mut self, key: &str, rates: Rates, global: Rates, now: Instant) -> Verdict {
        self.global.sync(global, now);
        let mine = self.keys.entry(key.to_string()).or_default();
        mine.sync(rates, now);
        mine.refill(now);
        self.global.refill(now);
        let mut refusal: Option<(Duration, Kind, Scope)> = None;
        for (b, scope) in [(&*mine, Scope::Key), (&self.global, Scope::Global)] {
            for (bucket, kind) in [(&b.requests, Kind::Requests), (&b.tokens, Kind::Tokens)] {
                let wait = bucket.as_ref().map_or(Duration::ZERO, |b| b.wait_for(1.0));
                if wait > refusal.map_or(Duration::ZERO, |r| r.0) {
                    refusal = Some((wait, kind, scope));
                }
            }
        }
        if refusal.is_none() {
            for b in [mine.requests.as_mut(), self.global.requests.as_mut()]
                .into_iter()
                .flatten()
            {
                b.charge(1.0, now);
            }
        }
        let report = report(mine, &self.global);
        match refusal {
            None => Verdict::Allowed(report),
            Some((retry_after, kind, scope)) => Verdict::Limited {
                kind,
                scope,
                retry_after,
                report,
            },
        }
    }

    /// Charges `tokens` to `key` and to the global bucket (negative: a refund of an estimate).
    pub fn charge_tokens(&mut self, key: &str, tokens: f64, now: Instant) {
        let mine = self.keys.get_mut(key).and_then(|b| b.tokens.as_mut());
        for b in [mine, self.global.tokens.as_mut()].into_iter().flatten() {
            b.charge(tokens, now);
        }
    }

    /// Forgets keys no longer in the file (after a reload).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.keys.retain(|k, _| keep(k));
    }
}

fn report(mine: &Buckets, global: &Buckets) -> Report {
    let tighter = |a: Option<&Bucket>, b: Option<&Bucket>| {
        let figs = [a, b].into_iter().flatten().map(Bucket::figures);
        figs.min_by_key(|f| f.remaining)
    };
    Report {
        requests: tighter(mine.requests.as_ref(), global.requests.as_ref()),
        tokens: tighter(mine.tokens.as_ref(), global.tokens.as_ref()),
    }
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1.5s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return format!("{s}s");
    }
    let whole = d.as_secs();
    let (h, m, s) = (whole / 3600, whole / 60 % 60, whole % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

/// Retry-After in whole seconds, never 0 (a client would retry at once and be refused again).
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Rates = Rates {
        requests_per_minute: None,
        tokens_per_minute: None,
    };

    fn rpm(n: u32) -> Rates {
        Rates {
            requests_per_minute: Some(n),
            tokens_per_minute: None,
        }
    }

    fn allowed(v: &Verdict) -> bool {
        matches!(v, Verdict::Allowed(_))
    }

    #[test]
    fn a_key_gets_its_minute_then_waits_for_the_refill() {
        let t0 = Instant::now();
        let mut l = Limits::default();
        for i in 0..3 {
            match l.check("a", rpm(3), NONE, t0) {
                Verdict::Allowed(r) => {
                    let f = r.requests.expect("figures");
                    assert_eq!((f.limit, f.remaining), (3, 2 - i));
                }
                v => panic!("request {i} refused: {v:?}"),
            }
        }
        match l.check("a", rpm(3), NONE, t0) {
            Verdict::Limited {
                kind,
                scope,
                retry_after,
                report,
            } => {
                assert_eq!((kind, scope), (Kind::Requests, Scope::Key));
                // 3 a minute: one every 20 s.
                assert_eq!(retry_after, Duration::from_secs(20));
                assert_eq!(report.requests.expect("figures").remaining, 0);
                assert_eq!(
                    report.requests.expect("figures").reset,
                    Duration::from_secs(60)
                );
            }
            v => panic!("not limited: {v:?}"),
        }
        // Another key is not affected; the first recovers after the wait.
        assert!(allowed(&l.check("b", rpm(3), NONE, t0)));
        assert!(!allowed(&l.check(
            "a",
            rpm(3),
            NONE,
            t0 + Duration::from_secs(19)
        )));
        assert!(allowed(&l.check(
            "a",
            rpm(3),
            NONE,
            t0 + Duration::from_secs(20)
        )));
    }

    #[test]
    fn the_global_limit_counts_every_key() {
        let t0 = Instant::now();
        let mut l = Limits::default();
        assert!(allowed(&l.check("a", NONE, rpm(2), t0)));
        assert!(allowed(&l.check("b", NONE, rpm(2), t0)));
        match l.check("c", NONE, rpm(2), t0) {
            Verdict::Limited { scope, .. } => assert_eq!(scope, Scope::Global),
            v => panic!("not limited: {v:?}"),
        }
    }

    #[test]
    fn tokens_are_charged_after_the_fact_and_may_go_into_debt() {
        let t0 = Instant::now();
        let tpm = Rates {
            requests_per_minute: None,
            tokens_per_minute: Some(600),
        };
        let mut l = Limits::default();
        assert!(allowed(&l.check("a", tpm, NONE, t0)));
        // The stream is estimated chunk by chunk, then the engine's usage sets it right.
        for _ in 0..500 {
            l.charge_tokens("a", 1.0, t0);
        }
        l.charge_tokens("a", 130.0, t0);
        match l.check("a", tpm, NONE, t0) {
            Verdict::Limited {
                kind,
                retry_after,
                report,
                ..
            } => {
                assert_eq!(kind, Kind::Tokens);
                // 30 in debt, refilling at 10/s: 3.1 s until one token is there.
                assert_eq!(retry_after.as_millis(), 3100);
                assert_eq!(report.tokens.expect("figures").remaining, 0);
            }
            v => panic!("not limited: {v:?}"),
        }
        // A refund (the estimate was high) admits at once.
        l.charge_tokens("a", -40.0, t0);
        assert!(allowed(&l.check("a", tpm, NONE, t0)));
    }

    #[test]
    fn a_reload_changes_the_rate_but_keeps_what_was_used() {
        let t0 = Instant::now();
        let mut l = Limits::default();
        for _ in 0..5 {
            assert!(allowed(&l.check("a", rpm(10), NONE, t0)));
        }
        // Down to 4 a minute: 5 left, capped at 4.
        match l.check("a", rpm(4), NONE, t0) {
            Verdict::Allowed(r) => assert_eq!(r.requests.expect("figures").remaining, 3),
            v => panic!("{v:?}"),
        }
        // The limit removed: no figures at all.
        assert_eq!(
            l.check("a", NONE, NONE, t0),
            Verdict::Allowed(Report::default())
        );
    }

    #[test]
    fn resets_read_like_openais() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(20)), "20s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3725)), "1h2m5s");
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(3100)), 4);
    }
}
