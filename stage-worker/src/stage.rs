//! The process edge: which backend a stage computes on, chosen once from its [`Device`] (the
//! worker's `--device`, in the grammar of `gptossd_shared::device`) when the worker starts, and
//! dispatched once per step.
//!
//! [`Stage`] is an enum of concrete stages, one variant per backend built in, each a
//! monomorphic `StageModel<B>`. A step pays one `match` here and then runs the backend's
//! operations with static calls; `model.rs` sees neither `dyn` nor `cfg`. Adding a backend is
//! adding its folder under `backend/` and a [`Stage`] variant (with its arm in `on_stage!` and
//! its device's arm in [`Stage::load`]).

use gptossd_shared::config::ModelConfig;
use gptossd_shared::device::Device;
use gptossd_shared::protocol::LoadReport;
use gptossd_shared::sampling::SampleAt;
use gptossd_shared::weights::StageWeights;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{BackendError, BackendInfo};
use crate::kv::KvConfig;
use crate::model::StageModel;
use crate::sampler::{LogitsError, Sampled};
use crate::step::{StageInput, StepBatch, StepError};

/// One pipeline stage on the backend of its device.
// One value per process, made once and never moved on a hot path: the variants' sizes do not
// matter, and boxing one would only add an indirection to every step.
#[allow(clippy::large_enum_variant)]
pub enum Stage {
    Cpu(StageModel<CpuBackend>),
    Cuda(StageModel<CudaBackend>),
}

/// `$body` with `$m` bound to the concrete `StageModel<B>` of `$stage`: the one place that
/// lists the variants, so a new backend adds one arm here (and one in [`Stage::load`]).
macro_rules! on_stage {
    ($stage:expr, $m:ident => $body:expr) => {
        match $stage {
            Stage::Cpu($m) => $body,
            Stage::Cuda($m) => $body,
        }
    };
}

impl Stage {
    /// Loads the stage on `device`; `threads` host threads compute (CPU; a GPU stage samples
    /// on the calling thread). The KV memory holds `kv.num_blocks` blocks, or fewer where the
    /// device cannot hold them (a GPU sizes it by its free memory after the weights;
    /// [`Stage::kv_config`] says how many). A CPU device's core set is not applied here: the
    /// process pins itself before loading. A `cuda:N` device that cannot be used (no driver, no
    /// NVRTC, no such GPU, too little memory, a kernel that does not load) is
    /// [`BackendError::Unavailable`] with the reason.
    pub fn load(
        device: &Device,
        threads: usize,
        cfg: ModelConfig,
        weights: &StageWeights,
        kv: KvConfig,
    ) -> Result<Self, BackendError> {
        match device {
            Device::Cpu { .. } => Ok(Stage::Cpu(StageModel::new(
                CpuBackend::new(threads),
                cfg,
                weights,
                kv,
            )?)),
            Device::Cuda { ordinal } => {
                let backend =
                    CudaBackend::open(*ordinal).map_err(|e| BackendError::Unavailable {
                        device: device.clone(),
                        reason: e.to_string(),
                    })?;
                Ok(Stage::Cuda(StageModel::new(backend, cfg, weights, kv)?))
            }
        }
    }

    pub fn config(&self) -> &ModelConfig {
        on_stage!(self, m => m.config())
    }

    pub fn kv_config(&self) -> KvConfig {
        on_stage!(self, m => m.kv_config())
    }

    pub fn is_first(&self) -> bool {
        on_stage!(self, m => m.is_first())
    }

    pub fn is_last(&self) -> bool {
        on_stage!(self, m => m.is_last())
    }

    pub fn weight_bytes(&self) -> usize {
        on_stage!(self, m => m.weight_bytes())
    }

    pub fn kv_bytes(&self) -> usize {
        on_stage!(self, m => m.kv_bytes())
    }

    pub fn info(&self) -> BackendInfo {
        on_stage!(self, m => m.info())
    }

    /// What the worker tells the supervisor once loaded: the backend, what it holds, and how
    /// many KV blocks (the supervisor's pool is the minimum over the stages).
    pub fn report(&self) -> LoadReport {
        let info = self.info();
        let kv_bytes = self.kv_bytes() as u64;
        LoadReport {
            backend: info.kind,
            kernels: info.kernels,
            detail: info.detail,
            threads: info.threads as u32,
            weight_bytes: self.weight_bytes() as u64,
            kv_bytes,
            memory_bytes: kv_bytes + info.memory_bytes as u64,
            kv_blocks: self.kv_config().num_blocks as u64,
        }
    }

    /// See [`StageModel::release_scratch`].
    pub fn release_scratch(&mut self) {
        on_stage!(self, m => m.release_scratch())
    }

    /// See [`StageModel::forward`].
    pub fn forward(
        &mut self,
        batch: &StepBatch,
        input: StageInput<'_>,
        out: &mut Vec<f32>,
    ) -> Result<(), StepError> {
        on_stage!(self, m => m.forward(batch, input, out))
    }

    /// See [`StageModel::forward_hidden`].
    pub fn forward_hidden(
        &mut self,
        batch: &StepBatch,
        input: StageInput<'_>,
        out: &mut [f32],
    ) -> Result<(), StepError> {
        on_stage!(self, m => m.forward_hidden(batch, input, out))
    }

    /// See [`StageModel::forward_sample`].
    pub fn forward_sample(
        &mut self,
        batch: &StepBatch,
        input: StageInput<'_>,
        rows: &[SampleAt],
    ) -> Result<Vec<Result<Sampled, LogitsError>>, StepError> {
        on_stage!(self, m => m.forward_sample(batch, input, rows))
    }
}
