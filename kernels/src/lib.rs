//! Kiln's hot loops, the ones the collectives and the trainer spend their time in.
//!
//! ```text
//!   ring all-reduce step:  receive chunk ──► add_assign(acc, chunk)      (f32 on the wire)
//!                          receive chunk ──► add_assign_bf16(acc, chunk) (bf16 on the wire, f32 accumulator)
//!   before sending:        to_bf16(acc → wire)          after the last step: scale(acc, 1/world) for a mean
//!   trainer, every step:   adam_step(params, gradients, m, v)    one pass over flat buffers, no temporaries
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

/// One step of Adam (Kingma & Ba, with bias correction; `weight_decay` is added to the gradient, L2 style,
/// as PyTorch's `Adam` does), for [`cpu::adam_step`] and the CUDA kernel of the same name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    /// The step being taken, counted from 1: it sets the bias corrections.
    pub step: u64,
}

impl AdamStep {
    /// The defaults PyTorch and the Adam paper use, at `learning_rate`, for step `step`.
    pub fn new(learning_rate: f32, step: u64) -> AdamStep {
        AdamStep {
            learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
            step,
        }
    }

    /// `(learning_rate / (1 - beta1^t), 1 / sqrt(1 - beta2^t))`: the bias corrections folded into two
    /// per-step scalars, computed in f64 so every kernel variant starts from the same f32 values.
    pub fn corrections(&self) -> (f32, f32) {
        let step = self.step.max(1).min(i32::MAX as u64) as i32;
        let first = 1.0 - f64::from(self.beta1).powi(step);
        let second = 1.0 - f64::from(self.beta2).powi(step);
        (
            (f64::from(self.learning_rate) / first) as f32,
            (1.0 / second.sqrt()) as f32,
        )
    }
}

/// One step of SGD with momentum (PyTorch's formulation: `velocity = momentum * velocity + gradient`,
/// `parameter -= learning_rate * velocity`; with momentum 0 the velocity is the gradient).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    pub learning_rate: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

pub(crate) fn check_lengths(destination: usize, source: usize) -> Result<(), KernelError> {
    if destination == source {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch { destination, source })
    }
}
