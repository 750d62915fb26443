//! Inbound piece streams, queued with a real capacity.
//!
//! `libp2p-stream` hands inbound streams to its acceptor through a channel with room for one
//! stream: a stream that arrives while another is still waiting to be picked up is dropped
//! (rust-libp2p issue 5651). When several peers open piece streams in the same instant — the
//! normal case in a flash crowd — all but one were reset, their requesters saw "connection is
//! closed" or an early end of file, reported a healthy peer, and avoided it for 30 s. This
//! behaviour accepts `/shoal/piece/1` on every connection and queues the negotiated streams in
//! a bounded queue ([`DEFAULT_QUEUE`] by default) that the server drains; only past that cap is
//! a stream dropped, and then it is overload, counted in [`IncomingPieces::dropped`].
//!
//! Outbound piece streams are still opened with `libp2p-stream`'s `Control`; it advertises no
//! inbound protocol of its own here, so every inbound piece stream lands in this queue.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use futures::channel::mpsc;
use libp2p::{
    core::{transport::PortUse, upgrade::ReadyUpgrade, Endpoint},
    swarm::{
        handler::{ConnectionEvent, FullyNegotiatedInbound},
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
        NetworkBehaviour, Stream, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent,
        ToSwarm,
    },
    Multiaddr, PeerId, StreamProtocol,
};

/// Inbound streams waiting for the server, at most.
pub const DEFAULT_QUEUE: usize = 256;

type Queue = Arc<Mutex<mpsc::Sender<(PeerId, Stream)>>>;

/// Accepts one stream protocol on every connection and queues its inbound streams.
pub struct Behaviour {
    protocol: StreamProtocol,
    queue: Queue,
    dropped: Arc<AtomicU64>,
    incoming: Option<IncomingPieces>,
}

impl Behaviour {
    /// Accepts `protocol`, queueing at most `capacity` streams.
    pub fn new(protocol: StreamProtocol, capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        Self {
            protocol,
            queue: Arc::new(Mutex::new(tx)),
            dropped: dropped.clone(),
            incoming: Some(IncomingPieces { rx, dropped }),
        }
    }

    /// The queue of inbound streams; there is one, so the first call gets it.
    pub fn take_incoming(&mut self) -> Option<IncomingPieces> {
        self.incoming.take()
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            protocol: self.protocol.clone(),
            queue: self.queue.clone(),
            dropped: self.dropped.clone(),
        }
    }
}

/// Inbound streams as `(peer, stream)`, in arrival order.
pub struct IncomingPieces {
    rx: mpsc::Receiver<(PeerId, Stream)>,
    dropped: Arc<AtomicU64>,
}

impl IncomingPieces {
    /// Streams dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl futures::Stream for IncomingPieces {
    type Item = (PeerId, Stream);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.rx).poll_next(cx)
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// One connection's side: listens for the protocol and queues what it negotiates.
pub struct Handler {
    peer: PeerId,
    protocol: StreamProtocol,
    queue: Queue,
    dropped: Arc<AtomicU64>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, ()> {
        SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Infallible, Self::ToBehaviour>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Infallible>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: stream,
            ..
        }) = event
        {
            let sent = match self.queue.lock() {
                Ok(mut q) => q.try_send((self.peer, stream)).is_ok(),
                Err(_) => false,
            };
            if !sent {
                // Overload (or the server is gone): dropping resets the stream, and the
                // requester asks the master for another source.
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
