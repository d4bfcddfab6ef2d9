//! Dynamic batching: requests for one model version wait in a bounded queue; a dispatcher stacks them into
//! one batch of at most `max_batch_size` rows and hands it to one of `instances` model runners.
//!
//! ```text
//!   request ─try_send─► [ queue (≤ queue_capacity) ] ─► dispatcher ─► batch ─► runner 1..instances
//!      ▲ full: QueueFull (503, Retry-After)                 │ waits for a free runner, then takes what is
//!      └──────────── reply (oneshot, its rows) ◄────────────┘ queued, up to max_wait after the first arrived
//! ```
//!
//! The dispatcher takes a runner before it forms a batch, so while every runner is busy requests pile up in
//! the queue and the next batch takes them all: under load batches grow by themselves and `max_wait` can
//! stay 0, which adds no latency to a lone request. A batch's rows go back to their requests in order; a
//! model failure fails every request of its batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::ServeError;
use crate::metrics::ModelMetrics;
use crate::model::Model;
use crate::tensor::Tensor;

/// How one model version batches (a deployment's `[batching]`).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchConfig {
    /// The most rows in one batch; a single larger request runs alone.
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for others when a runner is free.
    pub max_wait: Duration,
    /// Requests waiting beyond this are refused with [`ServeError::QueueFull`].
    pub queue_capacity: usize,
    /// Batches run at once (threads in the model).
    pub instances: usize,
}

impl Default for BatchConfig {
    fn default() -> BatchConfig {
        BatchConfig {
            max_batch_size: 64,
            max_wait: Duration::ZERO,
            queue_capacity: 1024,
            instances: 2,
        }
    }
}

impl BatchConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("max_batch_size", self.max_batch_size),
            ("queue_capacity", self.queue_capacity),
            ("instances", self.instances),
        ] {
            if value == 0 {
                return Err(format!("batching {name} is 0; expected at least 1"));
            }
        }
        Ok(())
    }
}

struct Pending {
    inputs: Vec<Tensor>,
    rows: usize,
    arrived: Instant,
    reply: oneshot::Sender<Result<Vec<Tensor>, ServeError>>,
}

/// The queue in front of one model version; dropping it lets the dispatcher finish what is queued and stop.
pub struct Batcher {
    model_name: String,
    queue: mpsc::Sender<Pending>,
    capacity: usize,
    metrics: ModelMetrics,
}

impl Batcher {
    /// Starts the dispatcher on the current tokio runtime.
    pub fn start(model_name: &str, model: Arc<dyn Model>, config: BatchConfig, metrics: ModelMetrics) -> Batcher {
        let (queue, receiver) = mpsc::channel(config.queue_capacity);
        let batcher = Batcher {
            model_name: model_name.to_string(),
            queue,
            capacity: config.queue_capacity,
            metrics: metrics.clone(),
        };
        tokio::spawn(dispatch(model_name.to_string(), model, config, metrics, receiver));
        batcher
    }

    /// Queues checked `inputs` and waits for the model's outputs for them (every declared output).
    pub async fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ServeError> {
        let (reply, answer) = oneshot::channel();
        let rows = inputs.first().map_or(1, Tensor::rows);
        let pending = Pending {
            inputs,
            rows,
            arrived: Instant::now(),
            reply,
        };
        self.queue.try_send(pending).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => ServeError::QueueFull {
                model: self.model_name.clone(),
                capacity: self.capacity,
            },
            mpsc::error::TrySendError::Closed(_) => ServeError::ShuttingDown,
        })?;
        self.metrics.queue_depth.inc();
        answer.await.unwrap_or_else(|_| {
            Err(ServeError::Model {
                model: self.model_name.clone(),
                message: "the model stopped while running this request".into(),
            })
        })
    }
}

async fn dispatch(
    model_name: String,
    model: Arc<dyn Model>,
    config: BatchConfig,
    metrics: ModelMetrics,
    mut queue: mpsc::Receiver<Pending>,
) {
    let runners = Arc::new(Semaphore::new(config.instances));
    let batches = model.batches();
    // A request that did not fit the last batch opens the next.
    let mut carried: Option<Pending> = None;
    loop {
        let Ok(runner) = runners.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(pending) => pending,
            None => match queue.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        let deadline = tokio::time::Instant::from_std(first.arrived + config.max_wait);
        let mut rows = first.rows;
        let mut batch = vec![first];
        while batches && rows < config.max_batch_size {
            let next = match queue.try_recv() {
                Ok(pending) => Some(pending),
                // Past the deadline (always, with a max_wait of 0) the batch goes as it is: a timer, even an
                // elapsed one, would fire only at the timer wheel's next millisecond tick.
                Err(mpsc::error::TryRecvError::Empty) if tokio::time::Instant::now() >= deadline => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, queue.recv()).await.ok().flatten()
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(next) = next else { break };
            if rows + next.rows > config.max_batch_size {
                carried = Some(next);
                break;
            }
            rows += next.rows;
            batch.push(next);
        }
        metrics.queue_depth.dec_by(batch.len() as i64);
        let (model, metrics, model_name) = (model.clone(), metrics.clone(), model_name.clone());
        tokio::task::spawn_blocking(move || {
            run_batch(&model_name, model.as_ref(), batch, &metrics);
            drop(runner);
        });
    }
}

/// Runs one batch and answers each of its requests with its own rows.
fn run_batch(model_name: &str, model: &dyn Model, batch: Vec<Pending>, metrics: &ModelMetrics) {
    let rows: Vec<usize> = batch.iter().map(|pending| pending.rows).collect();
    metrics.batch_size.observe(rows.iter().sum::<usize>() as f64);
    let input_count = batch[0].inputs.len();
    let inputs: Vec<Tensor> = (0..input_count)
        .map(|index| Tensor::concat(&batch.iter().map(|pending| &pending.inputs[index]).collect::<Vec<_>>()))
        .collect();
    let failed = |message: String| ServeError::Model {
        model: model_name.to_string(),
        message,
    };
    let outcome = model.infer(&inputs).map_err(failed).and_then(|outputs| {
        let declared = model.outputs().len();
        if outputs.len() != declared {
            return Err(failed(format!(
                "it returned {} outputs; it declares {declared}",
                outputs.len()
            )));
        }
        // Per output, its pieces per request; then regrouped per request.
        let mut pieces = Vec::with_capacity(outputs.len());
        for output in &outputs {
            pieces.push(output.split_rows(&rows).map_err(failed)?.into_iter());
        }
        Ok((0..rows.len())
            .map(|_| {
                pieces
                    .iter_mut()
                    .map(|piece| piece.next().expect("one piece per request"))
                    .collect()
            })
            .collect::<Vec<Vec<Tensor>>>())
    });
    match outcome {
        Ok(per_request) => {
            for (pending, outputs) in batch.into_iter().zip(per_request) {
                metrics.latency.observe(pending.arrived.elapsed().as_secs_f64());
                let _ = pending.reply.send(Ok(outputs));
            }
        }
        Err(error) => {
            for pending in batch {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::model::TensorSpec;
    use crate::tensor::DataType;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Doubles its input; records the batch sizes it saw; can be held to let requests pile up.
    struct Doubler {
        inputs: Vec<TensorSpec>,
        outputs: Vec<TensorSpec>,
        batches: Mutex<Vec<usize>>,
        hold: AtomicBool,
    }

    impl Model for Doubler {
        fn platform(&self) -> &str {
            "test"
        }
        fn inputs(&self) -> &[TensorSpec] {
            &self.inputs
        }
        fn outputs(&self) -> &[TensorSpec] {
            &self.outputs
        }
        fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
            while self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let values = inputs[0].to_f32().map_err(|error| error.to_string())?;
            if values.contains(&-1.0) {
                return Err("negative one is not allowed".into());
            }
            self.batches.lock().unwrap().push(inputs[0].rows());
            let doubled: Vec<f32> = values.iter().map(|value| value * 2.0).collect();
            Ok(vec![Tensor::from_f32("y", inputs[0].shape.clone(), &doubled)])
        }
    }

    fn doubler() -> Arc<Doubler> {
        Arc::new(Doubler {
            inputs: vec![TensorSpec::new("x", DataType::Fp32, vec![-1, 2])],
            outputs: vec![TensorSpec::new("y", DataType::Fp32, vec![-1, 2])],
            batches: Mutex::new(Vec::new()),
            hold: AtomicBool::new(false),
        })
    }

    fn row(value: f32, rows: usize) -> Vec<Tensor> {
        vec![Tensor::from_f32("x", vec![rows, 2], &vec![value; rows * 2])]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_requests_run_as_one_batch_and_each_gets_its_own_rows_back() {
        let model = doubler();
        let config = BatchConfig {
            max_batch_size: 8,
            instances: 1,
            ..BatchConfig::default()
        };
        let metrics = Metrics::default();
        let batcher = Arc::new(Batcher::start("d", model.clone(), config, metrics.model("d", "1")));
        // The first request holds the only runner, so the next ones queue and go as one batch.
        model.hold.store(true, Ordering::SeqCst);
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.infer(row(0.5, 1)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut waiting = Vec::new();
        for index in 0..5 {
            let batcher = batcher.clone();
            waiting.push(tokio::spawn(async move {
                batcher.infer(row(index as f32, 1 + index % 2)).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        model.hold.store(false, Ordering::SeqCst);
        assert_eq!(first.await.unwrap().unwrap()[0].to_f32().unwrap(), vec![1.0, 1.0]);
        for (index, handle) in waiting.into_iter().enumerate() {
            let outputs = handle.await.unwrap().unwrap();
            let rows = 1 + index % 2;
            assert_eq!(outputs[0].shape, vec![rows, 2]);
            assert_eq!(outputs[0].to_f32().unwrap(), vec![index as f32 * 2.0; rows * 2]);
        }
        // 1, then 1+2+1+2 = 6 rows, then the last 1 would make 7 ≤ 8: all five waiting ones in one batch.
        assert_eq!(*model.batches.lock().unwrap(), vec![1, 7]);
        let text = metrics.encode();
        assert!(
            text.contains("kiln_serving_batch_size_count{model=\"d\",version=\"1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("kiln_serving_queue_depth{model=\"d\",version=\"1\"} 0"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_with_a_retryable_error_and_a_failing_batch_fails_only_its_requests() {
        let model = doubler();
        let config = BatchConfig {
            max_batch_size: 2,
            queue_capacity: 2,
            instances: 1,
            ..BatchConfig::default()
        };
        let batcher = Arc::new(Batcher::start(
            "d",
            model.clone(),
            config,
            Metrics::default().model("d", "1"),
        ));
        model.hold.store(true, Ordering::SeqCst);
        let mut running = Vec::new();
        // One runs (held), two fill the queue, the fourth is refused.
        for value in [1.0, -1.0, 2.0] {
            let batcher = batcher.clone();
            running.push(tokio::spawn(async move { batcher.infer(row(value, 1)).await }));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let refused = batcher.infer(row(3.0, 1)).await.unwrap_err();
        assert!(refused.retryable(), "{refused}");
        assert_eq!(
            refused.to_string(),
            "model 'd' has 2 requests waiting, its queue's limit; retry shortly"
        );
        model.hold.store(false, Ordering::SeqCst);
        let outcomes: Vec<_> = futures::future::join_all(running).await;
        assert!(outcomes[0].as_ref().unwrap().is_ok());
        // -1 and 2 ran as one batch, which the model refused: both fail, neither is retryable.
        for outcome in &outcomes[1..] {
            let error = outcome.as_ref().unwrap().as_ref().unwrap_err();
            assert_eq!(error.to_string(), "model 'd' failed: negative one is not allowed");
            assert!(!error.retryable());
        }
        // And the model serves again afterwards.
        assert!(batcher.infer(row(4.0, 1)).await.is_ok());
    }
}
