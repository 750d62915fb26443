//! A peer that speaks shoal's protocols as raw frames, without the node code: its own minimal
//! swarm (TCP + noise + yamux, with only `libp2p_stream`, ping and identify), streams opened by
//! protocol name, bytes written by hand. Hostile tests use it to send what no shoal node would.
//!
//! Ping is there so that the master does not drop it as a dead peer; identify so that the
//! master learns its listen addresses and may redirect nodes to it (a raw server peer).

use std::{
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{
    identify, identity::Keypair, noise, ping, swarm::NetworkBehaviour, swarm::SwarmEvent, tcp,
    yamux, Multiaddr, PeerId, StreamProtocol,
};
use serde::{de::DeserializeOwned, Serialize};
use shoal_protocol::{codec, limits::MAX_MASTER_RESPONSE, wire::MasterResponse};

/// The raw peer's protocols.
#[derive(NetworkBehaviour)]
struct RawBehaviour {
    stream: libp2p_stream::Behaviour,
    ping: ping::Behaviour,
    identify: identify::Behaviour,
}

/// A running raw peer.
pub struct RawPeer {
    peer_id: PeerId,
    control: libp2p_stream::Control,
    listen: Vec<Multiaddr>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawPeer {
    /// Starts a raw peer with `key`, listening on loopback if `listen`, and dials `dial` (if
    /// given), waiting up to 10 s for the dial to settle. A dial the remote refuses (for
    /// example over its connection caps) is not an error here: see [`RawPeer::connections`].
    pub async fn start(
        key: Keypair,
        listen: bool,
        dial: Option<&Multiaddr>,
    ) -> anyhow::Result<Self> {
        let peer_id = key.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|k| RawBehaviour {
                stream: libp2p_stream::Behaviour::new(),
                ping: ping::Behaviour::new(ping::Config::new()),
                identify: identify::Behaviour::new(identify::Config::new(
                    shoal_protocol::behaviour::IDENTIFY_PROTOCOL.into(),
                    k.public(),
                )),
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        let mut listen_addrs = Vec::new();
        if listen {
            swarm.listen_on(crate::loopback())?;
            loop {
                let ev = tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some())
                    .await
                    .context("raw peer: no listen address within 10 s")?;
                if let SwarmEvent::NewListenAddr { address, .. } = ev {
                    listen_addrs.push(address);
                    break;
                }
            }
        }
        let connections = Arc::new(AtomicUsize::new(0));
        if let Some(addr) = dial {
            swarm.dial(addr.clone())?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
                    .await
                    .with_context(|| {
                        format!("raw peer {peer_id}: dial of {addr} not settled within 10 s")
                    })?;
                match ev {
                    SwarmEvent::ConnectionEstablished { .. } => {
                        connections.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    SwarmEvent::OutgoingConnectionError { .. } => break,
                    _ => {}
                }
            }
        }
        let control = swarm.behaviour().stream.new_control();
        let count = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    SwarmEvent::ConnectionClosed { .. } => {
                        count.fetch_sub(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
        });
        Ok(Self {
            peer_id,
            control,
            listen: listen_addrs,
            connections,
            task,
        })
    }

    /// Its PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Its listen addresses (empty unless started with `listen`).
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen
    }

    /// Connections open right now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// A control to open or accept streams with.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Opens a stream to `peer` negotiating `protocol`, within 10 s.
    pub async fn open(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> anyhow::Result<libp2p::Stream> {
        let mut control = self.control.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            control.open_stream(peer, protocol.clone()),
        )
        .await
        .with_context(|| format!("opening {protocol} to {peer} took over 10 s"))?
        .with_context(|| format!("opening {protocol} to {peer}"))
    }

    /// Opens a stream, writes `bytes`, and reads whatever comes back until the remote closes
    /// it, within `limit`. `Err` when the stream could not be opened or nothing settled within
    /// `limit`; the inner result is `Err` when the remote reset the stream.
    pub async fn exchange(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        bytes: &[u8],
        limit: Duration,
    ) -> anyhow::Result<io::Result<Vec<u8>>> {
        let mut s = self.open(peer, protocol.clone()).await?;
        let answer = tokio::time::timeout(limit, async {
            s.write_all(bytes).await?;
            s.flush().await?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await?;
            Ok(out)
        })
        .await
        .with_context(|| format!("{protocol}: no answer or close within {limit:?}"))?;
        Ok(answer)
    }

    /// Sends `value` as one frame on `/shoal/master/1` and decodes the answer frame.
    pub async fn master_request<T: Serialize>(
        &self,
        master: PeerId,
        value: &T,
    ) -> anyhow::Result<MasterResponse> {
        let out = self
            .exchange(
                master,
                shoal_protocol::limits::MASTER_PROTOCOL,
                &frame(&codec::encode(value)?),
                Duration::from_secs(10),
            )
            .await??;
        unframe(&out, MAX_MASTER_RESPONSE)
    }

    /// Asks `peer` over `/shoal/kad/1` for the peers closest to `target` (a Kademlia
    /// `FIND_NODE`, protobuf written and read by hand) and returns the PeerIds of the answer's
    /// closer peers, within 10 s. The answer is `peer`'s routing table as it stands: unlike
    /// libp2p-kad's own lookup, nothing is dialed, so a peer that is gone is listed as well.
    pub async fn kad_find_node(&self, peer: PeerId, target: PeerId) -> anyhow::Result<Vec<PeerId>> {
        let key = target.to_bytes();
        // Message { type (1) = FIND_NODE (4), key (2) = target }
        let mut msg = vec![0x08, 4, 0x12];
        put_varint(&mut msg, key.len() as u64);
        msg.extend_from_slice(&key);
        let mut req = Vec::new();
        put_varint(&mut req, msg.len() as u64);
        req.extend_from_slice(&msg);
        let mut s = self
            .open(peer, shoal_protocol::limits::KAD_PROTOCOL)
            .await?;
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            s.write_all(&req).await?;
            s.flush().await?;
            // The answer is one length-prefixed message; the stream stays open for the next.
            let len = read_varint(&mut s).await?;
            anyhow::ensure!(len <= 1 << 20, "a FIND_NODE answer of {len} bytes");
            let mut body = vec![0; len as usize];
            s.read_exact(&mut body).await?;
            Ok(body)
        })
        .await
        .context("no FIND_NODE answer within 10 s")??;
        let mut peers = Vec::new();
        // closerPeers (8): Peer { id (1), addrs (2), connection (3) }
        for (field, value) in protobuf_fields(&answer)? {
            if let (8, Field::Bytes(p)) = (field, value) {
                for (f, v) in protobuf_fields(p)? {
                    if let (1, Field::Bytes(id)) = (f, v) {
                        peers.push(PeerId::from_bytes(id).context("a closer peer's id")?);
                    }
                }
            }
        }
        Ok(peers)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

async fn read_varint(s: &mut libp2p::Stream) -> anyhow::Result<u64> {
    let mut bytes = Vec::new();
    loop {
        let mut b = [0u8];
        s.read_exact(&mut b).await?;
        bytes.push(b[0]);
        if b[0] & 0x80 == 0 || bytes.len() == 10 {
            return take_varint(&mut bytes.as_slice());
        }
    }
}

/// Takes one protobuf varint off the front of `b`.
fn take_varint(b: &mut &[u8]) -> anyhow::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&x, rest) = b.split_first().context("a truncated varint")?;
        *b = rest;
        v |= u64::from(x & 0x7f) << shift;
        if x & 0x80 == 0 {
            return Ok(v);
        }
    }
    anyhow::bail!("a varint longer than 64 bits")
}

/// A protobuf field's value: only the two wire types Kademlia's messages use here.
enum Field<'a> {
    Varint,
    Bytes(&'a [u8]),
}

/// The fields of one protobuf message, in order, as (field number, value).
fn protobuf_fields(mut b: &[u8]) -> anyhow::Result<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let tag = take_varint(&mut b)?;
        let value = match tag & 7 {
            0 => {
                take_varint(&mut b)?;
                Field::Varint
            }
            2 => {
                let len = usize::try_from(take_varint(&mut b)?)?;
                anyhow::ensure!(len <= b.len(), "a field of {len} bytes, {} left", b.len());
                let (v, rest) = b.split_at(len);
                b = rest;
                Field::Bytes(v)
            }
            t => anyhow::bail!("protobuf wire type {t} in a Kademlia answer"),
        };
        out.push((tag >> 3, value));
    }
    Ok(out)
}

/// `payload` behind its `u32` LE length.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// Decodes one whole frame from `bytes` under `cap`.
pub fn unframe<T: DeserializeOwned>(bytes: &[u8], cap: usize) -> anyhow::Result<T> {
    anyhow::ensure!(
        bytes.len() >= 4,
        "answer of {} bytes has no frame",
        bytes.len()
    );
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    anyhow::ensure!(
        bytes.len() == 4 + len,
        "answer of {} bytes, frame says {len}",
        bytes.len()
    );
    Ok(codec::decode(&bytes[4..], cap)?)
}

/// A bincode varint (standard config) claiming `len`: the `u64` marker 253, then the value.
pub fn claim(len: u64) -> Vec<u8> {
    let mut b = vec![253u8];
    b.extend_from_slice(&len.to_le_bytes());
    b
}
