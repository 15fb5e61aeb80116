//! The TLS 1.3 handshake of an in-memory connection: a real rustls `ClientConnection` and
//! `ServerConnection` (built by the core's one policy) exchange their records as [`Event::Tls`]
//! through the connection's pipes, so latency and cuts delay them like any traffic. The server
//! end comes into being when the client's first flight reaches a listener. Each end's rustls
//! connection stays after its handshake, to read what its peer still sends: session tickets, or
//! the alert with which the server refuses the client's certificate after the client finished
//! (TLS 1.3), which then fails the client end with [`TransportError::Handshake`].

use std::task::{Context, Poll};

use rusm_cluster_core::rustls::pki_types::CertificateDer;
use rusm_cluster_core::rustls::{self, AlertDescription};
use rusm_cluster_core::transport::TransportError;
use tokio::time::Instant;

use super::{Event, Limits, Side, Wire, CLIENT, SERVER};

fn alert_name(alert: AlertDescription) -> String {
    let debug = format!("{alert:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    let mut prev_lower = false;
    for c in debug.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Words a TLS failure the way both QUIC backends can be recognised by: the alert's name (as
/// s2n-quic prints it) and number (as quinn does), then rustls's own words.
fn handshake_error(e: &rustls::Error) -> TransportError {
    let reason = match e {
        rustls::Error::AlertReceived(alert) => format!(
            "rejected by peer: TLS alert {} (error {})",
            alert_name(*alert),
            u8::from(*alert)
        ),
        other => {
            // The alert rustls sends for it (its mapping for certificate errors).
            let alert = match other {
                rustls::Error::InvalidCertificate(c) => AlertDescription::from(c.clone()),
                rustls::Error::PeerMisbehaved(_) => AlertDescription::IllegalParameter,
                rustls::Error::NoApplicationProtocol => AlertDescription::NoApplicationProtocol,
                _ => AlertDescription::HandshakeFailure,
            };
            format!(
                "TLS alert {} (error {}): {other}",
                alert_name(alert),
                u8::from(alert)
            )
        }
    };
    TransportError::Handshake { reason }
}

impl Wire {
    /// Sends the client's first flight.
    pub(crate) fn start(&mut self) {
        let mut out = Vec::new();
        if let Some(tls) = self.sides[CLIENT].tls.as_mut() {
            while tls.wants_write() {
                if tls.write_tls(&mut out).is_err() {
                    break;
                }
            }
        }
        self.send(CLIENT, Event::Tls(out));
    }

    /// The client's first flight reached the server address: find the listener, and create the
    /// server end with its TLS configuration. `false` if nobody listens there.
    fn arrive(&mut self) -> bool {
        let Some(me) = self.me.upgrade() else {
            return false;
        };
        let Some((config, tuning)) = crate::arrive(&me, self.addrs[SERVER], self.addrs[CLIENT])
        else {
            // Nobody answers: the dial times out, which the driver must now time.
            self.silent_since.get_or_insert_with(Instant::now);
            self.retime = true;
            return false;
        };
        let limits = Limits::from(&tuning);
        let client = &mut self.sides[CLIENT];
        client.conn_max = limits.conn_window;
        client.uni_max = limits.max_uni;
        let (client_conn, client_uni) = (client.limits.conn_window, client.limits.max_uni);
        match rustls::ServerConnection::new(config) {
            Ok(tls) => {
                let mut server = Side::new(limits, Some(tls.into()), true);
                server.conn_max = client_conn;
                server.uni_max = client_uni;
                self.sides[SERVER] = server;
                true
            }
            Err(e) => {
                self.sides[SERVER] = Side::new(limits, None, true);
                self.fail(SERVER, handshake_error(&e));
                false
            }
        }
    }

    /// TLS records reached `side`: feed them to its rustls connection, send what it answers, and
    /// note the end of its handshake or its failure.
    pub(super) fn on_tls(&mut self, side: usize, bytes: Vec<u8>) {
        if side == SERVER && !self.sides[SERVER].exists && !self.arrive() {
            return;
        }
        let s = &mut self.sides[side];
        if s.error.is_some() {
            return;
        }
        let Some(tls) = s.tls.as_mut() else {
            return;
        };
        let mut input = &bytes[..];
        let mut failed = None;
        while !input.is_empty() {
            match tls.read_tls(&mut input) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    failed = Some(TransportError::Handshake {
                        reason: format!("TLS records refused: {e}"),
                    });
                    break;
                }
            }
            if let Err(e) = tls.process_new_packets() {
                failed = Some(handshake_error(&e));
                break;
            }
        }
        let mut out = Vec::new();
        while tls.wants_write() {
            if tls.write_tls(&mut out).is_err() {
                break;
            }
        }
        let finished = !tls.is_handshaking();
        let leaf = tls
            .peer_certificates()
            .and_then(|chain| chain.first())
            .cloned();
        if !out.is_empty() {
            self.send(side, Event::Tls(out));
        }
        let s = &mut self.sides[side];
        match failed {
            Some(error) => {
                tracing::debug!(side, %error, "in-memory TLS handshake failed");
                self.fail(side, error);
            }
            None if finished && !s.handshaken => {
                s.handshaken = true;
                s.peer_leaf = leaf;
                s.handshake_waiters.wake();
            }
            None => {}
        }
    }

    /// Waits until `side`'s handshake finished; its peer's leaf certificate.
    pub(crate) fn poll_handshake(
        &mut self,
        side: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<CertificateDer<'static>, TransportError>> {
        let s = &mut self.sides[side];
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        if s.handshaken {
            return Poll::Ready(
                s.peer_leaf
                    .clone()
                    .ok_or_else(|| TransportError::Handshake {
                        reason: "peer presented no certificate".into(),
                    }),
            );
        }
        s.handshake_waiters.register(cx.waker());
        Poll::Pending
    }
}
