//! The process edge: which backend a stage computes on, chosen once from `--device` when the
//! worker starts, and dispatched once per step.
//!
//! [`Device`] is the parsed device name; [`Stage`] is an enum of concrete stages, one variant
//! per backend built in, each a monomorphic `StageModel<B>`. A step pays one `match` here and
//! then runs the backend's operations with static calls; `model.rs` sees neither `dyn` nor
//! `cfg`. Adding a backend is adding its folder under `backend/`, a [`Device`] variant and a
//! [`Stage`] variant (with its arm in `on_stage!` and in [`Stage::load`]).

use std::fmt;
use std::str::FromStr;

use gptossd_shared::config::ModelConfig;
use gptossd_shared::sampling::SampleAt;
use gptossd_shared::weights::StageWeights;

use crate::backend::cpu::CpuBackend;
use crate::backend::{BackendError, BackendInfo};
use crate::kv::KvConfig;
use crate::model::StageModel;
use crate::sampler::{LogitsError, Sampled};
use crate::step::{StageInput, StepBatch, StepError};

/// A device a stage can compute on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend (`cpu`).
    Cpu,
}

/// A `--device` value this build cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?}: the CUDA backend is not built in yet (devices: cpu)")]
    NotBuiltIn(String),
    #[error("device {0:?} is not a device name (devices: cpu)")]
    Unknown(String),
}

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "cpu" => Ok(Device::Cpu),
            _ if s.starts_with("cuda") => Err(DeviceError::NotBuiltIn(s.to_string())),
            _ => Err(DeviceError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}

/// One pipeline stage on the backend of its device.
pub enum Stage {
    Cpu(StageModel<CpuBackend>),
}

/// `$body` with `$m` bound to the concrete `StageModel<B>` of `$stage`: the one place that
/// lists the variants, so a new backend adds one arm here (and one in [`Stage::load`]).
macro_rules! on_stage {
    ($stage:expr, $m:ident => $body:expr) => {
        match $stage {
            Stage::Cpu($m) => $body,
        }
    };
}

impl Stage {
    /// Loads the stage on `device`; `threads` host threads compute (CPU) or assist (a GPU).
    pub fn load(
        device: Device,
        threads: usize,
        cfg: ModelConfig,
        weights: &StageWeights,
        kv: KvConfig,
    ) -> Result<Self, BackendError> {
        match device {
            Device::Cpu => Ok(Stage::Cpu(StageModel::new(
                CpuBackend::new(threads),
                cfg,
                weights,
                kv,
            )?)),
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

#[cfg(test)]
mod tests {
    use super::{Device, DeviceError};

    #[test]
    fn device_names() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!(Device::Cpu.to_string(), "cpu");
        assert_eq!(
            "cuda:0".parse::<Device>(),
            Err(DeviceError::NotBuiltIn("cuda:0".into()))
        );
        assert_eq!(
            "gpu".parse::<Device>(),
            Err(DeviceError::Unknown("gpu".into()))
        );
    }
}
