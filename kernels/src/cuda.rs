//! The same kernels on a GPU, compiled at run time with NVRTC (cudarc loads the driver and NVRTC
//! dynamically, so this builds on machines without CUDA; [`CudaKernels::new`] says when it cannot run).
//!
//! bf16 values travel as their `u16` bit patterns; the conversion uses the same round-to-nearest-even
//! bit arithmetic as the `half` crate, so the CPU and GPU produce identical bits.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use crate::{KernelError, check_lengths};

const SOURCE: &str = r#"
extern "C" __global__ void add_assign_f32(float* destination, const float* source, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) destination[i] += source[i];
}

extern "C" __global__ void scale_f32(float* destination, float factor, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) destination[i] *= factor;
}

__device__ unsigned short bf16_bits(float value) {
    unsigned int bits = __float_as_uint(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((bits >> 16) | 0x0040u);
    unsigned int rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (unsigned short)((bits + rounding) >> 16);
}

extern "C" __global__ void f32_to_bf16(const float* source, unsigned short* destination, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) destination[i] = bf16_bits(source[i]);
}

extern "C" __global__ void bf16_to_f32(const unsigned short* source, float* destination, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) destination[i] = __uint_as_float(((unsigned int)source[i]) << 16);
}

extern "C" __global__ void add_assign_bf16(float* destination, const unsigned short* source, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) destination[i] += __uint_as_float(((unsigned int)source[i]) << 16);
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
}

fn cuda_error(error: impl std::fmt::Debug) -> KernelError {
    KernelError::Cuda(format!("{error:?}"))
}

fn launch_config(length: usize) -> Result<LaunchConfig, KernelError> {
    let length = u32::try_from(length)
        .map_err(|_| KernelError::Cuda(format!("{length} elements is more than one launch handles (2^32 - 1)")))?;
    Ok(LaunchConfig::for_num_elems(length.max(1)))
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
        // elements (checked equal above) and the count; the kernel guards every index with `i < n`.
        unsafe { launch.launch(launch_config(length)?) }.map_err(cuda_error)?;
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
        unsafe { launch.launch(launch_config(length)?) }.map_err(cuda_error)?;
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
        unsafe { launch.launch(launch_config(length)?) }.map_err(cuda_error)?;
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
        unsafe { launch.launch(launch_config(length)?) }.map_err(cuda_error)?;
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
        unsafe { launch.launch(launch_config(length)?) }.map_err(cuda_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;

    /// Runs where a GPU is present (the `device` machine); elsewhere it says so and passes.
    #[test]
    fn every_kernel_matches_the_cpu_reference() {
        let kernels = match CudaKernels::new(0) {
            Ok(kernels) => kernels,
            Err(KernelError::Unavailable(reason)) => {
                eprintln!("skipped: {reason}");
                return;
            }
            Err(error) => panic!("{error}"),
        };
        let stream = kernels.stream().clone();
        for length in [0usize, 1, 1023, 1024, 1025, 1 << 20] {
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
        }
    }
}
