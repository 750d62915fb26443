//! Where peers are, as the master knows it, and how near a holder is to a requester.
//!
//! Three things locate a peer, and they rank a requester's candidate sources in this order:
//! 1. its **region label** (`Hello`), a *claim*: an operator's statement ("eu-west",
//!    "rack-3") that the master takes as given;
//! 2. the **network prefix** of the address its connection to the master comes from (/24 for
//!    IPv4, /48 for IPv6), *observed*: a peer cannot choose it (short of moving);
//! 3. its **network coordinate** ([`crate::vivaldi`]), placed from round-trip times: the
//!    master's own pings to it (trusted) and the RTTs the node reports to peers it talks to (a
//!    report moves only the reporter's coordinate: a liar misplaces itself, nobody else).
//!
//! [`Nearness`] is the rank: same label first, then same prefix, then estimated RTT (in
//! half-octave bands, so that holders a few milliseconds apart count as equally near and the
//! least loaded of them is chosen), then unknown. The policy breaks ties by load.
//!
//! This module owns the coordinates and the RTT report rate limit, per peer (a peer's label
//! and prefix live with the rest of its state in the policy, which indexes holders by both);
//! the policy drops a peer's entries when it disconnects. It reads no clock: `now` comes in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use shoal_protocol::limits::MAX_RTT_SAMPLES;
use shoal_protocol::wire::RttSample;

use crate::vivaldi::Coordinates;

/// Most coordinates kept (the master itself included); past it, new peers go unplaced.
pub const MAX_COORDINATES: usize = 65_536;

/// A peer's RTT reports are taken at most this often; nodes send one every
/// `shoal_node`'s report interval (10 s), well above this.
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// A network prefix: the first 24 bits of an IPv4 address, the first 48 of an IPv6 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetPrefix {
    /// An IPv4 /24.
    V4([u8; 3]),
    /// An IPv6 /48.
    V6([u8; 6]),
}

impl NetPrefix {
    /// The prefix of the first IP address in `addr` (none for an address without one, such
    /// as `/dns/...`, and for a relayed address: its IP is the relay's). An IPv4-mapped IPv6
    /// address counts as IPv4.
    pub fn of(addr: &Multiaddr) -> Option<Self> {
        if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
            return None;
        }
        addr.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(Self::of_ip(IpAddr::V4(ip))),
            Protocol::Ip6(ip) => Some(Self::of_ip(IpAddr::V6(ip))),
            _ => None,
        })
    }

    fn of_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                Self::V4([o[0], o[1], o[2]])
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::of_ip(IpAddr::V4(v4)),
                None => {
                    let o = v6.octets();
                    Self::V6([o[0], o[1], o[2], o[3], o[4], o[5]])
                }
            },
        }
    }
}

/// How near a holder is to a requester; smaller is nearer. Compare with `Ord`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Nearness {
    /// Same (non-empty) region label.
    SameRegion,
    /// Same observed network prefix.
    SamePrefix,
    /// Estimated RTT, in half-octave bands of microseconds (band `b` holds RTTs around
    /// `2^(b/2)` µs).
    Measured(u32),
    /// Nothing known.
    Unknown,
}

/// A node in the coordinate system: the master or a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    /// The master itself.
    Master,
    /// A peer.
    Peer(PeerId),
}

/// Why an RTT report was refused as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefused {
    /// More samples than [`MAX_RTT_SAMPLES`].
    #[error("more than {MAX_RTT_SAMPLES} samples")]
    TooMany,
    /// Within [`MIN_REPORT_INTERVAL`] of the reporter's last accepted report.
    #[error("reports come too often")]
    TooSoon,
}

/// What the master measured of where its peers are (label and prefix aside: they live with
/// the peer's other state in the policy).
#[derive(Debug)]
pub struct Locations {
    coords: Coordinates<Node>,
    last_report: HashMap<PeerId, Instant>,
}

impl Default for Locations {
    fn default() -> Self {
        Self {
            coords: Coordinates::new(MAX_COORDINATES),
            last_report: HashMap::new(),
        }
    }
}

/// Where a requester stands, looked up once per Locate.
#[derive(Debug)]
pub struct Vantage<'a> {
    region: &'a str,
    peer: PeerId,
    prefix: Option<NetPrefix>,
    locations: &'a Locations,
}

impl Vantage<'_> {
    /// The requester's region label.
    pub fn region(&self) -> &str {
        self.region
    }

    /// The requester's network prefix.
    pub fn prefix(&self) -> Option<NetPrefix> {
        self.prefix
    }

    /// How near `holder` (labelled `region`, connected from `prefix`) is.
    pub fn nearness(&self, holder: &PeerId, region: &str, prefix: Option<NetPrefix>) -> Nearness {
        if !self.region.is_empty() && region == self.region {
            return Nearness::SameRegion;
        }
        if self.prefix.is_some() && self.prefix == prefix {
            return Nearness::SamePrefix;
        }
        match self
            .locations
            .coords
            .estimate(&Node::Peer(self.peer), &Node::Peer(*holder))
        {
            Some(rtt) => Nearness::Measured(band(rtt)),
            None => Nearness::Unknown,
        }
    }
}

/// Half-octave band of an RTT: `floor(2 log2(µs))`.
fn band(rtt: Duration) -> u32 {
    let us = rtt.as_micros().max(1) as f64;
    (2.0 * us.log2()).floor() as u32
}

impl Locations {
    /// The master's ping to `peer` took `rtt`: places both ends.
    pub fn master_rtt(&mut self, peer: PeerId, rtt: Duration) {
        let _ = self.coords.observe(Node::Peer(peer), Node::Master, rtt);
        let _ = self.coords.observe(Node::Master, Node::Peer(peer), rtt);
    }

    /// `reporter` measured `samples`. Samples about itself, about peers for which `known`
    /// says no, repeated peers, and RTTs of zero or past [`crate::vivaldi::MAX_RTT`] are
    /// skipped. Returns how many samples were taken.
    pub fn report(
        &mut self,
        now: Instant,
        reporter: PeerId,
        samples: &[RttSample],
        known: impl Fn(&PeerId) -> bool,
    ) -> Result<usize, ReportRefused> {
        if samples.len() > MAX_RTT_SAMPLES {
            return Err(ReportRefused::TooMany);
        }
        if self
            .last_report
            .get(&reporter)
            .is_some_and(|t| now < *t + MIN_REPORT_INTERVAL)
        {
            return Err(ReportRefused::TooSoon);
        }
        self.last_report.insert(reporter, now);
        let mut seen: Vec<PeerId> = Vec::with_capacity(samples.len());
        let mut taken = 0;
        for s in samples {
            if s.peer == reporter || seen.contains(&s.peer) || !known(&s.peer) {
                continue;
            }
            seen.push(s.peer);
            let rtt = Duration::from_micros(u64::from(s.rtt_us));
            if self
                .coords
                .observe(Node::Peer(reporter), Node::Peer(s.peer), rtt)
                .is_ok()
            {
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Where `peer` (labelled `region`, connected from `prefix`) stands, for ranking holders.
    pub fn vantage<'a>(
        &'a self,
        peer: PeerId,
        region: &'a str,
        prefix: Option<NetPrefix>,
    ) -> Vantage<'a> {
        Vantage {
            region,
            peer,
            prefix,
            locations: self,
        }
    }

    /// The estimated RTT between two peers, once both are placed.
    pub fn estimate(&self, a: &PeerId, b: &PeerId) -> Option<Duration> {
        self.coords.estimate(&Node::Peer(*a), &Node::Peer(*b))
    }

    /// Forgets `peer` (it disconnected).
    pub fn forget(&mut self, peer: &PeerId) {
        self.coords.remove(&Node::Peer(*peer));
        self.last_report.remove(peer);
    }

    /// Whether no peer has location state left (the master's own coordinate aside).
    pub fn is_empty(&self) -> bool {
        self.last_report.is_empty()
            && self.coords.len() == usize::from(self.coords.contains(&Node::Master))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_are_slash_24_and_slash_48() {
        let p = |s| NetPrefix::of(&addr(s));
        assert_eq!(p("/ip4/10.1.2.3/tcp/1"), p("/ip4/10.1.2.200/udp/9/quic-v1"));
        assert_ne!(p("/ip4/10.1.2.3/tcp/1"), p("/ip4/10.1.3.3/tcp/1"));
        assert_eq!(
            p("/ip6/2001:db8:1::1/tcp/1"),
            p("/ip6/2001:db8:1:ff::2/tcp/1")
        );
        assert_ne!(p("/ip6/2001:db8:1::1/tcp/1"), p("/ip6/2001:db8:2::1/tcp/1"));
        assert_eq!(p("/ip6/::ffff:10.1.2.3/tcp/1"), p("/ip4/10.1.2.9/tcp/1"));
        assert_eq!(p("/dns/example.com/tcp/1"), None);
        assert_eq!(p("/ip4/10.1.2.3/tcp/1/p2p-circuit"), None);
    }

    #[test]
    fn bands_are_half_octaves() {
        let b = |ms: u64| band(Duration::from_millis(ms));
        assert_eq!(b(50), b(55));
        assert!(b(10) < b(20));
        assert!(b(20) < b(80));
    }

    #[test]
    fn reports_are_capped_rate_limited_and_about_known_peers_only() {
        let mut l = Locations::default();
        let (me, known, stranger) = (peer(), peer(), peer());
        let t0 = Instant::now();
        let s = |peer, rtt_us| RttSample { peer, rtt_us };
        let is_known = |p: &PeerId| *p == known;
        let too_many = vec![s(known, 1_000); MAX_RTT_SAMPLES + 1];
        assert_eq!(
            l.report(t0, me, &too_many, is_known),
            Err(ReportRefused::TooMany)
        );
        let mixed = [
            s(stranger, 1_000),
            s(me, 1_000),
            s(known, 0),
            s(known, u32::MAX),
            s(known, 2_000),
            s(known, 3_000),
        ];
        // Only the first sample about a peer is looked at: here an RTT of zero, out of range.
        assert_eq!(l.report(t0, me, &mixed, is_known), Ok(0));
        assert_eq!(
            l.report(
                t0 + Duration::from_secs(1),
                me,
                &[s(known, 2_000)],
                is_known
            ),
            Err(ReportRefused::TooSoon)
        );
        assert_eq!(
            l.report(
                t0 + MIN_REPORT_INTERVAL,
                me,
                &[s(known, 2_000), s(known, 9)],
                is_known
            ),
            Ok(1)
        );
        assert_eq!(
            l.report(
                t0 + MIN_REPORT_INTERVAL * 2,
                me,
                &[s(known, u32::MAX)],
                is_known
            ),
            Ok(0)
        );
        assert!(l.estimate(&me, &stranger).is_none());
        l.forget(&me);
        l.forget(&known);
        assert!(l.is_empty(), "{l:?}");
    }
}
