//! `WorkerAgent.Logs`: streams a task's stdout and stderr files, and with `follow` keeps streaming what
//! the task writes until it has exited and everything written is sent.

use std::path::PathBuf;
use std::time::Duration;

use kiln_proto as pb;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::executor::{Key, RunningSet, task_dir};

/// Bytes per chunk sent.
const CHUNK_BYTES: usize = 64 * 1024;
/// How often a followed file is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Chunks buffered for a slow reader before reading pauses.
const STREAM_BUFFER_CHUNKS: usize = 16;

#[derive(Clone)]
pub(crate) struct LogServer {
    pub(crate) data_dir: PathBuf,
    pub(crate) running: RunningSet,
    pub(crate) shutdown: CancellationToken,
}

struct Tail {
    name: &'static str,
    file: Option<tokio::fs::File>,
    path: PathBuf,
}

impl Tail {
    /// Reads what is there now; `Ok(0)` when nothing new.
    async fn read_some(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.file.is_none() {
            match tokio::fs::File::open(&self.path).await {
                Ok(file) => self.file = Some(file),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(error) => return Err(error),
            }
        }
        self.file.as_mut().expect("opened above").read(buffer).await
    }
}

#[tonic::async_trait]
impl pb::worker_agent_server::WorkerAgent for LogServer {
    type LogsStream = ReceiverStream<Result<pb::LogChunk, Status>>;

    async fn logs(&self, request: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        let key = request
            .task
            .as_ref()
            .map(Key::from_proto)
            .ok_or_else(|| Status::invalid_argument("the task key is missing"))?;
        let dir = task_dir(&self.data_dir, key);
        if !dir.exists() {
            return Err(Status::not_found(format!(
                "this worker has no output for {key}: it never ran here, its data directory was removed, or it \
                 was among the oldest ended tasks removed beyond the worker's --keep-tasks"
            )));
        }
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER_CHUNKS);
        let running = self.running.clone();
        let shutdown = self.shutdown.clone();
        let follow = request.follow;
        tokio::spawn(async move {
            let mut tails = [
                Tail {
                    name: "stdout",
                    file: None,
                    path: dir.join("stdout.log"),
                },
                Tail {
                    name: "stderr",
                    file: None,
                    path: dir.join("stderr.log"),
                },
            ];
            let mut buffer = vec![0u8; CHUNK_BYTES];
            loop {
                // Checked before reading: output written before the exit is then read in this pass.
                let finished = !follow || !running.lock().expect("running set poisoned").contains(&key);
                let mut read_any = false;
                for tail in &mut tails {
                    loop {
                        match tail.read_some(&mut buffer).await {
                            Ok(0) => break,
                            Ok(count) => {
                                read_any = true;
                                let chunk = pb::LogChunk {
                                    stream: tail.name.to_string(),
                                    data: buffer[..count].to_vec(),
                                };
                                if sender.send(Ok(chunk)).await.is_err() {
                                    return;
                                }
                            }
                            Err(error) => {
                                let status = Status::internal(format!("reading {}: {error}", tail.path.display()));
                                let _ = sender.send(Err(status)).await;
                                return;
                            }
                        }
                    }
                }
                if finished && !read_any {
                    return;
                }
                if !read_any {
                    tokio::select! {
                        () = tokio::time::sleep(FOLLOW_POLL) => {}
                        () = shutdown.cancelled() => return,
                        () = sender.closed() => return,
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}
