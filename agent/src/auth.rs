//! Shared-secret checks for the node control API and the public endpoint's API keys (whose
//! file formats live in `coordinator::gateway::keys`).
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
        Secret(digest(value))
    }

    /// A secret known only by its SHA-256 (an API keys file may hold digests, not keys).
    pub fn from_digest(digest: [u8; 32]) -> Secret {
        Secret(digest)
    }

    pub fn matches(&self, candidate: &str) -> bool {
        self.matches_digest(&digest(candidate))
    }

    /// Compares with a candidate's digest (from [`digest`], computed once for many secrets).
    pub fn matches_digest(&self, candidate: &[u8; 32]) -> bool {
        self.0.ct_eq(candidate).into()
    }
}

/// The SHA-256 of a secret, as [`Secret`] keeps it.
pub fn digest(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
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
