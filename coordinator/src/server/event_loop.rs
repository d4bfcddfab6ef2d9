//! The event loop: the one thread that owns the node, its disk and its outbound transport.

use super::*;

pub(super) enum Event {
    Raft {
        from_id: NodeId,
        from_addr: String,
        messages: Vec<Message>,
    },
    Propose {
        command: Command,
        reply: oneshot::Sender<Reply>,
    },
    ConfChange {
        change_type: ConfChangeType,
        node_id: NodeId,
        raft_addr: String,
        reply: oneshot::Sender<Reply>,
    },
    Read {
        query: Query,
        reply: oneshot::Sender<Reply>,
    },
    TransferLeader {
        to: NodeId,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    Unreachable {
        to: NodeId,
    },
    SnapshotSaved(Result<SavedSnapshot, CoordinatorError>),
    SnapshotSent {
        to: NodeId,
        delivered: bool,
    },
}

/// A thread that encodes and saves snapshots, so a large state never stalls the event loop. It ends
/// when the loop drops its sender.
fn spawn_snapshot_worker(events: SyncSender<Event>) -> Result<SyncSender<SnapshotTask>, CoordinatorError> {
    let (sender, tasks) = std::sync::mpsc::sync_channel::<SnapshotTask>(1);
    std::thread::Builder::new()
        .name("kiln-snapshots".into())
        .spawn(move || {
            for task in tasks {
                if events.send(Event::SnapshotSaved(task.run())).is_err() {
                    return;
                }
            }
        })
        .map_err(|error| CoordinatorError::Internal(format!("starting the snapshot thread: {error}")))?;
    Ok(sender)
}

/// The event loop: owns the node, the disk and the transport.
pub(super) fn run_event_loop(
    mut node: Node,
    receiver: Receiver<Event>,
    mut transport: Transport,
    job_events: broadcast::Sender<(u64, Job)>,
    views: tokio::sync::watch::Sender<AppliedView>,
    tick_interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let mut published = (0u64, false, 0u64);
    let mut waiting: HashMap<Token, oneshot::Sender<Reply>> = HashMap::new();
    let mut next_token: Token = 0;
    let snapshots = spawn_snapshot_worker(transport.events.clone())?;
    let mut next_tick = Instant::now() + tick_interval;
    let mut handle = |event: Event, node: &mut Node, transport: &mut Transport, waiting: &mut HashMap<_, _>| {
        let mut wait = |reply: oneshot::Sender<Reply>| {
            next_token += 1;
            waiting.insert(next_token, reply);
            next_token
        };
        match event {
            Event::Raft {
                from_id,
                from_addr,
                messages,
            } => {
                transport.learn(from_id, &from_addr);
                for message in messages {
                    node.step(message);
                }
            }
            Event::Propose { command, reply } => {
                let token = wait(reply);
                node.propose(token, &command);
            }
            Event::ConfChange {
                change_type,
                node_id,
                raft_addr,
                reply,
            } => {
                let token = wait(reply);
                transport.learn(node_id, &raft_addr);
                node.propose_conf_change(token, change_type, node_id, &raft_addr);
            }
            Event::Read { query, reply } => {
                let token = wait(reply);
                node.read(token, query);
            }
            Event::TransferLeader { to } => node.transfer_leader(to),
            Event::Status { reply } => {
                let mut status = node.status();
                for (id, addr) in &transport.book {
                    status.member_addrs.entry(*id).or_insert_with(|| addr.clone());
                }
                status.member_addrs.insert(node.id(), transport.self_addr.clone());
                let _ = reply.send(status);
            }
            Event::Unreachable { to } => node.report_unreachable(to),
            Event::SnapshotSent { to, delivered } => node.report_snapshot(to, delivered),
            Event::SnapshotSaved(outcome) => return node.snapshot_saved(outcome),
        }
        Ok(())
    };
    while !shutdown.is_cancelled() {
        let timeout = next_tick.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(timeout) {
            Ok(event) => {
                handle(event, &mut node, &mut transport, &mut waiting)?;
                // Take what else is queued so one Ready (one fsync) covers many requests.
                for _ in 0..EVENT_QUEUE_CAPACITY {
                    match receiver.try_recv() {
                        Ok(event) => handle(event, &mut node, &mut transport, &mut waiting)?,
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_tick {
            node.tick();
            next_tick += tick_interval;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + tick_interval;
            }
        }
        let output = node.ready()?;
        // Published before replies go out: whoever learns a write committed also sees its effect here.
        let now = (node.applied_index(), node.is_leader_ready(), node.term());
        if now != published {
            published = now;
            views.send_replace(AppliedView {
                applied_index: now.0,
                leader_ready: now.1,
                term: now.2,
                state: node.state().clone(),
            });
        }
        if let Some(task) = output.snapshot {
            // The node sends at most one at a time, so this never waits.
            let _ = snapshots.send(task);
        }
        for (id, member) in node.state().members() {
            transport.learn(*id, &member.raft_addr);
        }
        for to in transport.send(output.messages) {
            node.report_unreachable(to);
        }
        for (token, reply) in output.replies {
            if let Some(sender) = waiting.remove(&token) {
                let _ = sender.send(reply);
            }
        }
        for event in output.events {
            let _ = job_events.send(event);
        }
    }
    Ok(())
}
