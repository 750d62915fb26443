//! The master's probe of a suspect: fetch the reported blocks from it under a throw-away
//! identity, so the suspect cannot tell the probe from any other node's request, and check
//! them against the manifest. [`ProbeQueue`] bounds how many run at once and wait.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use futures::StreamExt;
use libp2p::{identity::Keypair, noise, swarm::dial_opts::DialOpts, tcp, yamux, Multiaddr, PeerId};
use shoal_protocol::{
    limits::PIECE_PROTOCOL,
    piece::{receive_blocks, ReceiveError},
    wire::RefuseReason,
    BlockRange, VerifiedManifest,
};

use crate::bans::ProbeOutcome;

/// How long a probe may take before it counts as inconclusive.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a cut-off probe waits before it reports: a suspect that died cut the probe off
/// and its connection to the master at the same moment, and the master must have seen the
/// latter before it weighs the former.
pub const CUT_OFF_GRACE: Duration = Duration::from_secs(2);

/// Probes running at once, by default.
pub const MAX_PROBES_IN_FLIGHT: usize = 16;

/// Probes waiting to run, by default; more are dropped.
pub const MAX_PROBES_QUEUED: usize = 256;

/// A bounded FIFO of probes: at most `max_in_flight` run, at most `max_queued` wait, the rest
/// are dropped. Pure: the shell starts what it is told to start.
#[derive(Debug)]
pub struct ProbeQueue<J> {
    max_in_flight: usize,
    max_queued: usize,
    in_flight: usize,
    queued: VecDeque<J>,
}

/// What became of a probe handed to [`ProbeQueue::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<J> {
    /// Start it now.
    Start(J),
    /// It waits for a running probe to end.
    Queued,
    /// No room: it never runs.
    Dropped(J),
}

impl<J> Default for ProbeQueue<J> {
    fn default() -> Self {
        Self::new(MAX_PROBES_IN_FLIGHT, MAX_PROBES_QUEUED)
    }
}

impl<J> ProbeQueue<J> {
    /// An empty queue with these caps.
    pub fn new(max_in_flight: usize, max_queued: usize) -> Self {
        Self {
            max_in_flight: max_in_flight.max(1),
            max_queued,
            in_flight: 0,
            queued: VecDeque::new(),
        }
    }

    /// A new probe.
    pub fn push(&mut self, job: J) -> Admit<J> {
        if self.in_flight < self.max_in_flight {
            self.in_flight += 1;
            Admit::Start(job)
        } else if self.queued.len() < self.max_queued {
            self.queued.push_back(job);
            Admit::Queued
        } else {
            Admit::Dropped(job)
        }
    }

    /// A running probe ended; returns the next one to start, if any (it counts as running).
    pub fn finished(&mut self) -> Option<J> {
        self.in_flight = self.in_flight.saturating_sub(1);
        let next = self.queued.pop_front()?;
        self.in_flight += 1;
        Some(next)
    }

    /// Probes running.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Probes waiting.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }
}

/// Probes `suspect` at `addrs` for `blocks` of the manifest's file. A cut-off answer is
/// reported only after [`CUT_OFF_GRACE`].
pub async fn probe(
    suspect: PeerId,
    addrs: Vec<Multiaddr>,
    manifest: Arc<VerifiedManifest>,
    blocks: BlockRange,
) -> ProbeOutcome {
    let blocks = BlockRange::new(blocks.start, blocks.end.min(manifest.blocks()));
    if blocks.is_empty() || addrs.is_empty() {
        return ProbeOutcome::Inconclusive;
    }
    let swarm = libp2p::SwarmBuilder::with_existing_identity(Keypair::generate_ed25519())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            (shoal_net::tls::Config::new, noise::Config::new),
            yamux::Config::default,
        )
        .map_err(|e| e.to_string())
        .and_then(|b| {
            b.with_quic()
                .with_behaviour(|_| libp2p_stream::Behaviour::new())
                .map_err(|e| e.to_string())
        });
    let mut swarm = match swarm {
        Ok(b) => b
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(5)))
            .build(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot build a probe swarm");
            return ProbeOutcome::Inconclusive;
        }
    };
    // The stream behaviour knows no addresses of its own: dial with the known ones, and the
    // stream opens once the connection is up.
    if let Err(e) = swarm.dial(DialOpts::peer_id(suspect).addresses(addrs).build()) {
        tracing::debug!(%suspect, error = %e, "probe dial failed");
        return ProbeOutcome::Inconclusive;
    }
    let mut control = swarm.behaviour().new_control();
    let driver = tokio::spawn(async move {
        loop {
            if let libp2p::swarm::SwarmEvent::ConnectionClosed { cause, .. } =
                swarm.select_next_some().await
            {
                tracing::debug!(%suspect, ?cause, "probe connection closed");
            }
        }
    });
    let mut answered = false;
    let result = tokio::time::timeout(PROBE_TIMEOUT, async {
        let stream = control
            .open_stream(suspect, PIECE_PROTOCOL)
            .await
            .map_err(|e| ReceiveError::Io(std::io::Error::other(e.to_string())))?;
        let mut stream = Counted {
            inner: stream,
            answered: &mut answered,
        };
        receive_blocks(&mut stream, &manifest, blocks, |_, _| Ok(())).await
    })
    .await;
    driver.abort();
    let outcome = match &result {
        Ok(r) => classify(r, answered),
        Err(_) => ProbeOutcome::Inconclusive,
    };
    if let Ok(Err(e)) = &result {
        tracing::debug!(%suspect, error = %e, ?outcome, "probe failed");
    }
    if outcome == ProbeOutcome::CutOff {
        tokio::time::sleep(CUT_OFF_GRACE).await;
    }
    outcome
}

/// A stream that notes whether the suspect sent anything at all. A stream dropped or reset
/// before the answer is how a peer sheds load (or how a local stream quirk looks); only a
/// stream cut off after the answer began is a cut-off.
struct Counted<'a, S> {
    inner: S,
    answered: &'a mut bool,
}

impl<S: futures::AsyncRead + Unpin> futures::AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                *this.answered = true;
            }
        }
        r
    }
}

impl<S: futures::AsyncWrite + Unpin> futures::AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// What a probe's transfer result says about the suspect; `answered` says whether the
/// suspect sent any byte of an answer before the result.
pub fn classify(result: &Result<(), ReceiveError>, answered: bool) -> ProbeOutcome {
    use std::io::ErrorKind;
    match result {
        Ok(()) => ProbeOutcome::Honest,
        Err(ReceiveError::Corrupt { .. }) => ProbeOutcome::Corrupt,
        // It began to answer, then the stream ended or was reset before every block arrived:
        // a lie from a live peer, or the look of a dead one (the master tells them apart).
        Err(ReceiveError::Io(e))
            if answered
                && matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                ) =>
        {
            ProbeOutcome::CutOff
        }
        Err(ReceiveError::Refused(RefuseReason::NotHeld)) => ProbeOutcome::NotHeld,
        // Could not connect or open a stream, busy, unknown file, banned, a range the master
        // got wrong, a local error: no evidence.
        Err(_) => ProbeOutcome::Inconclusive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_runs_at_most_its_cap_and_drops_past_its_length() {
        let mut q = ProbeQueue::new(2, 3);
        assert_eq!(q.push(1), Admit::Start(1));
        assert_eq!(q.push(2), Admit::Start(2));
        for j in 3..6 {
            assert_eq!(q.push(j), Admit::Queued);
        }
        assert_eq!(q.push(6), Admit::Dropped(6));
        assert_eq!((q.in_flight(), q.queued()), (2, 3));
        // First in, first out.
        assert_eq!(q.finished(), Some(3));
        assert_eq!(q.finished(), Some(4));
        assert_eq!(q.finished(), Some(5));
        assert_eq!(q.finished(), None);
        assert_eq!(q.finished(), None);
        assert_eq!((q.in_flight(), q.queued()), (0, 0));
    }

    #[test]
    fn only_bad_bytes_cut_offs_and_denials_are_outcomes_the_master_weighs() {
        use std::io::{Error, ErrorKind};
        assert_eq!(classify(&Ok(()), true), ProbeOutcome::Honest);
        assert_eq!(
            classify(&Err(ReceiveError::Corrupt { block: 1 }), true),
            ProbeOutcome::Corrupt
        );
        for kind in [ErrorKind::UnexpectedEof, ErrorKind::ConnectionReset] {
            let cut = || Err(ReceiveError::Io(Error::from(kind)));
            assert_eq!(classify(&cut(), true), ProbeOutcome::CutOff);
            // Dropped before any answer: how a peer sheds load, no evidence.
            assert_eq!(classify(&cut(), false), ProbeOutcome::Inconclusive);
        }
        assert_eq!(
            classify(&Err(ReceiveError::Refused(RefuseReason::NotHeld)), true),
            ProbeOutcome::NotHeld
        );
        for r in [RefuseReason::Busy, RefuseReason::UnknownFile] {
            assert_eq!(
                classify(&Err(ReceiveError::Refused(r)), true),
                ProbeOutcome::Inconclusive
            );
        }
        assert_eq!(
            classify(&Err(ReceiveError::Io(Error::other("dial failed"))), false),
            ProbeOutcome::Inconclusive
        );
        assert_eq!(
            classify(
                &Err(ReceiveError::Io(Error::other("connection is closed"))),
                true
            ),
            ProbeOutcome::Inconclusive
        );
    }
}
