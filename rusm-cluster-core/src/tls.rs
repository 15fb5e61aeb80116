//! The one TLS policy of the cluster, written once and used by every backend: TLS 1.3 only, ALPN
//! [`ALPN`], mutual authentication against the [`TrustAnchor`] with its CRLs, and an explicit
//! crypto provider (never the process default, which panics when two providers are compiled in).

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::identity::{Identity, IdentityKind, NodeName, TrustAnchor, SHARED_IDENTITY_NAME};

/// The ALPN protocol id of RUSM cluster links.
pub const ALPN: &[u8] = b"rusm/1";

/// Building a TLS configuration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The trust anchor holds no usable root certificate (empty, or not a valid certificate).
    #[error("trust anchor has no usable root certificate: {0}")]
    BadTrust(String),
    /// rustls refused the identity or the verifier (for example a key that does not match the
    /// certificate, or an unparsable CRL).
    #[error("TLS configuration refused: {0}")]
    Rustls(String),
}

/// The crypto provider every config is built with (ring).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(trust: &TrustAnchor) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(trust.roots().iter().cloned());
    if added == 0 {
        return Err(TlsError::BadTrust(format!(
            "{} certificate(s) given, none parsable",
            trust.roots().len()
        )));
    }
    Ok(Arc::new(store))
}

fn rustls_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Rustls(e.to_string())
}

/// The trust a node's TLS configs verify peers against, changeable while the node runs
/// ([`LiveTrust::set`]): every handshake after the change uses the new roots and CRLs, on every
/// backend, since the verifiers in the configs read it at each handshake.
pub struct LiveTrust {
    state: RwLock<Verifiers>,
}

struct Verifiers {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<dyn ServerCertVerifier>,
    trust: TrustAnchor,
}

impl std::fmt::Debug for LiveTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTrust").finish_non_exhaustive()
    }
}

fn verifiers(trust: &TrustAnchor) -> Result<Verifiers, TlsError> {
    let provider = crypto_provider();
    let client = WebPkiClientVerifier::builder_with_provider(roots(trust)?, provider.clone())
        .with_crls(trust.crls().iter().cloned())
        .only_check_end_entity_revocation()
        .build()
        .map_err(rustls_err)?;
    let server = WebPkiServerVerifier::builder_with_provider(roots(trust)?, provider)
        .with_crls(trust.crls().iter().cloned())
        .only_check_end_entity_revocation()
        .build()
        .map_err(rustls_err)?;
    Ok(Verifiers {
        client,
        server,
        trust: trust.clone(),
    })
}

impl LiveTrust {
    /// Trust in `trust` (roots and CRLs), until [`set`](Self::set).
    pub fn new(trust: &TrustAnchor) -> Result<Arc<LiveTrust>, TlsError> {
        Ok(Arc::new(LiveTrust {
            state: RwLock::new(verifiers(trust)?),
        }))
    }

    /// Trusts `trust` from now on (new handshakes); the old trust stays if `trust` is unusable.
    pub fn set(&self, trust: &TrustAnchor) -> Result<(), TlsError> {
        let v = verifiers(trust)?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = v;
        Ok(())
    }

    /// The trust in force.
    pub fn trust(&self) -> TrustAnchor {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .trust
            .clone()
    }

    fn client(&self) -> Arc<dyn ClientCertVerifier> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .client
            .clone()
    }

    fn server(&self) -> Arc<dyn ServerCertVerifier> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .server
            .clone()
    }

    /// Checks a peer's leaf certificate (one presented in an earlier handshake) against the
    /// trust in force: chain and revocation. The reason when it no longer passes.
    pub fn check_peer(&self, leaf: &CertificateDer<'_>) -> Result<(), String> {
        self.client()
            .verify_client_cert(leaf, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The client-certificate verifier of a server config: the [`LiveTrust`]'s, at each handshake.
#[derive(Debug)]
struct LiveClientVerifier(Arc<LiveTrust>);

impl ClientCertVerifier for LiveClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; with one certificate per node there is nothing to choose.
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .client()
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.client().supported_verify_schemes()
    }
}

/// The server-certificate verifier of a client config: the [`LiveTrust`]'s, at each handshake.
#[derive(Debug)]
struct LiveServerVerifier(Arc<LiveTrust>);

impl ServerCertVerifier for LiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.server().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.server().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.server().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.server().supported_verify_schemes()
    }
}

/// The server side: requires a client certificate chaining to `trust` and not revoked by its
/// CRLs, presents `identity`.
pub fn server_config(
    identity: &Identity,
    trust: &TrustAnchor,
) -> Result<rustls::ServerConfig, TlsError> {
    server_config_live(identity, &LiveTrust::new(trust)?)
}

/// [`server_config`] verifying against a [`LiveTrust`], which may change while it is in use.
pub fn server_config_live(
    identity: &Identity,
    trust: &Arc<LiveTrust>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = crypto_provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .with_client_cert_verifier(Arc::new(LiveClientVerifier(trust.clone())))
        .with_single_cert(identity.cert_chain().to_vec(), identity.private_key())
        .map_err(rustls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    // No resumption: a resumed handshake skips the client certificate check, so a peer revoked
    // since (see `LiveTrust::set`) could come back on an old ticket.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}

/// The client side: verifies the server's chain against `trust` (with CRLs) and its name against
/// the server name dialled, presents `identity`.
pub fn client_config(
    identity: &Identity,
    trust: &TrustAnchor,
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_live(identity, &LiveTrust::new(trust)?)
}

/// [`client_config`] verifying against a [`LiveTrust`], which may change while it is in use.
pub fn client_config_live(
    identity: &Identity,
    trust: &Arc<LiveTrust>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LiveServerVerifier(trust.clone())))
        .with_client_auth_cert(identity.cert_chain().to_vec(), identity.private_key())
        .map_err(rustls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    // No resumption (see the server side): every handshake checks the certificates afresh.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The TLS server name to dial `peer` by: its node name for CA-issued identities (so TLS itself
/// checks that the listener is the node we meant), the shared name for a shared identity.
pub fn server_name_for<'a>(own: &Identity, peer: &'a NodeName) -> &'a str {
    match own.kind() {
        IdentityKind::Shared => SHARED_IDENTITY_NAME,
        _ => peer.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ClusterCa;

    #[test]
    fn configs_build_for_issued_and_shared_identities() {
        let ca = ClusterCa::generate("t").unwrap();
        let id = ca.issue("a").unwrap();
        let s = server_config(&id, &ca.trust()).unwrap();
        assert_eq!(s.alpn_protocols, vec![ALPN.to_vec()]);
        client_config(&id, &ca.trust()).unwrap();
        let shared = Identity::generate().unwrap();
        let trust = shared.shared_trust().unwrap();
        server_config(&shared, &trust).unwrap();
        client_config(&shared, &trust).unwrap();
    }

    #[test]
    fn live_trust_follows_its_changes() {
        let mut ca = ClusterCa::generate("t").unwrap();
        let a = ca.issue("a").unwrap();
        let live = LiveTrust::new(&ca.trust()).unwrap();
        assert_eq!(live.check_peer(&a.cert_chain()[0]), Ok(()));
        ca.revoke(a.serial());
        live.set(&ca.trust()).unwrap();
        let why = live.check_peer(&a.cert_chain()[0]).unwrap_err();
        assert!(why.contains("Revoked"), "{why}");
        // Another CA altogether.
        let other = ClusterCa::generate("t").unwrap();
        live.set(&other.trust()).unwrap();
        assert!(live.check_peer(&a.cert_chain()[0]).is_err());
        // An unusable trust leaves the old one in force.
        assert!(live.set(&TrustAnchor::default()).is_err());
        assert_eq!(live.trust().roots(), other.trust().roots());
    }

    #[test]
    fn empty_trust_is_refused() {
        let ca = ClusterCa::generate("t").unwrap();
        let id = ca.issue("a").unwrap();
        assert!(matches!(
            server_config(&id, &TrustAnchor::default()),
            Err(TlsError::BadTrust(_))
        ));
    }
}
