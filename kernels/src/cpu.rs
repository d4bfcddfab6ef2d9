//! The CPU kernels: the reference every other variant is tested against, and what runs without a GPU.
//!
//! Each loop is a zip over two slices with no bounds checks left inside (the lengths are checked once up
//! front), which LLVM turns into SIMD. Buffers of at least [`PARALLEL_ELEMENTS_MIN`] elements are split
//! into [`CHUNK_ELEMENTS`]-sized pieces across rayon's pool; below that, a thread hand-off costs more than
//! the loop.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::{KernelError, check_lengths};

/// Smallest buffer split across threads (1 MiB of f32).
pub const PARALLEL_ELEMENTS_MIN: usize = 1 << 18;
/// Elements per piece when a buffer is split (256 KiB of f32: fits in L2 with its source).
pub const CHUNK_ELEMENTS: usize = 1 << 16;

fn add_assign_serial(destination: &mut [f32], source: &[f32]) {
    for (accumulator, value) in destination.iter_mut().zip(source) {
        *accumulator += *value;
    }
}

/// `destination[i] += source[i]`: one step of a sum reduction.
pub fn add_assign(destination: &mut [f32], source: &[f32]) -> Result<(), KernelError> {
    check_lengths(destination.len(), source.len())?;
    if destination.len() < PARALLEL_ELEMENTS_MIN {
        add_assign_serial(destination, source);
    } else {
        destination
            .par_chunks_mut(CHUNK_ELEMENTS)
            .zip(source.par_chunks(CHUNK_ELEMENTS))
            .for_each(|(destination, source)| add_assign_serial(destination, source));
    }
    Ok(())
}

fn add_assign_bf16_serial(destination: &mut [f32], source: &[bf16]) {
    for (accumulator, value) in destination.iter_mut().zip(source) {
        *accumulator += value.to_f32();
    }
}

/// `destination[i] += f32(source[i])`: a bf16 chunk off the wire into an f32 accumulator.
pub fn add_assign_bf16(destination: &mut [f32], source: &[bf16]) -> Result<(), KernelError> {
    check_lengths(destination.len(), source.len())?;
    if destination.len() < PARALLEL_ELEMENTS_MIN {
        add_assign_bf16_serial(destination, source);
    } else {
        destination
            .par_chunks_mut(CHUNK_ELEMENTS)
            .zip(source.par_chunks(CHUNK_ELEMENTS))
            .for_each(|(destination, source)| add_assign_bf16_serial(destination, source));
    }
    Ok(())
}

/// `destination[i] *= factor`: turns a sum into a mean (`factor = 1 / world size`).
pub fn scale(destination: &mut [f32], factor: f32) {
    if destination.len() < PARALLEL_ELEMENTS_MIN {
        destination.iter_mut().for_each(|value| *value *= factor);
    } else {
        destination
            .par_chunks_mut(CHUNK_ELEMENTS)
            .for_each(|chunk| chunk.iter_mut().for_each(|value| *value *= factor));
    }
}

/// f32 → bf16, rounding to nearest, ties to even.
pub fn to_bf16(source: &[f32], destination: &mut [bf16]) -> Result<(), KernelError> {
    check_lengths(destination.len(), source.len())?;
    if source.len() < PARALLEL_ELEMENTS_MIN {
        destination.convert_from_f32_slice(source);
    } else {
        destination
            .par_chunks_mut(CHUNK_ELEMENTS)
            .zip(source.par_chunks(CHUNK_ELEMENTS))
            .for_each(|(destination, source)| destination.convert_from_f32_slice(source));
    }
    Ok(())
}

/// bf16 → f32 (exact).
pub fn to_f32(source: &[bf16], destination: &mut [f32]) -> Result<(), KernelError> {
    check_lengths(destination.len(), source.len())?;
    if source.len() < PARALLEL_ELEMENTS_MIN {
        source.convert_to_f32_slice(destination);
    } else {
        destination
            .par_chunks_mut(CHUNK_ELEMENTS)
            .zip(source.par_chunks(CHUNK_ELEMENTS))
            .for_each(|(destination, source)| source.convert_to_f32_slice(destination));
    }
    Ok(())
}

/// The mean of `buffers` into `destination` (sum, then scale): the reduction all-reduce computes.
pub fn mean_into(destination: &mut [f32], buffers: &[&[f32]]) -> Result<(), KernelError> {
    destination.iter_mut().for_each(|value| *value = 0.0);
    for buffer in buffers {
        add_assign(destination, buffer)?;
    }
    if !buffers.is_empty() {
        scale(destination, 1.0 / buffers.len() as f32);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Buffer lengths that cross the serial/parallel boundary and chunk edges.
    fn lengths() -> impl Strategy<Value = usize> {
        prop_oneof![
            0..64usize,
            (PARALLEL_ELEMENTS_MIN - 3)..(PARALLEL_ELEMENTS_MIN + 3),
            Just(PARALLEL_ELEMENTS_MIN + CHUNK_ELEMENTS + 7),
        ]
    }

    fn values(length: usize, seed: u64) -> Vec<f32> {
        // A cheap deterministic spread of magnitudes and signs.
        (0..length)
            .map(|index| {
                let mixed = (index as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                (mixed as f32 / (1u64 << 24) as f32 - 0.5) * 1000.0
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn add_assign_is_the_elementwise_sum(length in lengths(), seed in any::<u64>()) {
            let (mut destination, source) = (values(length, seed), values(length, seed.rotate_left(7)));
            let expected: Vec<f32> = destination.iter().zip(&source).map(|(a, b)| a + b).collect();
            add_assign(&mut destination, &source).unwrap();
            prop_assert_eq!(destination, expected);
        }

        #[test]
        fn bf16_round_trips_within_its_precision(length in lengths(), seed in any::<u64>()) {
            let source = values(length, seed);
            let mut wire = vec![bf16::ZERO; length];
            to_bf16(&source, &mut wire).unwrap();
            let mut back = vec![0.0f32; length];
            to_f32(&wire, &mut back).unwrap();
            for (original, restored) in source.iter().zip(&back) {
                // 8 significant bits: the unit roundoff of round-to-nearest is 2^-8.
                prop_assert!((original - restored).abs() <= original.abs() * (1.0 / 256.0), "{original} -> {restored}");
                prop_assert_eq!(bf16::from_f32(*original).to_f32(), *restored);
            }
            let mut accumulator = vec![1.0f32; length];
            add_assign_bf16(&mut accumulator, &wire).unwrap();
            for (value, restored) in accumulator.iter().zip(&back) {
                prop_assert_eq!(*value, 1.0 + restored);
            }
        }
    }

    #[test]
    fn ties_round_to_even_and_nan_stays_nan() {
        // 1 + 2^-8 lies exactly between two bf16 values; the even one is 1.0.
        assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 4.0 / 256.0);
        let mut wire = [bf16::ZERO; 1];
        to_bf16(&[f32::NAN], &mut wire).unwrap();
        assert!(wire[0].is_nan());
    }

    #[test]
    fn mismatched_lengths_are_refused_and_change_nothing() {
        let mut destination = vec![1.0f32; 3];
        let error = add_assign(&mut destination, &[1.0; 4]).unwrap_err();
        assert_eq!(
            error,
            KernelError::LengthMismatch {
                destination: 3,
                source: 4
            }
        );
        assert!(error.to_string().contains("expected equal lengths"));
        assert_eq!(destination, [1.0; 3]);
    }

    #[test]
    fn mean_of_buffers() {
        let mut destination = vec![0.0f32; 5];
        mean_into(&mut destination, &[&[1.0; 5], &[3.0; 5]]).unwrap();
        assert_eq!(destination, [2.0; 5]);
        scale(&mut destination, 0.5);
        assert_eq!(destination, [1.0; 5]);
    }
}
