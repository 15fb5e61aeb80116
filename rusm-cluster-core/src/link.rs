//! The per-link handshake, sans-IO: the hello and welcome a node sends, what each side decides
//! on the frame it receives (checked against the peer's verified certificate), and the
//! tie-break when two nodes dial each other at once. The runtime only moves the frames.

use std::net::SocketAddr;

use crate::identity::{NodeName, PeerIdentity};
use crate::router::negotiate_version;
use crate::wire::{
    Frame, Hello, PeerAddr, PreviousLink, RejectReason, Welcome, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

/// What this node says of itself in its hello or welcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalIntro {
    /// This node's name.
    pub name: NodeName,
    /// This node's incarnation.
    pub creation: u64,
    /// Where this node accepts connections.
    pub listen_addr: Option<SocketAddr>,
    /// The capabilities this node offers.
    pub capabilities: Vec<String>,
    /// The largest message payload this node accepts.
    pub max_message_size: u64,
    /// Whether this node uses a shared identity (no name binding).
    pub shared_identity: bool,
    /// Whether this node is hidden (an attach client that never joins the mesh).
    pub hidden: bool,
}

/// The peer as the handshake accepted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIntro {
    /// The peer's name, bound to its certificate (unless identities are shared).
    pub name: NodeName,
    /// The peer's incarnation.
    pub creation: u64,
    /// Where the peer accepts connections.
    pub listen_addr: Option<SocketAddr>,
    /// The peers the peer is linked to.
    pub peers: Vec<PeerAddr>,
    /// The capabilities the peer offers.
    pub capabilities: Vec<String>,
    /// Whether the peer is hidden.
    pub hidden: bool,
    /// The largest message payload the peer accepts.
    pub max_message_size: u64,
    /// The protocol version the link speaks.
    pub protocol: u32,
    /// The link's id (from the hello; 0 if the dialler gave none).
    pub link: u64,
    /// What the peer received over its previous link to this node (see [`EndedLink`]).
    pub previous: Option<PreviousLink>,
}

/// What a node remembers of its last link to a peer once that link went down: how many
/// messages it sent over it (their sends returned `Ok`) and how many of the peer's reached it.
/// On the next link between the same two incarnations, each side tells the other its
/// `reached` ([`PreviousLink`]); what one sent and the other never received was lost in
/// transit when the link failed, and is counted instead of vanishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndedLink {
    /// The link's id.
    pub link: u64,
    /// Messages this node sent over the link: written to it in full, or being written when it
    /// failed (messages queued and never written are not counted here: their sender counts them
    /// lost at once).
    pub sent: u64,
    /// Messages from the peer that reached this node over the link.
    pub reached: u64,
}

impl EndedLink {
    /// What this node tells the peer of the link, in its next hello or welcome.
    pub fn report(&self) -> PreviousLink {
        PreviousLink {
            link: self.link,
            reached: self.reached,
        }
    }

    /// How many of this node's messages over the link never reached the peer, given what the
    /// peer reports of its previous link to us; `None` if its report is not about this link
    /// (it restarted since, or has no memory of it), so the loss cannot be known.
    pub fn lost(&self, theirs: Option<&PreviousLink>) -> Option<u64> {
        theirs
            .filter(|p| p.link == self.link && self.link != 0)
            .map(|p| self.sent.saturating_sub(p.reached))
    }
}

/// How the listener's links stand towards a dialler whose hello was accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkTable {
    /// A link to that peer is up.
    pub linked: bool,
    /// This node is dialling that peer itself.
    pub dialling: bool,
    /// This node is shutting down.
    pub shutting_down: bool,
    /// This node keeps that peer cut off.
    pub blocked: bool,
    /// The link up is to an *earlier incarnation* of the dialler (its `creation` is less than
    /// the hello's): the dialler restarted, and its new link replaces the stale one.
    pub replaceable: bool,
    /// The link up is to a *later incarnation* of the dialler than the hello's: the hello comes
    /// from a stale incarnation, which must not disturb the live link.
    pub superseded: bool,
}

/// What the dialler makes of the listener's answer to its hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialAnswer {
    /// Welcomed by the node dialled: the link is up.
    Up(PeerIntro),
    /// Refused as a duplicate: the peer's own dial to us wins the tie-break, and that link is
    /// (or is about to be) up. Not an error.
    PeerDialWins,
    /// The listener refused us, with its reason.
    Refused(RejectReason),
    /// The answer is wrong (not a welcome, or a welcome that fails our checks): we refuse it.
    Invalid(RejectReason),
}

impl LocalIntro {
    /// The dialler's hello for the link `link`, listing the peers this node is linked to and
    /// what it received over its previous link to the listener.
    pub fn hello(&self, peers: Vec<PeerAddr>, link: u64, previous: Option<PreviousLink>) -> Frame {
        Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            min_protocol: Some(MIN_PROTOCOL_VERSION),
            capabilities: self.capabilities.clone(),
            name: self.name.clone(),
            creation: self.creation,
            listen_addr: self.listen_addr,
            peers,
            hidden: self.hidden,
            max_message_size: self.max_message_size,
            link,
            previous,
        })
    }

    /// The listener's welcome to `peer`, whose hello was accepted, with what the listener
    /// received over its previous link to the dialler.
    pub fn welcome(
        &self,
        peer: &PeerIntro,
        peers: Vec<PeerAddr>,
        previous: Option<PreviousLink>,
    ) -> Frame {
        Frame::Welcome(Welcome {
            protocol: peer.protocol,
            capabilities: self.capabilities.clone(),
            name: self.name.clone(),
            creation: self.creation,
            listen_addr: self.listen_addr,
            peers,
            max_message_size: self.max_message_size,
            previous,
        })
    }

    /// The listener's decision on the first frame of a dialler whose certificate is `peer`:
    /// the peer, or why it is refused (see [`check_hello`]). Then [`admit`] decides, against
    /// the link table, whether this link is the one to keep.
    pub fn on_hello(&self, frame: Frame, peer: &PeerIdentity) -> Result<PeerIntro, RejectReason> {
        let hello = match frame {
            Frame::Hello(h) => h,
            other => {
                return Err(RejectReason::BadHandshake(format!(
                    "expected hello, got {}",
                    other.kind()
                )))
            }
        };
        let protocol = check_hello(&hello, peer, &self.name, self.shared_identity)?;
        Ok(PeerIntro {
            name: hello.name,
            creation: hello.creation,
            listen_addr: hello.listen_addr,
            peers: hello.peers,
            capabilities: hello.capabilities,
            hidden: hello.hidden,
            max_message_size: hello.max_message_size,
            protocol,
            link: hello.link,
            previous: hello.previous,
        })
    }

    /// The dialler's decision on the listener's answer to its hello, having dialled `dialled`
    /// and been shown certificate `peer`.
    pub fn on_answer(&self, frame: Frame, dialled: &NodeName, peer: &PeerIdentity) -> DialAnswer {
        let welcome = match frame {
            Frame::Welcome(w) => w,
            Frame::Reject(RejectReason::DuplicateLink) => return DialAnswer::PeerDialWins,
            Frame::Reject(reason) => return DialAnswer::Refused(reason),
            other => {
                return DialAnswer::Invalid(RejectReason::BadHandshake(format!(
                    "expected welcome, got {}",
                    other.kind()
                )))
            }
        };
        if let Err(reason) =
            check_welcome(&welcome, peer, dialled, &self.name, self.shared_identity)
        {
            return DialAnswer::Invalid(reason);
        }
        DialAnswer::Up(PeerIntro {
            name: welcome.name,
            creation: welcome.creation,
            listen_addr: welcome.listen_addr,
            peers: welcome.peers,
            capabilities: welcome.capabilities,
            hidden: false,
            max_message_size: welcome.max_message_size,
            protocol: welcome.protocol,
            link: 0,
            previous: welcome.previous,
        })
    }
}

/// Whether the listener keeps the link a dialler `peer` brings (its hello already accepted),
/// given how its own links to that peer stand. Two nodes dialling each other at once both keep
/// the dial of the node with the smaller name (see [`own_dial_wins`]).
pub fn admit(local: &NodeName, peer: &NodeName, table: LinkTable) -> Result<(), RejectReason> {
    if table.shutting_down {
        return Err(RejectReason::ShuttingDown);
    }
    if table.blocked {
        return Err(RejectReason::Blocked);
    }
    if table.linked && table.superseded {
        return Err(RejectReason::StaleIncarnation);
    }
    if (table.linked && !table.replaceable) || (table.dialling && own_dial_wins(local, peer)) {
        return Err(RejectReason::DuplicateLink);
    }
    Ok(())
}

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
            link: 0,
            previous: None,
        }
    }

    #[test]
    fn an_ended_link_is_settled_only_with_a_report_on_it() {
        let ended = EndedLink {
            link: 42,
            sent: 1_000,
            reached: 7,
        };
        assert_eq!(
            ended.report(),
            PreviousLink {
                link: 42,
                reached: 7
            }
        );
        // The peer received 990 of the 1,000: 10 were lost in transit.
        let theirs = PreviousLink {
            link: 42,
            reached: 990,
        };
        assert_eq!(ended.lost(Some(&theirs)), Some(10));
        // A report on another link (the peer restarted, or links crossed): unknown.
        let other = PreviousLink {
            link: 41,
            reached: 990,
        };
        assert_eq!(ended.lost(Some(&other)), None);
        assert_eq!(ended.lost(None), None);
        // A peer claiming more than was sent loses nothing (and cannot underflow).
        let bogus = PreviousLink {
            link: 42,
            reached: u64::MAX,
        };
        assert_eq!(ended.lost(Some(&bogus)), Some(0));
        // A link without an id (an old dialler) is never settled.
        let unnamed = EndedLink { link: 0, ..ended };
        let zero = PreviousLink {
            link: 0,
            reached: 0,
        };
        assert_eq!(unnamed.lost(Some(&zero)), None);
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

    fn intro(name: &str) -> LocalIntro {
        LocalIntro {
            name: NodeName::new(name).unwrap(),
            creation: 7,
            listen_addr: None,
            capabilities: vec!["rpc".into()],
            max_message_size: 1 << 20,
            shared_identity: false,
            hidden: false,
        }
    }

    #[test]
    fn a_hello_and_its_welcome_bring_both_sides_up() {
        let ca = ClusterCa::generate("t").unwrap();
        let (london, paris) = (intro("london"), intro("paris"));
        let paris_cert = peer_of(&ca.issue("paris").unwrap());
        let london_cert = peer_of(&ca.issue("london").unwrap());
        let seen = london
            .on_hello(paris.hello(vec![], 7, None), &paris_cert)
            .unwrap();
        assert_eq!(seen.name.as_str(), "paris");
        assert_eq!(seen.capabilities, ["rpc"]);
        assert_eq!(seen.protocol, PROTOCOL_VERSION);
        let answer = paris.on_answer(
            london.welcome(&seen, vec![], None),
            &london.name,
            &london_cert,
        );
        let DialAnswer::Up(up) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(up.name.as_str(), "london");
        assert_eq!(up.creation, 7);
    }

    #[test]
    fn wrong_first_frames_and_wrong_answers_are_refused() {
        let ca = ClusterCa::generate("t").unwrap();
        let (london, paris) = (intro("london"), intro("paris"));
        let paris_cert = peer_of(&ca.issue("paris").unwrap());
        let london_cert = peer_of(&ca.issue("london").unwrap());
        let goodbye = Frame::Goodbye {
            reason: "x".into(),
            streams: 0,
        };
        assert_eq!(
            london.on_hello(goodbye.clone(), &paris_cert),
            Err(RejectReason::BadHandshake(
                "expected hello, got goodbye".into()
            ))
        );
        assert_eq!(
            paris.on_answer(goodbye, &london.name, &london_cert),
            DialAnswer::Invalid(RejectReason::BadHandshake(
                "expected welcome, got goodbye".into()
            ))
        );
        assert_eq!(
            paris.on_answer(
                Frame::Reject(RejectReason::DuplicateLink),
                &london.name,
                &london_cert
            ),
            DialAnswer::PeerDialWins
        );
        assert_eq!(
            paris.on_answer(
                Frame::Reject(RejectReason::SameName),
                &london.name,
                &london_cert
            ),
            DialAnswer::Refused(RejectReason::SameName)
        );
        // A welcome from someone other than the node dialled.
        let rome = intro("rome");
        let seen = rome
            .on_hello(paris.hello(vec![], 7, None), &paris_cert)
            .unwrap();
        assert!(matches!(
            paris.on_answer(
                rome.welcome(&seen, vec![], None),
                &london.name,
                &london_cert
            ),
            DialAnswer::Invalid(RejectReason::NameMismatch { .. })
        ));
    }

    #[test]
    fn the_link_table_decides_which_dial_stays() {
        let (a, b) = (NodeName::new("a").unwrap(), NodeName::new("b").unwrap());
        let free = LinkTable::default();
        assert_eq!(admit(&a, &b, free), Ok(()));
        let linked = LinkTable {
            linked: true,
            ..free
        };
        assert_eq!(admit(&a, &b, linked), Err(RejectReason::DuplicateLink));
        let dialling = LinkTable {
            dialling: true,
            ..free
        };
        // Both dial at once: a's dial wins on both sides, so a refuses b's and b admits a's.
        assert_eq!(admit(&a, &b, dialling), Err(RejectReason::DuplicateLink));
        assert_eq!(admit(&b, &a, dialling), Ok(()));
        let closing = LinkTable {
            shutting_down: true,
            ..free
        };
        assert_eq!(admit(&a, &b, closing), Err(RejectReason::ShuttingDown));
        let blocked = LinkTable {
            blocked: true,
            ..free
        };
        assert_eq!(admit(&a, &b, blocked), Err(RejectReason::Blocked));
        // A restarted dialler's hello replaces the stale link; anything else does not.
        let restarted = LinkTable {
            linked: true,
            replaceable: true,
            ..free
        };
        assert_eq!(admit(&a, &b, restarted), Ok(()));
        let stale = LinkTable {
            linked: true,
            superseded: true,
            ..free
        };
        assert_eq!(admit(&a, &b, stale), Err(RejectReason::StaleIncarnation));
    }

    #[test]
    fn tie_break_picks_exactly_one_dial() {
        let a = NodeName::new("a").unwrap();
        let b = NodeName::new("b").unwrap();
        assert!(own_dial_wins(&a, &b) != own_dial_wins(&b, &a));
    }
}
