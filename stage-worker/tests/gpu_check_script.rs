//! `bench/gpu/check.sh` on a machine without a GPU (CI's): it must skip every phase cleanly —
//! exit status 0, the summary table printed last with "no GPU: skipped", at most 8 files in the
//! results folder — so the same script can be handed to a GPU machine unchanged.

use std::path::Path;
use std::process::Command;

#[test]
fn the_gpu_check_script_skips_cleanly_without_a_gpu() {
    let has_nvidia_smi = Command::new("sh")
        .args(["-c", "command -v nvidia-smi"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_nvidia_smi {
        eprintln!("skipped: this machine has nvidia-smi; the script runs for real there");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/gpu/check.sh");
    let results = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .arg(results.path())
        .env("TMPDIR", results.path())
        .output()
        .expect("bash runs the script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("no GPU: skipped"),
        "last line {last:?}\n{stdout}"
    );
    assert!(
        stdout.contains("| 0 env | skipped | no GPU: nvidia-smi not found |"),
        "{stdout}"
    );
    let files: Vec<_> = std::fs::read_dir(results.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name())
        .collect();
    assert!(files.len() <= 8, "{files:?}");
    let summary = std::fs::read_to_string(results.path().join("summary.md")).unwrap();
    assert!(stdout.ends_with(&summary), "the summary is printed last");
}
