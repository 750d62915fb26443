//! TLS 1.3 for TCP and relayed connections: libp2p's TLS handshake (`/tls/1.0.0`, its
//! self-signed certificate that carries the peer's key, and its checks of the remote's), with
//! AES-GCM offered before ChaCha20-Poly1305 on CPUs with AES and carry-less multiply
//! instructions.
//!
//! Why not `libp2p::tls::Config` as it is: it offers ChaCha20-Poly1305 first, and a TLS 1.3
//! server takes the client's order, so two peers with it always settle on ChaCha20-Poly1305.
//! This module builds the same configurations with the suites in the order above; the
//! certificate and its resolver come from libp2p's own configurations and the checks are
//! libp2p's (`libp2p::tls::certificate::parse`, `P2pCertificate::verify_signature`), so on the
//! wire this is libp2p's handshake and a peer with the stock configuration connects too (on
//! the suite the dialing side prefers).
//!
//! What it does not do: check the remote's PeerId during the handshake (the swarm compares it
//! with the one it dialed afterwards, as with libp2p's configuration, which passes none
//! either), or offer anything but TLS 1.3.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use futures::{future::BoxFuture, AsyncRead, AsyncWrite, FutureExt};

use crate::coalesce::{ReadAhead, WriteBehind};
use libp2p::{
    core::{
        upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade},
        UpgradeInfo,
    },
    identity::{Keypair, PeerId},
    tls::{certificate, TlsStream},
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{aws_lc_rs, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    SignatureScheme, SupportedCipherSuite,
};

/// What a handshake yields: the TLS stream, with reads of the socket and writes of yamux's
/// frames batched around it ([`crate::coalesce`]).
pub type Stream<C> = WriteBehind<TlsStream<ReadAhead<C>>>;

/// The name multistream-select negotiates for this handshake (libp2p's).
pub const PROTOCOL: &str = "/tls/1.0.0";

/// Why the TLS configuration could not be made or a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// libp2p could not make this peer's certificate.
    #[error("cannot make the TLS certificate: {0}")]
    Certificate(#[from] certificate::GenError),
    /// rustls refused the configuration.
    #[error("cannot configure TLS: {0}")]
    Config(#[from] rustls::Error),
    /// The handshake failed (I/O, or the remote's certificate or signature was refused).
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] std::io::Error),
    /// The remote did not present exactly one certificate.
    #[error("the remote presented no single TLS certificate")]
    NoCertificate,
    /// The remote's certificate is not a valid libp2p certificate.
    #[error("the remote's TLS certificate is not a libp2p certificate: {0}")]
    BadCertificate(#[from] certificate::ParseError),
}

/// The TLS 1.3 suites in the order offered: AES-GCM first where the CPU has AES and
/// carry-less multiply instructions (there it is the cheapest AEAD per byte), ChaCha20-Poly1305
/// first where it has not (there AES runs in software: slower, and not constant-time).
///
/// The suites (their AEAD, hash and HKDF) are ring's where [`ring_seals_faster`], aws-lc's
/// elsewhere; the rest of the provider (key exchange, the random source) is aws-lc's either
/// way. Certificates are signed and checked by libp2p's code, whatever the provider.
pub fn cipher_suites() -> Vec<SupportedCipherSuite> {
    let [aes256, aes128, chacha] = if ring_seals_faster() {
        use rustls::crypto::ring::cipher_suite as ring;
        [
            ring::TLS13_AES_256_GCM_SHA384,
            ring::TLS13_AES_128_GCM_SHA256,
            ring::TLS13_CHACHA20_POLY1305_SHA256,
        ]
    } else {
        use aws_lc_rs::cipher_suite as aws_lc;
        [
            aws_lc::TLS13_AES_256_GCM_SHA384,
            aws_lc::TLS13_AES_128_GCM_SHA256,
            aws_lc::TLS13_CHACHA20_POLY1305_SHA256,
        ]
    };
    // Between the two AES suites, rustls's own order.
    if has_aes_instructions() {
        vec![aes256, aes128, chacha]
    } else {
        vec![chacha, aes256, aes128]
    }
}

/// Whether ring's AES-GCM is the faster of the two here: on x86-64 CPUs with VAES,
/// VPCLMULQDQ and AVX2 but without AVX-512. There ring (0.17.14) runs its VAES-AVX2 code and
/// aws-lc (aws-lc-sys 0.47), whose VAES code needs AVX-512, runs the older AES-NI code: about
/// twice the time per byte on this project's machine (ARCHITECTURE.md). With AVX-512 aws-lc
/// has a VAES path of its own, and on aarch64 an unrolled one that ring lacks; neither was
/// measured against ring, so aws-lc keeps them.
#[cfg(target_arch = "x86_64")]
pub fn ring_seals_faster() -> bool {
    std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
        && std::arch::is_x86_feature_detected!("avx2")
        && !std::arch::is_x86_feature_detected!("avx512f")
}

/// Whether ring's AES-GCM is the faster of the two here (see the x86-64 version): never
/// known to be on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub fn ring_seals_faster() -> bool {
    false
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn has_aes_instructions() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn has_aes_instructions() -> bool {
    // "aes" on aarch64 is FEAT_AES together with FEAT_PMULL.
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
fn has_aes_instructions() -> bool {
    false
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: cipher_suites(),
        ..aws_lc_rs::default_provider()
    })
}

/// The security upgrade: libp2p's TLS handshake with this module's suite order.
#[derive(Clone)]
pub struct Config {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    verifier: Arc<PeerCertificate>,
}

impl Config {
    /// The configuration for `key`: a fresh libp2p certificate signed by it.
    pub fn new(key: &Keypair) -> Result<Self, TlsError> {
        // libp2p's configurations make the certificate, its resolver and the ALPN; only the
        // suites and the verifier (with libp2p's checks) are put around them anew.
        let stock_client = libp2p::tls::make_client_config(key, None)?;
        let stock_server = libp2p::tls::make_server_config(key)?;
        let versions = &[&rustls::version::TLS13];
        let verifier = Arc::new(PeerCertificate::default());
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(stock_client.client_auth_cert_resolver.clone());
        client.alpn_protocols = stock_client.alpn_protocols.clone();
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(stock_server.cert_resolver.clone());
        server.alpn_protocols = stock_server.alpn_protocols.clone();
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            verifier,
        })
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Stream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server)
                .accept(ReadAhead::new(socket))
                .await
                .map_err(TlsError::Handshake)?;
            let peer = self.verifier.established(stream.get_ref().1)?;
            Ok((peer, WriteBehind::new(stream.into())))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Stream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // The libp2p TLS spec: no server name indication; rustls sends none for an IP
            // address.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let stream = futures_rustls::TlsConnector::from(self.client)
                .connect(name, ReadAhead::new(socket))
                .await
                .map_err(TlsError::Handshake)?;
            let peer = self.verifier.established(stream.get_ref().1)?;
            Ok((peer, WriteBehind::new(stream.into())))
        }
        .boxed()
    }
}

/// Accepts what libp2p's own TLS verifier accepts: exactly one certificate, a valid libp2p
/// certificate (self-signed, its extension signed by the peer's identity key: checked by
/// `certificate::parse`), and handshake signatures by that certificate's key.
///
/// `certificate::parse` checks both of the certificate's signatures each time, and a handshake
/// asked for it three times per side (the certificate, the handshake's signature, and the
/// PeerId after): in a live simulation of 60 nodes that was 10% of all CPU. It remembers the
/// certificates that passed lately, so the first of those three is skipped for a certificate
/// seen before (a peer keeps its certificate for as long as it runs) and the last always. The
/// handshake's signature is always checked, by a full parse: its key comes from there.
#[derive(Debug, Default)]
struct PeerCertificate {
    /// Certificates (DER) that passed `certificate::parse`, with their PeerIds, newest last.
    passed: Mutex<VecDeque<(Vec<u8>, PeerId)>>,
}

/// Certificates remembered at most (libp2p's are about 450 bytes).
const PASSED_KEPT: usize = 256;

/// A larger certificate is not remembered (checked in full each time).
const PASSED_MAX_BYTES: usize = 2048;

impl PeerCertificate {
    /// The PeerId of `der`, if it passed lately.
    fn passed(&self, der: &[u8]) -> Option<PeerId> {
        let passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
        passed.iter().rev().find(|(d, _)| d == der).map(|(_, p)| *p)
    }

    /// `der` passed `certificate::parse` as `peer`'s.
    fn remember(&self, der: &[u8], peer: PeerId) {
        if der.len() > PASSED_MAX_BYTES {
            return;
        }
        let mut passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
        if passed.iter().any(|(d, _)| d == der) {
            return;
        }
        if passed.len() >= PASSED_KEPT {
            passed.pop_front();
        }
        passed.push_back((der.to_vec(), peer));
    }

    fn check(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "libp2p TLS takes exactly one certificate".into(),
            ));
        }
        if self.passed(end_entity).is_none() {
            let peer = certificate::parse(end_entity).map_err(invalid)?.peer_id();
            self.remember(end_entity, peer);
        }
        Ok(())
    }

    fn check_signature(
        &self,
        cert: &CertificateDer,
        message: &[u8],
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let parsed = certificate::parse(cert).map_err(invalid)?;
        parsed
            .verify_signature(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        self.remember(cert, parsed.peer_id());
        Ok(HandshakeSignatureValid::assertion())
    }

    /// The remote's PeerId once a handshake has succeeded (its certificate and signature
    /// were checked above).
    fn established(&self, state: &CommonState) -> Result<PeerId, TlsError> {
        let [cert] = state.peer_certificates().unwrap_or_default() else {
            return Err(TlsError::NoCertificate);
        };
        let peer = match self.passed(cert) {
            Some(peer) => peer,
            None => certificate::parse(cert)?.peer_id(),
        };
        tracing::debug!(
            %peer,
            suite = ?state.negotiated_cipher_suite().map(|s| s.suite()),
            "TLS session established"
        );
        Ok(peer)
    }

    /// libp2p's list.
    fn schemes() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }
}

fn invalid(e: certificate::ParseError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn no_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not offered".into())
}

impl ServerCertVerifier for PeerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _server_name: &ServerName,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(cert, message, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for PeerCertificate {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(cert, message, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    type Pipe = Compat<tokio::io::DuplexStream>;

    fn pipe() -> (Pipe, Pipe) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (a.compat(), b.compat())
    }

    /// The suite a stream's handshake settled on.
    trait Suite {
        fn suite(&self) -> Option<CipherSuite>;
    }

    impl<C> Suite for TlsStream<C> {
        fn suite(&self) -> Option<CipherSuite> {
            self.get_ref()
                .1
                .negotiated_cipher_suite()
                .map(|s| s.suite())
        }
    }

    impl<C> Suite for Stream<C> {
        fn suite(&self) -> Option<CipherSuite> {
            self.get_ref().suite()
        }
    }

    /// Runs a handshake between `client` and `server` (any libp2p TLS upgrades) and returns
    /// the PeerIds each side saw and the suite the client's side negotiated.
    async fn handshake<A, B, SA, SB>(client: A, server: B) -> (PeerId, PeerId, Option<CipherSuite>)
    where
        A: OutboundConnectionUpgrade<Pipe, Output = (PeerId, SA)>
            + UpgradeInfo<Info = &'static str>,
        A::Error: std::fmt::Debug,
        B: InboundConnectionUpgrade<Pipe, Output = (PeerId, SB)> + UpgradeInfo<Info = &'static str>,
        B::Error: std::fmt::Debug,
        SA: Suite,
    {
        let (c, s) = pipe();
        let (out, inb) = futures::join!(
            client.upgrade_outbound(c, PROTOCOL),
            server.upgrade_inbound(s, PROTOCOL)
        );
        let (server_seen, stream) = out.unwrap();
        let (client_seen, _) = inb.unwrap();
        (server_seen, client_seen, stream.suite())
    }

    /// Bytes both ways between a shoal peer and a stock libp2p TLS peer, through the batching
    /// around shoal's TLS stream: writes of a yamux frame's sizes, a flush after each.
    #[tokio::test]
    async fn bytes_cross_a_handshake_both_ways_with_a_stock_peer() {
        use futures::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (c, s) = pipe();
        let (out, inb) = futures::join!(
            Config::new(&a).unwrap().upgrade_outbound(c, PROTOCOL),
            libp2p::tls::Config::new(&b)
                .unwrap()
                .upgrade_inbound(s, PROTOCOL)
        );
        let ((_, ours), (_, stock)) = (out.unwrap(), inb.unwrap());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let send = |mut w: Box<dyn futures::AsyncWrite + Unpin + Send>, data: Vec<u8>| async move {
            for chunk in data.chunks(16 * 1024) {
                w.write_all(&chunk[..12.min(chunk.len())]).await.unwrap();
                w.write_all(&chunk[12.min(chunk.len())..]).await.unwrap();
                w.flush().await.unwrap();
            }
            w
        };
        let (ours_r, ours_w) = ours.split();
        let (stock_r, stock_w) = stock.split();
        let recv = |mut r: Box<dyn futures::AsyncRead + Unpin + Send>, len: usize| async move {
            let mut got = vec![0u8; len];
            r.read_exact(&mut got).await.unwrap();
            got
        };
        let (_, _, to_stock, to_ours) = futures::join!(
            send(Box::new(ours_w), data.clone()),
            send(Box::new(stock_w), data.clone()),
            recv(Box::new(stock_r), data.len()),
            recv(Box::new(ours_r), data.len()),
        );
        assert!(to_stock == data, "shoal -> stock: bytes changed");
        assert!(to_ours == data, "stock -> shoal: bytes changed");
    }

    #[tokio::test]
    async fn two_shoal_peers_settle_on_the_first_suite_offered() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (server_seen, client_seen, suite) =
            handshake(Config::new(&a).unwrap(), Config::new(&b).unwrap()).await;
        assert_eq!(server_seen, b.public().to_peer_id());
        assert_eq!(client_seen, a.public().to_peer_id());
        assert_eq!(suite, Some(cipher_suites()[0].suite()));
        if has_aes_instructions() {
            assert_eq!(suite, Some(CipherSuite::TLS13_AES_256_GCM_SHA384));
        }
        println!(
            "negotiated {suite:?} (AES instructions: {})",
            has_aes_instructions()
        );
    }

    #[tokio::test]
    async fn libp2ps_own_tls_config_connects_both_ways() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        // A stock client: the server takes the client's order, so ChaCha20-Poly1305 (libp2p's
        // first) is what two stock peers get.
        let (server_seen, client_seen, suite) = handshake(
            libp2p::tls::Config::new(&a).unwrap(),
            Config::new(&b).unwrap(),
        )
        .await;
        assert_eq!(server_seen, b.public().to_peer_id());
        assert_eq!(client_seen, a.public().to_peer_id());
        assert_eq!(suite, Some(CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));
        // A stock server: our order.
        let (server_seen, client_seen, suite) = handshake(
            Config::new(&a).unwrap(),
            libp2p::tls::Config::new(&b).unwrap(),
        )
        .await;
        assert_eq!(server_seen, b.public().to_peer_id());
        assert_eq!(client_seen, a.public().to_peer_id());
        assert_eq!(suite, Some(cipher_suites()[0].suite()));
    }

    #[test]
    fn only_one_valid_libp2p_certificate_is_accepted() {
        let key = Keypair::generate_ed25519();
        let (cert, _) = certificate::generate(&key).unwrap();
        let verifier = PeerCertificate::default();
        assert!(verifier.check(&cert, &[]).is_ok());
        assert_eq!(verifier.passed(&cert), Some(key.public().to_peer_id()));
        // Remembered or not, one certificate only.
        assert!(verifier.check(&cert, std::slice::from_ref(&cert)).is_err());
        let garbage = CertificateDer::from(vec![0x30u8, 0x03, 0x02, 0x01, 0x00]);
        assert!(verifier.check(&garbage, &[]).is_err());
        // A certificate whose bytes were altered no longer verifies, though the original
        // passed.
        let mut bytes = cert.as_ref().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let altered = CertificateDer::from(bytes);
        assert!(verifier.check(&altered, &[]).is_err());
        assert_eq!(verifier.passed(&altered), None);
    }

    #[test]
    fn the_certificates_remembered_are_bounded() {
        let verifier = PeerCertificate::default();
        let first = certificate::generate(&Keypair::generate_ed25519())
            .unwrap()
            .0;
        assert!(verifier.check(&first, &[]).is_ok());
        for _ in 0..PASSED_KEPT {
            let key = Keypair::generate_ed25519();
            let (cert, _) = certificate::generate(&key).unwrap();
            verifier.remember(&cert, key.public().to_peer_id());
        }
        assert_eq!(verifier.passed.lock().unwrap().len(), PASSED_KEPT);
        assert_eq!(verifier.passed(&first), None, "the oldest went first");
        // Forgotten, it is checked in full again.
        assert!(verifier.check(&first, &[]).is_ok());
        // Nothing larger than a libp2p certificate is kept.
        verifier.remember(&vec![0u8; PASSED_MAX_BYTES + 1], PeerId::random());
        assert!(verifier.passed(&vec![0u8; PASSED_MAX_BYTES + 1]).is_none());
    }

    #[tokio::test]
    async fn a_second_handshake_with_a_remembered_certificate_names_the_same_peers() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        // `a` serves, `b` dials, twice.
        let (server, client) = (Config::new(&a).unwrap(), Config::new(&b).unwrap());
        for _ in 0..2 {
            let (server_seen, client_seen, _) = handshake(client.clone(), server.clone()).await;
            assert_eq!(server_seen, a.public().to_peer_id());
            assert_eq!(client_seen, b.public().to_peer_id());
        }
        assert_eq!(server.verifier.passed.lock().unwrap().len(), 1);
        assert_eq!(client.verifier.passed.lock().unwrap().len(), 1);
    }
}
