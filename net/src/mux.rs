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
    collections::VecDeque,
    io, iter,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
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
/// a stream's write waits while more are queued. Frames of every stream of the connection
/// count, their headers included.
pub const MAX_QUEUED: usize = 1024 * 1024;

/// yamux's frame header.
const HEADER: usize = 12;

/// A connection's bytes queued in yamux for its socket, and the writers waiting for room.
#[derive(Debug, Default)]
struct Queue {
    bytes: AtomicUsize,
    /// The muxer is gone: writes no longer wait (yamux answers them with its error).
    closed: std::sync::atomic::AtomicBool,
    /// Distinct wakers of streams whose writes wait (at most one per task).
    waiting: Mutex<Vec<Waker>>,
}

impl Queue {
    fn full(&self) -> bool {
        self.bytes.load(Ordering::Acquire) >= MAX_QUEUED && !self.closed.load(Ordering::Acquire)
    }

    fn wake_all(&self) {
        let woken = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        for w in woken {
            w.wake();
        }
    }

    /// The connection is gone: wake every waiting writer, and let none wait again.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_all();
    }

    /// A stream handed yamux `n` bytes (one frame).
    fn queued(&self, n: usize) {
        self.bytes.fetch_add(n + HEADER, Ordering::AcqRel);
    }

    /// The socket took `n` bytes (frames, or control frames that were never counted: the
    /// count stops at zero).
    fn sent(&self, n: usize) {
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(n))
            });
        if !self.full() {
            self.wake_all();
        }
    }

    /// Whether a write must wait; if so, `cx` is woken once there is room.
    fn must_wait(&self, cx: &Context<'_>) -> bool {
        if !self.full() {
            return false;
        }
        {
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if !w.iter().any(|x| x.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
        }
        // Room may have been made between the check and the registration.
        self.full()
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
            self.queue.sent(n);
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
        if self.queue.must_wait(cx) {
            return Poll::Pending;
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.queue.queued(n);
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
        }
    }

    /// Drives the connection until an inbound stream arrives or nothing more can be done now.
    fn next_inbound(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<yamux::Stream>> {
        match self.connection.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(s))) => Poll::Ready(Ok(s)),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(to_io(e))),
            Poll::Ready(None) => Poll::Ready(Err(to_io(yamux::ConnectionError::Closed))),
            Poll::Pending => Poll::Pending,
        }
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
        let s = std::task::ready!(self.connection.poll_new_outbound(cx)).map_err(to_io)?;
        Poll::Ready(Ok(self.wrap(s)))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
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
        // The other end never reads: the socket takes only what fits in the pipe.
        let (x, _y) = tokio::io::duplex(64 * 1024);
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
        let mut writers = Vec::new();
        for mut s in streams {
            let accepted = accepted.clone();
            writers.push(tokio::spawn(async move {
                let block = vec![7u8; SPLIT_SEND_SIZE];
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
        let accepted = accepted.load(Ordering::Relaxed);
        // Each stream may get one frame past the cap before it sees it full.
        let bound = MAX_QUEUED + 8 * SPLIT_SEND_SIZE;
        assert!(
            accepted <= bound,
            "{accepted} bytes accepted, more than {bound}"
        );
        assert!(accepted >= MAX_QUEUED, "only {accepted} bytes accepted");
        // The connection going away lets the waiting writers go (with yamux's error).
        drop(_y);
        for mut s in held {
            let r = tokio::time::timeout(Duration::from_secs(5), s.write(&[1u8; 10])).await;
            assert!(r.is_ok(), "a writer still waits after its connection ended");
        }
    }

    #[test]
    fn it_speaks_yamux() {
        let p: Vec<_> = Yamux::new().protocol_info().collect();
        assert_eq!(p, ["/yamux/1.0.0"]);
    }
}
