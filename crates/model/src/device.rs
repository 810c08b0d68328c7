//! Chooses the device models run on, loading libtorch's CUDA library on demand.
//!
//! Binaries link only `libtorch_cpu` (the linker drops libraries no symbol needs), so CUDA is
//! invisible to libtorch until `libtorch_cuda.so` is loaded into the global symbol namespace,
//! where it registers its kernels. That must happen before the first `tch::Cuda` call.

use std::sync::OnceLock;

use tch::Device;

/// Why a device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device string is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device {0:?}; expected cpu, cuda or cuda:N")]
    Unknown(String),
    /// `libtorch_cuda.so` could not be loaded.
    #[error(
        "CUDA was requested but libtorch_cuda.so could not be loaded ({0}); is this a CUDA build of torch on a machine with an NVIDIA driver?"
    )]
    CudaLibrary(String),
    /// The library loaded but libtorch sees no (or too few) GPUs.
    #[error("CUDA was requested as {requested} but libtorch sees {available} CUDA device(s)")]
    NoGpu {
        /// The device asked for.
        requested: String,
        /// How many devices libtorch reports.
        available: i64,
    },
}

static CUDA_LIBRARY: OnceLock<Result<(), String>> = OnceLock::new();

/// Loads `libtorch_cuda.so` once, globally, trying the rpath first and then the libtorch the
/// crate was built against.
fn load_cuda_library() -> Result<(), DeviceError> {
    CUDA_LIBRARY
        .get_or_init(|| {
            let mut candidates = vec!["libtorch_cuda.so".to_string()];
            if let Some(libtorch) = option_env!("LIBTORCH") {
                candidates.push(format!("{libtorch}/lib/libtorch_cuda.so"));
            }
            let mut failures = Vec::new();
            for candidate in &candidates {
                match open_global(candidate) {
                    Ok(library) => {
                        // Unloading would unregister the kernels libtorch now relies on.
                        std::mem::forget(library);
                        return Ok(());
                    }
                    Err(error) => failures.push(format!("{candidate}: {error}")),
                }
            }
            Err(failures.join("; "))
        })
        .clone()
        .map_err(DeviceError::CudaLibrary)
}

#[expect(
    unsafe_code,
    reason = "dlopen runs the library's initialisers; libtorch_cuda's only register CUDA kernels with the already-loaded libtorch_cpu"
)]
fn open_global(path: &str) -> Result<libloading::os::unix::Library, libloading::Error> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: see the reason above; the handle is kept for the life of the process.
    unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
}

/// Parses `cpu`, `cuda` or `cuda:N` and makes the device usable, loading CUDA if needed.
// TODO: the CUDA branch has only been exercised where no GPU exists (it fails with the
// clear error); loading on a real GPU machine is untested.
pub fn resolve(spec: &str) -> Result<Device, DeviceError> {
    let spec = spec.trim().to_ascii_lowercase();
    let index = match spec.as_str() {
        "cpu" | "" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|index| index.parse::<usize>().ok())
            .ok_or_else(|| DeviceError::Unknown(spec.clone()))?,
    };
    load_cuda_library()?;
    let available = tch::Cuda::device_count();
    if (index as i64) >= available {
        return Err(DeviceError::NoGpu {
            requested: spec,
            available,
        });
    }
    Ok(Device::Cuda(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_the_default_and_needs_no_cuda() {
        assert_eq!(resolve("cpu").ok(), Some(Device::Cpu));
        assert_eq!(resolve("").ok(), Some(Device::Cpu));
    }

    #[test]
    fn a_malformed_device_names_itself_in_the_error() {
        let error = resolve("tpu:0").expect_err("no such device kind");
        assert!(error.to_string().contains("tpu:0"), "{error}");
    }
}
