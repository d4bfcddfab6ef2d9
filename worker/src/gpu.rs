//! GPU detection. With the `cuda` feature the CUDA driver is loaded at run time and asked for its device
//! count; a machine without the driver (or a build without the feature) has no GPUs.

/// The number of CUDA devices this machine has, 0 when there is no driver.
pub fn detect_gpus() -> u32 {
    detect()
}

/// Whether the CUDA driver library can be loaded (touching CUDA without it panics).
#[cfg(feature = "cuda")]
pub fn cuda_driver_present() -> bool {
    #[allow(unsafe_code)] // the probe only tries to dlopen the driver library; it has no preconditions to uphold
    // SAFETY: `is_culib_present` attempts to load libcuda and reports whether it could; nothing else.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    present
}

#[cfg(feature = "cuda")]
fn detect() -> u32 {
    if !cuda_driver_present() {
        return 0;
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(count) => count.max(0) as u32,
        Err(error) => {
            tracing::warn!(%error, "the CUDA driver is present but counting devices failed; offering no GPUs");
            0
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn detect() -> u32 {
    0
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    /// On a machine with a GPU (the GPU check script sets `KILN_REQUIRE_GPU`) the driver must be found and
    /// report a device; elsewhere detection must answer 0 rather than fail.
    #[test]
    fn detection_finds_the_gpus_the_driver_reports() {
        let gpus = super::detect_gpus();
        if std::env::var_os("KILN_REQUIRE_GPU").is_some() {
            assert!(
                super::cuda_driver_present(),
                "KILN_REQUIRE_GPU is set, but libcuda cannot be loaded"
            );
            assert!(gpus > 0, "KILN_REQUIRE_GPU is set, but no GPU was detected");
        } else if !super::cuda_driver_present() {
            assert_eq!(gpus, 0);
        }
    }
}
