//! Counting the bytes the master's relay carries.
//!
//! libp2p's relay server copies circuit bytes inside its connection handler and reports no
//! byte counts, so the master counts them one layer down: every muxer of the master is
//! wrapped, and each substream the master itself opens is watched until its protocol
//! negotiation has gone by. A substream on which the master negotiated the relay's stop
//! protocol (`/libp2p/circuit/relay/0.2.0/stop`, the leg from the relay to the destination
//! node of a circuit) carries exactly the circuit's bytes: from then on everything read from
//! and written to it counts, in both directions. Only the master's own writes are inspected,
//! so a peer cannot make other traffic count as relayed (or hide relayed traffic).
//!
//! What it does not do: limit anything (the relay server's caps do), or count the other leg
//! of a circuit (the same bytes, once more).

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};

/// Bytes carried by the relay's circuits, both directions together. Cheap to clone; all
/// clones read the same count.
#[derive(Clone, Debug, Default)]
pub struct RelayMeter(Arc<AtomicU64>);

impl RelayMeter {
    /// Bytes relayed so far.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The protocol name whose negotiation marks a substream as a circuit's leg
/// (`libp2p::relay::STOP_PROTOCOL_NAME`, checked in the tests).
const STOP_PROTOCOL: &[u8] = b"/libp2p/circuit/relay/0.2.0/stop";

/// Bytes of a substream's start inspected for [`STOP_PROTOCOL`]: multistream-select's header
/// (20 bytes) and the length-prefixed name (34) fit well within it.
const SNIFF_LEN: usize = 128;

/// A muxer whose outbound substreams are watched for relay circuits.
pub(crate) struct MeteredMuxer<M> {
    inner: M,
    meter: RelayMeter,
}

impl<M> MeteredMuxer<M> {
    pub(crate) fn new(inner: M, meter: RelayMeter) -> Self {
        Self { inner, meter }
    }
}

impl<M> StreamMuxer for MeteredMuxer<M>
where
    M: StreamMuxer + Unpin,
    M::Substream: Unpin,
{
    type Substream = MeteredStream<M::Substream>;
    type Error = M::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        // Inbound substreams are the peers' to negotiate: never counted.
        Pin::new(&mut self.inner)
            .poll_inbound(cx)
            .map_ok(|s| MeteredStream {
                inner: s,
                state: State::Other,
                meter: None,
            })
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let meter = self.meter.clone();
        Pin::new(&mut self.inner)
            .poll_outbound(cx)
            .map_ok(|s| MeteredStream {
                inner: s,
                state: State::Sniffing(Vec::new()),
                meter: Some(meter),
            })
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

enum State {
    /// The first bytes written so far (at most [`SNIFF_LEN`]).
    Sniffing(Vec<u8>),
    /// A circuit's leg: every byte counts.
    Relayed,
    /// Anything else.
    Other,
}

/// A substream that counts its bytes once it is known to be a circuit's leg.
pub(crate) struct MeteredStream<S> {
    inner: S,
    state: State,
    meter: Option<RelayMeter>,
}

impl<S> MeteredStream<S> {
    fn count(&self, n: usize) {
        if let (State::Relayed, Some(m)) = (&self.state, &self.meter) {
            m.0.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn sniff(&mut self, written: &[u8]) {
        let State::Sniffing(seen) = &mut self.state else {
            return;
        };
        let take = written.len().min(SNIFF_LEN - seen.len());
        seen.extend_from_slice(&written[..take]);
        if seen
            .windows(STOP_PROTOCOL.len())
            .any(|w| w == STOP_PROTOCOL)
        {
            self.state = State::Relayed;
        } else if seen.len() >= SNIFF_LEN {
            self.state = State::Other;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MeteredStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.count(n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MeteredStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.count(n);
            self.sniff(&buf[..n]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};

    fn outbound(meter: &RelayMeter) -> MeteredStream<futures::io::Cursor<Vec<u8>>> {
        MeteredStream {
            inner: futures::io::Cursor::new(vec![7u8; 1000]),
            state: State::Sniffing(Vec::new()),
            meter: Some(meter.clone()),
        }
    }

    #[test]
    fn the_stop_protocol_is_libp2ps() {
        assert_eq!(
            STOP_PROTOCOL,
            libp2p::relay::STOP_PROTOCOL_NAME.as_ref().as_bytes()
        );
    }

    #[test]
    fn a_stop_stream_counts_both_ways_after_its_negotiation() {
        futures::executor::block_on(async {
            let meter = RelayMeter::default();
            let mut s = outbound(&meter);
            // multistream-select as the master writes it, name split over two writes.
            s.write_all(b"\x13/multistream/1.0.0\n\x21/libp2p/circuit/")
                .await
                .unwrap();
            assert_eq!(meter.bytes(), 0);
            s.write_all(b"relay/0.2.0/stop\n").await.unwrap();
            let after_name = meter.bytes();
            s.write_all(&[1u8; 500]).await.unwrap();
            let mut buf = [0u8; 300];
            // The cursor reads on from where the writes ended.
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(meter.bytes(), after_name + 500 + n as u64);
        });
    }

    #[test]
    fn other_streams_count_nothing() {
        futures::executor::block_on(async {
            let meter = RelayMeter::default();
            let mut s = outbound(&meter);
            s.write_all(b"\x13/multistream/1.0.0\n\x10/shoal/piece/1\n")
                .await
                .unwrap();
            s.write_all(&[0u8; 4096]).await.unwrap();
            // The name turning up late (in payload) does not count either.
            s.write_all(STOP_PROTOCOL).await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await.unwrap();
            assert_eq!(meter.bytes(), 0);
            // Inbound substreams are never inspected, whatever the peer writes.
            let mut inbound = MeteredStream {
                inner: futures::io::Cursor::new(Vec::new()),
                state: State::Other,
                meter: None,
            };
            inbound.write_all(STOP_PROTOCOL).await.unwrap();
            assert_eq!(meter.bytes(), 0);
        });
    }
}
