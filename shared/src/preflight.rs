//! A quick check of a model directory, for the supervisor to run before it spawns workers.
//!
//! Owns: nothing new. It runs the same readers the workers will ([`ModelConfig::load`] and the
//! checkpoint's `open_shards`) and stops before anything is mapped: `config.json` parses and
//! every value is in range; the index or `model.safetensors` exists; every weight file is a
//! regular, readable file whose header parses, names each tensor once and matches the file's
//! size. It reads a few kilobytes per file, so a missing or unreadable shard is reported in well
//! under a second instead of by a worker minutes into loading.
//!
//! Not checked here: that the tensors the model needs are present with the right shapes (the
//! workers check that when they load their layers).

use std::path::{Path, PathBuf};

use crate::checkpoint::{open_shards, CheckpointError};
use crate::config::{ConfigError, ModelConfig};

/// What a successful preflight found.
#[derive(Debug, Clone)]
pub struct PreflightReport {
    pub config: ModelConfig,
    /// The weight files, in the order the checkpoint reads them.
    pub files: Vec<PathBuf>,
    /// Tensors named by all headers together.
    pub tensors: usize,
    /// Bytes of tensor data in all files together.
    pub payload_bytes: u64,
}

/// Why a model directory cannot be served; the message names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// Checks the model directory `dir` without mapping any weights (see the module doc).
pub fn preflight(dir: &Path) -> Result<PreflightReport, PreflightError> {
    // The directory first, so a wrong path is reported as such rather than as a missing config.
    if !dir.is_dir() {
        return Err(CheckpointError::NoDirectory {
            path: dir.to_path_buf(),
        }
        .into());
    }
    let config = ModelConfig::load(dir)?;
    let shards = open_shards(dir)?;
    Ok(PreflightReport {
        config,
        tensors: shards.tensors.len(),
        payload_bytes: shards.payload_bytes(),
        files: shards.files.into_iter().map(|s| s.path).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::testmodel::{write_dims, Dims, Preset};

    fn small_model() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let dims = Dims {
            vocab: 512,
            shard_bytes: 60_000,
            ..Preset::Tiny.dims()
        };
        write_dims(&dims, 5, dir.path()).expect("write model");
        dir
    }

    /// The second weight file of the model (there are several).
    fn a_shard(dir: &Path) -> PathBuf {
        let report = preflight(dir).expect("a good model passes");
        assert!(report.files.len() > 2, "the test model should be sharded");
        report.files[1].clone()
    }

    #[test]
    fn a_good_model_passes_and_agrees_with_the_checkpoint() {
        let dir = small_model();
        let report = preflight(dir.path()).expect("preflight");
        assert_eq!(report.config.num_hidden_layers, 4);
        let ckpt = Checkpoint::open(dir.path()).expect("open");
        assert_eq!(report.payload_bytes, ckpt.payload_bytes());
        // 19 tensors per layer, plus the embedding, the final norm and the LM head.
        assert_eq!(report.tensors, 4 * 19 + 3);
    }

    #[test]
    fn a_missing_shard_is_named() {
        let dir = small_model();
        let shard = a_shard(dir.path());
        std::fs::remove_file(&shard).expect("remove");
        let e = preflight(dir.path())
            .expect_err("missing shard")
            .to_string();
        assert!(e.contains(&shard.display().to_string()), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn an_unreadable_shard_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = small_model();
        let shard = a_shard(dir.path());
        std::fs::set_permissions(&shard, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        let result = preflight(dir.path());
        if nix::unistd::geteuid().is_root() {
            // Root reads a file whatever its mode: nothing to see.
            return;
        }
        let e = result.expect_err("unreadable shard").to_string();
        assert!(e.contains(&shard.display().to_string()), "{e}");
        assert!(e.contains("Permission denied"), "{e}");
    }

    #[test]
    fn a_bad_config_value_fails_preflight() {
        let dir = small_model();
        let path = dir.path().join("config.json");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(
            &path,
            text.replace("\"swiglu_limit\": 7.0", "\"swiglu_limit\": 1e308"),
        )
        .expect("write");
        let e = preflight(dir.path()).expect_err("bad config").to_string();
        assert!(e.contains("swiglu_limit") && e.contains("1e308"), "{e}");
    }

    #[test]
    fn a_truncated_shard_fails_preflight() {
        let dir = small_model();
        let shard = a_shard(dir.path());
        let bytes = std::fs::read(&shard).expect("read");
        std::fs::write(&shard, &bytes[..bytes.len() - 1]).expect("truncate");
        let e = preflight(dir.path()).expect_err("truncated").to_string();
        assert!(e.contains(&shard.display().to_string()), "{e}");
        assert!(e.contains("truncated"), "{e}");
    }
}
