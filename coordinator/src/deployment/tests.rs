use super::*;
use crate::state::{Capacity, CommandResult, Report, TaskKey, TaskOutcome, WorkerRegistration};

const DEPLOYMENT: &str = r#"
kind = "deployment"
name = "digits"
model = "models:/digits@champion"
input_name = "pixels"
postprocess = [{ top_k = 3 }]

[replicas]
min = 2
max = 3
target_queue_depth = 4
scale_down_delay = "30s"

[resources]
cpus = 1
memory = "256MiB"
"#;

fn apply(state: &mut StateMachine, command: Command) -> CommandResult {
    state.apply(command, &mut Vec::new())
}

/// A state with one worker of 8 CPU slots and the deployment submitted; returns the deployment's id.
fn deployed(text: &str) -> (StateMachine, u64) {
    let mut state = StateMachine::default();
    apply(
        &mut state,
        Command::RegisterWorker {
            registration: WorkerRegistration {
                uid: "w".into(),
                address: "127.0.0.1:9000".into(),
                host: "127.0.0.1".into(),
                hostname: "test".into(),
                capacity: Capacity {
                    cpus: 8,
                    gpus: 0,
                    memory_bytes: 8 << 30,
                },
                task_ports: (29500, 29599),
            },
            now_ms: 1,
        },
    );
    let spec = crate::spec::parse_job_spec("digits.toml", text).unwrap();
    let CommandResult::Submitted { job, .. } = apply(
        &mut state,
        Command::SubmitJob {
            spec,
            spec_toml: text.into(),
            idempotency_key: "deploy-digits".into(),
            now_ms: 2,
        },
    ) else {
        panic!("the deployment was not submitted")
    };
    assert_eq!(job.state, JobState::Running);
    (state, job.id)
}

/// Applies what the controller decides at `now_ms`; returns it.
fn step(state: &mut StateMachine, now_ms: i64) -> Vec<Command> {
    let commands = decide(state, now_ms);
    for command in &commands {
        let result = apply(state, command.clone());
        assert!(!matches!(result, CommandResult::Rejected(_)), "{command:?}: {result:?}");
    }
    commands
}

/// The deployment's replicas: (number, job id, state).
fn replicas(state: &StateMachine, deployment: u64) -> Vec<(u64, u64, JobState)> {
    let (_, replicas) = state.deployments().find(|(job, _)| job.id == deployment).unwrap();
    replicas
        .into_iter()
        .map(|(replica, job)| (replica, job.id, job.state))
        .collect()
}

/// Places queued replica job `job` on the worker: its process runs, its model not yet loaded.
fn place(state: &mut StateMachine, job: u64, now_ms: i64) {
    let result = apply(
        state,
        Command::StartAttempt {
            job,
            attempt: 1,
            placement: vec![1],
            master_port: 29500 + job as u16,
            now_ms,
        },
    );
    assert_eq!(result, CommandResult::Done, "{result:?}");
}

/// Places replica job `job` on the worker (if queued) and has it report ready with `queue_depth` waiting.
fn run_ready(state: &mut StateMachine, job: u64, queue_depth: f64, now_ms: i64) {
    if state.job(job).unwrap().state == JobState::Queued {
        place(state, job, now_ms);
    }
    let result = apply(
        state,
        Command::RecordReport(Report {
            job,
            attempt: 1,
            sequence: 0,
            metrics: [(READY.to_string(), 1.0), (QUEUE_DEPTH.to_string(), queue_depth)].into(),
            points: Vec::new(),
            artifacts: [(HTTP.to_string(), format!("127.0.0.1:{}", 8000 + job))].into(),
            now_ms,
        }),
    );
    assert!(!matches!(result, CommandResult::Rejected(_)), "{result:?}");
}

/// Places queued replica job `job`, which reports `error` and exits with 1 before it is ready (from `now_ms`
/// on, a millisecond per step).
fn fail_before_ready(state: &mut StateMachine, job: u64, error: &str, now_ms: i64) {
    place(state, job, now_ms);
    apply(
        state,
        Command::RecordReport(Report {
            job,
            attempt: 1,
            sequence: 0,
            metrics: BTreeMap::new(),
            points: Vec::new(),
            artifacts: [(ERROR.to_string(), error.to_string())].into(),
            now_ms: now_ms + 1,
        }),
    );
    exit(state, job, 1, now_ms + 2);
}

fn exit(state: &mut StateMachine, job: u64, code: i32, now_ms: i64) {
    apply(
        state,
        Command::TaskFinished {
            task: TaskKey {
                job,
                attempt: 1,
                rank: 0,
            },
            worker: 1,
            outcome: TaskOutcome::Exited { code },
            now_ms,
        },
    );
}

#[test]
fn the_file_is_read_with_defaults_and_bad_replica_counts_are_refused_with_the_place() {
    let options = deployment_options("digits.toml", DEPLOYMENT).unwrap();
    assert_eq!((options.min_replicas, options.max_replicas), (2, 3));
    assert_eq!((options.target_queue_depth, options.scale_down_delay_ms), (4.0, 30_000));
    assert_eq!((options.resources.cpus, options.resources.memory_bytes), (1, 256 << 20));
    let example = include_str!("../../../examples/deployments/digits.toml");
    let spec = crate::spec::parse_job_spec("digits.toml", example).unwrap();
    assert_eq!((spec.kind, spec.name.as_str()), (JobKind::Deployment, "digits"));

    let refused = |text: &str| crate::spec::parse_job_spec("d.toml", text).unwrap_err().to_string();
    let error = refused(&DEPLOYMENT.replace("max = 3", "max = 1"));
    assert!(
        error.contains("d.toml:10:7") && error.contains("'replicas.max' is 1; expected replicas.min (2)"),
        "{error}"
    );
    let error = refused(&DEPLOYMENT.replace("cpus = 1", "workers = 2"));
    assert!(error.contains("per replica"), "{error}");
    let error = refused(&DEPLOYMENT.replace("input_name", "input_names"));
    assert!(error.contains("unknown field `input_names`"), "{error}");
    let error = refused(&DEPLOYMENT.replace("\"30s\"", "\"soon\""));
    assert!(error.contains("'replicas.scale_down_delay' is \"soon\""), "{error}");
    let error = refused("kind = \"serve\"\nname = \"x\"\n");
    assert!(error.contains("a deployment's replicas"), "{error}");
}

#[test]
fn replicas_start_at_the_minimum_and_a_lost_one_is_replaced_once() {
    let (mut state, deployment) = deployed(DEPLOYMENT);
    let submitted = step(&mut state, 10);
    assert_eq!(submitted.len(), 2);
    // Proposed again before anything changed (a lost answer, a new leader): made once.
    for command in submitted {
        apply(&mut state, command);
    }
    let made = replicas(&state, deployment);
    assert_eq!(
        made.iter().map(|(replica, ..)| *replica).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let spec = &state.job(made[0].1).unwrap().spec;
    assert_eq!(
        (spec.kind, spec.resources.workers, spec.resources.cpus),
        (JobKind::Serve, 1, 1)
    );
    assert_eq!(replica_of(spec), Some((deployment, 0)));
    assert!(
        step(&mut state, 11).is_empty(),
        "nothing to add while the replicas start"
    );

    for (_, job, _) in &made {
        run_ready(&mut state, *job, 0.0, 20);
    }
    assert!(step(&mut state, 21).is_empty());
    // Replica 1's process dies: replica 2 takes its place.
    exit(&mut state, made[1].1, 137, 30);
    let commands = step(&mut state, 31);
    assert_eq!(commands.len(), 1, "{commands:?}");
    let now: Vec<(u64, JobState)> = replicas(&state, deployment)
        .into_iter()
        .map(|(replica, _, state)| (replica, state))
        .collect();
    assert_eq!(
        now,
        vec![(0, JobState::Running), (1, JobState::Failed), (2, JobState::Queued)]
    );
    // The same file deployed again is the running deployment, unchanged.
    let result = submit(&mut state, DEPLOYMENT, 32);
    assert!(
        matches!(&result, CommandResult::Submitted { job, created: false } if job.id == deployment),
        "{result:?}"
    );
    assert!(step(&mut state, 33).is_empty());
}

/// Submits deployment file `text` (as `kiln deploy` does, with a fresh idempotency key).
fn submit(state: &mut StateMachine, text: &str, now_ms: i64) -> CommandResult {
    let spec = crate::spec::parse_job_spec("digits.toml", text).unwrap();
    apply(
        state,
        Command::SubmitJob {
            spec,
            spec_toml: text.into(),
            idempotency_key: format!("deploy-{now_ms}"),
            now_ms,
        },
    )
}

/// The live replicas' (job id, whether they run the deployment's file).
fn live_replicas(state: &StateMachine, deployment: u64) -> Vec<(u64, bool)> {
    let (job, replicas) = state.deployments().find(|(job, _)| job.id == deployment).unwrap();
    replicas
        .iter()
        .filter(|(_, replica)| !replica.state.is_finished())
        .map(|(_, replica)| (replica.id, replica.spec_toml == job.spec_toml))
        .collect()
}

#[test]
fn a_changed_file_rolls_the_replicas_one_at_a_time_and_one_that_cannot_start_is_rolled_back() {
    let (mut state, deployment) = deployed(DEPLOYMENT);
    step(&mut state, 10);
    let old: Vec<u64> = replicas(&state, deployment).iter().map(|(_, id, _)| *id).collect();
    for id in &old {
        run_ready(&mut state, *id, 0.0, 20);
    }

    // A new file under the running deployment's name updates it in place.
    let updated = DEPLOYMENT.replace("top_k = 3", "top_k = 2");
    let result = submit(&mut state, &updated, 30);
    assert!(
        matches!(&result, CommandResult::Submitted { job, created: false } if job.id == deployment && job.spec_toml == updated),
        "{result:?}"
    );
    // One replica of the new file at a time: started, ready, and then the oldest of the old file stops.
    let mut fresh = Vec::new();
    for (round, stopped) in old.iter().enumerate() {
        let now = 40 + round as i64 * 10;
        let started = step(&mut state, now);
        assert!(
            matches!(&started[..], [Command::SubmitJob { spec_toml, .. }] if *spec_toml == updated),
            "{started:?}"
        );
        let (new, current) = *live_replicas(&state, deployment).last().unwrap();
        assert!(current);
        assert!(step(&mut state, now + 1).is_empty(), "nothing more while it starts");
        run_ready(&mut state, new, 0.0, now + 2);
        let removed = step(&mut state, now + 3);
        assert!(
            matches!(&removed[..], [Command::CancelJob { id, reason, .. }] if id == stopped && reason.starts_with(REPLACED)),
            "{removed:?}"
        );
        fresh.push(new);
    }
    assert!(step(&mut state, 100).is_empty(), "rolled");
    assert_eq!(
        live_replicas(&state, deployment),
        fresh.iter().map(|id| (*id, true)).collect::<Vec<_>>()
    );

    // A file whose replicas cannot start: after three of them fail, the deployment goes back to the file its
    // ready replicas run, which served all along.
    let broken = updated.replace("@champion", "@nobody");
    submit(&mut state, &broken, 110);
    let mut rolled_back = false;
    for round in 0..4 {
        let now = 120 + round * 10;
        let commands = step(&mut state, now);
        if let [Command::UpdateDeployment { message, .. }] = &commands[..] {
            assert!(
                message.contains("rolled back") && message.contains("alias 'nobody' not found"),
                "{message}"
            );
            rolled_back = true;
            break;
        }
        let (new, current) = *live_replicas(&state, deployment).last().unwrap();
        assert!(current, "{commands:?}");
        fail_before_ready(&mut state, new, "model 'digits' alias 'nobody' not found", now + 1);
    }
    assert!(rolled_back);
    let job = state.job(deployment).unwrap();
    assert_eq!(
        (job.state, job.spec_toml.as_str()),
        (JobState::Running, updated.as_str())
    );
    assert!(job.message.contains("rolled back"), "{}", job.message);
    assert!(step(&mut state, 200).is_empty());
    assert_eq!(
        live_replicas(&state, deployment),
        fresh.iter().map(|id| (*id, true)).collect::<Vec<_>>()
    );

    // Another name's file, or another kind, cannot update it.
    let result = apply(
        &mut state,
        Command::UpdateDeployment {
            job: deployment,
            spec_toml: updated.replace("name = \"digits\"", "name = \"other\""),
            message: String::new(),
            now_ms: 210,
        },
    );
    assert!(
        matches!(&result, CommandResult::Rejected(error) if error.to_string().contains("with the same name")),
        "{result:?}"
    );
}

#[test]
fn replicas_follow_the_queue_depth_between_min_and_max() {
    let (mut state, deployment) = deployed(DEPLOYMENT);
    step(&mut state, 10);
    let ids: Vec<u64> = replicas(&state, deployment).iter().map(|(_, id, _)| *id).collect();
    // Loaded: a third replica, and no fourth (the maximum).
    for id in &ids {
        run_ready(&mut state, *id, 9.0, 20);
    }
    assert_eq!(step(&mut state, 21).len(), 1);
    let third = replicas(&state, deployment)[2].1;
    assert!(step(&mut state, 22).is_empty(), "not while the new replica starts");
    run_ready(&mut state, third, 9.0, 30);
    assert!(step(&mut state, 31).is_empty(), "at the maximum");

    // The load drops: the newest replica goes, but only after the delay since the last change.
    for id in ids.iter().chain([&third]) {
        run_ready(&mut state, *id, 0.5, 40);
    }
    assert!(step(&mut state, 21 + 29_000).is_empty(), "within the delay");
    let removed = step(&mut state, 21 + 30_000);
    assert!(
        matches!(&removed[..], [Command::CancelJob { id, reason, .. }] if *id == third && reason.starts_with(SCALED_DOWN)),
        "{removed:?}"
    );
    // Never below the minimum.
    assert!(step(&mut state, 21 + 90_000).is_empty());
    let live = replicas(&state, deployment)
        .iter()
        .filter(|(_, _, state)| !state.is_finished())
        .count();
    assert_eq!(live, 2);
}

#[test]
fn replicas_that_never_become_ready_fail_the_deployment_and_deleting_it_stops_its_replicas() {
    let (mut state, deployment) = deployed(DEPLOYMENT);
    // The replicas die one at a time, each replaced before the next dies: a live replica is always the
    // newest, and the failures still count.
    for round in 0..3 {
        step(&mut state, 10 + round * 10);
        if let Some((_, job, _)) = replicas(&state, deployment)
            .into_iter()
            .find(|(_, _, job_state)| *job_state == JobState::Queued)
        {
            fail_before_ready(&mut state, job, "model 'digits' alias 'champion' not found", 11);
        }
    }
    step(&mut state, 40);
    assert!(
        replicas(&state, deployment).len() <= 5,
        "{:?}",
        replicas(&state, deployment)
    );
    let job = state.job(deployment).unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.message.contains("3 replicas in a row") && job.message.contains("alias 'champion' not found"),
        "{}",
        job.message
    );

    // Deleted while running: its replicas are stopped.
    let (mut state, deployment) = deployed(DEPLOYMENT);
    step(&mut state, 10);
    apply(
        &mut state,
        Command::CancelJob {
            id: deployment,
            reason: "deleted".into(),
            now_ms: 20,
        },
    );
    assert_eq!(step(&mut state, 21).len(), 2);
    assert!(
        replicas(&state, deployment)
            .iter()
            .all(|(_, _, state)| *state == JobState::Cancelled)
    );
    assert!(step(&mut state, 22).is_empty());
}

#[test]
fn a_replica_of_a_new_file_not_ready_in_time_rolls_the_update_back_and_is_stopped() {
    let text = DEPLOYMENT.replace(
        "scale_down_delay = \"30s\"",
        "scale_down_delay = \"30s\"\nready_timeout = \"5s\"",
    );
    let (mut state, deployment) = deployed(&text);
    step(&mut state, 10);
    let old: Vec<u64> = replicas(&state, deployment).iter().map(|(_, id, _)| *id).collect();
    for id in &old {
        run_ready(&mut state, *id, 0.0, 20);
    }
    submit(&mut state, &text.replace("top_k = 3", "top_k = 2"), 30);
    step(&mut state, 40);
    let (new, current) = *live_replicas(&state, deployment).last().unwrap();
    assert!(current);
    // Placed and running, but its model never finishes loading.
    place(&mut state, new, 41);
    assert!(step(&mut state, 40 + 5_000).is_empty(), "within replicas.ready_timeout");
    let commands = step(&mut state, 40 + 5_001);
    assert!(
        matches!(&commands[..], [Command::UpdateDeployment { message, .. }] if message.contains("was not ready within 5s")),
        "{commands:?}"
    );
    assert_eq!(state.job(deployment).unwrap().spec_toml, text);
    // Back on the old file, the new file's replica is stopped and the deployment keeps its two replicas.
    let stopped = step(&mut state, 40 + 5_002);
    assert!(
        matches!(&stopped[..], [Command::CancelJob { id, reason, .. }] if *id == new && reason.starts_with(REPLACED)),
        "{stopped:?}"
    );
    assert!(step(&mut state, 40 + 5_003).is_empty());
    assert_eq!(
        live_replicas(&state, deployment),
        old.iter().map(|id| (*id, true)).collect::<Vec<_>>()
    );
    let error = crate::spec::parse_job_spec("d.toml", &text.replace("\"5s\"", "\"later\"")).unwrap_err();
    assert!(
        error.to_string().contains("'replicas.ready_timeout' is \"later\""),
        "{error}"
    );
}
