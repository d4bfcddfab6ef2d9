//! The consensus node: raft-rs's `RawNode` plus the state machine, driven by `tick`, `step`, `propose` and
//! `read`, handing back what to send and whom to answer. It owns no socket, timer or thread; the server
//! loop (`server.rs`) and the simulation tests drive it the same way.
//!
//! ```text
//!            tick / step(msg) / propose(cmd) / read(query)
//!                               │
//!                               ▼
//!   ┌──────────────── Node::ready() ─────────────────┐
//!   │ 1. persist snapshot + entries + hard state     │  one redb transaction, fsynced
//!   │ 2. install a received snapshot                 │
//!   │ 3. note ReadIndex results                      │
//!   │ 4. apply committed entries, answer proposers   │
//!   │ 5. advance; record commit; apply the rest      │
//!   │ 6. answer reads whose index is applied         │
//!   │ 7. every N applied entries: a snapshot task    │
//!   └────────────────────────────────────────────────┘
//!                               │
//!                               ▼
//!            Output { messages to send, replies, job events }
//! ```
//!
//! Invariants:
//! - Nothing in `Output::messages` is returned before the log and hard state it depends on are durable:
//!   messages leave only after step 1. This costs the leader its write/send overlap and keeps the rule
//!   simple.
//! - A proposal is answered when the entry at the index it got is applied: with the command's result if
//!   that entry is still from the proposal's term, with "retry" otherwise. Nothing is answered twice.
//! - Every pending proposal and read has a deadline in ticks, so nothing waits forever on a lost leader.
//!
//! Left out: asynchronous log writes (raft-rs `advance_append_async`) and lease reads.

use std::collections::BTreeMap;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{ReadOnlyOption, StateRole};

use crate::error::CoordinatorError;
use crate::state::{Command, CommandResult, Job, NodeId, Query, QueryResult, StateMachine, decode, encode};
use crate::storage::{LogStore, save_snapshot_data};

/// Identifies one waiting caller; chosen by whoever drives the node.
pub type Token = u64;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    /// A follower that hears nothing for this many ticks (randomised up to `election_ticks_max`)
    /// campaigns.
    pub election_ticks: usize,
    /// Exclusive upper bound of the randomised election timeout. raft-rs draws it from its own thread
    /// RNG; a range of one tick makes a node's timeout fixed, which is what the simulation needs to
    /// replay a seed exactly.
    pub election_ticks_max: usize,
    pub heartbeat_ticks: usize,
    /// Snapshot the state machine and compact the log after this many applied entries.
    pub snapshot_interval_entries: u64,
    /// A proposal still pending after this many ticks is answered with a timeout.
    pub request_timeout_ticks: u64,
    /// A read not confirmed by a leader after this many ticks fails, so the client tries another
    /// member soon (a partitioned member can never confirm one). Longer than an election.
    pub read_timeout_ticks: u64,
}

impl NodeConfig {
    pub fn new(id: NodeId) -> NodeConfig {
        NodeConfig {
            id,
            election_ticks: 10,
            election_ticks_max: 20,
            heartbeat_ticks: 2,
            snapshot_interval_entries: 100_000,
            request_timeout_ticks: 200,
            read_timeout_ticks: 60,
        }
    }
}

/// The answer to one caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Command(CommandResult),
    Query(QueryResult),
    /// A membership change was applied; the configuration after it.
    ConfChanged {
        voters: Vec<NodeId>,
        learners: Vec<NodeId>,
    },
    Failed(CoordinatorError),
}

/// What one call to [`Node::ready`] asks the driver to do.
#[derive(Debug, Default)]
pub struct Output {
    pub messages: Vec<Message>,
    pub replies: Vec<(Token, Reply)>,
    /// Jobs changed by applied entries, with the index that changed them.
    pub events: Vec<(u64, Job)>,
    /// A snapshot to take off the event loop: run it, then hand the result to [`Node::snapshot_saved`].
    pub snapshot: Option<SnapshotTask>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProposalKind {
    Command,
    ConfChange,
}

struct PendingProposal {
    term: u64,
    token: Token,
    kind: ProposalKind,
    deadline_tick: u64,
}

struct PendingRead {
    token: Token,
    query: Query,
    /// Set when raft-rs confirms the read index; the read is served once `applied >= index`.
    index: Option<u64>,
    deadline_tick: u64,
}

/// A snapshot of the node's own view, for status RPCs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: &'static str,
    pub term: u64,
    /// Zero when no leader is known.
    pub leader_id: NodeId,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_log_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Leader only: each member's highest log index known to match the leader's.
    pub matched: BTreeMap<NodeId, u64>,
    /// Member addresses recorded by applied membership changes.
    pub member_addrs: BTreeMap<NodeId, String>,
    pub job_count: usize,
}

pub struct Node {
    raw: raft::RawNode<LogStore>,
    state: StateMachine,
    config: NodeConfig,
    applied: u64,
    ticks: u64,
    proposals: BTreeMap<u64, PendingProposal>,
    reads: BTreeMap<u64, PendingRead>,
    next_read_id: u64,
    output: Output,
    /// A [`SnapshotTask`] is out with the driver; no second one until it comes back.
    snapshot_in_flight: bool,
}

impl Node {
    /// Starts a node on a log that was opened (and, for a founding member, bootstrapped) by the caller.
    /// The state machine is rebuilt from the latest snapshot; entries after it are applied again as
    /// raft-rs hands them back as committed.
    pub fn new(config: NodeConfig, store: LogStore, logger: &slog::Logger) -> Result<Node, CoordinatorError> {
        let snapshot = store.latest_snapshot();
        let applied = snapshot.get_metadata().index;
        let state = StateMachine::from_snapshot(snapshot.get_data())?;
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            min_election_tick: config.election_ticks,
            max_election_tick: config.election_ticks_max,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            ..raft::Config::default()
        };
        raft_config
            .validate()
            .map_err(|error| CoordinatorError::InvalidArgument(format!("raft configuration: {error}")))?;
        let raw = raft::RawNode::new(&raft_config, store, logger)
            .map_err(|error| CoordinatorError::Storage(format!("starting raft: {error}")))?;
        Ok(Node {
            raw,
            state,
            config,
            applied,
            ticks: 0,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_read_id: 0,
            output: Output::default(),
            snapshot_in_flight: false,
        })
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> Option<NodeId> {
        match self.raw.raft.leader_id {
            0 => None,
            id => Some(id),
        }
    }

    /// Leader, and this node has applied an entry of its own term: everything committed by earlier
    /// leaders is applied, so decisions made from its state never contradict theirs.
    pub fn is_leader_ready(&self) -> bool {
        self.is_leader()
            && self
                .raw
                .raft
                .raft_log
                .term(self.applied)
                .is_ok_and(|term| term == self.raw.raft.term)
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn state(&self) -> &StateMachine {
        &self.state
    }

    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    pub fn tick(&mut self) {
        self.raw.tick();
        self.ticks += 1;
        let now = self.ticks;
        for (index, pending) in take_where(&mut self.proposals, |_, pending| pending.deadline_tick <= now) {
            self.reply(
                pending.token,
                Reply::Failed(CoordinatorError::Timeout(format!(
                    "the write at log index {index} was not committed in time (is a majority of coordinators reachable?); it may still take effect, so retry with the same idempotency key"
                ))),
            );
        }
        for (_, pending) in take_where(&mut self.reads, |_, pending| pending.deadline_tick <= now) {
            self.reply(
                pending.token,
                Reply::Failed(CoordinatorError::Unavailable(
                    "the read could not be confirmed with a leader in time (no leader, or no quorum); retry".into(),
                )),
            );
        }
    }

    /// Hands a message from a peer to raft-rs. Messages for another node or a stale term are dropped by
    /// raft-rs itself.
    pub fn step(&mut self, message: Message) {
        if message.to != self.config.id {
            return;
        }
        if let Err(error) = self.raw.step(message) {
            tracing::debug!(node = self.config.id, %error, "raft dropped a message");
        }
    }

    fn reply(&mut self, token: Token, reply: Reply) {
        self.output.replies.push((token, reply));
    }

    fn not_leader(&self) -> CoordinatorError {
        CoordinatorError::NotLeader {
            node_id: self.config.id,
            leader_id: self.leader_id(),
        }
    }

    /// Proposes a command; the answer comes in a later `Output` once it is applied (or fails).
    pub fn propose(&mut self, token: Token, command: &Command) {
        if !self.is_leader() {
            let error = self.not_leader();
            self.reply(token, Reply::Failed(error));
            return;
        }
        let data = match encode(command) {
            Ok(data) => data,
            Err(error) => {
                self.reply(token, Reply::Failed(error));
                return;
            }
        };
        let expected_index = self.raw.raft.raft_log.last_index() + 1;
        let result = self.raw.propose(Vec::new(), data);
        self.track(token, expected_index, result, ProposalKind::Command);
    }

    /// Proposes a membership change; `raft_addr` travels in the entry so every member learns it.
    pub fn propose_conf_change(&mut self, token: Token, change_type: ConfChangeType, node_id: NodeId, raft_addr: &str) {
        if !self.is_leader() {
            let error = self.not_leader();
            self.reply(token, Reply::Failed(error));
            return;
        }
        let mut change = ConfChange::default();
        change.set_change_type(change_type);
        change.node_id = node_id;
        change.context = raft_addr.as_bytes().to_vec().into();
        let expected_index = self.raw.raft.raft_log.last_index() + 1;
        let result = self.raw.propose_conf_change(Vec::new(), change);
        self.track(token, expected_index, result, ProposalKind::ConfChange);
    }

    fn track(&mut self, token: Token, expected_index: u64, result: raft::Result<()>, kind: ProposalKind) {
        match result {
            Ok(()) if self.raw.raft.raft_log.last_index() >= expected_index => {
                let pending = PendingProposal {
                    term: self.raw.raft.term,
                    token,
                    kind,
                    deadline_tick: self.ticks + self.config.request_timeout_ticks,
                };
                self.proposals.insert(expected_index, pending);
            }
            Ok(()) | Err(raft::Error::ProposalDropped) => {
                let message = if self.raw.raft.lead_transferee.is_some() {
                    "leadership is being transferred; retry in a moment"
                } else {
                    "the leader dropped the proposal; retry"
                };
                self.reply(token, Reply::Failed(CoordinatorError::Unavailable(message.into())));
            }
            Err(error) => self.reply(
                token,
                Reply::Failed(CoordinatorError::Internal(format!("proposing: {error}"))),
            ),
        }
    }

    /// Serves a query once a ReadIndex round confirms nothing committed before it is missing here.
    pub fn read(&mut self, token: Token, query: Query) {
        self.next_read_id += 1;
        let id = self.next_read_id;
        self.raw.read_index(id.to_be_bytes().to_vec());
        let pending = PendingRead {
            token,
            query,
            index: None,
            deadline_tick: self.ticks + self.config.read_timeout_ticks,
        };
        self.reads.insert(id, pending);
    }

    /// Asks the leader (this node) to hand leadership to `to`; watch `status()` for the outcome.
    pub fn transfer_leader(&mut self, to: NodeId) {
        self.raw.transfer_leader(to);
    }

    pub fn report_unreachable(&mut self, to: NodeId) {
        self.raw.report_unreachable(to);
    }

    pub fn report_snapshot(&mut self, to: NodeId, delivered: bool) {
        let status = if delivered {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    pub fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let store = self.raw.store();
        let conf_state = store.conf_state();
        let matched = if self.is_leader() {
            raft.prs()
                .iter()
                .map(|(id, progress)| (*id, progress.matched))
                .collect()
        } else {
            BTreeMap::new()
        };
        NodeStatus {
            id: self.config.id,
            role: match raft.state {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre-candidate",
            },
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            first_log_index: raft::Storage::first_index(store).unwrap_or(0),
            last_log_index: raft.raft_log.last_index(),
            snapshot_index: store.latest_snapshot().get_metadata().index,
            voters: conf_state.voters.clone(),
            learners: conf_state.learners.clone(),
            matched,
            member_addrs: self
                .state
                .members()
                .iter()
                .map(|(id, member)| (*id, member.raft_addr.clone()))
                .collect(),
            job_count: self.state.job_count(),
        }
    }

    /// Runs one round of raft-rs's Ready protocol and returns what the driver must do.
    pub fn ready(&mut self) -> Result<Output, CoordinatorError> {
        if self.raw.has_ready() {
            let mut ready = self.raw.ready();
            let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
            self.raw
                .mut_store()
                .persist(snapshot.as_ref(), ready.entries(), ready.hs())?;
            if let Some(snapshot) = snapshot {
                self.install_snapshot(&snapshot)?;
            }
            for read_state in ready.take_read_states() {
                let bytes: [u8; 8] = read_state.request_ctx.as_slice().try_into().unwrap_or_default();
                if let Some(pending) = self.reads.get_mut(&u64::from_be_bytes(bytes)) {
                    pending.index = Some(read_state.index);
                }
            }
            let mut messages = ready.take_messages();
            self.apply_entries(ready.take_committed_entries())?;
            messages.extend(ready.take_persisted_messages());
            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit);
            }
            messages.extend(light.take_messages());
            self.apply_entries(light.take_committed_entries())?;
            self.raw.advance_apply_to(self.applied);
            self.output.messages.extend(messages);
        }
        self.maybe_snapshot();
        self.serve_reads();
        Ok(std::mem::take(&mut self.output))
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), CoordinatorError> {
        let index = snapshot.get_metadata().index;
        self.state = StateMachine::from_snapshot(snapshot.get_data())?;
        self.applied = index;
        for (_, pending) in take_where(&mut self.proposals, |proposal_index, _| proposal_index <= index) {
            self.reply(
                pending.token,
                Reply::Failed(CoordinatorError::Unavailable(
                    "this node fell behind and installed a snapshot; retry with the same idempotency key".into(),
                )),
            );
        }
        tracing::info!(node = self.config.id, index, "installed a snapshot from the leader");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), CoordinatorError> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            let reply = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => None,
                EntryType::EntryNormal => {
                    let command: Command = decode(&entry.data, "a committed command")?;
                    let mut changed = Vec::new();
                    let result = self.state.apply(command, &mut changed);
                    self.output
                        .events
                        .extend(changed.into_iter().map(|job| (entry.index, job)));
                    Some(Reply::Command(result))
                }
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data).map_err(|error| {
                        CoordinatorError::Internal(format!("decoding a membership change: {error}"))
                    })?;
                    let outcome = self.raw.apply_conf_change(&change);
                    Some(self.conf_change_applied(outcome, change.node_id, change.get_change_type(), &change.context))
                }
                EntryType::EntryConfChangeV2 => {
                    let change = ConfChangeV2::parse_from_bytes(&entry.data).map_err(|error| {
                        CoordinatorError::Internal(format!("decoding a membership change: {error}"))
                    })?;
                    let single = change.get_changes().first().cloned().unwrap_or_default();
                    let outcome = self.raw.apply_conf_change(&change);
                    Some(self.conf_change_applied(outcome, single.node_id, single.get_change_type(), &change.context))
                }
            };
            self.applied = entry.index;
            if let Some(pending) = self.proposals.remove(&entry.index) {
                let reply = match reply {
                    _ if pending.term != entry.term => Reply::Failed(CoordinatorError::Unavailable(
                        "leadership changed before the write committed; retry with the same idempotency key".into(),
                    )),
                    Some(Reply::Command(_)) | None if pending.kind == ProposalKind::ConfChange => {
                        Reply::Failed(CoordinatorError::Unavailable(
                            "another membership change is still in progress; retry when it has finished".into(),
                        ))
                    }
                    None => Reply::Failed(CoordinatorError::Unavailable("the write was replaced; retry".into())),
                    Some(reply) => reply,
                };
                self.reply(pending.token, reply);
            }
        }
        Ok(())
    }

    fn conf_change_applied(
        &mut self,
        outcome: raft::Result<ConfState>,
        node_id: NodeId,
        change_type: ConfChangeType,
        context: &[u8],
    ) -> Reply {
        let conf_state = match outcome {
            Ok(conf_state) => conf_state,
            Err(error) => {
                return Reply::Failed(CoordinatorError::FailedPrecondition(format!(
                    "membership change for node {node_id} refused: {error}"
                )));
            }
        };
        match change_type {
            ConfChangeType::RemoveNode => self.state.forget_member(node_id),
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                self.state
                    .record_member(node_id, String::from_utf8(context.to_vec()).ok());
            }
        }
        if let Err(error) = self.raw.mut_store().set_conf_state(conf_state.clone()) {
            return Reply::Failed(error);
        }
        tracing::info!(node = self.config.id, ?change_type, changed = node_id, voters = ?conf_state.voters, learners = ?conf_state.learners, "membership changed");
        Reply::ConfChanged {
            voters: conf_state.voters.clone(),
            learners: conf_state.learners.clone(),
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        for (_, pending) in take_where(&mut self.reads, |_, pending| {
            pending.index.is_some_and(|index| index <= applied)
        }) {
            let result = self.state.query(&pending.query);
            self.reply(pending.token, Reply::Query(result));
        }
    }

    /// Every `snapshot_interval_entries` applied entries (or when raft-rs needs a newer snapshot for a
    /// member), hands the driver a copy of the state to encode and save off the event loop. The copy
    /// is cheap: the state's maps share structure.
    fn maybe_snapshot(&mut self) {
        let snapshot_index = self.raw.store().latest_snapshot().get_metadata().index;
        let wanted = self.raw.store().take_snapshot_wanted() && self.applied > snapshot_index;
        let due = self.applied >= snapshot_index + self.config.snapshot_interval_entries;
        if self.snapshot_in_flight || !(wanted || due) {
            return;
        }
        self.snapshot_in_flight = true;
        self.output.snapshot = Some(SnapshotTask {
            index: self.applied,
            conf_state: self.raw.store().conf_state().clone(),
            state: self.state.clone(),
            snapshots: Arc::clone(&self.raw.store().databases().snapshots),
        });
    }

    /// The driver finished a [`SnapshotTask`]: record it and compact the log behind it.
    pub fn snapshot_saved(&mut self, outcome: Result<SavedSnapshot, CoordinatorError>) -> Result<(), CoordinatorError> {
        self.snapshot_in_flight = false;
        let saved = match outcome {
            Ok(saved) => saved,
            Err(error) => {
                // The log just grows until the next try; nothing is lost.
                tracing::error!(node = self.config.id, %error, "saving a snapshot failed");
                return Ok(());
            }
        };
        let index = saved.index;
        let bytes = saved.data.len();
        let started = std::time::Instant::now();
        self.raw
            .mut_store()
            .record_snapshot(saved.index, saved.conf_state, saved.data)?;
        let compaction_ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            node = self.config.id,
            index,
            bytes,
            compaction_ms,
            "snapshot saved, log compacted"
        );
        Ok(())
    }
}

/// A copy of the state machine at `index`, to encode and make durable on another thread.
pub struct SnapshotTask {
    pub index: u64,
    conf_state: ConfState,
    state: StateMachine,
    snapshots: Arc<redb::Database>,
}

/// A snapshot whose data is durable, ready for [`Node::snapshot_saved`].
pub struct SavedSnapshot {
    index: u64,
    conf_state: ConfState,
    data: Vec<u8>,
}

impl std::fmt::Debug for SnapshotTask {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SnapshotTask")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl SnapshotTask {
    /// Encodes the state and writes it to the snapshot database (fsynced). Runs on any thread.
    pub fn run(self) -> Result<SavedSnapshot, CoordinatorError> {
        let data = self.state.to_snapshot()?;
        save_snapshot_data(&self.snapshots, self.index, &data)?;
        Ok(SavedSnapshot {
            index: self.index,
            conf_state: self.conf_state,
            data,
        })
    }
}

/// Removes and returns the entries whose value matches, in key order.
fn take_where<V>(map: &mut BTreeMap<u64, V>, matches: impl Fn(u64, &V) -> bool) -> Vec<(u64, V)> {
    let keys: Vec<u64> = map
        .iter()
        .filter(|(key, value)| matches(**key, value))
        .map(|(key, _)| *key)
        .collect();
    keys.into_iter()
        .filter_map(|key| map.remove(&key).map(|value| (key, value)))
        .collect()
}

/// A slog drain that forwards raft-rs's log lines to `tracing`.
pub struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let message = record.msg().to_string();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{message}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{message}"),
            slog::Level::Info => tracing::debug!(target: "raft", "{message}"),
            slog::Level::Debug | slog::Level::Trace => tracing::trace!(target: "raft", "{message}"),
        }
        Ok(())
    }
}

pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}
