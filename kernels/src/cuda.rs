//! The same kernels on a GPU, compiled at run time with NVRTC (cudarc loads the driver and NVRTC
//! dynamically, so this builds on machines without CUDA; [`CudaKernels::new`] says when it cannot run).
//!
//! bf16 values travel as their `u16` bit patterns; the conversion uses the same round-to-nearest-even
//! bit arithmetic as the `half` crate, so the CPU and GPU produce identical bits.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use crate::{AdamStep, KernelError, SgdStep, check_lengths};

const SOURCE: &str = r#"
// The elementwise kernels move four elements a thread with 16-byte (float4) or 8-byte (ushort4) loads and
// stores, then the first n % 4 threads do the tail one element each. Buffers are whole allocations (aligned
// to 256 bytes), so the vector accesses are aligned.

extern "C" __global__ void add_assign_f32(float* destination, const float* source, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int quads = n / 4;
    if (i < quads) {
        float4 d = reinterpret_cast<float4*>(destination)[i];
        float4 s = reinterpret_cast<const float4*>(source)[i];
        d.x += s.x; d.y += s.y; d.z += s.z; d.w += s.w;
        reinterpret_cast<float4*>(destination)[i] = d;
    }
    if (i < n % 4) destination[quads * 4 + i] += source[quads * 4 + i];
}

extern "C" __global__ void scale_f32(float* destination, float factor, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int quads = n / 4;
    if (i < quads) {
        float4 d = reinterpret_cast<float4*>(destination)[i];
        d.x *= factor; d.y *= factor; d.z *= factor; d.w *= factor;
        reinterpret_cast<float4*>(destination)[i] = d;
    }
    if (i < n % 4) destination[quads * 4 + i] *= factor;
}

__device__ unsigned short bf16_bits(float value) {
    unsigned int bits = __float_as_uint(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((bits >> 16) | 0x0040u);
    unsigned int rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (unsigned short)((bits + rounding) >> 16);
}

__device__ float bf16_value(unsigned short bits) {
    return __uint_as_float(((unsigned int)bits) << 16);
}

extern "C" __global__ void f32_to_bf16(const float* source, unsigned short* destination, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int quads = n / 4;
    if (i < quads) {
        float4 s = reinterpret_cast<const float4*>(source)[i];
        reinterpret_cast<ushort4*>(destination)[i] =
            make_ushort4(bf16_bits(s.x), bf16_bits(s.y), bf16_bits(s.z), bf16_bits(s.w));
    }
    if (i < n % 4) destination[quads * 4 + i] = bf16_bits(source[quads * 4 + i]);
}

extern "C" __global__ void bf16_to_f32(const unsigned short* source, float* destination, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int quads = n / 4;
    if (i < quads) {
        ushort4 s = reinterpret_cast<const ushort4*>(source)[i];
        reinterpret_cast<float4*>(destination)[i] =
            make_float4(bf16_value(s.x), bf16_value(s.y), bf16_value(s.z), bf16_value(s.w));
    }
    if (i < n % 4) destination[quads * 4 + i] = bf16_value(source[quads * 4 + i]);
}

extern "C" __global__ void add_assign_bf16(float* destination, const unsigned short* source, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int quads = n / 4;
    if (i < quads) {
        float4 d = reinterpret_cast<float4*>(destination)[i];
        ushort4 s = reinterpret_cast<const ushort4*>(source)[i];
        d.x += bf16_value(s.x); d.y += bf16_value(s.y); d.z += bf16_value(s.z); d.w += bf16_value(s.w);
        reinterpret_cast<float4*>(destination)[i] = d;
    }
    if (i < n % 4) destination[quads * 4 + i] += bf16_value(source[quads * 4 + i]);
}

extern "C" __global__ void adam_f32(float* parameters, const float* gradients, float* first, float* second,
                                    float beta1, float beta2, float epsilon, float weight_decay,
                                    float step_size, float second_correction, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gradient = gradients[i] + weight_decay * parameters[i];
    float m = beta1 * first[i] + (1.0f - beta1) * gradient;
    float v = beta2 * second[i] + (1.0f - beta2) * gradient * gradient;
    first[i] = m;
    second[i] = v;
    parameters[i] -= step_size * m / (sqrtf(v) * second_correction + epsilon);
}

extern "C" __global__ void sgd_f32(float* parameters, const float* gradients, float* velocity,
                                   float learning_rate, float momentum, float weight_decay, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = momentum * velocity[i] + gradients[i] + weight_decay * parameters[i];
    velocity[i] = v;
    parameters[i] -= learning_rate * v;
}
"#;

/// The kernels, compiled for one device, launched on its default stream.
#[derive(Debug)]
pub struct CudaKernels {
    stream: Arc<CudaStream>,
    add_assign_f32: CudaFunction,
    scale_f32: CudaFunction,
    f32_to_bf16: CudaFunction,
    bf16_to_f32: CudaFunction,
    add_assign_bf16: CudaFunction,
    adam_f32: CudaFunction,
    sgd_f32: CudaFunction,
}

fn cuda_error(error: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda(format!("{error:?}"))
}

fn launch_config(length: usize) -> Result<LaunchConfig, KernelError> {
    let length = u32::try_from(length)
        .map_err(|_| KernelError::Cuda(format!("{length} elements is more than one launch handles (2^32 - 1)")))?;
    Ok(LaunchConfig::for_num_elems(length.max(1)))
}

/// For the kernels that take four elements a thread: n / 4 threads, and at least the n % 4 of the tail.
fn launch_config_by_four(length: usize) -> Result<LaunchConfig, KernelError> {
    let threads = (length / 4).max(length % 4);
    launch_config(threads).and_then(|config| {
        u32::try_from(length)
            .map(|_| config)
            .map_err(|_| KernelError::Cuda(format!("{length} elements is more than one launch handles (2^32 - 1)")))
    })
}

/// Whether the CUDA driver and NVRTC can be loaded here.
pub fn is_available() -> bool {
    #[allow(unsafe_code)] // the probes only try to dlopen the libraries; they have no preconditions
    // SAFETY: each probe attempts to load a shared library and reports whether it could; nothing else.
    let present = unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() };
    present
}

impl CudaKernels {
    /// Compiles the kernels for device `ordinal`. Fails with [`KernelError::Unavailable`] on a machine
    /// without the driver, NVRTC or such a device.
    pub fn new(ordinal: usize) -> Result<CudaKernels, KernelError> {
        if !is_available() {
            return Err(KernelError::Unavailable(
                "the CUDA driver or NVRTC library is not installed".into(),
            ));
        }
        let devices = CudaContext::device_count().map_err(cuda_error)?;
        if ordinal >= devices.max(0) as usize {
            return Err(KernelError::Unavailable(format!(
                "device {ordinal} does not exist (this machine has {devices})"
            )));
        }
        let context = CudaContext::new(ordinal).map_err(cuda_error)?;
        let ptx = cudarc::nvrtc::compile_ptx(SOURCE).map_err(cuda_error)?;
        let module = context.load_module(ptx).map_err(cuda_error)?;
        let function = |name: &str| module.load_function(name).map_err(cuda_error);
        Ok(CudaKernels {
            stream: context.default_stream(),
            add_assign_f32: function("add_assign_f32")?,
            scale_f32: function("scale_f32")?,
            f32_to_bf16: function("f32_to_bf16")?,
            bf16_to_f32: function("bf16_to_f32")?,
            add_assign_bf16: function("add_assign_bf16")?,
            adam_f32: function("adam_f32")?,
            sgd_f32: function("sgd_f32")?,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `destination[i] += source[i]`.
    pub fn add_assign(&self, destination: &mut CudaSlice<f32>, source: &CudaSlice<f32>) -> Result<(), KernelError> {
        check_lengths(destination.len(), source.len())?;
        let length = destination.len();
        let count = length as u32;
        let mut launch = self.stream.launch_builder(&self.add_assign_f32);
        launch.arg(destination).arg(source).arg(&count);
        #[allow(unsafe_code)] // a kernel launch: its arguments must match the kernel's signature
        // SAFETY: add_assign_f32(float*, const float*, unsigned int): two device buffers of `count`
        // elements (checked equal above) and the count; the kernel reads and writes only below n (quads
        // below n / 4, the tail below n % 4), with vector accesses on the allocations' aligned starts.
        unsafe { launch.launch(launch_config_by_four(length)?) }.map_err(cuda_error)?;
        Ok(())
    }

    /// `destination[i] *= factor`.
    pub fn scale(&self, destination: &mut CudaSlice<f32>, factor: f32) -> Result<(), KernelError> {
        let length = destination.len();
        let count = length as u32;
        let mut launch = self.stream.launch_builder(&self.scale_f32);
        launch.arg(destination).arg(&factor).arg(&count);
        #[allow(unsafe_code)] // a kernel launch: its arguments must match the kernel's signature
        // SAFETY: scale_f32(float*, float, unsigned int): one device buffer of `count` elements, a float,
        // the count; every index is guarded.
        unsafe { launch.launch(launch_config_by_four(length)?) }.map_err(cuda_error)?;
        Ok(())
    }

    /// f32 → bf16 bits, round to nearest even.
    pub fn to_bf16(&self, source: &CudaSlice<f32>, destination: &mut CudaSlice<u16>) -> Result<(), KernelError> {
        check_lengths(destination.len(), source.len())?;
        let length = source.len();
        let count = length as u32;
        let mut launch = self.stream.launch_builder(&self.f32_to_bf16);
        launch.arg(source).arg(destination).arg(&count);
        #[allow(unsafe_code)] // a kernel launch: its arguments must match the kernel's signature
        // SAFETY: f32_to_bf16(const float*, unsigned short*, unsigned int) with equal-length buffers.
        unsafe { launch.launch(launch_config_by_four(length)?) }.map_err(cuda_error)?;
        Ok(())
    }

    /// bf16 bits → f32.
    pub fn to_f32(&self, source: &CudaSlice<u16>, destination: &mut CudaSlice<f32>) -> Result<(), KernelError> {
        check_lengths(destination.len(), source.len())?;
        let length = source.len();
        let count = length as u32;
        let mut launch = self.stream.launch_builder(&self.bf16_to_f32);
        launch.arg(source).arg(destination).arg(&count);
        #[allow(unsafe_code)] // a kernel launch: its arguments must match the kernel's signature
        // SAFETY: bf16_to_f32(const unsigned short*, float*, unsigned int) with equal-length buffers.
        unsafe { launch.launch(launch_config_by_four(length)?) }.map_err(cuda_error)?;
        Ok(())
    }

    /// `destination[i] += f32(source[i])` for bf16 bits in `source`.
    pub fn add_assign_bf16(
        &self,
        destination: &mut CudaSlice<f32>,
        source: &CudaSlice<u16>,
    ) -> Result<(), KernelError> {
        check_lengths(destination.len(), source.len())?;
        let length = destination.len();
        let count = length as u32;
        let mut launch = self.stream.launch_builder(&self.add_assign_bf16);
        launch.arg(destination).arg(source).arg(&count);
        #[allow(unsafe_code)] // a kernel launch: its arguments must match the kernel's signature
        // SAFETY: add_assign_bf16(float*, const unsigned short*, unsigned int) with equal-length buffers.
        unsafe { launch.launch(launch_config_by_four(length)?) }.map_err(cuda_error)?;
        Ok(())
    }

    /// One fused Adam step, as [`crate::cpu::adam_step`].
    pub fn adam_step(
        &self,
        parameters: &mut CudaSlice<f32>,
        gradients: &CudaSlice<f32>,
        first_moment: &mut CudaSlice<f32>,
        second_moment: &mut CudaSlice<f32>,
        step: &AdamStep,
    ) -> Result<(), KernelError> {
        let length = parameters.len();
        check_lengths(length, gradients.len())?;
        check_lengths(length, first_moment.len())?;
        check_lengths(length, second_moment.len())?;
        let count = length as u32;
        let (step_size, second_correction) = step.corrections();
        let mut launch = self.stream.launch_builder(&self.adam_f32);
        launch
            .arg(parameters)
            .arg(gradients)
            .arg(first_moment)
            .arg(second_moment);
        launch
            .arg(&step.beta1)
            .arg(&step.beta2)
            .arg(&step.epsilon)
            .arg(&step.weight_decay);
        launch.arg(&step_size).arg(&second_correction).arg(&count);
        #[allow(unsafe_code)] // a kernel launch: its arguments must match the kernel's signature
        // SAFETY: adam_f32(float*, const float*, float*, float*, 6 floats, unsigned int): four device buffers
        // of `count` elements (checked equal above), the scalars in order, the count; indices are guarded.
        unsafe { launch.launch(launch_config(length)?) }.map_err(cuda_error)?;
        Ok(())
    }

    /// One fused SGD step with momentum, as [`crate::cpu::sgd_step`].
    pub fn sgd_step(
        &self,
        parameters: &mut CudaSlice<f32>,
        gradients: &CudaSlice<f32>,
        velocity: &mut CudaSlice<f32>,
        step: &SgdStep,
    ) -> Result<(), KernelError> {
        let length = parameters.len();
        check_lengths(length, gradients.len())?;
        check_lengths(length, velocity.len())?;
        let count = length as u32;
        let mut launch = self.stream.launch_builder(&self.sgd_f32);
        launch.arg(parameters).arg(gradients).arg(velocity);
        launch
            .arg(&step.learning_rate)
            .arg(&step.momentum)
            .arg(&step.weight_decay)
            .arg(&count);
        #[allow(unsafe_code)] // a kernel launch: its arguments must match the kernel's signature
        // SAFETY: sgd_f32(float*, const float*, float*, float, float, float, unsigned int): three device
        // buffers of `count` elements (checked equal above), the scalars, the count; indices are guarded.
        unsafe { launch.launch(launch_config(length)?) }.map_err(cuda_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    /// Runs where a GPU is present (the `device` machine); elsewhere it says so and passes, unless
    /// `KILN_REQUIRE_GPU` is set (the GPU check script sets it, so a missing library fails there).
    #[test]
    fn every_kernel_matches_the_cpu_reference() {
        let kernels = match CudaKernels::new(0) {
            Ok(kernels) => kernels,
            Err(KernelError::Unavailable(reason)) => {
                assert!(
                    std::env::var_os("KILN_REQUIRE_GPU").is_none(),
                    "KILN_REQUIRE_GPU is set: {reason}"
                );
                eprintln!("skipped: {reason}");
                return;
            }
            Err(error) => panic!("{error}"),
        };
        let stream = kernels.stream().clone();
        // Every tail length (n % 4 of 0 to 3), below and above one block.
        for length in [0usize, 1, 2, 3, 5, 1022, 1023, 1024, 1025, 1 << 20] {
            let a: Vec<f32> = (0..length).map(|index| (index as f32 * 0.37).sin() * 100.0).collect();
            let b: Vec<f32> = (0..length).map(|index| (index as f32 * 0.11).cos() * 10.0).collect();
            let mut expected = a.clone();
            crate::cpu::add_assign(&mut expected, &b).unwrap();
            let mut device_a = stream.clone_htod(&a).unwrap();
            let device_b = stream.clone_htod(&b).unwrap();
            kernels.add_assign(&mut device_a, &device_b).unwrap();
            assert_eq!(
                stream.clone_dtoh(&device_a).unwrap(),
                expected,
                "add_assign, {length} elements"
            );

            kernels.scale(&mut device_a, 0.5).unwrap();
            crate::cpu::scale(&mut expected, 0.5);
            assert_eq!(
                stream.clone_dtoh(&device_a).unwrap(),
                expected,
                "scale, {length} elements"
            );

            if length == 0 {
                continue;
            }
            let mut wire = vec![bf16::ZERO; length];
            crate::cpu::to_bf16(&expected, &mut wire).unwrap();
            let bits: Vec<u16> = wire.iter().map(|value| value.to_bits()).collect();
            let mut device_wire = stream.alloc_zeros::<u16>(length).unwrap();
            kernels.to_bf16(&device_a, &mut device_wire).unwrap();
            assert_eq!(
                stream.clone_dtoh(&device_wire).unwrap(),
                bits,
                "to_bf16, {length} elements"
            );
            let mut back = stream.alloc_zeros::<f32>(length).unwrap();
            kernels.to_f32(&device_wire, &mut back).unwrap();
            let mut expected_back = vec![0.0f32; length];
            crate::cpu::to_f32(&wire, &mut expected_back).unwrap();
            assert_eq!(
                stream.clone_dtoh(&back).unwrap(),
                expected_back,
                "to_f32, {length} elements"
            );
            kernels.add_assign_bf16(&mut back, &device_wire).unwrap();
            crate::cpu::add_assign_bf16(&mut expected_back, &wire).unwrap();
            assert_eq!(
                stream.clone_dtoh(&back).unwrap(),
                expected_back,
                "add_assign_bf16, {length} elements"
            );

            // The optimizers: the GPU may fuse multiply-adds the CPU rounds separately, so compare closely
            // rather than bit for bit.
            let close = |got: &[f32], want: &[f32], what: &str| {
                for (index, (got, want)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{what} {index}: {got} against {want}"
                    );
                }
            };
            let (mut parameters, mut m, mut v) = (a.clone(), vec![0.0f32; length], vec![0.0f32; length]);
            let (mut device_parameters, mut device_m, mut device_v) = (
                stream.clone_htod(&a).unwrap(),
                stream.alloc_zeros::<f32>(length).unwrap(),
                stream.alloc_zeros::<f32>(length).unwrap(),
            );
            let device_gradients = stream.clone_htod(&b).unwrap();
            for step in 1..=3 {
                let config = AdamStep {
                    weight_decay: 0.01,
                    ..AdamStep::new(1e-3, step)
                };
                crate::cpu::adam_step(&mut parameters, &b, &mut m, &mut v, &config).unwrap();
                kernels
                    .adam_step(
                        &mut device_parameters,
                        &device_gradients,
                        &mut device_m,
                        &mut device_v,
                        &config,
                    )
                    .unwrap();
            }
            close(
                &stream.clone_dtoh(&device_parameters).unwrap(),
                &parameters,
                "adam parameter",
            );
            close(&stream.clone_dtoh(&device_m).unwrap(), &m, "adam first moment");
            close(&stream.clone_dtoh(&device_v).unwrap(), &v, "adam second moment");
            let sgd = SgdStep {
                learning_rate: 0.01,
                momentum: 0.9,
                weight_decay: 0.001,
            };
            let mut velocity = vec![0.0f32; length];
            let mut device_velocity = stream.alloc_zeros::<f32>(length).unwrap();
            for _ in 0..3 {
                crate::cpu::sgd_step(&mut parameters, &b, &mut velocity, &sgd).unwrap();
                kernels
                    .sgd_step(&mut device_parameters, &device_gradients, &mut device_velocity, &sgd)
                    .unwrap();
            }
            close(
                &stream.clone_dtoh(&device_parameters).unwrap(),
                &parameters,
                "sgd parameter",
            );
        }
    }
}
