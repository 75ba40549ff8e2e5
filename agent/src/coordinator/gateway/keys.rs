//! The API keys file, in either of its two formats, parsed and checked without I/O.
//!
//! The original format, one key per line (blank lines and `#` comments ignored), keeps working:
//! such keys have no limits and are named by a fingerprint of the key. A TOML file of `[[key]]`
//! tables gives each key a name, limits and the models it may use, and may hold a key's SHA-256
//! instead of the key, so the file does not leak keys. A file is TOML when its name ends in
//! `.toml` or its first line that is not blank or a comment starts with `[`.
//!
//! Problems are reported like the cluster config's, each with file:line:col, and all of them
//! at once: the gateway keeps its old keys when a reloaded file is bad, and a person fixes the
//! file in one pass.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::auth::{self, Secret};
use crate::config::{toml_problem, ConfigError, Locator, Problem};

/// Shortest key a TOML file may hold: anything shorter is guessable over a LAN. (One-per-line
/// files predate the rule and are taken as they are.)
pub const MIN_KEY_LEN: usize = auth::MIN_TOKEN_LEN;

/// What one key may do; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Requests of this key at the engine at once; more wait in the queue.
    pub max_concurrent: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Key {
    /// Unique in the file: limits and usage are kept per name, and survive a reload.
    pub name: String,
    secret: Secret,
    pub limits: KeyLimits,
    /// The models this key may name; `None` is every model served.
    pub models: Option<Vec<String>>,
}

impl Key {
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// The keys of one file.
#[derive(Debug, Clone)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// The key `candidate` is, if any. Every key is compared (in constant time each), so the
    /// time taken does not tell how many keys there are before the match.
    pub fn identify(&self, candidate: &str) -> Option<&Key> {
        let d = auth::digest(candidate);
        let mut found = None;
        for k in &self.keys {
            if k.secret.matches_digest(&d) {
                found = Some(k);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Key> {
        self.keys.iter()
    }
}

/// Parses a keys file's text. `source` names the file in problems and, by its extension, may
/// choose the TOML format; `models` are the names the cluster serves (a key may only list
/// those).
pub fn parse(text: &str, source: &Path, models: &[&str]) -> Result<KeySet, ConfigError> {
    let fail = |problems| ConfigError {
        source: source.to_path_buf(),
        problems,
    };
    let keys = if is_toml(text, source) {
        parse_toml(text, models).map_err(fail)?
    } else {
        parse_lines(text)
    };
    if keys.is_empty() {
        return Err(fail(vec![Problem {
            line: Some(1),
            column: None,
            message: "no API keys in the file (one key per line, or [[key]] tables); remove \
                      api.api_keys_file to serve without keys"
                .into(),
        }]));
    }
    Ok(KeySet { keys })
}

fn is_toml(text: &str, source: &Path) -> bool {
    source.extension().is_some_and(|e| e == "toml")
        || text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .is_some_and(|l| l.starts_with('['))
}

/// The one-key-per-line format. A key listed twice is one key.
fn parse_lines(text: &str) -> Vec<Key> {
    let mut keys: Vec<Key> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let d = auth::digest(line);
        let name = fingerprint(&d);
        if keys.iter().any(|k| k.name == name) {
            continue;
        }
        keys.push(Key {
            name,
            secret: Secret::from_digest(d),
            limits: KeyLimits::default(),
            models: None,
        });
    }
    keys
}

/// How a key without a name is shown (usage, logs): the start of its SHA-256, which its owner
/// can compute (`printf %s KEY | sha256sum`) and which reveals nothing usable.
fn fingerprint(digest: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(&digest[..6]))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default, rename = "key")]
    keys: Vec<Spanned<RawKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[key]] table")]
struct RawKey {
    name: Spanned<String>,
    key: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    requests_per_minute: Option<Spanned<u32>>,
    tokens_per_minute: Option<Spanned<u32>>,
    max_concurrent: Option<Spanned<u32>>,
    models: Option<Spanned<Vec<Spanned<String>>>>,
}

fn parse_toml(text: &str, served: &[&str]) -> Result<Vec<Key>, Vec<Problem>> {
    let loc = Locator { text };
    let file: RawFile = toml::from_str(text).map_err(|e| vec![toml_problem(text, &e)])?;
    let mut problems = Vec::new();
    let mut keys = Vec::new();
    let mut names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    let mut digests: BTreeMap<[u8; 32], String> = BTreeMap::new();
    if file.keys.is_empty() {
        problems.push(Problem {
            line: Some(1),
            column: None,
            message: "no [[key]] tables: give each key as [[key]] with name = \"…\" and \
                      key = \"…\" (or sha256 = \"…\")"
                .into(),
        });
    }
    for spanned in file.keys {
        let table = spanned.span();
        let k = spanned.into_inner();
        let name = k.name.get_ref().trim().to_string();
        if name.is_empty() {
            problems.push(loc.at(k.name.span(), "name must not be empty"));
        } else if let Some(first) = names.get(&name) {
            let line = loc.at(first.clone(), "").line.unwrap_or(0);
            problems.push(loc.at(
                k.name.span(),
                format!("key name `{name}` is used twice (first at line {line}): limits and usage are kept per name"),
            ));
        } else {
            names.insert(name.clone(), k.name.span());
        }
        let digest = match (&k.key, &k.sha256) {
            (Some(_), Some(h)) => {
                problems.push(loc.at(
                    h.span(),
                    "give either key or sha256, not both (sha256 keeps the key itself out of the file)",
                ));
                None
            }
            (None, None) => {
                problems.push(loc.at(
                    table.clone(),
                    format!("key `{name}` has neither key = \"…\" nor sha256 = \"…\" (the key's SHA-256 in hex: `printf %s KEY | sha256sum`)"),
                ));
                None
            }
            (Some(key), None) => {
                let v = key.get_ref().trim();
                if v.len() < MIN_KEY_LEN {
                    problems.push(loc.at(
                        key.span(),
                        format!(
                            "key is {} characters long; at least {MIN_KEY_LEN} are required \
                             (e.g. `head -c 24 /dev/urandom | base64`)",
                            v.len()
                        ),
                    ));
                    None
                } else {
                    Some(auth::digest(v))
                }
            }
            (None, Some(h)) => {
                let mut d = [0u8; 32];
                match hex::decode_to_slice(h.get_ref().trim(), &mut d) {
                    Ok(()) => Some(d),
                    Err(_) => {
                        problems.push(loc.at(
                            h.span(),
                            "sha256 must be 64 hexadecimal characters (the key's SHA-256)",
                        ));
                        None
                    }
                }
            }
        };
        if let Some(d) = digest {
            if let Some(other) = digests.get(&d) {
                let at = k.key.as_ref().or(k.sha256.as_ref()).map(Spanned::span);
                problems.push(loc.at(
                    at.unwrap_or(table.clone()),
                    format!("the same key as `{other}`: a key may appear once"),
                ));
            }
            digests.insert(d, name.clone());
        }
        for (value, what) in [
            (&k.requests_per_minute, "requests_per_minute"),
            (&k.tokens_per_minute, "tokens_per_minute"),
            (&k.max_concurrent, "max_concurrent"),
        ] {
            if let Some(v) = value.as_ref().filter(|v| *v.get_ref() == 0) {
                problems.push(loc.at(
                    v.span(),
                    format!("{what} must be at least 1 (omit it for no limit)"),
                ));
            }
        }
        let models = k.models.map(|m| {
            if m.get_ref().is_empty() {
                problems.push(loc.at(
                    m.span(),
                    "models = [] would let the key use nothing: list models, or omit it for all",
                ));
            }
            m.into_inner()
                .into_iter()
                .map(|model| {
                    if !served.contains(&model.get_ref().as_str()) {
                        problems.push(loc.at(
                            model.span(),
                            format!(
                                "model `{}` is not served here (this cluster serves {})",
                                model.get_ref(),
                                served
                                    .iter()
                                    .map(|s| format!("`{s}`"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                    model.into_inner()
                })
                .collect()
        });
        if let Some(d) = digest {
            keys.push(Key {
                name,
                secret: Secret::from_digest(d),
                limits: KeyLimits {
                    requests_per_minute: k.requests_per_minute.map(Spanned::into_inner),
                    tokens_per_minute: k.tokens_per_minute.map(Spanned::into_inner),
                    max_concurrent: k.max_concurrent.map(Spanned::into_inner),
                },
                models,
            });
        }
    }
    if problems.is_empty() {
        Ok(keys)
    } else {
        problems.sort_by_key(|p| (p.line.unwrap_or(0), p.column.unwrap_or(0)));
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODELS: &[&str] = &["smol"];

    fn keys(text: &str, file: &str) -> Result<KeySet, Vec<String>> {
        parse(text, Path::new(file), MODELS)
            .map_err(|e| e.to_string().lines().map(str::to_string).collect())
    }

    #[test]
    fn one_key_per_line_still_works_with_comments_blanks_and_repeats() {
        let k = keys("# team keys\n\nsk-one\n  sk-two  \nsk-one\n", "api-keys").expect("keys");
        assert_eq!(k.len(), 2);
        let one = k.identify("sk-one").expect("sk-one");
        assert!(one.name.starts_with("sha256:"), "{}", one.name);
        assert_eq!(one.limits, KeyLimits::default());
        assert!(one.may_use("anything"));
        assert!(k.identify("sk-two").is_some());
        assert!(k.identify("# team keys").is_none() && k.identify("").is_none());
        let err = keys("# only a comment\n", "api-keys").expect_err("empty");
        assert!(err[0].starts_with("api-keys:1: no API keys"), "{err:?}");
    }

    #[test]
    fn a_toml_file_gives_names_limits_models_and_digests() {
        let digest = hex::encode(auth::digest("sk-bob-0123456789abcdef"));
        let text = format!(
            "# keys\n[[key]]\nname = \"alice\"\nkey = \"sk-alice-0123456789abcdef\"\n\
             requests_per_minute = 60\ntokens_per_minute = 10000\nmax_concurrent = 2\n\
             models = [\"smol\"]\n\n[[key]]\nname = \"bob\"\nsha256 = \"{digest}\"\n"
        );
        // Detected by its first line as much as by its name.
        for file in ["api-keys", "keys.toml"] {
            let k = keys(&text, file).expect("keys");
            let alice = k.identify("sk-alice-0123456789abcdef").expect("alice");
            assert_eq!(alice.name, "alice");
            assert_eq!(
                alice.limits,
                KeyLimits {
                    requests_per_minute: Some(60),
                    tokens_per_minute: Some(10000),
                    max_concurrent: Some(2)
                }
            );
            assert!(alice.may_use("smol") && !alice.may_use("gpt-5"));
            let bob = k
                .identify("sk-bob-0123456789abcdef")
                .expect("bob by digest");
            assert_eq!(bob.name, "bob");
            assert!(bob.may_use("gpt-5"), "no models: every model");
            assert!(k.identify(&digest).is_none(), "the digest is not the key");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_line_and_column() {
        let text = "[[key]]\n\
                    name = \"a\"\n\
                    key = \"short\"\n\
                    \n\
                    [[key]]\n\
                    name = \"a\"\n\
                    sha256 = \"xyz\"\n\
                    requests_per_minute = 0\n\
                    models = [\"smol\", \"gpt-5\"]\n\
                    \n\
                    [[key]]\n\
                    name = \"c\"\n";
        let p = keys(text, "keys.toml").expect_err("bad");
        assert_eq!(p.len(), 6, "{p:#?}");
        for want in [
            "keys.toml:3:7: key is 5 characters long",
            "keys.toml:6:8: key name `a` is used twice (first at line 2)",
            "keys.toml:7:10: sha256 must be 64 hexadecimal",
            "keys.toml:8:23: requests_per_minute must be at least 1",
            "keys.toml:9:19: model `gpt-5` is not served here (this cluster serves `smol`)",
            "keys.toml:11:1: key `c` has neither",
        ] {
            assert!(
                p.iter().any(|l| l.starts_with(want)),
                "missing {want:?} in {p:#?}"
            );
        }
    }

    #[test]
    fn syntax_and_unknown_fields_are_located_too() {
        let p = keys(
            "[[key]]\nname = \"a\"\nkey = \"sk-0123456789abcdef\"\nrpm = 5\n",
            "k.toml",
        )
        .expect_err("unknown field");
        assert!(p[0].starts_with("k.toml:4:1: unknown field `rpm`"), "{p:?}");
        let p = keys("[[key]]\nname = \"a\n", "k.toml").expect_err("syntax");
        assert!(p[0].starts_with("k.toml:2:"), "{p:?}");
        let p = keys("[[key]]\nname = \"a\"\nkey = \"sk-0123456789abcdef\"\n[[key]]\nname = \"b\"\nkey = \"sk-0123456789abcdef\"\n", "k.toml")
            .expect_err("same key twice");
        assert!(p[0].starts_with("k.toml:6:7: the same key as `a`"), "{p:?}");
    }
}
