//! NCCL for ranks with GPUs (the `cuda` feature): the same [`Communicator`] over NVLink, PCIe or
//! InfiniBand, through cudarc's `nccl` module. cudarc loads libnccl at run time, so this builds anywhere;
//! [`is_available`] says whether it can run here.
//!
//! ```text
//!   rank 0: ncclGetUniqueId ──► rendezvous blob ──► every rank (with the ring addresses, same epoch)
//!   every rank: join the TCP ring (checks the epoch: a stale rank never reaches NCCL), then
//!               ncclCommInitRank(world, id, rank) on the first GPU the worker made visible
//!   each collective: host buffer ─► device staging ─► NCCL on the stream ─► poll until done or timeout
//! ```
//!
//! NCCL has no timeout of its own: a dead peer leaves the kernel spinning. Every operation records an event
//! after it and polls that event until the configured timeout, then fails with
//! [`CollectiveError::Timeout`]; dropping the communicator aborts the NCCL communicator
//! (`ncclCommAbort`), which frees the GPU for the restarted attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp as NcclOp};

use super::{CollectiveError, Communicator, ReduceOp, Result};

/// Bytes in an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Whether the CUDA driver and libnccl can be loaded here.
pub fn is_available() -> bool {
    #[allow(unsafe_code)] // the probes only try to dlopen the libraries; they have no preconditions
    // SAFETY: each probe attempts to load a shared library and reports whether it could; nothing else.
    let present = unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() };
    present
}

fn nccl_error(operation: &'static str) -> impl Fn(cudarc::nccl::result::NcclError) -> CollectiveError {
    move |error| CollectiveError::Connection {
        peer: u32::MAX,
        operation,
        message: format!("NCCL: {error:?}"),
    }
}

fn cuda_error(operation: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CollectiveError {
    move |error| CollectiveError::Connection {
        peer: u32::MAX,
        operation,
        message: format!("CUDA: {error:?}"),
    }
}

/// A fresh NCCL unique id (rank 0 makes it), as the bytes the rendezvous carries.
pub fn unique_id() -> Result<Vec<u8>> {
    if !is_available() {
        return Err(CollectiveError::InvalidArgument(
            "NCCL is not available: the CUDA driver or libnccl is not installed".into(),
        ));
    }
    let id = Id::new().map_err(nccl_error("creating the NCCL unique id"))?;
    Ok(id.internal().iter().map(|byte| *byte as u8).collect())
}

/// A group of GPU ranks joined by NCCL.
pub struct NcclCommunicator {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: u32,
    world_size: u32,
    timeout: Duration,
    /// Device copies of the host buffers, reused while large enough, so a step does not allocate.
    staging: Option<CudaSlice<f32>>,
    gathered: Option<CudaSlice<f32>>,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.stream.context().ordinal())
            .finish()
    }
}

impl NcclCommunicator {
    /// Joins the group on GPU `device` (an ordinal among the visible devices) with rank 0's unique id.
    /// Blocks until every rank has joined.
    pub fn new(device: usize, rank: u32, world_size: u32, unique_id: &[u8], timeout: Duration) -> Result<Self> {
        if !is_available() {
            return Err(CollectiveError::InvalidArgument(
                "NCCL is not available: the CUDA driver or libnccl is not installed".into(),
            ));
        }
        let bytes: [u8; UNIQUE_ID_BYTES] = unique_id.try_into().map_err(|_| {
            CollectiveError::Rendezvous(format!(
                "rank 0 published a {}-byte NCCL id; expected {UNIQUE_ID_BYTES} bytes",
                unique_id.len()
            ))
        })?;
        let context = CudaContext::new(device).map_err(cuda_error("opening the GPU"))?;
        let stream = context.new_stream().map_err(cuda_error("creating a CUDA stream"))?;
        let id = Id::uninit(bytes.map(|byte| byte as std::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank as usize, world_size as usize, id)
            .map_err(nccl_error("joining the NCCL communicator"))?;
        Ok(NcclCommunicator {
            comm,
            stream,
            rank,
            world_size,
            timeout,
            staging: None,
            gathered: None,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// All-reduces a buffer that already lives on this rank's GPU, in place.
    pub fn all_reduce_device(&mut self, buffer: &mut CudaSlice<f32>, op: ReduceOp) -> Result<()> {
        let op = match op {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Mean => NcclOp::Avg,
        };
        self.comm
            .all_reduce_in_place(buffer, &op)
            .map_err(nccl_error("all-reduce"))?;
        self.wait("all-reduce")
    }

    /// Waits for the work queued on the stream, polling so that a peer that never arrives becomes a
    /// timeout instead of a hang.
    fn wait(&self, operation: &'static str) -> Result<()> {
        let event = self.stream.record_event(None).map_err(cuda_error(operation))?;
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            if event.try_is_complete().map_err(cuda_error(operation))? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CollectiveError::Timeout {
                    peer: (self.rank + 1) % self.world_size,
                    operation,
                    timeout: self.timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// The staging buffer holding `values`, grown if needed.
    fn upload(&mut self, values: &[f32], operation: &'static str) -> Result<CudaSlice<f32>> {
        let mut staging = match self.staging.take() {
            Some(staging) if staging.len() >= values.len() => staging,
            _ => self
                .stream
                .alloc_zeros::<f32>(values.len().max(1))
                .map_err(cuda_error(operation))?,
        };
        if !values.is_empty() {
            let mut view = staging.slice_mut(..values.len());
            self.stream
                .memcpy_htod(values, &mut view)
                .map_err(cuda_error(operation))?;
        }
        Ok(staging)
    }

    fn download(&mut self, staging: CudaSlice<f32>, values: &mut [f32], operation: &'static str) -> Result<()> {
        // The collective is done (waited for), so neither the copy nor the sync can hang on a peer. The
        // copy is asynchronous in cudarc; the sync makes `values` whole before it is read.
        if !values.is_empty() {
            self.stream
                .memcpy_dtoh(&staging.slice(..values.len()), values)
                .map_err(cuda_error(operation))?;
            self.stream.synchronize().map_err(cuda_error(operation))?;
        }
        self.staging = Some(staging);
        Ok(())
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn all_reduce(&mut self, buffer: &mut [f32], op: ReduceOp) -> Result<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        let mut staging = self.upload(buffer, "all-reduce")?;
        {
            let mut view = staging.slice_mut(..buffer.len());
            let op = match op {
                ReduceOp::Sum => NcclOp::Sum,
                ReduceOp::Mean => NcclOp::Avg,
            };
            self.comm
                .all_reduce_in_place(&mut view, &op)
                .map_err(nccl_error("all-reduce"))?;
        }
        self.wait("all-reduce")?;
        self.download(staging, buffer, "all-reduce")
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: u32) -> Result<()> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is outside a group of {}",
                self.world_size
            )));
        }
        if buffer.is_empty() {
            return Ok(());
        }
        let mut staging = self.upload(buffer, "broadcast")?;
        {
            let mut view = staging.slice_mut(..buffer.len());
            self.comm
                .broadcast_in_place(&mut view, root as i32)
                .map_err(nccl_error("broadcast"))?;
        }
        self.wait("broadcast")?;
        self.download(staging, buffer, "broadcast")
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        if output.len() != input.len() * self.world_size as usize {
            return Err(CollectiveError::InvalidArgument(format!(
                "all-gather output has {} elements; expected {} × {} = {}",
                output.len(),
                input.len(),
                self.world_size,
                input.len() * self.world_size as usize
            )));
        }
        if input.is_empty() {
            return Ok(());
        }
        let staging = self.upload(input, "all-gather")?;
        let mut gathered = match self.gathered.take() {
            Some(gathered) if gathered.len() >= output.len() => gathered,
            _ => self
                .stream
                .alloc_zeros::<f32>(output.len())
                .map_err(cuda_error("all-gather"))?,
        };
        {
            let mut view = gathered.slice_mut(..output.len());
            self.comm
                .all_gather(&staging.slice(..input.len()), &mut view)
                .map_err(nccl_error("all-gather"))?;
        }
        self.wait("all-gather")?;
        self.stream
            .memcpy_dtoh(&gathered.slice(..output.len()), output)
            .map_err(cuda_error("all-gather"))?;
        self.stream.synchronize().map_err(cuda_error("all-gather"))?;
        self.staging = Some(staging);
        self.gathered = Some(gathered);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a test that needs `gpus` GPUs can run here; without them it says so and passes, unless
    /// `KILN_REQUIRE_GPU` is set (the GPU check script sets it) and even one GPU is missing.
    fn gpus_present(gpus: i32) -> bool {
        let required = std::env::var_os("KILN_REQUIRE_GPU").is_some();
        if !is_available() {
            assert!(
                !required,
                "KILN_REQUIRE_GPU is set, but the CUDA driver or libnccl cannot be loaded"
            );
            eprintln!("skipped: NCCL is not available here");
            return false;
        }
        let devices = CudaContext::device_count().unwrap_or(0);
        assert!(
            !required || devices > 0,
            "KILN_REQUIRE_GPU is set, but CUDA reports no device"
        );
        if devices < gpus {
            eprintln!("skipped: {devices} GPU(s); the test needs {gpus}");
            return false;
        }
        true
    }

    /// One rank on one GPU: the whole path (id, communicator, staging, event polling) with a group of one,
    /// where every collective is the identity.
    #[test]
    fn one_rank_collectives_return_their_input() {
        if !gpus_present(1) {
            return;
        }
        let id = unique_id().unwrap();
        assert_eq!(id.len(), UNIQUE_ID_BYTES);
        let mut communicator = NcclCommunicator::new(0, 0, 1, &id, Duration::from_secs(30)).unwrap();
        for length in [1usize, 1021, 1 << 20] {
            let values: Vec<f32> = (0..length).map(|index| (index as f32 * 0.37).sin()).collect();
            let mut reduced = values.clone();
            communicator.all_reduce(&mut reduced, ReduceOp::Sum).unwrap();
            assert_eq!(reduced, values, "sum of one rank, {length} elements");
            communicator.all_reduce(&mut reduced, ReduceOp::Mean).unwrap();
            assert_eq!(reduced, values, "mean of one rank, {length} elements");
            let mut broadcast = values.clone();
            communicator.broadcast(&mut broadcast, 0).unwrap();
            assert_eq!(broadcast, values, "broadcast, {length} elements");
            let mut gathered = vec![0.0; length];
            communicator.all_gather(&values, &mut gathered).unwrap();
            assert_eq!(gathered, values, "all-gather, {length} elements");
        }
        let mut device = communicator.stream().clone_htod(&[1.0f32, 2.0, 3.0]).unwrap();
        communicator.all_reduce_device(&mut device, ReduceOp::Sum).unwrap();
        assert_eq!(communicator.stream().clone_dtoh(&device).unwrap(), [1.0, 2.0, 3.0]);
        assert!(matches!(
            communicator.broadcast(&mut [1.0], 1),
            Err(CollectiveError::InvalidArgument(_))
        ));
        assert!(matches!(
            communicator.all_gather(&[1.0], &mut [0.0; 2]),
            Err(CollectiveError::InvalidArgument(_))
        ));
    }

    /// Two ranks as threads, one GPU each (an NCCL communicator takes one rank per device). Runs where two
    /// GPUs exist; elsewhere it says so and passes.
    #[test]
    fn two_ranks_all_reduce_broadcast_and_gather() {
        if !gpus_present(2) {
            return;
        }
        let id = unique_id().unwrap();
        let threads: Vec<_> = (0..2u32)
            .map(|rank| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let mut communicator =
                        NcclCommunicator::new(rank as usize, rank, 2, &id, Duration::from_secs(30)).unwrap();
                    let mut values: Vec<f32> = (0..1001).map(|index| (index as f32) * (rank as f32 + 1.0)).collect();
                    communicator.all_reduce(&mut values, ReduceOp::Sum).unwrap();
                    let expected: Vec<f32> = (0..1001).map(|index| index as f32 * 3.0).collect();
                    assert_eq!(values, expected);
                    let mut root = vec![rank as f32; 7];
                    communicator.broadcast(&mut root, 1).unwrap();
                    assert_eq!(root, [1.0; 7]);
                    let mut gathered = vec![0.0; 4];
                    communicator.all_gather(&[rank as f32; 2], &mut gathered).unwrap();
                    assert_eq!(gathered, [0.0, 0.0, 1.0, 1.0]);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }
}
