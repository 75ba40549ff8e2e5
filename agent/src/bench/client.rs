//! One measured streaming request against an OpenAI-compatible `/v1/chat/completions`: when the
//! first token came, when the last did, and how many tokens the engine says there were. The
//! counting and the arithmetic are in [`Sample::from_stream`], pure, so they are tested without
//! an engine.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

/// What one endpoint is asked, the same for every request of a bench.
#[derive(Debug, Clone)]
pub struct Target {
    /// Up to and including `/v1`.
    pub base: String,
    pub api_key: Option<String>,
    pub model: String,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub timeout: Duration,
    /// Also send llama.cpp's `ignore_eos` and `cache_prompt`.
    pub llama_fields: bool,
}

/// The base URL ending in `/v1`, however the user wrote it.
pub fn api_base(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/v1") {
        u.to_string()
    } else {
        format!("{u}/v1")
    }
}

/// A prompt of about `tokens` tokens: common words that tokenizers keep whole, with a tag in
/// front so that no two requests share a cached prefix.
pub fn prompt(tokens: u32, tag: u64) -> String {
    const WORDS: [&str; 8] = ["the", "cat", "sat", "on", "a", "warm", "red", "mat"];
    let mut s = format!("{tag} ");
    for i in 0..tokens.saturating_sub(8) {
        s.push_str(WORDS[i as usize % WORDS.len()]);
        s.push(' ');
    }
    s.push_str("Continue the story.");
    s
}

/// One stream's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub ttft_s: f64,
    pub total_s: f64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: u64,
    /// Where the token counts came from: `usage`, `timings` (llama.cpp's own) or `chunks`
    /// (content chunks counted, the engine said nothing).
    pub tokens_from: &'static str,
    /// Prompt tokens / TTFT.
    pub prefill_tok_s: Option<f64>,
    /// Tokens after the first / time after the first.
    pub decode_tok_s: Option<f64>,
    /// llama.cpp's `timings`, where the engine sends them.
    pub engine_prefill_tok_s: Option<f64>,
    pub engine_decode_tok_s: Option<f64>,
}

/// What a stream showed, as it arrived: seconds since the request was sent.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub first_token_s: Option<f64>,
    pub last_token_s: Option<f64>,
    pub content_chunks: u64,
    pub end_s: f64,
    pub usage: Option<Value>,
    pub timings: Option<Value>,
}

impl Observed {
    /// Takes one SSE `data:` payload (not `[DONE]`) seen `at_s` after the request.
    pub fn event(&mut self, at_s: f64, data: &Value) -> Result<()> {
        if let Some(e) = data.get("error") {
            bail!("the stream ended with an error: {e}");
        }
        if let Some(u) = data.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        if let Some(t) = data.get("timings").filter(|t| !t.is_null()) {
            self.timings = Some(t.clone());
        }
        let has_content = data
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.pointer("/delta/content")
                        .or_else(|| c.get("text"))
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
                })
            });
        if has_content {
            self.content_chunks += 1;
            self.first_token_s.get_or_insert(at_s);
            self.last_token_s = Some(at_s);
        }
        Ok(())
    }
}

impl Sample {
    pub fn from_stream(o: &Observed) -> Result<Sample> {
        let Some(ttft) = o.first_token_s else {
            bail!("the stream carried no token");
        };
        let int = |v: &Option<Value>, key: &str| {
            v.as_ref().and_then(|v| v.get(key)).and_then(Value::as_u64)
        };
        let float = |key: &str| {
            o.timings
                .as_ref()
                .and_then(|t| t.get(key))
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite() && *v > 0.0)
        };
        let (prompt_tokens, completion_tokens, tokens_from) = match (
            int(&o.usage, "prompt_tokens"),
            int(&o.usage, "completion_tokens"),
        ) {
            (p, Some(c)) => (p, c, "usage"),
            _ => match int(&o.timings, "predicted_n") {
                Some(c) => (int(&o.timings, "prompt_n"), c, "timings"),
                None => (None, o.content_chunks, "chunks"),
            },
        };
        let decode_span = o.last_token_s.unwrap_or(ttft) - ttft;
        Ok(Sample {
            ttft_s: ttft,
            total_s: o.end_s,
            prompt_tokens,
            completion_tokens,
            tokens_from,
            prefill_tok_s: prompt_tokens
                .filter(|_| ttft > 0.0)
                .map(|p| p as f64 / ttft),
            decode_tok_s: (completion_tokens > 1 && decode_span > 0.0)
                .then(|| (completion_tokens - 1) as f64 / decode_span),
            engine_prefill_tok_s: float("prompt_per_second"),
            engine_decode_tok_s: float("predicted_per_second"),
        })
    }
}

/// The model to ask for: the first `/v1/models` lists.
pub async fn first_model(http: &reqwest::Client, t: &Target) -> Result<String> {
    let url = format!("{}/models", t.base);
    let mut req = http.get(&url).timeout(Duration::from_secs(30));
    if let Some(k) = &t.api_key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .with_context(|| format!("GET {url}: the answer is not JSON"))?;
    if !status.is_success() {
        bail!("GET {url}: {status}: {body}");
    }
    body.pointer("/data/0/id")
        .and_then(Value::as_str)
        .map(String::from)
        .with_context(|| format!("GET {url}: no model listed (give --model): {body}"))
}

/// Sends one streaming request and measures it; `tag` keeps its prompt apart from the others.
pub async fn measure(http: &reqwest::Client, t: &Target, tag: u64) -> Result<Sample> {
    let url = format!("{}/chat/completions", t.base);
    let mut body = json!({
        "model": t.model,
        "messages": [{"role": "user", "content": prompt(t.prompt_tokens, tag)}],
        "max_tokens": t.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": 0,
    });
    if t.llama_fields {
        // llama.cpp's: decode all max_tokens, and prefill the whole prompt every time.
        body["ignore_eos"] = json!(true);
        body["cache_prompt"] = json!(false);
    }
    let mut req = http.post(&url).json(&body).timeout(t.timeout);
    if let Some(k) = &t.api_key {
        req = req.bearer_auth(k);
    }
    let sent = Instant::now();
    let resp = req.send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("POST {url}: {status}: {}", text.trim());
    }
    let mut events = resp.bytes_stream().eventsource();
    let mut seen = Observed::default();
    while let Some(ev) = events.next().await {
        let ev = ev.with_context(|| format!("POST {url}: the event stream broke"))?;
        if ev.data.trim() == "[DONE]" {
            break;
        }
        if ev.data.trim().is_empty() {
            continue;
        }
        let data: Value = serde_json::from_str(&ev.data)
            .with_context(|| format!("POST {url}: an event that is not JSON: {}", ev.data))?;
        seen.event(sent.elapsed().as_secs_f64(), &data)?;
    }
    seen.end_s = sent.elapsed().as_secs_f64();
    Sample::from_stream(&seen).with_context(|| format!("POST {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> Value {
        json!({"choices": [{"index": 0, "delta": {"content": content}}]})
    }

    #[test]
    fn decode_rate_counts_the_tokens_after_the_first_over_the_time_after_it() {
        let mut o = Observed::default();
        o.event(0.0, &json!({"choices": [{"delta": {"role": "assistant"}}]}))
            .expect("role chunk");
        o.event(0.5, &chunk("Hi")).expect("token");
        for i in 1..=10 {
            o.event(0.5 + 0.1 * i as f64, &chunk("x")).expect("token");
        }
        o.event(
            1.6,
            &json!({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 11}}),
        )
        .expect("usage");
        o.end_s = 1.6;
        let s = Sample::from_stream(&o).expect("sample");
        assert_eq!(s.ttft_s, 0.5);
        assert_eq!(s.tokens_from, "usage");
        assert_eq!(s.prompt_tokens, Some(100));
        assert!((s.prefill_tok_s.expect("prefill") - 200.0).abs() < 1e-9);
        assert!((s.decode_tok_s.expect("decode") - 10.0).abs() < 1e-9);
    }

    #[test]
    fn without_usage_timings_then_chunks_give_the_counts() {
        let mut o = Observed::default();
        o.event(1.0, &chunk("a")).expect("token");
        o.event(2.0, &chunk("b")).expect("token");
        let plain = Sample::from_stream(&o).expect("sample");
        assert_eq!(
            (
                plain.tokens_from,
                plain.completion_tokens,
                plain.prompt_tokens
            ),
            ("chunks", 2, None)
        );
        assert_eq!(plain.prefill_tok_s, None);
        o.event(
            2.0,
            &json!({"choices": [{"delta": {}}], "timings": {"prompt_n": 7, "predicted_n": 3,
                     "prompt_per_second": 70.0, "predicted_per_second": 3.5}}),
        )
        .expect("timings");
        let t = Sample::from_stream(&o).expect("sample");
        assert_eq!(
            (t.tokens_from, t.completion_tokens, t.prompt_tokens),
            ("timings", 3, Some(7))
        );
        assert_eq!(t.engine_decode_tok_s, Some(3.5));
        assert_eq!(t.decode_tok_s, Some(2.0));
    }

    #[test]
    fn an_error_event_or_no_token_fails_the_sample() {
        let mut o = Observed::default();
        assert!(o
            .event(0.1, &json!({"error": {"message": "ring restarting"}}))
            .is_err());
        assert!(Sample::from_stream(&o).is_err());
    }

    #[test]
    fn base_urls_end_in_v1() {
        assert_eq!(api_base("http://h:1"), "http://h:1/v1");
        assert_eq!(api_base("http://h:1/v1/"), "http://h:1/v1");
        assert!(prompt(64, 3).starts_with("3 the cat"));
    }
}
