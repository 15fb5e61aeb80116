//! The one TLS policy of the cluster, written once and used by every backend: TLS 1.3 only, ALPN
//! [`ALPN`], mutual authentication against the [`TrustAnchor`] with its CRLs, and an explicit
//! crypto provider (never the process default, which panics when two providers are compiled in).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

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

/// The server side: requires a client certificate chaining to `trust` and not revoked by its
/// CRLs, presents `identity`.
pub fn server_config(
    identity: &Identity,
    trust: &TrustAnchor,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(trust)?, provider.clone())
        .with_crls(trust.crls().iter().cloned())
        .only_check_end_entity_revocation()
        .build()
        .map_err(rustls_err)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain().to_vec(), identity.private_key())
        .map_err(rustls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// The client side: verifies the server's chain against `trust` (with CRLs) and its name against
/// the server name dialled, presents `identity`.
pub fn client_config(
    identity: &Identity,
    trust: &TrustAnchor,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(trust)?, provider.clone())
        .with_crls(trust.crls().iter().cloned())
        .only_check_end_entity_revocation()
        .build()
        .map_err(rustls_err)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain().to_vec(), identity.private_key())
        .map_err(rustls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
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
    fn empty_trust_is_refused() {
        let ca = ClusterCa::generate("t").unwrap();
        let id = ca.issue("a").unwrap();
        assert!(matches!(
            server_config(&id, &TrustAnchor::default()),
            Err(TlsError::BadTrust(_))
        ));
    }
}
