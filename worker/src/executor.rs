//! Runs tasks as child processes: one process group, one directory, two log files each.
//!
//! Layout under the data directory:
//! ```text
//!   tasks/job-J-attempt-A-rank-R/stdout.log, stderr.log, work/   (work/ is the task's working directory)
//! ```
//! One directory level per task and no file created and removed per task: a short task's start is mostly
//! these inode allocations, and on ext4 without a journal each allocation skips over every inode freed in
//! the last minute, so per-task files that come and go make every later start slower (measured: a sweep of
//! 1,000 10 ms trials spent most of its overhead in `ext4_mkdir`/`ext4_create`).
//!
//! The directories of ended tasks stay for `kiln jobs logs`, the newest `keep_tasks` of them (`--keep-tasks`):
//! past that the oldest go, once a tenth of `keep_tasks` more have ended and at most once a minute, on a
//! blocking thread: directories are freed in large batches far apart, never one per task start.
//!
//! What a worker process left running when it died is found by the next one without any record of its
//! own: every task process has its working directory under `tasks/` or carries `KILN_RUN_DIR` pointing
//! there (inherited by what it starts, also after a `cd`), and both are read from `/proc`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto as pb;
use tokio::sync::mpsc;

/// A task: a rank of one attempt of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    pub job: u64,
    pub attempt: u32,
    pub rank: u32,
}

impl Key {
    pub(crate) fn from_proto(key: &pb::TaskKey) -> Key {
        Key {
            job: key.job_id,
            attempt: key.attempt,
            rank: key.rank,
        }
    }

    pub(crate) fn to_proto(self) -> pb::TaskKey {
        pb::TaskKey {
            job_id: self.job,
            attempt: self.attempt,
            rank: self.rank,
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {} attempt {} rank {}", self.job, self.attempt, self.rank)
    }
}

pub(crate) fn task_dir(data_dir: &Path, key: Key) -> PathBuf {
    data_dir
        .join("tasks")
        .join(format!("job-{}-attempt-{}-rank-{}", key.job, key.attempt, key.rank))
}

/// The task whose directory is named `name`, as [`task_dir`] names it.
fn key_of_dir(name: &str) -> Option<Key> {
    let rest = name.strip_prefix("job-")?;
    let (job, rest) = rest.split_once("-attempt-")?;
    let (attempt, rank) = rest.split_once("-rank-")?;
    Some(Key {
        job: job.parse().ok()?,
        attempt: attempt.parse().ok()?,
        rank: rank.parse().ok()?,
    })
}

/// The task directories under `data_dir`, oldest first by when they were last written to (the directory
/// or its logs).
fn task_dirs_by_age(data_dir: &Path) -> Vec<Key> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("tasks")) else {
        return Vec::new();
    };
    let modified = |path: &Path| std::fs::metadata(path).and_then(|metadata| metadata.modified()).ok();
    let mut dirs: Vec<(std::time::SystemTime, Key)> = entries
        .flatten()
        .filter_map(|entry| {
            let key = key_of_dir(entry.file_name().to_str()?)?;
            let path = entry.path();
            let last = [path.clone(), path.join("stdout.log"), path.join("stderr.log")]
                .iter()
                .filter_map(|path| modified(path))
                .max()?;
            Some((last, key))
        })
        .collect();
    dirs.sort_unstable();
    dirs.into_iter().map(|(_, key)| key).collect()
}

/// The least time between two removals of ended tasks' directories.
const COLLECT_INTERVAL: Duration = Duration::from_secs(60);

/// The default of `--keep-tasks`: ended tasks whose directories (logs, working directory) a worker keeps.
pub const KEEP_TASKS_DEFAULT: usize = 2000;

/// The variable every task gets with its working directory; what carries it was started for a task.
const RUN_DIR_VARIABLE: &[u8] = b"KILN_RUN_DIR=";

/// The value of `KILN_RUN_DIR` in a process's environment as it was started (`/proc/PID/environ`).
fn run_dir_of(pid: i32) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let environment = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environment
        .split(|byte| *byte == 0)
        .find_map(|entry| entry.strip_prefix(RUN_DIR_VARIABLE))
        .map(|value| PathBuf::from(std::ffi::OsStr::from_bytes(value)))
}

struct Running {
    process_group: i32,
    alive: Arc<AtomicBool>,
    gpus: Vec<u32>,
}

/// The tasks started and not yet ended, shared with the log server (which follows output until then).
pub(crate) type RunningSet = Arc<Mutex<HashSet<Key>>>;

pub(crate) struct Executor {
    data_dir: PathBuf,
    worker_id: u64,
    kill_grace: Duration,
    running: HashMap<Key, Running>,
    visible: RunningSet,
    /// Every task this worker process was asked to start, so a repeated assignment is ignored.
    started: HashSet<Key>,
    exits: mpsc::Sender<(Key, pb::task_report::Outcome)>,
    free_gpus: Vec<u32>,
    /// Handed to tasks (`KILN_COORDINATOR`, `KILN_HOST`), so their ranks can meet through the cluster.
    coordinators: String,
    host: String,
    /// Where the worker was started: relative dataset paths of train jobs are resolved against it.
    worker_directory: PathBuf,
    artifact_dir: PathBuf,
    /// A coordinator's MLflow API, for tasks (`MLFLOW_TRACKING_URI`, `KILN_TRACKING`).
    pub(crate) tracking: Option<String>,
    /// A feature server for tasks (`KILN_FEATURESTORE`).
    pub(crate) featurestore: Option<String>,
    /// Ended tasks whose directories are kept, oldest first.
    ended: VecDeque<Key>,
    keep_tasks: usize,
    /// When ended tasks' directories were last removed.
    collected: Option<std::time::Instant>,
}

fn signal_group(process_group: i32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(process_group) {
        // ESRCH (already gone) is the common, harmless case.
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

impl Executor {
    pub(crate) fn new(
        data_dir: PathBuf,
        gpus: u32,
        kill_grace: Duration,
        exits: mpsc::Sender<(Key, pb::task_report::Outcome)>,
        coordinators: String,
        host: String,
        artifact_dir: PathBuf,
    ) -> Executor {
        Executor {
            // Absolute, so every task's `KILN_RUN_DIR` names this worker's directory whatever the working
            // directory of whoever reads it: a worker elsewhere with the same relative `--data-dir` never takes
            // another worker's tasks for its own leftovers.
            data_dir: std::path::absolute(&data_dir).unwrap_or(data_dir),
            worker_id: 0,
            kill_grace,
            running: HashMap::new(),
            visible: Arc::new(Mutex::new(HashSet::new())),
            started: HashSet::new(),
            exits,
            free_gpus: (0..gpus).collect(),
            coordinators,
            host,
            worker_directory: std::env::current_dir().unwrap_or_default(),
            artifact_dir,
            tracking: None,
            featurestore: None,
            ended: VecDeque::new(),
            keep_tasks: KEEP_TASKS_DEFAULT,
            collected: None,
        }
    }

    /// At start, before any task: keeps the directories of the newest `keep` ended tasks (1 or more),
    /// counting those an earlier worker process left, and removes the oldest beyond them now if there are
    /// many more.
    pub(crate) fn keep_ended_tasks(&mut self, keep: usize) {
        self.keep_tasks = keep;
        self.ended = task_dirs_by_age(&self.data_dir).into();
        self.collect_ended();
    }

    /// Once the ended tasks' directories exceed `keep_tasks` by a tenth of it (at least 1), and a minute after
    /// the last time, removes the oldest down to `keep_tasks`, on a blocking thread.
    fn collect_ended(&mut self) {
        let batch = (self.keep_tasks / 10).max(1);
        let due = self
            .collected
            .is_none_or(|collected| collected.elapsed() >= COLLECT_INTERVAL);
        if self.ended.len() < self.keep_tasks + batch || !due {
            return;
        }
        self.collected = Some(std::time::Instant::now());
        let excess = self.ended.len() - self.keep_tasks;
        let dirs: Vec<PathBuf> = self
            .ended
            .drain(..excess)
            .map(|key| task_dir(&self.data_dir, key))
            .collect();
        tracing::info!(
            count = dirs.len(),
            keep = self.keep_tasks,
            "removing the oldest ended tasks' directories"
        );
        let remove = move || {
            for dir in dirs {
                if let Err(error) = std::fs::remove_dir_all(&dir)
                    && error.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(%error, dir = %dir.display(), "an ended task's directory could not be removed");
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }

    pub(crate) fn set_worker_id(&mut self, id: u64) {
        self.worker_id = id;
    }

    pub(crate) fn running_set(&self) -> RunningSet {
        self.visible.clone()
    }

    pub(crate) fn running_keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = self.running.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// Kills what an earlier worker process with this data directory left running: every process whose
    /// working directory lies under this worker's task directories, or whose `KILN_RUN_DIR` does (a task,
    /// or something it started, that changed directory), with its process group.
    pub(crate) fn kill_leftovers(&self) {
        let tasks = self.data_dir.join("tasks");
        // Tasks were given absolute paths built from the data directory; the cwd link is also canonical.
        let canonical = tasks.canonicalize().unwrap_or_else(|_| tasks.clone());
        let ours = |path: &Path| path.starts_with(&canonical) || path.starts_with(&tasks);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for pid in entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| *pid as u32 != std::process::id())
        {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
            if cwd.is_some_and(|cwd| ours(&cwd)) || run_dir_of(pid).is_some_and(|run_dir| ours(&run_dir)) {
                tracing::warn!(pid, "killing a task process an earlier worker process left running");
                signal_group(pid, rustix::process::Signal::KILL);
                if let Some(process) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(process, rustix::process::Signal::KILL);
                }
            }
        }
    }

    /// Starts an assigned task, unless this process already did. A task that cannot start is reported
    /// through the exit channel like any other ending.
    pub(crate) fn start(&mut self, assign: pb::AssignTask) {
        let Some(key) = assign.task.as_ref().map(Key::from_proto) else {
            return;
        };
        if !self.started.insert(key) {
            return;
        }
        // Started again after it ended here (its directory is reused): not among the ended ones now.
        self.ended.retain(|ended| *ended != key);
        if let Err(message) = self.spawn(key, &assign) {
            tracing::warn!(%key, %message, "task could not start");
            let exits = self.exits.clone();
            tokio::spawn(async move {
                let _ = exits
                    .send((key, pb::task_report::Outcome::FailedToStart(message)))
                    .await;
            });
        }
    }

    fn spawn(&mut self, key: Key, assign: &pb::AssignTask) -> Result<(), String> {
        if !["command", "train", "serve"].contains(&assign.kind.as_str()) {
            return Err(format!(
                "task kind '{}' is not supported by this worker; it runs \"command\", \"train\" and \"serve\" tasks",
                assign.kind
            ));
        }
        // Visible to the log server before its directory exists: a follower of its output waits for the exit
        // from here on. `finished` removes it again, whether the process ran or not.
        self.visible.lock().expect("running set poisoned").insert(key);
        let dir = task_dir(&self.data_dir, key);
        let work = dir.join("work");
        std::fs::create_dir_all(&work).map_err(|error| format!("creating {}: {error}", work.display()))?;
        if key.rank == 0 {
            // The port was reserved by the scheduler, but something outside Kiln may hold it.
            let port = u16::try_from(assign.master_port).unwrap_or(0);
            if let Err(error) = std::net::TcpListener::bind((assign.master_addr.as_str(), port)) {
                return Err(format!(
                    "MASTER_PORT {port} on {} cannot be used ({error}); the next attempt picks another port",
                    assign.master_addr
                ));
            }
        }
        let wanted_gpus = assign.resources.as_ref().map_or(0, |resources| resources.gpus) as usize;
        if wanted_gpus > self.free_gpus.len() {
            return Err(format!(
                "the task needs {wanted_gpus} GPUs but this worker has {} free",
                self.free_gpus.len()
            ));
        }
        let open = |name: &str| {
            std::fs::File::create(dir.join(name))
                .map_err(|error| format!("creating {}: {error}", dir.join(name).display()))
        };
        let (stdout, stderr) = (open("stdout.log")?, open("stderr.log")?);
        // A train task is this binary's built-in trainer, a serve task its model server (a deployment's
        // replica), each given the spec as submitted.
        let (program, args) = if assign.kind == "train" || assign.kind == "serve" {
            let spec = dir.join("spec.toml");
            std::fs::write(&spec, &assign.spec_toml).map_err(|error| format!("writing {}: {error}", spec.display()))?;
            let program = std::env::current_exe().map_err(|error| format!("finding the kiln binary: {error}"))?;
            let args = vec![
                "task".to_string(),
                assign.kind.clone(),
                "--spec".into(),
                spec.display().to_string(),
            ];
            (program.into_os_string(), args)
        } else {
            (std::ffi::OsString::from(&assign.command), assign.args.clone())
        };
        let mut command = crate::spawn::TaskCommand::new(&program);
        command
            .args(&args)
            .current_dir(&work)
            .envs(&assign.env)
            .env("RANK", key.rank.to_string())
            .env("WORLD_SIZE", assign.world_size.to_string())
            .env("LOCAL_RANK", assign.local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", assign.local_world_size.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", &assign.master_addr)
            .env("MASTER_PORT", assign.master_port.to_string())
            .env("KILN_JOB_ID", key.job.to_string())
            .env("KILN_JOB_NAME", &assign.job_name)
            .env("KILN_ATTEMPT", key.attempt.to_string())
            .env("KILN_WORKER_ID", self.worker_id.to_string())
            .env("KILN_RUN_DIR", &work)
            .env("KILN_COORDINATOR", &self.coordinators)
            .env("KILN_HOST", &self.host)
            .env("KILN_WORKER_CWD", &self.worker_directory)
            .env(
                "KILN_CHECKPOINT_DIR",
                self.artifact_dir.join(format!("job-{}", key.job)).join("checkpoints"),
            )
            .stdout(stdout)
            .stderr(stderr);
        if let Some(tracking) = &self.tracking {
            command.env("KILN_TRACKING", tracking).env(
                "MLFLOW_TRACKING_URI",
                format!("http://{}", tracking.split(',').next().unwrap_or_default().trim()),
            );
        }
        if let Some(featurestore) = &self.featurestore {
            command.env("KILN_FEATURESTORE", featurestore);
        }
        // A sweep's trial: MLflow's client logs into the trial's run (`mlflow.start_run()` resumes
        // MLFLOW_RUN_ID), and the parameters are also a JSON file for programs that prefer one.
        if let Some(params) = assign.env.get("KILN_TRIAL_PARAMS") {
            command.env("MLFLOW_RUN_ID", format!("{:032x}", key.job));
            let file = dir.join("trial_params.json");
            match std::fs::write(&file, params) {
                Ok(()) => {
                    command.env("KILN_TRIAL_PARAMS_FILE", &file);
                }
                Err(error) => {
                    tracing::warn!(%error, file = %file.display(), "the trial's parameter file was not written")
                }
            }
        }
        let gpus: Vec<u32> = self.free_gpus.drain(..wanted_gpus).collect();
        // Always set: a task that was given no GPU must not inherit the worker's own view of the devices and
        // use GPUs the scheduler counts as free.
        let list: Vec<String> = gpus.iter().map(|gpu| gpu.to_string()).collect();
        command.env("CUDA_VISIBLE_DEVICES", list.join(","));
        // Its own process group, and SIGKILL when the worker dies (a crash, SIGKILL), so no orphan rank keeps
        // training or writing checkpoints beside the attempt that replaces it. The death signal follows the
        // thread that starts the task: a runtime worker thread (this runs on the agent's task), which lives
        // as long as the worker.
        let child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                self.free_gpus.extend(gpus);
                return Err(if error.kind() == std::io::ErrorKind::NotFound {
                    format!(
                        "command '{}' was not found (looked in PATH and {})",
                        assign.command,
                        work.display()
                    )
                } else {
                    format!("starting '{}': {error}", assign.command)
                });
            }
        };
        let pid = child.id() as i32;
        let alive = Arc::new(AtomicBool::new(true));
        self.running.insert(
            key,
            Running {
                process_group: pid,
                alive: alive.clone(),
                gpus,
            },
        );
        tracing::info!(%key, pid, command = %assign.command, "task started");
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let outcome = match child.wait().await {
                Ok(crate::spawn::Exit::Code(code)) => pb::task_report::Outcome::ExitCode(code),
                Ok(crate::spawn::Exit::Signal(signal)) => pb::task_report::Outcome::Signal(signal),
                Err(error) => pb::task_report::Outcome::FailedToStart(format!("waiting for the process: {error}")),
            };
            alive.store(false, Ordering::SeqCst);
            // What the task left in its group (a daemon, a child that ignored SIGTERM) ends with it. The
            // group id cannot be reused while any member lives; with none left the call finds no group.
            signal_group(pid, rustix::process::Signal::KILL);
            let _ = exits.send((key, outcome)).await;
        });
        Ok(())
    }

    /// Bookkeeping once a task's exit has been seen.
    pub(crate) fn finished(&mut self, key: Key) {
        if let Some(running) = self.running.remove(&key) {
            self.free_gpus.extend(running.gpus);
            self.free_gpus.sort_unstable();
        }
        self.visible.lock().expect("running set poisoned").remove(&key);
        if !self.ended.contains(&key) {
            self.ended.push_back(key);
            self.collect_ended();
        }
    }

    /// SIGTERM to the task's process group, SIGKILL after the grace period if it is still there.
    ///
    /// A task this process never started (its assignment never arrived, say, because the leader placed it
    /// while this worker was cut off) is marked started, so a late assignment is ignored, and reported as
    /// stopped, so the cluster frees what it holds.
    pub(crate) fn kill(&mut self, key: Key, reason: &str) {
        if self.started.insert(key) {
            tracing::info!(%key, reason, "stopping a task before it started");
            let exits = self.exits.clone();
            tokio::spawn(async move {
                let outcome = pb::task_report::Outcome::FailedToStart("stopped before it started".into());
                let _ = exits.send((key, outcome)).await;
            });
            return;
        }
        let Some(running) = self.running.get(&key) else { return };
        if !running.alive.load(Ordering::SeqCst) {
            // Already exited; its report is on the way, and its group id may be free for reuse.
            return;
        }
        tracing::info!(%key, reason, "stopping task");
        signal_group(running.process_group, rustix::process::Signal::TERM);
        let (group, alive, grace) = (running.process_group, running.alive.clone(), self.kill_grace);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if alive.load(Ordering::SeqCst) {
                signal_group(group, rustix::process::Signal::KILL);
            }
        });
    }

    pub(crate) fn kill_all(&mut self, reason: &str) {
        let keys: Vec<Key> = self.running.keys().copied().collect();
        for key in keys {
            self.kill(key, reason);
        }
    }

    /// Whether the task's process was started and its exit not yet recorded.
    pub(crate) fn is_running(&self, key: Key) -> bool {
        self.running.contains_key(&key)
    }

    /// Whether this process was asked to start the task (and has not forgotten it since).
    pub(crate) fn was_started(&self, key: Key) -> bool {
        self.started.contains(&key)
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.running.is_empty()
    }

    /// Forgets a task whose end the cluster has committed.
    pub(crate) fn forget(&mut self, key: Key) {
        if !self.running.contains_key(&key) {
            self.started.remove(&key);
        }
    }

    /// Forgets which tasks were started: after registering again, the cluster numbers attempts anew
    /// only for new attempts, so nothing it sends can be a repeat of an old start.
    pub(crate) fn forget_started(&mut self) {
        let running: HashSet<Key> = self.running.keys().copied().collect();
        self.started.retain(|key| running.contains(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(job: u64) -> Key {
        Key {
            job,
            attempt: 1,
            rank: 0,
        }
    }

    /// A task directory with its logs, last written `age` ago.
    fn task(data_dir: &Path, job: u64, age: Duration) {
        let dir = task_dir(data_dir, key(job));
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let time = std::time::SystemTime::now() - age;
        for name in ["stdout.log", "stderr.log"] {
            let file = std::fs::File::create(dir.join(name)).unwrap();
            file.set_modified(time).unwrap();
        }
        std::fs::File::open(&dir).unwrap().set_modified(time).unwrap();
    }

    /// The jobs whose task directories exist, once `expected` of them do (or 10 s passed).
    async fn jobs_left(data_dir: &Path, expected: usize) -> Vec<u64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut jobs: Vec<u64> = std::fs::read_dir(data_dir.join("tasks"))
                .unwrap()
                .flatten()
                .filter_map(|entry| key_of_dir(entry.file_name().to_str()?))
                .map(|key| key.job)
                .collect();
            jobs.sort_unstable();
            if jobs.len() == expected || std::time::Instant::now() > deadline {
                return jobs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_oldest_ended_tasks_directories_go_in_batches_beyond_keep_tasks() {
        let data = tempfile::tempdir().unwrap();
        let (exits, _receiver) = mpsc::channel(16);
        let mut executor = Executor::new(
            data.path().to_path_buf(),
            0,
            Duration::from_secs(1),
            exits,
            String::new(),
            "127.0.0.1".into(),
            data.path().join("artifacts"),
        );
        // 25 directories an earlier worker process left, job 1 the oldest, and a stranger that stays.
        for job in 1..=25 {
            task(data.path(), job, Duration::from_secs(1000 - job));
        }
        std::fs::create_dir_all(data.path().join("tasks/not-a-task")).unwrap();
        executor.keep_ended_tasks(10);
        assert_eq!(jobs_left(data.path(), 10).await, (16..=25).collect::<Vec<_>>());
        assert!(data.path().join("tasks/not-a-task").exists());

        // Within a minute of that removal, tasks end and their directories stay.
        for job in 26..=40 {
            task(data.path(), job, Duration::ZERO);
            executor.finished(key(job));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(jobs_left(data.path(), 25).await, (16..=40).collect::<Vec<_>>());

        // A minute later the next ending removes the oldest down to 10, in one batch.
        executor.collected = Some(std::time::Instant::now() - COLLECT_INTERVAL);
        task(data.path(), 41, Duration::ZERO);
        executor.finished(key(41));
        assert_eq!(jobs_left(data.path(), 10).await, (32..=41).collect::<Vec<_>>());
        assert_eq!(executor.ended.len(), 10);

        // A task started again under a key that ended here is not counted among the ended ones.
        executor.start(pb::AssignTask {
            task: Some(key(41).to_proto()),
            kind: "no such kind".into(),
            ..Default::default()
        });
        assert_eq!(executor.ended.len(), 9, "{:?}", executor.ended);
        assert!(!executor.ended.contains(&key(41)));
    }
}
