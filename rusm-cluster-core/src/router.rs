//! One control-frame router, sans-IO. The protocols built on links — registry gossip,
//! request/reply, monitors, attach — are *capabilities*: each has a name, is announced in the
//! hello and welcome, and rides on the link's control stream in
//! [`Frame::Capability`](crate::wire::Frame::Capability) frames that the link itself never
//! looks into. A link uses the capabilities both of its ends announced, so a node with a new
//! capability still links with an older one (which simply does not get those frames), instead of
//! the new frame breaking the older node's protocol.
//!
//! A frame for a capability that is not common to both ends — the peer sends what it never
//! announced, or what this node does not have — closes that link with a [`RouteError`]; other
//! links are not disturbed.

use std::collections::BTreeMap;

use crate::wire::{RejectReason, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Why a capability frame could not be routed (the link is then closed with it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The peer sent a frame of a capability it did not announce in its hello or welcome.
    #[error("frame for capability {0:?}, which the peer did not announce")]
    NotAnnounced(String),
    /// The peer sent a frame of a capability this node does not have (and so did not announce).
    #[error("frame for capability {0:?}, which this node does not have")]
    NotOurs(String),
}

/// The newest protocol version both ends speak, given the peer's range (`min` absent: the
/// peer speaks `max` alone).
pub fn negotiate_version(min: Option<u32>, max: u32) -> Result<u32, RejectReason> {
    let min = min.unwrap_or(max);
    let version = max.min(PROTOCOL_VERSION);
    if min > max || version < min.max(MIN_PROTOCOL_VERSION) {
        return Err(RejectReason::UnsupportedProtocol {
            ours: PROTOCOL_VERSION,
            theirs: max,
        });
    }
    Ok(version)
}

/// What one link may use: the capabilities both ends announced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkCapabilities {
    common: Vec<String>,
    peer: Vec<String>,
}

impl LinkCapabilities {
    /// The capabilities of a link whose peer announced `peer`, when this node has `ours`.
    pub fn negotiate(ours: &[String], peer: &[String]) -> Self {
        let mut common: Vec<String> = ours.iter().filter(|c| peer.contains(c)).cloned().collect();
        common.sort();
        common.dedup();
        LinkCapabilities {
            common,
            peer: peer.to_vec(),
        }
    }

    /// The capabilities both ends announced, sorted.
    pub fn common(&self) -> &[String] {
        &self.common
    }

    /// Whether frames of `capability` may travel on this link.
    pub fn allows(&self, capability: &str) -> bool {
        self.common.iter().any(|c| c == capability)
    }
}

/// The capabilities a node has, each with its handler `H` (the runtime's).
#[derive(Debug)]
pub struct Router<H> {
    handlers: BTreeMap<String, H>,
}

impl<H> Default for Router<H> {
    fn default() -> Self {
        Router {
            handlers: BTreeMap::new(),
        }
    }
}

impl<H> Router<H> {
    /// A router with no capabilities.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a capability; `false` (and nothing changes) if one of that name is registered.
    pub fn register(&mut self, name: &str, handler: H) -> bool {
        if self.handlers.contains_key(name) {
            return false;
        }
        self.handlers.insert(name.to_string(), handler);
        true
    }

    /// The names to announce in a hello or welcome, sorted.
    pub fn names(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    /// The handlers of the capabilities a link uses (to tell them it went up or down).
    pub fn on_link<'a>(&'a self, link: &'a LinkCapabilities) -> impl Iterator<Item = &'a H> + 'a {
        link.common.iter().filter_map(|c| self.handlers.get(c))
    }

    /// The handler for a frame of `capability` that arrived on a link.
    pub fn route(&self, link: &LinkCapabilities, capability: &str) -> Result<&H, RouteError> {
        if !link.peer.iter().any(|c| c == capability) {
            return Err(RouteError::NotAnnounced(capability.to_string()));
        }
        self.handlers
            .get(capability)
            .ok_or_else(|| RouteError::NotOurs(capability.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn versions_meet_at_the_newest_common_one() {
        assert_eq!(
            negotiate_version(None, PROTOCOL_VERSION),
            Ok(PROTOCOL_VERSION)
        );
        // A newer peer that still speaks ours.
        assert_eq!(
            negotiate_version(Some(MIN_PROTOCOL_VERSION), PROTOCOL_VERSION + 5),
            Ok(PROTOCOL_VERSION)
        );
        // A newer peer that dropped ours, an older one we dropped, and nonsense.
        let refused = |theirs| RejectReason::UnsupportedProtocol {
            ours: PROTOCOL_VERSION,
            theirs,
        };
        assert_eq!(
            negotiate_version(Some(PROTOCOL_VERSION + 1), PROTOCOL_VERSION + 2),
            Err(refused(PROTOCOL_VERSION + 2))
        );
        assert_eq!(negotiate_version(None, 0), Err(refused(0)));
        assert_eq!(negotiate_version(Some(9), 3), Err(refused(3)));
    }

    #[test]
    fn a_link_uses_what_both_ends_announced() {
        let link =
            LinkCapabilities::negotiate(&names(&["registry", "rpc"]), &names(&["rpc", "monitors"]));
        assert_eq!(link.common(), names(&["rpc"]));
        assert!(link.allows("rpc"));
        assert!(!link.allows("registry"));
        assert!(!link.allows("monitors"));
    }

    #[test]
    fn frames_route_only_for_common_capabilities() {
        let mut router = Router::new();
        assert!(router.register("rpc", 1));
        assert!(router.register("registry", 2));
        assert!(!router.register("rpc", 3), "a name is registered once");
        assert_eq!(router.names(), names(&["registry", "rpc"]));
        let link = LinkCapabilities::negotiate(&router.names(), &names(&["rpc", "attach"]));
        assert_eq!(router.route(&link, "rpc"), Ok(&1));
        assert_eq!(
            router.route(&link, "registry"),
            Err(RouteError::NotAnnounced("registry".into()))
        );
        assert_eq!(
            router.route(&link, "attach"),
            Err(RouteError::NotOurs("attach".into()))
        );
        assert_eq!(router.on_link(&link).collect::<Vec<_>>(), [&1]);
    }
}
