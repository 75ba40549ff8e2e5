//! HTTP serving with shutdown designed in, for both of the agent's servers (the node control API
//! and the head's public API).
//!
//! Shutdown has two steps, as in mini-redis: first the server stops accepting and lets what is in
//! flight finish (a completion being streamed to a client is worth finishing when only the agent
//! restarts); after a grace, handlers that would run on (long polls, streams) are told to end now
//! — a stream ends with an error event, never mid-token without a word — and the server task is
//! awaited. Only if it still has not ended is it dropped, so shutdown is always bounded.
//!
//! A listening socket can outlive the agent: [`listen`] keeps it in systemd's file-descriptor
//! store (`FileDescriptorStoreMax=` in the unit) and takes it back on the next start. While one
//! agent drains and the next starts, connections wait in the socket's backlog instead of being
//! refused, and the new agent accepts them. Stopping to accept only closes this process's copy
//! of the socket (axum drops its listener; nothing calls shutdown(2) on it, which would reset the
//! queued connections), so the copy in the store keeps them.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use nix::sys::socket::{getsockopt, sockopt};
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

/// Serves `router` on `listener` until [`Server::shutdown`].
pub fn spawn(
    listener: TcpListener,
    router: Router,
    signals: Signals,
    name: &'static str,
) -> Server {
    spawn_after(listener, router, signals, name, std::future::ready(()))
}

/// As [`spawn`], but accepts only once `open` resolves; until then clients wait in the backlog.
pub fn spawn_after(
    listener: TcpListener,
    router: Router,
    signals: Signals,
    name: &'static str,
    open: impl Future<Output = ()> + Send + 'static,
) -> Server {
    let stopping = signals.stopping.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = open => {}
            _ = stopping.cancelled() => return,
        }
        let res = axum::serve(listener, router)
            .with_graceful_shutdown(stopping.cancelled_owned())
            .await;
        if let Err(e) = res {
            tracing::error!(server = name, error = %e, "server stopped");
        }
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
        let server = spawn_after(listener, app, Signals::default(), "gated", async move {
            let _ = open_rx.await;
        });
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
}
