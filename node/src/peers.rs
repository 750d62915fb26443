//! The peers a node keeps connections to: a budget, and which connections to close when it
//! is exceeded.
//!
//! The master spreads a node's transfers over many holders, so over a fetch a node connects
//! to many peers, each connection idle once its piece is done. Left to libp2p's idle timeout,
//! a node in a large crowd holds a connection to most of the swarm for a minute after it last
//! used it: one socket each (two when both ends are in one process, as in the simulator's
//! live engine), and a process's descriptors run out long before the connection caps. A
//! node therefore keeps at most `max_peers` peers connected: when it has more, it closes its
//! connections to the peers it used least recently, never the master, never a peer with a
//! piece stream open in either direction, and never one it connected to or used within
//! [`GRACE`] (a fresh connection is about to carry the stream it was made for).
//!
//! The table holds one entry per connected peer or open piece stream, so it is bounded by
//! the connection caps and the node's transfers and upload slots.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use libp2p::PeerId;
use tokio::time::Instant;

/// A peer connected or used this recently is never closed for the budget.
pub const GRACE: Duration = Duration::from_secs(10);

/// Peers a node keeps connected by default (`shoal --max-peers`).
pub const DEFAULT_MAX_PEERS: usize = 128;

#[derive(Debug)]
struct Use {
    /// Piece streams open with the peer, both directions.
    active: u32,
    /// When a stream with it last ended or began, or the connection was made.
    last: Instant,
    /// Whether a connection to it is established.
    connected: bool,
}

/// Which peers are in use, shared by the fetches, the piece server and the event loop.
#[derive(Debug, Default)]
pub struct PeerUse {
    table: Mutex<HashMap<PeerId, Use>>,
}

impl PeerUse {
    /// Marks a piece stream with `peer` open until the guard is dropped.
    pub fn guard(self: &Arc<Self>, peer: PeerId) -> UseGuard {
        self.touch(peer, |u| u.active += 1);
        UseGuard {
            table: self.clone(),
            peer,
        }
    }

    /// A first connection to `peer` was established.
    pub fn connected(&self, peer: PeerId) {
        self.touch(peer, |u| u.connected = true);
    }

    /// Marks `peer` used now (adding it if new), then applies `change` to its entry.
    fn touch(&self, peer: PeerId, change: impl FnOnce(&mut Use)) {
        let now = Instant::now();
        let mut t = self.table.lock().expect("peer use lock");
        let u = t.entry(peer).or_insert(Use {
            active: 0,
            last: now,
            connected: false,
        });
        u.last = now;
        change(u);
    }

    /// The last connection to `peer` closed.
    pub fn disconnected(&self, peer: &PeerId) {
        let mut t = self.table.lock().expect("peer use lock");
        if let Some(u) = t.get_mut(peer) {
            u.connected = false;
            if u.active == 0 {
                t.remove(peer);
            }
        }
    }

    /// The peers to disconnect now so that at most `max_peers` stay connected, `keep` (the
    /// master) never among them; least recently used first. Fewer (or none) when the others
    /// are in use or within [`GRACE`].
    pub fn over_budget(&self, max_peers: usize, keep: &PeerId) -> Vec<PeerId> {
        let now = Instant::now();
        let t = self.table.lock().expect("peer use lock");
        let connected = t.values().filter(|u| u.connected).count();
        let Some(excess) = connected.checked_sub(max_peers).filter(|e| *e > 0) else {
            return Vec::new();
        };
        let mut idle: Vec<(Instant, PeerId)> = t
            .iter()
            .filter(|(p, u)| {
                u.connected && u.active == 0 && *p != keep && now.duration_since(u.last) >= GRACE
            })
            .map(|(p, u)| (u.last, *p))
            .collect();
        idle.sort_unstable();
        idle.into_iter().take(excess).map(|(_, p)| p).collect()
    }

    fn release(&self, peer: &PeerId) {
        let mut t = self.table.lock().expect("peer use lock");
        if let Some(u) = t.get_mut(peer) {
            u.active = u.active.saturating_sub(1);
            u.last = Instant::now();
            if u.active == 0 && !u.connected {
                t.remove(peer);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().expect("peer use lock").len()
    }
}

/// A piece stream with a peer is open while this lives.
#[derive(Debug)]
pub struct UseGuard {
    table: Arc<PeerUse>,
    peer: PeerId,
}

impl Drop for UseGuard {
    fn drop(&mut self) {
        self.table.release(&self.peer);
    }
}

/// A stream that keeps its peer marked in use while it lives.
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    _guard: UseGuard,
}

impl<S> Guarded<S> {
    /// `inner`, in use until dropped.
    pub fn new(inner: S, guard: UseGuard) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn closes_the_least_recently_used_idle_peers_down_to_the_budget() {
        let t = Arc::new(PeerUse::default());
        let p = peers(5);
        let master = p[0];
        for q in &p {
            t.connected(*q);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // Within the grace period nobody is closed, even over budget.
        assert!(t.over_budget(2, &master).is_empty());
        tokio::time::advance(GRACE).await;
        // p[1] is in use; p[2] was used recently; p[3] and p[4] are the oldest idle ones
        // after the master, which is kept.
        let busy = t.guard(p[1]);
        drop(t.guard(p[2]));
        tokio::time::advance(GRACE).await;
        drop(t.guard(p[2]));
        assert_eq!(t.over_budget(2, &master), vec![p[3], p[4]]);
        assert_eq!(t.over_budget(4, &master), vec![p[3]]);
        assert!(t.over_budget(5, &master).is_empty());
        // Over budget with everyone else busy or fresh: nothing to close.
        assert!(t.over_budget(0, &master).len() == 2);
        drop(busy);
        tokio::time::advance(GRACE).await;
        assert_eq!(t.over_budget(1, &master).len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_leave_with_the_last_connection_and_stream() {
        let t = Arc::new(PeerUse::default());
        let [a, b] = [PeerId::random(), PeerId::random()];
        let g = t.guard(a);
        t.connected(a);
        t.connected(b);
        t.disconnected(&a);
        t.disconnected(&b);
        // `a` still has a stream open (a dial may be in flight); `b` is gone.
        assert_eq!(t.len(), 1);
        drop(g);
        assert_eq!(t.len(), 0);
        // A guard dropped while connected keeps the entry until the connection closes.
        t.connected(b);
        drop(t.guard(b));
        assert_eq!(t.len(), 1);
        t.disconnected(&b);
        assert_eq!(t.len(), 0);
    }
}
