//! Model delivery between nodes. A person puts a GGUF on one node (usually the head); every
//! other node that reads the model fetches it from there over the control API, so nobody copies
//! 40 GB by hand. The design follows from what can go wrong on a LAN:
//!
//! - a transfer that stops halfway (a restarted agent, a dropped link) resumes from what is on
//!   disk: the bytes go to a hidden partial file named after the sha256 they must hash to, and a
//!   resumed request asks for the rest with `Range` and `If-Range` (a source whose file changed
//!   answers with the whole new file instead);
//! - a half-copied or corrupted file is never used: the hash is computed as the bytes arrive,
//!   and only a file whose sha256 matches is renamed into place (atomically, in its directory);
//! - a full disk is found before the first byte, with the bytes missing named;
//! - a stalled source ends the attempt after [`READ_STALL`], never a hang;
//! - `delivery.max_mbit` paces the receiver's reads, and TCP's window slows the sender with it.
//!
//! The receiving node decides where from and where to: a fetch request names a model and a rank,
//! both looked up in this node's own config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::proto::{HashState, TransferFact, TransferState};

/// The header a source names its copy's sha256 in (also its ETag, quoted).
pub const SHA256_HEADER: &str = "x-llm-cluster-sha256";
/// With no byte for this long the attempt fails (and may resume later).
pub const READ_STALL: Duration = Duration::from_secs(30);
/// How long a receiver waits for a source that is still hashing its copy.
const SOURCE_HASH_WAIT: Duration = Duration::from_secs(15 * 60);
/// Bytes gathered before one write and hash on the blocking pool: large enough that the event
/// loop is not crossed per TCP segment, small enough to keep progress smooth.
const WRITE_BATCH: usize = 4 << 20;
/// How often a running transfer tells the coordinator its progress changed.
const NOTIFY_EVERY: Duration = Duration::from_secs(2);

/// The partial file a delivery of `dest` with content `sha256` writes to, beside `dest` so the
/// final rename stays on one filesystem. Hidden, and named for its target hash, so a resume
/// never appends to bytes meant to be another file.
pub fn partial_path(dest: &Path, sha256: &str) -> PathBuf {
    let file = dest
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{file}.{}.partial", sha256.to_ascii_lowercase()))
}

/// The hash a partial file of `dest` is for, if `candidate` is one.
fn partial_hash(dest: &Path, candidate: &Path) -> Option<String> {
    let file = dest.file_name()?.to_string_lossy().into_owned();
    let name = candidate.file_name()?.to_string_lossy().into_owned();
    let hash = name
        .strip_prefix(&format!(".{file}."))?
        .strip_suffix(".partial")?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hash.to_string())
}

/// `Range: bytes=N-` (the only form a receiver sends): the first byte wanted.
pub fn parse_range(value: &str) -> Option<u64> {
    value
        .trim()
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .trim()
        .parse()
        .ok()
}

/// `Content-Range: bytes A-B/TOTAL`: (A, TOTAL).
pub fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// Why there is no room for the rest of a file, if there is none. Pure.
pub fn space_shortfall(total: u64, have: u64, free: u64) -> Option<u64> {
    let need = total.saturating_sub(have);
    (free < need).then(|| need - free)
}

/// When `bytes` should have been read, at `max_mbit`, counted from the start. Pure.
pub fn paced(bytes: u64, max_mbit: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 * 8.0 / (max_mbit.max(1) as f64 * 1e6))
}

/// "4.2 GB" for messages.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// --- the source's side ----------------------------------------------------------------------

/// `GET /v1/models/{name}/file`: this node's copy of a model, whole or from a `Range` on. Only
/// a copy that is hashed and matches the configured sha256 is served: a wrong file must not
/// spread.
pub async fn serve(
    rank: u32,
    name: &str,
    path: &Path,
    expected: Option<&str>,
    state: (Option<u64>, HashState),
    hashed_bytes: Option<u64>,
    headers: &HeaderMap,
) -> Response {
    let fail = super::api::error;
    let sha = match state.1 {
        HashState::Done { sha256 } => sha256,
        HashState::Missing | HashState::NotRequired if state.0.is_none() => {
            return fail(
                StatusCode::NOT_FOUND,
                format!(
                    "rank {rank} has no file for model {name} at {}",
                    path.display()
                ),
            )
        }
        HashState::Hashing | HashState::NotRequired | HashState::Missing => {
            let mut r = fail(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "rank {rank} is still hashing its copy of model {name} ({} of {} bytes)",
                    hashed_bytes.unwrap_or(0),
                    state.0.unwrap_or(0)
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            return r;
        }
        HashState::Error { message } => {
            return fail(StatusCode::INTERNAL_SERVER_ERROR, message);
        }
    };
    if let Some(e) = expected.filter(|e| !e.eq_ignore_ascii_case(&sha)) {
        return fail(
            StatusCode::CONFLICT,
            format!(
                "rank {rank}'s copy of model {name} ({}) has sha256 {sha}, but the config expects {e}: it is not served",
                path.display()
            ),
        );
    }
    let size = state.0.unwrap_or(0);
    let etag = format!("\"{sha}\"");
    // A range only if the receiver's partial is of this very content (If-Range); else the
    // whole file, which the receiver starts over with.
    let same = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == etag.as_bytes());
    let from = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| same)
        .map(|v| parse_range(v).ok_or(v.to_string()))
        .transpose();
    let from = match from {
        Ok(f) => f,
        Err(v) => {
            return fail(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("Range `{v}`: only `bytes=N-` is served"),
            )
        }
    };
    if let Some(f) = from.filter(|f| *f >= size) {
        let mut r = fail(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("Range from byte {f}: the file has {size} bytes"),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return r;
    }
    let offset = from.unwrap_or(0);
    let file = async {
        use tokio::io::AsyncSeekExt;
        let mut f = tokio::fs::File::open(path).await?;
        f.seek(std::io::SeekFrom::Start(offset)).await?;
        Ok::<_, std::io::Error>(f)
    };
    let body = match file.await {
        Ok(f) => tokio_util::io::ReaderStream::with_capacity(f, 256 << 10),
        Err(e) => {
            return fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {}: {e}", path.display()),
            )
        }
    };
    let mut r = Response::new(Body::from_stream(body));
    *r.status_mut() = if from.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let h = r.headers_mut();
    let mut put = |k: header::HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    put(header::CONTENT_LENGTH, (size - offset).to_string());
    put(header::CONTENT_TYPE, "application/octet-stream".into());
    put(header::ACCEPT_RANGES, "bytes".into());
    put(header::ETAG, etag);
    put(header::HeaderName::from_static(SHA256_HEADER), sha);
    if from.is_some() {
        put(
            header::CONTENT_RANGE,
            format!("bytes {offset}-{}/{size}", size.saturating_sub(1)),
        );
    }
    r
}

// --- the receiver's side --------------------------------------------------------------------

/// Every delivery to this node since the agent started, by model name. One at a time per
/// model: a second request for a model being fetched answers with the running one. And one
/// receiving at a time per node: two would split the link for no gain, and each would check the
/// free space without the other's bytes still to come.
pub struct Deliveries {
    by_model: Mutex<HashMap<String, Arc<Mutex<TransferFact>>>>,
    turn: Arc<tokio::sync::Semaphore>,
}

impl Default for Deliveries {
    fn default() -> Self {
        Deliveries {
            by_model: Mutex::default(),
            turn: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}

impl Deliveries {
    pub fn fact(&self, model: &str) -> Option<TransferFact> {
        let map = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        let t = map.get(model)?;
        let f = t.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(f)
    }

    /// The node's one turn to receive, for [`run`].
    pub fn turn(&self) -> Arc<tokio::sync::Semaphore> {
        self.turn.clone()
    }

    pub fn all(&self) -> Vec<TransferFact> {
        let map = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<TransferFact> = map
            .values()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        v.sort_by(|a, b| a.model.cmp(&b.model));
        v
    }

    /// Registers a new transfer of `model`, unless one is running: `Err` with the running one.
    pub fn begin(
        &self,
        model: &str,
        from_rank: u32,
    ) -> Result<Arc<Mutex<TransferFact>>, Box<TransferFact>> {
        let mut map = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = map.get(model) {
            let f = t.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if f.state == TransferState::Running {
                return Err(Box::new(f));
            }
        }
        let t = Arc::new(Mutex::new(fresh(model, from_rank)));
        map.insert(model.to_string(), t.clone());
        Ok(t)
    }
}

/// The path of model `name`'s file on a source's control API, the name percent-encoded.
pub fn file_path(name: &str) -> String {
    let mut url = reqwest::Url::parse("http://source/").expect("a constant URL parses");
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.clear().extend(["v1", "models", name, "file"]);
    }
    url.path().to_string()
}

/// A transfer of `model` from `from_rank` that is about to begin.
pub fn fresh(model: &str, from_rank: u32) -> TransferFact {
    TransferFact {
        model: model.to_string(),
        from_rank,
        state: TransferState::Running,
        total_bytes: 0,
        done_bytes: 0,
        resumed_from: 0,
        bytes_per_s: None,
        eta_s: None,
        activity: format!("connecting to rank {from_rank}"),
        error: None,
        started_unix: now_unix(),
        finished_unix: None,
        seconds: 0.0,
    }
}

/// Everything one fetch needs, resolved from the receiving node's config.
pub struct Fetch {
    pub model: String,
    pub from_rank: u32,
    /// The source's control API, and its client (the token, this node's TLS identity).
    pub source: std::net::SocketAddr,
    pub client: crate::coordinator::client::NodeClient,
    pub dest: PathBuf,
    /// The configured sha256; without one, the source's hash is the target.
    pub expected: Option<String>,
    pub max_mbit: Option<u64>,
    /// "rank 1 (10.0.0.2:7700)", for messages.
    pub who: String,
    /// Told the hash of the file put in place, before anyone hears the transfer is done: the
    /// bytes were hashed as they arrived, and a second hash of 40 GB would delay the ring.
    pub hasher: super::facts::ModelHasher,
}

/// Progress as the receive loop sees it; written into the shared fact.
struct Meter {
    fact: Arc<Mutex<TransferFact>>,
    began: Instant,
    /// When the first byte was asked for (after any wait for the source's hash): the rate at
    /// the end is over the receiving alone.
    receiving: Option<Instant>,
    /// Rate over the last window: (window start, bytes at window start).
    window: (Instant, u64),
    last_notify: Instant,
}

impl Meter {
    fn set(&self, f: impl FnOnce(&mut TransferFact)) {
        let mut g = self.fact.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g);
        g.seconds = self.began.elapsed().as_secs_f64();
    }

    /// Records `done` bytes; true when it is time to tell the coordinator.
    fn progress(&mut self, done: u64) -> bool {
        let now = Instant::now();
        let (w0, b0) = self.window;
        let dt = now.duration_since(w0).as_secs_f64();
        if dt >= 1.0 {
            let rate = (done.saturating_sub(b0)) as f64 / dt;
            self.window = (now, done);
            self.set(|f| {
                f.bytes_per_s = Some(rate);
                f.eta_s = (rate > 0.0).then(|| f.total_bytes.saturating_sub(done) as f64 / rate);
            });
        }
        self.set(|f| f.done_bytes = done);
        if now.duration_since(self.last_notify) >= NOTIFY_EVERY {
            self.last_notify = now;
            return true;
        }
        false
    }
}

/// Marks a transfer whose task died (a panic) as failed, so that nobody waits on it forever.
pub fn mark_lost(fact: &Mutex<TransferFact>, why: String) {
    let mut f = fact.lock().unwrap_or_else(|e| e.into_inner());
    if f.state == TransferState::Running {
        failed(&mut f, why);
    }
}

fn failed(f: &mut TransferFact, why: String) {
    f.state = TransferState::Failed;
    f.activity = "failed".into();
    f.error = Some(why);
    f.finished_unix = Some(now_unix());
}

/// Runs `fetch` to its end: the file verified and in place, or an error for people. `notify`
/// is called when the coordinator should look again (progress, the end).
pub async fn run(
    fetch: Fetch,
    fact: Arc<Mutex<TransferFact>>,
    turn: Arc<tokio::sync::Semaphore>,
    notify: impl Fn() + Send,
) -> Result<String, String> {
    let mut meter = Meter {
        fact,
        began: Instant::now(),
        receiving: None,
        window: (Instant::now(), 0),
        last_notify: Instant::now(),
    };
    if turn.available_permits() == 0 {
        meter.set(|f| {
            f.activity = "waiting for another model's delivery to this node to end".into()
        });
        notify();
    }
    let result = match turn.acquire_owned().await {
        Ok(_permit) => receive(&fetch, &mut meter, &notify).await,
        Err(_) => Err("the node's deliveries were closed".to_string()),
    };
    meter.set(|f| {
        f.finished_unix = Some(now_unix());
        f.eta_s = None;
        match &result {
            Ok(_) => {
                f.state = TransferState::Done;
                f.activity = "done".into();
                let received = f.done_bytes.saturating_sub(f.resumed_from);
                f.bytes_per_s = Some(
                    received as f64
                        / meter
                            .receiving
                            .unwrap_or(meter.began)
                            .elapsed()
                            .as_secs_f64()
                            .max(1e-3),
                );
            }
            Err(e) => failed(f, e.clone()),
        }
    });
    notify();
    result
}

async fn receive(
    fetch: &Fetch,
    meter: &mut Meter,
    notify: &(impl Fn() + Send),
) -> Result<String, String> {
    let dest = &fetch.dest;
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // The partial to resume: the configured hash's, or without one the newest for this file.
    let (target, mut have) = match &fetch.expected {
        Some(sha) => {
            let p = partial_path(dest, sha);
            let len = tokio::fs::metadata(&p).await.map_or(0, |m| m.len());
            (Some(sha.to_ascii_lowercase()), len)
        }
        None => match newest_partial(dest, &dir) {
            Some((sha, len)) => (Some(sha), len),
            None => (None, 0),
        },
    };
    let waited = Instant::now();
    let path = file_path(&fetch.model);
    let resp = loop {
        let mut req = fetch
            .client
            .request(reqwest::Method::GET, fetch.source, &path);
        if let (Some(sha), true) = (&target, have > 0) {
            req = req
                .header(header::RANGE, format!("bytes={have}-"))
                .header(header::IF_RANGE, format!("\"{sha}\""));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach rank {}: {e:#}", fetch.from_rank))?;
        match resp.status() {
            StatusCode::SERVICE_UNAVAILABLE if waited.elapsed() < SOURCE_HASH_WAIT => {
                meter.set(|f| {
                    f.activity = format!("waiting for rank {} to hash its copy", fetch.from_rank)
                });
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
                // The partial is as long as the file or longer: not to be trusted; start over.
                if let Some(sha) = &target {
                    let _ = tokio::fs::remove_file(partial_path(dest, sha)).await;
                }
                have = 0;
            }
            s if s.is_success() => break resp,
            s => {
                let body = resp.text().await.unwrap_or_default();
                let why = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                    .unwrap_or(body);
                return Err(format!(
                    "rank {} did not send model {}: HTTP {s}: {}",
                    fetch.from_rank,
                    fetch.model,
                    why.trim()
                ));
            }
        }
    };
    let source_sha = resp
        .headers()
        .get(SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| format!("rank {} sent no {SHA256_HEADER} header", fetch.from_rank))?;
    if let Some(e) = &fetch.expected {
        if !e.eq_ignore_ascii_case(&source_sha) {
            return Err(format!(
                "rank {}'s copy has sha256 {source_sha}, but the config expects {e}",
                fetch.from_rank
            ));
        }
    }
    let (offset, total) = if resp.status() == StatusCode::PARTIAL_CONTENT {
        let (start, total) = resp
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range)
            .ok_or_else(|| {
                format!(
                    "rank {} answered 206 without a Content-Range",
                    fetch.from_rank
                )
            })?;
        if start != have {
            return Err(format!(
                "rank {} sent bytes from {start}, but {have} were asked for",
                fetch.from_rank
            ));
        }
        (have, total)
    } else {
        // The whole file: whatever partial was there is of other content, or not wanted.
        let total = resp.content_length().ok_or_else(|| {
            format!(
                "rank {} sent the file without a Content-Length",
                fetch.from_rank
            )
        })?;
        (0, total)
    };
    if offset == 0 {
        remove_partials(dest, &dir).await;
    }
    // A 206 came only if If-Range matched the source's hash: the partial is of that content.
    let sha = source_sha;
    let partial = partial_path(dest, &sha);
    // Room for the rest, before the first byte is written.
    let free = free_bytes(&dir)
        .map_err(|e| format!("cannot read the free space of {}: {e}", dir.display()))?;
    if let Some(missing) = space_shortfall(total, offset, free) {
        let need = total - offset;
        return Err(format!(
            "not enough free space on {} for model {} in {}: {need} bytes ({}) needed, {free} bytes ({}) free, {missing} bytes ({}) missing{}",
            fetch.who,
            fetch.model,
            dir.display(),
            human_bytes(need),
            human_bytes(free),
            human_bytes(missing),
            if dest.exists() {
                format!("; the copy at {} is kept until a verified one replaces it: remove it to make room", dest.display())
            } else {
                String::new()
            }
        ));
    }
    meter.set(|f| {
        f.total_bytes = total;
        f.resumed_from = offset;
        f.done_bytes = offset;
    });
    meter.window = (Instant::now(), offset);
    // The bytes already here count toward the hash: read them once before the rest arrives.
    if offset > 0 {
        meter.set(|f| f.activity = format!("checking the {offset} bytes already here"));
        tracing::info!(model = %fetch.model, from_rank = fetch.from_rank, offset, "resuming a model transfer");
    } else {
        tracing::info!(model = %fetch.model, from_rank = fetch.from_rank, total, "receiving a model file");
    }
    let (file, hasher) = {
        let p = partial.clone();
        tokio::task::spawn_blocking(move || open_partial(&p, offset))
            .await
            .map_err(|e| format!("the partial file's reader panicked: {e}"))?
            .map_err(|e| format!("cannot open {}: {e}", partial.display()))?
    };
    meter.set(|f| f.activity = format!("receiving from rank {}", fetch.from_rank));
    let mut slot = Some((file, hasher));
    let mut batch: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
    let mut done = offset;
    let began = Instant::now();
    meter.receiving = Some(began);
    let mut stream = resp.bytes_stream();
    loop {
        let next = tokio::time::timeout(READ_STALL, stream.next())
            .await
            .map_err(|_| {
                format!(
                    "rank {} sent nothing for {} s after {done} of {total} bytes; the next attempt resumes",
                    fetch.from_rank,
                    READ_STALL.as_secs()
                )
            })?;
        let chunk = match next {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                flush(&mut slot, &mut batch, &partial).await?;
                return Err(format!(
                    "the transfer from rank {} broke after {done} of {total} bytes: {e:#}; the next attempt resumes",
                    fetch.from_rank
                ));
            }
        };
        done += chunk.len() as u64;
        batch.extend_from_slice(&chunk);
        if batch.len() >= WRITE_BATCH {
            flush(&mut slot, &mut batch, &partial).await?;
        }
        if let Some(mbit) = fetch.max_mbit {
            let due = began + paced(done - offset, mbit);
            tokio::time::sleep_until(due.into()).await;
        }
        if meter.progress(done) {
            notify();
        }
    }
    flush(&mut slot, &mut batch, &partial).await?;
    if done != total {
        return Err(format!(
            "the transfer from rank {} ended after {done} of {total} bytes; the next attempt resumes",
            fetch.from_rank
        ));
    }
    meter.set(|f| f.activity = "verifying sha256".into());
    let (file, hasher) = slot.take().ok_or("the partial file was lost")?;
    let place = {
        let (partial, dest, dir, record) = (
            partial.clone(),
            dest.clone(),
            dir.clone(),
            fetch.hasher.clone(),
        );
        move || -> Result<String, String> {
            let got = file
                .sync_all()
                .map(|()| hex::encode(hasher.finalize()))
                .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
            if got != sha {
                let _ = std::fs::remove_file(&partial);
                return Err(format!(
                    "the received file has sha256 {got}, but it should have {sha}: the bytes were damaged on the way or on disk; the partial file was removed and the next attempt starts over"
                ));
            }
            std::fs::rename(&partial, &dest).map_err(|e| {
                format!(
                    "cannot move {} to {}: {e}",
                    partial.display(),
                    dest.display()
                )
            })?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            // Owned like its directory (llm-cluster's, under the packages), as the Ansible
            // model role leaves a copied file; a non-root agent keeps its own.
            if let Ok(meta) = std::fs::metadata(&dir) {
                use std::os::unix::fs::MetadataExt;
                let _ = std::os::unix::fs::chown(&dest, Some(meta.uid()), Some(meta.gid()));
            }
            record.record(&dest, got.clone());
            Ok(got)
        }
    };
    // Hashing the end, fsync, rename and the hash store are blocking: off the event loop.
    let got = tokio::task::spawn_blocking(place)
        .await
        .map_err(|e| format!("putting the file in place panicked: {e}"))??;
    tracing::info!(model = %fetch.model, from_rank = fetch.from_rank, bytes = total - offset, seconds = began.elapsed().as_secs_f64(), "model file received and verified");
    Ok(got)
}

/// Writes and hashes the batch on the blocking pool (the agent runs one event loop).
async fn flush(
    slot: &mut Option<(std::fs::File, Sha256)>,
    batch: &mut Vec<u8>,
    partial: &Path,
) -> Result<(), String> {
    if batch.is_empty() {
        return Ok(());
    }
    let (mut file, mut hasher) = slot.take().ok_or("the partial file was lost")?;
    let buf = std::mem::replace(batch, Vec::with_capacity(WRITE_BATCH));
    let (file, hasher) = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        file.write_all(&buf)?;
        hasher.update(&buf);
        Ok::<_, std::io::Error>((file, hasher))
    })
    .await
    .map_err(|e| format!("the partial file's writer panicked: {e}"))?
    .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    *slot = Some((file, hasher));
    Ok(())
}

/// Opens the partial for appending after its first `keep` bytes (dropping anything beyond),
/// with those bytes already hashed.
fn open_partial(path: &Path, keep: u64) -> std::io::Result<(std::fs::File, Sha256)> {
    use std::io::{Read, Seek};
    use std::os::unix::fs::OpenOptionsExt;
    // Readable by the unprivileged user the engines run as, whatever the agent's umask.
    let mut f = std::fs::OpenOptions::new()
        .mode(0o644)
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    f.set_len(keep)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = keep;
    f.seek(std::io::SeekFrom::Start(0))?;
    while left > 0 {
        let n = f.read(&mut buf[..(left.min(1 << 20) as usize)])?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    f.seek(std::io::SeekFrom::Start(keep))?;
    Ok((f, h))
}

/// The newest partial of `dest` in `dir`: its target hash and length.
fn newest_partial(dest: &Path, dir: &Path) -> Option<(String, u64)> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let sha = partial_hash(dest, &e.path())?;
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, sha, meta.len()))
        })
        .max_by_key(|(t, _, _)| *t)
        .map(|(_, sha, len)| (sha, len))
}

/// Removes every partial of `dest` (a fresh start makes them useless).
async fn remove_partials(dest: &Path, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if partial_hash(dest, &e.path()).is_some() {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
}

/// Bytes an unprivileged writer may still use in `dir`'s filesystem.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ab0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd";

    #[test]
    fn a_partial_is_hidden_beside_its_file_and_named_for_its_hash() {
        let dest = Path::new("/m/chat.gguf");
        let p = partial_path(dest, &SHA.to_uppercase());
        assert_eq!(p, PathBuf::from(format!("/m/.chat.gguf.{SHA}.partial")));
        assert_eq!(partial_hash(dest, &p).as_deref(), Some(SHA));
        assert_eq!(partial_hash(Path::new("/m/other.gguf"), &p), None);
        assert_eq!(
            partial_hash(dest, Path::new("/m/.chat.gguf.abc.partial")),
            None
        );
    }

    #[test]
    fn ranges_parse_only_in_the_form_sent() {
        assert_eq!(parse_range("bytes=0-"), Some(0));
        assert_eq!(parse_range("bytes=1048576-"), Some(1_048_576));
        assert_eq!(parse_range("bytes=0-99"), None);
        assert_eq!(parse_range("bytes=-5"), None);
        assert_eq!(parse_range("items=3-"), None);
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, 200)));
        assert_eq!(parse_content_range("bytes */200"), None);
    }

    #[test]
    fn the_shortfall_counts_only_the_bytes_still_to_come() {
        assert_eq!(space_shortfall(100, 0, 100), None);
        assert_eq!(space_shortfall(100, 0, 99), Some(1));
        assert_eq!(space_shortfall(100, 60, 40), None);
        assert_eq!(space_shortfall(100, 60, 10), Some(30));
        assert_eq!(space_shortfall(100, 120, 0), None);
    }

    #[test]
    fn pacing_turns_bytes_into_time_at_the_cap() {
        // 100 Mbit/s is 12.5 MB/s.
        assert_eq!(paced(12_500_000, 100), Duration::from_secs(1));
        assert_eq!(paced(0, 100), Duration::ZERO);
        assert_eq!(paced(1_000_000, 8), Duration::from_secs(1));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(4_200_000_000), "4.2 GB");
    }

    #[test]
    fn a_second_fetch_of_a_running_model_answers_with_the_running_one() {
        let d = Deliveries::default();
        let t = d.begin("chat", 0).expect("first");
        let again = d.begin("chat", 2).expect_err("running");
        assert_eq!(again.from_rank, 0);
        t.lock().expect("lock").state = TransferState::Failed;
        assert!(d.begin("chat", 2).is_ok(), "a failed one may be retried");
        assert_eq!(d.fact("chat").map(|f| f.from_rank), Some(2));
    }

    #[tokio::test]
    async fn a_node_receives_one_file_at_a_time() {
        let d = Deliveries::default();
        let first = d
            .turn()
            .try_acquire_owned()
            .expect("the first gets the turn");
        assert!(d.turn().try_acquire_owned().is_err(), "a second waits");
        drop(first);
        assert!(
            d.turn().try_acquire_owned().is_ok(),
            "and gets it after the first"
        );
    }

    #[test]
    fn a_resume_keeps_and_hashes_the_prefix_and_drops_the_rest() {
        let dir = std::env::temp_dir().join(format!("deliver-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("part");
        std::fs::write(&p, b"hello world, and more").expect("write");
        let (mut f, h) = open_partial(&p, 5).expect("open");
        use std::io::Write;
        f.write_all(b"!!").expect("append");
        drop(f);
        assert_eq!(std::fs::read(&p).expect("read"), b"hello!!");
        assert_eq!(
            hex::encode(h.finalize()),
            hex::encode(Sha256::digest(b"hello"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
