//! The scheduler checked against its rules: property tests on random cluster views compare every round with
//! a brute-force reference, a tick-by-tick simulation checks the starvation bound, and example tests pin
//! spreading, packing, port choice and the round trip through the real state machine.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::spec::parse_job_spec;
use crate::state::{CommandResult, JobState, TaskKey, TaskOutcome, WorkerRegistration};

/// Few hosts, so workers often share one and their rank-0 ports collide.
const HOSTS: [&str; 3] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
/// Memory comes in whole units so that needs often fill a worker exactly, the edge a rounding bug would hit.
const MEMORY_UNIT: u64 = 256 << 20;
/// Enough ports for every job of a generated view to hold one on a single host.
const PLENTIFUL_PORTS: (u16, u16) = (20_000, 20_099);

#[derive(Debug, Clone)]
struct Scenario {
    view: ClusterView,
    now_ms: i64,
    config: SchedulerConfig,
}

fn capacity(cpus: u32, gpus: u32, memory_units: u64) -> Capacity {
    Capacity {
        cpus,
        gpus,
        memory_bytes: memory_units * MEMORY_UNIT,
    }
}

/// A worker's capacity and a free capacity no larger, idle more often than uniform so gangs fit often.
fn capacity_with_free() -> impl Strategy<Value = (Capacity, Capacity)> {
    (0u32..=8, 0u32..=4, 0u64..=32, proptest::bool::weighted(0.3)).prop_flat_map(|(cpus, gpus, memory_units, idle)| {
        (0..=cpus, 0..=gpus, 0..=memory_units).prop_map(move |(free_cpus, free_gpus, free_memory_units)| {
            let total = capacity(cpus, gpus, memory_units);
            let free = if idle {
                total
            } else {
                capacity(free_cpus, free_gpus, free_memory_units)
            };
            (total, free)
        })
    })
}

/// Small ranges (one to three ports, some at the top of the port space), large ones, and an empty one.
fn task_ports() -> impl Strategy<Value = (u16, u16)> {
    prop_oneof![
        3 => (29_500u16..=29_502, 0u16..=2).prop_map(|(low, extra)| (low, low + extra)),
        1 => (65_533u16..=65_535, 0u16..=2).prop_map(|(low, extra)| (low, low.saturating_add(extra))),
        2 => Just((29_500, 29_999)),
        1 => Just((29_510, 29_509)),
    ]
}

fn workers() -> impl Strategy<Value = Vec<WorkerView>> {
    proptest::collection::vec((1u64..=3, 0..HOSTS.len(), capacity_with_free(), task_ports()), 1..=6).prop_map(
        |workers| {
            let mut id = 0;
            workers
                .into_iter()
                .map(|(id_gap, host, (capacity, free), task_ports)| {
                    id += id_gap;
                    WorkerView {
                        id,
                        host: HOSTS[host].to_string(),
                        capacity,
                        free,
                        task_ports,
                    }
                })
                .collect()
        },
    )
}

fn queue() -> impl Strategy<Value = Vec<QueuedJob>> {
    let job = (1u64..=3, 1u32..=3, 1u32..=4, 1u32..=4, 0u32..=2, 0u64..=8, 0i64..=100);
    proptest::collection::vec(job, 0..=30).prop_map(|jobs| {
        let mut id = 0;
        jobs.into_iter()
            .map(|(id_gap, attempt, ranks, cpus, gpus, memory_units, queued_since_ms)| {
                id += id_gap;
                QueuedJob {
                    id,
                    attempt,
                    ranks,
                    min_ranks: ranks,
                    need: capacity(cpus, gpus, memory_units),
                    queued_since_ms,
                }
            })
            .collect()
    })
}

fn ports_in_use() -> impl Strategy<Value = BTreeSet<(String, u16)>> {
    let port = prop_oneof![29_500u16..=29_504, 65_533u16..=65_535];
    proptest::collection::vec((0..HOSTS.len(), port), 0..=6).prop_map(|ports| {
        ports
            .into_iter()
            .map(|(host, port)| (HOSTS[host].to_string(), port))
            .collect()
    })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (workers(), queue(), ports_in_use(), 0i64..=150, 0i64..=80).prop_map(
        |(workers, queue, ports_in_use, now_ms, backfill_window_ms)| Scenario {
            view: ClusterView {
                workers,
                queue,
                ports_in_use,
            },
            now_ms,
            config: SchedulerConfig {
                backfill_window_ms,
                ..SchedulerConfig::default()
            },
        },
    )
}

/// Scenarios where a port is always free, so only capacity decides whether a job fits.
fn scenario_with_plentiful_ports() -> impl Strategy<Value = Scenario> {
    scenario().prop_map(|mut scenario| {
        for worker in &mut scenario.view.workers {
            worker.task_ports = PLENTIFUL_PORTS;
        }
        scenario
    })
}

/// How many ranks of `need`, up to `limit`, fit in `free`, by taking them out one at a time: independent of
/// `Capacity::ranks_that_fit`, and bounded because a need of zero fits any number of times.
fn reference_ranks_that_fit(free: &Capacity, need: &Capacity, limit: u32) -> u32 {
    let mut left = *free;
    let mut count = 0;
    while count < limit && left.contains(need) {
        left = left.minus(need);
        count += 1;
    }
    count
}

fn reference_gang_fits(job: &QueuedJob, free: &[Capacity]) -> bool {
    let total: u32 = free
        .iter()
        .map(|free| reference_ranks_that_fit(free, &job.need, job.ranks))
        .sum();
    total >= job.ranks
}

fn reference_fits_idle(job: &QueuedJob, workers: &[WorkerView]) -> bool {
    let idle: Vec<Capacity> = workers.iter().map(|worker| worker.capacity).collect();
    reference_gang_fits(job, &idle)
}

/// The fewest workers a gang can be spread over with rank 0 on a worker that `can_lead`: for each possible
/// leader, fill the roomiest other workers first.
fn fewest_workers_for(job: &QueuedJob, free: &[Capacity], can_lead: impl Fn(usize) -> bool) -> Option<usize> {
    let fits: Vec<u32> = free
        .iter()
        .map(|free| reference_ranks_that_fit(free, &job.need, job.ranks))
        .collect();
    (0..fits.len())
        .filter(|leader| fits[*leader] > 0 && can_lead(*leader))
        .filter_map(|leader| {
            let mut others: Vec<u32> = (0..fits.len())
                .filter(|index| *index != leader)
                .map(|index| fits[index])
                .collect();
            others.sort_unstable_by(|a, b| b.cmp(a));
            let (mut placed, mut count) = (fits[leader], 1);
            for fit in others {
                if placed >= job.ranks {
                    break;
                }
                placed += fit;
                count += 1;
            }
            (placed >= job.ranks).then_some(count)
        })
        .min()
}

fn worker_index(view: &ClusterView, id: WorkerId) -> usize {
    view.workers
        .iter()
        .position(|worker| worker.id == id)
        .unwrap_or_else(|| panic!("worker {id} is not in the view"))
}

/// What the cluster looked like when the round reached one queued job.
struct Turn<'a> {
    job: &'a QueuedJob,
    decision: Option<&'a Decision>,
    free: Vec<Capacity>,
    ports: BTreeSet<(String, u16)>,
}

/// Replays the decisions in queue order on a copy of the free capacities and ports, recording what each job
/// saw at its turn. Capacity is taken out saturating, so a broken decision shows up in the checks that read
/// the turns rather than as a panic here.
fn replay<'a>(view: &'a ClusterView, decisions: &'a [Decision]) -> Vec<Turn<'a>> {
    let by_job: BTreeMap<JobId, &Decision> = decisions.iter().map(|decision| (decision.job, decision)).collect();
    let mut free: Vec<Capacity> = view.workers.iter().map(|worker| worker.free).collect();
    let mut ports = view.ports_in_use.clone();
    let mut turns = Vec::new();
    for job in &view.queue {
        let decision = by_job.get(&job.id).copied();
        turns.push(Turn {
            job,
            decision,
            free: free.clone(),
            ports: ports.clone(),
        });
        if let Some(decision) = decision {
            for worker in &decision.placement {
                let left = &mut free[worker_index(view, *worker)];
                *left = Capacity {
                    cpus: left.cpus.saturating_sub(job.need.cpus),
                    gpus: left.gpus.saturating_sub(job.need.gpus),
                    memory_bytes: left.memory_bytes.saturating_sub(job.need.memory_bytes),
                };
            }
            let master = &view.workers[worker_index(view, decision.placement[0])];
            ports.insert((master.host.clone(), decision.master_port));
        }
    }
    turns
}

fn check_never_over_commits(scenario: &Scenario, decisions: &[Decision]) -> Result<(), TestCaseError> {
    let view = &scenario.view;
    let mut used = vec![Capacity::default(); view.workers.len()];
    let mut ports = view.ports_in_use.clone();
    let mut previous_position = None;
    for decision in decisions {
        let position = view.queue.iter().position(|job| job.id == decision.job);
        prop_assert!(position.is_some(), "{decision:?} is for a job not in the queue");
        // Strictly increasing positions: decisions come in queue order, each job at most once.
        prop_assert!(
            position > previous_position,
            "{decision:?} is out of queue order or repeated"
        );
        previous_position = position;
        let job = &view.queue[position.unwrap_or_default()];
        prop_assert_eq!(decision.attempt, job.attempt);
        prop_assert_eq!(
            decision.placement.len(),
            job.ranks as usize,
            "a gang is placed whole: {:?}",
            decision
        );
        for worker in &decision.placement {
            let index = view.workers.iter().position(|candidate| candidate.id == *worker);
            prop_assert!(
                index.is_some(),
                "{decision:?} names worker {worker}, which is not in the view"
            );
            let index = index.unwrap_or_default();
            used[index] = used[index].plus(&job.need);
        }
        let master = &view.workers[worker_index(view, decision.placement[0])];
        let (low, high) = master.task_ports;
        prop_assert!(
            (low..=high).contains(&decision.master_port),
            "{decision:?}: port outside rank 0's range {low}-{high}"
        );
        prop_assert!(
            ports.insert((master.host.clone(), decision.master_port)),
            "{decision:?}: port {} is already taken on {}",
            decision.master_port,
            master.host
        );
    }
    for (worker, used) in view.workers.iter().zip(&used) {
        prop_assert!(
            worker.free.contains(used),
            "worker {} has {:?} free but got {used:?}",
            worker.id,
            worker.free
        );
    }
    Ok(())
}

/// Checks each job's fate against the rules, with the free capacity and ports it saw at its turn. With
/// plentiful ports, a job that fits must be placed. With scarce ones, a job that fits may be skipped only
/// when rank 0's host (rank 0 goes to the roomiest worker, `place`'s first choice) has no port left.
fn check_reference_model(
    scenario: &Scenario,
    decisions: &[Decision],
    ports_are_plentiful: bool,
) -> Result<(), TestCaseError> {
    let view = &scenario.view;
    let mut blocked_by = None;
    for turn in replay(view, decisions) {
        let job = turn.job;
        let fits = reference_gang_fits(job, &turn.free);
        if let Some(blocker) = blocked_by {
            prop_assert!(
                turn.decision.is_none(),
                "job {} passed job {blocker}, whose window is over",
                job.id
            );
            continue;
        }
        match turn.decision {
            Some(decision) => {
                prop_assert!(fits, "job {} was placed but does not fit {:?}", job.id, turn.free);
                for worker in decision.placement.iter().collect::<BTreeSet<_>>() {
                    let ranks = decision.placement.iter().filter(|other| *other == worker).count() as u32;
                    let free = &turn.free[worker_index(view, *worker)];
                    prop_assert!(
                        reference_ranks_that_fit(free, &job.need, ranks) == ranks,
                        "job {}: {ranks} rank(s) on worker {worker} with only {free:?} free",
                        job.id
                    );
                }
            }
            None if fits && ports_are_plentiful => {
                return Err(TestCaseError::fail(format!(
                    "job {} fits {:?} but was not placed",
                    job.id, turn.free
                )));
            }
            None if fits => {
                let leader = view.workers.iter().zip(&turn.free).find(|(worker, free)| {
                    let (low, high) = worker.task_ports;
                    reference_ranks_that_fit(free, &job.need, 1) == 1
                        && (low..=high).any(|port| !turn.ports.contains(&(worker.host.clone(), port)))
                });
                prop_assert!(
                    leader.is_none(),
                    "job {} fits and worker {:?} could hold rank 0, but it was not placed",
                    job.id,
                    leader.map(|(worker, _)| worker.id)
                );
            }
            None => {}
        }
        let waited_ms = scenario.now_ms.saturating_sub(job.queued_since_ms);
        if turn.decision.is_none()
            && waited_ms >= scenario.config.backfill_window_ms
            && reference_fits_idle(job, &view.workers)
        {
            blocked_by = Some(job.id);
        }
    }
    Ok(())
}

/// Packing: each gang uses the fewest workers it can at its turn, among placements whose rank 0's host has a
/// port free (with plentiful ports that is every placement).
fn check_fewest_workers(scenario: &Scenario, decisions: &[Decision]) -> Result<(), TestCaseError> {
    let view = &scenario.view;
    for turn in replay(view, decisions) {
        let Some(decision) = turn.decision else { continue };
        let used = decision.placement.iter().collect::<BTreeSet<_>>().len();
        let can_lead = |index: usize| {
            let worker = &view.workers[index];
            let (low, high) = worker.task_ports;
            (low..=high).any(|port| !turn.ports.contains(&(worker.host.clone(), port)))
        };
        let fewest = fewest_workers_for(turn.job, &turn.free, can_lead);
        prop_assert_eq!(
            Some(used),
            fewest,
            "job {} is spread over {:?}; free at its turn {:?}",
            turn.job.id,
            decision.placement,
            turn.free
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn never_over_commits_and_places_gangs_whole(scenario in scenario()) {
        let decisions = schedule(&scenario.view, scenario.now_ms, &scenario.config);
        check_never_over_commits(&scenario, &decisions)?;
    }

    #[test]
    fn matches_the_reference_model_when_ports_are_plentiful(scenario in scenario_with_plentiful_ports()) {
        let decisions = schedule(&scenario.view, scenario.now_ms, &scenario.config);
        check_never_over_commits(&scenario, &decisions)?;
        check_reference_model(&scenario, &decisions, true)?;
        check_fewest_workers(&scenario, &decisions)?;
    }

    #[test]
    fn skips_a_fitting_job_only_when_its_master_host_has_no_port(scenario in scenario()) {
        let decisions = schedule(&scenario.view, scenario.now_ms, &scenario.config);
        check_reference_model(&scenario, &decisions, false)?;
    }

    #[test]
    fn each_gang_uses_the_fewest_workers_possible(scenario in scenario()) {
        let decisions = schedule(&scenario.view, scenario.now_ms, &scenario.config);
        check_fewest_workers(&scenario, &decisions)?;
    }
}

/// A job of the simulation; its id is its index plus one, so ids follow arrival order.
#[derive(Debug, Clone)]
struct Arrival {
    at_ms: i64,
    duration_ms: i64,
    ranks: u32,
    need: Capacity,
}

#[derive(Debug)]
struct Simulation {
    started_at_ms: Vec<Option<i64>>,
    /// Jobs waiting in the queue ahead of each job when it arrived.
    queued_ahead: Vec<usize>,
}

struct Running {
    job: usize,
    ends_at_ms: i64,
    workers: Vec<usize>,
    port: (String, u16),
}

/// Runs the cluster one tick (1 ms) at a time until `end_ms`: finish the jobs whose end has come, enqueue
/// arrivals, schedule one round on a view built by hand, start its decisions. `workers` start idle.
fn simulate(workers: &[WorkerView], arrivals: &[Arrival], config: &SchedulerConfig, end_ms: i64) -> Simulation {
    let mut free: Vec<Capacity> = workers.iter().map(|worker| worker.capacity).collect();
    let mut queue: Vec<usize> = Vec::new();
    let mut running: Vec<Running> = Vec::new();
    let mut started_at_ms = vec![None; arrivals.len()];
    let mut queued_ahead = vec![0; arrivals.len()];
    for now_ms in 0..=end_ms {
        running.retain(|task| {
            if task.ends_at_ms > now_ms {
                return true;
            }
            for worker in &task.workers {
                free[*worker] = free[*worker].plus(&arrivals[task.job].need);
            }
            false
        });
        for (job, _) in arrivals
            .iter()
            .enumerate()
            .filter(|(_, arrival)| arrival.at_ms == now_ms)
        {
            queued_ahead[job] = queue.len();
            queue.push(job);
        }
        let view = ClusterView {
            workers: workers
                .iter()
                .zip(&free)
                .map(|(worker, free)| WorkerView {
                    free: *free,
                    ..worker.clone()
                })
                .collect(),
            queue: queue
                .iter()
                .map(|job| QueuedJob {
                    id: *job as JobId + 1,
                    attempt: 1,
                    ranks: arrivals[*job].ranks,
                    min_ranks: arrivals[*job].ranks,
                    need: arrivals[*job].need,
                    queued_since_ms: arrivals[*job].at_ms,
                })
                .collect(),
            ports_in_use: running.iter().map(|task| task.port.clone()).collect(),
        };
        for decision in schedule(&view, now_ms, config) {
            let job = decision.job as usize - 1;
            let placement: Vec<usize> = decision.placement.iter().map(|id| worker_index(&view, *id)).collect();
            for worker in &placement {
                // `minus` panics on over-commit, which fails the test with the inputs.
                free[*worker] = free[*worker].minus(&arrivals[job].need);
            }
            started_at_ms[job] = Some(now_ms);
            queue.retain(|queued| *queued != job);
            running.push(Running {
                job,
                ends_at_ms: now_ms + arrivals[job].duration_ms,
                port: (workers[placement[0]].host.clone(), decision.master_port),
                workers: placement,
            });
        }
    }
    Simulation {
        started_at_ms,
        queued_ahead,
    }
}

/// Idle workers on hosts of their own with room for every job's port.
fn simulation_workers(capacities: &[Capacity]) -> Vec<WorkerView> {
    capacities
        .iter()
        .enumerate()
        .map(|(index, capacity)| WorkerView {
            id: index as WorkerId + 1,
            host: format!("10.0.1.{}", index + 1),
            capacity: *capacity,
            free: *capacity,
            task_ports: PLENTIFUL_PORTS,
        })
        .collect()
}

const DURATION_MAX_MS: i64 = 6;

/// Every job must fit the idle cluster (larger ones never block, so no bound applies to them): a need that
/// fits no worker shrinks to one CPU, then the gang to what fits.
fn fitting_arrival(capacities: &[Capacity], at_ms: i64, duration_ms: i64, ranks: u32, need: Capacity) -> Arrival {
    let room = |need: &Capacity| -> u32 {
        capacities
            .iter()
            .map(|capacity| reference_ranks_that_fit(capacity, need, ranks))
            .sum()
    };
    let need = if room(&need) == 0 { capacity(1, 0, 0) } else { need };
    Arrival {
        at_ms,
        duration_ms,
        ranks: ranks.min(room(&need)),
        need,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_job_starts_within_the_backfill_bound(
        capacities in proptest::collection::vec((1u32..=4, 0u32..=2, 0u64..=8), 1..=3),
        jobs in proptest::collection::vec(
            (0i64..=40, 1..=DURATION_MAX_MS, 1u32..=4, 1u32..=4, 0u32..=2, 0u64..=4),
            1..=25,
        ),
        backfill_window_ms in 0i64..=8,
    ) {
        let capacities: Vec<Capacity> = capacities
            .into_iter()
            .map(|(cpus, gpus, memory_units)| capacity(cpus, gpus, memory_units))
            .collect();
        let workers = simulation_workers(&capacities);
        let mut arrivals: Vec<Arrival> = jobs
            .into_iter()
            .map(|(at_ms, duration_ms, ranks, cpus, gpus, memory_units)| {
                fitting_arrival(&capacities, at_ms, duration_ms, ranks, capacity(cpus, gpus, memory_units))
            })
            .collect();
        arrivals.sort_by_key(|arrival| arrival.at_ms);
        let config = SchedulerConfig { backfill_window_ms, ..SchedulerConfig::default() };
        let bound = |queued_ahead: usize| backfill_window_ms + (queued_ahead as i64 + 1) * DURATION_MAX_MS;
        let last_arrival_ms = arrivals.iter().map(|arrival| arrival.at_ms).max().unwrap_or_default();
        let end_ms = last_arrival_ms + bound(arrivals.len());
        let simulation = simulate(&workers, &arrivals, &config, end_ms);
        for (job, arrival) in arrivals.iter().enumerate() {
            let waited_ms = simulation.started_at_ms[job].map(|started_at_ms| started_at_ms - arrival.at_ms);
            let bound_ms = bound(simulation.queued_ahead[job]);
            prop_assert!(
                waited_ms.is_some_and(|waited_ms| waited_ms <= bound_ms),
                "job {} ({arrival:?}, {} queued ahead) waited {waited_ms:?} ms, bound {bound_ms} ms",
                job + 1,
                simulation.queued_ahead[job]
            );
        }
    }
}

/// One 2-CPU worker; a 2-CPU job arrives behind a 1-CPU job, then a 1-CPU job every tick, each running
/// 2 ticks, so one small job always holds a CPU unless the big one stops the stream.
fn big_job_behind_a_stream_of_small_ones(end_ms: i64) -> (Vec<WorkerView>, Vec<Arrival>) {
    let workers = simulation_workers(&[capacity(2, 0, 0)]);
    let small = |at_ms| Arrival {
        at_ms,
        duration_ms: 2,
        ranks: 1,
        need: capacity(1, 0, 0),
    };
    let mut arrivals = vec![
        small(0),
        Arrival {
            at_ms: 0,
            duration_ms: 1,
            ranks: 1,
            need: capacity(2, 0, 0),
        },
    ];
    arrivals.extend((1..=end_ms).map(small));
    (workers, arrivals)
}

#[test]
fn without_the_bound_a_large_job_starves_and_with_it_the_job_starts() {
    const END_MS: i64 = 200;
    const BIG: usize = 1;
    let (workers, arrivals) = big_job_behind_a_stream_of_small_ones(END_MS);
    let unbounded = SchedulerConfig {
        backfill_window_ms: i64::MAX,
        ..SchedulerConfig::default()
    };
    let simulation = simulate(&workers, &arrivals, &unbounded, END_MS);
    assert_eq!(simulation.started_at_ms[BIG], None, "{simulation:?}");
    assert!(
        simulation.started_at_ms[2..].iter().all(Option::is_some),
        "{simulation:?}"
    );

    let bounded = SchedulerConfig {
        backfill_window_ms: 5,
        ..SchedulerConfig::default()
    };
    let simulation = simulate(&workers, &arrivals, &bounded, END_MS);
    let bound_ms = 5 + (simulation.queued_ahead[BIG] as i64 + 1) * 2;
    let started_at_ms = simulation.started_at_ms[BIG];
    assert!(
        started_at_ms.is_some_and(|started_at_ms| started_at_ms <= bound_ms),
        "the big job started at {started_at_ms:?}, bound {bound_ms}"
    );
}

fn idle_worker(id: WorkerId, host: &str, cpus: u32) -> WorkerView {
    WorkerView {
        id,
        host: host.to_string(),
        capacity: capacity(cpus, 0, 4),
        free: capacity(cpus, 0, 4),
        task_ports: (29_500, 29_599),
    }
}

fn one_cpu_job(id: JobId, ranks: u32) -> QueuedJob {
    QueuedJob {
        id,
        attempt: 1,
        ranks,
        min_ranks: ranks,
        need: capacity(1, 0, 0),
        queued_since_ms: 0,
    }
}

#[test]
fn independent_jobs_spread_over_equal_workers() {
    let view = ClusterView {
        workers: vec![idle_worker(1, "a", 4), idle_worker(2, "b", 4)],
        queue: vec![one_cpu_job(1, 1), one_cpu_job(2, 1)],
        ports_in_use: BTreeSet::new(),
    };
    let decisions = schedule(&view, 0, &SchedulerConfig::default());
    let placements: Vec<&[WorkerId]> = decisions.iter().map(|decision| decision.placement.as_slice()).collect();
    assert_eq!(placements, [[1], [2]]);
}

#[test]
fn a_gang_packs_onto_one_worker_when_it_can() {
    let view = ClusterView {
        workers: vec![idle_worker(1, "a", 2), idle_worker(2, "b", 2)],
        queue: vec![one_cpu_job(1, 2)],
        ports_in_use: BTreeSet::new(),
    };
    let decisions = schedule(&view, 0, &SchedulerConfig::default());
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].placement, [1, 1]);
}

#[test]
fn the_master_port_avoids_ports_in_use_on_the_same_host_only() {
    let worker = WorkerView {
        task_ports: (29_500, 29_501),
        ..idle_worker(1, "a", 4)
    };
    let job = one_cpu_job(1, 1);
    let preferred = pick_port(&job, &worker, &BTreeSet::new()).expect("the range has free ports");
    let other = if preferred == 29_500 { 29_501 } else { 29_500 };

    let same_host = BTreeSet::from([("a".to_string(), preferred)]);
    assert_eq!(pick_port(&job, &worker, &same_host), Some(other));
    let other_host = BTreeSet::from([("b".to_string(), preferred)]);
    assert_eq!(pick_port(&job, &worker, &other_host), Some(preferred));
    let both_taken = BTreeSet::from([("a".to_string(), 29_500), ("a".to_string(), 29_501)]);
    assert_eq!(pick_port(&job, &worker, &both_taken), None);

    // Through a round: the first job takes a port, so the second, on the same host, gets the other one, and a
    // third finds none left and waits even though its CPU is free.
    let view = ClusterView {
        workers: vec![worker],
        queue: vec![one_cpu_job(1, 1), one_cpu_job(3, 1), one_cpu_job(5, 1)],
        ports_in_use: BTreeSet::new(),
    };
    let decisions = schedule(&view, 0, &SchedulerConfig::default());
    let ports: BTreeSet<u16> = decisions.iter().map(|decision| decision.master_port).collect();
    assert_eq!(ports, BTreeSet::from([29_500, 29_501]), "{decisions:?}");
}

#[test]
fn a_restart_tries_another_port_first() {
    let worker = idle_worker(1, "a", 4);
    let first = one_cpu_job(7, 1);
    let restart = QueuedJob {
        attempt: 2,
        ..first.clone()
    };
    assert_ne!(
        pick_port(&first, &worker, &BTreeSet::new()),
        pick_port(&restart, &worker, &BTreeSet::new())
    );
}

fn apply(state: &mut StateMachine, command: Command) -> CommandResult {
    state.apply(command, &mut Vec::new())
}

fn register(state: &mut StateMachine, uid: &str, host: &str, capacity: Capacity) -> WorkerId {
    let result = apply(
        state,
        Command::RegisterWorker {
            registration: WorkerRegistration {
                uid: uid.into(),
                address: format!("{host}:7000"),
                host: host.into(),
                hostname: uid.into(),
                capacity,
                task_ports: (29_500, 29_599),
            },
            now_ms: 1,
        },
    );
    let CommandResult::WorkerRegistered { worker } = result else {
        panic!("{result:?}")
    };
    worker.id
}

fn submit(state: &mut StateMachine, ranks: u32, cpus: u32, gpus: u32, now_ms: i64) -> JobId {
    let spec_toml = format!(
        "name = \"job\"\nkind = \"command\"\ncommand = \"true\"\n[resources]\nworkers = {ranks}\ncpus = {cpus}\ngpus = {gpus}\n"
    );
    let spec = parse_job_spec("test", &spec_toml).unwrap();
    let result = apply(
        state,
        Command::SubmitJob {
            spec,
            spec_toml,
            idempotency_key: String::new(),
            now_ms,
        },
    );
    let CommandResult::Submitted { job, created: true } = result else {
        panic!("{result:?}")
    };
    job.id
}

/// Schedules one round on `state` and applies every decision, as the leader does; returns the decisions.
fn schedule_and_apply(state: &mut StateMachine, now_ms: i64) -> Vec<Decision> {
    let config = SchedulerConfig::default();
    let decisions = schedule(&ClusterView::of(state, &config), now_ms, &config);
    // The leader's lazy path decides exactly the same.
    assert_eq!(schedule_state(state, now_ms, &config), decisions);
    for decision in &decisions {
        let result = apply(state, decision.clone().into_command(now_ms));
        assert!(matches!(result, CommandResult::Done), "{decision:?}: {result:?}");
    }
    decisions
}

#[test]
fn decisions_are_accepted_by_the_state_machine() {
    let mut state = StateMachine::default();
    let workers = [
        register(&mut state, "a", "10.0.0.1", capacity(4, 1, 16)),
        register(&mut state, "b", "10.0.0.1", capacity(2, 0, 16)),
        register(&mut state, "c", "10.0.0.2", capacity(8, 2, 16)),
    ];
    let mut needs: BTreeMap<JobId, Capacity> = BTreeMap::new();
    for (ranks, cpus, gpus) in [
        (2, 2, 0),
        (3, 1, 0),
        (1, 1, 1),
        (2, 1, 1),
        (1, 8, 0),
        (4, 2, 0),
        (1, 1, 0),
    ] {
        let id = submit(&mut state, ranks, cpus, gpus, 10);
        needs.insert(id, capacity(cpus, gpus, 0));
    }

    let first_round = schedule_and_apply(&mut state, 20);
    assert!(state.queued_jobs().count() > 0, "the test wants some jobs left waiting");
    // The first job placed ends and frees its workers; the second round runs past every job's backfill window
    // on the state the first round's commands produced.
    let finished = &first_round[0];
    for (rank, worker) in finished.placement.iter().enumerate() {
        apply(
            &mut state,
            Command::TaskFinished {
                task: TaskKey {
                    job: finished.job,
                    attempt: finished.attempt,
                    rank: rank as u32,
                },
                worker: *worker,
                outcome: TaskOutcome::Exited { code: 0 },
                now_ms: 30,
            },
        );
    }
    let second_round = schedule_and_apply(&mut state, 100_000);
    assert!(!second_round.is_empty(), "the freed workers should take a waiting job");

    let decisions: Vec<&Decision> = first_round[1..].iter().chain(&second_round).collect();
    let mut expected: BTreeMap<WorkerId, Capacity> = BTreeMap::new();
    for decision in &decisions {
        for worker in &decision.placement {
            let allocated = expected.entry(*worker).or_default();
            *allocated = allocated.plus(&needs[&decision.job]);
        }
    }
    for id in workers {
        let worker = state.worker(id).unwrap();
        assert_eq!(
            worker.allocated,
            expected.get(&id).copied().unwrap_or_default(),
            "worker {id}"
        );
        assert!(worker.capacity.contains(&worker.allocated), "worker {id}");
    }
    let view = ClusterView::of(&state, &SchedulerConfig::default());
    let masters: BTreeSet<(String, u16)> = decisions
        .iter()
        .map(|decision| {
            let attempt = state.job(decision.job).unwrap().current_attempt().unwrap();
            (attempt.master_addr.clone(), attempt.master_port)
        })
        .collect();
    assert_eq!(masters.len(), decisions.len(), "master ports collide: {masters:?}");
    assert_eq!(view.ports_in_use, masters);
}

/// Submits a two-rank job of one CPU per rank that may restart once, elastic down to `min_workers`.
fn submit_restartable(state: &mut StateMachine, min_workers: Option<u32>) -> JobId {
    let minimum = min_workers.map_or(String::new(), |minimum| format!("min_workers = {minimum}\n"));
    let spec_toml = format!(
        "name = \"elastic\"\nkind = \"command\"\ncommand = \"true\"\nmax_restarts = 1\n[resources]\nworkers = 2\n{minimum}"
    );
    let spec = parse_job_spec("test", &spec_toml).unwrap();
    let result = apply(
        state,
        Command::SubmitJob {
            spec,
            spec_toml,
            idempotency_key: String::new(),
            now_ms: 1,
        },
    );
    let CommandResult::Submitted { job, created: true } = result else {
        panic!("{result:?}")
    };
    job.id
}

#[test]
fn an_elastic_job_restarts_on_fewer_ranks_and_a_rigid_one_waits() {
    for (min_workers, ranks_after) in [(Some(1), Some(1)), (None, None)] {
        let mut state = StateMachine::default();
        let workers = [
            register(&mut state, "a", "10.0.0.1", capacity(1, 0, 16)),
            register(&mut state, "b", "10.0.0.2", capacity(1, 0, 16)),
        ];
        let id = submit_restartable(&mut state, min_workers);
        // The first attempt always takes every rank.
        let first = schedule_and_apply(&mut state, 10);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].placement.len(), 2);
        let lost = first[0].placement[1];
        apply(
            &mut state,
            Command::WorkerLost {
                worker: lost,
                registrations: 1,
                reason: "lease expired".into(),
                now_ms: 20,
            },
        );
        let job = state.job(id).unwrap();
        assert_eq!(job.state, JobState::Queued, "{job:?}");
        let survivor = *workers.iter().find(|worker| **worker != lost).unwrap();
        // The surviving rank is stopped; its slot is free once its worker reports the exit.
        apply(
            &mut state,
            Command::TaskFinished {
                task: TaskKey {
                    job: id,
                    attempt: 1,
                    rank: 0,
                },
                worker: survivor,
                outcome: TaskOutcome::Signalled { signal: 15 },
                now_ms: 30,
            },
        );
        let second = schedule_and_apply(&mut state, 100_000);
        match ranks_after {
            Some(ranks) => {
                assert_eq!(second.len(), 1, "min_workers {min_workers:?}: {second:?}");
                assert_eq!(second[0].placement, vec![survivor; ranks]);
                let attempt = state.job(id).unwrap().current_attempt().unwrap().clone();
                assert_eq!((attempt.number, attempt.tasks.len()), (2, ranks));
            }
            None => assert!(second.is_empty(), "a rigid job waits for both ranks: {second:?}"),
        }
    }
    // A rank that crashes while both workers live does not shrink the job: the restart waits for its gang.
    let mut state = StateMachine::default();
    register(&mut state, "a", "10.0.0.1", capacity(1, 0, 16));
    register(&mut state, "b", "10.0.0.2", capacity(1, 0, 16));
    let id = submit_restartable(&mut state, Some(1));
    let first = schedule_and_apply(&mut state, 10);
    let finish = |state: &mut StateMachine, rank: u32, code: i32| {
        apply(
            state,
            Command::TaskFinished {
                task: TaskKey {
                    job: id,
                    attempt: 1,
                    rank,
                },
                worker: first[0].placement[rank as usize],
                outcome: TaskOutcome::Exited { code },
                now_ms: 20,
            },
        )
    };
    finish(&mut state, 1, 1);
    assert_eq!(state.job(id).unwrap().state, JobState::Queued);
    assert!(
        schedule_and_apply(&mut state, 100_000).is_empty(),
        "rank 0 still holds its slot"
    );
    finish(&mut state, 0, 143);
    let second = schedule_and_apply(&mut state, 100_000);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].placement.len(), 2, "both workers are alive: {second:?}");

    // The state machine holds every placement to the bounds, whoever proposes it.
    let mut state = StateMachine::default();
    let worker = register(&mut state, "a", "10.0.0.1", capacity(4, 0, 16));
    let id = submit_restartable(&mut state, Some(1));
    let short = Command::StartAttempt {
        job: id,
        attempt: 1,
        placement: vec![worker],
        master_port: 29_500,
        now_ms: 5,
    };
    let CommandResult::Rejected(error) = apply(&mut state, short) else {
        panic!("a first attempt with too few ranks was accepted")
    };
    assert!(
        error
            .to_string()
            .contains("attempt 1 takes 2 ranks; the placement names 1 workers"),
        "{error}"
    );
}

#[test]
fn rank_zero_moves_to_a_worker_whose_host_has_a_port() {
    // Worker 1 is the roomiest, so `place` puts rank 0 there, but its host's only port is held; worker 2, on
    // another host, has room and ports.
    let view = ClusterView {
        workers: vec![
            WorkerView {
                task_ports: (29_500, 29_500),
                ..idle_worker(1, "a", 4)
            },
            WorkerView {
                free: capacity(1, 0, 4),
                ..idle_worker(2, "b", 2)
            },
        ],
        queue: vec![one_cpu_job(1, 1)],
        ports_in_use: BTreeSet::from([("a".to_string(), 29_500)]),
    };
    let decisions = schedule(&view, 0, &SchedulerConfig::default());
    assert_eq!(decisions.len(), 1, "the job fits on worker 2: {decisions:?}");
    assert_eq!(decisions[0].placement, [2]);
}
