//! The pipeline, end to end: the real `gptossd` supervisor, real `gptossd-stage` processes,
//! shared-memory rings, on the tiny model.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// `count` requests of different prompt lengths; greedy, or seeded sampling when `seeded`.
fn requests(count: usize, max_tokens: usize, seeded: bool) -> Vec<serde_json::Value> {
    (0..count)
        .map(|i| {
            let prompt: Vec<u32> = (0..(2 + 3 * i)).map(|j| (1000 + 7919 * i + 31 * j) as u32 % 199_000).collect();
            if seeded {
                json!({"prompt_tokens": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": 1000 + i})
            } else {
                json!({"prompt_tokens": prompt, "max_tokens": max_tokens, "temperature": 0.0})
            }
        })
        .collect()
}

fn generate_requests(
    model: &Path,
    file: &Path,
    stages: usize,
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = command();
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--requests")
        .arg(file)
        .args(["--stages", &stages.to_string(), "--threads", "1"])
        .args(extra);
    run(&mut cmd, Duration::from_secs(120))
}

fn tokens_of(lines: &[serde_json::Value]) -> Vec<Vec<u64>> {
    lines
        .iter()
        .map(|l| {
            l["tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .map(|t| t.as_u64().expect("id"))
                .collect()
        })
        .collect()
}

#[test]
fn four_stages_equal_one_stage_and_the_single_process_path() {
    let view = private_model();
    let model = view.path().to_path_buf();
    let mut reqs = requests(8, 12, false);
    reqs.extend(requests(8, 12, true));
    let file = requests_file(&reqs);
    let four = generate_requests(&model, file.path(), 4, &["--devices", "cpu,cpu,cpu,cpu"]);
    assert!(four.status.success(), "{}", stderr(&four));
    let one = generate_requests(&model, file.path(), 1, &[]);
    assert!(one.status.success(), "{}", stderr(&one));
    let (four, one) = (stdout_lines(&four), stdout_lines(&one));
    assert_eq!(four.len(), 16);
    assert_eq!(
        tokens_of(&four),
        tokens_of(&one),
        "4 stages differ from 1 stage"
    );
    for (req, got) in reqs.iter().zip(&four) {
        let ids: Vec<String> = req["prompt_tokens"]
            .as_array()
            .expect("prompt")
            .iter()
            .map(|v| v.to_string())
            .collect();
        let mut cmd = command();
        cmd.arg("generate")
            .arg("--model")
            .arg(&model)
            .args([
                "--prompt-tokens",
                &ids.join(","),
                "--max-tokens",
                "12",
                "--json",
                "--threads",
                "1",
            ])
            .args(["--temperature", &req["temperature"].to_string()]);
        if let Some(seed) = req.get("seed") {
            cmd.args(["--seed", &seed.to_string()]);
        }
        let local = run(&mut cmd, Duration::from_secs(60));
        assert!(local.status.success(), "{}", stderr(&local));
        let local = stdout_lines(&local);
        assert_eq!(
            local[0]["tokens"], got["tokens"],
            "the pipeline differs from the single-process path for {req}"
        );
    }
    assert_nothing_left(&model);
}

#[test]
fn every_cpu_instruction_set_gives_the_same_tokens() {
    // The workers inherit GPTOSSD_CPU_ISA, which caps the kernels' instruction set: the
    // portable fallback, AVX2 and both AVX-512 levels (each where the CPU has it) must agree token for
    // token, greedy and seeded, with two threads per stage.
    let view = private_model();
    let mut reqs = requests(2, 6, false);
    reqs.extend(requests(1, 6, true));
    let file = requests_file(&reqs);
    let mut outputs = Vec::new();
    for isa in ["portable", "avx2", "avx512", "avx512vbmi"] {
        let mut cmd = command();
        cmd.env("GPTOSSD_CPU_ISA", isa)
            .arg("generate")
            .arg("--model")
            .arg(view.path())
            .arg("--requests")
            .arg(file.path())
            .args(["--stages", "2", "--threads", "2"]);
        let out = run(&mut cmd, Duration::from_secs(300));
        assert!(out.status.success(), "{isa}: {}", stderr(&out));
        if isa == "portable" {
            // The variable reached the workers (they report their kernels when loaded).
            assert!(
                stderr(&out).contains("detail=Portable kernels, 2 threads"),
                "{}",
                stderr(&out)
            );
        }
        let lines = stdout_lines(&out);
        assert_eq!(lines.len(), reqs.len(), "{isa}");
        outputs.push((isa, tokens_of(&lines)));
    }
    for (isa, tokens) in &outputs[1..] {
        assert_eq!(
            tokens, &outputs[0].1,
            "{isa} differs from the portable path"
        );
    }
    assert_nothing_left(view.path());
}

/// The uninterrupted tokens of the crash tests' requests.
fn baseline(model: &Path, file: &Path) -> Vec<Vec<u64>> {
    let out = generate_requests(model, file, 4, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    tokens_of(&stdout_lines(&out))
}

/// Starts a 4-stage run of `file` and hands its workers to `act` once they run.
fn run_and_disturb(
    model: &Path,
    file: &Path,
    extra: &[&str],
    act: impl FnOnce(&[(u32, usize)]),
) -> (std::process::Output, Duration) {
    let mut cmd = command();
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--requests")
        .arg(file)
        .args(["--stages", "4", "--threads", "1"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let workers = wait_for_workers(model, 4, Duration::from_secs(30));
    // Let generation get going before disturbing it.
    std::thread::sleep(Duration::from_millis(800));
    act(&workers);
    let out = wait_with_limit(child, Duration::from_secs(120));
    (out, start.elapsed())
}

#[test]
fn kill_9_of_each_stage_mid_generation_loses_and_duplicates_nothing() {
    let view = private_model();
    let model = view.path();
    let file = requests_file(&requests(8, 250, false));
    let want = baseline(model, file.path());
    for victim in 0..4 {
        let (out, _) = run_and_disturb(model, file.path(), &[], |workers| {
            let (pid, _) = workers
                .iter()
                .find(|(_, s)| *s == victim)
                .expect("victim stage");
            signal(*pid, libc::SIGKILL);
        });
        assert!(out.status.success(), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("stage {victim} restarted 1 times")),
            "no restart of stage {victim} reported:\n{err}"
        );
        assert_eq!(
            tokens_of(&stdout_lines(&out)),
            want,
            "kill -9 of stage {victim} changed the tokens"
        );
        assert_nothing_left(model);
    }
}

/// A stopped stage is detected by its missing heartbeats within the heartbeat timeout (2 s by
/// default), killed and restarted; the run then finishes with the uninterrupted tokens.
#[test]
fn a_stopped_stage_is_detected_and_recovered() {
    let view = private_model();
    let model = view.path();
    let file = requests_file(&requests(8, 250, false));
    let want = baseline(model, file.path());
    let (out, elapsed) = run_and_disturb(model, file.path(), &[], |workers| {
        let (pid, _) = workers.iter().find(|(_, s)| *s == 2).expect("stage 2");
        signal(*pid, libc::SIGSTOP);
    });
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("stage 2 sent no heartbeat"), "{err}");
    assert!(err.contains("stage 2 restarted 1 times"), "{err}");
    assert_eq!(tokens_of(&stdout_lines(&out)), want);
    // Detection bound: 2 s of heartbeat timeout plus restart; the whole run stays well bounded.
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    assert_nothing_left(model);
}

#[test]
fn a_stage_that_crashes_at_every_start_ends_unhealthy_with_its_reason() {
    let file = requests_file(&requests(2, 20, false));
    let view = private_model();
    let model = view.path();
    let mut cmd = command();
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--requests")
        .arg(file.path())
        .args(["--stages", "4", "--threads", "1"])
        .env("GPTOSSD_FAULT_STAGE2", "crash-after-load");
    let start = Instant::now();
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("stage 2 crashed 6 times"), "{err}");
    assert!(
        err.contains("crash-after-load"),
        "the worker's own stderr should be shown:\n{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "crash loop took {:?}",
        start.elapsed()
    );
    assert_nothing_left(model);
}

#[test]
fn a_step_that_a_middle_stage_cannot_compute_fails_with_that_stage_and_its_reason() {
    // Stage 1 of 3 fails every step (as a device error would): the failure travels in the
    // step header through stage 2 to the supervisor, which fails the request naming stage 1
    // and its words; nothing restarts (a step failure is not a crash).
    let file = requests_file(&requests(1, 4, false));
    let view = private_model();
    let model = view.path();
    let mut cmd = command();
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--requests")
        .arg(file.path())
        .args(["--stages", "3", "--threads", "1"])
        .env("GPTOSSD_FAULT_STAGE1", "fail-steps");
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("generation failed: a step failed: stage 1: step ")
            && err.contains("GPTOSSD_FAULT=fail-steps (test fault injection)"),
        "{err}"
    );
    assert!(!err.contains("restarted"), "{err}");
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["finish_reason"], "error", "{lines:?}");
    assert!(
        lines[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("stage 1: step ")),
        "{lines:?}"
    );
    assert_nothing_left(model);
}

#[test]
fn a_stage_that_cannot_load_is_reported_without_restarts() {
    let broken = common::model_missing_a_tensor();

    let reqs = requests_file(&requests(1, 4, false));
    let mut cmd = command();
    cmd.arg("generate")
        .arg("--model")
        .arg(broken.path())
        .arg("--requests")
        .arg(reqs.path())
        .args(["--stages", "4", "--threads", "1"]);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot load") && err.contains("model.layers.3.self_attn.sinks"),
        "{err}"
    );
    assert!(
        !err.contains("restarted"),
        "a load failure must not be restarted:\n{err}"
    );
    assert_nothing_left(broken.path());
}

#[test]
fn a_small_kv_pool_preempts_instead_of_failing() {
    let view = private_model();
    let model = view.path();
    let file = requests_file(&requests(8, 120, false));
    let want = baseline(model, file.path());
    // 8 sequences of up to 143 tokens need ~80 blocks; give them 20 (320 tokens).
    let out = generate_requests(model, file.path(), 4, &["--kv-cache-tokens", "320"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = tokens_of(&stdout_lines(&out));
    let want: Vec<Vec<u64>> = want
        .iter()
        .map(|t| t[..t.len().min(120)].to_vec())
        .collect();
    assert_eq!(got, want);
    assert_nothing_left(model);
}

#[test]
fn the_waiting_queue_is_bounded() {
    let view = private_model();
    let file = requests_file(&requests(6, 4, false));
    let out = generate_requests(view.path(), file.path(), 2, &["--max-waiting", "2"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("waiting queue is full (2 requests waiting)"),
        "{err}"
    );
    assert_nothing_left(view.path());
}

#[test]
fn sigterm_drains_running_requests_then_exits_zero() {
    let view = private_model();
    let model = view.path();
    let file = requests_file(&requests(8, 250, false));
    let want = baseline(model, file.path());
    // A run that gets SIGTERM in the middle finishes what runs, then exits 0.
    let mut cmd = command();
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--requests")
        .arg(file.path())
        .args(["--stages", "4", "--threads", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    wait_for_workers(model, 4, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    signal(child.id(), libc::SIGTERM);
    let out = wait_with_limit(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("draining"));
    assert_eq!(
        tokens_of(&stdout_lines(&out)),
        want,
        "drain must let running requests finish"
    );
    assert_nothing_left(model);
}

#[test]
fn kill_9_of_the_supervisor_leaves_no_worker_behind() {
    let file = requests_file(&requests(4, 250, false));
    let view = private_model();
    let model = view.path();
    let mut cmd = command();
    cmd.arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--requests")
        .arg(file.path())
        .args(["--stages", "4", "--threads", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("spawn");
    wait_for_workers(model, 4, Duration::from_secs(30));
    signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
    assert_nothing_left(model);
}

#[test]
fn the_single_process_tools_name_the_file_at_fault() {
    // `generate` and `bench` without --stages run in the stage worker binary; its error (here:
    // a model folder without config.json) still reaches the user, naming the file, exit 1.
    let empty = tempfile::tempdir().expect("tempdir");
    let config = empty.path().join("config.json");
    let tools: [&[&str]; 2] = [
        &["generate", "--prompt-tokens", "1,2", "--max-tokens", "2"],
        &["bench", "--prompt-len", "4", "--gen", "1", "--batch", "1"],
    ];
    for args in tools {
        let mut cmd = command();
        cmd.arg(args[0])
            .arg("--model")
            .arg(empty.path())
            .args(&args[1..]);
        let out = run(&mut cmd, Duration::from_secs(60));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", args[0]);
        assert!(
            err.contains(&config.display().to_string()),
            "{}: {err}",
            args[0]
        );
    }
}

#[test]
fn a_device_the_tools_cannot_use_is_named_with_its_reason() {
    // `--device cuda:0` on a machine without a usable GPU: the single-process tools fail at
    // load, naming the device (never a panic, never a silent fall-back to the CPU).
    let model = tiny_model();
    let tools: [&[&str]; 2] = [
        &["generate", "--prompt-tokens", "1,2", "--max-tokens", "2"],
        &["bench", "--prompt-len", "4", "--gen", "1", "--batch", "1"],
    ];
    for args in tools {
        let mut cmd = command();
        cmd.arg(args[0])
            .arg("--model")
            .arg(&model)
            .args(&args[1..])
            .args(["--device", "cuda:0"]);
        let out = run(&mut cmd, Duration::from_secs(60));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", args[0]);
        assert!(err.contains("cuda:0"), "{}: {err}", args[0]);
        assert!(!err.contains("panicked"), "{}: {err}", args[0]);
    }
    // With --stages, one device per stage: a list of another length names the flag.
    let mut cmd = command();
    cmd.arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--prompt-tokens", "1,2", "--max-tokens", "2"])
        .args(["--stages", "2", "--devices", "cpu"]);
    let out = run(&mut cmd, Duration::from_secs(60));
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--devices"), "{err}");
}

#[test]
fn bench_reports_speed_bandwidth_and_memory_for_each_batch() {
    // `gptossd bench` on the tiny model, in process: one JSON line per batch size with the
    // figures the speed issue asks for, consistent with each other.
    let view = private_model();
    let mut cmd = command();
    cmd.arg("bench")
        .arg("--model")
        .arg(view.path())
        .args(["--threads", "2", "--prompt-len", "8", "--gen", "3"])
        .args(["--batch", "1,2", "--json"]);
    let out = run(&mut cmd, Duration::from_secs(300));
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = stdout_lines(&out);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, batch) in rows.iter().zip([1u64, 2]) {
        let num = |key: &str| {
            row[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing: {row}"))
        };
        assert_eq!(row["batch"].as_u64(), Some(batch), "{row}");
        assert!(num("prefill_tok_s") > 0.0, "{row}");
        // Aggregate tokens/s is the batch over the median step.
        let expected = batch as f64 / (num("decode_step_median_ms") / 1e3);
        assert!((num("decode_tok_s") / expected - 1.0).abs() < 0.01, "{row}");
        assert!(num("read_bandwidth_gbs") > 0.1, "{row}");
        assert!(num("read_bandwidth_best_gbs") > 0.1, "{row}");
        assert!(num("bytes_per_decode_token") > 0.0, "{row}");
        assert!(num("peak_rss_bytes") > 0.0, "{row}");
        assert!(num("checkpoint_bytes") > 0.0, "{row}");
        if batch == 1 {
            let roofline = num("roofline_fraction");
            assert!(roofline > 0.0 && roofline.is_finite(), "{row}");
            assert!(num("roofline_fraction_vs_best") > 0.0, "{row}");
        } else {
            assert!(row["roofline_fraction"].is_null(), "{row}");
        }
    }
    assert_nothing_left(view.path());
}

/// Issue 14: a repeated prompt of whole KV blocks (16 and 32 tokens, blocks of 16) reuses its
/// cached blocks, recomputing only its last token, and still yields exactly the greedy tokens
/// of the first run (the recomputed K/V is bitwise what the shared block held).
#[test]
fn a_repeated_block_aligned_prompt_hits_the_prefix_cache_and_gives_the_same_tokens() {
    let d = common::daemon::Daemon::start(2, "");
    let scheduler_stats = || {
        let stats = d.get("/stats").json();
        let s = &stats["schedulers"][0];
        let count = |key: &str| {
            s[key]
                .as_u64()
                .unwrap_or_else(|| panic!("{key} missing: {stats}"))
        };
        (count("prefix_cache_hits"), count("prefix_cache_queries"))
    };
    for len in [16u32, 32] {
        let prompt: Vec<u32> = (0..len).map(|i| 3000 + 97 * len + 13 * i).collect();
        let body =
            json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": true});
        let mut runs = Vec::new();
        for run in 0..3 {
            let (hits, queries) = scheduler_stats();
            let r = d.post("/v1/completions", &body);
            assert_eq!(r.status, 200, "{}", r.text());
            runs.push(r.json()["choices"][0]["token_ids"].clone());
            let (hits_after, queries_after) = scheduler_stats();
            assert_eq!(
                queries_after - queries,
                u64::from(len),
                "{len} tokens, run {run}"
            );
            // The first run computes everything; a repeat finds every block and computes
            // only the last token again.
            let want = if run == 0 { 0 } else { u64::from(len) - 1 };
            assert_eq!(hits_after - hits, want, "{len} tokens, run {run}");
        }
        assert_eq!(runs[0].as_array().map(Vec::len), Some(8), "{:?}", runs[0]);
        assert_eq!(
            runs[1], runs[0],
            "{len} tokens: a cache hit changed the tokens"
        );
        assert_eq!(
            runs[2], runs[0],
            "{len} tokens: a cache hit changed the tokens"
        );
    }
    assert!(d.stop().success());
}

/// Issue 14: with no `control_socket` configured, `serve` binds `$RUNTIME_DIRECTORY/control.sock`
/// (as under systemd's `RuntimeDirectory=gptossd`) rather than a fixed path under /run that
/// only root may create.
#[test]
fn serve_binds_its_default_control_socket_in_the_runtime_directory() {
    let view = private_model();
    let runtime = tempfile::tempdir().expect("tempdir");
    let socket = runtime.path().join("control.sock");
    let mut cmd = command();
    cmd.arg("serve")
        .arg("--model")
        .arg(view.path())
        .args(["--port", "0", "--stages", "1"])
        .env("RUNTIME_DIRECTORY", runtime.path())
        .env_remove("XDG_RUNTIME_DIR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn gptossd serve");
    let pipe = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut log = String::new();
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            if line.contains("listening on http://") {
                let _ = tx.send(None);
            }
            log.push_str(&line);
            log.push('\n');
        }
        let _ = tx.send(Some(log));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(None) => {}
        other => {
            let _ = child.kill();
            panic!("serve did not start listening: {other:?}");
        }
    }
    let answer = {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket)
            .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
        s.write_all(b"GET /profile HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        String::from_utf8_lossy(&raw).to_string()
    };
    assert!(answer.contains("default_profile"), "{answer}");
    signal(child.id(), libc::SIGTERM);
    let status = wait_with_limit(child, Duration::from_secs(30)).status;
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "control socket left behind");
    assert_nothing_left(view.path());
}
