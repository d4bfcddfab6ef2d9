//! Collective communication between the ranks of one attempt: all-reduce, broadcast, all-gather, barrier.
//!
//! ```text
//!   rank r: bind a listener ──► rendezvous (coordinator: every rank's address, the attempt = the epoch)
//!           connect to rank r+1, accept rank r-1 (each side checks the other's epoch and rank)
//!
//!   all-reduce, n ranks, buffer cut into n segments:
//!     reduce-scatter  n-1 steps: send segment (r-s) to r+1 ║ receive segment (r-s-1) from r-1, add it
//!     all-gather      n-1 steps: send segment (r+1-s)      ║ receive segment (r-s), keep it
//!   each step streams its segment in chunks: a sender thread writes chunk k+1 while this thread receives
//!   and reduces chunk k, so sending, receiving and reducing overlap. Segments up to 1 MiB (a trainer's
//!   gradients) skip the thread: the calling thread alternates writing and reading 32 KiB chunks.
//! ```
//!
//! Each rank sends and receives 2(n-1)/n of the buffer, the bandwidth-optimal amount, over one TCP
//! connection to each ring neighbour. With [`Compression::Bf16`] the wire carries bf16 (half the bytes):
//! the accumulation stays in f32, and the owner of each reduced segment rounds it through bf16 before the
//! all-gather, so every rank ends with identical values.
//!
//! Every read and write has the configured timeout: a dead or hung peer fails the collective with
//! [`CollectiveError::Timeout`] naming the peer, and the attempt restarts instead of hanging.
//!
//! The wire format is little-endian f32 or bf16, as on every platform Kiln builds for. Ranks with GPUs
//! use NCCL instead (`nccl`, the `cuda` feature), behind the same [`Communicator`]. Left out: trees and
//! hierarchical rings for large clusters.

#[cfg(feature = "cuda")]
pub mod nccl;
mod rendezvous;
mod ring;

use std::time::Duration;

#[cfg(feature = "cuda")]
pub use nccl::NcclCommunicator;
#[cfg(feature = "cuda")]
pub use rendezvous::{Joined, NcclInvite, join_preferring_nccl};
pub use rendezvous::{RankEnvironment, join, rendezvous};
pub use ring::RingCommunicator;

/// How values are combined by [`Communicator::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
}

/// What travels on the wire during an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// bf16 on the wire, f32 accumulation: half the bytes, about 3 significant digits.
    Bf16,
}

#[derive(Debug, Clone)]
pub struct CollectiveConfig {
    /// Longest wait for any one read or write (and for connecting the ring).
    pub timeout: Duration,
    /// Bytes per chunk when a segment is streamed: the unit of overlap between sending and reducing.
    pub chunk_bytes: usize,
    pub compression: Compression,
}

impl Default for CollectiveConfig {
    fn default() -> CollectiveConfig {
        CollectiveConfig {
            timeout: Duration::from_secs(60),
            chunk_bytes: 256 << 10,
            compression: Compression::None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer stopped answering (dead, hung, or cut off): the attempt should fail and restart.
    #[error("rank {peer} did not answer within {} s during {operation}", timeout.as_secs_f64())]
    Timeout {
        peer: u32,
        operation: &'static str,
        timeout: Duration,
    },
    /// The connection to a peer broke.
    #[error("the connection with rank {peer} failed during {operation}: {message}")]
    Connection {
        peer: u32,
        operation: &'static str,
        message: String,
    },
    /// The caller passed buffers or ranks that do not fit the group.
    #[error("{0}")]
    InvalidArgument(String),
    /// The ranks could not meet: the attempt is over, or some rank never arrived.
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

/// The operations a data-parallel trainer needs. Every rank of the group calls the same operations in
/// the same order with buffers of the same length.
pub trait Communicator {
    fn rank(&self) -> u32;
    fn world_size(&self) -> u32;
    /// Replaces `buffer` on every rank with the elementwise sum (or mean) over all ranks.
    fn all_reduce(&mut self, buffer: &mut [f32], op: ReduceOp) -> Result<()>;
    /// Replaces `buffer` on every rank with rank `root`'s.
    fn broadcast(&mut self, buffer: &mut [f32], root: u32) -> Result<()>;
    /// Every rank's `input`, in rank order, into `output` (`world_size` times as long).
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        self.all_reduce(&mut [0.0], ReduceOp::Sum)
    }
}

/// All-reduces many buffers (a model's gradients) in buckets of about `bucket_bytes`: small tensors are
/// packed together so each collective moves a worthwhile amount, large ones go alone.
pub fn all_reduce_bucketed(
    communicator: &mut dyn Communicator,
    buffers: &mut [&mut [f32]],
    op: ReduceOp,
    bucket_bytes: usize,
) -> Result<()> {
    let bucket_elements = (bucket_bytes / 4).max(1);
    let mut staging: Vec<f32> = Vec::with_capacity(bucket_elements);
    let mut start = 0;
    while start < buffers.len() {
        let mut end = start;
        let mut elements = 0;
        while end < buffers.len() && (end == start || elements + buffers[end].len() <= bucket_elements) {
            elements += buffers[end].len();
            end += 1;
        }
        if end - start == 1 {
            communicator.all_reduce(buffers[start], op)?;
        } else {
            staging.clear();
            for buffer in &buffers[start..end] {
                staging.extend_from_slice(buffer);
            }
            communicator.all_reduce(&mut staging, op)?;
            let mut offset = 0;
            for buffer in &mut buffers[start..end] {
                buffer.copy_from_slice(&staging[offset..offset + buffer.len()]);
                offset += buffer.len();
            }
        }
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
