//! The scheduler: a pure function from the cluster's view to placement decisions. The leader runs it
//! whenever the state changes and proposes its decisions as `StartAttempt` commands; apply re-checks
//! each one, so a decision made on a stale view is refused, never half applied.
//!
//! ```text
//!   StateMachine ──ClusterView::of──► ClusterView ──schedule(now)──► [Decision] ──► Command::StartAttempt
//!   (workers, queue, ports in use)     (a plain value, no IO)          (job, attempt, rank → worker, port)
//! ```
//!
//! Rules:
//! - Gangs: every rank of a job is placed in one decision, or none is. Capacity is never over-committed:
//!   a worker's free capacity already counts ranks that are still stopping.
//! - Order: priority (higher first), then submission order. A job that does not fit is skipped and jobs
//!   behind it may start (backfill), but only for `backfill_window_ms` after it entered the queue; past
//!   that, nothing behind it starts until it fits, so it cannot starve. A job that would not fit even on
//!   the idle cluster (workers were lost) never blocks the others.
//! - Placement: a job's ranks go to as few workers as possible (fewer hops for all-reduce); among equally
//!   good workers the least loaded wins, which spreads independent jobs.
//! - `MASTER_PORT`: a port from rank 0's worker's reserved range that no running task on the same host
//!   uses, starting at an offset derived from the job and attempt so a restart tries a different port.
//!
//! Left out: preemption, gang reservations with run-time estimates (EASY backfill), topology beyond
//! "same worker".

use std::collections::BTreeSet;

use crate::state::{Capacity, Command, JobId, StateMachine, WorkerId, WorkerState};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// How long a job that does not fit may be passed by jobs behind it.
    pub backfill_window_ms: i64,
    /// Queued jobs looked at per round, so one round stays cheap with a long queue.
    pub queue_scan_max: usize,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            backfill_window_ms: 30_000,
            queue_scan_max: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub id: WorkerId,
    pub host: String,
    pub capacity: Capacity,
    pub free: Capacity,
    pub task_ports: (u16, u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub id: JobId,
    /// The number the next attempt gets.
    pub attempt: u32,
    pub ranks: u32,
    /// The fewest ranks this attempt may start with: `ranks`, except for a restart of a job with
    /// `min_workers` (elastic), which takes as many ranks as fit, down to this, once the whole gang no
    /// longer fits the alive workers (a worker was lost). While it still would, the restart waits for
    /// every rank: a rank that merely crashed does not shrink the job.
    pub min_ranks: u32,
    pub need: Capacity,
    pub queued_since_ms: i64,
}

/// What the scheduler looks at: alive workers in id order, queued jobs in scheduling order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub workers: Vec<WorkerView>,
    pub queue: Vec<QueuedJob>,
    /// `(host, port)` pairs held by running attempts' rank 0.
    pub ports_in_use: BTreeSet<(String, u16)>,
}

fn queued_job(job: &crate::state::Job) -> QueuedJob {
    QueuedJob {
        id: job.id,
        attempt: job.attempts.len() as u32 + 1,
        ranks: job.spec.resources.workers,
        min_ranks: job.min_ranks(),
        need: Capacity::of_rank(&job.spec.resources),
        queued_since_ms: job.queued_since_ms,
    }
}

impl ClusterView {
    /// The view with its whole queue (up to `queue_scan_max`), for tests and inspection. The leader uses
    /// [`schedule_state`], which reads the queue only as far as a round gets.
    pub fn of(state: &StateMachine, config: &SchedulerConfig) -> ClusterView {
        let mut view = ClusterView::without_queue(state);
        view.queue = state
            .queued_jobs()
            .take(config.queue_scan_max)
            .map(queued_job)
            .collect();
        view
    }

    fn without_queue(state: &StateMachine) -> ClusterView {
        let workers = state
            .workers()
            .filter(|worker| worker.state == WorkerState::Alive)
            .map(|worker| WorkerView {
                id: worker.id,
                host: worker.host.clone(),
                capacity: worker.capacity,
                free: worker.free(),
                task_ports: worker.task_ports,
            })
            .collect();
        let mut ports_in_use = BTreeSet::new();
        for worker in state.workers() {
            for key in &worker.tasks {
                if let Some(attempt) = state
                    .job(key.job)
                    .and_then(|job| job.attempts.get(key.attempt as usize - 1))
                {
                    ports_in_use.insert((attempt.master_addr.clone(), attempt.master_port));
                }
            }
        }
        ClusterView {
            workers,
            queue: Vec::new(),
            ports_in_use,
        }
    }
}

/// One scheduling round straight from the state: the same decisions as `schedule(&ClusterView::of(..))`,
/// but the queue is read lazily, so a round with no free slot costs nothing however long the queue is.
pub fn schedule_state(state: &StateMachine, now_ms: i64, config: &SchedulerConfig) -> Vec<Decision> {
    let view = ClusterView::without_queue(state);
    schedule_jobs(
        &view,
        state.queued_jobs().take(config.queue_scan_max).map(queued_job),
        now_ms,
        config,
    )
}

/// Start attempt `attempt` of `job` with rank r on `placement[r]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub job: JobId,
    pub attempt: u32,
    pub placement: Vec<WorkerId>,
    pub master_port: u16,
}

impl Decision {
    pub fn into_command(self, now_ms: i64) -> Command {
        Command::StartAttempt {
            job: self.job,
            attempt: self.attempt,
            placement: self.placement,
            master_port: self.master_port,
            now_ms,
        }
    }
}

/// One scheduling round.
pub fn schedule(view: &ClusterView, now_ms: i64, config: &SchedulerConfig) -> Vec<Decision> {
    schedule_jobs(view, view.queue.iter().cloned(), now_ms, config)
}

/// The round itself, over `view`'s workers and ports and the given queue (in scheduling order).
fn schedule_jobs(
    view: &ClusterView,
    queue: impl Iterator<Item = QueuedJob>,
    now_ms: i64,
    config: &SchedulerConfig,
) -> Vec<Decision> {
    let mut free: Vec<Capacity> = view.workers.iter().map(|worker| worker.free).collect();
    let mut ports = view.ports_in_use.clone();
    let mut decisions = Vec::new();
    for job in queue {
        let job = &job;
        // Every rank needs a CPU slot: with none free anywhere, nothing further can be placed.
        if free.iter().all(|capacity| capacity.cpus == 0) {
            break;
        }
        let can_lead = |index: usize| pick_port(job, &view.workers[index], &ports).is_some();
        let shrinkable = job.min_ranks < job.ranks
            && !fits_idle(
                &QueuedJob {
                    min_ranks: job.ranks,
                    ..job.clone()
                },
                &view.workers,
            );
        let job = &QueuedJob {
            min_ranks: if shrinkable { job.min_ranks } else { job.ranks },
            ..job.clone()
        };
        let placed = place(job, &view.workers, &free, can_lead).map(|placement| {
            let port = pick_port(job, &view.workers[placement[0]], &ports).expect("rank 0's host has a free port");
            (placement, port)
        });
        match placed {
            Some((placement, port)) => {
                for index in &placement {
                    free[*index] = free[*index].minus(&job.need);
                }
                ports.insert((view.workers[placement[0]].host.clone(), port));
                decisions.push(Decision {
                    job: job.id,
                    attempt: job.attempt,
                    placement: placement.iter().map(|index| view.workers[*index].id).collect(),
                    master_port: port,
                });
            }
            None => {
                let waited_ms = now_ms.saturating_sub(job.queued_since_ms);
                if waited_ms >= config.backfill_window_ms && fits_idle(job, &view.workers) {
                    break;
                }
            }
        }
    }
    decisions
}

/// Whether the job fits the alive workers when they are idle.
pub fn fits_idle(job: &QueuedJob, workers: &[WorkerView]) -> bool {
    let total: u64 = workers
        .iter()
        .map(|worker| u64::from(worker.capacity.ranks_that_fit(&job.need)))
        .sum();
    total >= u64::from(job.min_ranks)
}

/// Indices into `workers`, one per rank, with rank 0 on a worker that `can_lead` (its host has a port free for
/// `MASTER_PORT`), or `None` when the gang does not fit now. An elastic restart gets as many ranks as fit,
/// if that is at least its `min_ranks`.
fn place(
    job: &QueuedJob,
    workers: &[WorkerView],
    free: &[Capacity],
    can_lead: impl Fn(usize) -> bool,
) -> Option<Vec<usize>> {
    let mut candidates: Vec<(u32, u64, WorkerId, usize)> = workers
        .iter()
        .enumerate()
        .filter_map(|(index, worker)| {
            let fit = free[index].ranks_that_fit(&job.need).min(job.ranks);
            let used_permille = if worker.capacity.cpus == 0 {
                0
            } else {
                1000 - u64::from(free[index].cpus) * 1000 / u64::from(worker.capacity.cpus)
            };
            (fit > 0).then_some((fit, used_permille, worker.id, index))
        })
        .collect();
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    // Rank 0 goes to the roomiest worker that can lead, the other ranks to the roomiest workers first. No
    // placement uses fewer workers: any could swap its leader for this one, which has at least as much room.
    let leader = candidates.iter().position(|candidate| can_lead(candidate.3))?;
    let leader = candidates.remove(leader);
    let mut placement = Vec::with_capacity(job.ranks as usize);
    for (fit, _, _, index) in std::iter::once(leader).chain(candidates) {
        let take = fit.min(job.ranks - placement.len() as u32);
        placement.extend(std::iter::repeat_n(index, take as usize));
        if placement.len() == job.ranks as usize {
            return Some(placement);
        }
    }
    (placement.len() >= job.min_ranks as usize).then_some(placement)
}

fn pick_port(job: &QueuedJob, master: &WorkerView, ports: &BTreeSet<(String, u16)>) -> Option<u16> {
    let (low, high) = master.task_ports;
    if high < low {
        return None;
    }
    let span = u64::from(high - low) + 1;
    let offset = (job.id.wrapping_mul(31).wrapping_add(u64::from(job.attempt) * 7)) % span;
    (0..span)
        .map(|step| low + ((offset + step) % span) as u16)
        .find(|port| !ports.contains(&(master.host.clone(), *port)))
}

#[cfg(test)]
mod tests;
