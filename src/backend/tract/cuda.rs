//! A CUDA GPU as a tract target (feature `cuda`): tract-cuda's runtime, the device's
//! description for the latency table's fingerprint, and the end-of-run synchronisation
//! the clock waits for.
//!
//! tract-cuda loads the CUDA driver, the CUDA runtime, NVRTC, cuBLAS and cuDNN when it
//! is first used (cudarc's dynamic loading), so this module builds on any machine; on
//! one without a GPU, [`CudaDevice::open`] says which of them is missing. Built without
//! the feature, `cuda_off.rs` stands in with the same API and a rebuild hint.

use super::gpu::{GpuInfo, Placement};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{runtime_for_name, Runtime};

/// Whether this build can run models on a CUDA GPU.
pub const BUILT: bool = true;

/// A CUDA device opened through tract-cuda's runtime.
#[derive(Clone, Debug)]
pub struct CudaDevice {
    runtime: &'static dyn Runtime,
    info: GpuInfo,
    /// Holds the device's primary context for the job (so it is not torn down and set
    /// up again between preparations).
    _context: std::sync::Arc<cudarc::driver::CudaContext>,
}

impl CudaDevice {
    /// Opens CUDA device `index`, or says what is missing (no GPU, no driver, a driver
    /// too old for this build, no NVRTC / cuBLAS / cuDNN), with the fix.
    pub fn open(index: usize) -> Result<CudaDevice, String> {
        // tract-cuda's check loads and initialises the driver and probes every library
        // before anything touches cudarc (which would panic on a missing symbol).
        let runtime = match runtime_for_name("cuda") {
            Ok(Some(rt)) => rt,
            Ok(None) => return Err("tract's CUDA runtime is not linked into this ziplm".into()),
            // The root cause names what is missing (tract's outer contexts only say that
            // something is).
            Err(e) => return Err(e.root_cause().to_string().trim_end_matches('.').to_string()),
        };
        let count = cudarc::driver::result::init()
            .and_then(|_| cudarc::driver::result::device::get_count())
            .map_err(|e| format!("counting CUDA devices: {e}"))?;
        if count < 1 {
            return Err("the CUDA driver sees no GPU".into());
        }
        if index != 0 {
            // tract-cuda runs on the first visible device only.
            return Err(format!(
                "tract-cuda runs on the first visible GPU (this machine has {count}): select GPU {index} with CUDA_VISIBLE_DEVICES={index} and target CUDA device 0"
            ));
        }
        start_tract_cuda()?;
        let context = cudarc::driver::CudaContext::new(0)
            .map_err(|e| format!("opening CUDA device 0: {e}"))?;
        let name = context
            .name()
            .map_err(|e| format!("reading the name of CUDA device 0: {e}"))?;
        let (major, minor) = context
            .compute_capability()
            .map_err(|e| format!("reading the compute capability of CUDA device 0: {e}"))?;
        // 0 = unknown (the fingerprint says so).
        let api = cudarc::runtime::result::version::get_driver_version().unwrap_or(0);
        let runtime_api = cudarc::runtime::result::version::get_runtime_version().unwrap_or(0);
        Ok(CudaDevice {
            _context: context,
            runtime,
            info: GpuInfo {
                index,
                name,
                compute_capability: (major, minor),
                driver: super::gpu::driver_release(),
                cuda_driver_api: api,
                cuda_runtime_api: runtime_api,
            },
        })
    }

    /// What the device is, for the fingerprint.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Prepares a typed model on the GPU (tract-cuda translates what it can and leaves
    /// the other nodes on the CPU).
    pub fn prepare(
        &self,
        model: TypedModel,
    ) -> TractResult<Box<dyn tract_onnx::tract_core::runtime::Runnable>> {
        self.runtime.prepare(model)
    }

    /// Waits for the work this thread queued on the GPU.
    pub fn synchronize(&self) -> TractResult<()> {
        tract_cuda::with_cuda_stream(|stream| {
            stream.synchronize().map_err(|e| {
                tract_onnx::tract_core::internal::anyhow!("synchronising the CUDA stream: {e}")
            })
        })
    }
}

/// Creates tract-cuda's CUDA context (which compiles its kernels with NVRTC against the
/// toolkit's headers the first time) and this thread's stream (cuBLAS and cuDNN
/// handles) now, so that a machine that passes the library probe but cannot start them
/// is a clear error here rather than a panic inside tract-cuda at the first model.
fn start_tract_cuda() -> Result<(), String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = std::panic::catch_unwind(|| tract_cuda::with_cuda_stream(|_| Ok(())));
    std::panic::set_hook(hook);
    let detail = match started {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => format!("{e:#}"),
        Err(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "tract-cuda panicked".into()),
    };
    Err(format!(
        "tract-cuda could not start (CUDA context, NVRTC kernels, cuBLAS / cuDNN handles): {detail}; it needs the CUDA toolkit's headers (cuda_fp16.h, CCCL) at run time: set CUDA_HOME to the toolkit, and make its cache folder (XDG_CACHE_HOME or ~/.cache) writable"
    ))
}

/// Where the nodes of a model prepared by tract-cuda run: on the GPU when their outputs
/// live on the device (tract-gpu's device fact), else on the CPU; tract-gpu's
/// `DeviceSync` nodes are the copies between the two. Sources and constants are not
/// counted.
pub fn placement(model: &TypedModel) -> Placement {
    use tract_gpu::fact::DeviceTypedFactExt;
    let mut p = Placement::default();
    for node in &model.nodes {
        let op = node.op.name();
        if op == "Source" || op == "Const" {
            continue;
        }
        if op.starts_with("DeviceSync") {
            p.copies += 1;
        } else if node
            .outputs
            .first()
            .is_some_and(|o| o.fact.as_device_fact().is_some())
        {
            p.gpu_nodes += 1;
        } else {
            p.add_cpu(&op);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_gpu::fact::DeviceFact;
    use tract_gpu::sync::{DeviceSync, DeviceSyncKind};
    use tract_onnx::tract_core::ops::identity::Identity;

    /// A model as tract-cuda leaves it, built by hand (no GPU needed): a copy to the
    /// device, a node computing there, one left on the host, a copy back.
    #[test]
    fn placement_counts_device_nodes_host_nodes_and_copies() -> TractResult<()> {
        let host = f32::fact([2, 3]);
        let device = DeviceFact::from_host(host.clone())?.into_exotic_fact();
        let mut m = TypedModel::default();
        m.add_source("x", host.clone())?;
        m.add_node(
            "to_gpu",
            DeviceSync::new(DeviceSyncKind::ToDevice),
            tvec![device.clone()],
        )?;
        m.add_node("on_gpu", Identity, tvec![device])?;
        m.add_node("on_cpu", Identity, tvec![host.clone()])?;
        m.add_node(
            "to_host",
            DeviceSync::new(DeviceSyncKind::ToHost),
            tvec![host],
        )?;
        let p = placement(&m);
        assert_eq!(p.gpu_nodes, 1);
        assert_eq!(p.copies, 2);
        assert_eq!(p.cpu_nodes.get("Identity"), Some(&1));
        assert_eq!(p.cpu_total(), 1);
        Ok(())
    }
}
