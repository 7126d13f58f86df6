//! A real `gptossd serve` for the API tests: started on a free port with its own config file
//! and control socket, stopped (SIGTERM, then checked for leftovers) when dropped. Plus a small
//! HTTP/1.1 client over std sockets, so the tests see exactly the bytes on the wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{assert_nothing_left, gptossd, private_model, signal};

/// A running daemon.
pub struct Daemon {
    pub child: Option<Child>,
    pub port: u16,
    pub control: PathBuf,
    pub model: PathBuf,
    pub stderr: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
    _model_view: tempfile::TempDir,
}

impl Daemon {
    /// Starts `gptossd serve` on the tiny model with `stages` stages and extra TOML appended to
    /// its config file; waits until `/health` says it serves.
    pub fn start(stages: usize, extra_toml: &str) -> Daemon {
        Self::start_with(stages, "", extra_toml, &[])
    }

    /// `server_toml` goes into the `[server]` table, `extra_toml` after the model entry (so a
    /// bare key there belongs to the model).
    pub fn start_with(
        stages: usize,
        server_toml: &str,
        extra_toml: &str,
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("control.sock");
        let view = private_model();
        let model = view.path().to_path_buf();
        let config = format!(
            "[server]\nport = 1\ncontrol_socket = {:?}\nrequest_timeout_secs = 2\n{server_toml}\n\n[[models]]\nname = \"gpt-oss-20b\"\npath = {:?}\nstages = {stages}\nthreads_per_stage = 1\n{extra_toml}\n",
            control.to_string_lossy(),
            model.to_string_lossy(),
        );
        let config_path = dir.path().join("gptossd.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = Command::new(gptossd());
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--port", "0"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env_remove("GPTOSSD_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn gptossd serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        {
            let pipe = child.stderr.take().expect("stderr");
            let log = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        if let Some(port) = rest
                            .rsplit(':')
                            .next()
                            .and_then(|p| p.trim().parse::<u16>().ok())
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
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "gptossd serve did not report its port:\n{}",
                    stderr.lock().map(|s| s.clone()).unwrap_or_default()
                )
            });
        let d = Daemon {
            child: Some(child),
            port,
            control,
            model,
            stderr,
            _dir: dir,
            _model_view: view,
        };
        d.wait_health(200, Duration::from_secs(60));
        d
    }

    pub fn log(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until `/health` answers `status`.
    pub fn wait_health(&self, status: u16, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(r) = try_request(self.port, "GET", "/health", None, &[]) {
                if r.status == status {
                    return r.json();
                }
            }
            assert!(
                Instant::now() < deadline,
                "/health never answered {status}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        request(self.port, "GET", path, None, &[])
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> HttpResponse {
        request(
            self.port,
            "POST",
            path,
            Some(body.to_string().as_bytes()),
            &[],
        )
    }

    pub fn post_raw(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> HttpResponse {
        request(self.port, "POST", path, Some(body), headers)
    }

    /// A request on the control socket.
    pub fn control(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> HttpResponse {
        let mut s = UnixStream::connect(&self.control).expect("connect control socket");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        parse_response(&raw)
    }

    /// SIGTERM and wait for the exit status; then nothing may be left.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not stop after SIGTERM\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_nothing_left(&self.model_dir());
        assert!(
            !self.control.exists(),
            "control socket left behind ({status})\n{}",
            self.log()
        );
        status
    }

    fn model_dir(&self) -> PathBuf {
        self.model.clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|frame| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .map(str::to_string)
            })
            .collect()
    }
}

pub fn request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> HttpResponse {
    try_request(port, method, path, body, headers)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

pub fn try_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        head.push_str("content-type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(parse_response(&raw))
}

/// Sends `bytes` exactly as given on a new connection, then reads until the server closes it
/// (or `limit` passes): for requests the client above cannot write, such as broken ones.
pub fn raw_exchange(port: u16, bytes: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(limit)).expect("read timeout");
    s.write_all(bytes).expect("write");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    raw
}

/// Parses a whole HTTP/1.1 response (content-length or chunked).
pub fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// Path of a file in `tests/`.
pub fn tests_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests"))
}
