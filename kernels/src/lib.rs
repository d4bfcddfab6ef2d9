//! Kiln's hot loops, the ones the collectives and the trainer spend their time in.
//!
//! ```text
//!   ring all-reduce step:  receive chunk ──► add_assign(acc, chunk)      (f32 on the wire)
//!                          receive chunk ──► add_assign_bf16(acc, chunk) (bf16 on the wire, f32 accumulator)
//!   before sending:        to_bf16(acc → wire)          after the last step: scale(acc, 1/world) for a mean
//! ```
//!
//! Every kernel has a CPU reference in [`cpu`] that always builds: plain loops over slices that the compiler
//! vectorizes, split across threads with rayon once a buffer is large enough to pay for it. With the `cuda`
//! feature, [`cuda`] has the same kernels compiled at run time with NVRTC; each is tested against the CPU
//! reference where a GPU is present.
//!
//! Conversions round to nearest, ties to even (the `half` crate on the CPU, the same bit arithmetic on the
//! GPU), so a CPU rank and a GPU rank produce identical bf16 bits for identical input.
//!
//! No tokio here, and no allocation inside a kernel: callers own every buffer.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use half::bf16;

/// Why a kernel could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// The buffers have different lengths; the caller passed the wrong slices.
    LengthMismatch { destination: usize, source: usize },
    /// No CUDA driver, NVRTC or device on this machine: use the CPU kernels.
    Unavailable(String),
    /// CUDA reported an error (compilation, launch, copy).
    Cuda(String),
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::LengthMismatch { destination, source } => write!(
                f,
                "buffer lengths differ: destination has {destination} elements, source {source}; expected equal lengths"
            ),
            KernelError::Unavailable(reason) => write!(f, "CUDA is not available: {reason}"),
            KernelError::Cuda(message) => write!(f, "CUDA error: {message}"),
        }
    }
}

impl std::error::Error for KernelError {}

pub(crate) fn check_lengths(destination: usize, source: usize) -> Result<(), KernelError> {
    if destination == source {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch { destination, source })
    }
}
