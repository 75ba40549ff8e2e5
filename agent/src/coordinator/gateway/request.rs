//! What a request to the OpenAI-compatible API must be before the engine sees it: a body the
//! model's context could hold, valid JSON, a model this endpoint serves, and a token budget
//! within the context. Pure functions over bytes and numbers; the API reads the body and sends
//! the refusals.
//!
//! The engine would find most of these problems itself, but late and expensively: it spent 99 s
//! tokenizing a 31 MiB prompt before saying it exceeds the context, answers malformed JSON with
//! a 500, and ignores `model`. Each refusal here is an OpenAI-style error a client can act on.
//!
//! Without the model's tokenizer the gateway cannot count tokens, but it can bound them from
//! below: no token is longer than [`MAX_TOKEN_BYTES`] bytes of text, so a text of `n` bytes is
//! at least `n / MAX_TOKEN_BYTES` tokens. A request refused on that bound could never fit; one
//! that passes may still be refused by the engine, which knows the exact count.

use axum::http::StatusCode;
use serde_json::{json, Value};

/// An upper bound on the bytes of text one token stands for. The longest tokens of common
/// vocabularies are runs of whitespace: SmolLM2's longest is a newline and 80 spaces (81 bytes),
/// Llama 3's and Qwen's are of the same order. Generous, so that the bound never refuses a
/// request that fits.
pub const MAX_TOKEN_BYTES: usize = 128;

/// The smallest body limit a context size yields: room for the parts of a request that are not
/// prompt text (sampling options, a `logit_bias` table, a grammar).
pub const MIN_BODY_BYTES: usize = 1 << 20;

/// What requests are checked against, from the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// The model's name as configured (`model.name`): what clients put in `model`.
    pub model: String,
    /// The engine's context (`model.ctx_size`), in tokens.
    pub ctx_size: u32,
    /// The largest body read (`api.max_body_bytes`, or [`Rules::default_max_body`]).
    pub max_body_bytes: u64,
}

impl Rules {
    /// The body limit for a context of `ctx_size` tokens: a body that fits the context is at
    /// most `MAX_TOKEN_BYTES` bytes per token of JSON-escaped text, and never less than
    /// [`MIN_BODY_BYTES`].
    pub fn default_max_body(ctx_size: u32) -> u64 {
        (u64::from(ctx_size) * MAX_TOKEN_BYTES as u64).max(MIN_BODY_BYTES as u64)
    }
}

/// The routes whose bodies are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn of(path: &str) -> Option<Endpoint> {
        match path.split('?').next().unwrap_or(path) {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completions),
            _ => None,
        }
    }
}

/// A request refused before the engine sees it, as an OpenAI-style error.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: StatusCode,
    /// OpenAI's `type`.
    pub kind: &'static str,
    pub code: &'static str,
    pub param: Option<&'static str>,
    pub message: String,
}

impl Refusal {
    fn invalid(
        status: StatusCode,
        code: &'static str,
        param: Option<&'static str>,
        message: String,
    ) -> Refusal {
        Refusal {
            status,
            kind: "invalid_request_error",
            code,
            param,
            message,
        }
    }

    /// The JSON body OpenAI clients parse.
    pub fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

/// A body larger than the limit, by its declared length (`None`: not declared, read and see).
pub fn check_length(declared: Option<u64>, rules: &Rules) -> Result<(), Refusal> {
    match declared {
        Some(n) if n > rules.max_body_bytes => Err(too_large(Some(n), rules)),
        _ => Ok(()),
    }
}

/// The 413 for a body past the limit; `declared` is its Content-Length when it had one.
pub fn too_large(declared: Option<u64>, rules: &Rules) -> Refusal {
    let size = declared
        .map(|n| format!("{n} bytes"))
        .unwrap_or_else(|| "more than that".into());
    Refusal::invalid(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        None,
        format!(
            "The request body is {size}; this endpoint reads at most {} bytes, more than a \
             request that fits the model's context of {} tokens needs.",
            rules.max_body_bytes, rules.ctx_size
        ),
    )
}

/// The 408 for a body that did not arrive within `timeout_s`.
pub fn body_timed_out(timeout_s: u64) -> Refusal {
    Refusal::invalid(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        None,
        format!("The request body did not arrive within {timeout_s} s; the connection is closed."),
    )
}

/// What the gateway needs from a body that passed.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The `model` asked for, if any (requests without one get the only model served).
    pub model: Option<String>,
}

/// Fields with a token budget: OpenAI's, its newer name, and llama.cpp's own.
const BUDGET_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "n_predict"];

/// Checks a body for `endpoint`: JSON, an object, the fields the route needs, a token budget
/// and a prompt the context could hold.
pub fn check_body(endpoint: Endpoint, body: &[u8], rules: &Rules) -> Result<Checked, Refusal> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        Refusal::invalid(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            None,
            format!("The request body is not valid JSON ({e}); send a JSON object."),
        )
    })?;
    let Value::Object(fields) = &v else {
        return Err(Refusal::invalid(
            StatusCode::BAD_REQUEST,
            "invalid_type",
            None,
            format!(
                "The request body must be a JSON object, not {}.",
                json_kind(&v)
            ),
        ));
    };
    let model = match fields.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(other) => {
            return Err(Refusal::invalid(
                StatusCode::BAD_REQUEST,
                "invalid_type",
                Some("model"),
                format!("`model` must be a string, not {}.", json_kind(other)),
            ))
        }
    };
    let (needed, what) = match endpoint {
        Endpoint::Chat => ("messages", "an array of messages"),
        Endpoint::Completions => ("prompt", "a string, an array of strings or of token ids"),
    };
    let prompt = match fields.get(needed) {
        None | Some(Value::Null) => {
            return Err(Refusal::invalid(
                StatusCode::BAD_REQUEST,
                "missing_required_parameter",
                Some(needed),
                format!("Missing required parameter `{needed}`: {what}."),
            ))
        }
        Some(p) => p,
    };
    if endpoint == Endpoint::Chat && !prompt.is_array() {
        return Err(Refusal::invalid(
            StatusCode::BAD_REQUEST,
            "invalid_type",
            Some("messages"),
            format!("`messages` must be an array, not {}.", json_kind(prompt)),
        ));
    }
    for name in BUDGET_FIELDS {
        check_budget(fields.get(name), name, rules)?;
    }
    let at_least = match endpoint {
        Endpoint::Chat => {
            let text = text_bytes(prompt) + fields.get("tools").map_or(0, text_bytes);
            text.div_ceil(MAX_TOKEN_BYTES)
        }
        Endpoint::Completions => prompt_tokens_at_least(prompt),
    };
    if at_least > rules.ctx_size as usize {
        return Err(Refusal::invalid(
            StatusCode::PAYLOAD_TOO_LARGE,
            "context_length_exceeded",
            Some(needed),
            format!(
                "This model's context is {} tokens; the `{needed}` of this request is at least \
                 {at_least} tokens (no token is longer than {MAX_TOKEN_BYTES} bytes). Shorten it.",
                rules.ctx_size
            ),
        ));
    }
    Ok(Checked { model })
}

/// Checks a token budget field: absent, null, or an integer no larger than the context. (-1,
/// llama.cpp's "until the context is full", is within it.)
fn check_budget(v: Option<&Value>, name: &'static str, rules: &Rules) -> Result<(), Refusal> {
    let n = match v {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n,
        Some(other) => {
            return Err(Refusal::invalid(
                StatusCode::BAD_REQUEST,
                "invalid_type",
                Some(name),
                format!("`{name}` must be an integer, not {}.", json_kind(other)),
            ))
        }
    };
    let too_many = n.as_u64().is_some_and(|n| n > u64::from(rules.ctx_size));
    if too_many {
        return Err(Refusal::invalid(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some(name),
            format!(
                "`{name}` is {n}, more than this model's context of {} tokens; ask for at most {}.",
                rules.ctx_size, rules.ctx_size
            ),
        ));
    }
    Ok(())
}

/// Keys whose strings are not text the model reads as tokens (media as URLs or base64).
const NOT_TEXT: [&str; 3] = ["image_url", "input_audio", "file"];

/// The bytes of every string in `v` (keys of objects excepted), media left out.
fn text_bytes(v: &Value) -> usize {
    // A stack, not recursion: serde_json already bounds nesting, and this stays flat anyway.
    let mut stack = vec![v];
    let mut total = 0usize;
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => total = total.saturating_add(s.len()),
            Value::Array(items) => stack.extend(items),
            Value::Object(m) => stack.extend(
                m.iter()
                    .filter(|(k, _)| !NOT_TEXT.contains(&k.as_str()))
                    .map(|(_, v)| v),
            ),
            _ => {}
        }
    }
    total
}

/// A lower bound on the tokens of the longest prompt in a completions `prompt`: a string, token
/// ids, or a batch of either (each prompt of a batch must fit on its own).
fn prompt_tokens_at_least(prompt: &Value) -> usize {
    match prompt {
        Value::Array(items) if items.iter().all(Value::is_number) => items.len(),
        Value::Array(items) => items.iter().map(prompt_tokens_at_least).max().unwrap_or(0),
        other => text_bytes(other).div_ceil(MAX_TOKEN_BYTES),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether `requested` names the model served: its configured name or a name the engine
/// reports (`engine_names`, from its `/v1/models`).
pub fn check_model(requested: &str, rules: &Rules, engine_names: &[String]) -> Result<(), Refusal> {
    if requested == rules.model || engine_names.iter().any(|n| n == requested) {
        return Ok(());
    }
    Err(Refusal::invalid(
        StatusCode::NOT_FOUND,
        "model_not_found",
        Some("model"),
        format!(
            "The model `{requested}` does not exist on this endpoint; it serves `{}` (see /v1/models).",
            rules.model
        ),
    ))
}

/// The model names an engine's `/v1/models` answer reports: ids, aliases, and llama.cpp's own
/// `models` list.
pub fn engine_model_names(models: &Value) -> Vec<String> {
    let mut names = Vec::new();
    let strings = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
            _ => vec![],
        }
    };
    for m in models["data"].as_array().into_iter().flatten() {
        names.extend(strings(m.get("id")));
        names.extend(strings(m.get("aliases")));
    }
    for m in models["models"].as_array().into_iter().flatten() {
        names.extend(strings(m.get("name")));
        names.extend(strings(m.get("model")));
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            model: "smol".into(),
            ctx_size: 1024,
            max_body_bytes: Rules::default_max_body(1024),
        }
    }

    fn chat(extra: Value) -> Vec<u8> {
        let mut v = json!({ "messages": [{ "role": "user", "content": "Hi" }] });
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
            m.extend(e);
        }
        serde_json::to_vec(&v).expect("json")
    }

    fn refused(endpoint: Endpoint, body: &[u8]) -> Refusal {
        check_body(endpoint, body, &rules()).expect_err("refused")
    }

    #[test]
    fn the_body_limit_follows_the_context() {
        assert_eq!(Rules::default_max_body(1024), MIN_BODY_BYTES as u64);
        assert_eq!(Rules::default_max_body(131_072), 131_072 * 128);
        let r = rules();
        assert!(check_length(None, &r).is_ok());
        assert!(check_length(Some(r.max_body_bytes), &r).is_ok());
        let e = check_length(Some(31 << 20), &r).expect_err("31 MiB");
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            e.message.contains(&format!("{} bytes", 31 << 20)),
            "{}",
            e.message
        );
        assert_eq!(e.body()["error"]["code"], "request_too_large");
    }

    #[test]
    fn malformed_json_and_wrong_shapes_are_400s_that_say_what_is_wrong() {
        let e = refused(Endpoint::Chat, b"{\"messages\": [");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "invalid_json")
        );
        assert!(e.message.contains("line 1"), "{}", e.message);
        let e = refused(Endpoint::Chat, b"");
        assert_eq!(e.code, "invalid_json");
        let e = refused(Endpoint::Chat, b"[1, 2]");
        assert_eq!(
            (e.code, e.message.contains("an array")),
            ("invalid_type", true)
        );
        let e = refused(Endpoint::Chat, b"{\"model\": \"smol\"}");
        assert_eq!(
            (e.code, e.param),
            ("missing_required_parameter", Some("messages"))
        );
        let e = refused(Endpoint::Chat, b"{\"messages\": \"hi\"}");
        assert_eq!((e.code, e.param), ("invalid_type", Some("messages")));
        let e = refused(Endpoint::Completions, b"{\"max_tokens\": 4}");
        assert_eq!(e.param, Some("prompt"));
        let e = refused(Endpoint::Chat, &chat(json!({ "model": 5 })));
        assert_eq!((e.code, e.param), ("invalid_type", Some("model")));
        let e = refused(Endpoint::Chat, &chat(json!({ "max_tokens": "many" })));
        assert_eq!((e.code, e.param), ("invalid_type", Some("max_tokens")));
        // serde_json bounds nesting: a deep body is an error, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            refused(Endpoint::Chat, deep.as_bytes()).code,
            "invalid_json"
        );
    }

    #[test]
    fn a_model_field_is_optional_but_must_name_the_served_model() {
        let ok = check_body(Endpoint::Chat, &chat(json!({})), &rules()).expect("no model");
        assert_eq!(ok.model, None);
        let ok = check_body(Endpoint::Chat, &chat(json!({ "model": "gpt-5" })), &rules())
            .expect("parsed");
        assert_eq!(ok.model.as_deref(), Some("gpt-5"));
        assert!(check_model("smol", &rules(), &[]).is_ok());
        assert!(check_model("alias", &rules(), &["alias".into()]).is_ok());
        let e = check_model("gpt-5", &rules(), &["alias".into()]).expect_err("unknown");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.body()["error"]["code"], "model_not_found");
        assert!(e.message.contains("`smol`"), "{}", e.message);
    }

    #[test]
    fn a_token_budget_beyond_the_context_is_a_400() {
        for field in BUDGET_FIELDS {
            let e = refused(Endpoint::Chat, &chat(json!({ field: 1025 })));
            assert_eq!(
                (e.status, e.code, e.param),
                (StatusCode::BAD_REQUEST, "invalid_value", Some(field))
            );
            assert!(check_body(Endpoint::Chat, &chat(json!({ field: 1024 })), &rules()).is_ok());
        }
        assert!(check_body(Endpoint::Chat, &chat(json!({ "n_predict": -1 })), &rules()).is_ok());
        let e = refused(Endpoint::Chat, &chat(json!({ "max_tokens": 1.5 })));
        assert_eq!(e.code, "invalid_type");
    }

    #[test]
    fn a_prompt_that_cannot_fit_the_context_is_a_413() {
        // Every string counts, the role and part types too: leave them room.
        let fits = "a".repeat(1024 * MAX_TOKEN_BYTES - 64);
        let body = json!({ "messages": [{ "role": "user", "content": fits.clone() }] }).to_string();
        assert!(check_body(Endpoint::Chat, body.as_bytes(), &rules()).is_ok());
        let more = "b".repeat(MAX_TOKEN_BYTES);
        let body = json!({ "messages": [{ "role": "user", "content": format!("{fits}{more}") }] })
            .to_string();
        let e = refused(Endpoint::Chat, body.as_bytes());
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "context_length_exceeded")
        );
        assert!(e.message.contains("at least 1025 tokens"), "{}", e.message);
        // Text in parts and tools counts; images do not.
        let parts = json!({ "messages": [{ "role": "user", "content": [
            { "type": "text", "text": fits.clone() },
            { "type": "image_url", "image_url": { "url": "x".repeat(1 << 20) } } ] }] });
        assert!(check_body(Endpoint::Chat, parts.to_string().as_bytes(), &rules()).is_ok());
        let tools = json!({ "messages": [{ "role": "user", "content": fits.clone() }],
            "tools": [{ "type": "function", "function": { "name": "f", "description": "d".repeat(500) } }] });
        assert_eq!(
            refused(Endpoint::Chat, tools.to_string().as_bytes()).code,
            "context_length_exceeded"
        );
        // Completions: each prompt of a batch on its own; token ids count one each.
        let batch = json!({ "prompt": [fits.clone(), fits.clone()] });
        assert!(check_body(
            Endpoint::Completions,
            batch.to_string().as_bytes(),
            &rules()
        )
        .is_ok());
        let ids = json!({ "prompt": vec![1; 1025] });
        assert_eq!(
            refused(Endpoint::Completions, ids.to_string().as_bytes()).code,
            "context_length_exceeded"
        );
        let ids = json!({ "prompt": vec![1; 1024] });
        assert!(check_body(Endpoint::Completions, ids.to_string().as_bytes(), &rules()).is_ok());
    }

    #[test]
    fn engine_names_come_from_ids_aliases_and_llama_cpps_models_list() {
        let models = json!({
            "models": [{ "name": "smol", "model": "smol" }],
            "object": "list",
            "data": [{ "id": "smol", "aliases": ["tiny"] }, { "id": "gpt-3.5-turbo-0613" }]
        });
        assert_eq!(
            engine_model_names(&models),
            ["gpt-3.5-turbo-0613", "smol", "tiny"]
        );
        assert!(engine_model_names(&json!("not a list")).is_empty());
    }

    #[test]
    fn endpoints_are_recognised_with_or_without_a_query() {
        assert_eq!(Endpoint::of("/v1/chat/completions"), Some(Endpoint::Chat));
        assert_eq!(
            Endpoint::of("/v1/completions?x=1"),
            Some(Endpoint::Completions)
        );
        assert_eq!(Endpoint::of("/v1/models"), None);
    }
}
