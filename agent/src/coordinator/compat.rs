//! Makes an engine's answers OpenAI-shaped where the engine is not.
//!
//! prima.cpp forked llama.cpp before its server spoke OpenAI on `/v1/completions`: it answers
//! with llama.cpp's native `{"content": …}` objects, and names every model
//! "gpt-3.5-turbo-0613". Clients of this endpoint must not have to know which engine runs, so
//! the proxy rewrites those bodies. llama.cpp RPC answers pass through untouched.

use serde_json::{json, Value};

use crate::config::EngineKind;

/// How a response body is to be rewritten.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    /// llama.cpp-native completion objects become OpenAI `text_completion` objects.
    native_completion: bool,
    model: String,
    created: u64,
    id: String,
}

impl Rewrite {
    /// What to rewrite for `path` on `engine`, if anything.
    /// `model` is asked only for a request that is rewritten (the loaded model's name is not
    /// free to get, and most requests need none).
    pub fn for_request(
        engine: EngineKind,
        path: &str,
        model: impl FnOnce() -> String,
    ) -> Option<Rewrite> {
        if engine != EngineKind::Prima {
            return None;
        }
        let path = path.split('?').next().unwrap_or(path);
        let native_completion = match path {
            "/v1/completions" => true,
            "/v1/chat/completions" => false,
            _ => return None,
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Some(Rewrite {
            native_completion,
            model: model(),
            created,
            id: format!("cmpl-{}", hex::encode(rand::random::<[u8; 12]>())),
        })
    }

    /// Rewrites one JSON object (a whole body, or one SSE event's data).
    pub fn object(&self, mut v: Value) -> Value {
        if self.native_completion && v.get("choices").is_none() && v.get("content").is_some() {
            let text = v["content"].as_str().unwrap_or("").to_string();
            let done = v["stop"].as_bool().unwrap_or(true);
            let finish = if !done {
                Value::Null
            } else if v["stopped_limit"].as_bool().unwrap_or(false) {
                json!("length")
            } else {
                json!("stop")
            };
            let mut out = json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }],
            });
            if done {
                let p = v["tokens_evaluated"].as_u64().unwrap_or(0);
                let c = v["tokens_predicted"].as_u64().unwrap_or(0);
                out["usage"] =
                    json!({ "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c });
            }
            return out;
        }
        if let Some(m) = v.get_mut("model") {
            *m = json!(self.model);
        }
        v
    }

    /// Rewrites a whole (non-streamed) body; bodies that are not JSON pass unchanged.
    pub fn body(&self, body: &[u8]) -> Vec<u8> {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => serde_json::to_vec(&self.object(v)).unwrap_or_else(|_| body.to_vec()),
            Err(_) => body.to_vec(),
        }
    }

    /// Rewrites one SSE event (without its terminating blank line).
    pub fn event(&self, event: &str) -> String {
        event
            .lines()
            // `data:` takes one optional space after the colon (SSE spec).
            .map(|line| {
                match line
                    .strip_prefix("data:")
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                {
                    Some(data) if data.trim() != "[DONE]" => {
                        match serde_json::from_str::<Value>(data) {
                            Ok(v) => format!("data: {}", self.object(v)),
                            Err(_) => line.to_string(),
                        }
                    }
                    _ => line.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Splits a byte stream into SSE events across chunk boundaries.
///
/// Bytes are buffered and only whole events are decoded: a network chunk may end inside a
/// multi-byte character. Lines end with CRLF, LF or CR (the SSE spec allows all three, mixed),
/// and an empty line ends an event. Events come out with their lines joined by `\n`, without
/// the blank line. Hand-written rather than a client crate such as `eventsource-stream`: those
/// yield parsed events (comments dropped, `data` lines merged, the trailing partial event
/// discarded), while this proxy must re-emit every line of each event as it came.
#[derive(Default)]
pub struct SseFramer {
    /// Lines of the event being read, each ended by `\n`.
    event: Vec<u8>,
    /// The line being read, without its terminator.
    line: Vec<u8>,
    /// The last byte seen was a CR: an LF right after it belongs to the same line ending.
    after_cr: bool,
}

impl SseFramer {
    /// Feeds a chunk; returns the complete events it finished (each without the blank line).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in chunk {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    if self.line.is_empty() {
                        if let Some(e) = self.take_event() {
                            events.push(e);
                        }
                    } else {
                        self.event.append(&mut self.line);
                        self.event.push(b'\n');
                    }
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    /// Whatever is left when the stream ends.
    pub fn finish(&mut self) -> Option<String> {
        self.event.append(&mut self.line);
        self.after_cr = false;
        self.take_event().filter(|e| !e.trim().is_empty())
    }

    /// The buffered event, decoded whole (invalid UTF-8 in it is the upstream's, not a split).
    fn take_event(&mut self) -> Option<String> {
        if self.event.last() == Some(&b'\n') {
            self.event.pop();
        }
        if self.event.is_empty() {
            return None;
        }
        let bytes = std::mem::take(&mut self.event);
        Some(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(path: &str) -> Rewrite {
        Rewrite::for_request(EngineKind::Prima, path, || "smol".into()).expect("prima rewrites")
    }

    #[test]
    fn only_prima_and_only_openai_routes() {
        assert!(
            Rewrite::for_request(EngineKind::LlamaRpc, "/v1/completions", || "m".into()).is_none()
        );
        assert!(Rewrite::for_request(EngineKind::Prima, "/v1/models", || "m".into()).is_none());
        assert!(
            Rewrite::for_request(EngineKind::Prima, "/v1/completions?x=1", || "m".into()).is_some()
        );
    }

    #[test]
    fn native_completion_becomes_text_completion() {
        let native = br#"{"content":" Paris.","stop":true,"stopped_limit":true,"tokens_predicted":8,"tokens_evaluated":5}"#;
        let out: Value = serde_json::from_slice(&rw("/v1/completions").body(native)).expect("json");
        assert_eq!(out["object"], "text_completion");
        assert_eq!(out["model"], "smol");
        assert_eq!(out["choices"][0]["text"], " Paris.");
        assert_eq!(out["choices"][0]["finish_reason"], "length");
        assert_eq!(out["usage"]["total_tokens"], 13);
    }

    #[test]
    fn streamed_events_are_rewritten_across_chunk_boundaries() {
        let r = rw("/v1/completions");
        let mut f = SseFramer::default();
        let mut events = f.push(b"data: {\"content\":\"Pa\",\"stop\":false}\n\ndata: {\"cont");
        events.extend(f.push(b"ent\":\"ris\",\"stop\":true}\n\n"));
        assert!(f.finish().is_none());
        let texts: Vec<Value> = events
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(r.event(e).trim_start_matches("data: "))
                    .expect("json")
            })
            .collect();
        assert_eq!(texts[0]["choices"][0]["text"], "Pa");
        assert_eq!(texts[0]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(texts[1]["choices"][0]["text"], "ris");
        assert_eq!(texts[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(r.event("data: [DONE]"), "data: [DONE]");
    }

    fn texts(r: &Rewrite, events: &[String]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let out = r.event(e);
                let data = out.lines().find_map(|l| l.strip_prefix("data: "));
                let v: Value = serde_json::from_str(data.unwrap_or(""))
                    .unwrap_or_else(|err| panic!("event {e:?} has no JSON data: {err}"));
                v["choices"][0]["text"].as_str().unwrap_or("").to_string()
            })
            .collect()
    }

    /// A network chunk may end anywhere, inside a multi-byte character or between the CR and
    /// LF of a line ending: every split point gives the same events, for each line ending.
    #[test]
    fn a_character_split_across_chunks_survives_at_every_offset() {
        let r = rw("/v1/completions");
        for eol in ["\n", "\r\n", "\r"] {
            let stream = format!(
                "data: {{\"content\":\"café 😀\",\"stop\":false}}{eol}{eol}\
                 : a comment{eol}data: {{\"content\":\"ß\",\"stop\":true}}{eol}{eol}"
            );
            let bytes = stream.as_bytes();
            for cut in 0..=bytes.len() {
                let mut f = SseFramer::default();
                let mut events = f.push(&bytes[..cut]);
                events.extend(f.push(&bytes[cut..]));
                assert_eq!(f.finish(), None, "eol {eol:?}, cut at {cut}");
                assert_eq!(
                    texts(&r, &events),
                    ["café 😀", "ß"],
                    "eol {eol:?}, cut at {cut}: {events:?}"
                );
                assert!(events[1].starts_with(": a comment\n"), "{events:?}");
            }
            let mut f = SseFramer::default();
            let events: Vec<String> = bytes.iter().flat_map(|b| f.push(&[*b])).collect();
            assert_eq!(
                texts(&r, &events),
                ["café 😀", "ß"],
                "byte by byte, {eol:?}"
            );
        }
    }

    #[test]
    fn mixed_line_endings_and_an_unterminated_tail() {
        let mut f = SseFramer::default();
        let events = f.push(b"data: 1\r\n\ndata: 2\n\r\n\n\ndata:3\r\rdata: 4");
        assert_eq!(events, ["data: 1", "data: 2", "data:3"]);
        assert_eq!(f.finish().as_deref(), Some("data: 4"));
        assert_eq!(f.finish(), None);
        let r = rw("/v1/completions");
        let out: Value = serde_json::from_str(
            r.event(r#"data:{"content":"x"}"#)
                .trim_start_matches("data: "),
        )
        .expect("json");
        assert_eq!(
            out["choices"][0]["text"], "x",
            "`data:` without a space is data too"
        );
    }

    #[test]
    fn chat_keeps_its_shape_but_gets_the_real_model_name() {
        let out: Value = serde_json::from_slice(
            &rw("/v1/chat/completions").body(br#"{"model":"gpt-3.5-turbo-0613","choices":[]}"#),
        )
        .expect("json");
        assert_eq!(out["model"], "smol");
        assert_eq!(out["choices"], json!([]));
    }
}
