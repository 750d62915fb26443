//! yamux with frames as large as a block.
//!
//! libp2p's yamux upgrade keeps yamux's default of cutting every write into frames of at most
//! 16 KiB, and does not let that be changed. shoal's piece server writes whole blocks (64 KiB
//! and up), and each 16 KiB frame of them costs its own header, TLS write, `writev`, wake-up
//! of the receiving connection task and yamux buffer on the other side. In a 48-node flash
//! crowd, where every node's CPU goes to these per-frame costs, frames of a 64 KiB block took
//! about 8% off the crowd's CPU (see ARCHITECTURE, "yamux frames").
//!
//! This is the same wire protocol (`/yamux/1.0.0`): a yamux peer takes any data frame within
//! the window it granted (256 KiB at first), and rust-yamux any up to 1 MiB, so shoal peers
//! and stock libp2p peers talk to each other as before. Only what this side sends changes; what it accepts (frame
//! size, windows, streams) is yamux's default.
//!
//! Bytes queued for the socket are capped per connection ([`MAX_QUEUED`]). yamux queues up to
//! about 12 frames per stream for the socket, and frames already queued stay queued after the
//! stream is dropped, until the connection closes: a peer that grants large windows and stops
//! reading could otherwise pin that much for every stream it gets served, up to 512 streams a
//! connection. Here a stream's write waits while the connection has [`MAX_QUEUED`] bytes
//! written to yamux and not yet taken by the socket.

use std::{
    collections::{HashMap, VecDeque},
    io, iter,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
};

use futures::{future, AsyncRead, AsyncWrite};
use libp2p::core::{
    muxing::{StreamMuxer, StreamMuxerEvent},
    upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo},
};

/// The largest frame this side sends, when the stream's send window allows: a 64 KiB block
/// (the block size of files up to 1 GiB) goes out as one frame, a larger block as several.
/// yamux's default is 16 KiB. Larger frames measured no better in the flash crowd, and would
/// let a peer that stops reading pin more memory per stream (module docs).
pub const SPLIT_SEND_SIZE: usize = 64 * 1024;

/// Bytes a connection's streams may have written to yamux that the socket has not taken yet;
/// a stream's write waits while this many or more are queued (one frame may pass it). Frames
/// of every stream of the connection count, their headers included.
pub const MAX_QUEUED: usize = 1024 * 1024;

/// yamux's frame header.
const HEADER: usize = 12;

/// Writers that found the queue full are woken once it is below this, not at every frame
/// the socket takes.
const LOW_WATER: usize = MAX_QUEUED / 2;

/// A connection's bytes queued in yamux for its socket, and the writers waiting for room.
///
/// A write reserves its largest possible frame before yamux sees it and gives back what the
/// frame did not use, so the socket taking a frame (on another thread, at once) can never
/// run ahead of the count. Control frames the socket takes were never counted; the count
/// stops at zero, so they only make it low for a moment.
#[derive(Debug, Default)]
struct Queue {
    bytes: AtomicUsize,
    /// The connection is closing or gone: writes no longer wait (yamux answers them).
    closed: AtomicBool,
    /// Whether `waiting` may hold anyone (saves the lock on every socket write).
    has_waiters: AtomicBool,
    next_id: AtomicU64,
    /// The waker of each stream whose write waits, by stream: at most one per live stream.
    waiting: Mutex<HashMap<u64, Waker>>,
}

impl Queue {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waker>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_all(&self) {
        let woken: Vec<Waker> = {
            let mut w = self.waiting();
            self.has_waiters.store(false, Ordering::SeqCst);
            w.drain().map(|(_, w)| w).collect()
        };
        for w in woken {
            w.wake();
        }
    }

    /// The connection is closing or gone: wake every waiting writer, and let none wait again.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// Takes `r` bytes if the queue is below the cap (or closed).
    fn try_reserve(&self, r: usize) -> bool {
        self.bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                (b < MAX_QUEUED).then_some(b + r)
            })
            .is_ok()
            || self.closed.load(Ordering::SeqCst)
    }

    /// `n` bytes left the queue: the socket took them, or a reservation was not used.
    fn release(&self, n: usize) {
        let _ = self
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(n))
            });
        if self.has_waiters.load(Ordering::SeqCst) && self.bytes.load(Ordering::SeqCst) < LOW_WATER
        {
            self.wake_all();
        }
    }

    /// Stream `id` waits for room: `cx` is woken once the queue is below [`LOW_WATER`] (or
    /// closed).
    fn wait(&self, id: u64, cx: &Context<'_>) {
        let mut w = self.waiting();
        w.insert(id, cx.waker().clone());
        self.has_waiters.store(true, Ordering::SeqCst);
    }

    /// Stream `id` is gone.
    fn forget(&self, id: u64) {
        let mut w = self.waiting();
        w.remove(&id);
        if w.is_empty() {
            self.has_waiters.store(false, Ordering::SeqCst);
        }
    }
}

/// The socket under yamux: counts what it takes off the connection's [`Queue`].
#[derive(Debug)]
pub struct Counted<C> {
    inner: C,
    queue: Arc<Queue>,
}

impl<C: AsyncRead + Unpin> AsyncRead for Counted<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Counted<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.queue.release(n);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A yamux stream whose writes wait while its connection has [`MAX_QUEUED`] bytes queued.
#[derive(Debug)]
pub struct Stream {
    inner: yamux::Stream,
    queue: Arc<Queue>,
    id: u64,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.queue.forget(self.id);
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // yamux makes one frame of at most this much of a write.
        let reserved = buf.len().min(SPLIT_SEND_SIZE) + HEADER;
        if !self.queue.try_reserve(reserved) {
            self.queue.wait(self.id, cx);
            // Room may have been made between the try and the registration.
            if !self.queue.try_reserve(reserved) {
                return Poll::Pending;
            }
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        let used = match r {
            Poll::Ready(Ok(n)) => (n + HEADER).min(reserved),
            _ => 0,
        };
        self.queue.release(reserved - used);
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Inbound streams held while the connection's owner is not taking them; more are dropped
/// (reset). yamux's own backlog of unacknowledged streams is as large, so a peer that follows
/// the protocol never gets that far.
const MAX_PENDING_INBOUND: usize = 256;

/// The yamux upgrade: yamux's defaults, frames of up to [`SPLIT_SEND_SIZE`].
#[derive(Debug, Clone)]
pub struct Yamux(yamux::Config);

impl Yamux {
    /// The upgrade.
    pub fn new() -> Self {
        let mut c = yamux::Config::default();
        c.set_split_send_size(SPLIT_SEND_SIZE);
        Self(c)
    }

    fn muxer<C>(self, io: C, mode: yamux::Mode) -> Muxer<C>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let queue = Arc::new(Queue::default());
        let io = Counted {
            inner: io,
            queue: queue.clone(),
        };
        Muxer {
            connection: yamux::Connection::new(io, self.0, mode),
            queue,
            inbound: VecDeque::new(),
            inbound_waker: None,
        }
    }
}

impl Default for Yamux {
    fn default() -> Self {
        Self::new()
    }
}

impl UpgradeInfo for Yamux {
    type Info = &'static str;
    type InfoIter = iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ready(Ok(self.muxer(io, yamux::Mode::Server)))
    }
}

impl<C> OutboundConnectionUpgrade<C> for Yamux
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ready(Ok(self.muxer(io, yamux::Mode::Client)))
    }
}

/// One yamux connection.
#[derive(Debug)]
pub struct Muxer<C> {
    connection: yamux::Connection<Counted<C>>,
    queue: Arc<Queue>,
    /// Inbound streams that arrived while the owner was driving the connection (`poll`) rather
    /// than asking for a stream (`poll_inbound`): yamux hands them out only from the one call
    /// that also moves every other stream's bytes.
    inbound: VecDeque<yamux::Stream>,
    inbound_waker: Option<Waker>,
}

impl<C> Drop for Muxer<C> {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// A yamux connection's error, as an I/O error.
fn to_io(e: yamux::ConnectionError) -> io::Error {
    match e {
        yamux::ConnectionError::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<C> Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    fn wrap(&self, inner: yamux::Stream) -> Stream {
        Stream {
            inner,
            queue: self.queue.clone(),
            id: self.queue.next_id.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Drives the connection until an inbound stream arrives or nothing more can be done now.
    fn next_inbound(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<yamux::Stream>> {
        let end = match self.connection.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(s))) => return Poll::Ready(Ok(s)),
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Err(e))) => to_io(e),
            Poll::Ready(None) => to_io(yamux::ConnectionError::Closed),
        };
        // yamux dropped what it had queued: nobody should wait for it to drain.
        self.queue.close();
        Poll::Ready(Err(end))
    }
}

impl<C> StreamMuxer for Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    type Substream = Stream;
    type Error = io::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        if let Some(s) = self.inbound.pop_front() {
            return Poll::Ready(Ok(self.wrap(s)));
        }
        if let Poll::Ready(r) = self.next_inbound(cx) {
            return Poll::Ready(r.map(|s| self.wrap(s)));
        }
        self.inbound_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        match std::task::ready!(self.connection.poll_new_outbound(cx)) {
            Ok(s) => Poll::Ready(Ok(self.wrap(s))),
            Err(e) => {
                self.queue.close();
                Poll::Ready(Err(to_io(e)))
            }
        }
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Closing may wait on a peer that does not read; writers must not wait with it.
        self.queue.close();
        self.connection.poll_close(cx).map_err(to_io)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = self.get_mut();
        let stream = match this.next_inbound(cx) {
            Poll::Ready(Ok(s)) => s,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        if this.inbound.len() >= MAX_PENDING_INBOUND {
            tracing::debug!(stream = %stream, "too many inbound streams waiting; dropped");
            drop(stream);
        } else {
            this.inbound.push_back(stream);
            if let Some(w) = this.inbound_waker.take() {
                w.wake();
            }
        }
        // Come back at once: more may be ready, and the owner takes the stream meanwhile.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        time::Duration,
    };

    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::core::muxing::StreamMuxerExt;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    use super::*;

    type Pipe = Compat<tokio::io::DuplexStream>;

    /// Drives `m` in the background, handing its inbound streams to the returned receiver.
    fn drive<M>(mut m: M) -> tokio::sync::mpsc::UnboundedReceiver<M::Substream>
    where
        M: StreamMuxer + Unpin + Send + 'static,
        M::Substream: Send,
    {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let next = future::poll_fn(|cx| {
                    if let Poll::Ready(r) = m.poll_inbound_unpin(cx) {
                        return Poll::Ready(r.ok());
                    }
                    match m.poll_unpin(cx) {
                        Poll::Ready(Err(_)) => Poll::Ready(None),
                        _ => Poll::Pending,
                    }
                })
                .await;
                let Some(s) = next else { return };
                if tx.send(s).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Sends three and a bit frames' worth from a [`Yamux`] client through `server`; returns
    /// what arrived and the longest write the client offered its socket.
    async fn send_through<M, F>(server: F) -> (Vec<u8>, Vec<u8>, usize)
    where
        F: FnOnce(Pipe) -> M,
        M: StreamMuxer + Unpin + Send + 'static,
        M::Substream: AsyncRead + Unpin + Send,
    {
        let (x, y) = tokio::io::duplex(64 * 1024);
        let (spy, writes) = crate::testing::Recorder::new(x.compat());
        let mut client = Yamux::new().muxer(spy, yamux::Mode::Client);
        let mut rx = drive(server(y.compat()));
        let mut out = future::poll_fn(|cx| client.poll_outbound_unpin(cx))
            .await
            .expect("an outbound stream");
        let _client_inbound = drive(client);
        let data: Vec<u8> = (0..SPLIT_SEND_SIZE * 3 + 777)
            .map(|i| (i % 251) as u8)
            .collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            out.write_all(&sent).await.expect("write");
            out.close().await.expect("close");
        });
        let mut inbound = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no inbound stream within 10 s")
            .expect("the server's muxer ended");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), inbound.read_to_end(&mut got))
            .await
            .expect("the stream did not end within 10 s")
            .expect("read");
        writer.await.expect("writer");
        let longest = writes.lock().unwrap().iter().copied().max().unwrap_or(0);
        (data, got, longest)
    }

    #[tokio::test]
    async fn blocks_go_out_in_large_frames_and_arrive_whole() {
        let (sent, got, longest) =
            send_through(|io| Yamux::new().muxer(io, yamux::Mode::Server)).await;
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes differ");
        // yamux's default would have offered 16 KiB bodies at most.
        assert_eq!(longest, SPLIT_SEND_SIZE, "longest write to the socket");
    }

    #[tokio::test]
    async fn a_stock_libp2p_peer_takes_the_large_frames() {
        let (sent, got, longest) = send_through(|io| {
            libp2p::yamux::Config::default()
                .upgrade_inbound(io, "/yamux/1.0.0")
                .into_inner()
                .expect("stock yamux upgrade")
        })
        .await;
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes differ");
        assert_eq!(longest, SPLIT_SEND_SIZE, "longest write to the socket");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_pins_at_most_max_queued_a_connection() {
        // The other end reads nothing until told: the socket takes what fits in the pipe.
        let (x, mut y) = tokio::io::duplex(64 * 1024);
        let mut client = Yamux::new().muxer(x.compat(), yamux::Mode::Client);
        // Eight streams, each with yamux's initial 256 KiB of credit: 2 MiB could be queued.
        let mut streams = Vec::new();
        for _ in 0..8 {
            let s = future::poll_fn(|cx| client.poll_outbound_unpin(cx))
                .await
                .expect("an outbound stream");
            streams.push(s);
        }
        let _inbound = drive(client);
        let accepted = Arc::new(AtomicUsize::new(0));
        let block = vec![7u8; SPLIT_SEND_SIZE];
        let mut writers = Vec::new();
        for mut s in streams {
            let accepted = accepted.clone();
            let block = block.clone();
            writers.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    for _ in 0..4 {
                        let n = s.write(&block).await.expect("write");
                        accepted.fetch_add(n, Ordering::Relaxed);
                    }
                })
                .await;
                s
            }));
        }
        let mut held = Vec::new();
        for w in writers {
            held.push(w.await.expect("writer"));
        }
        let stalled = accepted.load(Ordering::Relaxed);
        // Each stream may get one frame past the cap before it sees it full.
        let bound = MAX_QUEUED + 8 * SPLIT_SEND_SIZE;
        assert!(
            stalled <= bound,
            "{stalled} bytes accepted, more than {bound}"
        );
        assert!(
            stalled >= MAX_QUEUED - SPLIT_SEND_SIZE,
            "only {stalled} bytes accepted"
        );

        // A writer waiting on the full queue goes on once the peer reads enough.
        let mut waiting = held.pop().expect("a stream");
        let writer = tokio::spawn(async move {
            let n = waiting.write(&block).await.expect("write");
            (waiting, n)
        });
        // Paused time: everything runs until idle, so the writer is waiting by now.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !writer.is_finished(),
            "the write did not wait for a full queue"
        );
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < MAX_QUEUED {
            read += tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read(&mut y, &mut buf),
            )
            .await
            .expect("the queued frames did not reach the peer")
            .expect("read");
        }
        let (_waiting, n) = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer was not woken once the queue drained")
            .expect("writer");
        assert!(n > 0);

        // The connection going away lets the waiting writers go (with yamux's error).
        drop(y);
        for mut s in held {
            let r = tokio::time::timeout(Duration::from_secs(5), s.write(&[1u8; 10])).await;
            assert!(r.is_ok(), "a writer still waits after its connection ended");
        }
    }

    #[test]
    fn the_count_holds_whatever_the_order_of_socket_and_writer() {
        let q = Queue::default();
        let frame = SPLIT_SEND_SIZE + HEADER;
        // The socket takes the frame before the writer has given back its reservation...
        assert!(q.try_reserve(frame));
        q.release(frame); // the socket took header and body
        q.release(0); // the writer used all it reserved
        assert_eq!(q.bytes.load(Ordering::SeqCst), 0);
        // ... or after; and a short frame gives back the rest.
        assert!(q.try_reserve(frame));
        q.release(frame - (100 + HEADER));
        q.release(100 + HEADER);
        assert_eq!(q.bytes.load(Ordering::SeqCst), 0);
        // Full: no reservation until it is closed.
        q.bytes.store(MAX_QUEUED, Ordering::SeqCst);
        assert!(!q.try_reserve(1));
        q.close();
        assert!(q.try_reserve(1));
    }

    #[test]
    fn a_stream_waits_in_one_place_and_leaves_none_behind() {
        let q = Queue::default();
        let waker = futures::task::noop_waker();
        let cx = Context::from_waker(&waker);
        for _ in 0..1000 {
            q.wait(1, &cx);
            q.wait(2, &cx);
        }
        assert_eq!(q.waiting().len(), 2);
        q.forget(1);
        q.forget(2);
        assert!(q.waiting().is_empty());
        assert!(!q.has_waiters.load(Ordering::SeqCst));
    }

    #[test]
    fn it_speaks_yamux() {
        let p: Vec<_> = Yamux::new().protocol_info().collect();
        assert_eq!(p, ["/yamux/1.0.0"]);
    }
}
