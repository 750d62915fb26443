//! Fewer, larger system calls and TLS records under yamux.
//!
//! Left as they are, the layers under a libp2p TCP connection turn each yamux frame into two
//! TLS records and two `writev` calls (yamux writes a frame's 12-byte header and its body
//! separately, and futures-rustls encrypts and sends every write at once), and rustls reads
//! the socket 4 KiB at a time. In a flash crowd of 24 nodes on loopback that came to about
//! 1,200 `writev` calls a second per node for 4 MiB/s of upload, 3.4 KB each.
//!
//! - [`WriteBehind`] sits above TLS and gathers yamux's small writes (frame headers, window
//!   updates, small frames) until yamux flushes or a frame's body follows; the body then goes
//!   out with them in one vectored write, not copied: one TLS write and one `writev` a frame.
//! - [`ReadAhead`] sits under TLS and reads the socket up to [`CAPACITY`] at a time, handing
//!   rustls its 4 KiB reads from that.
//!
//! Both hold a buffer only while bytes are in it: a connection that waits costs nothing here,
//! which matters to a master with thousands of connected peers. A buffer let go is kept for
//! reuse by the thread (at most [`SPARES`] of them per thread), so a busy connection's next
//! burst neither allocates nor zeroes a buffer again.

use std::{
    cell::RefCell,
    io::{self, IoSlice, IoSliceMut},
    pin::Pin,
    task::{ready, Context, Poll},
};

use futures::{AsyncRead, AsyncWrite};

/// The most either wrapper buffers: many small yamux frames, and at most what a socket read
/// can usefully return at once.
pub const CAPACITY: usize = 32 * 1024;

/// Writes at least this long are not copied into [`WriteBehind`]'s buffer: they go out at
/// once, in one vectored write with what the buffer holds (a yamux frame's body, after its
/// header).
pub const GATHER: usize = 1024;

/// Buffers of [`CAPACITY`] kept per thread for the next burst of any connection.
pub const SPARES: usize = 4;

thread_local! {
    static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of [`CAPACITY`] bytes (their values are whatever was there: callers only hand
/// out what they have filled).
fn take_buffer() -> Box<[u8]> {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; CAPACITY].into_boxed_slice())
}

/// Keeps `buf` for reuse by this thread, or frees it if the thread has enough.
fn give_back(buf: Box<[u8]>) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARES {
            s.push(buf);
        }
    });
}

/// Bytes held in a borrowed buffer: `buf[start..end]`. The buffer is taken on first use and
/// given back (see [`give_back`]) once empty, so an idle wrapper holds none.
#[derive(Debug, Default)]
struct Window {
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
}

impl Window {
    /// The buffer, taken now if none is held.
    fn buffer(&mut self) -> &mut [u8] {
        self.buf.get_or_insert_with(take_buffer)
    }

    /// The bytes held (empty if no buffer is).
    fn held(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b[self.start..self.end])
    }

    /// Lets the buffer go.
    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_back(buf);
        }
        (self.start, self.end) = (0, 0);
    }

    fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }
}

/// Writes gathered until flushed (see the module documentation). Reads pass through.
#[derive(Debug)]
pub struct WriteBehind<S> {
    inner: S,
    /// Bytes accepted and not yet written to `inner`.
    held: Window,
}

impl<S> WriteBehind<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            held: Window::default(),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes of buffer held now (0 between bursts).
    pub fn buffer_capacity(&self) -> usize {
        self.held.capacity()
    }
}

impl<S: AsyncWrite + Unpin> WriteBehind<S> {
    /// Writes out everything buffered, then lets the buffer go.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.held().is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, self.held.held()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.start += n;
        }
        self.held.release();
        Poll::Ready(Ok(()))
    }

    /// Writes what is buffered and then `data` in one vectored write where the stream takes
    /// it (rustls makes one TLS write of them), without copying `data`.
    fn poll_write_through(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        while !self.held.held().is_empty() {
            let held = self.held.held();
            let n = ready!(Pin::new(&mut self.inner)
                .poll_write_vectored(cx, &[IoSlice::new(held), IoSlice::new(data)]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let (of_held, of_data) = (n.min(held.len()), n.saturating_sub(held.len()));
            self.held.start += of_held;
            if of_data > 0 {
                self.held.release();
                return Poll::Ready(Ok(of_data));
            }
        }
        self.held.release();
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteBehind<S> {
    /// A write shorter than [`GATHER`] joins the buffer (after what is there is written out,
    /// if it would not fit); a longer one goes out at once, together with what is buffered.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if data.len() >= GATHER {
            return this.poll_write_through(cx, data);
        }
        if this.held.end + data.len() > CAPACITY {
            ready!(this.poll_drain(cx))?;
        }
        let at = this.held.end;
        this.held.buffer()[at..at + data.len()].copy_from_slice(data);
        this.held.end += data.len();
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteBehind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, out)
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_read_vectored(cx, bufs)
    }
}

/// Reads of up to [`CAPACITY`] from the inner stream, served in whatever sizes the reader asks
/// for (see the module documentation). Writes pass through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read and not yet handed on.
    held: Window,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            held: Window::default(),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes of buffer held now (0 between bursts).
    pub fn buffer_capacity(&self) -> usize {
        self.held.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.held.held().is_empty() {
            if out.len() >= CAPACITY {
                this.held.release();
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            match Pin::new(&mut this.inner).poll_read(cx, this.held.buffer()) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    (this.held.start, this.held.end) = (0, n.min(CAPACITY))
                }
                // End of stream, an error, or nothing to read: wait without a buffer.
                other => {
                    this.held.release();
                    return other;
                }
            }
        }
        let held = this.held.held();
        let n = out.len().min(held.len());
        out[..n].copy_from_slice(&held[..n]);
        this.held.start += n;
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    /// A stream that records each write it is given and serves reads from a script, saying
    /// `Pending` once between script entries (as a socket with nothing more yet would).
    #[derive(Default)]
    struct Recorder {
        writes: Vec<usize>,
        written: Vec<u8>,
        reads: std::collections::VecDeque<Vec<u8>>,
        read_calls: usize,
        pending_next: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes.push(data.len());
            this.written.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            this.writes.push(data.len());
            this.written.extend_from_slice(&data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.read_calls += 1;
            if this.pending_next {
                this.pending_next = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let Some(mut next) = this.reads.pop_front() else {
                return Poll::Ready(Ok(0));
            };
            let n = out.len().min(next.len());
            out[..n].copy_from_slice(&next[..n]);
            if n < next.len() {
                this.reads.push_front(next.split_off(n));
            } else {
                this.pending_next = true;
            }
            Poll::Ready(Ok(n))
        }
    }

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn a_frame_header_and_body_reach_the_stream_as_one_write() {
        futures::executor::block_on(async {
            let mut w = WriteBehind::new(Recorder::default());
            let (header, body) = (bytes(12, 1), bytes(16 * 1024, 2));
            w.write_all(&header).await.unwrap();
            assert!(w.get_ref().writes.is_empty(), "a header waits for its body");
            w.write_all(&body).await.unwrap();
            w.flush().await.unwrap();
            assert_eq!(w.get_ref().writes, vec![12 + 16 * 1024]);
            assert_eq!(w.get_ref().written, [header, body].concat());
            assert_eq!(w.buffer_capacity(), 0, "no buffer kept after the write");
        });
    }

    #[test]
    fn small_writes_gather_until_flushed_or_full_and_all_go_out_in_order() {
        futures::executor::block_on(async {
            let mut w = WriteBehind::new(Recorder::default());
            let mut want = Vec::new();
            for i in 0..100u8 {
                let data = bytes(1000, i);
                w.write_all(&data).await.unwrap();
                want.extend_from_slice(&data);
            }
            let (small, large) = (bytes(7, 1), bytes(CAPACITY + 5, 2));
            for data in [&small, &large, &small] {
                w.write_all(data).await.unwrap();
                want.extend_from_slice(data);
            }
            w.close().await.unwrap();
            assert_eq!(w.get_ref().written, want);
            // Each time the buffer is full of writes of 1,000, the next one sends them first.
            // The rest and 7 more go out with the large write; the last 7 at close.
            let per = CAPACITY / 1000;
            let mut want_writes = vec![per * 1000; 100 / per];
            want_writes.push((100 % per) * 1000 + 7 + CAPACITY + 5);
            want_writes.push(7);
            assert_eq!(
                w.get_ref().writes,
                want_writes,
                "writes as they reached the stream"
            );
            assert_eq!(w.buffer_capacity(), 0);
        });
    }

    #[test]
    fn small_reads_are_served_from_large_reads() {
        futures::executor::block_on(async {
            let data = bytes(2 * CAPACITY + 100, 3);
            let inner = Recorder {
                reads: [data.clone()].into(),
                ..Recorder::default()
            };
            let mut r = ReadAhead::new(inner);
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            while got.len() < data.len() {
                let n = r.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(got, data);
            // Three reads of the socket for the reads of 4 KiB rustls would have made.
            assert_eq!(r.get_ref().read_calls, 3);
            // Drained, then the socket has nothing: the buffer goes.
            assert_eq!(r.read(&mut chunk).await.unwrap(), 0);
            assert_eq!(r.buffer_capacity(), 0);
        });
    }

    #[tokio::test]
    async fn bytes_cross_both_wrappers_intact_over_a_pipe() {
        let (a, b) = tokio::io::duplex(8 * 1024);
        let mut tx = WriteBehind::new(ReadAhead::new(a.compat()));
        let mut rx = WriteBehind::new(ReadAhead::new(b.compat()));
        let data = bytes(1_000_000, 9);
        let sizes = [1usize, 12, 4096, 16 * 1024, 70_000, 3];
        let send = async {
            let mut at = 0;
            let mut i = 0;
            while at < data.len() {
                let end = (at + sizes[i % sizes.len()]).min(data.len());
                tx.write_all(&data[at..end]).await.unwrap();
                if i % 3 == 0 {
                    tx.flush().await.unwrap();
                }
                at = end;
                i += 1;
            }
            tx.close().await.unwrap();
        };
        let recv = async {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(send, recv);
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes changed on the way");
    }
}
