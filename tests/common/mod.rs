//! Helpers for the end-to-end tests: the real binaries, a tiny model made from its seed, and
//! checks that nothing is left behind (no worker process, no zombie, no shared-memory object).

#![allow(dead_code)]

pub mod daemon;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `gptossd` binary under test.
pub fn gptossd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gptossd"))
}

/// The tiny preset (seed 0), generated once into cargo's scratch folder for integration tests
/// (`target/tmp`) and reused by later runs: written into a new folder, then renamed into place,
/// so a run that was killed halfway never leaves a partial model behind.
pub fn tiny_model() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir = scratch.join("tiny-seed0");
        if !dir.join("model.safetensors.index.json").is_file() {
            let staging = tempfile::Builder::new()
                .prefix("tiny-seed0-")
                .tempdir_in(scratch)
                .expect("tempdir");
            gptossd_shared::testmodel::write_test_model(
                gptossd_shared::testmodel::Preset::Tiny,
                0,
                staging.path(),
            )
            .expect("write tiny model");
            // Another test binary may have won the race: its model is the same.
            if std::fs::rename(staging.path(), &dir).is_ok() {
                let _ = staging.keep();
            }
        }
        dir
    })
    .clone()
}

/// A private view of the tiny model for one test: a new directory of symlinks to its files.
/// Workers name their model directory on their command line, so a test that counts or kills
/// "its" workers finds only its own, even while other tests run in parallel.
pub fn private_model() -> tempfile::TempDir {
    let base = tiny_model();
    let dir = tempfile::Builder::new()
        .prefix("gptossd-e2e-view")
        .tempdir()
        .expect("tempdir");
    for entry in std::fs::read_dir(&base).expect("model dir").flatten() {
        std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name()))
            .expect("symlink");
    }
    dir
}

/// A command for `gptossd` with the stage binary found beside it.
pub fn command() -> Command {
    let mut cmd = Command::new(gptossd());
    cmd.env_remove("GPTOSSD_CONFIG");
    cmd
}

/// Runs `gptossd` to completion with a time limit.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gptossd");
    wait_with_limit(child, limit)
}

pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "gptossd ran past {limit:?}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of live `gptossd-stage` processes whose command line names `model`, with their stage.
pub fn stage_workers(model: &Path) -> Vec<(u32, usize)> {
    let model = model.to_string_lossy().to_string();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if !args.first().is_some_and(|a| a.ends_with("gptossd-stage")) || !args.contains(&model) {
            continue;
        }
        let stage = args
            .iter()
            .position(|a| a == "--stage")
            .and_then(|i| args.get(i + 1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        found.push((pid, stage));
    }
    found
}

/// Waits until `count` stage workers of `model` run; returns them.
pub fn wait_for_workers(model: &Path, count: usize, limit: Duration) -> Vec<(u32, usize)> {
    let deadline = Instant::now() + limit;
    loop {
        let w = stage_workers(model);
        if w.len() >= count {
            return w;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} workers started",
            w.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that no worker of `model` survives (allowing a moment for the kernel to reap).
pub fn assert_nothing_left(model: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = stage_workers(model);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker processes left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Ok(entries) = std::fs::read_dir("/dev/shm") {
        let ours: Vec<_> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("gptossd"))
            .map(|e| e.file_name())
            .collect();
        assert!(
            ours.is_empty(),
            "shared-memory objects left behind: {ours:?}"
        );
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: a plain kill(2) on a pid this test found.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Writes JSON-lines requests into a temp file.
pub fn requests_file(lines: &[serde_json::Value]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("tempfile");
    for l in lines {
        use std::io::Write;
        writeln!(f, "{l}").expect("write");
    }
    f
}

pub fn stdout_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The tiny model with layer 3's sinks renamed in the index and in the shard's header: the
/// checkpoint is well-formed, but a stage cannot find a tensor it needs.
pub fn model_missing_a_tensor() -> tempfile::TempDir {
    let broken = tempfile::tempdir().expect("tempdir");
    let dims = gptossd_shared::testmodel::Preset::Tiny.dims();
    gptossd_shared::testmodel::write_dims(&dims, 0, broken.path()).expect("model");
    let index_path = broken.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).expect("index")).expect("json");
    let map = index["weight_map"].as_object_mut().expect("map");
    let file = map
        .remove("model.layers.3.self_attn.sinks")
        .expect("tensor");
    map.insert("model.layers.3.self_attn.sinkz".into(), file);
    std::fs::write(&index_path, index.to_string()).expect("write");
    let shard = broken.path().join(
        index["weight_map"]["model.layers.3.self_attn.sinkz"]
            .as_str()
            .expect("shard"),
    );
    let mut bytes = std::fs::read(&shard).expect("read");
    let at = bytes
        .windows(30)
        .position(|w| w == b"model.layers.3.self_attn.sinks")
        .expect("name in header");
    bytes[at + 29] = b'z';
    std::fs::write(&shard, bytes).expect("write");
    broken
}
