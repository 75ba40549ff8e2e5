//! HTTP serving with shutdown designed in, for both of the agent's servers (the node control API
//! and the head's public API).
//!
//! Shutdown has two steps, as in mini-redis: first the server stops accepting and lets what is in
//! flight finish (a completion being streamed to a client is worth finishing when only the agent
//! restarts); after a grace, handlers that would run on (long polls, streams) are told to end now
//! — a stream ends with an error event, never mid-token without a word — and the server task is
//! awaited. Only if it still has not ended is it dropped, so shutdown is always bounded.
//!
//! Every connection lives under [`ConnLimits`]: a request head must arrive within a timeout
//! (from accept, or from the first byte of a later request), a kept-alive connection may idle
//! only so long, and connections are counted per client address and in total. These are the
//! server's own, not hyper's: hyper's header timer starts when a connection becomes ready for a
//! request, so it cannot tell a slow head from an idle keep-alive connection, and axum::serve
//! has neither. A connection past a limit gets a 503 with Retry-After on a short leash (a
//! connection reset tells a client nothing); past a small budget of those, it is closed at once.
//!
//! A listening socket can outlive the agent: [`listen`] keeps it in systemd's file-descriptor
//! store (`FileDescriptorStoreMax=` in the unit) and takes it back on the next start. While one
//! agent drains and the next starts, connections wait in the socket's backlog instead of being
//! refused, and the new agent accepts them. Stopping to accept only closes this process's copy
//! of the socket (axum drops its listener; nothing calls shutdown(2) on it, which would reset the
//! queued connections), so the copy in the store keeps them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::sys::socket::{getsockopt, sockopt};
use sd_notify::NotifyState;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The two shutdown signals a server's handlers may watch.
#[derive(Clone, Default)]
pub struct Signals {
    /// No new connections; requests in flight go on.
    pub stopping: CancellationToken,
    /// The grace is over: end long polls and streams now.
    pub ending: CancellationToken,
}

/// A running server and what it takes to stop it.
pub struct Server {
    name: &'static str,
    signals: Signals,
    task: tokio::task::JoinHandle<()>,
}

/// Binds `addr`, saying which setting names it when that fails.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

/// A listening socket from [`listen`].
pub struct Listening {
    pub listener: TcpListener,
    /// systemd handed the socket back: the agent that stored it was serving on it a moment ago,
    /// and its clients may be waiting in the backlog.
    pub handed_back: bool,
}

/// Listens on `addr` with the socket stored in systemd's fd store as `name` when systemd handed
/// one back that listens on `addr`; otherwise binds (as [`bind`]) and stores the new socket
/// under `name`. A stored socket for another address (the config changed) is closed and
/// dropped from the store first, so the port is free to bind. Outside systemd this is [`bind`].
pub async fn listen(addr: SocketAddr, what: &str, name: &'static str) -> Result<Listening> {
    let kept = take_handed_back(name);
    let stored_before = kept.len();
    let mut reused = None;
    for fd in kept {
        if reused.is_some() {
            continue; // a second socket of this name: closed here, dropped from the store below
        }
        match reuse(fd, addr) {
            Ok(l) => reused = Some(l),
            Err(e) => {
                tracing::info!(server = what, fd_name = name, %addr, reason = %format!("{e:#}"), "not reusing a socket systemd kept; it is closed")
            }
        }
    }
    // The store is right as it is only when it held exactly the socket reused here.
    let store_right = stored_before == 1 && reused.is_some();
    let dropped = stored_before > 0 && !store_right;
    if dropped {
        notify(
            &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
            &[],
        );
    }
    let (listener, handed_back) = match reused {
        Some(l) => {
            tracing::info!(server = what, fd_name = name, %addr, "listening on the socket systemd handed back");
            (l, true)
        }
        // systemd closes its copy of a dropped socket when it reads the message, a moment from
        // now; until then that socket may still hold the port (a new IP on the same port).
        None if dropped => (bind_soon(addr, what).await?, false),
        None => (bind(addr, what).await?, false),
    };
    if !store_right {
        notify(
            &[NotifyState::FdStore, NotifyState::FdName(name)],
            &[listener.as_fd()],
        );
    }
    Ok(Listening {
        listener,
        handed_back,
    })
}

/// [`bind`], retried for a moment while the address is in use.
async fn bind_soon(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            r => return r.with_context(|| format!("cannot listen on {addr} for {what}")),
        }
    }
}

/// The sockets systemd passed at start (`LISTEN_FDS`, `LISTEN_FDNAMES`), each taken once.
fn handed_back() -> &'static Mutex<Vec<(String, OwnedFd)>> {
    static FDS: OnceLock<Mutex<Vec<(String, OwnedFd)>>> = OnceLock::new();
    FDS.get_or_init(|| {
        // Without unsetting the variables: LISTEN_PID names this process, so children ignore
        // them, and the environment is not written while other threads may read it.
        let fds = match sd_notify::listen_fds_with_names(false) {
            Ok(fds) => fds
                // SAFETY: systemd passed these descriptors to this process (LISTEN_PID is ours)
                // and nothing else in it owns them; the OnceLock wraps each exactly once.
                .map(|(fd, name)| (name, unsafe { OwnedFd::from_raw_fd(fd) }))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the sockets systemd passed; binding anew");
                Vec::new()
            }
        };
        Mutex::new(fds)
    })
}

/// Takes every handed-back socket named `name` (normally one).
fn take_handed_back(name: &str) -> Vec<OwnedFd> {
    let mut fds = handed_back().lock().unwrap_or_else(|e| e.into_inner());
    let (mine, rest) = std::mem::take(&mut *fds)
        .into_iter()
        .partition(|(n, _)| n == name);
    *fds = rest;
    mine.into_iter().map(|(_, fd)| fd).collect::<Vec<_>>()
}

/// Closes the sockets systemd handed back that no server took (a name this version does not
/// use), and drops them from the store: nobody would ever accept the clients queued on them.
pub fn release_unclaimed() {
    let fds = std::mem::take(&mut *handed_back().lock().unwrap_or_else(|e| e.into_inner()));
    for (name, _fd) in fds {
        tracing::info!(
            fd_name = %name,
            "closing a socket systemd kept that nothing here uses"
        );
        notify(
            &[NotifyState::FdStoreRemove, NotifyState::FdName(&name)],
            &[],
        );
    }
}

/// `fd` as the listener for `addr`, if it is a listening TCP socket bound to exactly `addr`.
fn reuse(fd: OwnedFd, addr: SocketAddr) -> Result<TcpListener> {
    let listening = getsockopt(&fd, sockopt::AcceptConn).context("not a socket")?;
    let kind = getsockopt(&fd, sockopt::SockType).context("not a socket")?;
    anyhow::ensure!(
        listening && kind == nix::sys::socket::SockType::Stream,
        "not a listening stream socket"
    );
    let std_listener = std::net::TcpListener::from(fd);
    let bound = std_listener.local_addr().context("not a TCP socket")?;
    anyhow::ensure!(bound == addr, "it listens on {bound}");
    // The flag is the socket's, not this descriptor's: set it whatever the last owner left.
    std_listener
        .set_nonblocking(true)
        .context("cannot make the socket non-blocking")?;
    TcpListener::from_std(std_listener).context("cannot register the socket with the runtime")
}

/// Sends `state` (with `fds`) to systemd; a no-op outside systemd. Failing to store a socket only
/// costs the next restart its queued clients, so it is a warning.
fn notify(state: &[NotifyState], fds: &[std::os::fd::BorrowedFd<'_>]) {
    let sent = if fds.is_empty() {
        sd_notify::notify(false, state)
    } else {
        sd_notify::notify_with_fds(false, state, fds)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot hand a socket to systemd's fd store");
    }
}

/// Serves `router` on `listener` until [`Server::shutdown`], under [`ConnLimits::CONTROL`].
pub fn spawn(
    listener: TcpListener,
    router: Router,
    signals: Signals,
    name: &'static str,
) -> Server {
    spawn_control(listener, router, signals, name, None)
}

/// As [`spawn`], with every connection a TLS handshake with `tls` first when it is given (the
/// node control API under `[tls]`).
pub fn spawn_control(
    listener: TcpListener,
    router: Router,
    signals: Signals,
    name: &'static str,
    tls: Option<crate::tls::Acceptor>,
) -> Server {
    spawn_inner(
        listener,
        router,
        signals,
        name,
        ConnLimits::CONTROL,
        std::future::ready(()),
        tls,
    )
}

/// As [`spawn`] under `limits`, but accepts only once `open` resolves; until then clients wait
/// in the backlog.
pub fn spawn_after(
    listener: TcpListener,
    router: Router,
    signals: Signals,
    name: &'static str,
    limits: ConnLimits,
    open: impl Future<Output = ()> + Send + 'static,
) -> Server {
    spawn_inner(listener, router, signals, name, limits, open, None)
}

fn spawn_inner(
    listener: TcpListener,
    router: Router,
    signals: Signals,
    name: &'static str,
    limits: ConnLimits,
    open: impl Future<Output = ()> + Send + 'static,
    tls: Option<crate::tls::Acceptor>,
) -> Server {
    let stopping = signals.stopping.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = open => {}
            _ = stopping.cancelled() => return,
        }
        let limits = limits.within(raise_fd_limit(), name);
        accept_loop(listener, router, limits, stopping, name, tls).await;
    });
    Server {
        name,
        signals,
        task,
    }
}

/// How long handlers get to end after being told to, before the server task is dropped.
const ENDING_GRACE: Duration = Duration::from_secs(3);

impl Server {
    /// Stops accepting, lets requests in flight run for up to `grace`, then ends long polls and
    /// streams and waits for the server to finish. Bounded: at most `grace` + a few seconds.
    pub async fn shutdown(mut self, grace: Duration) {
        self.signals.stopping.cancel();
        if tokio::time::timeout(grace, &mut self.task).await.is_ok() {
            return;
        }
        tracing::info!(
            server = self.name,
            grace_s = grace.as_secs_f64(),
            "requests still in flight after the grace; ending them"
        );
        self.signals.ending.cancel();
        if tokio::time::timeout(ENDING_GRACE, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!(
                server = self.name,
                "server did not finish after ending its requests; dropping it"
            );
            self.task.abort();
        }
    }
}

// --- connections ---------------------------------------------------------------------------

/// What every connection to a server lives under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// From accept, or from the first byte of a later request, to the end of the request head.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections served at once, from everyone.
    pub max_connections: usize,
    /// Connections served at once from one client address.
    pub max_per_client: usize,
}

impl ConnLimits {
    /// The node control API's: its clients are the coordinator and a person with the token.
    pub const CONTROL: ConnLimits = ConnLimits {
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1024,
        max_per_client: 256,
    };

    /// These limits with the connection counts lowered to what `fd_limit` open files allow: a
    /// server out of descriptors cannot even accept the connection it would answer, so the
    /// count is refused before the kernel refuses the descriptor.
    fn within(self, fd_limit: u64, server: &str) -> ConnLimits {
        // A proxied request holds two descriptors, the client's and the engine's.
        let room = usize::try_from(fd_limit.saturating_sub(FD_RESERVE) / 2)
            .unwrap_or(usize::MAX)
            .max(1);
        if self.max_connections > room {
            tracing::warn!(
                server,
                configured = self.max_connections,
                allowed = room,
                open_files_limit = fd_limit,
                "the open-files limit allows fewer connections than configured; serving at most the allowed number (raise LimitNOFILE)"
            );
        }
        ConnLimits {
            max_connections: self.max_connections.min(room),
            max_per_client: self.max_per_client.min(room),
            ..self
        }
    }
}

/// Open files kept free of client connections: listeners, connections to node agents, files,
/// journald.
const FD_RESERVE: u64 = 256;

/// Raises this process's soft limit on open files to its hard limit (once; no privilege is
/// needed) and returns the soft limit in force. At systemd's default soft limit of 1,024, 1,024
/// idle clients took the API down: accept failed with "Too many open files".
pub fn raise_fd_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
        let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the open-files limit; assuming 1024");
                return 1024;
            }
        };
        // The kernel refuses more than fs.nr_open, which an unlimited hard limit exceeds.
        let target = if hard == RLIM_INFINITY {
            std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(1 << 20)
        } else {
            hard
        };
        if soft >= target {
            return soft;
        }
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = target, "raised the open-files limit");
                target
            }
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
                soft
            }
        }
    })
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    Total,
    Client,
}

/// Connections being served, in total and per client address.
struct Admission {
    limits: ConnLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A served connection's place; given back when dropped.
struct Ticket {
    admission: Arc<Admission>,
    client: IpAddr,
}

impl Admission {
    fn new(limits: ConnLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Ticket, Full> {
        // An IPv4 client on a dual-stack socket is the same client as over IPv4.
        let client = client.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.limits.max_connections {
            return Err(Full::Total);
        }
        let mine = open.1.entry(client).or_insert(0);
        if *mine >= self.limits.max_per_client {
            return Err(Full::Client);
        }
        *mine += 1;
        open.0 += 1;
        Ok(Ticket {
            admission: self.clone(),
            client,
        })
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        (open.0, open.1.len())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.1.remove(&self.client);
            }
        }
    }
}

/// Where a connection is, for its timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head: since accept, or since the first byte after an idle spell.
    /// `started`: some of it has come.
    Head { since: Instant, started: bool },
    /// Requests being answered; a response body still being sent counts.
    Busy(usize),
    /// Kept alive, waiting for the next request.
    Idle { since: Instant },
}

/// A connection's phase, shared by its reader, its requests and its timer.
struct Watch {
    phase: Mutex<Phase>,
    /// Told when a deadline may have moved earlier or appeared.
    changed: Notify,
}

impl Watch {
    fn new() -> Arc<Watch> {
        Arc::new(Watch {
            phase: Mutex::new(Phase::Head {
                since: Instant::now(),
                started: false,
            }),
            changed: Notify::new(),
        })
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deadline(&self, limits: &ConnLimits) -> Option<(Instant, Phase)> {
        let phase = *self.phase();
        match phase {
            Phase::Head { since, .. } => Some((since + limits.header_timeout, phase)),
            Phase::Idle { since } => Some((since + limits.idle_timeout, phase)),
            Phase::Busy(_) => None,
        }
    }

    fn got_bytes(&self) {
        let mut phase = self.phase();
        match *phase {
            Phase::Idle { .. } => {
                *phase = Phase::Head {
                    since: Instant::now(),
                    started: true,
                };
                drop(phase);
                self.changed.notify_one();
            }
            // Same deadline: no need to tell the timer.
            Phase::Head { since, .. } => {
                *phase = Phase::Head {
                    since,
                    started: true,
                }
            }
            Phase::Busy(_) => {}
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        let mut phase = self.phase();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        };
        // No deadline while busy: a timer that wakes for the old one finds none and waits.
        Busy(self.clone())
    }

    /// Resolves with the phase whose time ran out.
    async fn expired(&self, limits: &ConnLimits) -> Phase {
        loop {
            let changed = self.changed.notified();
            match self.deadline(limits) {
                Some((at, phase)) if at <= Instant::now() => return phase,
                Some((at, _)) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// A request in flight on a connection, until its response body is dropped.
struct Busy(Arc<Watch>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut phase = self.0.phase();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle {
                since: Instant::now(),
            },
        };
        drop(phase);
        self.0.changed.notify_one();
    }
}

/// A request's or response's body that keeps the request counted as in flight until both are
/// dropped: a response sent while the request body is still being read (a 413 whose body is
/// drained) leaves the connection busy, not idle.
struct Tracked<B> {
    body: B,
    _busy: Arc<Busy>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A client's socket that tells its [`Watch`] when bytes arrive.
struct Watched {
    stream: crate::tls::Stream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.watch.got_bytes();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Connections past a limit being answered 503 at once; past this many, closed at once.
const REFUSING: usize = 64;
/// How long a refused connection may take to send the head its 503 answers.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);

/// Logs a repeated event at most once per interval, with how many were not logged.
struct Throttled {
    last: Option<Instant>,
    skipped: u64,
}

impl Throttled {
    const EVERY: Duration = Duration::from_secs(10);

    fn new() -> Throttled {
        Throttled {
            last: None,
            skipped: 0,
        }
    }

    /// `Some(skipped since the last log)` when this one should be logged.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now < t + Self::EVERY) {
            self.skipped += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.skipped))
    }
}

/// Accepts until `stopping`, then waits for the connections to finish (each is told to end
/// once its request in flight is answered).
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    stopping: CancellationToken,
    name: &'static str,
    tls: Option<crate::tls::Acceptor>,
) {
    let admission = Admission::new(limits);
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let conns = TaskTracker::new();
    let (mut refused_log, mut error_log) = (Throttled::new(), Throttled::new());
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stopping.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            // The client gave up before it was accepted.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if let Some(skipped) = error_log.due() {
                    tracing::error!(server = name, error = %e, skipped, "cannot accept a connection");
                }
                // Out of descriptors or memory: the connection waits in the backlog meanwhile.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Responses are written whole or as events: waiting to coalesce them only adds latency.
        let _ = stream.set_nodelay(true);
        match admission.admit(peer.ip()) {
            Ok(ticket) => {
                conns.spawn(serve_connection(
                    stream,
                    peer,
                    router.clone(),
                    limits,
                    stopping.clone(),
                    ticket,
                    tls.clone(),
                ));
            }
            Err(full) => {
                if let Some(skipped) = refused_log.due() {
                    tracing::warn!(
                        server = name,
                        client = %peer.ip(),
                        limit = ?full,
                        max_connections = limits.max_connections,
                        max_per_client = limits.max_per_client,
                        skipped,
                        "refusing a connection: too many open"
                    );
                }
                match refusing.clone().try_acquire_owned() {
                    // A TLS client cannot read a plain 503.
                    Ok(_) if tls.is_some() => drop(stream),
                    Ok(slot) => {
                        conns.spawn(async move {
                            refuse(stream, full).await;
                            drop(slot);
                        });
                    }
                    Err(_) => drop(stream),
                }
            }
        }
    }
    // Only this process's copy of the socket closes; see the module comment.
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// Errors of one connection, not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Serves one admitted connection until it closes, its head or idle time runs out, or the
/// server stops (then it ends once the request in flight is answered).
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnLimits,
    stopping: CancellationToken,
    _ticket: Ticket,
    tls: Option<crate::tls::Acceptor>,
) {
    let stream = match tls {
        None => crate::tls::Stream::Plain(stream),
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(client = %peer, error = %format!("{e:#}"), "control connection refused");
                return;
            }
        },
    };
    let watch = Watch::new();
    let service = {
        let watch = watch.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let busy = Arc::new(watch.begin());
            let mut req = req.map(|body| {
                Body::new(Tracked {
                    body,
                    _busy: busy.clone(),
                })
            });
            req.extensions_mut().insert(ConnectInfo(peer));
            let call = tower::Service::call(&mut router.clone(), req);
            async move {
                let resp = match call.await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked { body, _busy: busy }))
            }
        })
    };
    let io = TokioIo::new(Watched {
        stream,
        watch: watch.clone(),
    });
    let mut conn = http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, service);
    let mut told_to_end = false;
    let expired = loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(client = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stopping.cancelled(), if !told_to_end => {
                told_to_end = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
            phase = watch.expired(&limits) => break phase,
        }
    };
    tracing::debug!(client = %peer, phase = ?expired, "connection timed out");
    if let Phase::Head { started: true, .. } = expired {
        // Part of a head came, then not the rest: say so before closing. No response is under
        // way in this phase, so nothing else is being written.
        let stream = conn.into_parts().io.into_inner().stream;
        stream.try_write_now(&request_timeout_response());
    }
}

/// The 408 a client gets when its request head does not arrive in time.
fn request_timeout_response() -> Vec<u8> {
    let body = serde_json::json!({ "error": {
        "message": "The request head did not arrive in time; the connection is closed.",
        "type": "invalid_request_error", "param": null, "code": "request_timeout" } })
    .to_string();
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers every request on a connection past a limit with a 503, then closes it.
async fn refuse(stream: TcpStream, full: Full) {
    let message = match full {
        Full::Client => {
            "Too many connections from your address are open; close some or retry shortly."
        }
        Full::Total => "The server has too many connections open; retry shortly.",
    };
    let service = hyper::service::service_fn(move |_req: hyper::Request<Incoming>| async move {
        let body = serde_json::json!({ "error": {
            "message": message, "type": "server_error", "param": null,
            "code": "too_many_connections" } });
        let resp = hyper::Response::builder()
            .status(hyper::StatusCode::SERVICE_UNAVAILABLE)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::RETRY_AFTER, "1")
            .body(Body::from(body.to_string()))
            .unwrap_or_default();
        Ok::<_, Infallible>(resp)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_WAIT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_WAIT * 2, conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn loopback_listener() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback")
    }

    /// Sends one HTTP/1.1 GET on a fresh connection and returns the whole response.
    async fn get(addr: SocketAddr) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_stored_socket_is_reused_only_for_its_address() {
        let l = loopback_listener();
        let addr = l.local_addr().expect("addr");
        let other: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let err =
            reuse(OwnedFd::from(l.try_clone().expect("dup")), other).expect_err("another address");
        assert!(
            err.to_string().contains(&format!("listens on {addr}")),
            "{err}"
        );
        assert!(reuse(OwnedFd::from(l), addr).is_ok());
        // A connected (not listening) socket is not taken for a listener.
        let l = loopback_listener();
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let err = reuse(OwnedFd::from(c), addr).expect_err("not listening");
        assert!(err.to_string().contains("not a listening"), "{err}");
    }

    #[tokio::test]
    async fn clients_queued_while_one_server_stops_are_served_by_the_next() {
        // Two descriptors of one socket: the server's, and the one systemd's fd store keeps.
        let std_listener = loopback_listener();
        let addr = std_listener.local_addr().expect("addr");
        let stored = OwnedFd::from(std_listener.try_clone().expect("dup"));
        std_listener.set_nonblocking(true).expect("nonblocking");
        let app = || Router::new().route("/", axum::routing::get(|| async { "served" }));
        let old = spawn(
            TcpListener::from_std(std_listener).expect("listener"),
            app(),
            Signals::default(),
            "old",
        );
        assert!(get(addr).await.expect("old server").ends_with("served"));
        old.shutdown(Duration::from_secs(1)).await;
        // Nobody accepts now; the client is queued in the backlog, not refused or reset.
        let queued = tokio::spawn(get(addr));
        let new = spawn(
            reuse(stored, addr).expect("reuse"),
            app(),
            Signals::default(),
            "new",
        );
        let answer = queued.await.expect("task").expect("queued client");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("served"),
            "{answer}"
        );
        new.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_server_accepts_only_once_it_is_opened() {
        let opened = Arc::new(AtomicBool::new(false));
        let seen = opened.clone();
        let app = Router::new().route(
            "/",
            axum::routing::get(move || async move { seen.load(Ordering::SeqCst).to_string() }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (open_tx, open_rx) = tokio::sync::oneshot::channel::<()>();
        let server = spawn_after(
            listener,
            app,
            Signals::default(),
            "gated",
            ConnLimits::CONTROL,
            async move {
                let _ = open_rx.await;
            },
        );
        let client = tokio::spawn(get(addr));
        tokio::time::sleep(Duration::from_millis(200)).await;
        opened.store(true, Ordering::SeqCst);
        open_tx.send(()).expect("open");
        let answer = client.await.expect("task").expect("client");
        assert!(
            answer.ends_with("true"),
            "answered before it was opened: {answer}"
        );
        server.shutdown(Duration::from_secs(1)).await;
    }

    fn limits(header_ms: u64, idle_ms: u64, per_client: usize) -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_millis(header_ms),
            idle_timeout: Duration::from_millis(idle_ms),
            max_connections: 100,
            max_per_client: per_client,
        }
    }

    /// A server on loopback with `/` answering at once and `/slow` after 1.5 s.
    async fn limited(limits: ConnLimits) -> (Server, SocketAddr) {
        let app = Router::new()
            .route("/", axum::routing::get(|| async { "served" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    "slow but served"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = spawn_after(
            listener,
            app,
            Signals::default(),
            "limited",
            limits,
            std::future::ready(()),
        );
        (server, addr)
    }

    /// Connects from `from` (a loopback address), writes `send`, and reads until the server
    /// closes. The outer timeout only keeps a broken server from hanging the test.
    async fn exchange(from: [u8; 4], addr: SocketAddr, send: &[u8]) -> String {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((from, 0)))
            .expect("bind the client");
        let mut s = socket.connect(addr).await.expect("connect");
        s.write_all(send).await.expect("write");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .expect("the server never closed the connection")
            .expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn slow_heads_get_a_408_and_idle_connections_are_closed() {
        let (server, addr) = limited(limits(300, 600, 10)).await;
        // Part of a head, then nothing.
        let answer = exchange([127, 0, 0, 1], addr, b"GET / HTTP/1.1\r\nhost: t\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        // Nothing at all: closed without a word.
        assert_eq!(exchange([127, 0, 0, 1], addr, b"").await, "");
        // One request kept alive, then idle: answered, then closed.
        let answer = exchange([127, 0, 0, 1], addr, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n").await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("served"),
            "{answer}"
        );
        server.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_response_that_takes_long_is_not_cut_by_the_timeouts() {
        let (server, addr) = limited(limits(300, 300, 10)).await;
        let answer = exchange(
            [127, 0, 0, 1],
            addr,
            b"GET /slow HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.ends_with("slow but served"), "{answer}");
        server.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn connections_past_the_per_client_limit_get_a_503_and_others_are_served() {
        let (server, addr) = limited(limits(30_000, 30_000, 2)).await;
        let held = [
            tokio::net::TcpStream::connect(addr).await.expect("first"),
            tokio::net::TcpStream::connect(addr).await.expect("second"),
        ];
        let get = b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n";
        let answer = exchange([127, 0, 0, 1], addr, get).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        assert!(answer.contains("too_many_connections"), "{answer}");
        // Another address has its own share.
        let answer = exchange([127, 0, 0, 2], addr, get).await;
        assert!(answer.ends_with("served"), "{answer}");
        // A closed connection gives its place back.
        drop(held);
        let mut answer = String::new();
        for _ in 0..100 {
            answer = exchange([127, 0, 0, 1], addr, get).await;
            if answer.ends_with("served") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answer.ends_with("served"), "{answer}");
        server.shutdown(Duration::from_secs(1)).await;
    }

    #[test]
    fn admission_counts_per_client_and_in_total_and_gives_places_back() {
        let a = Admission::new(ConnLimits {
            max_connections: 3,
            max_per_client: 2,
            ..ConnLimits::CONTROL
        });
        let one: IpAddr = "10.0.0.1".parse().expect("ip");
        let two: IpAddr = "::ffff:10.0.0.2".parse().expect("ip");
        let t1 = a.admit(one).expect("first");
        let t2 = a.admit(one).expect("second");
        assert_eq!(a.admit(one).err(), Some(Full::Client));
        let t3 = a.admit(two).expect("another client");
        assert_eq!(
            a.admit("10.0.0.3".parse().expect("ip")).err(),
            Some(Full::Total)
        );
        assert_eq!(a.counts(), (3, 2));
        drop((t1, t2, t3));
        assert_eq!(a.counts(), (0, 0));
    }

    #[test]
    fn connection_limits_stay_within_the_open_files_limit() {
        let l = ConnLimits::CONTROL.within(1024, "t");
        assert_eq!(l.max_connections, (1024 - FD_RESERVE as usize) / 2);
        assert_eq!(
            ConnLimits::CONTROL.within(1 << 20, "t"),
            ConnLimits::CONTROL
        );
    }
}
