//! Stand-in for `cuda.rs` when ziplm is built without the `cuda` feature: the same API,
//! and a CUDA device that never opens, with the rebuild that would open it.

use super::gpu::{GpuInfo, Placement};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::Runnable;

/// Whether this build can run models on a CUDA GPU.
pub const BUILT: bool = false;

/// A CUDA device (never constructed in this build).
#[derive(Clone, Debug)]
pub struct CudaDevice {
    info: GpuInfo,
}

impl CudaDevice {
    /// Always says how to get a build that can open one.
    pub fn open(_index: usize) -> Result<CudaDevice, String> {
        Err("this ziplm was built without the `cuda` feature; on the GPU machine, build it with `cargo build --release --features cuda` (no CUDA toolkit needed to build; the driver, NVRTC, cuBLAS and cuDNN are loaded when it runs)".into())
    }

    /// What the device is, for the fingerprint.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Not reachable in this build.
    pub fn prepare(&self, _model: TypedModel) -> TractResult<Box<dyn Runnable>> {
        tract_onnx::tract_core::internal::bail!("built without the `cuda` feature")
    }

    /// Not reachable in this build.
    pub fn synchronize(&self) -> TractResult<()> {
        Ok(())
    }
}

/// Where the nodes of a prepared model run: all on the CPU in this build.
pub fn placement(model: &TypedModel) -> Placement {
    let mut p = Placement::default();
    for node in &model.nodes {
        let op = node.op.name();
        if op != "Source" && op != "Const" {
            p.add_cpu(&op);
        }
    }
    p
}
