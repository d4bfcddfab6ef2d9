//! Criterion micro-benchmarks for the coordinator's hot paths, each one a bound on Raft throughput:
//!
//! ```text
//!   client TOML ─► spec/parse ─► (raft log) log_append/* ─► state/apply_submit ─► snapshot/*
//!                                 one fsync per Ready         every committed entry   every N entries
//! ```
//!
//! - `spec/parse_hello`: parse and validate `examples/jobs/hello.toml`, as the leader does per submission.
//! - `state/apply_submit`: apply 1,000 job submissions to a fresh state machine (throughput in jobs).
//! - `snapshot/encode_10k_jobs`, `snapshot/decode_10k_jobs`: a state machine holding 10,000 jobs.
//! - `log_append/{file,memory}/batch_{1,64}`: one `LogStore::persist` of 1 or 64 entries plus the hard
//!   state. On a file that is one redb transaction with `Durability::Immediate`, so the file numbers are
//!   the fsync cost per Ready: the number that bounds commits per second on this disk. The in-memory
//!   backend shows what the same call costs without the disk.
//!
//! Every entry carries a real encoded `Command::SubmitJob` of the hello spec (about 300 bytes), so the
//! sizes match what a coordinator writes. Stores are replaced by fresh ones (outside the timed part)
//! every `APPENDS_PER_STORE` batches, so memory stays bounded however many iterations criterion picks.
//!
//! Left out: the network and the Raft state machine itself; `kiln bench raft` measures the whole path.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kiln_coordinator::scheduler::{SchedulerConfig, schedule_state};
use kiln_coordinator::spec::{JobSpec, parse_job_spec};
use kiln_coordinator::state::{Capacity, Command, StateMachine, WorkerRegistration, encode};
use kiln_coordinator::storage::{Databases, LogStore};
use raft::Storage as _;
use raft::eraftpb::{Entry, HardState};

const HELLO: &str = include_str!("../../examples/jobs/hello.toml");
/// Submissions applied per iteration of `state/apply_submit`.
const SUBMITS_PER_ITERATION: u64 = 1_000;
/// Jobs in the state machine that `snapshot/*` encodes and decodes.
const SNAPSHOT_JOBS: usize = 10_000;
/// Batches appended to one log store before it is replaced by a fresh one (untimed).
const APPENDS_PER_STORE: u64 = 1_000;
const NOW_MS: i64 = 1_700_000_000_000;

fn hello_spec() -> JobSpec {
    parse_job_spec("hello.toml", HELLO).expect("examples/jobs/hello.toml is a valid job spec")
}

fn submit(spec: &JobSpec, sequence: u64) -> Command {
    Command::SubmitJob {
        spec: spec.clone(),
        spec_toml: HELLO.to_string(),
        idempotency_key: format!("bench-{sequence:016x}"),
        now_ms: NOW_MS + sequence as i64,
    }
}

fn bench_spec(c: &mut Criterion) {
    let mut group = c.benchmark_group("spec");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_hello", |b| {
        b.iter(|| parse_job_spec(black_box("hello.toml"), black_box(HELLO)))
    });
    group.finish();
}

fn bench_apply(c: &mut Criterion) {
    let spec = hello_spec();
    let mut group = c.benchmark_group("state");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(SUBMITS_PER_ITERATION));
    group.bench_function("apply_submit", |b| {
        b.iter_batched(
            || {
                let commands: Vec<Command> = (0..SUBMITS_PER_ITERATION)
                    .map(|sequence| submit(&spec, sequence))
                    .collect();
                (StateMachine::default(), commands)
            },
            |(mut state, commands)| {
                for command in commands {
                    black_box(state.apply(command, &mut Vec::new()));
                }
                state
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// One scheduling round as the leader runs it after every change: build the view from the state, place.
/// Two workers of two slots each; the queue holds 10,000 single-rank jobs, as in the `jobs` suite.
fn bench_schedule(c: &mut Criterion) {
    let spec = hello_spec();
    let mut state = StateMachine::default();
    for index in 0..2 {
        state.apply(
            Command::RegisterWorker {
                registration: WorkerRegistration {
                    uid: format!("bench-{index}"),
                    address: format!("127.0.0.1:{}", 9000 + index),
                    host: "127.0.0.1".into(),
                    hostname: "bench".into(),
                    capacity: Capacity {
                        cpus: 2,
                        gpus: 0,
                        memory_bytes: 1 << 30,
                    },
                    task_ports: (29500, 29999),
                },
                now_ms: 0,
            },
            &mut Vec::new(),
        );
    }
    for sequence in 0..SNAPSHOT_JOBS as u64 {
        state.apply(submit(&spec, sequence), &mut Vec::new());
    }
    let config = SchedulerConfig::default();
    let mut group = c.benchmark_group("scheduler");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("round_10k_queued_4_slots_free", |b| {
        b.iter(|| schedule_state(black_box(&state), 1, &config))
    });
    // The common case under load: every slot busy, so the round should stop at once.
    let decisions = schedule_state(&state, 1, &config);
    for decision in decisions {
        state.apply(decision.into_command(1), &mut Vec::new());
    }
    group.bench_function("round_10k_queued_no_slot_free", |b| {
        b.iter(|| schedule_state(black_box(&state), 1, &config))
    });
    group.finish();
}

fn bench_snapshot(c: &mut Criterion) {
    let spec = hello_spec();
    let mut state = StateMachine::default();
    for sequence in 0..SNAPSHOT_JOBS as u64 {
        state.apply(submit(&spec, sequence), &mut Vec::new());
    }
    assert_eq!(state.job_count(), SNAPSHOT_JOBS);
    let bytes = state.to_snapshot().expect("snapshot encodes");

    let mut group = c.benchmark_group("snapshot");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("encode_10k_jobs", |b| {
        b.iter(|| black_box(&state).to_snapshot().expect("snapshot encodes"))
    });
    group.bench_function("decode_10k_jobs", |b| {
        b.iter(|| StateMachine::from_snapshot(black_box(&bytes)).expect("snapshot decodes"))
    });
    group.finish();
}

/// Where the next appended entry goes, and the store it goes to.
struct AppendTarget {
    store: LogStore,
    next_index: u64,
    batches: u64,
}

fn fresh_store(directory: Option<&Path>, generation: u64) -> LogStore {
    let mut store = match directory {
        Some(directory) => {
            let path = directory.join(format!("raft-{generation}"));
            std::fs::create_dir_all(&path).expect("store directory is created");
            LogStore::open(Databases::open(&path).expect("databases open")).expect("log store opens")
        }
        None => LogStore::open(Databases::in_memory().expect("in-memory databases open")).expect("log store loads"),
    };
    let empty_state = StateMachine::default().to_snapshot().expect("empty state encodes");
    store.bootstrap(&[1], empty_state).expect("bootstrap writes");
    store
}

/// The index the next appended entry must have, whatever `bootstrap` wrote first.
fn next_index(store: &LogStore) -> u64 {
    store.last_index().expect("last index is known") + 1
}

fn batch(payload: &[u8], first_index: u64, size: u64) -> (Vec<Entry>, HardState) {
    let entries = (first_index..first_index + size)
        .map(|index| Entry {
            index,
            term: 1,
            data: payload.to_vec().into(),
            ..Default::default()
        })
        .collect();
    let hard_state = HardState {
        term: 1,
        vote: 1,
        commit: first_index + size - 1,
        ..Default::default()
    };
    (entries, hard_state)
}

fn bench_log_append(c: &mut Criterion) {
    let spec = hello_spec();
    let payload = encode(&submit(&spec, 0)).expect("command encodes");
    let directory = tempfile::tempdir().expect("temporary directory");

    for (backend, directory, measurement_seconds) in [("file", Some(directory.path()), 3), ("memory", None, 2)] {
        let mut group = c.benchmark_group(format!("log_append/{backend}"));
        group.sample_size(20);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(measurement_seconds));
        for batch_size in [1u64, 64] {
            group.throughput(Throughput::Elements(batch_size));
            let mut generation = 0;
            let store = fresh_store(directory, generation);
            let mut target = AppendTarget {
                next_index: next_index(&store),
                store,
                batches: 0,
            };
            group.bench_function(format!("batch_{batch_size}"), |b| {
                b.iter_custom(|iterations| {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iterations {
                        if target.batches == APPENDS_PER_STORE {
                            generation += 1;
                            // Replace the store first so the old file is closed before it is removed.
                            let store = fresh_store(directory, generation);
                            target = AppendTarget {
                                next_index: next_index(&store),
                                store,
                                batches: 0,
                            };
                            if let Some(directory) = directory {
                                let old = directory.join(format!("raft-{}", generation - 1));
                                std::fs::remove_dir_all(old).expect("old log directory removed");
                            }
                        }
                        let (entries, hard_state) = batch(&payload, target.next_index, batch_size);
                        let started = Instant::now();
                        target
                            .store
                            .persist(None, &entries, Some(&hard_state))
                            .expect("persist succeeds");
                        elapsed += started.elapsed();
                        target.next_index += batch_size;
                        target.batches += 1;
                    }
                    elapsed
                })
            });
            if let Some(directory) = directory {
                drop(target);
                let _ = std::fs::remove_file(directory.join(format!("raft-{generation}.redb")));
            }
        }
        group.finish();
    }
}

criterion_group!(
    benches,
    bench_spec,
    bench_apply,
    bench_schedule,
    bench_snapshot,
    bench_log_append
);
criterion_main!(benches);
