//! The dashboard, end to end: the real `gptossd serve` on the tiny model, and — for the page
//! itself — Debian's headless Chromium driven over the DevTools protocol (a websocket, spoken
//! here with `tungstenite`). The browser test is ignored by default because a fresh machine has
//! no Chromium; `.ci/run` installs it and runs `cargo test -p gptossd --test dashboard --
//! --ignored`. Its screenshots (1280×800 and 390 px wide) go to `target/tmp/dashboard/`; set
//! `GPTOSSD_DASHBOARD_SCREENSHOT=$PWD/docs/dashboard.png` to also copy the 1280×800 one there
//! (how the README's picture is made).

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::daemon::Daemon;
use common::{signal, stage_workers, wait_for_workers};
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long the page may take to show a change (it polls every 2 s; CI machines are slow).
const PAGE_LIMIT: Duration = Duration::from_secs(30);

fn chat_body() -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
}

/// Sends one chat request; it must succeed.
fn chat(d: &Daemon) {
    let r = d.post_raw(
        "/v1/chat/completions",
        chat_body().to_string().as_bytes(),
        &[("content-type", "application/json")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The sum of `requests.total` over every profile's series of a `/dashboard/data` snapshot.
fn requests_total(snapshot: &Value) -> u64 {
    snapshot["profiles"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["series"].as_array().into_iter().flatten())
        .map(|s| s["requests"]["total"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn the_page_its_assets_and_its_data_come_from_the_daemon_itself() {
    let d = Daemon::start(2, "");
    let workers = wait_for_workers(&d.model, 2, Duration::from_secs(10));

    let page = d.get("/dashboard");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let policy = page.header("content-security-policy").unwrap_or_default();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    assert!(page.text().contains("/dashboard/app.js"));
    for (path, kind) in [
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        let r = d.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type")
                .unwrap_or_default()
                .starts_with(kind),
            "{path}: {:?}",
            r.header("content-type")
        );
    }
    let missing = d.get("/dashboard/secrets");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "not_found");

    let data = d.get("/dashboard/data");
    assert_eq!(data.status, 200);
    assert_eq!(data.header("cache-control"), Some("no-store"));
    let snap = data.json();
    assert_eq!(snap["version"], 1);
    assert_eq!(snap["health"]["status"], "healthy");
    let model = &snap["models"][0];
    assert_eq!(model["name"], "gpt-oss-20b");
    let mut shown: Vec<u64> = model["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["pid"].as_u64().expect("a running stage has a pid"))
        .collect();
    let mut running: Vec<u64> = workers.iter().map(|&(pid, _)| u64::from(pid)).collect();
    shown.sort_unstable();
    running.sort_unstable();
    assert_eq!(shown, running);
    let names: Vec<&str> = snap["profiles"]
        .as_array()
        .expect("profiles")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["latency_first", "balanced", "quality_first"]);

    let before = requests_total(&snap);
    chat(&d);
    chat(&d);
    let after = d.get("/dashboard/data").json();
    assert_eq!(requests_total(&after), before + 2);
    let balanced = &after["profiles"][1];
    assert_eq!(balanced["name"], "balanced");
    assert!(balanced["series"][0]["ttft_ms"]["p95"].as_f64().is_some());
    assert!(after["models"][0]["tokens_computed"]["decode"].as_u64() > Some(0));
    assert!(d.stop().success());
}

/// A headless Chromium and one page in it, over the DevTools protocol.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    /// The page's session (flattened sessions share the browser's websocket).
    session: Option<String>,
    next_id: u64,
    /// Every event received so far, in order.
    events: Vec<Value>,
    stderr: Arc<Mutex<String>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromium` headless and connects to its DevTools websocket (the URL it prints on
    /// stderr).
    fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run chromium (Debian's package: apt-get install chromium)");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        {
            let pipe = child.stderr.take().expect("stderr");
            let log = stderr.clone();
            // Keeps reading to the end, so that Chromium never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Some(url) = line.split("DevTools listening on ").nth(1) {
                        let _ = url_tx.send(url.trim().to_string());
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        let url = url_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "chromium did not print its DevTools URL:\n{}",
                    stderr.lock().map(|s| s.clone()).unwrap_or_default()
                )
            });
        let (ws, _) = tungstenite::connect(url.as_str()).expect("connect to DevTools");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("read timeout");
        }
        Browser {
            child,
            ws,
            session: None,
            next_id: 1,
            events: Vec::new(),
            stderr,
            _profile: profile,
        }
    }

    /// Sends a command (to the page once one is open) and waits for its result; events that
    /// arrive meanwhile are kept.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            msg["sessionId"] = json!(session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("send {method}: {e}"));
        loop {
            let v = self.receive(method);
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// The next message from Chromium (`waiting_for` names what for, should none come).
    fn receive(&mut self, waiting_for: &str) -> Value {
        loop {
            let frame = self
                .ws
                .read()
                .unwrap_or_else(|e| panic!("nothing came for {waiting_for}: {e}\n{}", self.log()));
            if let Message::Text(text) = frame {
                return serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            }
        }
    }

    /// The first event named `method` at or after `events[from]`, waiting for it if need be.
    fn event(&mut self, method: &str, from: usize) -> Value {
        loop {
            if let Some(e) = self.events[from..].iter().find(|e| e["method"] == method) {
                return e.clone();
            }
            let v = self.receive(method);
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Lets the page's next poll of `/dashboard/data` through with `edit` applied to the
    /// snapshot, and holds back the polls after it (so the edited snapshot stays on the page).
    fn edit_next_snapshot(&mut self, edit: impl FnOnce(&mut Value)) {
        let from = self.events.len();
        self.call(
            "Fetch.enable",
            json!({"patterns": [{"urlPattern": "*/dashboard/data", "requestStage": "Response"}]}),
        );
        let paused = self.event("Fetch.requestPaused", from);
        let request = paused["params"]["requestId"].clone();
        let body = self.call("Fetch.getResponseBody", json!({"requestId": request}));
        let text = body["body"].as_str().expect("a body");
        let mut snapshot: Value = if body["base64Encoded"] == true {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .expect("base64");
            serde_json::from_slice(&bytes).expect("a JSON snapshot")
        } else {
            serde_json::from_str(text).expect("a JSON snapshot")
        };
        edit(&mut snapshot);
        let encoded = base64::engine::general_purpose::STANDARD.encode(snapshot.to_string());
        self.call(
            "Fetch.fulfillRequest",
            json!({
                "requestId": request,
                "responseCode": 200,
                "responseHeaders": [{"name": "content-type", "value": "application/json"}],
                "body": encoded,
            }),
        );
    }

    fn log(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Opens a new tab at `size`, with console, log and network events on, and loads `url`.
    fn open(&mut self, url: &str, size: (u32, u32)) {
        let target = self.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].clone();
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        let session = attached["sessionId"].as_str().expect("sessionId");
        self.session = Some(session.to_string());
        for domain in ["Page", "Runtime", "Log", "Network"] {
            self.call(&format!("{domain}.enable"), json!({}));
        }
        self.resize(size, false);
        let nav = self.call("Page.navigate", json!({"url": url}));
        assert!(nav.get("errorText").is_none(), "navigate: {nav}");
    }

    fn resize(&mut self, (width, height): (u32, u32), mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        );
    }

    /// Evaluates `expression` in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression} threw: {r}"
        );
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until `ok` holds for its value; returns that value.
    fn wait_for(&mut self, what: &str, expression: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PAGE_LIMIT;
        loop {
            let v = self.eval(expression);
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}: last {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A PNG of the viewport.
    fn screenshot(&mut self, path: &Path) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Everything the page reported as an error: console errors, uncaught exceptions, log
    /// entries at level error (failed loads, CSP violations).
    fn page_errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| match e["method"].as_str() {
                Some("Runtime.consoleAPICalled") => {
                    matches!(e["params"]["type"].as_str(), Some("error" | "assert"))
                }
                Some("Runtime.exceptionThrown") => true,
                Some("Log.entryAdded") => e["params"]["entry"]["level"] == "error",
                _ => false,
            })
            .map(Value::to_string)
            .collect()
    }

    /// The URLs of every request the page made.
    fn requested_urls(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str().map(String::from))
            .collect()
    }

    /// How many times the page's main frame navigated.
    fn main_frame_navigations(&self) -> usize {
        self.events
            .iter()
            .filter(|e| e["method"] == "Page.frameNavigated")
            .filter(|e| e["params"]["frame"].get("parentId").is_none())
            .count()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of one cell (`td.{class}`) of stage `stage`'s row.
fn cell(stage: usize, class: &str) -> String {
    let row = format!("#models tr[data-model=\"gpt-oss-20b\"][data-stage=\"{stage}\"]");
    let query = format!("document.querySelector('{row} td.{class}')");
    format!("(() => {{ const c = {query}; return c && c.textContent; }})()")
}

#[test]
#[ignore = "needs Debian's chromium; .ci/run installs it and runs it"]
fn the_dashboard_shows_stages_requests_and_a_restart_live_in_chromium() {
    let d = Daemon::start(2, "");
    let workers = wait_for_workers(&d.model, 2, Duration::from_secs(10));
    let pid_of = |stage: usize| {
        workers
            .iter()
            .find(|&&(_, s)| s == stage)
            .map(|&(pid, _)| pid)
            .expect("a worker of each stage")
    };
    // Cargo's scratch folder for integration tests: the screenshots stay there to look at.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shots).expect("screenshot folder");
    let origin = format!("http://127.0.0.1:{}", d.port);
    let mut b = Browser::launch();
    b.open(&format!("{origin}/dashboard"), (1280, 800));

    // The stages of the running daemon, with their pids.
    for stage in [0, 1] {
        let want = pid_of(stage).to_string();
        b.wait_for(
            &format!("stage {stage} with pid {want}"),
            &cell(stage, "pid"),
            |v| v == &json!(want),
        );
    }
    // A mark that a reload would wipe.
    b.eval("window.gptossdTestMark = 'still the same page'");

    // The request counter follows requests.
    let counter = "document.getElementById('requests-total').textContent";
    let before = b.wait_for("a request count", counter, |v| {
        v.as_str().is_some_and(|s| s.parse::<u64>().is_ok())
    });
    let before: u64 = before.as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
    for _ in 0..3 {
        chat(&d);
    }
    let want = (before + 3).to_string();
    b.wait_for(&format!("{want} requests served"), counter, |v| {
        v == &json!(want)
    });

    // A stage killed with SIGKILL: its row shows the restart, the crash and the new pid.
    let victim = pid_of(1);
    signal(victim, libc::SIGKILL);
    b.wait_for("stage 1 restarted once", &cell(1, "restarts"), |v| {
        v == &json!("1")
    });
    let error = b.wait_for("stage 1's crash", &cell(1, "last-error"), |v| {
        v.as_str().is_some_and(|s| !s.is_empty() && s != "—")
    });
    let fresh = b.wait_for("stage 1's new worker", &cell(1, "pid"), |v| {
        v.as_str()
            .and_then(|s| s.parse::<u32>().ok())
            .is_some_and(|pid| pid != victim)
    });
    let fresh: u32 = fresh.as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(
        stage_workers(&d.model).contains(&(fresh, 1)),
        "the page's pid {fresh} is not stage 1's worker"
    );
    b.wait_for(
        "the restart among the recent errors",
        "[...document.querySelectorAll('#errors li[data-kind=\"stage\"]')]\
            .map(li => li.textContent).join('\\n')",
        |v| v.as_str().is_some_and(|s| s.contains("stage 1 restarted")),
    );
    b.wait_for("the stage ready again", &cell(1, "state"), |v| {
        v == &json!("ready")
    });

    // A little more traffic, so that the charts have something to show.
    for _ in 0..4 {
        chat(&d);
        std::thread::sleep(Duration::from_millis(600));
    }
    let want = (before + 7).to_string();
    b.wait_for(&format!("{want} requests served"), counter, |v| {
        v == &json!(want)
    });

    // All of it without a reload.
    assert_eq!(
        b.eval("window.gptossdTestMark"),
        json!("still the same page")
    );
    assert_eq!(b.main_frame_navigations(), 1, "the page reloaded");

    let laptop = shots.join("dashboard.png");
    b.screenshot(&laptop);
    if let Some(path) = std::env::var_os("GPTOSSD_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&laptop, PathBuf::from(path)).expect("copy the screenshot");
    }

    // A phone: one column, nothing wider than the screen.
    b.resize((390, 844), true);
    let overflow = b.wait_for(
        "the page laid out at 390 px",
        "[window.innerWidth, document.documentElement.scrollWidth]",
        |v| v[0] == json!(390),
    );
    assert!(
        overflow[1].as_u64() <= Some(390),
        "the page is wider than a phone: {overflow}"
    );
    b.screenshot(&shots.join("dashboard-phone.png"));

    // `slo` and `response_cache`: "—" while the daemon does not report them, shown when
    // present (here put into one snapshot on its way to the page).
    b.resize((1280, 800), false);
    let slo_text = "document.querySelector('[data-profile=\"balanced\"] .slo').textContent";
    let reported = d.get("/dashboard/data").json();
    if reported.get("slo").is_none() {
        assert_eq!(b.eval(slo_text), json!("SLO —"));
    }
    if reported.get("response_cache").is_none() {
        let tile = "document.getElementById('response-cache').textContent";
        assert_eq!(b.eval(tile), json!("—"));
    }
    let reason = "balanced: p95 time to first token 2450 ms over 2000 ms (37 requests in 300 s)";
    b.edit_next_snapshot(|snap| {
        snap["slo"] = json!({
            "latency_first": [],
            "balanced": [{"slo": "ttft_p95_ms", "reason": reason}],
            "quality_first": [],
        });
        snap["response_cache"] = json!({"hits": 3, "misses": 1});
    });
    b.wait_for("balanced in breach", slo_text, |v| {
        v == &json!("SLO breached")
    });
    assert_eq!(
        b.eval("document.querySelector('[data-profile=\"balanced\"] .breaches').textContent"),
        json!(reason)
    );
    assert_eq!(
        b.eval("document.querySelector('[data-profile=\"latency_first\"] .slo').textContent"),
        json!("SLO met")
    );
    assert_eq!(
        b.eval("document.getElementById('response-cache').textContent"),
        json!("75%")
    );

    let errors = b.page_errors();
    assert!(
        errors.is_empty(),
        "the page reported errors:\n{}",
        errors.join("\n")
    );
    let urls = b.requested_urls();
    assert!(
        urls.iter().any(|u| u.ends_with("/dashboard/data")),
        "{urls:?}"
    );
    for url in &urls {
        assert!(
            url.starts_with(&format!("{origin}/dashboard")) || url.starts_with("data:"),
            "the page requested {url}"
        );
    }
    assert!(
        error.as_str().is_some_and(|e| !e.is_empty()),
        "no last error shown"
    );
    eprintln!("screenshots in {}", shots.display());
    drop(b);
    assert!(d.stop().success());
}
