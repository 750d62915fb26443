//! The TCP transport of both binaries: libp2p's TCP with the kernel's keepalive turned on,
//! then TLS (or noise) and a muxer.
//!
//! Why keepalive: a peer that vanishes without closing its connections (a host that lost
//! power, a cable pulled, a NAT that forgot the mapping) sends no FIN or RST, and without a
//! check its connections would sit open for hours. libp2p-ping finds such a peer too, but each
//! ping is a stream's frames through TLS, yamux and every handler of the connection on both
//! ends; a master pinging 1,000 idle nodes every 5 s spent about a third of its idle CPU on it
//! (ARCHITECTURE, "Liveness"). The kernel's keepalive probes an idle connection without
//! waking either process, and [`USER_TIMEOUT`] ends one whose sent data stays unacknowledged.
//! What it cannot see is a process that hangs while its kernel still answers: the libp2p
//! pings, now rarer, still catch that.
//!
//! libp2p's TCP configuration has no keepalive setting, and `SwarmBuilder::with_tcp` builds
//! the transport itself, so this module builds the same stack (TCP, multistream-select in its
//! lazy mode, the security upgrade, the muxer) with a step that sets the socket options on
//! every connection, dialed or accepted.

use std::time::Duration;

use futures::{future::BoxFuture, AsyncRead, AsyncWrite, FutureExt, TryFutureExt};
use libp2p::{
    core::{
        transport::map::Map,
        upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, SelectUpgrade},
        ConnectedPoint, UpgradeInfo,
    },
    identity::{Keypair, PeerId},
    noise, tcp, Transport,
};

use crate::tls;

/// An idle connection is first probed after this long without traffic.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);

/// Then probed again this often while unanswered.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Unanswered probes after which the kernel ends the connection, where [`USER_TIMEOUT`] is not
/// supported. On Linux the user timeout decides instead: the connection ends once it has
/// heard nothing for `USER_TIMEOUT` with probes out (here the same 30 s:
/// `KEEPALIVE_IDLE + KEEPALIVE_PROBES * KEEPALIVE_INTERVAL`).
pub const KEEPALIVE_PROBES: u32 = 3;

/// Sent data that stays unacknowledged this long ends the connection (`TCP_USER_TIMEOUT`):
/// the keepalive only probes a connection with nothing in flight, and without this a
/// connection with data in flight to a vanished peer would retransmit for about 15 minutes.
/// So a vanished peer's connection ends 30-60 s after it went: 30 s after the last thing
/// heard from it, or 30 s after the first thing sent to it that was never acknowledged. Since
/// Linux 5.11 it also ends a connection whose peer's receive window stayed shut for this long
/// (a process that stopped reading its socket).
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Turns on the kernel's keepalive probes and the user timeout above for `stream`. A platform
/// without one of them keeps its default, with a debug line: the libp2p pings still end a
/// silent connection there.
pub fn set_keepalive(stream: &tokio::net::TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot turn on TCP keepalive");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!(error = %e, "cannot set the TCP user timeout");
    }
}

/// TLS offered first, noise second (see [`tls`]), with libp2p's security output: the remote's
/// PeerId and the stream of whichever was negotiated. (libp2p's `SelectUpgrade` yields the
/// pair inside its `Either`; the transport's `authenticate` wants it outside.)
#[derive(Clone)]
pub struct Security(SelectUpgrade<tls::Config, noise::Config>);

impl Security {
    /// TLS and noise for `key`.
    pub fn new(key: &Keypair) -> Result<Self, SecurityError> {
        Ok(Self(SelectUpgrade::new(
            tls::Config::new(key)?,
            noise::Config::new(key)?,
        )))
    }
}

/// Why the security upgrade could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// TLS's configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Noise's.
    #[error("cannot configure noise: {0}")]
    Noise(#[from] noise::Error),
}

impl UpgradeInfo for Security {
    type Info = <SelectUpgrade<tls::Config, noise::Config> as UpgradeInfo>::Info;
    type InfoIter = <SelectUpgrade<tls::Config, noise::Config> as UpgradeInfo>::InfoIter;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.protocol_info()
    }
}

/// The stream a secured connection runs on.
pub type Secured<C> = futures::future::Either<tls::Stream<C>, noise::Output<C>>;

type SecurityFailure<C> =
    <SelectUpgrade<tls::Config, noise::Config> as InboundConnectionUpgrade<C>>::Error;

impl<C> InboundConnectionUpgrade<C> for Security
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = SecurityFailure<C>;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, info: Self::Info) -> Self::Future {
        self.0
            .upgrade_inbound(socket, info)
            .map_ok(futures::future::Either::factor_first)
            .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Security
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = SecurityFailure<C>;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, info: Self::Info) -> Self::Future {
        self.0
            .upgrade_outbound(socket, info)
            .map_ok(futures::future::Either::factor_first)
            .boxed()
    }
}

/// A raw TCP connection, dialed or accepted.
pub type Socket = tcp::tokio::TcpStream;

/// libp2p's TCP transport (no delay) that turns on [`set_keepalive`] for every connection;
/// the caller adds multistream-select, [`Security`] and its muxer.
pub fn keepalive_tcp() -> Map<tcp::tokio::Transport, fn(Socket, ConnectedPoint) -> Socket> {
    fn keep(stream: Socket, _: ConnectedPoint) -> Socket {
        set_keepalive(&stream.0);
        stream
    }
    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)).map(keep as fn(_, _) -> _)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_and_user_timeout_are_set_on_both_ends() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialed = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        for stream in [&dialed, &accepted] {
            let before = socket2::SockRef::from(stream);
            assert!(!before.keepalive().unwrap(), "keepalive is off by default");
            set_keepalive(stream);
            let s = socket2::SockRef::from(stream);
            assert!(s.keepalive().unwrap());
            assert_eq!(s.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(s.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(s.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
            #[cfg(any(target_os = "linux", target_os = "android"))]
            assert_eq!(s.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        }
    }
}
