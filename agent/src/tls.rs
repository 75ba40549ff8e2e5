//! Mutual TLS for the control plane: the cluster's own CA, the node certificates it signs, and
//! the rustls configurations both ends of the control API use.
//!
//! The control API starts processes, and its bearer token alone crossed the LAN in clear text.
//! With `[tls]` configured a node agent completes a handshake only with a client whose
//! certificate the cluster CA signed (rustls refuses any other during the handshake, before a
//! byte of HTTP is read), and the coordinator accepts a node only if its certificate chains to
//! the same CA *and* names the node's configured address, so a machine that takes over an
//! address cannot pose as the node. The token stays as a second factor (see the README).
//!
//! One provider (ring) everywhere, chosen explicitly, so nothing depends on a process-wide
//! default being installed. File reading is kept in thin functions; what is decided about the
//! bytes (chain, names, key, expiry) is in functions that take the bytes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{client::WebPkiServerVerifier, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{Config, Tls};
use crate::proto::{CertExpiry as Expiry, TlsFact};

/// Days of validity `pki init` gives the CA.
pub const CA_DAYS: u32 = 3650;
/// Days of validity `pki issue` gives a node certificate by default.
pub const NODE_DAYS: u32 = 730;
/// Fewer days left than this and the coordinator warns.
pub const WARN_DAYS: i64 = 30;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A node's TLS identity: the CA it trusts and the certificate chain and key it presents.
pub struct Identity {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Reads rank `rank`'s files as `[tls]` names them.
    pub fn load(tls: &Tls, rank: u32) -> Result<Identity> {
        let ca = read_certs(&tls.ca, "tls.ca")?;
        let chain = read_certs(&tls.cert(rank), "tls.cert")?;
        let key = read_key(&tls.key(rank))?;
        Ok(Identity { ca, chain, key })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .context("the CA certificate cannot be used as a trust anchor")?;
        }
        Ok(Arc::new(roots))
    }

    /// The node API's side: only clients with a certificate from the cluster CA.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .context("cannot build the client certificate verifier")?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("no TLS protocol version in common with the provider")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("the node certificate and key cannot be used together")?;
        Ok(Arc::new(config))
    }

    /// The coordinator's side: trusts only the cluster CA, presents this node's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("no TLS protocol version in common with the provider")?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("the node certificate and key cannot be used together")
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// Every certificate in a PEM file (at least one).
pub fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    parse_certs(&read(path, what)?).with_context(|| format!("{what} {}", path.display()))
}

pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        bail!("holds no certificate (expected a -----BEGIN CERTIFICATE----- block)");
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(&read(path, "tls.key")?).map_err(|e| {
        anyhow::anyhow!(
            "tls.key {}: not a PEM private key (PKCS#8, SEC1 or PKCS#1): {e}",
            path.display()
        )
    })
}

/// When `der` stops being valid, seen from `now` (Unix seconds).
pub fn expiry(der: &CertificateDer<'_>, path: &Path, now: i64) -> Result<Expiry> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("{}: not an X.509 certificate: {e}", path.display()))?;
    let not_after = cert.validity().not_after;
    let ts = not_after.timestamp();
    let text = time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| not_after.to_string());
    Ok(Expiry {
        path: path.to_path_buf(),
        not_after: text,
        not_after_unix: ts,
        days_left: (ts - now).div_euclid(86_400),
    })
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Identity {
    /// What the node's facts say about the certificates loaded (`None` if one does not parse
    /// as X.509, which rustls would have refused anyway).
    pub fn fact(&self, tls: &Tls, rank: u32) -> Option<TlsFact> {
        let now = now_unix();
        let fact = (|| {
            Ok::<_, anyhow::Error>(TlsFact {
                cert: expiry(
                    self.chain.first().context("no certificate")?,
                    &tls.cert(rank),
                    now,
                )?,
                ca: expiry(self.ca.first().context("no CA certificate")?, &tls.ca, now)?,
            })
        })();
        fact.map_err(
            |e| tracing::warn!(error = %format!("{e:#}"), "cannot read the certificates' expiry"),
        )
        .ok()
    }
}

/// A warning about a certificate that expires within [`WARN_DAYS`] (or has).
pub fn expiry_warning(what: &str, e: &Expiry) -> Option<String> {
    if e.days_left >= WARN_DAYS {
        return None;
    }
    let when = if e.days_left < 0 {
        format!("expired on {}", e.not_after)
    } else {
        format!("expires in {} day(s), on {}", e.days_left, e.not_after)
    };
    Some(format!(
        "{what} {} {when}: issue a new one (`llm-agent pki issue`, see the README's rotation \
         steps) and restart the agent",
        e.path.display()
    ))
}

/// Checks rank `rank`'s files as a node will use them: each parses, the certificate chains to
/// the CA for both server and client authentication, names `address`, and matches the key.
/// Every error names the file it is about. Returns the certificate's expiry.
pub fn check_files(tls: &Tls, rank: u32, address: IpAddr) -> Result<Expiry> {
    let (cert_path, key_path) = (tls.cert(rank), tls.key(rank));
    let Identity { ca, chain, key } = Identity::load(tls, rank)?;
    check_identity(&ca, &chain, key, address, UnixTime::now()).map_err(|e| match e {
        Bad::Ca(m) => anyhow::anyhow!("tls.ca {}: {m}", tls.ca.display()),
        Bad::Cert(m) => anyhow::anyhow!(
            "tls.cert {}: {m} (tls.ca {})",
            cert_path.display(),
            tls.ca.display()
        ),
        Bad::Key(m) => anyhow::anyhow!(
            "tls.key {}: {m} (tls.cert {})",
            key_path.display(),
            cert_path.display()
        ),
    })?;
    expiry(&chain[0], &cert_path, now_unix())
}

/// Which file a problem is in.
#[derive(Debug, PartialEq)]
pub enum Bad {
    Ca(String),
    Cert(String),
    Key(String),
}

/// The checks of [`check_files`] on parsed files, at `now`.
pub fn check_identity(
    ca: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    key: PrivateKeyDer<'static>,
    address: IpAddr,
    now: UnixTime,
) -> Result<(), Bad> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c.clone())
            .map_err(|e| Bad::Ca(format!("not usable as a CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);
    let (ee, intermediates) = chain
        .split_first()
        .ok_or_else(|| Bad::Cert("holds no certificate".into()))?;
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| Bad::Ca(e.to_string()))?;
    server
        .verify_server_cert(ee, intermediates, &ServerName::from(address), &[], now)
        .map_err(|e| {
            Bad::Cert(format!(
                "not valid, under this CA, as the certificate of node {address}: {e}"
            ))
        })?;
    let client = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| Bad::Ca(e.to_string()))?;
    client
        .verify_client_cert(ee, intermediates, now)
        .map_err(|e| Bad::Cert(format!("not valid as a client certificate: {e}")))?;
    rustls::sign::CertifiedKey::from_der(chain.to_vec(), key, &provider())
        .map_err(|e| Bad::Key(format!("does not belong to the certificate: {e}")))?;
    Ok(())
}

// --- the node API's acceptor -------------------------------------------------------------

/// How long a client may take from accept to a finished handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TLS connections for the node control API.
#[derive(Clone)]
pub struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
}

impl Acceptor {
    pub fn new(identity: &Identity) -> Result<Acceptor> {
        Ok(Acceptor {
            inner: tokio_rustls::TlsAcceptor::from(identity.server_config()?),
        })
    }

    /// The handshake, bounded in time; `Ok(None)` when the client closed without a word (a
    /// port probe). A client that speaks plain HTTP gets a plain-text 400 saying what the port
    /// wants instead of TLS bytes it cannot read; none of its request is served.
    pub async fn accept(&self, stream: TcpStream) -> Result<Option<Stream>> {
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let mut b = [0u8; 1];
            stream.peek(&mut b).await.map(|n| (n > 0).then_some(b[0]))
        })
        .await
        .context("no TLS handshake within 10 s")?
        .context("cannot read from the client")?;
        match first {
            None => return Ok(None),
            // 0x16: a TLS handshake record.
            Some(0x16) => {}
            Some(b) if b.is_ascii_alphabetic() => {
                let mut stream = stream;
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    stream.write_all(plaintext_refusal().as_bytes()),
                )
                .await;
                let _ = stream.shutdown().await;
                bail!("plaintext HTTP refused: this port speaks TLS only");
            }
            Some(_) => {}
        }
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.inner.accept(stream))
            .await
            .context("the TLS handshake did not finish within 10 s")?
            .context("TLS handshake refused")?;
        Ok(Some(Stream::Tls(Box::new(tls))))
    }
}

/// What a plain HTTP client of a TLS node port reads.
fn plaintext_refusal() -> String {
    let body = serde_json::json!({ "error": "this node control API speaks TLS only (mutual TLS \
        with the cluster CA); plaintext requests are refused, unread" })
    .to_string();
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A control connection: plain (no `[tls]`) or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// Writes what fits now without waiting (the 408 of a slow head); nothing over TLS, whose
    /// records cannot be written half.
    pub fn try_write_now(&self, bytes: &[u8]) {
        if let Stream::Plain(s) = self {
            let _ = s.try_write(bytes);
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The node API's acceptor for `rank` and what its facts say about it, or `None` without
/// `[tls]` (plain HTTP, warned about).
pub fn acceptor_for(config: &Config, rank: u32) -> Result<Option<(Acceptor, Option<TlsFact>)>> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let identity = Identity::load(tls, rank)?;
    let fact = identity.fact(tls, rank);
    if let Some(f) = &fact {
        for w in [
            expiry_warning("this node's certificate", &f.cert),
            expiry_warning("the cluster CA certificate", &f.ca),
        ]
        .into_iter()
        .flatten()
        {
            tracing::warn!("{w}");
        }
    }
    Ok(Some((Acceptor::new(&identity)?, fact)))
}

/// The client TLS of a program on node `rank` that talks to node agents: that node's
/// certificate as its identity, the cluster CA as the only trust anchor. The coordinator is
/// rank 0's. `None` without `[tls]` (then `http://`).
pub fn client_config_for(config: &Config, rank: u32) -> Result<Option<rustls::ClientConfig>> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    Ok(Some(Identity::load(tls, rank)?.client_config()?))
}

/// The warning for a config without `[tls]`, said at start and by check-config.
pub fn plaintext_warning(config: &Config) -> Option<String> {
    config.tls.is_none().then(|| {
        format!(
            "{}: no [tls] section: the control plane runs over plain HTTP and the control token \
             crosses the network in clear text; anyone who can sniff it can start processes on \
             every node. Set up mutual TLS: `llm-agent pki init` and `llm-agent pki issue rankN` \
             for every node, then add [tls] (see the README)",
            config.source.display()
        )
    })
}

// --- making the PKI (`llm-agent pki`) ----------------------------------------------------

/// `pki init`: a new CA key and self-signed certificate in `tls.dir`; refuses to replace one.
pub fn init_ca(tls: &Tls, cluster: &str) -> Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (tls.ca.clone(), tls.ca_key());
    for p in [&cert_path, &key_path] {
        if p.exists() {
            bail!(
                "{} already exists: a new CA would invalidate every node certificate it signed. \
                 Remove the CA files yourself if that is what you want",
                p.display()
            );
        }
    }
    let (cert_pem, key_pem) = make_ca(cluster, CA_DAYS)?;
    create_dir(&tls.dir)?;
    if let Some(parent) = cert_path.parent() {
        create_dir(parent)?;
    }
    write_new(&key_path, key_pem.as_bytes(), 0o600)?;
    write_new(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// `pki issue`: rank `rank`'s certificate and key, signed by the CA in `tls.dir`, for `sans`.
/// An existing certificate is replaced only with `force` (that is how one rotates).
pub fn issue(
    tls: &Tls,
    cluster: &str,
    rank: u32,
    sans: &[String],
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (tls.cert(rank), tls.key(rank));
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                bail!(
                    "{} already exists; pass --force to replace it (to rotate the certificate)",
                    p.display()
                );
            }
        }
    }
    let ca_key_path = tls.ca_key();
    let ca_pem = std::fs::read_to_string(&tls.ca).with_context(|| {
        format!(
            "cannot read the CA certificate {} (run `llm-agent pki init` first)",
            tls.ca.display()
        )
    })?;
    let ca_key = std::fs::read_to_string(&ca_key_path).with_context(|| {
        format!(
            "cannot read the CA key {} (certificates are issued where `pki init` ran)",
            ca_key_path.display()
        )
    })?;
    let (cert_pem, key_pem) = make_node_cert(&ca_pem, &ca_key, cluster, rank, sans, days)?;
    for p in [&cert_path, &key_path] {
        if let Some(parent) = p.parent() {
            create_dir(parent)?;
        }
    }
    write_replacing(&key_path, key_pem.as_bytes(), 0o600)?;
    write_replacing(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: a node whose clock is a little behind still accepts a fresh certificate.
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(i64::from(days)),
    )
}

/// A CA certificate and key (PEM) for `cluster`.
pub fn make_ca(cluster: &str, days: u32) -> Result<(String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("llm-cluster {cluster} CA {:08x}", rand::random::<u32>()),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(days);
    let cert = params
        .self_signed(&key)
        .context("cannot sign the CA certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A node certificate and key (PEM) for both server and client authentication, for `sans`
/// (IP addresses or DNS names), signed by the CA in `ca_pem`/`ca_key_pem`.
pub fn make_node_cert(
    ca_pem: &str,
    ca_key_pem: &str,
    cluster: &str,
    rank: u32,
    sans: &[String],
    days: u32,
) -> Result<(String, String)> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    if sans.is_empty() {
        bail!("a node certificate needs at least one address or name");
    }
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the CA key is not a PEM private key")?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca_pem, ca_key)
        .context("the CA certificate cannot be parsed")?;
    let key = KeyPair::generate().context("cannot generate the node key")?;
    let mut params = CertificateParams::new(sans.to_vec())
        .with_context(|| format!("not an IP address or DNS name among {sans:?}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("llm-cluster {cluster} rank{rank}"),
    );
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = validity(days);
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the node certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The SANs `pki issue` gives rank `rank` by default: its configured address.
pub fn default_sans(config: &Config, rank: u32) -> Option<Vec<String>> {
    config.node(rank).map(|n| vec![n.address.to_string()])
}

fn create_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

fn open_mode(path: &Path, mode: u32, new: bool) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(mode);
    if new {
        o.create_new(true);
    } else {
        o.create(true).truncate(true);
    }
    o.open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    open_mode(path, mode, true)?
        .write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes beside `path` and renames over it, so a reader sees the old file or the new one.
/// The mode is set on creation: a key is never readable by others, not even for a moment.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    open_mode(&tmp, mode, true)?
        .write_all(bytes)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pems(pem: &str) -> Vec<CertificateDer<'static>> {
        parse_certs(pem.as_bytes()).expect("certificate")
    }

    fn key(pem: &str) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key")
    }

    fn node(ca: &(String, String), sans: &[&str]) -> (String, String) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        make_node_cert(&ca.0, &ca.1, "lab", 1, &sans, 30).expect("node cert")
    }

    const ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_node_certificate_from_the_ca_for_its_address_passes() {
        let ca = make_ca("lab", 365).expect("ca");
        let n = node(&ca, &["10.0.0.2", "node2.lan"]);
        assert_eq!(
            check_identity(&pems(&ca.0), &pems(&n.0), key(&n.1), ADDR, UnixTime::now()),
            Ok(())
        );
        let e = expiry(&pems(&n.0)[0], Path::new("n.crt"), now_unix()).expect("expiry");
        assert!((29..=30).contains(&e.days_left), "{e:?}");
    }

    #[test]
    fn another_ca_another_address_another_key_are_refused_by_file() {
        let ca = make_ca("lab", 365).expect("ca");
        let other = make_ca("lab", 365).expect("another ca");
        let n = node(&ca, &["10.0.0.2"]);
        let Err(Bad::Cert(m)) = check_identity(
            &pems(&other.0),
            &pems(&n.0),
            key(&n.1),
            ADDR,
            UnixTime::now(),
        ) else {
            panic!("a certificate of another CA passed");
        };
        // The same subject, another key: the signature does not verify.
        assert!(
            m.contains("BadSignature") || m.contains("UnknownIssuer"),
            "{m}"
        );
        let wrong_addr = node(&ca, &["10.0.0.3"]);
        let Err(Bad::Cert(m)) = check_identity(
            &pems(&ca.0),
            &pems(&wrong_addr.0),
            key(&wrong_addr.1),
            ADDR,
            UnixTime::now(),
        ) else {
            panic!("a certificate for another address passed");
        };
        assert!(m.contains("not valid for name \"10.0.0.2\""), "{m}");
        let another = node(&ca, &["10.0.0.2"]);
        let Err(Bad::Key(m)) = check_identity(
            &pems(&ca.0),
            &pems(&n.0),
            key(&another.1),
            ADDR,
            UnixTime::now(),
        ) else {
            panic!("another key passed");
        };
        assert!(m.contains("does not belong"), "{m}");
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let ca = make_ca("lab", 365).expect("ca");
        let n = node(&ca, &["10.0.0.2"]);
        let later = UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(now_unix()).expect("now") + 31 * 86_400,
        ));
        let Err(Bad::Cert(m)) = check_identity(&pems(&ca.0), &pems(&n.0), key(&n.1), ADDR, later)
        else {
            panic!("an expired certificate passed");
        };
        assert!(m.contains("certificate expired"), "{m}");
    }

    #[test]
    fn garbage_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = Tls::in_dir(dir.path());
        std::fs::write(&tls.ca, "not a certificate\n").expect("write");
        let e = format!("{:#}", check_files(&tls, 0, ADDR).expect_err("garbage CA"));
        assert!(e.contains(&format!("tls.ca {}", tls.ca.display())), "{e}");
        assert!(e.contains("holds no certificate"), "{e}");
        let ca = make_ca("lab", 365).expect("ca");
        std::fs::write(&tls.ca, &ca.0).expect("write");
        let e = format!("{:#}", check_files(&tls, 0, ADDR).expect_err("no cert"));
        assert!(
            e.contains(&format!("cannot read tls.cert {}", tls.cert(0).display())),
            "{e}"
        );
    }

    #[test]
    fn pki_init_refuses_to_replace_a_ca_and_issue_needs_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = Tls::in_dir(&dir.path().join("pki"));
        init_ca(&tls, "lab").expect("init");
        let e = init_ca(&tls, "lab").expect_err("second init").to_string();
        assert!(e.contains("already exists"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&tls.ca_key()), 0o600);
        let sans = vec!["10.0.0.2".to_string()];
        issue(&tls, "lab", 2, &sans, 30, false).expect("issue");
        assert_eq!(mode(&tls.key(2)), 0o600);
        assert!(issue(&tls, "lab", 2, &sans, 30, false).is_err());
        issue(&tls, "lab", 2, &sans, 30, true).expect("rotate");
        check_files(&tls, 2, ADDR).expect("valid files");
    }

    /// A node control API on loopback under `identity` whose /v1/facts answers `{}`.
    async fn node_api(identity: &Identity) -> (crate::server::Server, std::net::SocketAddr) {
        let app = axum::Router::new().route(
            "/v1/facts",
            axum::routing::get(|| async { axum::Json(serde_json::json!({})) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = crate::server::spawn_control(
            listener,
            app,
            crate::server::Signals::default(),
            "test node",
            Some(Acceptor::new(identity).expect("acceptor")),
        );
        (server, addr)
    }

    fn identity(ca: &(String, String), node: &(String, String)) -> Identity {
        Identity {
            ca: pems(&ca.0),
            chain: pems(&node.0),
            key: key(&node.1),
        }
    }

    #[tokio::test]
    async fn the_coordinator_refuses_a_node_of_another_ca_or_address() {
        use crate::coordinator::check::FactsError;
        use crate::coordinator::client::{NodeClient, Nodes};
        let ca = make_ca("lab", 365).expect("ca");
        let coordinator = identity(&ca, &node(&ca, &["127.0.0.1"]));
        let client = NodeClient::new(
            "0123456789abcdef".into(),
            Some(coordinator.client_config().expect("client config")),
        )
        .expect("client");
        // The node of the cluster: the handshake passes (its `{}` is not facts).
        let (good, addr) = node_api(&identity(&ca, &node(&ca, &["127.0.0.1"]))).await;
        assert!(
            matches!(client.facts(addr).await, Err(FactsError::Unreadable { .. })),
            "the cluster's own node was refused"
        );
        good.shutdown(Duration::from_secs(1)).await;
        // A node with a certificate from another CA.
        let other = make_ca("lab", 365).expect("another ca");
        let (rogue, addr) = node_api(&identity(&other, &node(&other, &["127.0.0.1"]))).await;
        let Err(FactsError::Unreachable(e)) = client.facts(addr).await else {
            panic!("a node of another CA was accepted");
        };
        assert!(e.contains("invalid peer certificate"), "{e}");
        rogue.shutdown(Duration::from_secs(1)).await;
        // A certificate of the cluster CA, but for another address.
        let (moved, addr) = node_api(&identity(&ca, &node(&ca, &["127.0.0.2"]))).await;
        let Err(FactsError::Unreachable(e)) = client.facts(addr).await else {
            panic!("a node certificate for another address was accepted");
        };
        assert!(e.contains("invalid peer certificate"), "{e}");
        moved.shutdown(Duration::from_secs(1)).await;
    }
}
