//! Is the ring making progress? Neither engine notices a frozen rank or a cut link between ranks:
//! prima blocks for ever in a receive, llama.cpp's head waits on its rpc worker, and rank 0's
//! `/health` stays 200. So the coordinator watches what the engines and the OS show:
//!
//! - [`Activity`]: work in flight at rank 0 (client requests and probes) and when a byte last
//!   came back from it, shared with the API;
//! - each rank's CPU time, sampled from its node agent while work waits without output.
//!
//! [`StallJudge`] (pure) says the ring is hung when work is in flight, nothing came back for
//! `stall_timeout`, and some rank did not use CPU time over that window (a frozen process, or
//! ranks blocked on a cut link) — or its agent cannot say. A slow rank that still computes is
//! not a hang (a long prompt on a throttled node). Nothing coming back for four times the timeout
//! is a hang whatever the counters say, so every fault ends in bounded time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Work in flight at rank 0's engine and the last sign of life from it.
#[derive(Clone)]
pub struct Activity(Arc<Inner>);

struct Inner {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last byte from rank 0 (or the start of work).
    last_progress_ms: AtomicU64,
    /// Milliseconds since `epoch` when work last ended.
    last_idle_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity(Arc::new(Inner {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_progress_ms: AtomicU64::new(0),
            last_idle_ms: AtomicU64::new(0),
        }))
    }
}

/// Held while one piece of work is in flight; dropping it ends the work.
pub struct Work(Activity);

impl Drop for Work {
    fn drop(&mut self) {
        let inner = &self.0 .0;
        inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.progressed();
        inner.last_idle_ms.store(self.0.now_ms(), Ordering::SeqCst);
    }
}

impl Work {
    /// Something came back for this piece of work.
    pub fn progressed(&self) {
        self.0.progressed();
    }
}

impl Activity {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.0.epoch + Duration::from_millis(ms)
    }

    /// Starts a piece of work (its start counts as progress).
    pub fn begin(&self) -> Work {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        self.progressed();
        Work(self.clone())
    }

    /// Something came back from rank 0.
    pub fn progressed(&self) {
        self.0
            .last_progress_ms
            .store(self.now_ms(), Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::SeqCst)
    }

    pub fn last_progress(&self) -> Instant {
        self.at(self.0.last_progress_ms.load(Ordering::SeqCst))
    }

    /// When work last ended (the start of the coordinator if never).
    pub fn last_idle(&self) -> Instant {
        self.at(self.0.last_idle_ms.load(Ordering::SeqCst))
    }
}

/// One rank's CPU time as its agent reported it, or why it could not.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuSample {
    Used { at: Instant, cpu_usec: u64 },
    Unknown { at: Instant, why: String },
}

/// CPU time a rank must use over the window to count as computing: a process blocked in a
/// receive uses next to none; one doing a transformer layer uses far more.
const MIN_CPU: Duration = Duration::from_millis(20);

/// Decides from the activity and the CPU samples whether the ring is hung. Pure.
#[derive(Debug)]
pub struct StallJudge {
    timeout: Duration,
    /// Per rank, samples taken since work last progressed, oldest first.
    samples: Vec<Vec<CpuSample>>,
}

impl StallJudge {
    pub fn new(timeout: Duration, ranks: usize) -> StallJudge {
        StallJudge {
            timeout,
            samples: vec![Vec::new(); ranks],
        }
    }

    /// Whether CPU samples are worth taking now: work waits without output for a moment.
    pub fn wants_samples(&self, in_flight: bool, since_progress: Duration) -> bool {
        in_flight && since_progress >= Duration::from_secs(1)
    }

    pub fn record(&mut self, rank: usize, sample: CpuSample) {
        if let Some(s) = self.samples.get_mut(rank) {
            s.push(sample);
        }
    }

    /// Forgets samples from before the last progress (they say nothing about this wait).
    pub fn forget_before(&mut self, t: Instant) {
        for s in &mut self.samples {
            s.retain(|x| match x {
                CpuSample::Used { at, .. } | CpuSample::Unknown { at, .. } => *at >= t,
            });
        }
    }

    /// `Some(reason)` when the ring counts as hung at `now`.
    pub fn judge(&self, now: Instant, in_flight: bool, last_progress: Instant) -> Option<String> {
        let waited = now.saturating_duration_since(last_progress);
        if !in_flight || waited < self.timeout {
            return None;
        }
        let secs = waited.as_secs();
        if waited >= self.timeout * 4 {
            return Some(format!(
                "ring stalled: no output from rank 0 for {secs} s with work in flight"
            ));
        }
        let mut idle = Vec::new();
        for (rank, s) in self.samples.iter().enumerate() {
            if let Some(why) = Self::not_computing(s, self.timeout / 2) {
                idle.push(format!("rank {rank} {why}"));
            }
        }
        if idle.is_empty() {
            return None; // slow, but every rank computes
        }
        Some(format!(
            "ring stalled: no output from rank 0 for {secs} s with work in flight; {}",
            idle.join("; ")
        ))
    }

    /// Why the samples do not show a rank computing over at least `span`, if they do not.
    fn not_computing(samples: &[CpuSample], span: Duration) -> Option<String> {
        if let Some(CpuSample::Unknown { why, .. }) = samples.last() {
            return Some(format!("cannot say: {why}"));
        }
        let used: Vec<(Instant, u64)> = samples
            .iter()
            .filter_map(|s| match s {
                CpuSample::Used { at, cpu_usec } => Some((*at, *cpu_usec)),
                CpuSample::Unknown { .. } => None,
            })
            .collect();
        let (Some(first), Some(last)) = (used.first(), used.last()) else {
            return Some("cannot say: no CPU samples".into());
        };
        let covered = last.0.saturating_duration_since(first.0);
        if covered < span {
            return Some(format!(
                "cannot say: CPU samples cover only {:.1} s",
                covered.as_secs_f64()
            ));
        }
        let used = Duration::from_micros(last.1.saturating_sub(first.1));
        (used < MIN_CPU).then(|| {
            format!(
                "used {} ms of CPU time in {:.0} s (frozen, or blocked on a link)",
                used.as_millis(),
                covered.as_secs_f64()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn used(t0: Instant, secs: u64, cpu_ms: u64) -> CpuSample {
        CpuSample::Used {
            at: t0 + Duration::from_secs(secs),
            cpu_usec: cpu_ms * 1000,
        }
    }

    /// Samples every second from `from` to `to` s, with each rank's CPU rising by `rates[r]` ms/s.
    fn judge_with(rates: &[u64], from: u64, to: u64) -> (StallJudge, Instant) {
        let t0 = Instant::now();
        let mut j = StallJudge::new(T, rates.len());
        for s in from..=to {
            for (r, rate) in rates.iter().enumerate() {
                j.record(r, used(t0, s, 1000 + rate * s));
            }
        }
        (j, t0)
    }

    #[test]
    fn no_verdict_while_output_flows_or_nothing_is_in_flight() {
        let (j, t0) = judge_with(&[0, 0], 1, 12);
        assert_eq!(j.judge(t0 + Duration::from_secs(12), false, t0), None);
        assert_eq!(
            j.judge(t0 + Duration::from_secs(9), true, t0),
            None,
            "before the timeout"
        );
    }

    #[test]
    fn a_rank_without_cpu_time_is_a_stall_and_is_named() {
        let (j, t0) = judge_with(&[500, 0, 500], 1, 12);
        let why = j
            .judge(t0 + Duration::from_secs(12), true, t0)
            .expect("stalled");
        assert!(why.contains("rank 1 used 0 ms of CPU time"), "{why}");
        assert!(
            !why.contains("rank 0 used") && !why.contains("rank 2"),
            "{why}"
        );
    }

    #[test]
    fn a_slow_rank_that_computes_is_not_a_stall_until_four_timeouts() {
        // A throttled rank: 30 ms of CPU per second is slow but alive.
        let (j, t0) = judge_with(&[800, 30, 800], 1, 39);
        assert_eq!(j.judge(t0 + Duration::from_secs(39), true, t0), None);
        let why = j
            .judge(t0 + Duration::from_secs(40), true, t0)
            .expect("bounded");
        assert!(why.contains("no output from rank 0 for 40 s"), "{why}");
    }

    #[test]
    fn an_agent_that_cannot_say_does_not_prove_progress() {
        let (mut j, t0) = judge_with(&[500, 500], 1, 12);
        j.record(
            1,
            CpuSample::Unknown {
                at: t0 + Duration::from_secs(12),
                why: "agent unreachable: connection refused".into(),
            },
        );
        let why = j
            .judge(t0 + Duration::from_secs(12), true, t0)
            .expect("stalled");
        assert!(
            why.contains("rank 1 cannot say: agent unreachable"),
            "{why}"
        );
    }

    #[test]
    fn old_samples_are_forgotten_after_progress() {
        let (mut j, t0) = judge_with(&[0, 0], 1, 12);
        j.forget_before(t0 + Duration::from_secs(11));
        // Only 2 samples (11, 12 s) remain: not enough to say anything, so it is a stall only
        // because they cannot show computing — but judged from a later progress, no verdict.
        assert_eq!(
            j.judge(
                t0 + Duration::from_secs(12),
                true,
                t0 + Duration::from_secs(11)
            ),
            None
        );
    }

    #[test]
    fn activity_tracks_work_and_progress() {
        let a = Activity::default();
        assert_eq!(a.in_flight(), 0);
        let w = a.begin();
        assert_eq!(a.in_flight(), 1);
        let p = a.last_progress();
        drop(w);
        assert_eq!(a.in_flight(), 0);
        assert!(a.last_progress() >= p);
        assert!(a.last_idle() >= p);
    }
}
