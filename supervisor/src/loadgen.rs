//! `gptossd loadgen`: a load generator for a running daemon. For each concurrency level C, C
//! client threads send streaming chat completions back to back until `--requests` have been
//! sent in total; it prints requests/s, the success rate, time to first token (p50, p95) and
//! end-to-end latency (p95). A request succeeds when it answers 200 and its stream ends with
//! `data: [DONE]`. Time to first token is the arrival of the first data chunk that carries
//! generated text (for chat, the first after the role chunk).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

#[derive(Args, Debug)]
pub struct LoadgenArgs {
    /// host:port of the daemon.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    #[arg(long, default_value = "Write a short story about a lighthouse.")]
    pub prompt: String,
    /// `chat` (harmony-rendered chat completions) or `completions` (raw text). With a random
    /// test model, use `completions`: its output has no harmony headers, so the chat parser
    /// holds text back while it waits for one, which delays the first content chunk.
    #[arg(long, default_value = "chat")]
    pub endpoint: String,
}

struct Sample {
    ok: bool,
    ttft: Option<Duration>,
    e2e: Duration,
}

fn one_request(addr: &str, path: &str, body: &str, first_token_frame: usize) -> Sample {
    let start = Instant::now();
    let fail = |start: Instant| Sample {
        ok: false,
        ttft: None,
        e2e: start.elapsed(),
    };
    let Ok(mut s) = TcpStream::connect(addr) else {
        return fail(start);
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(600)));
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body.as_bytes()))
        .is_err()
    {
        return fail(start);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut ttft = None;
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if ttft.is_none() && count(&buf, b"data: ") >= first_token_frame {
                    ttft = Some(start.elapsed());
                }
            }
            Err(_) => return fail(start),
        }
    }
    let ok = buf.starts_with(b"HTTP/1.1 200") && count(&buf, b"data: [DONE]") == 1;
    Sample {
        ok,
        ttft,
        e2e: start.elapsed(),
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn percentile(sorted: &[Duration], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1e3)
}

pub fn run(args: &LoadgenArgs) -> anyhow::Result<()> {
    let (path, body) = match args.endpoint.as_str() {
        "chat" => (
            "/v1/chat/completions",
            serde_json::json!({
                "messages": [{"role": "user", "content": args.prompt}],
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "stream": true,
            }),
        ),
        "completions" => (
            "/v1/completions",
            serde_json::json!({
                "prompt": args.prompt,
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "stream": true,
            }),
        ),
        other => anyhow::bail!("--endpoint {other:?}: expected chat or completions"),
    };
    let body = body.to_string();
    TcpStream::connect(&args.addr).with_context(|| format!("connecting to {}", args.addr))?;
    for &c in &args.concurrency {
        let left = Arc::new(AtomicUsize::new(args.requests));
        let samples = Arc::new(Mutex::new(Vec::with_capacity(args.requests)));
        let start = Instant::now();
        let threads: Vec<_> = (0..c.max(1))
            .map(|_| {
                let (left, samples, addr, body) = (
                    left.clone(),
                    samples.clone(),
                    args.addr.clone(),
                    body.clone(),
                );
                let path = path.to_string();
                // Chat streams open with a role chunk; completions start with the first token.
                let first_frame = if path.contains("chat") { 2 } else { 1 };
                std::thread::spawn(move || {
                    while left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        let s = one_request(&addr, &path, &body, first_frame);
                        if let Ok(mut v) = samples.lock() {
                            v.push(s);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
        let wall = start.elapsed().as_secs_f64();
        let samples: Vec<Sample> = samples
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
        let mut ttft: Vec<Duration> = ok.iter().filter_map(|s| s.ttft).collect();
        let mut e2e: Vec<Duration> = ok.iter().map(|s| s.e2e).collect();
        ttft.sort();
        e2e.sort();
        let out = serde_json::json!({
            "concurrency": c,
            "requests": samples.len(),
            "succeeded": ok.len(),
            "success_rate": ok.len() as f64 / samples.len().max(1) as f64,
            "requests_per_s": samples.len() as f64 / wall,
            "ttft_p50_ms": percentile(&ttft, 50.0),
            "ttft_p95_ms": percentile(&ttft, 95.0),
            "e2e_p95_ms": percentile(&e2e, 95.0),
            "max_tokens": args.max_tokens,
            "endpoint": args.endpoint,
        });
        println!("{out}");
    }
    Ok(())
}
