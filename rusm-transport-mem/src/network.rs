//! The process-global in-memory network: which endpoint is bound at which address, the fake
//! port numbers handed out for port 0, and the state of every link between two addresses (cut
//! or not, one-way latency, rate). [`MemNetwork`] is the public switchboard tests use to break links.
//!
//! A link is named by its two addresses, in either order: the dialler's bound address (its
//! [`MemTransport::local_addr`](crate::MemTransport)) and the address it dialled. Its state is
//! kept in a [`LinkCtl`] that every connection between the two addresses watches, so a cut or a
//! latency change reaches connections already open as well as those opened later.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rusm_cluster_core::transport::TransportError;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Endpoint;

/// The first fake port handed out for port 0 (then upwards, wrapping to 1024).
const FIRST_PORT: u16 = 20_000;

/// What a link between two addresses currently does to the traffic on it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinkState {
    /// Nothing crosses, either way.
    pub(crate) cut: bool,
    /// When the current cut began (meaningless while not cut).
    pub(crate) cut_since: Instant,
    /// How long everything takes to cross, one way.
    pub(crate) latency: Duration,
    /// How many bytes of stream data leave per second, each way (`None`: no limit).
    pub(crate) rate: Option<u64>,
}

impl LinkState {
    fn is_default(&self) -> bool {
        !self.cut && self.latency.is_zero() && self.rate == Some(MemNetwork::DEFAULT_RATE)
    }
}

/// The shared, watchable state of one link.
#[derive(Debug)]
pub(crate) struct LinkCtl {
    state: watch::Sender<LinkState>,
}

impl LinkCtl {
    /// The link's state now.
    pub(crate) fn state(&self) -> LinkState {
        *self.state.borrow()
    }

    /// The one-way latency now.
    pub(crate) fn latency(&self) -> Duration {
        self.state.borrow().latency
    }

    /// A receiver told of every change (the connection driver waits on it).
    pub(crate) fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }
}

struct Net {
    endpoints: HashMap<SocketAddr, Weak<Endpoint>>,
    next_port: u16,
    links: HashMap<(SocketAddr, SocketAddr), Arc<LinkCtl>>,
    /// The link table is swept of unused default links when it grows past this.
    links_sweep_at: usize,
}

static NET: LazyLock<Mutex<Net>> = LazyLock::new(|| {
    Mutex::new(Net {
        endpoints: HashMap::new(),
        next_port: FIRST_PORT,
        links: HashMap::new(),
        links_sweep_at: 64,
    })
});

fn net() -> MutexGuard<'static, Net> {
    NET.lock().unwrap_or_else(|p| p.into_inner())
}

fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

impl Net {
    fn live(&self, addr: &SocketAddr) -> Option<Arc<Endpoint>> {
        self.endpoints.get(addr).and_then(Weak::upgrade)
    }

    /// Whether binding `addr` would clash with a bound endpoint (the same address, or the same
    /// port where either side is the unspecified address, as with UDP sockets).
    fn in_use(&self, addr: SocketAddr) -> bool {
        if self.live(&addr).is_some() {
            return true;
        }
        let any = SocketAddr::new(unspecified(addr.ip()), addr.port());
        if self.live(&any).is_some() {
            return true;
        }
        addr.ip().is_unspecified()
            && self.endpoints.iter().any(|(a, w)| {
                a.port() == addr.port() && a.is_ipv4() == addr.is_ipv4() && w.strong_count() > 0
            })
    }
}

/// Binds an endpoint at `addr` (port 0: a fresh fake port), built by `make` once the address is
/// known. Fails if the address is taken.
pub(crate) fn bind(
    addr: SocketAddr,
    make: impl FnOnce(SocketAddr) -> Arc<Endpoint>,
) -> Result<Arc<Endpoint>, TransportError> {
    let mut net = net();
    net.endpoints.retain(|_, w| w.strong_count() > 0);
    let addr = if addr.port() == 0 {
        let mut found = None;
        for _ in 0..=u16::MAX {
            let port = net.next_port;
            net.next_port = net.next_port.checked_add(1).unwrap_or(1024);
            let candidate = SocketAddr::new(addr.ip(), port);
            if port >= 1024 && !net.in_use(candidate) {
                found = Some(candidate);
                break;
            }
        }
        found.ok_or_else(|| TransportError::setup("no free port left in the in-memory network"))?
    } else if net.in_use(addr) {
        return Err(TransportError::setup(format!(
            "address {addr} is already in use in the in-memory network"
        )));
    } else {
        addr
    };
    let endpoint = make(addr);
    net.endpoints.insert(addr, Arc::downgrade(&endpoint));
    Ok(endpoint)
}

/// Frees `addr` if `endpoint` is what is bound there.
pub(crate) fn unbind(addr: SocketAddr, endpoint: &Endpoint) {
    let mut net = net();
    let ours = net
        .endpoints
        .get(&addr)
        .is_some_and(|w| std::ptr::eq(w.as_ptr(), endpoint));
    if ours {
        net.endpoints.remove(&addr);
    }
}

/// The endpoint bound at `addr` (or at the unspecified address with its port), if any.
pub(crate) fn lookup(addr: SocketAddr) -> Option<Arc<Endpoint>> {
    let net = net();
    net.live(&addr)
        .or_else(|| net.live(&SocketAddr::new(unspecified(addr.ip()), addr.port())))
}

fn link_key(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// The link between `a` and `b` (created in its default state: open, no latency).
pub(crate) fn link(a: SocketAddr, b: SocketAddr) -> Arc<LinkCtl> {
    let mut net = net();
    if net.links.len() >= net.links_sweep_at {
        // Forget links nobody uses that are in their default state: recreated alike on demand.
        net.links
            .retain(|_, l| Arc::strong_count(l) > 1 || !l.state().is_default());
        net.links_sweep_at = (net.links.len() * 2).max(64);
    }
    net.links
        .entry(link_key(a, b))
        .or_insert_with(|| {
            Arc::new(LinkCtl {
                state: watch::Sender::new(LinkState {
                    cut: false,
                    cut_since: Instant::now(),
                    latency: Duration::ZERO,
                    rate: Some(MemNetwork::DEFAULT_RATE),
                }),
            })
        })
        .clone()
}

/// The switchboard of the process-global in-memory network that every
/// [`MemTransport`](crate::MemTransport) is bound in, for tests that break links.
///
/// A link is named by two addresses in either order: the dialler's bound address and the
/// address it dialled (for two nodes, their two `local_addr()`s). What is set on a link applies
/// to every connection between the two addresses, open now or opened later, both ways:
///
/// - [`cut`](MemNetwork::cut): nothing crosses either way: not stream data, not flow-control
///   credit, not handshake records, not a close. What is sent meanwhile waits, in order. When the
///   link is [restored](MemNetwork::restore) in time, it all arrives; when the cut lasts longer
///   than the idle timeout (the smaller of the two ends' `tuning.idle_timeout`, counted from the
///   start of the cut or of the connection, whichever is later), both ends of every connection on
///   the link fail with [`TransportError::TimedOut`] and what waited is dropped, as a QUIC
///   connection whose keep-alives go unanswered does. A cut also stalls handshakes (a dial then
///   times out the same way).
/// - [`set_latency`](MemNetwork::set_latency): everything sent from then on (chunks, credit,
///   handshake records, close) arrives that much later, in order; what is already on its way
///   keeps its time. `rtt()` reports twice the latency.
/// - [`set_rate`](MemNetwork::set_rate): how many bytes of stream data leave per second in each
///   direction ([`MemNetwork::DEFAULT_RATE`] unless set; `None` for no limit). The streams with
///   data waiting share the rate fairly, round-robin in slices of 64 KiB, so a large message takes
///   time to cross and never holds a small one behind it, as QUIC interleaves streams. A slice
///   leaves the moment the link is free, so a small message on an idle link crosses at once; only
///   bulk transfers are paced. Control traffic (handshake records, flow-control credit, stops,
///   the close) is not paced.
///
/// Without a cut, a link never times out: keep-alives are taken as always answered. Links lose,
/// duplicate and reorder nothing.
///
/// ```
/// use std::time::Duration;
/// use rusm_transport_mem::MemNetwork;
///
/// let (a, b) = ("127.0.0.1:7001".parse().unwrap(), "127.0.0.1:7002".parse().unwrap());
/// MemNetwork::cut(a, b);
/// assert!(MemNetwork::is_cut(b, a));
/// MemNetwork::restore(a, b);
/// MemNetwork::set_latency(a, b, Duration::from_millis(20));
/// assert_eq!(MemNetwork::latency(b, a), Duration::from_millis(20));
/// MemNetwork::set_latency(a, b, Duration::ZERO);
/// assert_eq!(MemNetwork::rate(a, b), Some(MemNetwork::DEFAULT_RATE));
/// MemNetwork::set_rate(a, b, None); // as fast as memory
/// # MemNetwork::set_rate(a, b, Some(MemNetwork::DEFAULT_RATE));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MemNetwork;

impl MemNetwork {
    /// The rate of a link unless [`set_rate`](MemNetwork::set_rate) says otherwise: 512 MiB of
    /// stream data per second each way (about 4.3 Gbit/s, a fast local network), so that, as on a
    /// real network, a large message takes time to cross (32 MiB: about 62 ms).
    pub const DEFAULT_RATE: u64 = 512 << 20;

    /// Cuts the link between `a` and `b`: nothing crosses, either way, until
    /// [`restore`](MemNetwork::restore). Cutting a cut link changes nothing (the cut keeps its
    /// start time).
    pub fn cut(a: SocketAddr, b: SocketAddr) {
        link(a, b).state.send_modify(|s| {
            if !s.cut {
                s.cut = true;
                s.cut_since = Instant::now();
            }
        });
    }

    /// Mends the link between `a` and `b`: what waited crosses now, in order (unless the
    /// connections already timed out).
    pub fn restore(a: SocketAddr, b: SocketAddr) {
        link(a, b).state.send_modify(|s| s.cut = false);
    }

    /// Sets the one-way latency of the link between `a` and `b`, for everything sent from now on
    /// (`Duration::ZERO` for none, the default).
    pub fn set_latency(a: SocketAddr, b: SocketAddr, latency: Duration) {
        link(a, b).state.send_modify(|s| s.latency = latency);
    }

    /// Sets how many bytes of stream data per second the link between `a` and `b` carries each
    /// way, from now on (`None`: no limit, everything crosses at once; `Some(0)` counts as 1).
    pub fn set_rate(a: SocketAddr, b: SocketAddr, rate: Option<u64>) {
        link(a, b)
            .state
            .send_modify(|s| s.rate = rate.map(|r| r.max(1)));
    }

    /// The rate of the link between `a` and `b`, in bytes per second each way (`None`: no
    /// limit).
    pub fn rate(a: SocketAddr, b: SocketAddr) -> Option<u64> {
        link(a, b).state().rate
    }

    /// Whether the link between `a` and `b` is cut.
    pub fn is_cut(a: SocketAddr, b: SocketAddr) -> bool {
        link(a, b).state().cut
    }

    /// The one-way latency of the link between `a` and `b`.
    pub fn latency(a: SocketAddr, b: SocketAddr) -> Duration {
        link(a, b).latency()
    }

    /// Whether an endpoint is bound at `addr`.
    pub fn is_bound(addr: SocketAddr) -> bool {
        lookup(addr).is_some()
    }
}
