//! A delaying TCP relay for the bench's ring links. This kernel has no netem, so latency between
//! ranks is made in userspace: every chunk read from one side is written to the other side
//! `delay` after it was read. Reading never waits for the delay (a queue sits between the reader
//! and the writer), so the link keeps its throughput and order and gains only latency, as a
//! long cable would; a sleep per read would also cut the bandwidth to one chunk per delay.
//! The delay can change while connections are open, so one ring serves every latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::plan::RelayLink;

/// Chunks in flight per direction: with 64 KiB reads, at most 64 MiB queued on a link whose far
/// side stops reading; the reader then waits, as TCP's own window would make it.
const QUEUE: usize = 1024;
const READ_SIZE: usize = 64 * 1024;
/// How long the relay tries to reach the listening rank before it drops the dialing one, which
/// then sees a refused or closed connection as it would without the relay.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes a link carried, by direction, since the relay started.
#[derive(Debug, Default)]
pub struct Counters {
    /// From the dialing rank to the listening one.
    pub forward: AtomicU64,
    /// From the listening rank back to the dialing one.
    pub backward: AtomicU64,
    pub connections: AtomicU64,
}

/// What one link carried, for the bench's JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkBytes {
    pub from: u32,
    pub to: u32,
    pub kind: &'static str,
    pub listen: SocketAddr,
    pub target: SocketAddr,
    pub bytes_forward: u64,
    pub bytes_backward: u64,
    pub connections: u64,
}

/// Relays on a set of links, all with one adjustable one-way delay; dropping it stops accepting
/// (open connections end when the ranks close them).
pub struct Relays {
    links: Vec<(RelayLink, Arc<Counters>)>,
    delay_us: Arc<AtomicU64>,
    accept_tasks: Vec<JoinHandle<()>>,
}

impl Drop for Relays {
    fn drop(&mut self) {
        for t in &self.accept_tasks {
            t.abort();
        }
    }
}

impl Relays {
    /// Binds every link's listening address first, so a port in use fails here, by name.
    pub async fn start(links: &[RelayLink], delay: Duration) -> Result<Relays> {
        let delay_us = Arc::new(AtomicU64::new(micros(delay)));
        let mut out = Relays {
            links: Vec::new(),
            delay_us: delay_us.clone(),
            accept_tasks: Vec::new(),
        };
        for link in links {
            let listener = TcpListener::bind(link.listen).await.with_context(|| {
                format!(
                    "relay for the {} link rank {} -> rank {}: cannot listen on {}",
                    link.kind, link.from, link.to, link.listen
                )
            })?;
            let counters = Arc::new(Counters::default());
            let task = tokio::spawn(accept_loop(
                listener,
                link.clone(),
                counters.clone(),
                delay_us.clone(),
            ));
            out.links.push((link.clone(), counters));
            out.accept_tasks.push(task);
        }
        Ok(out)
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(micros(delay), Ordering::Relaxed);
    }

    /// What every link has carried so far.
    pub fn bytes(&self) -> Vec<LinkBytes> {
        self.links
            .iter()
            .map(|(l, c)| LinkBytes {
                from: l.from,
                to: l.to,
                kind: l.kind,
                listen: l.listen,
                target: l.target,
                bytes_forward: c.forward.load(Ordering::Relaxed),
                bytes_backward: c.backward.load(Ordering::Relaxed),
                connections: c.connections.load(Ordering::Relaxed),
            })
            .collect()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What each link carried between two readings of [`Relays::bytes`] (same links, same order).
pub fn bytes_between(before: &[LinkBytes], after: &[LinkBytes]) -> Vec<LinkBytes> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| LinkBytes {
            bytes_forward: a.bytes_forward.saturating_sub(b.bytes_forward),
            bytes_backward: a.bytes_backward.saturating_sub(b.bytes_backward),
            connections: a.connections.saturating_sub(b.connections),
            ..a.clone()
        })
        .collect()
}

/// `acc` plus `more`, link by link (an empty `acc` is all zeros).
pub fn add(acc: &[LinkBytes], more: &[LinkBytes]) -> Vec<LinkBytes> {
    if acc.is_empty() {
        return more.to_vec();
    }
    acc.iter()
        .zip(more)
        .map(|(a, m)| LinkBytes {
            bytes_forward: a.bytes_forward + m.bytes_forward,
            bytes_backward: a.bytes_backward + m.bytes_backward,
            connections: a.connections + m.connections,
            ..a.clone()
        })
        .collect()
}

async fn accept_loop(
    listener: TcpListener,
    link: RelayLink,
    counters: Arc<Counters>,
    delay_us: Arc<AtomicU64>,
) {
    loop {
        let (inbound, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like pass; the dialing rank retries or fails on its own.
                tracing::warn!(listen = %link.listen, error = %e, "relay cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (target, counters, delay_us) = (link.target, counters.clone(), delay_us.clone());
        tokio::spawn(async move {
            let outbound =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%target, %peer, error = %e, "relay target refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%target, %peer, "relay target did not answer");
                        return;
                    }
                };
            counters.connections.fetch_add(1, Ordering::Relaxed);
            carry(inbound, outbound, counters, delay_us).await;
        });
    }
}

/// Both directions of one relayed connection, until both have ended.
async fn carry(
    inbound: TcpStream,
    outbound: TcpStream,
    counters: Arc<Counters>,
    delay_us: Arc<AtomicU64>,
) {
    // The engines' small messages would otherwise wait for Nagle on top of the delay.
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_r, in_w) = inbound.into_split();
    let (out_r, out_w) = outbound.into_split();
    let c = counters.clone();
    let forward = direction(in_r, out_w, delay_us.clone(), move |n| {
        c.forward.fetch_add(n, Ordering::Relaxed);
    });
    let backward = direction(out_r, in_w, delay_us, move |n| {
        counters.backward.fetch_add(n, Ordering::Relaxed);
    });
    tokio::join!(forward, backward);
}

/// One direction: a reader that stamps every chunk with its delivery time and a writer that
/// delivers it then. EOF is passed on (as a write shutdown) after the last chunk.
async fn direction(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay_us: Arc<AtomicU64>,
    count: impl Fn(u64) + Send + 'static,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(QUEUE);
    let reader = async move {
        let mut buf = BytesMut::with_capacity(READ_SIZE);
        loop {
            buf.reserve(READ_SIZE);
            match r.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let due =
                        Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
                    if tx.send((due, buf.split().freeze())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
            count(chunk.len() as u64);
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(listen: SocketAddr, target: SocketAddr) -> RelayLink {
        RelayLink {
            from: 0,
            to: 1,
            kind: "rpc",
            listen,
            target,
        }
    }

    async fn free_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    }

    /// Real sockets on loopback: an echo server behind the relay.
    #[tokio::test]
    async fn relays_bytes_in_order_both_ways_with_the_delay_and_counts_them() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let target = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => s.write_all(&buf[..n]).await.expect("echo"),
                }
            }
        });
        let listen = free_addr().await;
        let relays = Relays::start(&[link(listen, target)], Duration::from_millis(30))
            .await
            .expect("relay");
        let mut c = TcpStream::connect(listen).await.expect("connect");
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let started = std::time::Instant::now();
        let (mut r, mut w) = c.split();
        let send = async {
            w.write_all(&payload).await.expect("send");
        };
        let mut back = vec![0u8; payload.len()];
        let recv = async {
            r.read_exact(&mut back).await.expect("echoed");
        };
        tokio::join!(send, recv);
        let rtt = started.elapsed();
        assert_eq!(back, payload, "order and content survive");
        assert!(
            rtt >= Duration::from_millis(60),
            "one delay each way: {rtt:?}"
        );
        let b = relays.bytes();
        assert_eq!(b[0].bytes_forward, payload.len() as u64);
        assert_eq!(b[0].bytes_backward, payload.len() as u64);
        assert_eq!(b[0].connections, 1);
        let d = bytes_between(&b, &relays.bytes());
        assert_eq!(d[0].bytes_forward, 0);
        assert_eq!(
            add(&add(&[], &b), &b)[0].bytes_backward,
            2 * b[0].bytes_backward
        );
    }

    #[tokio::test]
    async fn a_target_that_is_not_there_closes_the_dialing_side() {
        let target = free_addr().await;
        let listen = free_addr().await;
        let _relays = Relays::start(&[link(listen, target)], Duration::ZERO)
            .await
            .expect("relay");
        let mut c = TcpStream::connect(listen).await.expect("connect");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("closed in bounded time");
        assert!(matches!(n, Ok(0) | Err(_)));
    }

    #[tokio::test]
    async fn a_port_in_use_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let Err(e) = Relays::start(&[link(addr, addr)], Duration::ZERO).await else {
            panic!("bind of a taken port succeeded");
        };
        assert!(format!("{e:#}").contains(&addr.to_string()), "{e:#}");
    }
}
