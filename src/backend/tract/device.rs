//! Where tract runs the models ziplm times: the CPU (tract's optimised plan on an
//! executor of N threads) or a CUDA GPU (tract-cuda's runtime, `cuda.rs`). Profiling,
//! verification and `ziplm speedup` all time through [`TractDevice`], so a GPU target
//! is profiled and verified on the GPU end to end.

use super::gpu::{self, Placement};
use super::inputs;
use super::model::{runnable_from_bytes, typed_from_bytes};
use crate::error::{Error, Result};
use crate::job::Device;
use std::time::{Duration, Instant};
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::State;
use ziplm_plugin_api::{AdapterError, TargetFingerprint, Workload};

#[cfg(feature = "cuda")]
use super::cuda::{self, CudaDevice};
#[cfg(not(feature = "cuda"))]
use super::cuda_off::{self as cuda, CudaDevice};

/// Whether this ziplm was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cuda::BUILT;

/// A tract deployment target.
#[derive(Clone, Debug)]
pub enum TractDevice {
    /// The CPU, on `threads` threads.
    Cpu {
        /// Threads (1 = tract's single-threaded kernels).
        threads: usize,
        /// The executor of that many threads.
        executor: Executor,
    },
    /// A CUDA GPU.
    Cuda(CudaDevice),
    /// A CUDA GPU this machine cannot run (no GPU, no driver, a library missing, or a
    /// build without the feature): a latency table profiled on the GPU machine is used as
    /// it is, and nothing is timed here.
    CudaUnavailable {
        /// The device index asked for.
        index: usize,
        /// What is missing.
        reason: String,
    },
}

impl TractDevice {
    /// The CPU with `threads` threads (at least one).
    pub fn cpu(threads: usize) -> TractDevice {
        let threads = threads.max(1);
        let executor = if threads == 1 {
            Executor::SingleThread
        } else {
            Executor::multithread(threads)
        };
        TractDevice::Cpu { threads, executor }
    }

    /// The target of a job's device. A CUDA device that cannot be opened is not an error
    /// here ([`TractDevice::require`] is, where something must run on it).
    pub fn of(device: Device) -> Result<TractDevice> {
        match device {
            Device::Cpu { threads } if threads >= 1 => Ok(TractDevice::cpu(threads)),
            Device::Cpu { .. } => Err(Error::Invalid("threads must be at least 1".into())),
            Device::Cuda { device } => Ok(match CudaDevice::open(device) {
                Ok(d) => TractDevice::Cuda(d),
                Err(reason) => TractDevice::CudaUnavailable {
                    index: device,
                    reason,
                },
            }),
        }
    }

    /// The fingerprint latency tables measured here carry.
    pub fn fingerprint(&self) -> TargetFingerprint {
        match self {
            TractDevice::Cpu { threads, .. } => TargetFingerprint {
                runtime: "tract".into(),
                runtime_version: super::TRACT_VERSION.into(),
                device: crate::target::cpu_description(),
                threads: *threads,
                dtype: "f32".into(),
            },
            TractDevice::Cuda(d) => d.info().fingerprint(),
            TractDevice::CudaUnavailable { index, .. } => gpu::unavailable_fingerprint(*index),
        }
    }

    /// CPU threads (0 for a GPU).
    pub fn threads(&self) -> usize {
        match self {
            TractDevice::Cpu { threads, .. } => *threads,
            _ => 0,
        }
    }

    /// Whether models can run on this target here.
    pub fn is_usable(&self) -> bool {
        !matches!(self, TractDevice::CudaUnavailable { .. })
    }

    /// Whether this is a GPU target.
    pub fn is_gpu(&self) -> bool {
        !matches!(self, TractDevice::Cpu { .. })
    }

    /// Errors, naming what is missing and the way round it, when models cannot run on
    /// this target here.
    pub fn require(&self, doing: &str) -> Result<(), AdapterError> {
        match self {
            TractDevice::CudaUnavailable { index, reason } => {
                Err(unavailable(doing, *index, reason))
            }
            _ => Ok(()),
        }
    }

    /// Prepares ONNX bytes at a workload to run repeatedly on fixed inputs (token ids
    /// that depend only on the position).
    pub fn prepare(
        &self,
        bytes: &[u8],
        workload: &Workload,
        vocab: usize,
    ) -> Result<Prepared, AdapterError> {
        self.require("timing a model")?;
        let err = |e| AdapterError::runtime("preparing a model to time", e);
        let n = workload.batch * workload.seq_len;
        let ids: Vec<i64> = (0..n)
            .map(|i| ((i * 7919 + 13) % vocab.max(2)) as i64)
            .collect();
        let mask = vec![1i64; n];
        match self {
            TractDevice::Cuda(d) => {
                let (typed, specs) = typed_from_bytes(bytes, workload).map_err(err)?;
                let runnable = d.prepare(typed).map_err(err)?;
                let placement = runnable.typed_model().map(|m| cuda::placement(m));
                Ok(Prepared {
                    state: runnable.spawn().map_err(err)?,
                    inputs: inputs::build_inputs(&specs, workload, &ids, &mask).map_err(err)?,
                    placement,
                })
            }
            _ => {
                let (plan, specs) = runnable_from_bytes(bytes, workload).map_err(err)?;
                Ok(Prepared {
                    state: Box::new(plan.spawn().map_err(err)?),
                    inputs: inputs::build_inputs(&specs, workload, &ids, &mask).map_err(err)?,
                    placement: None,
                })
            }
        }
    }

    /// Runs a prepared model once and returns its wall time: on a GPU, until the
    /// device has finished the work.
    pub fn time(&self, p: &mut Prepared) -> Result<Duration, AdapterError> {
        let err = |e| AdapterError::runtime("timing", e);
        let inputs = p.inputs.clone();
        let state = &mut p.state;
        match self {
            TractDevice::Cpu { executor, .. } => {
                let start = Instant::now();
                multithread_tract_scope(executor.clone(), || state.run(inputs)).map_err(err)?;
                Ok(start.elapsed())
            }
            TractDevice::Cuda(d) => {
                let start = Instant::now();
                let outputs = state.run(inputs).map_err(err)?;
                d.synchronize().map_err(err)?;
                // tract-gpu hands outputs back as lazy host tensors: reading them is the
                // copy to the host, which serving pays too.
                for o in &outputs {
                    o.try_as_plain_ram().map_err(err)?;
                }
                Ok(start.elapsed())
            }
            TractDevice::CudaUnavailable { index, reason } => {
                Err(unavailable("timing a model", *index, reason))
            }
        }
    }
}

fn unavailable(doing: &str, index: usize, reason: &str) -> AdapterError {
    AdapterError::InvalidRequest(format!(
        "{doing} needs CUDA device {index}, which this machine cannot use: {reason}. Run on the GPU machine, or profile there (`ziplm profile MODEL --cuda {index} -o table.json`) and build here with that table (--latency-table, `latency_table` in the config)"
    ))
}

/// A model ready to run repeatedly on fixed inputs.
pub struct Prepared {
    state: Box<dyn State>,
    inputs: TVec<TValue>,
    /// Where its nodes run (GPU targets only).
    pub placement: Option<Placement>,
}
