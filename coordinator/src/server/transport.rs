//! Outbound Raft traffic (one task and one long-lived stream per peer) and the decoding of inbound batches.

use super::*;

/// Outbound Raft traffic: one task per peer, each with a bounded queue and one long-lived stream.
pub(super) struct Transport {
    pub(super) self_id: NodeId,
    /// The address peer connections leave from (see [`peer_client`]).
    pub(super) local_ip: Option<IpAddr>,
    pub(super) self_addr: String,
    /// Every peer address known: from `--peers`, from applied membership changes, from incoming batches.
    pub(super) book: BTreeMap<NodeId, String>,
    pub(super) links: HashMap<NodeId, (String, tokio::sync::mpsc::Sender<Message>)>,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) events: SyncSender<Event>,
    pub(super) shutdown: CancellationToken,
}

impl Transport {
    pub(super) fn learn(&mut self, id: NodeId, addr: &str) {
        if id == self.self_id || addr.is_empty() {
            return;
        }
        if self.book.get(&id).map(String::as_str) != Some(addr) {
            self.book.insert(id, addr.to_string());
        }
    }

    fn undeliverable(&self, to: NodeId, snapshot: bool, unreachable: &mut Vec<NodeId>) {
        unreachable.push(to);
        if snapshot {
            // A leader waits for a snapshot's fate before sending that member anything else.
            let _ = self.events.try_send(Event::SnapshotSent { to, delivered: false });
        }
    }

    pub(super) fn send(&mut self, messages: Vec<Message>) -> Vec<NodeId> {
        let mut unreachable = Vec::new();
        for message in messages {
            let to = message.to;
            let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let Some(addr) = self.book.get(&to).cloned() else {
                self.undeliverable(to, snapshot, &mut unreachable);
                continue;
            };
            let stale = self
                .links
                .get(&to)
                .is_none_or(|(link_addr, sender)| *link_addr != addr || sender.is_closed());
            if stale {
                let (sender, receiver) = tokio::sync::mpsc::channel(PEER_QUEUE_CAPACITY);
                let link = PeerLink {
                    local_ip: self.local_ip,
                    to,
                    addr: addr.clone(),
                    from_id: self.self_id,
                    from_addr: self.self_addr.clone(),
                    events: self.events.clone(),
                };
                let shutdown = self.shutdown.clone();
                self.runtime.spawn(async move {
                    tokio::select! {
                        () = link.run(receiver) => {}
                        () = shutdown.cancelled() => {}
                    }
                });
                self.links.insert(to, (addr, sender));
            }
            let (_, sender) = &self.links[&to];
            if sender.try_send(message).is_err() {
                self.undeliverable(to, snapshot, &mut unreachable);
            }
        }
        unreachable
    }
}

struct PeerLink {
    local_ip: Option<IpAddr>,
    to: NodeId,
    addr: String,
    from_id: NodeId,
    from_addr: String,
    events: SyncSender<Event>,
}

impl PeerLink {
    fn encode(&self, batch: &[Message]) -> pb::RaftBatch {
        let mut encoded = Vec::with_capacity(batch.len());
        for message in batch {
            match message.write_to_bytes() {
                Ok(bytes) => encoded.push(bytes),
                Err(error) => tracing::error!(%error, "encoding a raft message"),
            }
        }
        pb::RaftBatch {
            from_id: self.from_id,
            from_raft_addr: self.from_addr.clone(),
            messages: encoded,
        }
    }

    fn unreachable(&self, why: &dyn std::fmt::Display) {
        tracing::debug!(to = self.to, addr = %self.addr, %why, "raft messages not delivered");
        let _ = self.events.try_send(Event::Unreachable { to: self.to });
    }

    /// Sends batches over one long-lived stream (no per-batch round trip); a batch with a snapshot goes
    /// as its own acknowledged call, so the leader learns whether the snapshot arrived.
    async fn run(self, mut receiver: tokio::sync::mpsc::Receiver<Message>) {
        let client = match peer_client(&self.addr, self.local_ip) {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(to = self.to, addr = %self.addr, %error, "cannot reach peer");
                return;
            }
        };
        let mut stream: Option<(tokio::sync::mpsc::Sender<pb::RaftBatch>, tokio::task::JoinHandle<()>)> = None;
        let mut batch = Vec::new();
        while let Some(first) = receiver.recv().await {
            batch.clear();
            batch.push(first);
            while batch.len() < PEER_BATCH_MESSAGES_MAX {
                match receiver.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            let request = self.encode(&batch);
            if batch
                .iter()
                .any(|message| message.get_msg_type() == MessageType::MsgSnapshot)
            {
                let mut client = client.clone();
                let outcome = tokio::time::timeout(SNAPSHOT_SEND_TIMEOUT, client.send(request)).await;
                let delivered = matches!(outcome, Ok(Ok(_)));
                if !delivered {
                    self.unreachable(&"the snapshot was not acknowledged");
                }
                let _ = self.events.try_send(Event::SnapshotSent { to: self.to, delivered });
                continue;
            }
            // A stream whose call ended (peer restarted, connection lost) is replaced; what was in flight
            // on it is lost, and raft-rs sends it again.
            if let Some((_, call)) = &stream
                && call.is_finished()
            {
                self.unreachable(&"the stream to the peer ended");
                stream = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (sender, _) = stream.get_or_insert_with(|| {
                let (sender, batches) = tokio::sync::mpsc::channel(STREAM_BUFFER_BATCHES);
                let mut client = client.clone();
                let call = tokio::spawn(async move {
                    let _ = client
                        .stream(tokio_stream::wrappers::ReceiverStream::new(batches))
                        .await;
                });
                (sender, call)
            });
            if let Err(error) = sender.try_send(request) {
                // Full: the peer is slow or gone. Dropping is safe; raft-rs resends.
                self.unreachable(&error);
            }
        }
        if let Some((_, call)) = stream {
            call.abort();
        }
    }
}

fn endpoint(addr: &str) -> Result<Endpoint, CoordinatorError> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)
        .map(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true)
        })
        .map_err(|error| CoordinatorError::InvalidArgument(format!("address '{addr}' is not valid: {error}")))
}

/// A client for a peer's RaftPeer service. Connections leave from `local_ip` (this node's Raft listen
/// address, when it is a specific one), so a member on 127.0.0.2 talks to its peers as 127.0.0.2: what
/// multi-homed hosts expect, and what lets a test cut one member off with a firewall rule.
pub(super) fn peer_client(addr: &str, local_ip: Option<IpAddr>) -> Result<RaftPeerClient<Channel>, CoordinatorError> {
    let channel = endpoint(addr)?.local_address(local_ip).connect_lazy();
    Ok(RaftPeerClient::new(channel)
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX))
}

pub(super) fn raft_event(batch: pb::RaftBatch) -> Result<Event, Status> {
    let mut messages = Vec::with_capacity(batch.messages.len());
    for bytes in &batch.messages {
        let message = Message::parse_from_bytes(bytes)
            .map_err(|error| Status::invalid_argument(format!("raft message does not decode: {error}")))?;
        messages.push(message);
    }
    Ok(Event::Raft {
        from_id: batch.from_id,
        from_addr: batch.from_raft_addr,
        messages,
    })
}
