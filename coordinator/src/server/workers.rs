//! The leader's side of the workers: their streams, their leases, and the scheduler that feeds them.
//!
//! ```text
//!  worker ══ WorkerService.Session (one stream) ══► session task ──HubEvent──► Hub (one tokio task)
//!         ◄═ AssignTask / KillTask / ReportsAcknowledged ═══════════════════════╡ reads AppliedView
//!                                                                               │ proposes Batch[
//!                                                                               │   TaskFinished…,
//!                                                                               │   WorkerLost…,
//!                                                                               │   sweep trials…,
//!                                                                               │   StartAttempt…]
//! ```
//!
//! Every coordinator runs a hub; it acts only while its node is the ready leader (see
//! [`Node::is_leader_ready`]) and drops every session when that stops, so workers reconnect to the new
//! leader. What the hub holds is soft state, rebuilt from the replicated state and the workers' next
//! messages:
//! - leases: when each worker was last heard from. A new leader starts every lease afresh, so a failover
//!   never declares a live worker lost.
//! - per session, which assignments and kills were sent. A session starts empty, so a task whose
//!   assignment the old leader committed but never sent is sent now; workers ignore repeats.
//!
//! Reconciliation on every heartbeat: a task the worker runs that the state does not place there (running
//! or standing by) is killed; a task the state places there that the worker does not run is (re)assigned.
//! A standby placement goes out as an assignment naming the task it waits for (`AssignTask.after`): the
//! worker starts it when that task exits, and a standby withdrawn before then (its job cancelled) is killed. Reports are
//! acknowledged only after the command carrying them is committed; the worker repeats them until then.
//!
//! At most one proposal is in flight: reports, lost workers and scheduling decisions that arrive meanwhile
//! go into the next batch, which is what keeps a busy cluster at one Raft entry per round.

use std::collections::{BTreeSet, HashMap, HashSet};

use tokio::sync::mpsc;

use super::*;
use crate::scheduler::schedule_state;
use crate::state::{TaskKey, TaskOutcome, TaskState, Worker, WorkerId, WorkerRegistration, WorkerState};

/// Outbound messages queued for one worker; beyond this the session is dropped and the worker reconnects.
const SESSION_QUEUE_MESSAGES: usize = 4096;
/// How often the hub looks at leases and the queue when nothing else wakes it.
const ROUND_INTERVAL: Duration = Duration::from_millis(100);
/// How long a new worker stream may take to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands in one proposal at most.
const BATCH_COMMANDS_MAX: usize = 2048;

type Outbound = mpsc::Sender<Result<pb::LeaderMessage, Status>>;

pub(super) enum HubEvent {
    Connected {
        worker: WorkerId,
        session: u64,
        outbound: Outbound,
    },
    Heartbeat {
        worker: WorkerId,
        session: u64,
        running: Vec<TaskKey>,
        unacknowledged: Vec<(TaskKey, TaskOutcome)>,
    },
    Report {
        worker: WorkerId,
        session: u64,
        task: TaskKey,
        outcome: TaskOutcome,
    },
    Disconnected {
        worker: WorkerId,
        session: u64,
    },
    Leases {
        reply: oneshot::Sender<Option<BTreeMap<WorkerId, i64>>>,
    },
    Proposed {
        acknowledge: Vec<(WorkerId, TaskKey)>,
        committed: bool,
    },
}

struct Session {
    id: u64,
    outbound: Outbound,
    assigned: HashSet<TaskKey>,
    /// Standby tasks sent, not yet started in the state.
    standby: HashSet<TaskKey>,
    killed: HashSet<TaskKey>,
    /// What the worker said it runs in its last heartbeat.
    running: BTreeSet<TaskKey>,
}

pub(super) struct Hub {
    shared: Shared,
    events: mpsc::Receiver<HubEvent>,
    lease: Duration,
    scheduler: SchedulerConfig,
    sessions: HashMap<WorkerId, Session>,
    leases: HashMap<WorkerId, Instant>,
    /// Each worker's registration count when its lease was last started.
    registrations: HashMap<WorkerId, u32>,
    reports: Vec<(WorkerId, TaskKey, TaskOutcome)>,
    proposing: bool,
    /// The applied index at which the sweep controller last found nothing to do. It decides from the state
    /// alone, so until something is applied (or a batch carries reports) it would find nothing again: the
    /// rounds that heartbeats and the ticker cause skip it.
    sweeps_idle_at: Option<u64>,
    /// What the sweep controller need not look up again (see [`crate::sweep::controller::Memo`]).
    sweeps_memo: crate::sweep::controller::Memo,
    leading: bool,
    /// The term `leading` refers to.
    term: u64,
}

impl Hub {
    pub(super) fn new(
        shared: Shared,
        events: mpsc::Receiver<HubEvent>,
        lease: Duration,
        scheduler: SchedulerConfig,
    ) -> Hub {
        Hub {
            shared,
            events,
            lease,
            scheduler,
            sessions: HashMap::new(),
            leases: HashMap::new(),
            registrations: HashMap::new(),
            reports: Vec::new(),
            proposing: false,
            sweeps_idle_at: None,
            sweeps_memo: Default::default(),
            leading: false,
            term: 0,
        }
    }

    pub(super) async fn run(mut self) {
        let mut view = self.shared.view.clone();
        let shutdown = self.shared.shutdown.clone();
        let mut ticker = tokio::time::interval(ROUND_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = view.changed() => if changed.is_err() { return },
                event = self.events.recv() => match event {
                    Some(event) => self.handle(event),
                    None => return,
                },
                _ = ticker.tick() => {}
            }
            // Take whatever else is queued, so one round answers many messages.
            while let Ok(event) = self.events.try_recv() {
                self.handle(event);
            }
            let current = view.borrow_and_update().clone();
            self.round(&current);
        }
    }

    fn handle(&mut self, event: HubEvent) {
        match event {
            HubEvent::Connected {
                worker,
                session,
                outbound,
            } => {
                if !self.leading {
                    // Leadership went between the handler's check and here: dropping `outbound` ends the
                    // stream, and the worker looks for the leader again.
                    return;
                }
                self.leases.insert(worker, Instant::now());
                self.sessions.insert(
                    worker,
                    Session {
                        id: session,
                        outbound,
                        assigned: HashSet::new(),
                        standby: HashSet::new(),
                        killed: HashSet::new(),
                        running: BTreeSet::new(),
                    },
                );
            }
            HubEvent::Heartbeat {
                worker,
                session,
                running,
                unacknowledged,
            } => {
                let Some(current) = self.sessions.get_mut(&worker).filter(|current| current.id == session) else {
                    return;
                };
                current.running = running.into_iter().collect();
                self.leases.insert(worker, Instant::now());
                self.reports.extend(
                    unacknowledged
                        .into_iter()
                        .map(|(task, outcome)| (worker, task, outcome)),
                );
                // Every heartbeat is answered, so a worker can tell a live leader from a silent one (it
                // stops its tasks when cut off for too long; see the worker's agent).
                self.send(
                    worker,
                    pb::leader_message::Kind::Acknowledged(pb::ReportsAcknowledged { tasks: Vec::new() }),
                );
            }
            HubEvent::Report {
                worker,
                session,
                task,
                outcome,
            } => {
                if self.sessions.get(&worker).is_some_and(|current| current.id == session) {
                    self.leases.insert(worker, Instant::now());
                    self.reports.push((worker, task, outcome));
                }
            }
            HubEvent::Disconnected { worker, session } => {
                if self.sessions.get(&worker).is_some_and(|current| current.id == session) {
                    self.sessions.remove(&worker);
                }
            }
            HubEvent::Leases { reply } => {
                let ages = self.leading.then(|| {
                    self.leases
                        .iter()
                        .map(|(worker, heard)| (*worker, heard.elapsed().as_millis() as i64))
                        .collect()
                });
                let _ = reply.send(ages);
            }
            HubEvent::Proposed { acknowledge, committed } => {
                self.proposing = false;
                if !committed {
                    return;
                }
                let mut by_worker: BTreeMap<WorkerId, Vec<pb::TaskKey>> = BTreeMap::new();
                for (worker, task) in acknowledge {
                    by_worker.entry(worker).or_default().push(task_key_to_proto(&task));
                }
                for (worker, tasks) in by_worker {
                    self.send(
                        worker,
                        pb::leader_message::Kind::Acknowledged(pb::ReportsAcknowledged { tasks }),
                    );
                }
            }
        }
    }

    fn send(&mut self, worker: WorkerId, kind: pb::leader_message::Kind) {
        let Some(session) = self.sessions.get(&worker) else {
            return;
        };
        let message = pb::LeaderMessage { kind: Some(kind) };
        if session.outbound.try_send(Ok(message)).is_err() {
            // Full or gone: drop the session; the worker reconnects and is reconciled from scratch.
            tracing::warn!(worker, "a worker's stream is full or closed; dropping its session");
            self.sessions.remove(&worker);
        }
    }

    fn round(&mut self, view: &AppliedView) {
        // A new term means a new leadership even when this node led before it (the watch keeps only the
        // latest view, so a step-down in between may not have been seen): start the soft state afresh.
        if !view.leader_ready || view.term != self.term {
            if self.leading {
                tracing::info!(
                    node = self.shared.node_id,
                    "no longer the leader; dropping worker sessions"
                );
            }
            self.leading = false;
            self.sessions.clear();
            self.leases.clear();
            self.registrations.clear();
            self.reports.clear();
            self.sweeps_idle_at = None;
            self.sweeps_memo = Default::default();
            self.term = view.term;
            if !view.leader_ready {
                return;
            }
        }
        let now = Instant::now();
        if !self.leading {
            self.leading = true;
            // Workers need a moment to find the new leader: their leases start half a lease later.
            let start = now + self.lease / 2;
            for worker in view.state.workers().filter(|worker| worker.state == WorkerState::Alive) {
                self.leases.insert(worker.id, start);
                self.registrations.insert(worker.id, worker.registrations);
            }
            tracing::info!(node = self.shared.node_id, "leading: scheduling and accepting workers");
        }
        // Assignments first: a placement just committed goes to its worker before the next round's decisions
        // (the sweep controller, the scheduler) are computed, so they are not on the path to its start.
        self.sync_sessions(&view.state);
        self.propose(view, now);
    }

    fn propose(&mut self, view: &AppliedView, now: Instant) {
        if self.proposing {
            return;
        }
        let now_ms = now_ms();
        let mut commands = Vec::new();
        let mut acknowledge = Vec::new();
        let mut seen = HashSet::new();
        let mut reports = std::mem::take(&mut self.reports).into_iter();
        for (worker, task, outcome) in reports.by_ref() {
            if !seen.insert((worker, task)) {
                continue;
            }
            let still_running = view
                .state
                .task(&task)
                .is_some_and(|record| record.worker == worker && record.state == TaskState::Running);
            if still_running {
                commands.push(Command::TaskFinished {
                    task,
                    worker,
                    outcome,
                    now_ms,
                });
            }
            // Acknowledged only with the command that carries it (or when there is nothing to carry).
            acknowledge.push((worker, task));
            if commands.len() == BATCH_COMMANDS_MAX {
                break;
            }
        }
        // What did not fit waits for the next batch.
        self.reports.extend(reports);
        for worker in view.state.workers().filter(|worker| worker.state == WorkerState::Alive) {
            // A registration (a restart, or a return after being declared lost) starts a fresh lease;
            // otherwise the silence before it would get the worker declared lost again at once.
            if self.registrations.insert(worker.id, worker.registrations) != Some(worker.registrations) {
                self.leases.insert(worker.id, now);
            }
            let heard = *self.leases.entry(worker.id).or_insert(now);
            let silent = now.saturating_duration_since(heard);
            if silent > self.lease && commands.len() < BATCH_COMMANDS_MAX {
                commands.push(Command::WorkerLost {
                    worker: worker.id,
                    registrations: worker.registrations,
                    reason: format!(
                        "worker {} missed its lease: nothing heard for {:.1} s (lease {:.1} s)",
                        worker.id,
                        silent.as_secs_f64(),
                        self.lease.as_secs_f64()
                    ),
                    now_ms,
                });
            }
        }
        // The sweeps and the scheduler decide on the state as this batch will leave it: the batch so far is
        // applied to a copy (persistent maps: the copy is cheap). So a finished trial's slot goes to its
        // sweep's next trial, submitted and placed in the same commit as the report that freed it.
        let mut ahead = view.state.clone();
        let mut scratch = Vec::new();
        for command in &commands {
            ahead.apply(command.clone(), &mut scratch);
        }
        let sweeps_may_act = !commands.is_empty() || self.sweeps_idle_at != Some(view.applied_index);
        if sweeps_may_act && commands.len() < BATCH_COMMANDS_MAX {
            let room = BATCH_COMMANDS_MAX - commands.len();
            let mut decided = crate::sweep::controller::decide(&ahead, now_ms, &mut self.sweeps_memo);
            decided.extend(crate::deployment::decide(&ahead, now_ms));
            // Only an empty answer is remembered: commands that fail to commit are decided again next round.
            self.sweeps_idle_at = (decided.is_empty() && commands.is_empty()).then_some(view.applied_index);
            for command in decided.into_iter().take(room) {
                ahead.apply(command.clone(), &mut scratch);
                commands.push(command);
            }
        }
        if commands.len() < BATCH_COMMANDS_MAX {
            let decisions = schedule_state(&ahead, now_ms, &self.scheduler);
            let room = BATCH_COMMANDS_MAX - commands.len();
            commands.extend(decisions.into_iter().take(room).filter_map(|decision| {
                if view.state.job(decision.job).is_some() {
                    return Some(decision.into_command(now_ms));
                }
                // Submitted by this batch: its id is only known once applied, its idempotency key now.
                let idempotency_key = ahead.job(decision.job)?.idempotency_key.clone();
                (!idempotency_key.is_empty()).then_some(Command::StartAttemptByKey {
                    idempotency_key,
                    attempt: decision.attempt,
                    placement: decision.placement,
                    master_port: decision.master_port,
                    now_ms,
                })
            }));
        }
        if commands.is_empty() {
            if !acknowledge.is_empty() {
                // Nothing to commit: every report was already applied.
                self.handle(HubEvent::Proposed {
                    acknowledge,
                    committed: true,
                });
            }
            return;
        }
        self.proposing = true;
        let shared = self.shared.clone();
        let hub = self.shared.hub.clone();
        tokio::spawn(async move {
            let committed = match shared.propose(Command::Batch(commands)).await {
                Ok(_) => true,
                Err(error) => {
                    tracing::debug!(%error, "a scheduling batch was not committed");
                    false
                }
            };
            let _ = hub.send(HubEvent::Proposed { acknowledge, committed }).await;
        });
    }

    fn sync_sessions(&mut self, state: &StateMachine) {
        let workers: Vec<WorkerId> = self.sessions.keys().copied().collect();
        for worker_id in workers {
            let Some(worker) = state
                .worker(worker_id)
                .filter(|worker| worker.state == WorkerState::Alive)
            else {
                let reason = state.worker(worker_id).map_or_else(
                    || format!("worker {worker_id} is not registered"),
                    |worker| worker.message.clone(),
                );
                self.send(
                    worker_id,
                    pb::leader_message::Kind::Reregister(pb::ReRegister { reason }),
                );
                self.sessions.remove(&worker_id);
                continue;
            };
            let mut messages = Vec::new();
            let session = self.sessions.get_mut(&worker_id).expect("listed above");
            // The tasks standing by here: behind a task of this worker.
            let standby: BTreeMap<TaskKey, TaskKey> = state
                .standby()
                .filter(|(after, _)| state.task(after).is_some_and(|task| task.worker == worker_id))
                .filter_map(|(after, job)| {
                    let attempt = state.job(job)?.attempts.len() as u32 + 1;
                    Some((TaskKey { job, attempt, rank: 0 }, after))
                })
                .collect();
            // A standby that left: started in the state (sent already), or withdrawn (stopped on the worker).
            for key in session.standby.clone() {
                if standby.contains_key(&key) {
                    continue;
                }
                session.standby.remove(&key);
                if worker.tasks.contains(&key) {
                    session.assigned.insert(key);
                } else if session.killed.insert(key) {
                    messages.push(kill(&key, "its standby placement was withdrawn"));
                }
            }
            for (key, after) in &standby {
                if !session.running.contains(key) && session.standby.insert(*key) {
                    messages.push(assign_standby(state, key, after));
                }
            }
            for key in &worker.tasks {
                let Some(task) = state.task(key) else { continue };
                if task.stop_requested {
                    if session.killed.insert(*key) {
                        messages.push(kill(key, "its attempt ended or the job was cancelled"));
                    }
                } else if !session.running.contains(key) && session.assigned.insert(*key) {
                    messages.push(assign(state, key));
                }
            }
            for key in &session.running {
                if !worker.tasks.contains(key) && !standby.contains_key(key) && session.killed.insert(*key) {
                    messages.push(kill(key, "the cluster does not run this task here"));
                }
            }
            // Forget what no longer matters, so a long session's memory stays bounded by its live tasks:
            // an ended task is never assigned again, and a kill is remembered while the worker runs it.
            let running = &session.running;
            session.assigned.retain(|key| worker.tasks.contains(key));
            session
                .killed
                .retain(|key| worker.tasks.contains(key) || running.contains(key) || standby.contains_key(key));
            for kind in messages.into_iter().flatten() {
                self.send(worker_id, kind);
            }
        }
    }
}

fn kill(key: &TaskKey, reason: &str) -> Option<pb::leader_message::Kind> {
    Some(pb::leader_message::Kind::Kill(pb::KillTask {
        task: Some(task_key_to_proto(key)),
        reason: reason.to_string(),
    }))
}

fn assign(state: &StateMachine, key: &TaskKey) -> Option<pb::leader_message::Kind> {
    let job = state.job(key.job)?;
    let attempt = job.attempts.get(key.attempt as usize - 1)?;
    let task = attempt.tasks.get(key.rank as usize)?;
    Some(pb::leader_message::Kind::Assign(pb::AssignTask {
        world_size: attempt.tasks.len() as u32,
        local_rank: task.local_rank,
        local_world_size: task.local_world_size,
        master_addr: attempt.master_addr.clone(),
        master_port: attempt.master_port.into(),
        ..assignment(job, key)
    }))
}

/// The assignment of standby task `key` (rank 0 of a single-rank job's next attempt): it takes the place
/// of `after`, its worker's host and `MASTER_PORT` included.
fn assign_standby(state: &StateMachine, key: &TaskKey, after: &TaskKey) -> Option<pb::leader_message::Kind> {
    let job = state.job(key.job)?;
    let before = state.job(after.job)?.attempts.get(after.attempt as usize - 1)?;
    Some(pb::leader_message::Kind::Assign(pb::AssignTask {
        world_size: 1,
        local_rank: 0,
        local_world_size: 1,
        master_addr: before.master_addr.clone(),
        master_port: before.master_port.into(),
        after: Some(task_key_to_proto(after)),
        ..assignment(job, key)
    }))
}

/// What every assignment of a task of `job` carries.
fn assignment(job: &crate::state::Job, key: &TaskKey) -> pb::AssignTask {
    pb::AssignTask {
        task: Some(task_key_to_proto(key)),
        job_name: job.spec.name.clone(),
        kind: job.spec.kind.label().to_string(),
        command: job.spec.command.clone(),
        args: job.spec.args.clone(),
        env: job.spec.env.clone().into_iter().collect(),
        resources: Some(pb::WorkerResources {
            cpus: job.spec.resources.cpus,
            gpus: job.spec.resources.gpus,
            memory_bytes: job.spec.resources.memory_bytes,
        }),
        spec_toml: job.spec_toml.clone(),
        ..Default::default()
    }
}

pub(super) fn task_key_to_proto(key: &TaskKey) -> pb::TaskKey {
    pb::TaskKey {
        job_id: key.job,
        attempt: key.attempt,
        rank: key.rank,
    }
}

fn task_key_from_proto(key: Option<pb::TaskKey>) -> Result<TaskKey, Status> {
    let key = key.ok_or_else(|| Status::invalid_argument("a task key is missing"))?;
    if key.attempt == 0 {
        return Err(Status::invalid_argument(
            "task attempt 0 does not exist; attempts start at 1",
        ));
    }
    Ok(TaskKey {
        job: key.job_id,
        attempt: key.attempt,
        rank: key.rank,
    })
}

fn report_from_proto(report: pb::TaskReport) -> Result<(TaskKey, TaskOutcome), Status> {
    let task = task_key_from_proto(report.task)?;
    let outcome = match report.outcome {
        Some(pb::task_report::Outcome::ExitCode(code)) => TaskOutcome::Exited { code },
        Some(pb::task_report::Outcome::Signal(signal)) => TaskOutcome::Signalled { signal },
        Some(pb::task_report::Outcome::FailedToStart(message)) => TaskOutcome::FailedToStart { message },
        None => return Err(Status::invalid_argument(format!("the report of {task} has no outcome"))),
    };
    Ok((task, outcome))
}

fn resources_to_proto(capacity: &crate::state::Capacity) -> pb::WorkerResources {
    pb::WorkerResources {
        cpus: capacity.cpus,
        gpus: capacity.gpus,
        memory_bytes: capacity.memory_bytes,
    }
}

pub(super) fn worker_to_proto(worker: &Worker, heartbeat_age_ms: Option<i64>) -> pb::WorkerInfo {
    pb::WorkerInfo {
        id: worker.id,
        uid: worker.uid.clone(),
        address: worker.address.clone(),
        host: worker.host.clone(),
        hostname: worker.hostname.clone(),
        state: worker.state.label().to_string(),
        total: Some(resources_to_proto(&worker.capacity)),
        free: Some(resources_to_proto(&worker.free())),
        running: worker.tasks.iter().map(task_key_to_proto).collect(),
        registered_at_ms: worker.registered_at_ms,
        updated_at_ms: worker.updated_at_ms,
        last_heartbeat_age_ms: heartbeat_age_ms.unwrap_or(-1),
        registrations: worker.registrations,
        message: worker.message.clone(),
        task_port_low: worker.task_ports.0.into(),
        task_port_high: worker.task_ports.1.into(),
        lease_ms: 0,
    }
}

fn registration_from_proto(request: pb::RegisterWorkerRequest) -> Result<WorkerRegistration, Status> {
    if request.uid.is_empty() || request.uid.len() > 128 {
        return Err(Status::invalid_argument(format!(
            "worker uid is {} bytes; expected 1 to 128",
            request.uid.len()
        )));
    }
    validate_host_port(&request.address)?;
    if request.host.is_empty() {
        return Err(Status::invalid_argument(
            "worker host is empty; expected the address other ranks reach it at",
        ));
    }
    let resources = request.resources.unwrap_or_default();
    if resources.cpus == 0 {
        return Err(Status::invalid_argument(
            "worker offers 0 CPU slots; expected at least 1",
        ));
    }
    let ports = (request.task_port_low, request.task_port_high);
    if ports.0 == 0 || ports.1 > u32::from(u16::MAX) || ports.0 > ports.1 {
        return Err(Status::invalid_argument(format!(
            "task port range {}-{} is not valid; expected LOW-HIGH within 1-65535, LOW <= HIGH",
            ports.0, ports.1
        )));
    }
    Ok(WorkerRegistration {
        uid: request.uid,
        address: request.address,
        host: request.host,
        hostname: request.hostname,
        capacity: crate::state::Capacity {
            cpus: resources.cpus,
            gpus: resources.gpus,
            memory_bytes: resources.memory_bytes,
        },
        task_ports: (ports.0 as u16, ports.1 as u16),
    })
}

impl Shared {
    pub(super) async fn worker_leases(&self) -> Result<WriteOutcome, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        self.hub
            .send(HubEvent::Leases { reply })
            .await
            .map_err(|_| CoordinatorError::Unavailable("the coordinator is shutting down".into()))?;
        match answer.await {
            Ok(Some(ages_ms)) => Ok(WriteOutcome::Leases { ages_ms }),
            _ => {
                let status = self.status().await?;
                Err(CoordinatorError::NotLeader {
                    node_id: self.node_id,
                    leader_id: (status.leader_id != 0).then_some(status.leader_id),
                })
            }
        }
    }

    async fn heartbeat_ages(&self) -> BTreeMap<WorkerId, i64> {
        match self.execute(Request::WorkerLeases).await {
            Ok(WriteOutcome::Leases { ages_ms }) => ages_ms,
            _ => BTreeMap::new(),
        }
    }

    /// Answers UNAVAILABLE naming the leader, so a worker moves on to it.
    async fn require_ready_leader(&self) -> Result<(), Status> {
        if self.view.borrow().leader_ready {
            return Ok(());
        }
        let status = self.status().await?;
        let leader = status.member_addrs.get(&status.leader_id).cloned().unwrap_or_default();
        Err(Status::unavailable(format!(
            "node {} is not the leader (leader: {}); workers connect to the leader",
            self.node_id,
            if status.leader_id == 0 {
                "unknown".to_string()
            } else {
                format!("node {} at raft address {leader}", status.leader_id)
            }
        )))
    }
}

static SESSIONS: AtomicU64 = AtomicU64::new(0);

/// How long a rank waits for the others when it does not say.
const RENDEZVOUS_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// The ranks of one attempt that have arrived so far.
pub(super) struct RendezvousTable {
    addresses: Vec<Option<String>>,
    blob: Vec<u8>,
    done: tokio::sync::watch::Sender<Option<(Vec<String>, Vec<u8>)>>,
}

impl Shared {
    /// Checks that `attempt` is the job's current, running attempt with `world_size` ranks.
    fn check_rendezvous(&self, request: &pb::RendezvousRequest) -> Result<(), Status> {
        let view = self.view.borrow();
        let id = request.job_id;
        let job = view
            .state
            .job(id)
            .ok_or_else(|| Status::not_found(format!("job {id} does not exist")))?;
        let current = job.attempts.last();
        let running = current.is_some_and(|attempt| {
            attempt.number == request.attempt && attempt.state == crate::state::AttemptState::Running
        });
        if !running {
            return Err(Status::failed_precondition(format!(
                "job {id} attempt {} is not running (the job is {}, its latest attempt is {}); a rank of an earlier attempt cannot join",
                request.attempt,
                job.state.label(),
                current.map_or(0, |attempt| attempt.number)
            )));
        }
        let ranks = current.map_or(0, |attempt| attempt.tasks.len()) as u32;
        if request.world_size != ranks || request.rank >= ranks {
            return Err(Status::invalid_argument(format!(
                "rank {} of world size {} does not fit job {id} attempt {}, which has {ranks} ranks",
                request.rank, request.world_size, request.attempt
            )));
        }
        Ok(())
    }

    async fn rendezvous_of(&self, request: pb::RendezvousRequest) -> Result<pb::RendezvousResponse, Status> {
        self.require_ready_leader().await?;
        validate_host_port(&request.address)?;
        self.check_rendezvous(&request)?;
        let key = (request.job_id, request.attempt);
        let mut done = {
            let mut tables = self.rendezvous.lock().expect("rendezvous table poisoned");
            // Forget the tables of attempts that are over.
            {
                let view = self.view.borrow();
                tables.retain(|(job, attempt), _| {
                    view.state
                        .job(*job)
                        .and_then(|job| job.attempts.last())
                        .is_some_and(|last| {
                            last.number == *attempt && last.state == crate::state::AttemptState::Running
                        })
                });
            }
            let table = tables.entry(key).or_insert_with(|| RendezvousTable {
                addresses: vec![None; request.world_size as usize],
                blob: Vec::new(),
                done: tokio::sync::watch::channel(None).0,
            });
            table.addresses[request.rank as usize] = Some(request.address.clone());
            if request.rank == 0 {
                table.blob = request.blob.clone();
            }
            if table.addresses.iter().all(Option::is_some) {
                let addresses = table.addresses.iter().flatten().cloned().collect();
                table.done.send_replace(Some((addresses, table.blob.clone())));
            }
            table.done.subscribe()
        };
        let timeout = match request.timeout_ms {
            0 => RENDEZVOUS_TIMEOUT_DEFAULT,
            milliseconds => Duration::from_millis(milliseconds.into()),
        };
        let arrived = tokio::time::timeout(timeout, done.wait_for(Option::is_some)).await;
        match arrived {
            Ok(Ok(value)) => {
                let (addresses, blob) = value.clone().expect("waited for Some");
                Ok(pb::RendezvousResponse { addresses, blob })
            }
            Ok(Err(_)) => Err(Status::unavailable("the rendezvous was reset; ask again")),
            Err(_) => {
                let missing: Vec<String> = self
                    .rendezvous
                    .lock()
                    .expect("rendezvous table poisoned")
                    .get(&key)
                    .map(|table| {
                        table
                            .addresses
                            .iter()
                            .enumerate()
                            .filter(|(_, address)| address.is_none())
                            .map(|(rank, _)| rank.to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                Err(Status::deadline_exceeded(format!(
                    "rendezvous of job {} attempt {}: rank(s) {} did not arrive within {} s",
                    request.job_id,
                    request.attempt,
                    missing.join(", "),
                    timeout.as_secs_f64()
                )))
            }
        }
    }
}

#[tonic::async_trait]
impl WorkerService for Shared {
    async fn register(
        &self,
        request: GrpcRequest<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        let registration = registration_from_proto(request.into_inner())?;
        match self.execute(Request::RegisterWorker(registration)).await? {
            WriteOutcome::WorkerRegistered { worker } => {
                tracing::info!(worker = worker.id, address = %worker.address, "worker registered");
                let mut info = worker_to_proto(&worker, None);
                info.lease_ms = self.worker_lease.as_millis() as u64;
                Ok(Response::new(info))
            }
            other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
        }
    }

    type SessionStream = tokio_stream::wrappers::ReceiverStream<Result<pb::LeaderMessage, Status>>;

    async fn session(
        &self,
        request: GrpcRequest<tonic::Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.require_ready_leader().await?;
        let mut inbound = request.into_inner();
        let hello = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s; a worker stream starts with one"))?;
        let hello = match hello? {
            Some(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Hello(hello)),
            }) => hello,
            _ => return Err(Status::invalid_argument("a worker stream must start with a hello")),
        };
        let worker_id = hello.worker_id;
        {
            let view = self.view.borrow();
            let Some(worker) = view.state.worker(worker_id) else {
                return Err(Status::not_found(format!(
                    "worker {worker_id} is not registered (unknown worker id); register first"
                )));
            };
            if worker.uid != hello.uid {
                return Err(Status::permission_denied(format!(
                    "worker id {worker_id} belongs to another worker (its uid differs); register to get your own id"
                )));
            }
            if worker.state != WorkerState::Alive {
                return Err(Status::failed_precondition(format!(
                    "worker {worker_id} was declared lost ({}); register again",
                    worker.message
                )));
            }
        }
        let session = SESSIONS.fetch_add(1, Ordering::Relaxed) + 1;
        let (outbound, receiver) = mpsc::channel(SESSION_QUEUE_MESSAGES);
        self.hub
            .send(HubEvent::Connected {
                worker: worker_id,
                session,
                outbound,
            })
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        tracing::info!(worker = worker_id, session, "worker connected");
        let hub = self.hub.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    () = shutdown.cancelled() => break,
                };
                let event = match message {
                    Ok(Some(pb::WorkerMessage { kind: Some(kind) })) => match kind {
                        pb::worker_message::Kind::Heartbeat(heartbeat) => {
                            let running = heartbeat
                                .running
                                .into_iter()
                                .filter_map(|key| task_key_from_proto(Some(key)).ok())
                                .collect();
                            let unacknowledged = heartbeat
                                .unacknowledged
                                .into_iter()
                                .filter_map(|report| report_from_proto(report).ok())
                                .collect();
                            HubEvent::Heartbeat {
                                worker: worker_id,
                                session,
                                running,
                                unacknowledged,
                            }
                        }
                        pb::worker_message::Kind::Report(report) => match report_from_proto(report) {
                            Ok((task, outcome)) => HubEvent::Report {
                                worker: worker_id,
                                session,
                                task,
                                outcome,
                            },
                            Err(status) => {
                                tracing::warn!(worker = worker_id, %status, "a malformed task report was ignored");
                                continue;
                            }
                        },
                        pb::worker_message::Kind::Hello(_) => continue,
                    },
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                };
                if hub.send(event).await.is_err() {
                    break;
                }
            }
            let _ = hub
                .send(HubEvent::Disconnected {
                    worker: worker_id,
                    session,
                })
                .await;
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }

    async fn list(
        &self,
        _request: GrpcRequest<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let QueryResult::Workers(workers) = self.query(Query::ListWorkers).await? else {
            return Err(Status::internal("unexpected result listing workers"));
        };
        let ages = self.heartbeat_ages().await;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: workers
                .iter()
                .map(|worker| worker_to_proto(worker, ages.get(&worker.id).copied()))
                .collect(),
        }))
    }

    async fn rendezvous(
        &self,
        request: GrpcRequest<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        Ok(Response::new(self.rendezvous_of(request.into_inner()).await?))
    }

    async fn get(&self, request: GrpcRequest<pb::GetWorkerRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        let id = request.into_inner().id;
        let QueryResult::Workers(workers) = self.query(Query::GetWorker { id }).await? else {
            return Err(Status::internal("unexpected result reading a worker"));
        };
        let ages = self.heartbeat_ages().await;
        let worker = workers
            .first()
            .ok_or_else(|| Status::not_found(format!("worker {id} does not exist")))?;
        Ok(Response::new(worker_to_proto(worker, ages.get(&id).copied())))
    }
}
