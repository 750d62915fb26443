//! Manifests: the signed description of a file, and the file id that names it.
//!
//! A manifest is a small signed header plus the list of block digests. The publisher signs the
//! header body; the master countersigns body and publisher signature. The [`FileId`] is the
//! SHA-256 multihash of the canonical encoding of the countersigned header, so a header can be
//! checked against an id, and the digest list against the header (`digest_list_sha256`).
//!
//! Parse, don't validate: a [`VerifiedManifest`] can only be made by [`Manifest::verify`], so
//! code holding one never re-checks it.

use libp2p::identity::{Keypair, PeerId, PublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::block::{BlockDigest, Geometry, SHA2_256};
use crate::codec;
use crate::limits::{
    MAX_BLOCKS, MAX_BLOCK_SIZE, MAX_KEY_OR_SIG_LEN, MAX_NAME_LEN, MIN_BLOCK_SIZE, TARGET_MAX_BLOCKS,
};

const PUBLISHER_DOMAIN: &[u8] = b"shoal/manifest/publisher/1";
const MASTER_DOMAIN: &[u8] = b"shoal/manifest/master/1";

/// The name of a file: the SHA2-256 multihash of its countersigned header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileId(pub [u8; 32]);

impl FileId {
    /// The id as a multihash.
    pub fn to_multihash(&self) -> multihash::Multihash<64> {
        BlockDigest(self.0).to_multihash()
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", hex::encode(self.to_multihash().to_bytes()))
    }
}

impl std::fmt::Debug for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_string()[4..16])
    }
}

/// Why a string is not a file id.
#[derive(Debug, thiserror::Error)]
#[error("not a file id ({0}); a file id is 68 hex digits starting with 1220, as `shoal publish` and `shoal-master add` print it")]
pub struct ParseFileIdError(String);

impl std::str::FromStr for FileId {
    type Err = ParseFileIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(c) = s.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(ParseFileIdError(format!("{c:?} is not a hex digit")));
        }
        if s.len() != 68 {
            return Err(ParseFileIdError(format!("{} hex digits", s.len())));
        }
        if !s.starts_with("1220") {
            return Err(ParseFileIdError(format!(
                "starts with {}",
                s.get(..4).unwrap_or(s)
            )));
        }
        let bytes = hex::decode(s).map_err(|e| ParseFileIdError(e.to_string()))?;
        let mh = multihash::Multihash::<64>::from_bytes(&bytes)
            .map_err(|e| ParseFileIdError(e.to_string()))?;
        if mh.code() != SHA2_256 {
            return Err(ParseFileIdError(format!("multihash code {:#x}", mh.code())));
        }
        let digest: [u8; 32] = mh
            .digest()
            .try_into()
            .map_err(|_| ParseFileIdError("digest is not 32 bytes".into()))?;
        Ok(FileId(digest))
    }
}

/// What the publisher states about a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderBody {
    /// File name, as the publisher named it (metadata only; never used as a path unchecked).
    pub name: String,
    /// File size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// SHA-256 of the whole file.
    pub file_sha256: [u8; 32],
    /// SHA-256 of the concatenated block digests.
    pub digest_list_sha256: [u8; 32],
    /// The publisher's public key, protobuf-encoded.
    pub publisher_key: Vec<u8>,
    /// The master that is to countersign and first serve the file.
    pub master: PeerId,
    /// Creation time, seconds since the Unix epoch (as the publisher's clock says).
    pub created_unix_s: u64,
}

impl HeaderBody {
    /// Block geometry of the file.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size,
            block_size: self.block_size,
        }
    }

    /// The publisher's PeerId, if its key decodes.
    pub fn publisher(&self) -> Result<PeerId, ManifestError> {
        Ok(decode_key(&self.publisher_key)?.to_peer_id())
    }
}

/// A header signed by its publisher, before the master countersigns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublisherHeader {
    /// The signed statement.
    pub body: HeaderBody,
    /// The publisher's signature over the body.
    pub publisher_sig: Vec<u8>,
}

/// A header signed by the publisher and countersigned by the master: the provenance record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHeader {
    /// The signed statement.
    pub body: HeaderBody,
    /// The publisher's signature over the body.
    pub publisher_sig: Vec<u8>,
    /// The master's public key, protobuf-encoded.
    pub master_key: Vec<u8>,
    /// The master's signature over body and publisher signature.
    pub master_sig: Vec<u8>,
}

/// A header plus its block digest list, as carried on the wire and stored on disk. Not yet
/// trusted: call [`Manifest::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The countersigned header.
    pub header: SignedHeader,
    /// One digest per block.
    pub digests: Vec<BlockDigest>,
}

/// A manifest whose signatures, digest list and id have been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedManifest {
    id: FileId,
    publisher: PeerId,
    manifest: Manifest,
}

/// Why a manifest (or part of one) is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// A key does not decode.
    #[error("malformed public key: {0}")]
    BadKey(String),
    /// The publisher's signature does not verify.
    #[error("publisher signature does not verify")]
    BadPublisherSignature,
    /// The master's signature does not verify.
    #[error("master countersignature does not verify")]
    BadMasterSignature,
    /// The countersigning key is not the master the header names.
    #[error("countersigned by {signer}, but the header names master {named}")]
    WrongMaster {
        /// Whose key signed.
        signer: Box<PeerId>,
        /// Who the header names.
        named: Box<PeerId>,
    },
    /// The header does not hash to the expected id.
    #[error("header hashes to {actual}, expected {expected}")]
    WrongId {
        /// The id asked for.
        expected: FileId,
        /// The id the header has.
        actual: FileId,
    },
    /// The digest list does not match the header.
    #[error("block digest list does not match the header's digest_list_sha256")]
    WrongDigestList,
    /// The digest list has the wrong length.
    #[error("header implies {expected} blocks but the digest list has {actual}")]
    WrongDigestCount {
        /// Blocks the header implies.
        expected: u64,
        /// Digests present.
        actual: usize,
    },
    /// A field is out of its allowed range.
    #[error("invalid header field: {0}")]
    InvalidField(String),
    /// Signing failed (local key problem).
    #[error("cannot sign: {0}")]
    Signing(String),
}

fn decode_key(bytes: &[u8]) -> Result<PublicKey, ManifestError> {
    if bytes.len() > MAX_KEY_OR_SIG_LEN {
        return Err(ManifestError::BadKey("key too long".into()));
    }
    PublicKey::try_decode_protobuf(bytes).map_err(|e| ManifestError::BadKey(e.to_string()))
}

fn signed_bytes(domain: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut out = domain.to_vec();
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn body_bytes(body: &HeaderBody) -> Result<Vec<u8>, ManifestError> {
    codec::encode(body).map_err(|e| ManifestError::InvalidField(e.to_string()))
}

/// The block size a publisher should use for a file of `size` bytes: the default, doubled
/// until the digest list stays near [`TARGET_MAX_BLOCKS`] entries.
pub fn choose_block_size(size: u64) -> u32 {
    let mut bs = crate::limits::DEFAULT_BLOCK_SIZE;
    while size.div_ceil(u64::from(bs)) > TARGET_MAX_BLOCKS && bs < MAX_BLOCK_SIZE {
        bs *= 2;
    }
    bs
}

/// The name a manifest gives the file at `path`: its last component ("file" if it has none).
pub fn name_for(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into())
}

/// SHA-256 over the concatenated block digests.
pub fn digest_list_sha256(digests: &[BlockDigest]) -> [u8; 32] {
    let mut h = Sha256::new();
    for d in digests {
        h.update(d.0);
    }
    h.finalize().into()
}

impl HeaderBody {
    fn check_fields(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::InvalidField(m));
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return bad(format!("name must be 1..={MAX_NAME_LEN} bytes"));
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
            || !self.block_size.is_power_of_two()
        {
            return bad(format!("block size {} out of range", self.block_size));
        }
        if self.size.div_ceil(u64::from(self.block_size)) > MAX_BLOCKS {
            return bad(format!("{} bytes is too many blocks", self.size));
        }
        Ok(())
    }

    /// Signs the body with the publisher's key (which must be the key in the body).
    pub fn sign(self, publisher: &Keypair) -> Result<PublisherHeader, ManifestError> {
        self.check_fields()?;
        if publisher.public().encode_protobuf() != self.publisher_key {
            return Err(ManifestError::Signing(
                "publisher_key is not the signing key".into(),
            ));
        }
        let msg = signed_bytes(PUBLISHER_DOMAIN, &[&body_bytes(&self)?]);
        let publisher_sig = publisher
            .sign(&msg)
            .map_err(|e| ManifestError::Signing(e.to_string()))?;
        Ok(PublisherHeader {
            body: self,
            publisher_sig,
        })
    }
}

impl PublisherHeader {
    /// Checks fields and the publisher signature.
    pub fn verify(&self) -> Result<(), ManifestError> {
        self.body.check_fields()?;
        if self.publisher_sig.len() > MAX_KEY_OR_SIG_LEN {
            return Err(ManifestError::BadPublisherSignature);
        }
        let key = decode_key(&self.body.publisher_key)?;
        let msg = signed_bytes(PUBLISHER_DOMAIN, &[&body_bytes(&self.body)?]);
        if !key.verify(&msg, &self.publisher_sig) {
            return Err(ManifestError::BadPublisherSignature);
        }
        Ok(())
    }

    /// The master's countersignature: checks the publisher's signature and that `master` is
    /// the master the body names, then signs.
    pub fn countersign(self, master: &Keypair) -> Result<SignedHeader, ManifestError> {
        self.verify()?;
        let signer = master.public().to_peer_id();
        if signer != self.body.master {
            return Err(ManifestError::WrongMaster {
                signer: Box::new(signer),
                named: Box::new(self.body.master),
            });
        }
        let msg = signed_bytes(
            MASTER_DOMAIN,
            &[&body_bytes(&self.body)?, &self.publisher_sig],
        );
        let master_sig = master
            .sign(&msg)
            .map_err(|e| ManifestError::Signing(e.to_string()))?;
        Ok(SignedHeader {
            body: self.body,
            publisher_sig: self.publisher_sig,
            master_key: master.public().encode_protobuf(),
            master_sig,
        })
    }
}

impl SignedHeader {
    /// The file id this header names.
    pub fn id(&self) -> Result<FileId, ManifestError> {
        let bytes = codec::encode(self).map_err(|e| ManifestError::InvalidField(e.to_string()))?;
        Ok(FileId(Sha256::digest(bytes).into()))
    }

    /// Checks both signatures and that the countersigner is the named master.
    pub fn verify(&self) -> Result<(), ManifestError> {
        PublisherHeader {
            body: self.body.clone(),
            publisher_sig: self.publisher_sig.clone(),
        }
        .verify()?;
        if self.master_sig.len() > MAX_KEY_OR_SIG_LEN {
            return Err(ManifestError::BadMasterSignature);
        }
        let key = decode_key(&self.master_key)?;
        let signer = key.to_peer_id();
        if signer != self.body.master {
            return Err(ManifestError::WrongMaster {
                signer: Box::new(signer),
                named: Box::new(self.body.master),
            });
        }
        let msg = signed_bytes(
            MASTER_DOMAIN,
            &[&body_bytes(&self.body)?, &self.publisher_sig],
        );
        if !key.verify(&msg, &self.master_sig) {
            return Err(ManifestError::BadMasterSignature);
        }
        Ok(())
    }

    /// Checks the header and that it hashes to `expected`.
    pub fn verify_id(&self, expected: &FileId) -> Result<(), ManifestError> {
        self.verify()?;
        let actual = self.id()?;
        if &actual != expected {
            return Err(ManifestError::WrongId {
                expected: *expected,
                actual,
            });
        }
        Ok(())
    }
}

impl Manifest {
    /// Checks signatures, fields, the digest list against the header, and (when given) the
    /// id. Returns the trusted manifest.
    pub fn verify(self, expected: Option<&FileId>) -> Result<VerifiedManifest, ManifestError> {
        self.header.verify()?;
        let id = self.header.id()?;
        if let Some(expected) = expected {
            if &id != expected {
                return Err(ManifestError::WrongId {
                    expected: *expected,
                    actual: id,
                });
            }
        }
        check_digest_list(&self.header.body, &self.digests)?;
        let publisher = self.header.body.publisher()?;
        Ok(VerifiedManifest {
            id,
            publisher,
            manifest: self,
        })
    }
}

/// Checks a digest list against the body that claims it.
pub fn check_digest_list(body: &HeaderBody, digests: &[BlockDigest]) -> Result<(), ManifestError> {
    let expected = body.size.div_ceil(u64::from(body.block_size.max(1)));
    if digests.len() as u64 != expected {
        return Err(ManifestError::WrongDigestCount {
            expected,
            actual: digests.len(),
        });
    }
    if digest_list_sha256(digests) != body.digest_list_sha256 {
        return Err(ManifestError::WrongDigestList);
    }
    Ok(())
}

impl VerifiedManifest {
    /// The file id.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// The countersigned header.
    pub fn header(&self) -> &SignedHeader {
        &self.manifest.header
    }

    /// The header body.
    pub fn body(&self) -> &HeaderBody {
        &self.manifest.header.body
    }

    /// Block geometry.
    pub fn geometry(&self) -> Geometry {
        self.body().geometry()
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u32 {
        self.geometry().blocks()
    }

    /// Digest of `block`, if it exists.
    pub fn digest(&self, block: u32) -> Option<&BlockDigest> {
        self.manifest.digests.get(block as usize)
    }

    /// All block digests.
    pub fn digests(&self) -> &[BlockDigest] {
        &self.manifest.digests
    }

    /// Whether `data` is exactly block `block`.
    pub fn check_block(&self, block: u32, data: &[u8]) -> bool {
        data.len() == self.geometry().block_len(block)
            && self.digest(block) == Some(&BlockDigest::of(data))
    }

    /// The unverified form, for storage or the wire.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The publisher's PeerId.
    pub fn publisher(&self) -> PeerId {
        self.publisher
    }
}

/// Builds a manifest body and digest list from a file's bytes, streamed in any chunking.
#[derive(Debug)]
pub struct ManifestBuilder {
    block_size: u32,
    file: Sha256,
    block: Sha256,
    in_block: usize,
    size: u64,
    digests: Vec<BlockDigest>,
}

impl ManifestBuilder {
    /// A builder for blocks of `block_size` bytes (see [`choose_block_size`]).
    pub fn new(block_size: u32) -> Self {
        Self {
            block_size,
            file: Sha256::new(),
            block: Sha256::new(),
            in_block: 0,
            size: 0,
            digests: Vec::new(),
        }
    }

    /// Hashes everything `reader` yields (a whole file, streamed 1 MiB at a time).
    pub fn hash_reader(mut reader: impl std::io::Read, block_size: u32) -> std::io::Result<Self> {
        let mut b = Self::new(block_size);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(b),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            b.update(&buf[..n]);
        }
    }

    /// Feeds the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.file.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (self.block_size as usize - self.in_block).min(data.len());
            self.block.update(&data[..take]);
            self.in_block += take;
            data = &data[take..];
            if self.in_block == self.block_size as usize {
                let d = std::mem::take(&mut self.block).finalize();
                self.digests.push(BlockDigest(d.into()));
                self.in_block = 0;
            }
        }
    }

    /// The body (to be signed) and the digest list.
    pub fn finish(
        mut self,
        name: String,
        publisher_key: Vec<u8>,
        master: PeerId,
        created_unix_s: u64,
    ) -> (HeaderBody, Vec<BlockDigest>) {
        if self.in_block > 0 {
            self.digests.push(BlockDigest(self.block.finalize().into()));
        }
        let body = HeaderBody {
            name,
            size: self.size,
            block_size: self.block_size,
            file_sha256: self.file.finalize().into(),
            digest_list_sha256: digest_list_sha256(&self.digests),
            publisher_key,
            master,
            created_unix_s,
        };
        (body, self.digests)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A manifest over `data`, published by `publisher` and countersigned by `master`.
    pub(crate) fn manifest_for(
        data: &[u8],
        block_size: u32,
        publisher: &Keypair,
        master: &Keypair,
    ) -> Manifest {
        let digests: Vec<BlockDigest> = data
            .chunks(block_size as usize)
            .map(BlockDigest::of)
            .collect();
        let body = HeaderBody {
            name: "test.bin".into(),
            size: data.len() as u64,
            block_size,
            file_sha256: Sha256::digest(data).into(),
            digest_list_sha256: digest_list_sha256(&digests),
            publisher_key: publisher.public().encode_protobuf(),
            master: master.public().to_peer_id(),
            created_unix_s: 1,
        };
        let header = body.sign(publisher).unwrap().countersign(master).unwrap();
        Manifest { header, digests }
    }

    fn sample() -> (Manifest, Vec<u8>) {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
        let m = manifest_for(
            &data,
            4096,
            &Keypair::generate_ed25519(),
            &Keypair::generate_ed25519(),
        );
        (m, data)
    }

    #[test]
    fn a_good_manifest_verifies_and_checks_blocks() {
        let (m, data) = sample();
        let id = m.header.id().unwrap();
        let v = m.verify(Some(&id)).unwrap();
        assert_eq!(v.blocks(), 5);
        assert!(v.check_block(4, &data[16384..]));
        assert!(!v.check_block(3, &data[16384..]));
        assert!(!v.check_block(0, &data[..4095]));
        assert_eq!(id.to_string().parse::<FileId>().unwrap(), id);
    }

    #[test]
    fn wrong_publisher_signature_is_refused() {
        let (mut m, _) = sample();
        m.header.publisher_sig[0] ^= 1;
        assert_eq!(
            m.verify(None).unwrap_err(),
            ManifestError::BadPublisherSignature
        );
    }

    #[test]
    fn tampered_body_is_refused() {
        let (mut m, _) = sample();
        m.header.body.name = "other".into();
        assert_eq!(
            m.verify(None).unwrap_err(),
            ManifestError::BadPublisherSignature
        );
    }

    #[test]
    fn wrong_master_signature_is_refused() {
        let (mut m, _) = sample();
        m.header.master_sig[3] ^= 1;
        assert_eq!(
            m.verify(None).unwrap_err(),
            ManifestError::BadMasterSignature
        );
    }

    #[test]
    fn countersigned_by_another_master_is_refused() {
        let (mut m, _) = sample();
        let other = Keypair::generate_ed25519();
        m.header.master_key = other.public().encode_protobuf();
        assert!(matches!(
            m.verify(None).unwrap_err(),
            ManifestError::WrongMaster { .. }
        ));
    }

    #[test]
    fn wrong_id_is_refused() {
        let (m, _) = sample();
        let err = m.verify(Some(&FileId([9; 32]))).unwrap_err();
        assert!(matches!(err, ManifestError::WrongId { .. }));
    }

    #[test]
    fn wrong_digest_list_is_refused() {
        let (mut m, _) = sample();
        m.digests[2].0[0] ^= 1;
        assert_eq!(
            m.clone().verify(None).unwrap_err(),
            ManifestError::WrongDigestList
        );
        m.digests.pop();
        assert!(matches!(
            m.verify(None).unwrap_err(),
            ManifestError::WrongDigestCount { .. }
        ));
    }

    #[test]
    fn block_size_grows_for_huge_files() {
        assert_eq!(choose_block_size(1 << 30), 64 * 1024);
        assert_eq!(choose_block_size(64 << 30), 1 << 20);
    }

    #[test]
    fn builder_matches_whole_buffer_digests_in_any_chunking() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 13) as u8).collect();
        let (p, m) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let reference = manifest_for(&data, 4096, &p, &m);
        let mut b = ManifestBuilder::new(4096);
        for chunk in data.chunks(777) {
            b.update(chunk);
        }
        let (body, digests) = b.finish(
            "test.bin".into(),
            p.public().encode_protobuf(),
            m.public().to_peer_id(),
            1,
        );
        assert_eq!(digests, reference.digests);
        assert_eq!(body, reference.header.body);
    }

    #[test]
    fn file_id_parse_errors_are_clear() {
        assert!("zz".parse::<FileId>().is_err());
        // Garbled ids say what a file id looks like, whatever is wrong with them.
        let good = FileId([7; 32]).to_string();
        assert_eq!(good.parse::<FileId>().unwrap(), FileId([7; 32]));
        let wrong_code = format!("1320{}", &good[4..]);
        for (bad, why) in [
            (&good[..good.len() - 1], "67 hex digits"),
            (&good[..6], "6 hex digits"),
            ("release.iso", "'r' is not a hex digit"),
            (wrong_code.as_str(), "starts with 1320"),
        ] {
            let e = bad.parse::<FileId>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.contains("68 hex digits starting with 1220"), "{e}");
        }
        assert!("1220".parse::<FileId>().is_err());
    }
}
