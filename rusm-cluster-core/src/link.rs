//! The per-link handshake, sans-IO: checking a peer's hello or welcome against its verified
//! certificate, and the tie-break when two nodes dial each other at once.

use crate::identity::{NodeName, PeerIdentity};
use crate::router::negotiate_version;
use crate::wire::{Hello, RejectReason, Welcome, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// What the listener checks before it welcomes a dialler, giving the protocol version the link
/// will speak:
/// - the two ends speak a common protocol version (the newest common one is used);
/// - the dialler does not claim our own name;
/// - the name in the hello is one its certificate is valid for (with CA-issued identities), so no
///   node can claim another's name. With a shared identity there is no binding to check, but both
///   sides must use one.
pub fn check_hello(
    hello: &Hello,
    peer: &PeerIdentity,
    local: &NodeName,
    local_shared: bool,
) -> Result<u32, RejectReason> {
    let version = negotiate_version(hello.min_protocol, hello.protocol)?;
    check_name(&hello.name, peer, local, local_shared)?;
    Ok(version)
}

/// What the dialler checks in the listener's welcome: the version it chose is one we speak, and
/// that the listener is the
/// node we dialled (TLS already checked the certificate against the name we dialled; this catches
/// a welcome that names someone else).
pub fn check_welcome(
    welcome: &Welcome,
    peer: &PeerIdentity,
    dialled: &NodeName,
    local: &NodeName,
    local_shared: bool,
) -> Result<(), RejectReason> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&welcome.protocol) {
        return Err(RejectReason::UnsupportedProtocol {
            ours: PROTOCOL_VERSION,
            theirs: welcome.protocol,
        });
    }
    if &welcome.name != dialled {
        return Err(RejectReason::NameMismatch {
            claimed: welcome.name.to_string(),
            certified: vec![dialled.to_string()],
        });
    }
    check_name(&welcome.name, peer, local, local_shared)
}

fn check_name(
    claimed: &NodeName,
    peer: &PeerIdentity,
    local: &NodeName,
    local_shared: bool,
) -> Result<(), RejectReason> {
    if claimed == local {
        return Err(RejectReason::SameName);
    }
    if local_shared != peer.is_shared() {
        return Err(RejectReason::IdentityModeMismatch);
    }
    if !local_shared && !peer.is_bound_to(claimed) {
        return Err(RejectReason::NameMismatch {
            claimed: claimed.to_string(),
            certified: peer.dns_names.clone(),
        });
    }
    Ok(())
}

/// When `local` and `peer` dial each other at once, both must keep the same one link. As in
/// distributed Erlang, the names decide: the link dialled by the node with the smaller name
/// survives. Returns whether `local`'s own dial is the survivor.
pub fn own_dial_wins(local: &NodeName, peer: &NodeName) -> bool {
    local < peer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ClusterCa, Identity};

    fn hello(name: &str, protocol: u32) -> Hello {
        Hello {
            protocol,
            min_protocol: None,
            capabilities: vec![],
            name: NodeName::new(name).unwrap(),
            creation: 1,
            listen_addr: None,
            peers: vec![],
            hidden: false,
            max_message_size: 1024,
        }
    }

    fn peer_of(id: &Identity) -> PeerIdentity {
        PeerIdentity::from_leaf(id.cert_chain()[0].clone()).unwrap()
    }

    #[test]
    fn hello_is_checked_against_the_certificate() {
        let ca = ClusterCa::generate("t").unwrap();
        let paris = peer_of(&ca.issue("paris").unwrap());
        let mallory = peer_of(&ca.issue("mallory").unwrap());
        let london = NodeName::new("london").unwrap();
        assert_eq!(
            check_hello(&hello("paris", PROTOCOL_VERSION), &paris, &london, false),
            Ok(PROTOCOL_VERSION)
        );
        assert_eq!(
            check_hello(&hello("paris", PROTOCOL_VERSION), &mallory, &london, false),
            Err(RejectReason::NameMismatch {
                claimed: "paris".into(),
                certified: vec!["mallory".into()]
            })
        );
        assert!(matches!(
            check_hello(&hello("paris", 99), &paris, &london, false),
            Err(RejectReason::UnsupportedProtocol { theirs: 99, .. })
        ));
        let fake_london = peer_of(&ca.issue("london").unwrap());
        assert_eq!(
            check_hello(
                &hello("london", PROTOCOL_VERSION),
                &fake_london,
                &london,
                false
            ),
            Err(RejectReason::SameName)
        );
    }

    #[test]
    fn shared_identity_has_no_binding_but_modes_must_match() {
        let shared = peer_of(&Identity::generate().unwrap());
        let london = NodeName::new("london").unwrap();
        assert_eq!(
            check_hello(&hello("anyone", PROTOCOL_VERSION), &shared, &london, true),
            Ok(PROTOCOL_VERSION)
        );
        assert_eq!(
            check_hello(&hello("anyone", PROTOCOL_VERSION), &shared, &london, false),
            Err(RejectReason::IdentityModeMismatch)
        );
    }

    #[test]
    fn tie_break_picks_exactly_one_dial() {
        let a = NodeName::new("a").unwrap();
        let b = NodeName::new("b").unwrap();
        assert!(own_dial_wins(&a, &b) != own_dial_wins(&b, &a));
    }
}
