//! Tickets: one shareable string that names a file and where to get it, like a magnet link.
//!
//! `shoal:<file id>@<master address>[,<master address>...]`, each address ending in
//! `/p2p/<master PeerId>`, all of them naming the same master. `shoal publish` and
//! `shoal-master add` print one; `shoal fetch TICKET` needs nothing else.
//!
//! A ticket is input from anywhere (a chat message, a web page): its length and its number of
//! addresses are capped before anything is parsed, and a ticket whose addresses name different
//! masters is refused, since the master's PeerId is the swarm's trust anchor.

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};

use crate::FileId;

/// The scheme prefix.
pub const SCHEME: &str = "shoal:";
/// Longest ticket accepted, in bytes.
pub const MAX_TICKET_LEN: usize = 4096;
/// Most master addresses in a ticket.
pub const MAX_TICKET_ADDRS: usize = 16;

/// A file id and the addresses of the master that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The file.
    pub file: FileId,
    /// The master's addresses, each ending in `/p2p/<PeerId>` (at least one).
    pub masters: Vec<Multiaddr>,
}

/// Why a string is not a ticket.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseTicketError {
    /// Not `shoal:...`.
    #[error("a ticket starts with \"shoal:\"")]
    Scheme,
    /// Too long.
    #[error("ticket longer than {MAX_TICKET_LEN} bytes")]
    TooLong,
    /// No `@` between the id and the addresses.
    #[error("a ticket is shoal:<file id>@<master address>[,<master address>...]")]
    Shape,
    /// The id part.
    #[error("{0}")]
    FileId(String),
    /// No address, or too many.
    #[error("a ticket carries 1 to {MAX_TICKET_ADDRS} master addresses, not {0}")]
    AddressCount(usize),
    /// An address that does not parse.
    #[error("bad master address {0:?}: {1}")]
    Address(String, String),
    /// An address without `/p2p/<PeerId>`.
    #[error("master address {0} does not end in /p2p/<master PeerId>")]
    NoPeerId(Multiaddr),
    /// Addresses naming different masters (their PeerIds).
    #[error("the ticket's addresses name different masters ({0} and {1})")]
    MixedMasters(String, String),
}

fn peer_at_end(a: &Multiaddr) -> Option<PeerId> {
    match a.iter().last() {
        Some(Protocol::P2p(p)) => Some(p),
        _ => None,
    }
}

impl Ticket {
    /// A ticket for `file` at `masters`; checks them as parsing would.
    pub fn new(file: FileId, masters: Vec<Multiaddr>) -> Result<Self, ParseTicketError> {
        let t = Self { file, masters };
        t.check()?;
        Ok(t)
    }

    /// The master's PeerId.
    pub fn master(&self) -> Option<PeerId> {
        self.masters.first().and_then(peer_at_end)
    }

    fn check(&self) -> Result<(), ParseTicketError> {
        if self.masters.is_empty() || self.masters.len() > MAX_TICKET_ADDRS {
            return Err(ParseTicketError::AddressCount(self.masters.len()));
        }
        let mut master = None;
        for a in &self.masters {
            let p = peer_at_end(a).ok_or_else(|| ParseTicketError::NoPeerId(a.clone()))?;
            match master {
                None => master = Some(p),
                Some(m) if m != p => {
                    return Err(ParseTicketError::MixedMasters(m.to_string(), p.to_string()))
                }
                Some(_) => {}
            }
        }
        if self.to_string().len() > MAX_TICKET_LEN {
            return Err(ParseTicketError::TooLong);
        }
        Ok(())
    }
}

impl std::fmt::Display for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}@", self.file)?;
        for (i, a) in self.masters.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Ticket {
    type Err = ParseTicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() > MAX_TICKET_LEN {
            return Err(ParseTicketError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(ParseTicketError::Scheme)?;
        let (id, addrs) = rest.split_once('@').ok_or(ParseTicketError::Shape)?;
        let file: FileId = id.parse().map_err(|e: crate::manifest::ParseFileIdError| {
            ParseTicketError::FileId(e.to_string())
        })?;
        let parts: Vec<&str> = addrs.split(',').filter(|a| !a.is_empty()).collect();
        if parts.is_empty() || parts.len() > MAX_TICKET_ADDRS {
            return Err(ParseTicketError::AddressCount(parts.len()));
        }
        let masters = parts
            .iter()
            .map(|a| {
                a.parse::<Multiaddr>()
                    .map_err(|e| ParseTicketError::Address((*a).to_string(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(file, masters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn addr(ip: [u8; 4], port: u16, p: PeerId) -> Multiaddr {
        Multiaddr::empty()
            .with(Protocol::Ip4(ip.into()))
            .with(Protocol::Tcp(port))
            .with(Protocol::P2p(p))
    }

    #[test]
    fn round_trips_and_names_its_master() {
        let p = peer();
        let t = Ticket::new(
            FileId([3; 32]),
            vec![
                addr([203, 0, 113, 5], 4001, p),
                addr([127, 0, 0, 1], 4001, p),
            ],
        )
        .unwrap();
        let s = t.to_string();
        assert!(s.starts_with("shoal:1220"), "{s}");
        assert_eq!(s.parse::<Ticket>().unwrap(), t);
        assert_eq!(t.master(), Some(p));
        // Whitespace around a pasted ticket is fine.
        assert_eq!(format!("  {s}\n").parse::<Ticket>().unwrap(), t);
    }

    #[test]
    fn bad_tickets_say_what_is_wrong() {
        let (p, q) = (peer(), peer());
        let id = FileId([3; 32]).to_string();
        let a = addr([10, 0, 0, 1], 1, p);
        let cases: Vec<(String, ParseTicketError)> = vec![
            (format!("magnet:{id}@{a}"), ParseTicketError::Scheme),
            (format!("shoal:{id}"), ParseTicketError::Shape),
            (format!("shoal:{id}@"), ParseTicketError::AddressCount(0)),
            (
                format!("shoal:{id}@/ip4/10.0.0.1/tcp/1"),
                ParseTicketError::NoPeerId("/ip4/10.0.0.1/tcp/1".parse().unwrap()),
            ),
            (
                format!("shoal:{id}@{a},{}", addr([10, 0, 0, 2], 1, q)),
                ParseTicketError::MixedMasters(p.to_string(), q.to_string()),
            ),
            ("x".repeat(MAX_TICKET_LEN + 1), ParseTicketError::TooLong),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<Ticket>().unwrap_err(), want, "{s}");
        }
        let many: Vec<String> = (0..=MAX_TICKET_ADDRS).map(|_| a.to_string()).collect();
        assert_eq!(
            format!("shoal:{id}@{}", many.join(",")).parse::<Ticket>(),
            Err(ParseTicketError::AddressCount(MAX_TICKET_ADDRS + 1))
        );
        assert!(matches!(
            format!("shoal:12@{a}").parse::<Ticket>(),
            Err(ParseTicketError::FileId(e)) if e.contains("68 hex digits")
        ));
        assert!(matches!(
            format!("shoal:{id}@/ip4/300.0.0.1/tcp/1").parse::<Ticket>(),
            Err(ParseTicketError::Address(..))
        ));
    }

    proptest! {
        #[test]
        fn any_ticket_round_trips(
            id in any::<[u8; 32]>(),
            ips in proptest::collection::vec((any::<[u8; 4]>(), any::<u16>()), 1..=MAX_TICKET_ADDRS),
        ) {
            let p = peer();
            let t = Ticket::new(FileId(id), ips.iter().map(|(ip, port)| addr(*ip, *port, p)).collect()).unwrap();
            prop_assert_eq!(t.to_string().parse::<Ticket>().unwrap(), t);
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,300}") {
            let _ = s.parse::<Ticket>();
            let _ = format!("shoal:{s}").parse::<Ticket>();
        }
    }
}
