//! `shoal ls`: the files a master holds, answered from the policy's table.
//!
//! The answer is capped at [`MAX_LIST_FILES`] entries (sorted by name, then id; the total is
//! always given), so that it fits the master response cap whatever the number of files.

use shoal_protocol::{
    limits::MAX_LIST_FILES,
    wire::{ListedFile, MasterResponse},
};

use crate::policy::Policy;

/// The answer to [`shoal_protocol::wire::MasterRequest::List`].
pub(crate) fn list(policy: &Policy) -> MasterResponse {
    let mut files: Vec<ListedFile> = policy.listing().collect();
    let total = files.len() as u32;
    files.sort_by(|a, b| a.name.cmp(&b.name).then(a.file.cmp(&b.file)));
    files.truncate(MAX_LIST_FILES);
    MasterResponse::Files { files, total }
}
