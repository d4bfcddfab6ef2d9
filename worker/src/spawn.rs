//! Starting a task without copying the worker's address space.
//!
//! `std::process::Command` with a `pre_exec` hook forks: the child gets a copy of the worker's page tables,
//! and every page the worker writes afterwards takes a fault to break copy-on-write. For a worker embedded
//! beside a coordinator (`kiln up`) that is milliseconds of CPU per task, which is the whole budget of a
//! 10 ms sweep trial. A task needs one thing between fork and exec that `posix_spawn` cannot do, the
//! parent-death signal, so this starts it the way glibc's `posix_spawn` works inside:
//! `clone(CLONE_VM | CLONE_VFORK)` onto a small stack of its own. The child shares the worker's memory, runs
//! only async-signal-safe calls on data prepared beforehand (no allocation, no lock), and the calling thread
//! is suspended until the child has called `execve` or exited. Its exit is awaited through a pidfd.
//!
//! What the child does, in order: every caught signal and SIGPIPE (which Rust's runtime ignores) back to
//! the default; the parent-death signal; its own process group; the working directory; stdin from
//! /dev/null, stdout and stderr to the given files; an empty signal mask; `execve` of each candidate path
//! of the program (those of PATH, as `execvp` tries them).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString, c_int, c_void};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::io::unix::AsyncFd;

/// The child's stack: it makes a handful of system calls in shallow frames.
const CHILD_STACK_BYTES: usize = 64 * 1024;
/// Signal numbers on Linux run from 1 to 64.
const SIGNALS: c_int = 64;

/// A task's program, arguments, environment, directory and output files.
pub(crate) struct TaskCommand {
    program: OsString,
    args: Vec<OsString>,
    env: BTreeMap<OsString, OsString>,
    cwd: PathBuf,
    stdout: Option<File>,
    stderr: Option<File>,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
}

/// Which step of the child failed, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    DeathSignal = 1,
    ProcessGroup = 2,
    Directory = 3,
    Redirect = 4,
    Exec = 5,
}

impl Step {
    fn of(code: i32) -> Step {
        match code {
            1 => Step::DeathSignal,
            2 => Step::ProcessGroup,
            3 => Step::Directory,
            4 => Step::Redirect,
            _ => Step::Exec,
        }
    }
}

/// Everything the child reads, prepared by the parent, and the two words it writes when it fails.
struct ChildSetup {
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    parent: libc::pid_t,
    failed_step: AtomicI32,
    failed_errno: AtomicI32,
}

impl TaskCommand {
    /// A command that inherits the worker's environment, like `std::process::Command`.
    pub(crate) fn new(program: impl AsRef<OsStr>) -> TaskCommand {
        TaskCommand {
            program: program.as_ref().to_os_string(),
            args: Vec::new(),
            env: std::env::vars_os().collect(),
            cwd: PathBuf::from("."),
            stdout: None,
            stderr: None,
        }
    }

    pub(crate) fn args<I, S>(&mut self, args: I) -> &mut TaskCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_os_string()));
        self
    }

    pub(crate) fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut TaskCommand {
        self.env
            .insert(key.as_ref().to_os_string(), value.as_ref().to_os_string());
        self
    }

    pub(crate) fn envs<I, K, V>(&mut self, vars: I) -> &mut TaskCommand
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (key, value) in vars {
            self.env(key, value);
        }
        self
    }

    pub(crate) fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut TaskCommand {
        self.cwd = dir.as_ref().to_path_buf();
        self
    }

    pub(crate) fn stdout(&mut self, file: File) -> &mut TaskCommand {
        self.stdout = Some(file);
        self
    }

    pub(crate) fn stderr(&mut self, file: File) -> &mut TaskCommand {
        self.stderr = Some(file);
        self
    }

    /// The paths `execve` tries: the program itself when it names a path, else each directory of the
    /// task's PATH joined with it (an empty entry is the working directory).
    fn candidates(&self) -> Vec<PathBuf> {
        if self.program.as_bytes().contains(&b'/') {
            return vec![PathBuf::from(&self.program)];
        }
        let path = self
            .env
            .get(OsStr::new("PATH"))
            .cloned()
            .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
        std::env::split_paths(&path)
            .map(|dir| {
                if dir.as_os_str().is_empty() {
                    PathBuf::from(&self.program)
                } else {
                    dir.join(&self.program)
                }
            })
            .collect()
    }

    /// Starts the task in its own process group, with SIGKILL as its parent-death signal (a worker that
    /// dies takes its tasks with it, so no orphan rank keeps training beside the attempt that replaces it).
    /// The death signal follows the thread that started the task: call this from a thread that lives as
    /// long as the worker (a runtime worker thread).
    pub(crate) fn spawn(&mut self) -> io::Result<TaskChild> {
        let c = |bytes: &[u8], what: &str| {
            CString::new(bytes)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains a NUL byte")))
        };
        let candidates = self
            .candidates()
            .iter()
            .map(|path| c(path.as_os_str().as_bytes(), "the program"))
            .collect::<io::Result<Vec<_>>>()?;
        let mut arguments = vec![c(self.program.as_bytes(), "the program")?];
        for arg in &self.args {
            arguments.push(c(arg.as_bytes(), "an argument")?);
        }
        let mut variables = Vec::with_capacity(self.env.len());
        for (key, value) in &self.env {
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            variables.push(c(&entry, "an environment variable")?);
        }
        let null_terminated = |strings: &[CString]| -> Vec<*const libc::c_char> {
            strings
                .iter()
                .map(|string| string.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let stdin = File::open("/dev/null")?;
        let stdout = self.stdout.take().map_or_else(|| File::open("/dev/null"), Ok)?;
        let stderr = self.stderr.take().map_or_else(|| File::open("/dev/null"), Ok)?;
        let setup = ChildSetup {
            argv: null_terminated(&arguments),
            envp: null_terminated(&variables),
            candidates,
            cwd: c(self.cwd.as_os_str().as_bytes(), "the working directory")?,
            stdin: stdin.as_raw_fd(),
            stdout: stdout.as_raw_fd(),
            stderr: stderr.as_raw_fd(),
            parent: std::process::id() as libc::pid_t,
            failed_step: AtomicI32::new(0),
            failed_errno: AtomicI32::new(0),
        };
        let pid = clone_and_exec(&setup)?;
        let step = setup.failed_step.load(Ordering::SeqCst);
        if step != 0 {
            // The child has exited: reap it before reporting why.
            let _ = rustix::process::waitpid(
                rustix::process::Pid::from_raw(pid),
                rustix::process::WaitOptions::empty(),
            );
            let error = io::Error::from_raw_os_error(setup.failed_errno.load(Ordering::SeqCst));
            return Err(match Step::of(step) {
                Step::Exec => error,
                Step::DeathSignal => io::Error::new(error.kind(), format!("setting the parent-death signal: {error}")),
                Step::ProcessGroup => io::Error::new(error.kind(), format!("starting a process group: {error}")),
                Step::Directory => io::Error::new(error.kind(), format!("entering {}: {error}", self.cwd.display())),
                Step::Redirect => io::Error::new(error.kind(), format!("redirecting stdio: {error}")),
            });
        }
        let pid = rustix::process::Pid::from_raw(pid).ok_or_else(|| io::Error::other("clone returned pid 0"))?;
        // The child is ours and not yet reaped, so its pid cannot have been reused.
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK)?;
        Ok(TaskChild {
            pid: pid.as_raw_nonzero().get() as u32,
            pidfd: watch(pidfd)?,
        })
    }
}

/// A started task.
pub(crate) struct TaskChild {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
}

impl TaskChild {
    pub(crate) fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the task to end and reaps it.
    pub(crate) async fn wait(self) -> io::Result<Exit> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            let options = rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG;
            match rustix::process::waitid(rustix::process::WaitId::PidFd(self.pidfd.get_ref().as_fd()), options) {
                Ok(Some(status)) => {
                    return Ok(match (status.exit_status(), status.terminating_signal()) {
                        (Some(code), _) => Exit::Code(code),
                        (None, Some(signal)) => Exit::Signal(signal),
                        (None, None) => Exit::Code(-1),
                    });
                }
                Ok(None) => ready.clear_ready(),
                Err(rustix::io::Errno::INTR) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// The pidfd in the runtime's reactor: readable once the task has exited.
#[allow(unsafe_code)]
fn watch(pidfd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so its descriptor stays open and the same until it is dropped.
    unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|error| error.into_parts().1)
}

/// clone(CLONE_VM | CLONE_VFORK) running [`child_main`]; returns once the child has exec'd or exited.
#[allow(unsafe_code)]
fn clone_and_exec(setup: &ChildSetup) -> io::Result<libc::pid_t> {
    let mut stack = vec![0u8; CHILD_STACK_BYTES];
    // The stack grows down on every architecture Kiln builds for: pass its top, 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK_BYTES) & !15;
    // SAFETY: every signal is blocked on this thread across the clone, so no handler of the worker runs in
    // the child while it still shares the worker's memory (the child sets caught signals back to the default
    // before unblocking them); the old mask is restored right after. `child_main` only reads `setup`, which
    // outlives the call because CLONE_VFORK suspends this thread until the child has exec'd or exited, and
    // it writes only the two atomics. The stack is ours and unused by anything else until it is dropped,
    // after the child is done with it.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child_main,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            setup as *const ChildSetup as *mut c_void,
        );
        let error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        drop(stack);
        if pid == -1 { Err(error) } else { Ok(pid) }
    }
}

/// The child between clone and exec. Async-signal-safe calls only; it never returns.
#[allow(unsafe_code)]
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildSetup` the suspended parent passed, alive until this child execs or exits.
    // Everything below is a system call on prepared, NUL-terminated data; nothing allocates or locks.
    unsafe {
        let setup = &*(arg as *const ChildSetup);
        let fail = |step: Step| child_fail(setup, step);
        for signal in 1..=SIGNALS {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            let caught = current.sa_sigaction != libc::SIG_DFL && current.sa_sigaction != libc::SIG_IGN;
            if caught || signal == libc::SIGPIPE {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            fail(Step::DeathSignal);
        }
        if libc::getppid() != setup.parent {
            // The worker died before the death signal was set: nobody would stop this task.
            libc::_exit(127);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(Step::ProcessGroup);
        }
        if libc::chdir(setup.cwd.as_ptr()) != 0 {
            fail(Step::Directory);
        }
        for (from, to) in [(setup.stdin, 0), (setup.stdout, 1), (setup.stderr, 2)] {
            if libc::dup2(from, to) == -1 {
                fail(Step::Redirect);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // As execvp: go on past a candidate that is missing or not executable, remembering a refusal.
        let mut refused = false;
        for candidate in &setup.candidates {
            libc::execve(candidate.as_ptr(), setup.argv.as_ptr(), setup.envp.as_ptr());
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR) => {}
                Some(libc::EACCES) => refused = true,
                _ => fail(Step::Exec),
            }
        }
        setup
            .failed_errno
            .store(if refused { libc::EACCES } else { libc::ENOENT }, Ordering::SeqCst);
        setup.failed_step.store(Step::Exec as i32, Ordering::SeqCst);
        libc::_exit(127)
    }
}

/// Records why the child could not exec (errno and step) for the parent, and exits.
#[allow(unsafe_code)]
fn child_fail(setup: &ChildSetup, step: Step) -> ! {
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
    setup.failed_errno.store(errno, Ordering::SeqCst);
    setup.failed_step.store(step as i32, Ordering::SeqCst);
    // SAFETY: _exit is async-signal-safe and skips every exit handler of the (shared) worker process.
    unsafe { libc::_exit(127) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(dir: &Path, name: &str) -> File {
        File::create(dir.join(name)).unwrap()
    }

    #[tokio::test]
    async fn a_task_runs_in_its_directory_with_its_environment_and_its_exit_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = TaskCommand::new("sh");
        command
            .args(["-c", "pwd; echo \"$KILN_TEST_VALUE\"; echo oops >&2; exit 3"])
            .env("KILN_TEST_VALUE", "hello there")
            .current_dir(dir.path())
            .stdout(output(dir.path(), "out"))
            .stderr(output(dir.path(), "err"));
        let child = command.spawn().unwrap();
        assert!(child.id() > 0);
        assert_eq!(child.wait().await.unwrap(), Exit::Code(3));
        let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let canonical = dir.path().canonicalize().unwrap();
        assert_eq!(out, format!("{}\nhello there\n", canonical.display()));
        assert_eq!(std::fs::read_to_string(dir.path().join("err")).unwrap(), "oops\n");
    }

    #[tokio::test]
    async fn a_task_leads_its_own_process_group_with_sigpipe_at_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = TaskCommand::new("sh");
        // Field 5 of /proc/self/stat is the process group; the status file lists ignored signals.
        command
            .args([
                "-c",
                "cut -d' ' -f5 /proc/$$/stat; grep SigIgn /proc/$$/status; echo $$",
            ])
            .current_dir(dir.path())
            .stdout(output(dir.path(), "out"));
        let child = command.spawn().unwrap();
        let pid = child.id();
        assert_eq!(child.wait().await.unwrap(), Exit::Code(0));
        let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], pid.to_string(), "the task leads its own process group: {out}");
        let ignored = u64::from_str_radix(lines[1].trim_start_matches("SigIgn:").trim(), 16).unwrap();
        assert_eq!(
            ignored & (1 << (libc::SIGPIPE - 1)),
            0,
            "SIGPIPE is back to the default: {out}"
        );
    }

    #[tokio::test]
    async fn a_task_gets_sigkill_as_its_parent_death_signal() {
        let dir = tempfile::tempdir().unwrap();
        // prctl(PR_GET_PDEATHSIG = 2) from inside the task.
        let mut command = TaskCommand::new("python3");
        command
            .args([
                "-c",
                "import ctypes; s = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(s)); print(s.value)",
            ])
            .current_dir(dir.path())
            .stdout(output(dir.path(), "out"));
        assert_eq!(command.spawn().unwrap().wait().await.unwrap(), Exit::Code(0));
        let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
        assert_eq!(out.trim(), libc::SIGKILL.to_string());
    }

    #[tokio::test]
    async fn a_signal_ends_a_task_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = TaskCommand::new("sleep");
        command.args(["30"]).current_dir(dir.path());
        let child = command.spawn().unwrap();
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        assert_eq!(child.wait().await.unwrap(), Exit::Signal(libc::SIGTERM));
    }

    #[tokio::test]
    async fn a_missing_program_or_directory_is_an_error_and_leaves_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let refusal = |program: &str, cwd: PathBuf| TaskCommand::new(program).current_dir(cwd).spawn().err().unwrap();
        let error = refusal("kiln-no-such-program", dir.path().to_path_buf());
        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
        let error = refusal("./not-executable", dir.path().to_path_buf());
        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
        let error = refusal("sh", dir.path().join("missing"));
        assert!(error.to_string().contains("entering"), "{error}");
        std::fs::write(dir.path().join("script"), "#!/bin/sh\n").unwrap();
        let error = refusal("./script", dir.path().to_path_buf());
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
    }

    #[test]
    fn the_program_is_looked_up_in_the_tasks_path() {
        let mut command = TaskCommand::new("tool");
        command.env("PATH", "/opt/a::/opt/b");
        assert_eq!(
            command.candidates(),
            vec![
                PathBuf::from("/opt/a/tool"),
                PathBuf::from("tool"),
                PathBuf::from("/opt/b/tool")
            ]
        );
        assert_eq!(TaskCommand::new("./x").candidates(), vec![PathBuf::from("./x")]);
    }
}
