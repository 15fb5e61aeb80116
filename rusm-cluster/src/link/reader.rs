//! The link's reader: accepts message streams and reads them side by side, charging each
//! message to the link budget before its payload is read (see [`MessageAssembler::push_gated`]),
//! feeds what it reads to the core [`Inbound`] machine, and hands what the machine releases to
//! mailboxes.

use super::*;

/// Payload bytes one stream is read for before the link delivers them and turns to other
/// streams: a stream of coalesced messages is read in turns, like any other.
pub(super) const READ_TURN: usize = 1 << 20;

/// One message stream being read, with the credit of the message it is in the middle of.
pub(super) struct Reading<R> {
    pub(super) stream: R,
    pub(super) asm: MessageAssembler,
    /// The credit granted to the message being received, and what it was charged.
    pub(super) credit: Option<(LinkCredit, usize)>,
}

/// A message read whole, with the bytes of the link budget it holds until its receiver drops
/// it.
pub(super) struct Incoming {
    pub(super) msg: ReadMessage,
    pub(super) credit: Option<LinkCredit>,
    pub(super) charge: usize,
}

impl InboundMessage for Incoming {
    fn header(&self) -> &EnvelopeHeader {
        &self.msg.header
    }
    fn charge(&self) -> usize {
        self.charge
    }
}

/// Where a stream stands after the reader took what it held.
pub(super) enum Step<R> {
    /// Read to its end, or failed (already accounted for).
    Ended,
    /// Waits for more data.
    Wait(Reading<R>),
    /// A message header waits for credit the link budget does not have.
    Parked(Reading<R>),
}

/// The link's reader: the [`Inbound`] machine, the budget it charges, and the counters its
/// inputs moved.
pub(super) struct Reader {
    pub(super) machine: Inbound<Incoming>,
    pub(super) budget: Arc<Budget>,
    /// How far above the budget a message that fills its pair's gap may still be granted.
    pub(super) reserve_ceiling: usize,
    pub(super) limits: Limits,
    pub(super) got: Vec<ReadMessage>,
    pub(super) counted: Counted,
}

impl Reader {
    /// What a message with this header is charged, and the ceiling of the budget it may fill
    /// up to: the reserve when it fills a gap. Asked afresh each time, since a message parked
    /// as an ordinary one may since have become the one a pair waits for.
    pub(super) fn wants(&self, header: &EnvelopeHeader) -> (usize, usize) {
        let (cost, fills_gap) = self.machine.assess(header);
        let ceiling = if fills_gap {
            self.reserve_ceiling
        } else {
            self.budget.limit()
        };
        (cost, ceiling)
    }

    pub(super) fn count(&mut self, c: Counted) {
        self.counted.lost += c.lost;
        self.counted.oversized += c.oversized;
        self.counted.malformed += c.malformed;
    }

    /// Takes what `rd` holds without waiting (`first` is a chunk already read from it): grants
    /// each message its credit before its payload, and hands whole messages to the machine,
    /// which pushes what may be delivered onto `out`.
    pub(super) fn advance<R: RecvStream>(
        &mut self,
        mut rd: Reading<R>,
        first: Option<Result<Option<Bytes>, TransportError>>,
        now: Instant,
        out: &mut Vec<Incoming>,
    ) -> Step<R> {
        let mut next = first;
        let mut taken = 0;
        loop {
            let pushed = if rd.asm.is_awaiting_credit() {
                let header = rd.asm.header().expect("credit is awaited after a header");
                let (cost, ceiling) = self.wants(header);
                let Some(credit) = self.budget.try_take_within(cost, ceiling) else {
                    return Step::Parked(rd);
                };
                self.machine.on_credit(cost);
                rd.credit = Some((credit, cost));
                rd.asm.grant();
                rd.asm.resume(&mut self.got)
            } else {
                if taken >= READ_TURN {
                    return Step::Wait(rd);
                }
                // Dropping a pending `read_chunk` loses nothing (it is cancel safe).
                let chunk = match next.take() {
                    Some(r) => r,
                    None => match rd.stream.read_chunk().now_or_never() {
                        Some(r) => r,
                        None => return Step::Wait(rd),
                    },
                };
                match chunk {
                    Ok(Some(chunk)) => {
                        taken += chunk.len();
                        rd.asm.push_gated(chunk, &mut self.got)
                    }
                    Ok(None) => {
                        let end =
                            std::mem::replace(&mut rd.asm, MessageAssembler::new(self.limits))
                                .finish();
                        return match end {
                            Ok(()) => {
                                self.machine.on_stream_closed();
                                Step::Ended
                            }
                            Err(e) => self.fail(rd, e, now, out),
                        };
                    }
                    Err(e) => {
                        let e = rd.asm.failed(e);
                        return self.fail(rd, e, now, out);
                    }
                }
            };
            match pushed {
                Ok(_) => self.collect(&mut rd, now, out),
                Err(e) => {
                    if let Some(code) = e.stop_code() {
                        rd.stream.stop(code);
                    }
                    self.collect(&mut rd, now, out);
                    return self.fail(rd, e, now, out);
                }
            }
        }
    }

    /// Hands the message the stream completed (at most one per push: each needs its own
    /// credit) to the machine, with its credit.
    pub(super) fn collect<R>(
        &mut self,
        rd: &mut Reading<R>,
        now: Instant,
        out: &mut Vec<Incoming>,
    ) {
        let mut got = std::mem::take(&mut self.got);
        for msg in got.drain(..) {
            let (credit, charge) = match rd.credit.take() {
                Some((credit, charge)) => (Some(credit), charge),
                None => (None, 0),
            };
            self.machine.on_uncredit(charge);
            let c = self.machine.on_message(
                now,
                Incoming {
                    msg,
                    credit,
                    charge,
                },
                out,
            );
            self.count(c);
        }
        self.got = got;
    }

    /// A stream ended badly: gives back the credit of its unfinished message and stops waiting
    /// for that message.
    pub(super) fn fail<R>(
        &mut self,
        mut rd: Reading<R>,
        e: ReadError,
        now: Instant,
        out: &mut Vec<Incoming>,
    ) -> Step<R> {
        if let Some((credit, charge)) = rd.credit.take() {
            drop(credit);
            self.machine.on_uncredit(charge);
        }
        let c = self.machine.on_read_error(now, &e, out);
        self.count(c);
        self.machine.on_stream_closed();
        debug!(error = %e, "message refused");
        Step::Ended
    }
}

/// What a parked stream holds uncharged: the rest of a chunk, and its own keeping.
pub(super) fn parked_size<R>(rd: &Reading<R>) -> usize {
    rd.asm.stashed_len() + 256
}

/// Waits for the next chunk of a stream.
pub(super) async fn next_chunk<R: RecvStream>(
    mut rd: Reading<R>,
) -> (Reading<R>, Result<Option<Bytes>, TransportError>) {
    let r = rd.stream.read_chunk().await;
    (rd, r)
}

pub(super) async fn read_loop<C: Connection>(
    node: &Node,
    link: &LinkHandle,
    conn: &C,
    reader: &mut Reader,
    mut goodbye: watch::Receiver<Option<(String, u64)>>,
    mut lost: mpsc::Receiver<Notice>,
) -> DownReason {
    let inner = &node.inner;
    let stats = &inner.stats;
    let mut inflight = FuturesUnordered::new();
    // Streams whose next message waits for credit, oldest first, and the bytes they hold
    // uncharged (the rest of the chunk that carried the header). While under a quarter of the
    // budget, new streams are still accepted: the one that fills a gap may be among them, and
    // may draw on the reserve.
    let mut parked: VecDeque<Reading<C::RecvStream>> = VecDeque::new();
    let mut parked_bytes = 0;
    let parked_max = reader.budget.limit() / 4;
    let mut goodbye_open = true;
    let mut out = Vec::new();
    let mut route = Route::default();
    loop {
        if let Some(reason) = reader.machine.goodbye_done() {
            return DownReason::Goodbye(reason.to_string());
        }
        if let Some(why) = reader.machine.closed() {
            return DownReason::PeerMisbehaved(why.clone());
        }
        let deadline = reader.machine.poll_timeout();
        // What the oldest parked stream waits for.
        let wants = parked
            .front()
            .and_then(|rd| rd.asm.header())
            .map_or((0, 0), |h| reader.wants(h));
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let step = tokio::select! {
            Some((rd, chunk)) = inflight.next(), if !inflight.is_empty() => {
                reader.advance(rd, Some(chunk), Instant::now(), &mut out)
            }
            r = conn.accept_uni(), if parked_bytes < parked_max
                && inflight.len() + parked.len() < MAX_READS => match r {
                Ok(Some(stream)) => {
                    reader.machine.on_stream_accepted();
                    let rd = Reading {
                        stream,
                        asm: MessageAssembler::new(reader.limits),
                        credit: None,
                    };
                    reader.advance(rd, None, Instant::now(), &mut out)
                }
                // Closed gracefully: the close itself says why.
                Ok(None) => return down_from(conn.closed().await),
                Err(e) => return down_from(e),
            },
            changed = goodbye.changed(), if goodbye_open => {
                goodbye_open = changed.is_ok();
                if let Some((reason, streams)) = goodbye.borrow().clone() {
                    reader.machine.on_goodbye(reason, streams);
                }
                continue;
            }
            Some(notice) = lost.recv() => {
                match notice {
                    // The sender never finished this message: stop waiting for it (counted
                    // once, and only if it had not arrived after all).
                    Notice::Lost(from, to, seq) => {
                        let now = Instant::now();
                        let c = reader.machine.on_lost_notice(now, from, to, seq, &mut out);
                        reader.count(c);
                    }
                    Notice::Retire(from, pairs) => {
                        reader.machine.on_retire(Instant::now(), from, pairs);
                    }
                }
                Step::Ended
            }
            () = reader.budget.freed(wants.0, wants.1), if !parked.is_empty() => {
                // Some of the budget came back: parked streams go on, oldest first.
                let now = Instant::now();
                while let Some(rd) = parked.pop_front() {
                    parked_bytes -= parked_size(&rd);
                    match reader.advance(rd, None, now, &mut out) {
                        Step::Parked(rd) => {
                            parked_bytes += parked_size(&rd);
                            parked.push_front(rd);
                            break;
                        }
                        Step::Wait(rd) => inflight.push(next_chunk(rd)),
                        Step::Ended => {}
                    }
                }
                Step::Ended
            }
            () = timer, if deadline.is_some() => {
                if let Some(why) = reader.machine.handle_timeout(Instant::now()) {
                    return DownReason::PeerMisbehaved(why.clone());
                }
                continue;
            }
        };
        match step {
            Step::Ended => {}
            Step::Wait(rd) => inflight.push(next_chunk(rd)),
            Step::Parked(rd) => {
                parked_bytes += parked_size(&rd);
                parked.push_back(rd);
            }
        }
        // Only while reading waits for credit, or to stop a running stall clock: the gap
        // table is not walked a second time per turn.
        if !parked.is_empty() || reader.machine.is_stalling() {
            reader
                .machine
                .on_budget(Instant::now(), !parked.is_empty(), reader.budget.used());
        }
        link.pairs_in
            .store(reader.machine.pairs(), Ordering::Relaxed);
        let c = std::mem::take(&mut reader.counted);
        if c != Counted::default() {
            stats.lost_messages.fetch_add(c.lost, Ordering::Relaxed);
            stats
                .oversized_messages
                .fetch_add(c.oversized, Ordering::Relaxed);
            stats
                .malformed_messages
                .fetch_add(c.malformed, Ordering::Relaxed);
        }
        for msg in out.drain(..) {
            deliver(node, link, &mut route, msg).await;
        }
        route.flush(inner, link);
    }
}

/// The reader's memory of where its last message went, and the messages for that process not
/// yet handed over: consecutive messages to one process (the common case) skip the lookups,
/// and reach its mailbox together, in one channel operation and one wake-up. A process id is
/// never reused, and a closed mailbox is looked up afresh, so the memory is never stale.
#[derive(Default)]
pub(super) struct Route {
    pub(super) last: Option<(u64, Mailbox)>,
    pub(super) pending: Vec<Message>,
}

impl Route {
    /// Points the route at the process `to` names, handing over what is pending for another
    /// one first; `false` if no such process lives here.
    pub(super) fn aim(&mut self, inner: &NodeInner, link: &LinkHandle, to: &Dest) -> bool {
        let id = match to {
            Dest::Pid { id, creation } if *creation == inner.creation => *id,
            Dest::Pid { .. } => return false,
            Dest::Name(name) => {
                let names = inner.names.read().unwrap_or_else(|p| p.into_inner());
                match names.get(name) {
                    Some(id) => *id,
                    None => return false,
                }
            }
            // Only while this node's claim wins: a process that lost the name gets nothing more.
            Dest::Global(name) => match inner.registry.read(|r| r.owns(name)) {
                Some(id) => id,
                None => return false,
            },
        };
        if self
            .last
            .as_ref()
            .is_some_and(|(last, m)| *last == id && !m.is_closed())
        {
            return true;
        }
        self.flush(inner, link);
        let mailbox = inner
            .processes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|slot| slot.mailbox.clone());
        match mailbox {
            Some(mailbox) => {
                self.last = Some((id, mailbox));
                true
            }
            None => false,
        }
    }

    /// Hands the pending messages to their mailbox.
    pub(super) fn flush(&mut self, inner: &NodeInner, link: &LinkHandle) {
        let n = self.pending.len() as u64;
        let Some((_, mailbox)) = self.last.as_ref().filter(|_| n > 0) else {
            return;
        };
        let mail = if n == 1 {
            Mail::One(self.pending.remove(0))
        } else {
            Mail::Many(std::mem::take(&mut self.pending))
        };
        if mailbox.push(mail).is_err() {
            // The process exited with these on their way.
            inner.stats.dead_letters.fetch_add(n, Ordering::Relaxed);
            link.dead.fetch_add(n, Ordering::Relaxed);
            return;
        }
        inner
            .stats
            .messages_received
            .fetch_add(n, Ordering::Relaxed);
        link.received.fetch_add(n, Ordering::Relaxed);
    }
}

/// Readies a message for its local destination; the message reaches the mailbox at the
/// route's next flush, still holding its credit of the link budget.
pub(super) async fn deliver(node: &Node, link: &LinkHandle, route: &mut Route, incoming: Incoming) {
    let inner = &node.inner;
    let Incoming { msg, credit, .. } = incoming;
    if !route.aim(inner, link, &msg.header.to) {
        inner.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
        link.dead.fetch_add(1, Ordering::Relaxed);
        debug!(node = %inner.name, peer = %link.peer, to = ?msg.header.to, "dead letter");
        return;
    }
    // One unit of the task's cooperative budget per message, so a link that always has input
    // still yields to the runtime now and then (its QUIC driver among others). Without it, a
    // busy reader kept the driver from running and accepted many streams half-received, whose
    // pairs' later messages then waited in the reorder buffer (measured: 25,632 of 436k
    // streams read in two goes and 356k messages held back, against 626 and 8k with it).
    tokio::task::consume_budget().await;
    let from = msg.header.from.map(|id| Pid {
        node: link.peer.clone(),
        id,
        creation: link.peer_creation,
    });
    route
        .pending
        .push(Message::new(from, msg.payload, credit.map(Credit::Link)));
}
