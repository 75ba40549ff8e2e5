//! Usage per key (requests, prompt and completion tokens, refusals) and the meter that reads
//! tokens out of a response as it streams by. Pure.
//!
//! Token counts come from the engine: OpenAI's `usage` object when the response has one (every
//! non-streamed body; a stream asked for it with `stream_options.include_usage`), else the
//! `timings` llama-server adds to a stream's last event (prompt tokens `cache_n + prompt_n`,
//! completion tokens `predicted_n`). Until then each streamed event with text counts as one
//! completion token — llama-server and prima send one event per token — so limits see a long
//! stream while it runs, not only once it ends.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::coordinator::compat::SseFramer;

/// Largest non-streamed body the meter reads for its `usage` (bodies pass on whole either
/// way; a completion's JSON is far smaller).
const MAX_METERED_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Requests that passed the rate limits (generation requests and `/v1/models`).
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Answered 429.
    pub rate_limited: u64,
    /// Answered 503 by admission: queue full, displaced, or the queue timeout.
    pub queue_rejected: u64,
}

/// Counters per key name, since the agent started.
#[derive(Debug, Default)]
pub struct Usage {
    keys: BTreeMap<String, Counters>,
}

impl Usage {
    pub fn entry(&mut self, key: &str) -> &mut Counters {
        self.keys.entry(key.to_string()).or_default()
    }

    pub fn snapshot(&self) -> BTreeMap<String, Counters> {
        self.keys.clone()
    }
}

/// Tokens of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
}

/// Reads a response's tokens as its bytes pass.
#[derive(Default)]
pub struct Meter {
    sse: bool,
    framer: SseFramer,
    whole: Vec<u8>,
    /// Completion tokens counted from the stream so far.
    estimated: u64,
    reported: Option<Tokens>,
}

impl Meter {
    pub fn new(sse: bool) -> Meter {
        Meter {
            sse,
            ..Meter::default()
        }
    }

    /// Feeds a chunk of the body; returns how many completion tokens it is estimated to add.
    pub fn feed(&mut self, chunk: &[u8]) -> u64 {
        if !self.sse {
            if self.whole.len() + chunk.len() <= MAX_METERED_BODY {
                self.whole.extend_from_slice(chunk);
            }
            return 0;
        }
        let before = self.estimated;
        for event in self.framer.push(chunk) {
            self.event(&event);
        }
        self.estimated - before
    }

    fn event(&mut self, event: &str) {
        for line in event.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data.trim_start()) else {
                continue;
            };
            if has_text(&v) {
                self.estimated += 1;
            }
            if let Some(t) = reported(&v) {
                self.reported = Some(t);
            }
        }
    }

    /// The response's tokens once it ended: the engine's figures if it gave them, else the
    /// completion tokens counted (prompt 0: unknown).
    pub fn finish(&mut self) -> Tokens {
        if self.sse {
            if let Some(e) = self.framer.finish() {
                self.event(&e);
            }
        } else if let Ok(v) = serde_json::from_slice::<Value>(&self.whole) {
            self.reported = reported(&v);
        }
        self.reported.unwrap_or(Tokens {
            prompt: 0,
            completion: self.estimated,
        })
    }

    /// Whether the engine said how many tokens it used.
    pub fn was_reported(&self) -> bool {
        self.reported.is_some()
    }
}

/// A streamed event that carries generated text (chat `delta.content`, completion `text`).
fn has_text(v: &Value) -> bool {
    v.get("choices")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                let text = c
                    .pointer("/delta/content")
                    .or_else(|| c.get("text"))
                    .and_then(Value::as_str);
                text.is_some_and(|t| !t.is_empty())
            })
        })
        // prima's native completion events, before the proxy rewrites them.
        || v.get("content").and_then(Value::as_str).is_some_and(|t| !t.is_empty())
}

fn reported(v: &Value) -> Option<Tokens> {
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        return Some(Tokens {
            prompt: n(u, "prompt_tokens").unwrap_or(0),
            completion: n(u, "completion_tokens").unwrap_or(0),
        });
    }
    let t = v.get("timings")?;
    Some(Tokens {
        prompt: n(t, "cache_n").unwrap_or(0) + n(t, "prompt_n").unwrap_or(0),
        completion: n(t, "predicted_n")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_estimated_per_event_then_set_right_by_the_timings() {
        let mut m = Meter::new(true);
        let chunk = |text: &str| {
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{text:?}}}}}]}}\n\n"
            )
        };
        assert_eq!(m.feed(chunk("Hel").as_bytes()), 1);
        // An event split across chunks counts once it is whole.
        let two = chunk("lo");
        let (a, b) = two.split_at(10);
        assert_eq!(m.feed(a.as_bytes()), 0);
        assert_eq!(m.feed(format!("{b}{}", chunk("!")).as_bytes()), 2);
        assert_eq!(m.feed(chunk("").as_bytes()), 0, "no text, no token");
        m.feed(b"data: {\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"delta\":{}}],\"timings\":{\"cache_n\":30,\"prompt_n\":1,\"predicted_n\":3}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            m.finish(),
            Tokens {
                prompt: 31,
                completion: 3
            }
        );
        assert!(m.was_reported());
    }

    #[test]
    fn usage_wins_over_timings_and_bodies_are_read_whole() {
        let mut m = Meter::new(true);
        m.feed(b"data: {\"choices\":[],\"usage\":{\"completion_tokens\":3,\"prompt_tokens\":31},\"timings\":{\"prompt_n\":1,\"predicted_n\":3}}\n\n");
        assert_eq!(m.finish().prompt, 31);
        let mut m = Meter::new(false);
        let body = br#"{"choices":[{"message":{"content":"hi there,"}}],"usage":{"completion_tokens":3,"prompt_tokens":31,"total_tokens":34}}"#;
        let (a, b) = body.split_at(20);
        assert_eq!(m.feed(a) + m.feed(b), 0);
        assert_eq!(
            m.finish(),
            Tokens {
                prompt: 31,
                completion: 3
            }
        );
        // A stream cut short: what was counted.
        let mut m = Meter::new(true);
        m.feed(
            b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\n",
        );
        assert_eq!(
            m.finish(),
            Tokens {
                prompt: 0,
                completion: 2
            }
        );
        assert!(!m.was_reported());
    }
}
