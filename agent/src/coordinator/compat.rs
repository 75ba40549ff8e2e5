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
    pub fn for_request(engine: EngineKind, path: &str, model: &str) -> Option<Rewrite> {
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
            model: model.to_string(),
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
            .map(|line| match line.strip_prefix("data: ") {
                Some(data) if data.trim() != "[DONE]" => {
                    match serde_json::from_str::<Value>(data) {
                        Ok(v) => format!("data: {}", self.object(v)),
                        Err(_) => line.to_string(),
                    }
                }
                _ => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Splits a byte stream into SSE events across chunk boundaries.
#[derive(Default)]
pub struct SseFramer {
    buf: String,
}

impl SseFramer {
    /// Feeds a chunk; returns the complete events it finished (each without the blank line).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.push_str(&String::from_utf8_lossy(chunk));
        if self.buf.contains('\r') {
            self.buf = self.buf.replace("\r\n", "\n");
        }
        let mut events = Vec::new();
        while let Some(i) = self.buf.find("\n\n") {
            events.push(self.buf[..i].to_string());
            self.buf.drain(..i + 2);
        }
        events
    }

    /// Whatever is left when the stream ends.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        (!rest.trim().is_empty()).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(path: &str) -> Rewrite {
        Rewrite::for_request(EngineKind::Prima, path, "smol").expect("prima rewrites")
    }

    #[test]
    fn only_prima_and_only_openai_routes() {
        assert!(Rewrite::for_request(EngineKind::LlamaRpc, "/v1/completions", "m").is_none());
        assert!(Rewrite::for_request(EngineKind::Prima, "/v1/models", "m").is_none());
        assert!(Rewrite::for_request(EngineKind::Prima, "/v1/completions?x=1", "m").is_some());
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
