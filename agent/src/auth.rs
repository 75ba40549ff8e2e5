//! Shared-secret checks for the node control API and API keys for the public endpoint.
//!
//! Secrets are compared as SHA-256 digests with a constant-time equality, so neither the content
//! nor the length of a secret leaks through timing.

use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest control token accepted: anything shorter is guessable over a LAN.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn new(value: &str) -> Secret {
        Secret(Sha256::digest(value.as_bytes()).into())
    }

    pub fn matches(&self, candidate: &str) -> bool {
        let c: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        self.0.ct_eq(&c).into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Reads and checks the cluster's control token (first non-empty line of the file). The node
/// API verifies it as a [`Secret`]; the coordinator sends it to the other agents.
pub fn load_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the control token file {} (cluster.token_file): every node needs the same \
             token; create one with `head -c 32 /dev/urandom | base64 > {}`",
            path.display(),
            path.display()
        )
    })?;
    token_from_text(&text, path)
}

/// The token in a token file's text (first non-empty line), checked; `path` names the file in
/// errors.
pub fn token_from_text(text: &str, path: &Path) -> Result<String> {
    let token = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if token.len() < MIN_TOKEN_LEN {
        bail!(
            "{}: the control token is {} characters long; at least {MIN_TOKEN_LEN} are required",
            path.display(),
            token.len()
        );
    }
    Ok(token.to_string())
}

/// API keys: one per line, blank lines and `#` comments ignored.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys(Vec<Secret>);

impl ApiKeys {
    pub fn load(path: &Path) -> Result<ApiKeys> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the API keys file {} (api.api_keys_file)",
                path.display()
            )
        })?;
        let keys = ApiKeys::parse(&text);
        if keys.0.is_empty() {
            bail!(
                "{}: no API keys in the file (one key per line); remove api.api_keys_file to serve \
                 without keys",
                path.display()
            );
        }
        Ok(keys)
    }

    pub fn parse(text: &str) -> ApiKeys {
        ApiKeys(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(Secret::new)
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every key is compared, so the time taken does not tell which one matched.
    pub fn allows(&self, candidate: &str) -> bool {
        self.0
            .iter()
            .fold(false, |acc, k| k.matches(candidate) | acc)
    }
}

/// Extracts the token from an `Authorization: Bearer …` header value.
pub fn bearer(header: Option<&axum::http::HeaderValue>) -> Option<&str> {
    let v = header?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A fresh random token (hex, 256 bits).
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_matches_only_itself() {
        let s = Secret::new("correct horse battery staple");
        assert!(s.matches("correct horse battery staple"));
        assert!(!s.matches("correct horse battery stapl"));
        assert!(!s.matches(""));
    }

    #[test]
    fn api_keys_skip_comments_and_blanks() {
        let k = ApiKeys::parse("# team keys\n\nsk-one\n  sk-two  \n");
        assert!(k.allows("sk-one") && k.allows("sk-two"));
        assert!(!k.allows("# team keys") && !k.allows(""));
    }

    #[test]
    fn bearer_parsing() {
        let h = axum::http::HeaderValue::from_static("Bearer abc");
        assert_eq!(bearer(Some(&h)), Some("abc"));
        let h = axum::http::HeaderValue::from_static("Basic abc");
        assert_eq!(bearer(Some(&h)), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn short_token_file_is_rejected_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("token");
        std::fs::write(&p, "short\n").expect("write");
        let err = load_token(&p).expect_err("too short").to_string();
        assert!(
            err.contains("token") && err.contains("at least 16"),
            "{err}"
        );
        std::fs::write(&p, "\n0123456789abcdef0123\n").expect("write");
        assert_eq!(load_token(&p).expect("ok"), "0123456789abcdef0123");
    }
}
