//! Who a node is and whom it trusts: [`NodeName`], [`Identity`], [`ClusterCa`], [`TrustAnchor`]
//! and the [`PeerIdentity`] read from a verified peer certificate.
//!
//! Two ways to secure a cluster:
//! - **Per-node certificates** (recommended): a [`ClusterCa`] issues each node its own key and a
//!   certificate whose DNS SAN is the node's name. A node cannot claim another's name, and one
//!   node can be revoked without touching the others.
//! - **One shared identity** ([`Identity::generate`]): every node holds the same key and
//!   certificate. Only for a small cluster whose members trust each other fully: there is **no
//!   name binding** (any holder of the key can claim any name) and no per-node revocation.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The DNS name carried by a shared identity's certificate ([`Identity::generate`]). Nodes with a
/// shared identity dial each other under this name.
pub const SHARED_IDENTITY_NAME: &str = "shared.rusm.cluster";

/// The longest node name accepted (a DNS name's limit).
pub const MAX_NODE_NAME_LEN: usize = 253;

/// Errors about names, certificates and keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The node name is empty, too long, or has characters outside `a-z 0-9 - .`; node names
    /// become DNS names in certificates, so they follow DNS rules (lowercase only).
    #[error("invalid node name {name:?}: {why}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Generating or signing a key or certificate failed (rcgen).
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM or DER input could not be parsed (a wrong or corrupt file).
    #[error("could not parse {what}: {why}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// The parser's complaint.
        why: String,
    },
    /// Reading or writing a PEM file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn parse_err(what: &'static str, why: impl fmt::Display) -> IdentityError {
    IdentityError::Parse {
        what,
        why: why.to_string(),
    }
}

/// A validated node name: 1 to 253 characters of `a-z`, `0-9`, `-` and `.`, starting and ending
/// with a letter or digit. It is the DNS SAN of the node's certificate and the TLS server name
/// others dial it by. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(Arc<str>);

impl NodeName {
    /// Validates `name`.
    ///
    /// ```
    /// use rusm_cluster_core::identity::NodeName;
    /// assert!(NodeName::new("london").is_ok());
    /// assert!(NodeName::new("London").is_err()); // DNS names here are lowercase
    /// ```
    pub fn new(name: impl AsRef<str>) -> Result<Self, IdentityError> {
        let name = name.as_ref();
        let bad = |why| IdentityError::InvalidName {
            name: name.chars().take(64).collect(),
            why,
        };
        if name.is_empty() {
            return Err(bad("empty"));
        }
        if name.len() > MAX_NODE_NAME_LEN {
            return Err(bad("longer than 253 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(bad("only a-z, 0-9, '-' and '.' are allowed"));
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(bad("each dot-separated part must have 1 to 63 characters"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad("a part may not start or end with '-'"));
            }
        }
        Ok(NodeName(name.into()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeName {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeName::new(s)
    }
}
impl TryFrom<&str> for NodeName {
    type Error = IdentityError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        NodeName::new(s)
    }
}
impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0.to_string()
    }
}
impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}
impl AsRef<str> for NodeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
impl PartialEq<str> for NodeName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}
impl PartialEq<&str> for NodeName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

/// A certificate serial number, as its big-endian bytes. Printed in hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// The serial's big-endian bytes (as in the certificate, without a sign byte).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Parses a serial printed by `Display` (hex, `:` separators allowed).
    pub fn from_hex(s: &str) -> Result<Self, IdentityError> {
        let digits: String = s.chars().filter(|c| *c != ':').collect();
        if digits.is_empty() || !digits.len().is_multiple_of(2) {
            return Err(parse_err("serial", "expected an even number of hex digits"));
        }
        let bytes = (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| parse_err("serial", e))?;
        Ok(Serial(strip_sign(bytes)))
    }
}

fn strip_sign(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.len() > 1 && bytes[0] == 0 {
        bytes.remove(0);
    }
    bytes
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

/// Which kind of identity a node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityKind {
    /// A CA-issued certificate bound to one node name.
    Node(NodeName),
    /// A shared identity, held by every node of a small trusted cluster (no name binding).
    Shared,
}

/// A node's certificate chain and private key.
///
/// Made by [`ClusterCa::issue`] (one per node, bound to its name) or [`Identity::generate`] (one
/// shared by all nodes). Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Arc<Vec<u8>>,
    kind: IdentityKind,
    serial: Serial,
    /// For a shared identity: the self-signed root it was issued under, which is its trust.
    shared_root: Option<CertificateDer<'static>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("kind", &self.kind)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Generates one identity to be shared by every node of a small, fully trusted cluster.
    ///
    /// Its certificate is issued by a throwaway root that [`Identity::shared_trust`] returns.
    /// **No name binding:** every node holds the same key, so any of them can claim any node
    /// name; use [`ClusterCa`] when that matters.
    ///
    /// ```
    /// let id = rusm_cluster_core::identity::Identity::generate().unwrap();
    /// assert!(id.shared_trust().is_some());
    /// ```
    pub fn generate() -> Result<Identity, IdentityError> {
        let ca = ClusterCa::generate("rusm-shared")?;
        let (chain, key, serial) = ca.issue_cert(SHARED_IDENTITY_NAME)?;
        Ok(Identity {
            chain,
            key_pkcs8: Arc::new(key),
            kind: IdentityKind::Shared,
            serial,
            shared_root: Some(ca.cert_der.clone()),
        })
    }

    /// Which kind of identity this is.
    pub fn kind(&self) -> &IdentityKind {
        &self.kind
    }

    /// The node name this identity is bound to (`None` for a shared identity).
    pub fn node_name(&self) -> Option<&NodeName> {
        match &self.kind {
            IdentityKind::Node(n) => Some(n),
            IdentityKind::Shared => None,
        }
    }

    /// The serial of the leaf certificate (what [`ClusterCa::revoke`] takes).
    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// The trust anchor of a shared identity (its own root); `None` for a CA-issued identity,
    /// whose trust comes from [`ClusterCa::trust`].
    pub fn shared_trust(&self) -> Option<TrustAnchor> {
        self.shared_root.as_ref().map(|root| TrustAnchor {
            roots: vec![root.clone()],
            crls: Vec::new(),
        })
    }

    /// The certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key (PKCS#8).
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_pkcs8.as_slice().to_vec().into())
    }

    /// The certificate chain as PEM (leaf first; a shared identity appends its root).
    pub fn cert_pem(&self) -> String {
        let mut out = String::new();
        for c in self.chain.iter().chain(self.shared_root.iter()) {
            out.push_str(&pem_encode("CERTIFICATE", c));
        }
        out
    }

    /// The private key as PEM. Keep it secret.
    pub fn key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.key_pkcs8)
    }

    /// Loads an identity from the PEM written by [`Identity::cert_pem`] and
    /// [`Identity::key_pem`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Identity, IdentityError> {
        let mut certs = pem_decode_all(cert_pem, "CERTIFICATE")?;
        if certs.is_empty() {
            return Err(parse_err("certificate PEM", "no CERTIFICATE block"));
        }
        let key = pem_decode_all(key_pem, "PRIVATE KEY")?
            .pop()
            .ok_or_else(|| parse_err("key PEM", "no PRIVATE KEY block"))?;
        let leaf = PeerIdentity::from_leaf(CertificateDer::from(certs[0].clone()))
            .map_err(|e| parse_err("certificate", e))?;
        let (kind, shared_root) = if leaf.dns_names.iter().any(|n| n == SHARED_IDENTITY_NAME) {
            let root = (certs.len() > 1).then(|| CertificateDer::from(certs.remove(1)));
            (IdentityKind::Shared, root)
        } else {
            let name = leaf
                .dns_names
                .first()
                .ok_or_else(|| parse_err("certificate", "no DNS name in the certificate"))?;
            (IdentityKind::Node(NodeName::new(name)?), None)
        };
        Ok(Identity {
            chain: certs.into_iter().map(CertificateDer::from).collect(),
            key_pkcs8: Arc::new(key),
            kind,
            serial: leaf.serial,
            shared_root,
        })
    }

    /// Writes `<dir>/<stem>.pem` (certificates) and `<dir>/<stem>.key` (the private key). On
    /// unix the key file is readable by its owner only (mode 0600) from the moment it is created,
    /// and an existing key file is narrowed to 0600 before the key is written into it.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<(), IdentityError> {
        write_file(&dir.join(format!("{stem}.pem")), &self.cert_pem())?;
        write_secret_file(&dir.join(format!("{stem}.key")), &self.key_pem())
    }

    /// Reads what [`Identity::save`] wrote.
    pub fn load(dir: &Path, stem: &str) -> Result<Identity, IdentityError> {
        let cert = read_file(&dir.join(format!("{stem}.pem")))?;
        let key = read_file(&dir.join(format!("{stem}.key")))?;
        Identity::from_pem(&cert, &key)
    }
}

/// What a node trusts: the cluster's root certificate(s) and the revocation lists (CRLs).
#[derive(Clone, Debug, Default)]
pub struct TrustAnchor {
    roots: Vec<CertificateDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl TrustAnchor {
    /// A trust anchor from a root certificate in PEM (for example `ca.pem`).
    pub fn from_pem(ca_pem: &str) -> Result<TrustAnchor, IdentityError> {
        let roots: Vec<_> = pem_decode_all(ca_pem, "CERTIFICATE")?
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        if roots.is_empty() {
            return Err(parse_err("CA PEM", "no CERTIFICATE block"));
        }
        Ok(TrustAnchor {
            roots,
            crls: Vec::new(),
        })
    }

    /// Adds a CRL in PEM (for example `crl.pem` from [`ClusterCa::save`]).
    pub fn with_crl_pem(mut self, crl_pem: &str) -> Result<TrustAnchor, IdentityError> {
        for der in pem_decode_all(crl_pem, "X509 CRL")? {
            self.crls.push(der.into());
        }
        Ok(self)
    }

    /// The root certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The revocation lists.
    pub fn crls(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.crls
    }
}

/// The verified identity of a peer, read from the leaf certificate it presented in the TLS
/// handshake (after the chain was checked against the [`TrustAnchor`]).
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    /// The DNS names (SANs) of the peer's certificate.
    pub dns_names: Vec<String>,
    /// The serial number of the peer's certificate.
    pub serial: Serial,
    /// The peer's leaf certificate.
    pub leaf: CertificateDer<'static>,
}

impl PeerIdentity {
    /// Reads names and serial from a leaf certificate.
    pub fn from_leaf(leaf: CertificateDer<'static>) -> Result<PeerIdentity, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
            .map_err(|e| parse_err("peer certificate", e))?;
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(n) = name {
                    dns_names.push((*n).to_string());
                }
            }
        }
        let serial = Serial(strip_sign(cert.raw_serial().to_vec()));
        Ok(PeerIdentity {
            dns_names,
            serial,
            leaf,
        })
    }

    /// Whether this is a shared identity's certificate ([`Identity::generate`]).
    pub fn is_shared(&self) -> bool {
        self.dns_names.iter().any(|n| n == SHARED_IDENTITY_NAME)
    }

    /// Whether the certificate is bound to `name`.
    pub fn is_bound_to(&self, name: &NodeName) -> bool {
        self.dns_names.iter().any(|n| n == name.as_str())
    }
}

/// A cluster's certificate authority: issues one certificate per node, revokes them, and
/// publishes the CRL.
///
/// ```
/// use rusm_cluster_core::identity::ClusterCa;
/// let mut ca = ClusterCa::generate("demo").unwrap();
/// let london = ca.issue("london").unwrap();
/// assert_eq!(london.node_name().unwrap().as_str(), "london");
/// ca.revoke(london.serial());
/// assert_eq!(ca.revoked().len(), 1);
/// ```
pub struct ClusterCa {
    cluster: String,
    key: KeyPair,
    /// The CA certificate as rcgen holds it, for signing.
    signer: rcgen::Certificate,
    /// The CA certificate as distributed (what nodes trust).
    cert_der: CertificateDer<'static>,
    revoked: Mutex<Vec<(Serial, OffsetDateTime)>>,
    crl_number: AtomicU32,
    serial_counter: AtomicU32,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Generates a new CA (P-256 key) for the cluster called `cluster`.
    pub fn generate(cluster: &str) -> Result<ClusterCa, IdentityError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{cluster} cluster CA"));
        dn.push(DnType::OrganizationName, "rusm-cluster");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.serial_number = Some(SerialNumber::from_slice(&fresh_serial(0)));
        let signer = p.self_signed(&key)?;
        Ok(ClusterCa {
            cluster: cluster.to_string(),
            cert_der: signer.der().clone(),
            signer,
            key,
            revoked: Mutex::new(Vec::new()),
            crl_number: AtomicU32::new(1),
            serial_counter: AtomicU32::new(1),
        })
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Issues a certificate and fresh key for node `name` (its DNS SAN), usable both to dial
    /// and to accept (ClientAuth + ServerAuth), with a unique serial.
    pub fn issue(&self, name: &str) -> Result<Identity, IdentityError> {
        let name = NodeName::new(name)?;
        let (chain, key, serial) = self.issue_cert(name.as_str())?;
        Ok(Identity {
            chain,
            key_pkcs8: Arc::new(key),
            kind: IdentityKind::Node(name),
            serial,
            shared_root: None,
        })
    }

    fn issue_cert(
        &self,
        dns_name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>, Serial), IdentityError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![dns_name.to_string()])?;
        p.subject_alt_names.push(SanType::URI(
            format!("urn:rusm:{}:node:{dns_name}", uri_safe(&self.cluster))
                .try_into()
                .map_err(|e| parse_err("certificate URI", e))?,
        ));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns_name);
        p.distinguished_name = dn;
        let serial = fresh_serial(self.serial_counter.fetch_add(1, Ordering::Relaxed));
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.signer, &self.key)?;
        Ok((
            vec![cert.der().clone()],
            key.serialize_der(),
            Serial(strip_sign(serial)),
        ))
    }

    /// Revokes the certificate with this serial. Nodes given the new [`ClusterCa::trust`] (or
    /// [`ClusterCa::crl_pem`]) refuse it in the handshake.
    pub fn revoke(&mut self, serial: &Serial) {
        let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        if !revoked.iter().any(|(s, _)| s == serial) {
            revoked.push((serial.clone(), OffsetDateTime::now_utc()));
            self.crl_number.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The serials revoked so far.
    pub fn revoked(&self) -> Vec<Serial> {
        let revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        revoked.iter().map(|(s, _)| s.clone()).collect()
    }

    /// The current CRL, signed by the CA (valid for a year from now).
    pub fn crl(&self) -> Result<CertificateRevocationListDer<'static>, IdentityError> {
        let revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        let now = OffsetDateTime::now_utc();
        let crl = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + time::Duration::days(365),
            crl_number: SerialNumber::from(u64::from(self.crl_number.load(Ordering::Relaxed))),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, at)| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial.as_bytes()),
                    revocation_time: *at,
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.signer, &self.key)?;
        Ok(crl.der().clone())
    }

    /// The current CRL as PEM.
    pub fn crl_pem(&self) -> Result<String, IdentityError> {
        Ok(pem_encode("X509 CRL", &self.crl()?))
    }

    /// What every node of the cluster should trust: this CA and its current CRL.
    pub fn trust(&self) -> TrustAnchor {
        TrustAnchor {
            roots: vec![self.cert_der.clone()],
            // A CRL signed by our own fresh key cannot fail to sign; if it somehow did, the
            // anchor still authenticates (without revocation) and `crl()` reports the error.
            crls: self.crl().into_iter().collect(),
        }
    }

    /// The CA certificate as PEM (safe to distribute).
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// Writes `ca.pem` (certificate), `ca.key` (private key: keep it secret) and `crl.pem` into
    /// `dir`. On unix `ca.key` is readable by its owner only (mode 0600) from the moment it is
    /// created, and an existing `ca.key` is narrowed to 0600 before the key is written into it.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        write_file(&dir.join("ca.pem"), &self.cert_pem())?;
        write_secret_file(&dir.join("ca.key"), &self.key.serialize_pem())?;
        write_file(&dir.join("crl.pem"), &self.crl_pem()?)
    }

    /// Loads a CA written by [`ClusterCa::save`], with its revocations.
    pub fn load(dir: &Path) -> Result<ClusterCa, IdentityError> {
        let cert_pem = read_file(&dir.join("ca.pem"))?;
        let key_pem = read_file(&dir.join("ca.key"))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)?;
        let cluster = params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(|v| match v {
                rcgen::DnValue::Utf8String(s) => Some(s.clone()),
                _ => None,
            })
            .map(|cn| cn.trim_end_matches(" cluster CA").to_string())
            .unwrap_or_default();
        let cert_der = pem_decode_all(&cert_pem, "CERTIFICATE")?
            .pop()
            .ok_or_else(|| parse_err("ca.pem", "no CERTIFICATE block"))?;
        let signer = params.self_signed(&key)?;
        let mut revoked = Vec::new();
        let mut crl_number = 1;
        let crl_path = dir.join("crl.pem");
        if crl_path.exists() {
            for der in pem_decode_all(&read_file(&crl_path)?, "X509 CRL")? {
                let (_, crl) =
                    x509_parser::parse_x509_crl(&der).map_err(|e| parse_err("crl.pem", e))?;
                if let Some(n) = crl.crl_number() {
                    crl_number = u32::try_from(n).unwrap_or(u32::MAX);
                }
                for r in crl.iter_revoked_certificates() {
                    let at = OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                        .unwrap_or_else(|_| OffsetDateTime::now_utc());
                    revoked.push((Serial(strip_sign(r.raw_serial().to_vec())), at));
                }
            }
        }
        Ok(ClusterCa {
            cluster,
            key,
            signer,
            cert_der: cert_der.into(),
            revoked: Mutex::new(revoked),
            crl_number: AtomicU32::new(crl_number),
            serial_counter: AtomicU32::new(1),
        })
    }
}

fn uri_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// A serial unique across issues and across save/load cycles: the time in nanoseconds, then a
/// counter, with the top bit clear so it encodes as a positive integer.
fn fresh_serial(counter: u32) -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&(nanos & (u64::MAX >> 1)).to_be_bytes());
    out.extend_from_slice(&counter.to_be_bytes());
    out
}

fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

fn pem_decode_all(text: &str, tag: &'static str) -> Result<Vec<Vec<u8>>, IdentityError> {
    let blocks = pem::parse_many(text).map_err(|e| parse_err(tag, e))?;
    Ok(blocks
        .into_iter()
        .filter(|p| p.tag() == tag)
        .map(|p| p.into_contents())
        .collect())
}

fn write_file(path: &Path, text: &str) -> Result<(), IdentityError> {
    std::fs::write(path, text).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes a private key: on unix the file is created with mode 0600 (never readable by others,
/// whatever the umask), and a file that already existed is set to 0600 while still empty (it is
/// truncated on opening), before the key goes in.
fn write_secret_file(path: &Path, text: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    let io_err = |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // `mode` applies only to a file it creates: narrow an existing one too.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err)?;
    }
    file.write_all(text.as_bytes()).map_err(io_err)
}

fn read_file(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_dns_rules() {
        for ok in ["a", "london", "eu-west-1", "n1.example"] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "London",
            "a b",
            "-x",
            "x-",
            "a..b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn issued_certificates_carry_name_and_unique_serials() {
        let ca = ClusterCa::generate("t").unwrap();
        let a = ca.issue("a").unwrap();
        let b = ca.issue("b").unwrap();
        assert_ne!(a.serial(), b.serial());
        let peer = PeerIdentity::from_leaf(a.cert_chain()[0].clone()).unwrap();
        assert_eq!(peer.dns_names, vec!["a".to_string()]);
        assert_eq!(&peer.serial, a.serial());
        assert!(peer.is_bound_to(&NodeName::new("a").unwrap()));
        assert!(!peer.is_bound_to(&NodeName::new("b").unwrap()));
    }

    #[test]
    fn ca_and_identity_survive_save_and_load() {
        let dir = std::env::temp_dir().join(format!("rusm-ca-test-{}", std::process::id()));
        let mut ca = ClusterCa::generate("persist").unwrap();
        let a = ca.issue("a").unwrap();
        ca.revoke(a.serial());
        ca.save(&dir).unwrap();
        a.save(&dir, "a").unwrap();
        let loaded = ClusterCa::load(&dir).unwrap();
        assert_eq!(loaded.revoked(), vec![a.serial().clone()]);
        assert_eq!(loaded.cluster(), "persist");
        let b = loaded.issue("b").unwrap();
        assert_ne!(b.serial(), a.serial());
        let a2 = Identity::load(&dir, "a").unwrap();
        assert_eq!(a2.serial(), a.serial());
        assert_eq!(a2.node_name().unwrap().as_str(), "a");
        let shared = Identity::generate().unwrap();
        shared.save(&dir, "shared").unwrap();
        let s2 = Identity::load(&dir, "shared").unwrap();
        assert_eq!(s2.kind(), &IdentityKind::Shared);
        assert!(s2.shared_trust().is_some());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_saved_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = std::env::temp_dir().join(format!("rusm-key-mode-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A key file left world-readable by something else is narrowed when overwritten.
        let stale = dir.join("b.key");
        std::fs::write(&stale, "old").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();

        let ca = ClusterCa::generate("modes").unwrap();
        ca.save(&dir).unwrap();
        ca.issue("a").unwrap().save(&dir, "a").unwrap();
        ca.issue("b").unwrap().save(&dir, "b").unwrap();
        Identity::generate().unwrap().save(&dir, "shared").unwrap();
        for key in ["ca.key", "a.key", "b.key", "shared.key"] {
            assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
        }
        // Certificates and the CRL are public.
        for public in ["ca.pem", "crl.pem", "a.pem"] {
            assert_eq!(mode(&dir.join(public)) & 0o600, 0o600, "{public}");
        }
        assert!(
            Identity::load(&dir, "b").is_ok(),
            "the narrowed file holds the new key"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn serial_hex_round_trips() {
        let ca = ClusterCa::generate("t").unwrap();
        let a = ca.issue("a").unwrap();
        assert_eq!(
            &Serial::from_hex(&a.serial().to_string()).unwrap(),
            a.serial()
        );
        assert!(Serial::from_hex("zz").is_err());
    }
}
