//! Deliberate misbehaviour, for testing how the swarm copes with bad peers.
//!
//! The modes only take effect when set through [`crate::NodeConfig::with_chaos`], which exists
//! only with the `chaos` cargo feature (off by default), so a normal build cannot misbehave.

use std::str::FromStr;

/// How a chaos node misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChaosMode {
    /// Flips a byte in every block it serves.
    Corrupt,
    /// Flips a byte in every third block it serves.
    CorruptSome,
    /// Honest to the master, corrupt to everybody else.
    CorruptExceptMaster,
    /// Serves half of each requested range, then closes the stream.
    Truncate,
    /// Serves another block's bytes in place of each requested block.
    WrongBlock,
    /// Accepts requests and then sends nothing.
    Stall,
    /// Tells the master it holds every block while it has none.
    LieHave,
    /// Reports every peer it downloads from as corrupt, after every transfer (good or not).
    FalseAccuse,
    /// Takes every redirect hint's addresses for a closed port (`WRONG_HINT`), as if the
    /// master's hints were wrong: the holders must be found through Kademlia.
    WrongHints,
}

/// The address a [`ChaosMode::WrongHints`] node dials instead of the hinted ones (port 1 on
/// loopback: refused at once).
pub const WRONG_HINT: &str = "/ip4/127.0.0.1/tcp/1";

impl FromStr for ChaosMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "corrupt" => Self::Corrupt,
            "corrupt-some" => Self::CorruptSome,
            "corrupt-except-master" => Self::CorruptExceptMaster,
            "truncate" => Self::Truncate,
            "wrong-block" => Self::WrongBlock,
            "stall" => Self::Stall,
            "lie-have" => Self::LieHave,
            "false-accuse" => Self::FalseAccuse,
            "wrong-hints" => Self::WrongHints,
            other => {
                return Err(format!(
                    "unknown chaos mode {other:?}; one of corrupt, corrupt-some, \
                     corrupt-except-master, truncate, wrong-block, stall, lie-have, false-accuse, \
                     wrong-hints"
                ))
            }
        })
    }
}

impl ChaosMode {
    /// Whether block `block`, served to someone (`to_master` when it is the master), is
    /// to be damaged.
    pub fn corrupts(&self, block: u32, to_master: bool) -> bool {
        match self {
            Self::Corrupt => true,
            Self::CorruptSome => block.is_multiple_of(3),
            Self::CorruptExceptMaster => !to_master,
            _ => false,
        }
    }
}
