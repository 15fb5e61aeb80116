//! Process identifiers.

use std::fmt;

use rusm_cluster_core::identity::NodeName;

/// A process identifier: the node it lives on, its number there, and the node's `creation` (a
/// new value each time the node starts), so a pid from a restarted node is recognisably stale.
/// Prints as `<node.id.creation>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid {
    pub(crate) node: NodeName,
    pub(crate) id: u64,
    pub(crate) creation: u64,
}

impl Pid {
    /// The node the process lives on.
    pub fn node(&self) -> &NodeName {
        &self.node
    }
    /// The process's number on its node.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The incarnation of the node the pid was minted by.
    pub fn creation(&self) -> u64 {
        self.creation
    }
}

impl Pid {
    /// The process a global registration names.
    pub(crate) fn of_owner(owner: &rusm_cluster_core::registry::Owner) -> Pid {
        Pid {
            node: owner.node.clone(),
            id: owner.pid,
            creation: owner.creation,
        }
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}.{}.{}>", self.node, self.id, self.creation)
    }
}

impl fmt::Debug for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
