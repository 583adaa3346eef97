//! What a GPU target is, independent of whether this build can run one: the device's
//! description and fingerprint, and where a prepared model's nodes run. The CUDA
//! runtime itself is in `cuda.rs` (feature `cuda`) or its stand-in `cuda_off.rs`.

use std::collections::BTreeMap;
use std::fmt;
use ziplm_plugin_api::TargetFingerprint;

/// The runtime name in the fingerprint of a table profiled with tract's CUDA runtime.
pub const CUDA_RUNTIME: &str = "tract-cuda";

/// A CUDA device as the fingerprint describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device index (not part of the fingerprint: two GPUs of one model are one target).
    pub index: usize,
    /// The device's name (`NVIDIA H200`).
    pub name: String,
    /// Compute capability (9, 0 for Hopper).
    pub compute_capability: (i32, i32),
    /// The NVIDIA driver's release (`580.159.03`), `unknown` when it cannot be read.
    pub driver: String,
    /// The CUDA API version the driver provides (13000 = 13.0).
    pub cuda_driver_api: i32,
    /// The CUDA runtime library's version (13000 = 13.0; 0 when unknown).
    pub cuda_runtime_api: i32,
}

/// A CUDA version number (13000 = 13.0; 0 = unknown).
fn version(v: i32) -> String {
    if v <= 0 {
        return "unknown".into();
    }
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

impl GpuInfo {
    /// The fingerprint's device field: name, compute capability, driver, CUDA versions.
    pub fn describe(&self) -> String {
        format!(
            "{} [sm_{}{}] driver {} CUDA {} (runtime {})",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.driver,
            version(self.cuda_driver_api),
            version(self.cuda_runtime_api),
        )
    }

    /// The target fingerprint of tract's CUDA runtime on this device (f32 models).
    pub fn fingerprint(&self) -> TargetFingerprint {
        TargetFingerprint {
            runtime: CUDA_RUNTIME.into(),
            runtime_version: super::TRACT_VERSION.into(),
            device: self.describe(),
            threads: 0,
            dtype: "f32".into(),
        }
    }
}

/// The fingerprint of a CUDA target that cannot be opened on this machine: it matches
/// no table, so a committed table from the GPU machine is used as it is and nothing is
/// verified here.
pub fn unavailable_fingerprint(index: usize) -> TargetFingerprint {
    TargetFingerprint {
        runtime: CUDA_RUNTIME.into(),
        runtime_version: super::TRACT_VERSION.into(),
        device: format!("cuda:{index} (not available on this machine)"),
        threads: 0,
        dtype: "f32".into(),
    }
}

/// The NVIDIA driver's release, from the kernel module's version file or nvidia-smi;
/// `unknown` when neither answers.
pub fn driver_release() -> String {
    let from_proc = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|s| parse_proc_version(&s));
    from_proc
        .or_else(|| {
            let out = std::process::Command::new("nvidia-smi")
                .args(["--query-gpu=driver_version", "--format=csv,noheader"])
                .output()
                .ok()?;
            let v = String::from_utf8_lossy(&out.stdout);
            let v = v.lines().next()?.trim();
            (out.status.success() && !v.is_empty()).then(|| v.to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The release in `/proc/driver/nvidia/version`: the first dotted number of the NVRM
/// line (`NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.03  Thu ...`, or
/// `NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.03  Release ...`).
fn parse_proc_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version"))?;
    line.split_whitespace()
        .find(|w| {
            w.contains('.')
                && w.chars().all(|c| c.is_ascii_digit() || c == '.')
                && w.starts_with(|c: char| c.is_ascii_digit())
        })
        .map(str::to_string)
}

/// Where the nodes of a model prepared for a GPU run.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// Nodes computed on the GPU.
    pub gpu_nodes: usize,
    /// Nodes left on the CPU, counted by operator name.
    pub cpu_nodes: BTreeMap<String, usize>,
    /// Copies between host and device.
    pub copies: usize,
}

impl Placement {
    /// Counts a node left on the CPU.
    pub fn add_cpu(&mut self, op: &str) {
        *self.cpu_nodes.entry(op.to_string()).or_default() += 1;
    }

    /// Nodes left on the CPU.
    pub fn cpu_total(&self) -> usize {
        self.cpu_nodes.values().sum()
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} nodes on the GPU, {} on the CPU",
            self.gpu_nodes,
            self.cpu_total()
        )?;
        if !self.cpu_nodes.is_empty() {
            let ops: Vec<String> = self
                .cpu_nodes
                .iter()
                .map(|(op, n)| format!("{op} x{n}"))
                .collect();
            write!(f, " ({})", ops.join(", "))?;
        }
        write!(f, ", {} host/device copies", self.copies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h200() -> GpuInfo {
        GpuInfo {
            index: 0,
            name: "NVIDIA H200".into(),
            compute_capability: (9, 0),
            driver: "580.159.03".into(),
            cuda_driver_api: 13000,
            cuda_runtime_api: 12080,
        }
    }

    #[test]
    fn the_fingerprint_names_gpu_driver_cuda_and_tract() {
        let f = h200().fingerprint();
        assert_eq!(f.runtime, "tract-cuda");
        assert_eq!(f.runtime_version, super::super::TRACT_VERSION);
        assert_eq!(
            f.device,
            "NVIDIA H200 [sm_90] driver 580.159.03 CUDA 13.0 (runtime 12.8)"
        );
        assert_eq!(
            f.to_string(),
            "tract-cuda 0.23.9 on NVIDIA H200 [sm_90] driver 580.159.03 CUDA 13.0 (runtime 12.8) (f32)"
        );
    }

    #[test]
    fn unknown_cuda_versions_are_named_so() {
        let info = GpuInfo {
            cuda_runtime_api: 0,
            ..h200()
        };
        assert!(info.describe().ends_with("CUDA 13.0 (runtime unknown)"));
    }

    #[test]
    fn two_gpus_of_one_model_are_one_target_and_another_driver_is_not() {
        let other_index = GpuInfo { index: 3, ..h200() };
        assert_eq!(h200().fingerprint(), other_index.fingerprint());
        let other_driver = GpuInfo {
            driver: "570.86.15".into(),
            ..h200()
        };
        assert_ne!(h200().fingerprint(), other_driver.fingerprint());
        assert_ne!(h200().fingerprint(), unavailable_fingerprint(0));
    }

    #[test]
    fn the_driver_release_is_read_from_the_kernel_module_line() {
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.03  Thu Oct 16 2025\nGCC version:  gcc 12\n";
        assert_eq!(parse_proc_version(text).as_deref(), Some("580.159.03"));
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U16-I3-B03-4-3)  Thu Oct 16 2025\n";
        assert_eq!(parse_proc_version(open).as_deref(), Some("580.159.04"));
        assert_eq!(parse_proc_version("garbage"), None);
    }

    #[test]
    fn placement_lists_the_operators_left_on_the_cpu() {
        let mut p = Placement {
            gpu_nodes: 40,
            copies: 2,
            ..Default::default()
        };
        p.add_cpu("Gather");
        p.add_cpu("Gather");
        p.add_cpu("Range");
        assert_eq!(p.cpu_total(), 3);
        assert_eq!(
            p.to_string(),
            "40 nodes on the GPU, 3 on the CPU (Gather x2, Range x1), 2 host/device copies"
        );
    }
}
