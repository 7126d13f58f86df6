//! The HTTP API, end to end: the real `gptossd serve` daemon, its real stage workers, real
//! sockets, on the tiny model.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::daemon::{request, tests_dir, Daemon, HttpResponse};
use common::*;
use serde_json::{json, Value};

fn chat(max_tokens: usize) -> Value {
    json!({"model": "gpt-oss-20b", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn the_official_openai_python_client_works_against_the_daemon() {
    let d = Daemon::start(2, "");
    let out = std::process::Command::new("python3")
        .arg(tests_dir().join("openai_client.py"))
        .args([
            "--base-url",
            &format!("http://127.0.0.1:{}/v1", d.port),
            "--model",
            "gpt-oss-20b",
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert!(d.stop().success());
}

/// Checks one SSE chat stream: a role chunk first, one finish_reason, `[DONE]` last, every
/// data frame valid JSON of the same id.
fn assert_well_formed_stream(r: &HttpResponse) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let frames = r.sse_data();
    assert_eq!(
        frames.last().map(String::as_str),
        Some("[DONE]"),
        "stream must end with [DONE]: {frames:?}"
    );
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap_or_else(|e| panic!("bad chunk {f}: {e}")))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].clone();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    let finishes = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .count();
    assert_eq!(finishes, 1, "exactly one finish_reason");
}

#[test]
fn sixty_four_concurrent_streams_all_complete_well_formed() {
    let d = Daemon::start(2, "");
    let port = d.port;
    let handles: Vec<_> = (0..64)
        .map(|i| {
            std::thread::spawn(move || {
                let body = json!({"messages": [{"role": "user", "content": format!("request {i}")}], "max_tokens": 16, "stream": true, "stream_options": {"include_usage": true}});
                request(port, "POST", "/v1/chat/completions", Some(body.to_string().as_bytes()), &[])
            })
        })
        .collect();
    for h in handles {
        let r = h.join().expect("client thread");
        assert_well_formed_stream(&r);
        let frames = r.sse_data();
        let usage: Value = serde_json::from_str(&frames[frames.len() - 2]).expect("usage chunk");
        assert_eq!(usage["choices"], json!([]));
        assert!(usage["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| (1..=16).contains(&n)));
    }
    assert!(d.stop().success());
}

#[test]
fn a_greedy_completion_over_http_returns_exactly_the_tokens_of_generate() {
    let d = Daemon::start(2, "");
    let prompt: Vec<u32> = vec![13225, 1495, 328, 290, 2375, 11, 1118];
    let r = d.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let http_tokens = body["choices"][0]["token_ids"].clone();
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let mut cmd = command();
    cmd.arg("generate").arg("--model").arg(tiny_model()).args([
        "--prompt-tokens",
        &ids.join(","),
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
    ]);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    let generated = &stdout_lines(&out)[0];
    assert_eq!(http_tokens, generated["tokens"]);
    assert_eq!(body["choices"][0]["prompt_token_ids"], json!(prompt));
    assert!(d.stop().success());
}

/// One long request holds the only batch slot; cancelling it lets a waiting one run.
fn capacity_config() -> &'static str {
    "[profiles.balanced]\nmax_batch = 1\nmax_new_tokens = 4000\n"
}

fn start_long_stream(port: u16) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 4000, "temperature": 0, "stream": true})
        .to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    // Read the response head to learn the request id.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("x-request-id header")
        .trim()
        .to_string();
    (s, id)
}

fn kv_blocks_in_use(d: &Daemon) -> u64 {
    d.get("/health").json()["models"][0]["scheduler"]["kv_blocks_in_use"]
        .as_u64()
        .expect("blocks")
}

#[test]
fn cancel_by_endpoint_gives_the_capacity_to_a_waiting_request() {
    let d = Daemon::start(1, capacity_config());
    let (mut long, id) = start_long_stream(d.port);
    let port = d.port;
    let waiting = std::thread::spawn(move || {
        let t = Instant::now();
        let r = request(
            port,
            "POST",
            "/v1/chat/completions",
            Some(chat(4).to_string().as_bytes()),
            &[],
        );
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !waiting.is_finished(),
        "the second request should wait for the only slot"
    );
    let c = d.post(&format!("/v1/requests/{id}/cancel"), &json!({}));
    assert_eq!(c.status, 200, "{}", c.text());
    let (r, _) = waiting.join().expect("waiting client");
    assert_eq!(r.status, 200, "{}", r.text());
    // The cancelled stream ends properly, well short of its 4000 tokens.
    let mut rest = Vec::new();
    long.read_to_end(&mut rest).expect("read rest");
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("[DONE]"),
        "the cancelled stream must end cleanly: {text}"
    );
    assert!(
        text.contains("\"finish_reason\":\"abort\""),
        "a cancelled request is told from a natural stop: {text}"
    );
    assert!(text.matches("\"text\"").count() < 4000);
    let unknown = d.post("/v1/requests/cmpl-nope/cancel", &json!({}));
    assert_eq!(unknown.status, 404);
    let deadline = Instant::now() + Duration::from_secs(5);
    while kv_blocks_in_use(&d) != 0 {
        assert!(
            Instant::now() < deadline,
            "KV blocks not freed after cancel"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(d.stop().success());
}

/// Waits until the model runs `n` sequences.
fn wait_running(d: &Daemon, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.get("/health").json()["models"][0]["scheduler"]["running"] != n {
        assert!(Instant::now() < deadline, "never {n} running");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The finish reason of the last chunk before `[DONE]` (usage off) of a stream's raw bytes.
fn last_finish_reason(raw: &[u8]) -> Value {
    let text = String::from_utf8_lossy(raw);
    let frames: Vec<&str> = text
        .split("\n\n")
        .filter_map(|f| f.lines().find_map(|l| l.strip_prefix("data: ")))
        .collect();
    assert_eq!(frames.last(), Some(&"[DONE]"), "{text}");
    let finish: Value = serde_json::from_str(frames[frames.len() - 2]).expect("finish chunk");
    finish["choices"][0]["finish_reason"].clone()
}

#[test]
fn cancel_ends_chat_and_completions_whole_and_streamed_with_abort() {
    let d = Daemon::start(1, capacity_config());
    let pid = d.child.as_ref().expect("child").id();
    let port = d.port;
    let long_chat = json!({"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 4000, "temperature": 0, "ignore_eos": true});
    let long_prompt =
        json!({"prompt": [1, 2, 3], "max_tokens": 4000, "temperature": 0, "ignore_eos": true});

    // Whole responses: the id is only in the answer, so it is predicted from the daemon's
    // scheme (`{prefix}-{pid:x}{n:08x}`, n counting submitted requests from 1).
    for (n, (path, prefix, body)) in [
        ("/v1/chat/completions", "chatcmpl", &long_chat),
        ("/v1/completions", "cmpl", &long_prompt),
    ]
    .into_iter()
    .enumerate()
    {
        let body = body.to_string();
        let whole =
            std::thread::spawn(move || request(port, "POST", path, Some(body.as_bytes()), &[]));
        wait_running(&d, 1);
        let id = format!("{prefix}-{pid:x}{:08x}", n + 1);
        // The scheduler counts the request as running a moment before its handler registers
        // the id for cancelling (it learns the sequence from the submission): until then a
        // cancel is a 404, so it is retried for a while, not asserted at once.
        let deadline = Instant::now() + Duration::from_secs(10);
        let c = loop {
            let c = d.post(&format!("/v1/requests/{id}/cancel"), &json!({}));
            if c.status != 404 || Instant::now() >= deadline {
                break c;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(c.status, 200, "{id}: {}", c.text());
        let r = whole.join().expect("client");
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        assert_eq!(body["choices"][0]["finish_reason"], "abort", "{body}");
        assert!(body["usage"]["completion_tokens"].as_u64() < Some(4000));
        wait_running(&d, 0);
    }

    // Streams: the id comes with the head.
    for (path, body) in [
        ("/v1/chat/completions", &long_chat),
        ("/v1/completions", &long_prompt),
    ] {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let body = body.to_string();
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        write!(
            s,
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("read head");
            raw.push(byte[0]);
        }
        let head = common::daemon::parse_response(&raw);
        let id = head
            .header("x-request-id")
            .expect("x-request-id")
            .to_string();
        wait_running(&d, 1);
        let c = d.post(&format!("/v1/requests/{id}/cancel"), &json!({}));
        assert_eq!(c.status, 200, "{}", c.text());
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("read stream");
        let rest = common::daemon::parse_response(&[raw, rest].concat()).body;
        assert_eq!(last_finish_reason(&rest), "abort", "{path}");
        wait_running(&d, 0);
    }
    let metrics = d.get("/metrics").text();
    assert!(metrics.contains("finished_reason=\"abort\""), "{metrics}");
    assert!(d.stop().success());
}

#[test]
fn a_client_that_disconnects_frees_its_sequence() {
    let d = Daemon::start(1, capacity_config());
    let (long, _) = start_long_stream(d.port);
    std::thread::sleep(Duration::from_millis(200));
    assert!(kv_blocks_in_use(&d) > 0);
    drop(long);
    let t = Instant::now();
    let r = d.post("/v1/chat/completions", &chat(4));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the waiting request got the slot late: {:?}",
        t.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while kv_blocks_in_use(&d) != 0 {
        assert!(
            Instant::now() < deadline,
            "KV blocks not freed after the client left"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let metrics = d.get("/metrics").text();
    assert!(metrics.contains("finished_reason=\"abort\""), "{metrics}");
    assert!(d.stop().success());
}

#[test]
fn profiles_switch_on_the_control_socket_and_quality_first_falls_back_to_20b() {
    let d = Daemon::start(2, "");
    assert_eq!(
        d.control("GET", "/profile", None).json()["default_profile"],
        "balanced"
    );
    let r = d.post("/v1/chat/completions", &chat(2));
    assert_eq!(r.json()["gptossd"]["profile"], "balanced");

    let set = d.control(
        "PUT",
        "/profile",
        Some(&json!({"profile": "latency_first"})),
    );
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(
        d.control("GET", "/profile", None).json()["default_profile"],
        "latency_first"
    );
    let r = d.post("/v1/chat/completions", &chat(2));
    assert_eq!(r.json()["gptossd"]["profile"], "latency_first");
    assert_eq!(r.header("x-gptossd-profile"), Some("latency_first"));

    // No 120b is loaded: quality_first runs on the tiny model (the 20b stand-in, reported as
    // what it is) and says so.
    let mut q = chat(2);
    q["profile"] = json!("quality_first");
    let r = d.post("/v1/chat/completions", &q);
    let meta = r.json()["gptossd"].clone();
    assert_eq!(meta["profile"], "quality_first");
    assert_eq!(meta["model_size"], "test");
    assert_eq!(meta["fallback"], true);
    assert_eq!(r.header("x-gptossd-fallback"), Some("true"));

    // The header names a profile too.
    let r = d.post_raw(
        "/v1/chat/completions",
        chat(2).to_string().as_bytes(),
        &[("x-gptossd-profile", "balanced")],
    );
    assert_eq!(r.json()["gptossd"]["profile"], "balanced");
    let bad = d.control("PUT", "/profile", Some(&json!({"profile": "fastest"})));
    assert_eq!(bad.status, 400);
    let stages = d.control("GET", "/stages", None).json();
    assert_eq!(
        stages["models"][0]["stages"].as_array().map(Vec::len),
        Some(2)
    );
    assert!(d.stop().success());
}

#[test]
fn health_goes_degraded_through_a_stage_crash_and_back_to_healthy() {
    let d = Daemon::start(
        2,
        "[workers]\nrestart_backoff_initial_ms = 1500\nrestart_backoff_max_ms = 1500\n",
    );
    let h = d.wait_health(200, Duration::from_secs(10));
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["score"], 1.0);
    // The stages report their backend when they load; the KV pool is what they hold.
    assert_eq!(h["models"][0]["backend"], "cpu", "{h}");
    for st in 0..2 {
        let loaded = &h["stages"][st]["loaded"];
        assert_eq!(loaded["backend"], "cpu", "{h}");
        assert!(
            loaded["detail"]
                .as_str()
                .is_some_and(|d| d.contains(" kernels, ")),
            "{h}"
        );
        assert_eq!(
            loaded["kv_blocks"], h["models"][0]["scheduler"]["kv_blocks_total"],
            "{h}"
        );
    }
    let workers = wait_for_workers(&d.model, 2, Duration::from_secs(10));
    let (pid, _) = workers.iter().find(|(_, s)| *s == 1).expect("stage 1");
    signal(*pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    let degraded = loop {
        let h = d.get("/health");
        let body = h.json();
        if body["status"] == "degraded" {
            assert_eq!(h.status, 200, "degraded still serves");
            break body;
        }
        assert!(Instant::now() < deadline, "never saw degraded: {body}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(degraded["score"]
        .as_f64()
        .is_some_and(|s| s > 0.0 && s < 1.0));
    // A request during the outage waits and completes.
    let r = d.post("/v1/chat/completions", &chat(4));
    assert_eq!(r.status, 200, "{}", r.text());
    let h = d.wait_health(200, Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut h = h;
    while h["status"] != "healthy" {
        assert!(Instant::now() < deadline, "never healthy again: {h}");
        std::thread::sleep(Duration::from_millis(20));
        h = d.get("/health").json();
    }
    assert_eq!(h["stages"][1]["restarts"], 1);
    assert!(h["stages"][1]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("stage 1")));
    assert!(d.stop().success());
}

fn assert_error(r: &HttpResponse, status: u16, param: Option<&str>, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let body = r.json();
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains(needle)),
        "message should name {needle:?}: {body}"
    );
    assert!(e["type"].is_string() && e.get("code").is_some(), "{body}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}

#[test]
fn every_bad_input_gets_a_clear_4xx_and_nothing_else_is_touched() {
    let d = Daemon::start_with(1, "max_body_bytes = 65536", "kv_cache_tokens = 512\n", &[]);
    // A healthy request runs alongside everything below.
    let port = d.port;
    let background = std::thread::spawn(move || {
        let body =
            json!({"prompt": [5, 6, 7], "max_tokens": 200, "temperature": 0, "stream": true});
        request(
            port,
            "POST",
            "/v1/completions",
            Some(body.to_string().as_bytes()),
            &[],
        )
    });
    let raw = |body: &str| d.post_raw("/v1/chat/completions", body.as_bytes(), &[]);
    assert_error(&raw("{\"messages\": ["), 400, None, "JSON");
    assert_error(
        &raw(r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#),
        400,
        Some("temperature"),
        "hot",
    );
    assert_error(
        &raw(r#"{"messages": "hello"}"#),
        400,
        Some("messages"),
        "messages",
    );
    assert_error(
        &raw(r#"{"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}"#),
        404,
        Some("model"),
        "gpt-5",
    );
    assert_error(
        &raw(r#"{"profile": "fastest", "messages": [{"role": "user", "content": "x"}]}"#),
        400,
        Some("profile"),
        "fastest",
    );
    assert_error(&raw(r#"{"messages": []}"#), 400, Some("messages"), "empty");
    assert_error(
        &raw(r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}"#),
        400,
        Some("max_tokens"),
        "0",
    );
    assert_error(
        &raw(r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}"#),
        400,
        Some("max_tokens"),
        "-5",
    );
    assert_error(
        &raw(r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}"#),
        400,
        Some("max_tokens"),
        "5000",
    );
    assert_error(
        &raw(r#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#),
        400,
        Some("n"),
        "2",
    );
    let long_prompt: Vec<u32> = (0..600).map(|i| 1000 + i).collect();
    assert_error(
        &d.post(
            "/v1/completions",
            &json!({"prompt": long_prompt, "max_tokens": 4}),
        ),
        400,
        None,
        "600",
    );
    assert_error(
        &d.post(
            "/v1/completions",
            &json!({"prompt": [1, 201088], "max_tokens": 4}),
        ),
        400,
        None,
        "201088",
    );
    let big = vec![b'x'; 100_000];
    assert_error(
        &d.post_raw("/v1/chat/completions", &big, &[]),
        413,
        None,
        "100000",
    );
    let r = request(d.port, "GET", "/v1/nothing", None, &[]);
    assert_error(&r, 404, None, "/v1/nothing");

    // A slow client that never finishes its body gets 408 after the body timeout (2 s here),
    // and holds no slot meanwhile.
    let mut slow = TcpStream::connect(("127.0.0.1", d.port)).expect("connect");
    write!(slow, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"messa").expect("write");
    let t = Instant::now();
    let quick = d.post("/v1/chat/completions", &chat(2));
    assert_eq!(
        quick.status, 200,
        "other requests go on while a client is slow"
    );
    let mut raw_resp = Vec::new();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = slow.read_to_end(&mut raw_resp);
    let slow_resp = common::daemon::parse_response(&raw_resp);
    assert_eq!(slow_resp.status, 408, "{}", slow_resp.text());
    assert!(t.elapsed() < Duration::from_secs(10));

    let bg = background.join().expect("background");
    assert_eq!(bg.status, 200);
    assert_eq!(bg.sse_data().last().map(String::as_str), Some("[DONE]"));
    let h = d.get("/health").json();
    assert_eq!(h["status"], "healthy", "{h}");
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("invalid_value"),
        "rejections are counted by reason"
    );
    assert!(d.stop().success());
}

#[test]
fn overload_is_a_429_with_retry_after_not_a_hang() {
    let d = Daemon::start(
        1,
        "[profiles.balanced]\nmax_batch = 1\n[scheduler]\nmax_waiting = 1\n",
    );
    let port = d.port;
    let clients: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                let body = json!({"prompt": [1, 2, 3], "max_tokens": 300, "temperature": 0});
                request(
                    port,
                    "POST",
                    "/v1/completions",
                    Some(body.to_string().as_bytes()),
                    &[],
                )
            })
        })
        .collect();
    let results: Vec<HttpResponse> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let rejected: Vec<&HttpResponse> = results.iter().filter(|r| r.status == 429).collect();
    assert!(
        !rejected.is_empty(),
        "some requests must be turned away: {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(results.iter().all(|r| r.status == 200 || r.status == 429));
    for r in rejected {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    }
    assert!(d.stop().success());
}

#[test]
fn metrics_and_stats_report_latencies_by_profile() {
    let d = Daemon::start(2, "");
    for _ in 0..3 {
        assert_eq!(d.post("/v1/chat/completions", &chat(4)).status, 200);
    }
    let metrics = d.get("/metrics");
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    for name in [
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "num_requests_running",
        "kv_cache_usage_perc",
        "generation_tokens",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    assert!(text.contains("profile=\"balanced\""));
    let stats = d.get("/stats").json();
    assert!(stats.to_string().contains("p95"), "{stats}");
    assert_eq!(d.get("/live").status, 200);
    let models = d.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "gpt-oss-20b");
    assert!(d.stop().success());
}

#[test]
fn sigterm_lets_a_running_stream_finish_then_exits_zero() {
    let d = Daemon::start(2, "");
    let port = d.port;
    let stream = std::thread::spawn(move || {
        let body =
            json!({"prompt": [9, 8, 7], "max_tokens": 300, "temperature": 0, "stream": true});
        request(
            port,
            "POST",
            "/v1/completions",
            Some(body.to_string().as_bytes()),
            &[],
        )
    });
    std::thread::sleep(Duration::from_millis(150));
    let pid = d.child.as_ref().expect("child").id();
    signal(pid, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(50));
    // New work is refused while draining.
    if let Ok(r) = common::daemon::try_request(
        port,
        "POST",
        "/v1/chat/completions",
        Some(chat(2).to_string().as_bytes()),
        &[],
    ) {
        assert_eq!(r.status, 503, "{}", r.text());
    }
    let r = stream.join().expect("stream");
    assert_eq!(r.status, 200);
    let frames = r.sse_data();
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    let finish: Value = serde_json::from_str(&frames[frames.len() - 2]).expect("finish chunk");
    assert_eq!(
        finish["choices"][0]["finish_reason"], "length",
        "drain must let the stream finish"
    );
    assert!(d.stop().success());
}

#[test]
fn a_shared_prompt_prefix_is_computed_once() {
    let d = Daemon::start(2, "");
    let prefill = |d: &Daemon| -> u64 {
        d.get("/stats").json()["schedulers"][0]["prefill_tokens_computed"]
            .as_u64()
            .expect("counter")
    };
    // 100 prompt tokens: 6 full blocks of 16 can be shared.
    let prompt: Vec<u32> = (0..100).map(|i| 3000 + i).collect();
    let body = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0});
    let before = prefill(&d);
    let first = d.post("/v1/completions", &body);
    assert_eq!(first.status, 200, "{}", first.text());
    let after_first = prefill(&d);
    let second = d.post("/v1/completions", &body);
    assert_eq!(second.status, 200);
    let after_second = prefill(&d);
    assert_eq!(
        after_first - before,
        100,
        "the first request computes its whole prompt"
    );
    assert!(
        after_second - after_first <= 100 - 96,
        "the second computes only what the cached blocks do not cover: {}",
        after_second - after_first
    );
    assert_eq!(
        first.json()["choices"][0]["text"],
        second.json()["choices"][0]["text"],
        "same greedy text from the cache"
    );
    let stats = d.get("/stats").json();
    assert!(
        stats["schedulers"][0]["prefix_cache_hits"]
            .as_u64()
            .is_some_and(|h| h >= 96),
        "{stats}"
    );
    assert!(d.stop().success());
}

#[test]
fn auto_profile_picks_by_request_shape() {
    let d = Daemon::start(2, "[scheduler]\nauto_profile = true\n");
    let short = d.post(
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 4}),
    );
    assert_eq!(short.json()["gptossd"]["profile"], "latency_first");
    let long = d.post(
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 1500}),
    );
    assert_eq!(long.status, 200, "{}", long.text());
    assert_eq!(long.json()["gptossd"]["profile"], "quality_first");
    let named = d.post(
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 4, "profile": "balanced"}),
    );
    assert_eq!(named.json()["gptossd"]["profile"], "balanced");
    assert!(d.stop().success());
}

/// The sample lines of a Prometheus text exposition: (`name{labels}`, value).
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn sum(samples: &[(String, f64)], name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.split('{').next() == Some(name) && labels.iter().all(|l| s.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn client_errors_count_as_rejections_not_failures() {
    let d = Daemon::start(2, "");
    let post = |path: &str, body: &str, content_type: &str| {
        d.post_raw(path, body.as_bytes(), &[("content-type", content_type)])
    };
    let json_type = "application/json";
    let hello = r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}"#;
    let bad = [
        (
            post("/v1/chat/completions", "{\"messages\": [", json_type),
            400,
            "invalid_json",
        ),
        (
            post(
                "/v1/chat/completions",
                r#"{"messages": [{"role": "user", "content": "x"}], "temprature": 0.5}"#,
                json_type,
            ),
            400,
            "unknown_parameter",
        ),
        (
            post(
                "/v1/chat/completions",
                r#"{"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}"#,
                json_type,
            ),
            404,
            "model_not_found",
        ),
        (
            post("/v1/chat/completions", hello, "text/plain"),
            415,
            "unsupported_media_type",
        ),
        (
            post(
                "/v1/completions",
                r#"{"prompt": "a"}"#,
                "application/x-www-form-urlencoded",
            ),
            415,
            "unsupported_media_type",
        ),
        (
            post(
                "/v1/completions",
                r#"{"prompt": "a", "min_p": 0.1}"#,
                json_type,
            ),
            400,
            "unsupported_parameter",
        ),
        (
            post(
                "/v1/completions",
                r#"{"prompt": "a", "max_tokens": 0}"#,
                json_type,
            ),
            400,
            "invalid_value",
        ),
    ];
    for (r, status, code) in &bad {
        assert_eq!(r.status, *status, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], *code, "{}", r.text());
    }
    let unknown = bad[1].0.json();
    assert_eq!(
        unknown["error"]["message"],
        "Unrecognized request argument supplied: temprature"
    );
    assert_eq!(unknown["error"]["param"], "temprature");

    // Other servers' extension fields are accepted, and so is a body with no Content-Type.
    let good = d.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "user": "u",
                "metadata": {"k": "v"}, "top_k": 5, "min_p": 0, "repetition_penalty": 1,
                "chat_template_kwargs": {}, "parallel_tool_calls": false}),
    );
    assert_eq!(good.status, 200, "{}", good.text());
    let untyped = common::daemon::raw_exchange(
        d.port,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{hello}",
            hello.len()
        )
        .as_bytes(),
        Duration::from_secs(60),
    );
    let untyped = common::daemon::parse_response(&untyped);
    assert_eq!(untyped.status, 200, "{}", untyped.text());

    let text = d.get("/metrics").text();
    let m = samples(&text);
    assert_eq!(sum(&m, "gptossd_request_failure_total", &[]), 0.0, "{text}");
    assert_eq!(
        sum(&m, "gptossd_request_rejected_total", &[]),
        bad.len() as f64,
        "{text}"
    );
    let not_found = ["code=\"model_not_found\""];
    assert_eq!(sum(&m, "gptossd_request_rejected_total", &not_found), 1.0);
    assert_eq!(
        sum(
            &m,
            "gptossd_request_rejected_total",
            &[not_found[0], "model=\"unknown\""]
        ),
        1.0,
        "an unknown model is not the default one: {text}"
    );
    assert_eq!(
        sum(
            &m,
            "gptossd_request_success_total",
            &["model=\"gpt-oss-20b\""]
        ),
        2.0
    );
    for stage in ["0", "1"] {
        let ready = [
            "model=\"gpt-oss-20b\"",
            &format!("stage=\"{stage}\""),
            "state=\"ready\"",
        ];
        let busy = [ready[0], ready[1], "state=\"busy\""];
        let current =
            sum(&m, "gptossd_stage_state", &ready) + sum(&m, "gptossd_stage_state", &busy);
        assert_eq!(current, 1.0, "stage {stage}: {text}");
        assert_eq!(
            sum(&m, "gptossd_stage_state", &ready[..2]),
            1.0,
            "one state at a time"
        );
    }

    let stats = d.get("/stats").json();
    let series = stats["series"].as_array().expect("series");
    assert!(
        series.iter().all(|s| s["requests"]["failed"] == 0),
        "{stats}"
    );
    assert_eq!(
        series
            .iter()
            .map(|s| s["requests"]["finished"].as_u64().unwrap_or(0))
            .sum::<u64>(),
        2
    );
    assert_eq!(stats["rejected"]["total"], bad.len(), "{stats}");
    let unknown = stats["rejected"]["series"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["model"] == "unknown"))
        .expect("rejections of no served model");
    assert_eq!(unknown["by_code"]["model_not_found"], 1, "{stats}");
    assert!(stats["rejected"]["series"]
        .as_array()
        .is_some_and(|a| a.iter().all(|s| s["model"] == "unknown")));
    assert!(d.stop().success());
}

#[track_caller]
fn assert_json_error(raw: &[u8], status: u16, code: &str) {
    let r = common::daemon::parse_response(raw);
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(raw));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    let e = &body["error"];
    assert_eq!(e["code"], code, "{body}");
    assert!(e["message"].is_string() && e["type"].is_string(), "{body}");
    assert!(
        e.as_object().is_some_and(|o| o.contains_key("param")),
        "{body}"
    );
}

#[test]
fn errors_hyper_answers_by_itself_have_openai_bodies() {
    let d = Daemon::start(1, "");
    let limit = Duration::from_secs(20);
    let control_byte = b"GET /health HTTP/1.1\r\nhost: x\r\nx-foo: a\x01b\r\n\r\n";
    let raw = common::daemon::raw_exchange(d.port, control_byte, limit);
    assert_json_error(&raw, 400, "malformed_request");

    let mut many = String::from("GET /health HTTP/1.1\r\nhost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let raw = common::daemon::raw_exchange(d.port, many.as_bytes(), limit);
    assert_json_error(&raw, 431, "request_header_fields_too_large");

    // A head that stops halfway: a 408 once the header timeout (2 s here) has passed.
    let t = Instant::now();
    let slow = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ";
    let raw = common::daemon::raw_exchange(d.port, slow, limit);
    assert_json_error(&raw, 408, "request_timeout");
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );

    // The server goes on serving.
    assert_eq!(d.post("/v1/chat/completions", &chat(2)).status, 200);
    assert!(d.stop().success());
}

// ---------------------------------------------------------------------------------------------
// The response cache, deadlines and the access log

/// The choices of a streamed chat answer, joined as a whole answer joins them: content, token
/// ids and logprobs; with the stream's `gptossd` object.
fn fold_chat_stream(r: &HttpResponse) -> (Value, Value) {
    assert_well_formed_stream(r);
    let frames = r.sse_data();
    let (mut content, mut ids, mut logprobs) = (String::new(), Vec::new(), Vec::new());
    let (mut finish, mut meta) = (Value::Null, Value::Null);
    for frame in &frames[..frames.len() - 1] {
        let chunk: Value = serde_json::from_str(frame).expect("chunk");
        let choice = &chunk["choices"][0];
        content += choice["delta"]["content"].as_str().unwrap_or_default();
        ids.extend(choice["token_ids"].as_array().cloned().unwrap_or_default());
        logprobs.extend(
            choice["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
            meta = chunk["gptossd"].clone();
        }
    }
    let folded = json!({"content": content, "token_ids": ids, "logprobs": logprobs, "finish_reason": finish});
    (folded, meta)
}

/// The same parts of a whole chat answer's one choice.
fn chat_choice_parts(body: &Value) -> Value {
    let c = &body["choices"][0];
    json!({
        "content": c["message"]["content"],
        "token_ids": c["token_ids"],
        "logprobs": c["logprobs"]["content"],
        "finish_reason": c["finish_reason"],
    })
}

/// The cache's hits and misses in `/metrics` for the test model.
fn cache_counts(d: &Daemon) -> (f64, f64) {
    let text = d.get("/metrics").text();
    let s = samples(&text);
    let model = "model=\"gpt-oss-20b\"";
    (
        sum(&s, "gptossd_response_cache_hits_total", &[model]),
        sum(&s, "gptossd_response_cache_misses_total", &[model]),
    )
}

#[test]
fn a_cached_answer_is_byte_for_byte_what_the_pipeline_generates() {
    let d = Daemon::start(1, "");
    // Reasoning effort named, so that both profiles render the same prompt.
    let request = |profile: &str| {
        json!({"messages": [{"role": "user", "content": "Tell me about caches"}],
               "profile": profile, "reasoning_effort": "low", "max_tokens": 24,
               "temperature": 0, "logprobs": true, "top_logprobs": 3,
               "return_token_ids": true})
    };
    let first = d.post("/v1/chat/completions", &request("latency_first"));
    assert_eq!(first.status, 200, "{}", first.text());
    let first = first.json();
    assert_eq!(first["gptossd"]["cached"], false);
    assert_eq!(cache_counts(&d), (0.0, 1.0));

    let again = d
        .post("/v1/chat/completions", &request("latency_first"))
        .json();
    assert_eq!(again["gptossd"]["cached"], true, "{again}");
    assert_eq!(
        again["choices"].to_string(),
        first["choices"].to_string(),
        "a hit gives the same choices, byte for byte"
    );
    assert_eq!(again["usage"], first["usage"]);
    assert_ne!(again["id"], first["id"]);
    assert_eq!(cache_counts(&d), (1.0, 1.0));

    let mut streamed = request("latency_first");
    streamed["stream"] = json!(true);
    let (folded, meta) = fold_chat_stream(&d.post("/v1/chat/completions", &streamed));
    assert_eq!(meta["cached"], true);
    assert_eq!(
        folded,
        chat_choice_parts(&first),
        "a streamed hit says the same"
    );
    assert_eq!(cache_counts(&d), (2.0, 1.0));

    // What the pipeline generates for it now, on a profile without the cache (twice, never
    // cached), is what the cache gave.
    for _ in 0..2 {
        let fresh = d.post("/v1/chat/completions", &request("balanced")).json();
        assert_eq!(fresh["gptossd"]["cached"], false);
        assert_eq!(fresh["choices"].to_string(), first["choices"].to_string());
    }
    assert_eq!(
        cache_counts(&d),
        (2.0, 1.0),
        "balanced never looks the cache up"
    );
    let stats = d.get("/stats").json();
    let rc = &stats["response_cache"];
    assert_eq!(
        (&rc["hits"], &rc["misses"], &rc["entries"]),
        (&json!(2), &json!(1), &json!(1))
    );
    assert!(rc["bytes"].as_u64().is_some_and(|b| b > 24 * 8), "{rc}");
    assert!(d.stop().success());
}

#[test]
fn a_seeded_sample_is_cached_and_an_unseeded_one_is_not() {
    let d = Daemon::start(1, "");
    let body = |seed: Option<u64>| {
        let mut b = json!({"prompt": [1, 2, 3, 4], "max_tokens": 16, "temperature": 1.0,
                           "profile": "latency_first", "return_token_ids": true});
        if let Some(seed) = seed {
            b["seed"] = json!(seed);
        }
        b
    };
    let first = d.post("/v1/completions", &body(Some(42))).json();
    let second = d.post("/v1/completions", &body(Some(42))).json();
    assert_eq!(
        (&first["gptossd"]["cached"], &second["gptossd"]["cached"]),
        (&json!(false), &json!(true))
    );
    assert_eq!(second["choices"].to_string(), first["choices"].to_string());
    // Another seed is another request.
    let other = d.post("/v1/completions", &body(Some(43))).json();
    assert_eq!(other["gptossd"]["cached"], false);
    for _ in 0..2 {
        let unseeded = d.post("/v1/completions", &body(None)).json();
        assert_eq!(
            unseeded["gptossd"]["cached"], false,
            "a fresh sample each time"
        );
    }
    assert_eq!(
        cache_counts(&d),
        (1.0, 2.0),
        "unseeded samples are not looked up"
    );
    assert!(d.stop().success());
}

#[test]
fn a_request_past_its_deadline_is_cancelled_with_a_504_or_an_error_event() {
    let d = Daemon::start(
        1,
        "[profiles.balanced]\ntimeout_ceiling_secs = 1\nmax_new_tokens = 4000\n",
    );
    // A short request finishes well within its deadline, which it is told.
    let short = d.post("/v1/chat/completions", &chat(2));
    assert_eq!(short.status, 200, "{}", short.text());
    assert_eq!(short.json()["gptossd"]["deadline_ms"], 1000);

    // 4000 tokens take the tiny model several seconds: past the 1 s ceiling.
    let long =
        json!({"prompt": [1, 2, 3], "max_tokens": 4000, "temperature": 0, "ignore_eos": true});
    let t = Instant::now();
    let whole = d.post("/v1/completions", &long);
    let took = t.elapsed();
    assert_eq!(whole.status, 504, "{}", whole.text());
    let error = &whole.json()["error"];
    assert_eq!(
        (&error["type"], &error["code"]),
        (&json!("timeout_error"), &json!("deadline_exceeded"))
    );
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("1000 ms")),
        "{error}"
    );
    assert!(whole.header("x-request-id").is_some());
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(10),
        "{took:?}"
    );

    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let r = d.post("/v1/completions", &streamed);
    assert_eq!(r.status, 200, "a stream's status went out first");
    let frames = r.sse_data();
    assert!(
        frames.len() > 2,
        "tokens came before the deadline: {frames:?}"
    );
    assert!(!frames.contains(&"[DONE]".to_string()), "{frames:?}");
    let last: Value = serde_json::from_str(frames.last().expect("frames")).expect("error event");
    assert_eq!(last["error"]["code"], "deadline_exceeded", "{last}");

    // Both sequences were cancelled and their KV blocks freed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = d.get("/health").json()["models"][0]["scheduler"].clone();
        if s["running"] == 0 && s["waiting"] == 0 && s["kv_blocks_in_use"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not freed after the timeout: {s}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = d.get("/metrics").text();
    let failures = sum(
        &samples(&text),
        "gptossd_request_failure_total",
        &["reason=\"timeout\"", "profile=\"balanced\""],
    );
    assert_eq!(failures, 2.0, "{text}");

    // latency_first keeps its 600 s ceiling until 8 of its requests have finished; then its
    // deadline follows its pace: 30 s queue + 30 s TTFT budgets + 4 × p95 × 2, far below 600 s.
    let paced = json!({"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": true, "profile": "latency_first"});
    for _ in 0..8 {
        let r = d.post("/v1/completions", &paced).json();
        assert_eq!(r["gptossd"]["deadline_ms"], 600_000, "{r}");
    }
    let r = d.post("/v1/completions", &paced).json();
    let ms = r["gptossd"]["deadline_ms"].as_u64().expect("deadline_ms");
    assert!((60_000..61_000).contains(&ms), "{ms}");
    assert!(d.stop().success());
}

/// The daemon's access-log lines, once there are `n` of them (within 10 s).
fn access_lines(d: &Daemon, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<String> = d
            .log()
            .lines()
            .filter(|l| l.contains(" gptossd::access: "))
            .map(str::to_string)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_request_gets_exactly_one_access_record_with_its_id_and_status() {
    let d = Daemon::start(1, "");
    let whole = d.post("/v1/chat/completions", &chat(3));
    let mut stream = json!({"prompt": [1, 2, 3], "max_tokens": 3, "stream": true});
    let streamed = d.post("/v1/completions", &stream);
    stream["max_tokens"] = json!(0);
    let bad = d.post("/v1/completions", &stream);
    let mut unknown = chat(3);
    unknown["model"] = json!("gpt-5");
    let missing = d.post("/v1/chat/completions", &unknown);
    let expected = [
        (&whole, 200, "/v1/chat/completions", "finish_reason="),
        (&streamed, 200, "/v1/completions", "finish_reason="),
        (&bad, 400, "/v1/completions", "error=invalid_value"),
        (
            &missing,
            404,
            "/v1/chat/completions",
            "error=model_not_found",
        ),
    ];
    let lines = access_lines(&d, expected.len());
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
    for (r, status, route, outcome) in expected {
        assert_eq!(r.status, status, "{}", r.text());
        let id = r.header("x-request-id").expect("x-request-id");
        let id_field = format!("request_id={id}");
        let mine: Vec<&String> = lines
            .iter()
            .filter(|l| l.split_whitespace().any(|w| w == id_field))
            .collect();
        assert_eq!(mine.len(), 1, "one record for {id}: {lines:#?}");
        let fields: Vec<&str> = mine[0].split_whitespace().collect();
        for field in [
            format!("status={status}"),
            "method=POST".into(),
            format!("route={route}"),
        ] {
            assert!(fields.contains(&field.as_str()), "{field} in {}", mine[0]);
        }
        assert!(mine[0].contains(outcome), "{outcome} in {}", mine[0]);
        for name in [
            "model=",
            "profile=",
            "duration_ms=",
            "cancelled=",
            "cached=",
        ] {
            assert!(mine[0].contains(name), "{name} in {}", mine[0]);
        }
    }
    assert!(lines[0].contains("model=gpt-oss-20b") && lines[0].contains("completion_tokens=3"));
    assert!(d.stop().success());
}
