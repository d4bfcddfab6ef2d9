//! The sweep controller: what the leader proposes for each sweep, decided from the replicated state alone.
//! It keeps nothing of its own, so a new leader continues every sweep where the old one stopped, and every
//! proposal is safe to repeat:
//!
//! - a new trial is a `SubmitJob` whose idempotency key is `sweep-ID-trial-N`: proposed twice (a lost
//!   answer, a failover), it is made once, so a sweep never runs more than `max_trials` trials;
//! - ASHA's and Hyperband's decisions are replayed from the trials' reported metric points, in time order
//!   (each trial at a rung with the best value it has reached so far), and a trial found below its rung is
//!   cancelled (`stopped early…`);
//! - the end is a `FinishSweep`, applied once.
//!
//! Queue-ahead: for the searchers that draw without the history (grid, random, and the random draws of ASHA
//! and Hyperband), a single-rank trial is submitted before a slot frees, held back from the scheduler
//! (`HoldJob`), and placed on standby behind the running trial that started first (`StandbyAttempt`): its
//! worker starts it the moment that trial exits, so no commit or assignment is on the path from one trial to
//! the next. At most one trial stands by behind each running one, so no more than `parallel` trials ever
//! run. A held trial whose place was lost (the worker went) is placed on standby again, or released to the
//! scheduler when the sweep runs fewer than `parallel` trials. TPE suggests from the trials finished so far,
//! so its trials are never submitted ahead.
//!
//! Trials are ordinary jobs (`kind` of the template) whose environment names their sweep and number
//! ([`super::SWEEP_ENV`], [`super::TRIAL_ENV`]); their runs are in the sweep's experiment and hold the metric
//! the sweep optimizes, whether it came from Kiln's trainer or from the MLflow API.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Decision, Observation, Params, Registration, Scheduler, SweepSpec};
use crate::spec::parse_job_spec;
use crate::state::{Command, Job, JobState, StateMachine};
use crate::tracking::{Run, Tracking};

/// The reason a trial cancelled for falling below its rung starts with.
pub const STOPPED_EARLY: &str = "stopped early";

/// What the controller has found once and need not look up again: per running sweep, the succeeded trials
/// whose run holds the sweep's metric (metrics are only ever added to a run). Soft state of the leader's
/// hub, only ever a shortcut: a new leader starts it empty and looks each trial up once.
#[derive(Debug, Default)]
pub struct Memo {
    reported: HashMap<u64, HashSet<u64>>,
}

/// The commands the leader should propose for every sweep now.
pub fn decide(state: &StateMachine, now_ms: i64, memo: &mut Memo) -> Vec<Command> {
    let mut commands = Vec::new();
    // The state's sweep index: sweeps and their trials, however many other jobs there are.
    for (sweep, mine) in state.sweeps() {
        if sweep.state != JobState::Running {
            memo.reported.remove(&sweep.id);
            // An ended sweep (cancelled, say) stops what it still runs.
            for (trial, job) in &mine {
                if !job.state.is_finished() {
                    commands.push(Command::CancelJob {
                        id: job.id,
                        reason: format!("trial {trial} of sweep {}, which {}", sweep.id, sweep.state.label()),
                        now_ms,
                    });
                }
            }
            continue;
        }
        match SweepSpec::read(&sweep.spec_toml) {
            Ok(spec) => commands.extend(decide_sweep(
                state,
                sweep,
                &spec,
                &mine,
                memo.reported.entry(sweep.id).or_default(),
                now_ms,
            )),
            Err(error) => commands.push(finish(
                sweep.id,
                false,
                format!("the sweep cannot be read: {error}"),
                now_ms,
            )),
        }
    }
    commands
}

fn finish(job: u64, succeeded: bool, message: String, now_ms: i64) -> Command {
    Command::FinishSweep {
        job,
        succeeded,
        message,
        metrics: BTreeMap::new(),
        register: None,
        now_ms,
    }
}

fn run_of<'a>(tracking: &'a Tracking, job: &Job) -> Option<&'a Run> {
    tracking.run(&Tracking::job_run_id(job.id)).ok()
}

/// A trial's latest value of `metric`: from its run, else from what its ranks reported.
pub fn value_of(tracking: &Tracking, metric: &str, job: &Job) -> Option<f64> {
    run_of(tracking, job)
        .and_then(|run| run.latest.get(metric))
        .map(|point| point.value)
        .or_else(|| job.metrics.get(metric).copied())
        .filter(|value| value.is_finite())
}

/// A trial's parameters, as its spec's environment carries them.
pub fn params_of(job: &Job) -> Params {
    job.spec
        .env
        .get(super::PARAMS_ENV)
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default()
}

fn describe(params: &Params) -> String {
    params
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn decide_sweep(
    state: &StateMachine,
    sweep: &Job,
    spec: &SweepSpec,
    trials: &[(u64, &Job)],
    reported: &mut HashSet<u64>,
    now_ms: i64,
) -> Vec<Command> {
    let tracking = state.tracking();
    let mut commands = Vec::new();
    // Early stopping, replayed from every trial's points at the rungs, in the order they were measured.
    let mut stopping = 0;
    let mut stopped_now = HashSet::new();
    if spec.algorithm.stops_early() {
        for (job, reason) in early_stops(tracking, spec, trials) {
            if !job.state.is_finished() {
                stopping += 1;
                stopped_now.insert(job.id);
                commands.push(Command::CancelJob {
                    id: job.id,
                    reason,
                    now_ms,
                });
            }
        }
    }
    // A metric the trials never report fails the sweep after the first trial, not silently at the end.
    // Each trial is looked up until it is found to have reported, so a round costs a set lookup per trial.
    let mut silent = None;
    for (trial, job) in trials {
        if job.state != JobState::Succeeded || reported.contains(&job.id) {
            continue;
        }
        if value_of(tracking, &spec.metric, job).is_some() {
            reported.insert(job.id);
        } else {
            silent = Some((trial, job));
            break;
        }
    }
    if let Some((trial, job)) = silent {
        let reported: Vec<String> = run_of(tracking, job)
            .map(|run| run.latest.keys().cloned().collect())
            .unwrap_or_default();
        commands.push(finish(
            sweep.id,
            false,
            format!(
                "trial {trial} (job {}) succeeded without reporting metric '{}'; it reported: {}",
                job.id,
                spec.metric,
                if reported.is_empty() {
                    "nothing".to_string()
                } else {
                    reported.join(", ")
                }
            ),
            now_ms,
        ));
        return commands;
    }
    let searcher = spec.algorithm.searcher();
    let mut unfinished = trials.iter().filter(|(_, job)| !job.state.is_finished()).count();
    // Held trials (submitted ahead) neither run nor wait for the scheduler: they do not count as active.
    let mut waiting: std::collections::VecDeque<&Job> = trials
        .iter()
        .filter(|(_, job)| job.state == JobState::Queued && state.is_held(job.id))
        .map(|(_, job)| *job)
        .collect();
    let mut active = unfinished - waiting.len();
    let mut next = trials.last().map_or(0, |(trial, _)| trial + 1);
    let room =
        |active: usize, next: u64| active < spec.parallel as usize + stopping && next < u64::from(spec.max_trials);
    // What waits for a place: held trials not standing by. One goes to the scheduler when the sweep has a slot
    // to give.
    waiting.retain(|job| {
        if state.standing_by(job.id).is_some() {
            return false;
        }
        if active >= spec.parallel as usize + stopping {
            return true;
        }
        active += 1;
        commands.push(Command::HoldJob {
            idempotency_key: job.idempotency_key.clone(),
            held: false,
            now_ms,
        });
        false
    });
    // Only TPE learns from the history, and only when a trial is to be suggested; grid and random search
    // draw without it.
    let history: Vec<Observation> = if room(active, next) && searcher == super::Searcher::Tpe {
        trials
            .iter()
            .filter(|(_, job)| job.state.is_finished())
            .map(|(_, job)| Observation {
                params: params_of(job),
                value: match job.state {
                    JobState::Succeeded | JobState::Cancelled => value_of(tracking, &spec.metric, job),
                    _ => None,
                },
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut exhausted = false;
    while room(active, next) {
        match submit(sweep, spec, searcher, &history, next, now_ms) {
            Ok(Some(command)) => commands.push(command),
            Ok(None) => {
                exhausted = true;
                break;
            }
            Err(failure) => {
                commands.push(finish(sweep.id, false, failure, now_ms));
                return commands;
            }
        }
        active += 1;
        unfinished += 1;
        next += 1;
    }
    // Trials that wait for the scheduler (new ones, releases, restarts) take the next free slots: while there
    // are any, no trial is placed on standby, so the sweep never runs more than `parallel`.
    let running = trials.iter().filter(|(_, job)| job.state == JobState::Running).count();
    let scheduled_waiting = active.saturating_sub(running);
    if searcher != super::Searcher::Tpe && scheduled_waiting == 0 {
        // Queue-ahead: a trial stands by behind each running single-rank trial, the earliest started first.
        for after in places(state, trials, &stopped_now) {
            let key = match waiting.pop_front() {
                Some(job) => job.idempotency_key.clone(),
                None if !exhausted && next < u64::from(spec.max_trials) => {
                    match submit(sweep, spec, searcher, &history, next, now_ms) {
                        Ok(Some(command)) => {
                            let key = trial_key(sweep.id, next);
                            commands.push(command);
                            commands.push(Command::HoldJob {
                                idempotency_key: key.clone(),
                                held: true,
                                now_ms,
                            });
                            next += 1;
                            unfinished += 1;
                            key
                        }
                        Ok(None) => {
                            exhausted = true;
                            break;
                        }
                        Err(failure) => {
                            commands.push(finish(sweep.id, false, failure, now_ms));
                            return commands;
                        }
                    }
                }
                None => break,
            };
            commands.push(Command::StandbyAttempt {
                idempotency_key: key,
                after,
                now_ms,
            });
        }
    }
    if unfinished == 0 && (exhausted || next >= u64::from(spec.max_trials)) {
        commands.push(conclude(tracking, sweep, spec, trials, now_ms));
    }
    commands
}

/// The idempotency key of trial `trial` of sweep `sweep`: proposed twice, a trial is made once.
fn trial_key(sweep: u64, trial: u64) -> String {
    format!("sweep-{sweep}-trial-{trial}")
}

/// Trial `next`'s submission: `Ok(None)` when the searcher has no more (a grid is exhausted), `Err` with why
/// the sweep fails when the trial cannot be made.
fn submit(
    sweep: &Job,
    spec: &SweepSpec,
    searcher: super::Searcher,
    history: &[Observation],
    next: u64,
    now_ms: i64,
) -> Result<Option<Command>, String> {
    let params = match searcher.suggest(&spec.space, spec.seed, next, spec.direction, history) {
        Ok(Some(params)) => params,
        Ok(None) => return Ok(None),
        Err(error) => return Err(format!("trial {next}: {error}")),
    };
    let text = spec.trial_spec(sweep.id, next, &params);
    match parse_job_spec(&format!("trial {next} of sweep {}", sweep.id), &text) {
        Ok(job_spec) => Ok(Some(Command::SubmitJob {
            spec: job_spec,
            spec_toml: text,
            idempotency_key: trial_key(sweep.id, next),
            now_ms,
        })),
        Err(error) => Err(format!("trial {next}: {error}")),
    }
}

/// The running single-rank trials a held trial could stand by behind (alive worker, nothing standing by
/// yet), the earliest started first: with trials of about equal length, the first to free its slot.
/// Trials being stopped are left out: the slot a stopped trial frees is not handed on, or the sweep would
/// keep the extra trial its stopping allows for good.
fn places(state: &StateMachine, trials: &[(u64, &Job)], stopping: &HashSet<u64>) -> Vec<crate::state::TaskKey> {
    let mut places: Vec<(i64, crate::state::TaskKey)> = trials
        .iter()
        .filter(|(_, job)| job.state == JobState::Running && job.spec.resources.workers == 1)
        .filter(|(_, job)| !stopping.contains(&job.id))
        .filter_map(|(_, job)| {
            let attempt = job.attempts.last()?;
            let task = attempt.tasks.first()?;
            let alive = state
                .worker(task.worker)
                .is_some_and(|worker| worker.state == crate::state::WorkerState::Alive);
            let key = crate::state::TaskKey {
                job: job.id,
                attempt: attempt.number,
                rank: 0,
            };
            let runs = task.state == crate::state::TaskState::Running && !task.stop_requested;
            (attempt.tasks.len() == 1 && runs && alive).then_some((attempt.started_at_ms, key))
        })
        .collect();
    let taken: std::collections::BTreeSet<crate::state::TaskKey> = state.standby().map(|(after, _)| after).collect();
    places.retain(|(_, key)| !taken.contains(key));
    places.sort();
    places.into_iter().map(|(_, key)| key).collect()
}

/// The trials ASHA or Hyperband stops, with the reason, replaying every rung result in time order.
fn early_stops<'a>(tracking: &Tracking, spec: &SweepSpec, trials: &[(u64, &'a Job)]) -> Vec<(&'a Job, String)> {
    let scheduler = match spec.algorithm {
        super::Algorithm::Hyperband => Scheduler::hyperband(spec.min_resource, spec.max_resource, spec.eta),
        _ => Scheduler::asha(spec.min_resource, spec.max_resource, spec.eta),
    };
    let Ok(mut scheduler) = scheduler else {
        return Vec::new();
    };
    // Trial n's bracket is the n-th assignment, whatever order trials report in.
    let brackets: Vec<usize> = trials.iter().map(|_| scheduler.assign()).collect();
    let mut events = Vec::new();
    for (index, (_, job)) in trials.iter().enumerate() {
        let Some(run) = run_of(tracking, job) else {
            continue;
        };
        let Some(points) = run.metrics.get(&spec.metric) else {
            continue;
        };
        // The resource of a point: the epoch measured at its step when the run has one (train trials log
        // `epoch` beside their metrics), else the step itself.
        let epochs: BTreeMap<i64, f64> = run
            .metrics
            .get("epoch")
            .map(|epochs| epochs.iter().map(|point| (point.step, point.value)).collect())
            .unwrap_or_default();
        for point in points {
            let resource = epochs.get(&point.step).map_or(point.step, |epoch| epoch.round() as i64);
            if resource > 0 {
                events.push((point.timestamp_ms, index, resource as u64, point.value));
            }
        }
    }
    events.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut stopped: Vec<Option<String>> = vec![None; trials.len()];
    // A trial enters a rung with the best value it has reached so far, not only its latest: one noisy
    // epoch (a validation accuracy that dips before it climbs) does not stop a trial that is doing well.
    let mut best: Vec<f64> = vec![f64::INFINITY; trials.len()];
    for (_, index, resource, value) in events {
        if stopped[index].is_some() {
            continue;
        }
        let loss = spec.direction.loss(value);
        if !loss.is_nan() {
            best[index] = best[index].min(loss);
        }
        if scheduler.on_result(brackets[index], resource, best[index]) == Decision::Stop {
            let reached = spec.direction.loss(best[index]);
            stopped[index] = Some(format!(
                "{STOPPED_EARLY} by {:?} at resource {resource}: {} {reached} (its best so far) is not among the \
                 best 1/{} at that rung",
                spec.algorithm, spec.metric, spec.eta
            ));
        }
    }
    trials
        .iter()
        .zip(stopped)
        .filter_map(|((_, job), reason)| Some((*job, reason?)))
        .collect()
}

/// The end of a sweep whose trials are all done: the best succeeded trial, or a failure when none did.
fn conclude(tracking: &Tracking, sweep: &Job, spec: &SweepSpec, trials: &[(u64, &Job)], now_ms: i64) -> Command {
    let scored = trials
        .iter()
        .filter(|(_, job)| job.state == JobState::Succeeded)
        .filter_map(|(trial, job)| Some((*trial, *job, value_of(tracking, &spec.metric, job)?)));
    let best = scored.min_by(|a, b| spec.direction.loss(a.2).total_cmp(&spec.direction.loss(b.2)));
    let stopped = trials
        .iter()
        .filter(|(_, job)| job.state == JobState::Cancelled && job.message.starts_with(STOPPED_EARLY))
        .count();
    let Some((trial, job, value)) = best else {
        let failed = trials.iter().filter(|(_, job)| job.state == JobState::Failed).count();
        return finish(
            sweep.id,
            false,
            format!(
                "no trial succeeded: {} trials, {failed} failed, {stopped} stopped early",
                trials.len()
            ),
            now_ms,
        );
    };
    let params = params_of(job);
    let mut metrics: BTreeMap<String, f64> = run_of(tracking, job)
        .map(|run| {
            run.latest
                .iter()
                .map(|(key, point)| (key.clone(), point.value))
                .collect()
        })
        .unwrap_or_else(|| job.metrics.clone());
    metrics.insert("best_trial".into(), trial as f64);
    metrics.insert("best_job".into(), job.id as f64);
    metrics.insert("trials".into(), trials.len() as f64);
    metrics.insert("stopped_early".into(), stopped as f64);
    let register = spec.register.as_ref().and_then(|name| {
        let run = run_of(tracking, job)?;
        Some(Registration {
            name: name.clone(),
            alias: spec.alias.clone(),
            run_id: run.id.clone(),
            source: format!("{}/model", run.artifact_uri.trim_end_matches('/')),
            description: format!(
                "the best of sweep {} ({} trials): trial {trial}, {} {value}, {}",
                sweep.id,
                trials.len(),
                spec.metric,
                describe(&params)
            ),
        })
    });
    Command::FinishSweep {
        job: sweep.id,
        succeeded: true,
        message: format!(
            "best of {} trials ({stopped} stopped early): trial {trial} (job {}), {} {value}, with {}",
            trials.len(),
            job.id,
            spec.metric,
            describe(&params)
        ),
        metrics,
        register,
        now_ms,
    }
}
