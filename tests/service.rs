//! End-to-end tests of the daemon as a service: what start-up reports and how fast, what the
//! sockets do under stalled clients and file-descriptor exhaustion, what the log looks like,
//! and how an operator's stage restarts and a crash loop play out. Each starts the real
//! `gptossd serve` (and its real stage workers) and talks to it over real sockets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{try_request, Daemon};
use common::{assert_nothing_left, command, private_model, signal, wait_for_workers};

/// A config file for `serve` on `model` with `stages` stages; `server` goes into `[server]`,
/// `rest` after the model entry.
fn config_file(dir: &Path, model: &Path, stages: usize, server: &str, rest: &str) -> PathBuf {
    let path = dir.join("gptossd.toml");
    let text = format!(
        "[server]\nport = 0\ncontrol_socket = {:?}\nrequest_timeout_secs = 2\n{server}\n\n\
         [[models]]\nname = \"gpt-oss-20b\"\npath = {:?}\nstages = {stages}\n\
         threads_per_stage = 1\n{rest}\n",
        dir.join("control.sock").to_string_lossy(),
        model.to_string_lossy(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs `gptossd serve --config FILE` until it exits (at most `limit`): status, stderr, time.
fn serve_until_exit(
    config: &Path,
    limit: Duration,
) -> (std::process::ExitStatus, String, Duration) {
    let start = Instant::now();
    let child = command()
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gptossd serve");
    let out = common::wait_with_limit(child, limit);
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn a_busy_port_is_reported_at_once_before_any_worker_starts() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let view = private_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(dir.path(), view.path(), 2, "", "");
    let (status, err, took) =
        serve_until_exit(&config_with_port(&config, port), Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        !err.contains("stage loaded"),
        "workers were started:\n{err}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}:\n{err}");
    assert_nothing_left(view.path());
}

fn config_with_port(config: &Path, port: u16) -> PathBuf {
    let text = std::fs::read_to_string(config).expect("read config");
    let text = text.replacen("port = 0", &format!("port = {port}"), 1);
    std::fs::write(config, text).expect("write config");
    config.to_path_buf()
}

#[test]
fn an_unusable_control_socket_directory_is_reported_at_once() {
    let view = private_model();
    let dir = tempfile::tempdir().expect("tempdir");
    // A regular file where the socket's directory should be: no user, root included, can
    // create a directory there.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").expect("write");
    let config = config_file(
        dir.path(),
        view.path(),
        2,
        &format!(
            "control_socket = {:?}",
            blocker.join("control.sock").to_string_lossy()
        ),
        "",
    );
    // The [server] table now names control_socket twice: keep the second (ours).
    let text = std::fs::read_to_string(&config).expect("read");
    let first = text.find("control_socket").expect("key");
    let end = first + text[first..].find('\n').expect("line");
    std::fs::write(&config, format!("{}{}", &text[..first], &text[end + 1..])).expect("write");

    let (status, err, took) = serve_until_exit(&config, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("control socket"), "{err}");
    assert!(
        !err.contains("stage loaded"),
        "workers were started:\n{err}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}:\n{err}");
    assert_nothing_left(view.path());
}

#[test]
fn a_checkpoint_that_cannot_load_ends_start_up_with_the_reason_and_exit_64() {
    let broken = common::model_missing_a_tensor();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(dir.path(), broken.path(), 2, "", "");
    let (status, err, took) = serve_until_exit(&config, Duration::from_secs(60));
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(
        err.contains("cannot load") && err.contains("model.layers.3.self_attn.sinks"),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        !dir.path().join("control.sock").exists(),
        "control socket left behind"
    );
    assert_nothing_left(broken.path());
}

/// Whether the dynamic loader finds a CUDA driver library here (as the worker's probe looks
/// for it), so the test below knows which machine it is on.
fn cuda_driver_present() -> bool {
    let name = c"libcuda.so.1";
    // SAFETY: dlopen with a valid NUL-terminated name and RTLD_LAZY; the handle, when one is
    // returned, is closed at once and nothing from the library is used.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

#[test]
fn a_cuda_stage_without_a_cuda_driver_ends_start_up_saying_so() {
    // The worker parses `cuda:0` with the supervisor's grammar and, with no driver library on
    // this machine, refuses it while loading with the probe's reason.
    if cuda_driver_present() {
        println!("skipped: this machine has a CUDA driver library");
        return;
    }
    let view = private_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let devices = "devices = [\"cpu:0\", \"cuda:0\"]";
    let config = config_file(dir.path(), view.path(), 2, "", devices);
    let (status, err, took) = serve_until_exit(&config, Duration::from_secs(60));
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(
        err.contains("stage 1 cannot load")
            && err.contains("device cuda:0: no CUDA driver library: libcuda.so.1 was not found"),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_nothing_left(view.path());
}

#[test]
fn a_missing_shard_is_reported_in_a_second_before_any_worker_starts() {
    let view = private_model();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(view.path().join("model.safetensors.index.json")).expect("index"),
    )
    .expect("json");
    let shard = index["weight_map"]["model.layers.3.self_attn.sinks"]
        .as_str()
        .expect("shard")
        .to_string();
    std::fs::remove_file(view.path().join(&shard)).expect("remove the shard's link");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(dir.path(), view.path(), 2, "", "");
    let (status, err, took) = serve_until_exit(&config, Duration::from_secs(20));
    assert_eq!(status.code(), Some(64), "{err}");
    assert!(
        err.contains(&shard) && err.contains("No such file"),
        "{err}"
    );
    assert_eq!(
        err.matches("os error 2").count(),
        1,
        "the OS error is printed once:\n{err}"
    );
    assert!(
        !err.contains("stage loaded"),
        "workers were started:\n{err}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}:\n{err}");
    assert_nothing_left(view.path());
}

#[test]
fn the_control_socket_cuts_a_client_that_stalls_in_its_headers() {
    let d = Daemon::start(1, "");
    let mut s = UnixStream::connect(&d.control).expect("connect");
    s.write_all(b"GET /stages HTTP/1.1\r\nhost: localhost\r\n")
        .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(8)))
        .expect("timeout");
    let start = Instant::now();
    let mut raw = Vec::new();
    // Closed by the daemon (EOF) within its 2 s header timeout; a read error here would be our
    // own 8 s timeout, i.e. the daemon holding the connection.
    s.read_to_end(&mut raw)
        .expect("the daemon never closed the stalled connection");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    if !raw.is_empty() {
        assert!(
            raw.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&raw)
        );
    }
    // The daemon still answers on its control socket.
    assert_eq!(d.control("GET", "/stages", None).status, 200);
    assert!(d.stop().success());
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which is in parentheses): utime is the 12th, stime 13th.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf reads a constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Starts `serve` with its open-file limit (soft and hard) set to `nofile`.
fn serve_with_fd_limit(
    config: &Path,
    nofile: u64,
) -> (Child, u16, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut cmd = command();
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn gptossd serve");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    {
        use std::io::BufRead;
        let pipe = child.stderr.take().expect("stderr");
        let log = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    if let Some(port) = rest
                        .split_whitespace()
                        .next()
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| p.parse::<u16>().ok())
                    {
                        let _ = port_tx.send(port);
                    }
                }
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
    }
    let port = port_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the daemon did not report its port");
    (child, port, log)
}

fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !try_request(port, "GET", "/health", None, &[]).is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn running_out_of_file_descriptors_backs_off_logs_and_recovers() {
    let view = private_model();
    let dir = tempfile::tempdir().expect("tempdir");
    // A cap far above what 128 descriptors allow: accept() itself must fail with EMFILE.
    let config = config_file(dir.path(), view.path(), 1, "max_connections = 10000", "");
    let (mut child, port, log) = serve_with_fd_limit(&config, 128);
    wait_ready(port);
    let mut held = Vec::new();
    for _ in 0..200 {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    // Connections beyond the daemon's descriptors wait in its backlog; accept() fails.
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_seconds(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(child.id()) - before;
    assert!(
        used < 0.5,
        "the daemon used {used:.2} CPU seconds in 2 s while out of descriptors (spinning)"
    );
    let text = log.lock().map(|l| l.clone()).unwrap_or_default();
    let records = text.matches("cannot accept a connection").count();
    assert!(records >= 1, "accept errors were not logged:\n{text}");
    assert!(
        records <= 3,
        "accept errors are not rate-limited ({records}):\n{text}"
    );
    assert!(text.contains("Too many open files"), "{text}");
    drop(held);
    // Once descriptors are free again the daemon serves.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if try_request(port, "GET", "/health", None, &[]).is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery:\n{}",
            log.lock().map(|l| l.clone()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(child.id(), libc::SIGTERM);
    let status = child.wait().expect("wait");
    assert!(status.success());
    assert_nothing_left(view.path());
}

#[test]
fn over_the_connection_cap_a_new_connection_waits_for_a_free_one() {
    let d = Daemon::start_with(1, "max_connections = 2", "", &[]);
    let a = TcpStream::connect(("127.0.0.1", d.port)).expect("connect");
    let b = TcpStream::connect(("127.0.0.1", d.port)).expect("connect");
    std::thread::sleep(Duration::from_millis(200));
    let mut third = TcpStream::connect(("127.0.0.1", d.port)).expect("connect");
    third
        .write_all(b"GET /live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .expect("write");
    third
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    assert!(
        third.read(&mut buf).is_err(),
        "a third connection was served over a cap of 2"
    );
    drop(a);
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut raw = Vec::new();
    third
        .read_to_end(&mut raw)
        .expect("answered once a slot is free");
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    drop(b);
    assert!(d.stop().success());
}

#[test]
fn the_log_is_plain_text_with_fields_and_a_crash_names_its_stage_and_pid() {
    let d = Daemon::start(2, "");
    let workers = wait_for_workers(&d.model, 2, Duration::from_secs(10));
    let (pid, _) = *workers.iter().find(|(_, s)| *s == 1).expect("stage 1");
    signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = d.log();
        if let Some(l) = log.lines().find(|l| l.contains("stage failed")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no crash record:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("stage=1"), "{line}");
    assert!(line.contains(&format!("pid={pid}")), "{line}");
    assert!(line.contains("model=gpt-oss-20b"), "{line}");
    // Every record starts with an RFC 3339 timestamp and a level.
    let log = d.log();
    for l in log.lines().filter(|l| !l.is_empty()) {
        assert!(
            l.len() > 30 && l.as_bytes()[4] == b'-' && l.contains('T'),
            "a line without a timestamp: {l}"
        );
    }
    assert!(
        !log.contains('\u{1b}'),
        "colour escapes in a piped log:\n{log}"
    );
    d.wait_health(200, Duration::from_secs(20));
    assert!(d.stop().success());
}

/// A short chat request that must be answered within `limit` (else the log is shown).
fn post_within(d: &Daemon, limit: Duration) -> common::daemon::HttpResponse {
    let port = d.port;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let body =
            serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        let _ = tx.send(try_request(
            port,
            "POST",
            "/v1/chat/completions",
            Some(body.to_string().as_bytes()),
            &[],
        ));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(r)) => r,
        other => panic!(
            "no answer within {limit:?} ({other:?}); health: {}\n{}",
            d.get("/health").text(),
            d.log()
        ),
    }
}

fn health(d: &Daemon) -> (u16, serde_json::Value, Option<String>) {
    let r = d.get("/health");
    let retry = r.header("retry-after").map(str::to_string);
    (r.status, r.json(), retry)
}

/// Kills stage 1 twice (waiting for its restart in between): a crash loop under a limit of 1.
fn crash_stage_1_twice(d: &Daemon) {
    for _ in 0..2 {
        let workers = wait_for_workers(&d.model, 2, Duration::from_secs(20));
        let (pid, _) = *workers.iter().find(|(_, s)| *s == 1).expect("stage 1");
        signal(pid, libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn wait_health_status(d: &Daemon, want: &str, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let (_, h, _) = health(d);
        if h["status"] == want {
            return h;
        }
        assert!(Instant::now() < deadline, "never {want}: {h}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_operators_restarts_are_not_crashes() {
    // A crash-loop limit of 1: two crashes within the window would mark the model unhealthy.
    let d = Daemon::start(
        2,
        "[workers]\ncrash_loop_limit = 1\ncrash_loop_window_secs = 600\n",
    );
    for round in 0..4 {
        let r = d.control("POST", "/stages/1/restart", None);
        assert_eq!(r.status, 202, "{}", r.text());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, h, _) = health(&d);
            if h["status"] == "healthy" && h["stages"][1]["restarts"] == round + 1 {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: {h}\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        let reply = post_within(&d, Duration::from_secs(20));
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
    }
    assert!(d.stop().success());
}

#[test]
fn a_crash_loop_marks_the_model_unhealthy_until_an_operator_restarts_the_stage() {
    let d = Daemon::start(
        2,
        "[workers]\ncrash_loop_limit = 1\ncrash_loop_window_secs = 600\nrestart_backoff_initial_ms = 10\n",
    );
    crash_stage_1_twice(&d);
    let h = wait_health_status(&d, "unhealthy", Duration::from_secs(20));
    assert!(h.to_string().contains("crashed 2 times"), "{h}");
    let r = d.post(
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.header("retry-after"),
        None,
        "an unhealthy model is not a 'retry in 1 s'"
    );
    let r = d.control("POST", "/stages/1/restart", None);
    assert_eq!(r.status, 202, "{}", r.text());
    wait_health_status(&d, "healthy", Duration::from_secs(20));
    let r = d.post(
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(d.stop().success());
}

#[test]
fn a_crash_loop_recovers_by_itself_after_its_cool_down() {
    let d = Daemon::start(
        2,
        "[workers]\ncrash_loop_limit = 1\ncrash_loop_window_secs = 3\nrestart_backoff_initial_ms = 10\n",
    );
    crash_stage_1_twice(&d);
    let h = wait_health_status(&d, "unhealthy", Duration::from_secs(20));
    assert!(
        h.to_string().contains("cool-down"),
        "health should say how it recovers: {h}"
    );
    let start = Instant::now();
    wait_health_status(&d, "healthy", Duration::from_secs(20));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(d.stop().success());
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[test]
fn an_idle_stage_gives_back_the_memory_of_a_burst() {
    let d = Daemon::start(1, "");
    let workers = wait_for_workers(&d.model, 1, Duration::from_secs(10));
    let pid = workers[0].0;
    // 32 sequences at once: the last stage's logits alone are 32 × 201,088 floats (26 MB).
    let port = d.port;
    let threads: Vec<_> = (0..32)
        .map(|i| {
            std::thread::spawn(move || {
                let body = serde_json::json!({
                    "messages": [{"role": "user", "content": format!("burst {i}")}],
                    "max_tokens": 3,
                });
                try_request(
                    port,
                    "POST",
                    "/v1/chat/completions",
                    Some(body.to_string().as_bytes()),
                    &[],
                )
                .map(|r| r.status)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("thread").expect("request"), 200);
    }
    let after_burst = rss_bytes(pid);
    std::thread::sleep(Duration::from_secs(3));
    let idle = rss_bytes(pid);
    assert!(
        after_burst > idle + 10_000_000,
        "the stage kept its high-water mark: {after_burst} bytes after the burst, {idle} when idle"
    );
    assert!(d.stop().success());
}

#[test]
fn a_default_control_socket_directory_that_others_can_enter_is_refused() {
    let view = private_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tempfile::tempdir().expect("runtime dir");
    // Someone made $XDG_RUNTIME_DIR/gptossd first, open to everyone.
    let shared_dir = runtime.path().join("gptossd");
    std::fs::create_dir(&shared_dir).expect("mkdir");
    std::fs::set_permissions(
        &shared_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let config = dir.path().join("gptossd.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nport = 0\n\n[[models]]\nname = \"m\"\npath = {:?}\nstages = 1\n",
            view.path().to_string_lossy()
        ),
    )
    .expect("write config");
    let child = command()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env_remove("RUNTIME_DIRECTORY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = common::wait_with_limit(child, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a private directory"), "{err}");
    assert!(!shared_dir.join("control.sock").exists());
    assert_nothing_left(view.path());
}

#[test]
fn a_missing_stage_worker_binary_says_what_to_build() {
    let bin_dir = tempfile::tempdir().expect("tempdir");
    let lone = bin_dir.path().join("gptossd");
    std::fs::copy(common::gptossd(), &lone).expect("copy the daemon alone");
    let view = private_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(dir.path(), view.path(), 1, "", "");
    let child = std::process::Command::new(&lone)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("GPTOSSD_STAGE_BIN")
        .env_remove("GPTOSSD_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = common::wait_with_limit(child, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("gptossd-stage") && err.contains("cargo build --release"),
        "{err}"
    );
}

/// Runs `journalctl` on a journal directory and returns its records.
fn journal_records(dir: &Path) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("journalctl")
        .arg("--directory")
        .arg(dir)
        .args(["-o", "json", "--no-pager"])
        .output()
        .expect("journalctl (Debian's systemd package)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn under_systemd_records_reach_a_real_journal_with_native_fields() {
    // A private, real systemd-journald: in a user and mount namespace of its own (no privilege
    // needed), with /run bound to a folder of this test, so its socket and its journal files
    // are ours. The daemon runs in the same namespace with stderr "connected to the journal"
    // (JOURNAL_STREAM names stderr, as systemd sets it), and the default --log auto.
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("systemd/journal")).expect("mkdir");
    let view = private_model();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let config = config_file(
        dir.path(),
        view.path(),
        2,
        "",
        "[workers]\nrestart_backoff_initial_ms = 10\n",
    );
    let config = config_with_port(&config, port);
    let pid_file = dir.path().join("gptossd.pid");
    let script = format!(
        "set -e\n\
         mount --bind {run} /run\n\
         /lib/systemd/systemd-journald >{dir}/journald.out 2>&1 &\n\
         J=$!\n\
         for i in $(seq 1 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done\n\
         export JOURNAL_STREAM=$(stat -L -c '%d:%i' /proc/$$/fd/2)\n\
         {bin} serve --config {config} &\n\
         G=$!\n\
         echo $G > {pid}\n\
         set +e\n\
         wait $G\n\
         status=$?\n\
         sleep 0.3\n\
         kill $J\n\
         wait $J\n\
         exit $status\n",
        run = run.display(),
        dir = dir.path().display(),
        bin = common::gptossd().display(),
        config = config.display(),
        pid = pid_file.display(),
    );
    let mut shell = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .env_remove("GPTOSSD_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux)");
    wait_ready(port);
    let workers = wait_for_workers(view.path(), 2, Duration::from_secs(20));
    let (victim, _) = *workers.iter().find(|(_, s)| *s == 1).expect("stage 1");
    signal(victim, libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    wait_ready(port);
    let daemon: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    signal(daemon, libc::SIGTERM);
    let status = shell.wait().expect("wait");
    let mut stderr = String::new();
    if let Some(mut e) = shell.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(
        status.success(),
        "daemon or journald failed: {status}\n{stderr}"
    );
    assert!(
        !stderr.contains("listening on"),
        "records went to stderr, not the journal:\n{stderr}"
    );

    let records = journal_records(&run.join("log/journal"));
    let ours: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["SYSLOG_IDENTIFIER"] == "gptossd")
        .collect();
    let find = |needle: &str| {
        ours.iter()
            .find(|r| r["MESSAGE"].as_str().is_some_and(|m| m.contains(needle)))
            .copied()
            .unwrap_or_else(|| panic!("no record {needle:?} among {ours:#?}"))
    };
    let listening = find("listening on http://");
    assert_eq!(listening["PRIORITY"], "5", "{listening}");
    assert!(listening["CODE_FILE"]
        .as_str()
        .is_some_and(|f| f.ends_with(".rs")));
    assert!(listening["CODE_LINE"]
        .as_str()
        .is_some_and(|l| l.parse::<u32>().is_ok()));
    let loaded = find("stage loaded");
    assert_eq!(loaded["GPTOSSD_MODEL"], "gpt-oss-20b", "{loaded}");
    assert!(loaded["GPTOSSD_STAGE"].is_string(), "{loaded}");
    assert!(loaded["GPTOSSD_PID"].is_string(), "{loaded}");
    let failed = find("stage failed");
    assert_eq!(failed["PRIORITY"], "4", "{failed}");
    assert_eq!(failed["GPTOSSD_STAGE"], "1", "{failed}");
    assert_eq!(failed["GPTOSSD_PID"], victim.to_string(), "{failed}");
    assert_eq!(failed["GPTOSSD_MODEL"], "gpt-oss-20b", "{failed}");
    assert_nothing_left(view.path());
}

/// Datagrams a test's own `NOTIFY_SOCKET` received, with when they arrived.
fn notify_collector(path: &Path) -> std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>> {
    let socket = std::os::unix::net::UnixDatagram::bind(path).expect("bind notify socket");
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Ok(mut g) = sink.lock() {
                g.push((Instant::now(), text));
            }
        }
    });
    got
}

#[test]
fn systemd_is_told_ready_status_and_watchdog_pings_only_while_the_engine_turns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = dir.path().join("notify.sock");
    let got = notify_collector(&notify);
    let notify_str = notify.to_string_lossy().into_owned();
    let d = Daemon::start_with(
        2,
        "",
        "",
        &[
            ("NOTIFY_SOCKET", notify_str.as_str()),
            ("WATCHDOG_USEC", "1000000"),
            ("GPTOSSD_TEST_HOOKS", "1"),
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let messages = |since: Instant| -> Vec<(Instant, String)> {
        got.lock()
            .map(|g| g.iter().filter(|(t, _)| *t >= since).cloned().collect())
            .unwrap_or_default()
    };
    let all = messages(Instant::now() - Duration::from_secs(3600));
    let texts: Vec<&str> = all.iter().map(|(_, m)| m.as_str()).collect();
    let ready = texts
        .iter()
        .position(|m| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {texts:?}"));
    assert!(
        texts[..ready].iter().any(|m| m.contains("STATUS=loading")),
        "a loading status before READY: {texts:?}"
    );
    assert!(
        texts.iter().any(|m| m.contains("STATUS=serving")),
        "{texts:?}"
    );
    let pings = |from: Instant, to: Instant| {
        messages(from)
            .iter()
            .filter(|(t, m)| *t <= to && m.contains("WATCHDOG=1"))
            .count()
    };
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        pings(t0, Instant::now()) >= 3,
        "pings every 0.5 s: {texts:?}"
    );

    // A stuck engine (test hook: its loop sleeps 3 s): no ping for the whole freeze.
    let r = d.control("POST", "/debug/freeze?ms=3000", None);
    assert_eq!(r.status, 202, "{}", r.text());
    let frozen = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        pings(frozen + Duration::from_millis(600), Instant::now()),
        0,
        "a ping while the engine was stuck"
    );
    assert!(d.log().contains("watchdog pings withheld"), "{}", d.log());
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        pings(frozen + Duration::from_millis(3500), Instant::now()) >= 1,
        "pings resume once the engine turns again"
    );
    assert!(d.stop().success());
    let after = messages(t0);
    assert!(
        after.iter().any(|(_, m)| m.contains("STOPPING=1")),
        "{after:?}"
    );
}

/// The daemon's config file (Daemon::start_with writes it beside the control socket).
fn config_of(d: &Daemon) -> PathBuf {
    d.control.with_file_name("gptossd.toml")
}

#[test]
fn a_reload_changes_profiles_live_and_refuses_what_needs_a_restart() {
    let d = Daemon::start(2, "");
    let config = config_of(&d);
    let original = std::fs::read_to_string(&config).expect("config");
    // A long stream runs across the reloads: it must finish normally.
    let port = d.port;
    let stream = std::thread::spawn(move || {
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60,
            "ignore_eos": true, "stream": true,
        });
        try_request(
            port,
            "POST",
            "/v1/chat/completions",
            Some(body.to_string().as_bytes()),
            &[],
        )
    });
    std::thread::sleep(Duration::from_millis(200));

    // 1. A live change: the default profile's max_new_tokens, by SIGHUP.
    std::fs::write(
        &config,
        format!("{original}\n[profiles.balanced]\nmax_new_tokens = 3\n"),
    )
    .expect("write");
    let pid = d.child.as_ref().expect("running").id();
    signal(pid, libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = d.post(
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 3, "{}", r.text());

    // 2. A change that needs a restart: refused on the control socket, naming the key.
    std::fs::write(
        &config,
        original.replace("threads_per_stage = 1", "threads_per_stage = 2"),
    )
    .expect("write");
    let r = d.control("POST", "/reload", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("models.gpt-oss-20b.threads_per_stage"),
        "{}",
        r.text()
    );
    // Nothing changed: still 3 tokens by default.
    let r = d.post(
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": true}),
    );
    assert_eq!(r.json()["usage"]["completion_tokens"], 3, "{}", r.text());

    // 3. A config error: 400, nothing changed.
    std::fs::write(&config, format!("{original}\n[server]\nbogus = 1\n")).expect("write");
    let r = d.control("POST", "/reload", None);
    assert_eq!(r.status, 400, "{}", r.text());

    // 4. Back to the original by the control socket: the change is reported.
    std::fs::write(&config, &original).expect("write");
    let r = d.control("POST", "/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("profiles.balanced"), "{}", r.text());

    let streamed = stream.join().expect("thread").expect("stream");
    assert_eq!(streamed.status, 200);
    let data = streamed.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    assert!(
        data.iter()
            .any(|d| d.contains("\"finish_reason\":\"length\"")),
        "the running stream finished normally: {data:?}"
    );
    assert!(d.stop().success());
}

#[test]
fn a_missed_slo_degrades_health_once_and_clears_on_a_reload() {
    // Any real request misses a 1 ms time-to-first-token SLO.
    let d = Daemon::start(
        1,
        "[profiles.balanced.slo]\nttft_p95_ms = 1\n[slo]\nmin_requests = 3\nwindow_secs = 60\n",
    );
    let before = health(&d).1;
    assert_eq!(before["status"], "healthy", "{before}");
    for _ in 0..4 {
        let r = d.post(
            "/v1/chat/completions",
            &serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (status, h, _) = health(&d);
    assert_eq!(status, 200, "degraded still serves");
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(h["score"].as_f64().is_some_and(|s| s < 1.0), "{h}");
    let reason = h["slo"]["balanced"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("p95 time to first token"), "{h}");
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("gptossd_slo_breach{profile=\"balanced\",slo=\"ttft_p95_ms\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        d.log().matches("SLO missed").count(),
        1,
        "one warning when it starts:\n{}",
        d.log()
    );
    // The owner relaxes the SLO: a reload clears it.
    let config = config_of(&d);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("ttft_p95_ms = 1\n", "ttft_p95_ms = 600000\n"),
    )
    .expect("write");
    let r = d.control("POST", "/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, h, _) = health(&d);
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(d.log().matches("SLO met again").count(), 1, "{}", d.log());
    assert!(d
        .get("/metrics")
        .text()
        .contains("gptossd_slo_breach{profile=\"balanced\",slo=\"ttft_p95_ms\"} 0"));
    assert!(d.stop().success());
}
