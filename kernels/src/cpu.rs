//! The CPU kernels: the reference every other variant is tested against, and what runs without a GPU.
//!
//! Each loop is a zip over two slices with no bounds checks left inside (the lengths are checked once up
//! front), which LLVM turns into SIMD. Buffers of at least [`PARALLEL_ELEMENTS_MIN`] elements are split
//! into [`CHUNK_ELEMENTS`]-sized pieces across rayon's pool; below that, a thread hand-off costs more than
//! the loop.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::{AdamStep, KernelError, SgdStep, check_lengths};

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

fn check_buffers<T>(destination: usize, buffers: &[&[T]]) -> Result<(), KernelError> {
    buffers
        .iter()
        .try_for_each(|buffer| check_lengths(destination, buffer.len()))
}

/// The elementwise sum of `buffers` into `destination` (zeros when there are none).
pub fn sum_into(destination: &mut [f32], buffers: &[&[f32]]) -> Result<(), KernelError> {
    check_buffers(destination.len(), buffers)?;
    match buffers.split_first() {
        None => destination.iter_mut().for_each(|value| *value = 0.0),
        Some((first, rest)) => {
            destination.copy_from_slice(first);
            for buffer in rest {
                add_assign(destination, buffer)?;
            }
        }
    }
    Ok(())
}

/// The mean of `buffers` into `destination` (sum, then scale): the reduction all-reduce computes.
pub fn mean_into(destination: &mut [f32], buffers: &[&[f32]]) -> Result<(), KernelError> {
    sum_into(destination, buffers)?;
    if !buffers.is_empty() {
        scale(destination, 1.0 / buffers.len() as f32);
    }
    Ok(())
}

/// Elements summed per pass of the bf16 reductions: the f32 accumulator lives on the stack (8 KiB).
const BF16_BLOCK: usize = 2048;

fn reduce_bf16_serial(destination: &mut [bf16], buffers: &[&[bf16]], offset: usize, factor: f32) {
    let mut accumulator = [0.0f32; BF16_BLOCK];
    for (block_index, block) in destination.chunks_mut(BF16_BLOCK).enumerate() {
        let start = offset + block_index * BF16_BLOCK;
        let accumulator = &mut accumulator[..block.len()];
        accumulator.iter_mut().for_each(|value| *value = 0.0);
        for buffer in buffers {
            add_assign_bf16_serial(accumulator, &buffer[start..start + block.len()]);
        }
        if factor != 1.0 {
            accumulator.iter_mut().for_each(|sum| *sum *= factor);
        }
        block.convert_from_f32_slice(accumulator);
    }
}

fn reduce_bf16(destination: &mut [bf16], buffers: &[&[bf16]], factor: f32) -> Result<(), KernelError> {
    check_buffers(destination.len(), buffers)?;
    if destination.len() < PARALLEL_ELEMENTS_MIN {
        reduce_bf16_serial(destination, buffers, 0, factor);
    } else {
        destination
            .par_chunks_mut(CHUNK_ELEMENTS)
            .enumerate()
            .for_each(|(index, chunk)| reduce_bf16_serial(chunk, buffers, index * CHUNK_ELEMENTS, factor));
    }
    Ok(())
}

/// The elementwise sum of bf16 `buffers` into `destination`, accumulated in f32 and rounded to bf16 once,
/// so the error does not grow with the number of buffers the way a bf16 running sum's does.
pub fn sum_bf16_into(destination: &mut [bf16], buffers: &[&[bf16]]) -> Result<(), KernelError> {
    reduce_bf16(destination, buffers, 1.0)
}

/// The elementwise mean of bf16 `buffers` into `destination`, accumulated in f32 and rounded once.
pub fn mean_bf16_into(destination: &mut [bf16], buffers: &[&[bf16]]) -> Result<(), KernelError> {
    let factor = if buffers.is_empty() {
        1.0
    } else {
        1.0 / buffers.len() as f32
    };
    reduce_bf16(destination, buffers, factor)
}

fn adam_serial(
    parameters: &mut [f32],
    gradients: &[f32],
    first: &mut [f32],
    second: &mut [f32],
    step: &AdamStep,
    (step_size, second_correction): (f32, f32),
) {
    let (beta1, beta2) = (step.beta1, step.beta2);
    let iterator = parameters
        .iter_mut()
        .zip(gradients)
        .zip(first.iter_mut())
        .zip(second.iter_mut());
    for (((parameter, gradient), m), v) in iterator {
        let gradient = *gradient + step.weight_decay * *parameter;
        *m = beta1 * *m + (1.0 - beta1) * gradient;
        *v = beta2 * *v + (1.0 - beta2) * gradient * gradient;
        let denominator = v.sqrt() * second_correction + step.epsilon;
        *parameter -= step_size * *m / denominator;
    }
}

/// One fused Adam step over flat buffers: reads each parameter, gradient and both moments once and writes
/// the parameter and moments once, instead of the dozen tensor passes an unfused optimizer makes.
pub fn adam_step(
    parameters: &mut [f32],
    gradients: &[f32],
    first_moment: &mut [f32],
    second_moment: &mut [f32],
    step: &AdamStep,
) -> Result<(), KernelError> {
    check_lengths(parameters.len(), gradients.len())?;
    check_lengths(parameters.len(), first_moment.len())?;
    check_lengths(parameters.len(), second_moment.len())?;
    let corrections = step.corrections();
    if parameters.len() < PARALLEL_ELEMENTS_MIN {
        adam_serial(parameters, gradients, first_moment, second_moment, step, corrections);
    } else {
        parameters
            .par_chunks_mut(CHUNK_ELEMENTS)
            .zip(gradients.par_chunks(CHUNK_ELEMENTS))
            .zip(first_moment.par_chunks_mut(CHUNK_ELEMENTS))
            .zip(second_moment.par_chunks_mut(CHUNK_ELEMENTS))
            .for_each(|(((parameters, gradients), first), second)| {
                adam_serial(parameters, gradients, first, second, step, corrections)
            });
    }
    Ok(())
}

fn sgd_serial(parameters: &mut [f32], gradients: &[f32], velocity: &mut [f32], step: &SgdStep) {
    let iterator = parameters.iter_mut().zip(gradients).zip(velocity.iter_mut());
    for ((parameter, gradient), velocity) in iterator {
        let gradient = *gradient + step.weight_decay * *parameter;
        *velocity = step.momentum * *velocity + gradient;
        *parameter -= step.learning_rate * *velocity;
    }
}

/// One fused SGD step with momentum over flat buffers (`velocity` starts at zeros).
pub fn sgd_step(
    parameters: &mut [f32],
    gradients: &[f32],
    velocity: &mut [f32],
    step: &SgdStep,
) -> Result<(), KernelError> {
    check_lengths(parameters.len(), gradients.len())?;
    check_lengths(parameters.len(), velocity.len())?;
    if parameters.len() < PARALLEL_ELEMENTS_MIN {
        sgd_serial(parameters, gradients, velocity, step);
    } else {
        parameters
            .par_chunks_mut(CHUNK_ELEMENTS)
            .zip(gradients.par_chunks(CHUNK_ELEMENTS))
            .zip(velocity.par_chunks_mut(CHUNK_ELEMENTS))
            .for_each(|((parameters, gradients), velocity)| sgd_serial(parameters, gradients, velocity, step));
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

    /// Adam written the textbook way, one named quantity at a time, in f64.
    fn adam_reference(parameter: f64, gradient: f64, m: f64, v: f64, step: &AdamStep) -> (f64, f64, f64) {
        let (beta1, beta2) = (f64::from(step.beta1), f64::from(step.beta2));
        let gradient = gradient + f64::from(step.weight_decay) * parameter;
        let m = beta1 * m + (1.0 - beta1) * gradient;
        let v = beta2 * v + (1.0 - beta2) * gradient * gradient;
        let m_hat = m / (1.0 - beta1.powi(step.step as i32));
        let v_hat = v / (1.0 - beta2.powi(step.step as i32));
        let parameter = parameter - f64::from(step.learning_rate) * m_hat / (v_hat.sqrt() + f64::from(step.epsilon));
        (parameter, m, v)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn adam_step_matches_the_textbook_formula(length in lengths(), seed in any::<u64>(), steps in 1u64..4) {
            let mut parameters = values(length, seed);
            let mut expected: Vec<(f64, f64, f64)> = parameters.iter().map(|p| (f64::from(*p), 0.0, 0.0)).collect();
            let (mut m, mut v) = (vec![0.0f32; length], vec![0.0f32; length]);
            for step in 1..=steps {
                let gradients = values(length, seed.wrapping_add(step));
                let config = AdamStep { weight_decay: 0.01, ..AdamStep::new(1e-3, step) };
                adam_step(&mut parameters, &gradients, &mut m, &mut v, &config).unwrap();
                for (state, gradient) in expected.iter_mut().zip(&gradients) {
                    *state = adam_reference(state.0, f64::from(*gradient), state.1, state.2, &config);
                }
            }
            for (index, (parameter, (want, want_m, want_v))) in parameters.iter().zip(&expected).enumerate() {
                let close = |got: f32, want: f64| (f64::from(got) - want).abs() <= 1e-5 * want.abs().max(1.0);
                prop_assert!(close(*parameter, *want), "parameter {index}: {parameter} against {want}");
                prop_assert!(close(m[index], *want_m), "first moment {index}: {} against {want_m}", m[index]);
                prop_assert!(close(v[index], *want_v), "second moment {index}: {} against {want_v}", v[index]);
            }
        }

        #[test]
        fn bf16_sums_round_once_from_an_f32_accumulator(length in lengths(), seed in any::<u64>(), count in 1usize..5) {
            let buffers: Vec<Vec<bf16>> = (0..count)
                .map(|offset| values(length, seed.wrapping_add(offset as u64)).into_iter().map(bf16::from_f32).collect())
                .collect();
            let views: Vec<&[bf16]> = buffers.iter().map(Vec::as_slice).collect();
            let (mut sum, mut mean) = (vec![bf16::ZERO; length], vec![bf16::ZERO; length]);
            sum_bf16_into(&mut sum, &views).unwrap();
            mean_bf16_into(&mut mean, &views).unwrap();
            for index in 0..length {
                let exact: f32 = buffers.iter().map(|buffer| buffer[index].to_f32()).sum();
                prop_assert_eq!(sum[index], bf16::from_f32(exact));
                prop_assert_eq!(mean[index], bf16::from_f32(exact * (1.0 / count as f32)));
            }
        }
    }

    #[test]
    fn sgd_with_momentum_follows_pytorch() {
        let step = SgdStep {
            learning_rate: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
        };
        let (mut parameters, mut velocity) = (vec![1.0f32, -2.0], vec![0.0f32; 2]);
        sgd_step(&mut parameters, &[0.5, 1.0], &mut velocity, &step).unwrap();
        assert_eq!(velocity, [0.5, 1.0]);
        assert_eq!(parameters, [0.95, -2.1]);
        sgd_step(&mut parameters, &[0.5, 1.0], &mut velocity, &step).unwrap();
        assert_eq!(velocity, [0.95, 1.9]);
        assert!((parameters[0] - 0.855).abs() < 1e-6 && (parameters[1] + 2.29).abs() < 1e-6);
    }

    #[test]
    fn reductions_refuse_mismatched_buffers_and_change_nothing() {
        let mut destination = vec![7.0f32; 3];
        let error = sum_into(&mut destination, &[&[1.0; 3], &[1.0; 2]]).unwrap_err();
        assert_eq!(
            error,
            KernelError::LengthMismatch {
                destination: 3,
                source: 2
            }
        );
        assert_eq!(destination, [7.0; 3]);
        let mut wire = vec![bf16::ONE; 3];
        assert!(mean_bf16_into(&mut wire, &[&[bf16::ZERO; 4]]).is_err());
        assert_eq!(wire, [bf16::ONE; 3]);
        let mut parameters = vec![1.0f32; 3];
        let error = adam_step(
            &mut parameters,
            &[0.0; 3],
            &mut [0.0; 3],
            &mut [0.0; 2],
            &AdamStep::new(0.1, 1),
        );
        assert!(error.is_err());
        assert_eq!(parameters, [1.0; 3]);
    }

    #[test]
    fn mean_of_buffers() {
        let mut destination = vec![0.0f32; 5];
        mean_into(&mut destination, &[&[1.0; 5], &[3.0; 5]]).unwrap();
        assert_eq!(destination, [2.0; 5]);
        sum_into(&mut destination, &[]).unwrap();
        assert_eq!(destination, [0.0; 5]);
        sum_into(&mut destination, &[&[1.0; 5], &[3.0; 5], &[0.5; 5]]).unwrap();
        assert_eq!(destination, [4.5; 5]);
        mean_into(&mut destination, &[&[1.0; 5], &[3.0; 5]]).unwrap();
        scale(&mut destination, 0.5);
        assert_eq!(destination, [1.0; 5]);
    }
}
