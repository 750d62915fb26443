//! Test helpers shared by the modules' unit tests.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::{AsyncRead, AsyncWrite};

/// A stream that records the length of every write offered to it.
pub(crate) struct Recorder<S> {
    inner: S,
    writes: Arc<Mutex<Vec<usize>>>,
}

impl<S> Recorder<S> {
    /// Wraps `inner`; the lengths go to the returned list.
    pub(crate) fn new(inner: S) -> (Self, Arc<Mutex<Vec<usize>>>) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                inner,
                writes: writes.clone(),
            },
            writes,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(buf.len());
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
