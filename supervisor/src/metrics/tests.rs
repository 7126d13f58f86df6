//! Tests of the metrics module: the Prometheus text is parsed back and its values checked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// One sample line of the exposition: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of a Prometheus 0.0.4 or OpenMetrics text exposition.
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name_end = line.find(['{', ' ']).expect("sample line has a name");
        let name = line[..name_end].to_owned();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            let mut key = String::new();
            loop {
                let (i, c) = chars.next().expect("label set is closed");
                match c {
                    '}' => {
                        rest = &body[i + 1..];
                        break;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'));
                        let mut value = String::new();
                        loop {
                            match chars.next().expect("label value is closed").1 {
                                '"' => break,
                                '\\' => match chars.next().expect("escape").1 {
                                    'n' => value.push('\n'),
                                    other => value.push(other),
                                },
                                other => value.push(other),
                            }
                        }
                        let dup = labels.insert(std::mem::take(&mut key), value);
                        assert!(dup.is_none(), "duplicate label in {line}");
                    }
                    other => key.push(other),
                }
            }
        }
        let value = rest.split_whitespace().next().expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The value of the one sample named `name` whose labels are exactly `pairs`.
fn value(samples: &[Sample], name: &str, pairs: &[(&str, &str)]) -> f64 {
    let want = labels(pairs);
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && s.labels == want)
        .collect();
    assert_eq!(found.len(), 1, "{name}{want:?}: found {found:?}");
    found[0].value
}

/// The cumulative count of the bucket `le` of histogram `name` for the series `pairs`.
fn bucket(samples: &[Sample], name: &str, pairs: &[(&str, &str)], le: f64) -> f64 {
    let want = labels(pairs);
    let bucket_name = format!("{name}_bucket");
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            let mut l = s.labels.clone();
            let bound = l
                .remove("le")
                .map(|v| v.parse::<f64>().expect("le is a number"));
            s.name == bucket_name && l == want && bound == Some(le)
        })
        .collect();
    assert_eq!(found.len(), 1, "{bucket_name}{want:?} le={le}: {found:?}");
    found[0].value
}

fn series(profile: &str) -> Labels {
    Labels {
        engine: "gptossd-pipeline".into(),
        model: "gpt-oss-20b".into(),
        profile: profile.into(),
    }
}

fn series_pairs(profile: &str) -> [(&'static str, &str); 3] {
    [
        ("engine", "gptossd-pipeline"),
        ("model", "gpt-oss-20b"),
        ("profile", profile),
    ]
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn finished(profile: &str, reason: &str) -> RequestRecord {
    RequestRecord {
        labels: series(profile),
        outcome: Outcome::Finished {
            reason: reason.into(),
        },
        prompt_tokens: 10,
        generation_tokens: 4,
        queue_time: Some(ms(2)),
        ttft: Some(ms(3)),
        inter_token: vec![ms(20), ms(20), ms(300)],
        e2e: ms(400),
        prefill_time: Some(ms(1)),
        decode_time: Some(ms(340)),
        fallback: false,
    }
}

#[test]
fn records_show_up_in_prometheus_text_with_names_labels_and_buckets() {
    let m = Metrics::new();
    m.record(&finished("default", "stop"));
    m.record(&RequestRecord {
        outcome: Outcome::Finished {
            reason: "length".into(),
        },
        prompt_tokens: 7,
        generation_tokens: 2,
        ttft: Some(ms(50)),
        inter_token: vec![ms(5)],
        e2e: ms(1200),
        fallback: true,
        ..finished("default", "stop")
    });
    // A failure while running: counted, tokens kept, latencies not observed.
    m.record(&RequestRecord {
        outcome: Outcome::Error {
            reason: "internal".into(),
        },
        prompt_tokens: 5,
        generation_tokens: 0,
        inter_token: Vec::new(),
        ..finished("default", "stop")
    });

    let text = m.render_prometheus();
    let s = parse(&text);
    let l = series_pairs("default");
    let with = |extra: (&'static str, &'static str)| {
        let mut v = l.to_vec();
        v.push(extra);
        v
    };

    assert!(
        text.contains("# TYPE gptossd_prompt_tokens_total counter\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE gptossd_time_to_first_token_seconds histogram\n"));
    assert_eq!(value(&s, "gptossd_prompt_tokens_total", &l), 22.0);
    assert_eq!(value(&s, "gptossd_generation_tokens_total", &l), 6.0);
    assert_eq!(value(&s, "gptossd_profile_fallbacks_total", &l), 1.0);
    let success = "gptossd_request_success_total";
    assert_eq!(value(&s, success, &with(("finished_reason", "stop"))), 1.0);
    assert_eq!(
        value(&s, success, &with(("finished_reason", "length"))),
        1.0
    );
    let failure = "gptossd_request_failure_total";
    assert_eq!(value(&s, failure, &with(("reason", "internal"))), 1.0);

    // TTFT: 3 ms and 50 ms.
    let ttft = "gptossd_time_to_first_token_seconds";
    for (le, want) in [
        (0.001, 0.0),
        (0.005, 1.0),
        (0.04, 1.0),
        (0.06, 2.0),
        (2560.0, 2.0),
    ] {
        assert_eq!(bucket(&s, ttft, &l, le), want, "ttft le={le}");
    }
    assert_eq!(bucket(&s, ttft, &l, f64::INFINITY), 2.0);
    assert_eq!(value(&s, &format!("{ttft}_count"), &l), 2.0);
    assert!((value(&s, &format!("{ttft}_sum"), &l) - 0.053).abs() < 1e-9);
    let ttft_buckets = s
        .iter()
        .filter(|x| x.name == format!("{ttft}_bucket"))
        .count();
    assert_eq!(
        ttft_buckets,
        TTFT_BUCKETS.len() + 1,
        "every bucket and +Inf"
    );

    // Inter-token: 20, 20, 300 ms and 5 ms, one observation per gap.
    let itl = "gptossd_inter_token_latency_seconds";
    assert_eq!(value(&s, &format!("{itl}_count"), &l), 4.0);
    for (le, want) in [
        (0.0025, 0.0),
        (0.005, 1.0),
        (0.025, 3.0),
        (0.2, 3.0),
        (0.3, 4.0),
    ] {
        assert_eq!(bucket(&s, itl, &l, le), want, "itl le={le}");
    }

    // End to end: 400 ms and 1.2 s; the failed request is not observed.
    let e2e = "gptossd_e2e_request_latency_seconds";
    assert_eq!(value(&s, &format!("{e2e}_count"), &l), 2.0);
    assert_eq!(bucket(&s, e2e, &l, 0.3), 0.0);
    assert_eq!(bucket(&s, e2e, &l, 0.5), 1.0);
    assert_eq!(bucket(&s, e2e, &l, 1.5), 2.0);
    for phase in ["queue_time", "prefill_time", "decode_time"] {
        let name = format!("gptossd_request_{phase}_seconds_count");
        assert_eq!(value(&s, &name, &l), 2.0, "{name}");
    }
    assert_eq!(
        bucket(&s, "gptossd_request_queue_time_seconds", &l, 0.001),
        0.0
    );
    assert_eq!(
        bucket(&s, "gptossd_request_queue_time_seconds", &l, 0.005),
        2.0
    );

    // Every sample is namespaced and carries engine, model and profile.
    for x in &s {
        assert!(x.name.starts_with("gptossd_"), "{x:?}");
        for key in ["engine", "model", "profile"] {
            assert!(x.labels.contains_key(key), "{x:?}");
        }
    }
}

fn rejection(model: &str, code: &str) -> Rejection {
    Rejection {
        engine: "gptossd-pipeline".into(),
        model: model.into(),
        code: code.into(),
    }
}

#[test]
fn rejections_are_counted_by_code_apart_from_failures() {
    let m = Metrics::new();
    m.rejected(&rejection("gpt-oss-20b", "queue_full"));
    m.rejected(&rejection("gpt-oss-20b", "queue_full"));
    m.rejected(&rejection(UNKNOWN, "invalid_value"));
    m.rejected(&rejection(UNKNOWN, "model_not_found"));
    let s = parse(&m.render_prometheus());
    let name = "gptossd_request_rejected_total";
    let at = |model, code| {
        [
            ("engine", "gptossd-pipeline"),
            ("model", model),
            ("code", code),
        ]
    };
    assert_eq!(value(&s, name, &at("gpt-oss-20b", "queue_full")), 2.0);
    assert_eq!(value(&s, name, &at("unknown", "invalid_value")), 1.0);
    assert_eq!(value(&s, name, &at("unknown", "model_not_found")), 1.0);
    assert!(!s.iter().any(|x| x.name == "gptossd_request_failure_total"));
    assert!(!s.iter().any(|x| x.name == "gptossd_request_success_total"));

    let stats = m.stats_json();
    assert_eq!(
        stats["series"],
        json!([]),
        "no request series: nothing ran or failed"
    );
    let rejected = &stats["rejected"];
    assert_eq!(rejected["total"], 4);
    assert_eq!(rejected["series"][0]["model"], "gpt-oss-20b");
    assert_eq!(rejected["series"][0]["by_code"]["queue_full"], 2);
    assert_eq!(rejected["series"][1]["model"], "unknown");
    assert_eq!(rejected["series"][1]["total"], 2);

    // A refusal on the server's side is a failure of its series.
    m.failed(&series("default"), "model_unhealthy");
    let s = parse(&m.render_prometheus());
    let mut unhealthy = series_pairs("default").to_vec();
    unhealthy.push(("reason", "model_unhealthy"));
    assert_eq!(value(&s, "gptossd_request_failure_total", &unhealthy), 1.0);
    let stats = m.stats_json();
    let series = &stats["series"][0];
    assert_eq!(series["errors"]["model_unhealthy"], 1);
    assert_eq!(series["requests"]["total"], 1);
    assert_eq!(series["requests"]["failed"], 1);
    assert_eq!(stats["rejected"]["total"], 4);
}

#[test]
fn gauges_are_set_and_reflected() {
    let m = Metrics::new();
    let g = Gauges {
        running: 3,
        waiting: 5,
        kv_blocks_in_use: 30,
        kv_blocks_total: 120,
        stage_restarts: vec![(0, 2), (1, 0)],
        stage_states: vec![(0, "ready"), (1, "restarting")],
        prefix_cache_queries: 1000,
        prefix_cache_hits: 250,
        healthy: true,
    };
    m.set_gauges("gpt-oss-20b", "gptossd-pipeline", &g);
    let s = parse(&m.render_prometheus());
    let l = [("engine", "gptossd-pipeline"), ("model", "gpt-oss-20b")];
    assert_eq!(value(&s, "gptossd_num_requests_running", &l), 3.0);
    assert_eq!(value(&s, "gptossd_num_requests_waiting", &l), 5.0);
    assert_eq!(value(&s, "gptossd_kv_cache_usage_perc", &l), 0.25);
    assert_eq!(value(&s, "gptossd_healthy", &l), 1.0);
    assert_eq!(value(&s, "gptossd_prefix_cache_queries_total", &l), 1000.0);
    assert_eq!(value(&s, "gptossd_prefix_cache_hits_total", &l), 250.0);
    let restarts = "gptossd_stage_restarts_total";
    let stage = |n| [l[0], l[1], ("stage", n)];
    assert_eq!(value(&s, restarts, &stage("0")), 2.0);
    assert_eq!(value(&s, restarts, &stage("1")), 0.0);
    let state = |n, name| [l[0], l[1], ("stage", n), ("state", name)];
    let states = "gptossd_stage_state";
    assert_eq!(value(&s, states, &state("0", "ready")), 1.0);
    assert_eq!(value(&s, states, &state("1", "restarting")), 1.0);
    assert_eq!(value(&s, states, &state("1", "ready")), 0.0);
    let per_stage = s.iter().filter(|x| x.name == states).count();
    assert_eq!(
        per_stage,
        2 * STAGE_STATES.len(),
        "every state of every stage"
    );

    // A later snapshot replaces the values; cumulative counts are mirrored, not added.
    let g2 = Gauges {
        running: 0,
        waiting: 0,
        kv_blocks_in_use: 0,
        kv_blocks_total: 0,
        stage_restarts: vec![(0, 3), (1, 0)],
        stage_states: vec![(0, "ready"), (1, "ready")],
        prefix_cache_queries: 1200,
        prefix_cache_hits: 300,
        healthy: false,
    };
    m.set_gauges("gpt-oss-20b", "gptossd-pipeline", &g2);
    let s = parse(&m.render_prometheus());
    assert_eq!(value(&s, "gptossd_healthy", &l), 0.0);
    assert_eq!(value(&s, "gptossd_kv_cache_usage_perc", &l), 0.0);
    assert_eq!(value(&s, "gptossd_num_requests_running", &l), 0.0);
    assert_eq!(value(&s, "gptossd_prefix_cache_queries_total", &l), 1200.0);
    assert_eq!(value(&s, restarts, &stage("0")), 3.0);
    assert_eq!(value(&s, states, &state("1", "restarting")), 0.0);
    assert_eq!(value(&s, states, &state("1", "ready")), 1.0);
    // Per-model gauges carry no profile label.
    assert!(s.iter().all(|x| !x.labels.contains_key("profile")));

    let model = &m.stats_json()["models"][0];
    assert_eq!(model["healthy"], false);
    assert_eq!(model["prefix_cache_hits"], 300);
    assert_eq!(model["stage_restarts"][0]["restarts"], 3);
    assert_eq!(
        model["stage_states"][1],
        json!({"stage": 1, "state": "ready"})
    );
}

#[test]
fn kv_cache_usage_is_a_fraction() {
    let g = |in_use, total| Gauges {
        kv_blocks_in_use: in_use,
        kv_blocks_total: total,
        ..Gauges::default()
    };
    assert_eq!(g(0, 0).kv_cache_usage(), 0.0);
    assert_eq!(g(1, 4).kv_cache_usage(), 0.25);
    assert_eq!(g(4, 4).kv_cache_usage(), 1.0);
    assert_eq!(g(9, 4).kv_cache_usage(), 1.0, "clamped");
}

#[test]
fn stats_percentiles_by_nearest_rank() {
    let m = Metrics::new();
    // 100 ms down to 1 ms: the order recorded must not matter.
    for i in (1..=100).rev() {
        m.record(&RequestRecord {
            queue_time: Some(ms(i)),
            ttft: Some(ms(i)),
            inter_token: vec![ms(i), ms(i)],
            e2e: ms(i),
            ..finished("default", "stop")
        });
    }
    let stats = m.stats_json();
    assert!(stats["uptime_seconds"].as_f64().is_some_and(|u| u >= 0.0));
    let series = &stats["series"][0];
    assert_eq!(series["profile"], "default");
    assert_eq!(series["requests"]["total"], 100);
    assert_eq!(series["requests"]["finished_reason"]["stop"], 100);
    assert_eq!(series["tokens"]["prompt"], 1000);
    assert_eq!(series["tokens"]["generated"], 400);
    for q in [
        "time_to_first_token",
        "time_per_output_token",
        "e2e_request_latency",
        "request_queue_time",
    ] {
        let l = &series["latency_ms"][q];
        assert_eq!(l["count"], 100, "{q}");
        assert_eq!(l["window"], 100, "{q}");
        assert_eq!(l["mean"], 50.5, "{q}");
        assert_eq!(l["p50"], 50.0, "{q}");
        assert_eq!(l["p90"], 90.0, "{q}");
        assert_eq!(l["p95"], 95.0, "{q}");
        assert_eq!(l["p99"], 99.0, "{q}");
    }
}

#[test]
fn nearest_rank_edges() {
    assert_eq!(nearest_rank(&[], 50), None);
    assert_eq!(nearest_rank(&[7], 1), Some(7));
    assert_eq!(nearest_rank(&[7], 99), Some(7));
    assert_eq!(nearest_rank(&[1, 2, 3, 4], 50), Some(2));
    assert_eq!(nearest_rank(&[1, 2, 3, 4], 51), Some(3));
    assert_eq!(nearest_rank(&[1, 2, 3, 4], 100), Some(4));
}

#[test]
fn empty_latencies_are_null() {
    let m = Metrics::new();
    m.failed(&series("default"), "model_unhealthy");
    let l = &m.stats_json()["series"][0]["latency_ms"]["time_to_first_token"];
    assert_eq!(l["count"], 0);
    assert!(l["p50"].is_null() && l["mean"].is_null());
}

#[test]
fn series_are_separated_by_profile() {
    let m = Metrics::new();
    m.record(&finished("fast", "stop"));
    m.record(&finished("fast", "stop"));
    m.record(&finished("long-context", "length"));
    m.failed(&series("long-context"), "model_unhealthy");
    let s = parse(&m.render_prometheus());
    let fast = series_pairs("fast");
    let long = series_pairs("long-context");
    assert_eq!(value(&s, "gptossd_prompt_tokens_total", &fast), 20.0);
    assert_eq!(value(&s, "gptossd_prompt_tokens_total", &long), 10.0);
    let ttft_count = "gptossd_time_to_first_token_seconds_count";
    assert_eq!(value(&s, ttft_count, &fast), 2.0);
    assert_eq!(value(&s, ttft_count, &long), 1.0);

    let stats = m.stats_json();
    let all = stats["series"].as_array().expect("series array");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0]["profile"], "fast");
    assert_eq!(all[0]["requests"]["total"], 2);
    assert!(all[0]["errors"].as_object().is_some_and(|e| e.is_empty()));
    assert_eq!(all[1]["profile"], "long-context");
    assert_eq!(all[1]["requests"]["total"], 2);
    assert_eq!(all[1]["errors"]["model_unhealthy"], 1);
}

#[test]
fn reservoir_stays_bounded() {
    let m = Metrics::new();
    let n: u64 = 100_000;
    for i in 1..=n {
        m.record(&RequestRecord {
            ttft: Some(ms(i)),
            inter_token: vec![ms(1)],
            ..finished("default", "stop")
        });
    }
    {
        let stats = m.stats();
        let s = &stats.series[&series("default")];
        for r in [&s.ttft, &s.time_per_output_token, &s.e2e, &s.queue] {
            assert_eq!(r.samples.len(), RESERVOIR_CAPACITY);
            assert!(
                r.samples.capacity() <= RESERVOIR_CAPACITY,
                "{}",
                r.samples.capacity()
            );
            assert_eq!(r.count, n);
        }
    }
    // The window holds the last 10 000: 90 001 ..= 100 000 ms.
    let l = &m.stats_json()["series"][0]["latency_ms"]["time_to_first_token"];
    assert_eq!(l["count"], n);
    assert_eq!(l["window"], RESERVOIR_CAPACITY);
    assert_eq!(l["p50"], 95_000.0);
    assert_eq!(l["p99"], 99_900.0);
    assert_eq!(l["mean"], 50_000.5, "the mean is over every request");
}

#[test]
fn concurrent_records_all_count_and_a_poisoned_lock_is_recovered() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Metrics>();

    let m = Arc::new(Metrics::new());
    // Poison the stats lock: a thread panics while holding it.
    let poisoner = Arc::clone(&m);
    let joined = std::thread::spawn(move || {
        let _guard = poisoner.stats.lock();
        panic!("poison the stats lock");
    })
    .join();
    assert!(joined.is_err());
    assert!(m.stats.is_poisoned());

    let threads: Vec<_> = (0..4)
        .map(|_| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                for _ in 0..500 {
                    m.record(&finished("default", "stop"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("recording thread");
    }
    let s = parse(&m.render_prometheus());
    let l = series_pairs("default");
    assert_eq!(value(&s, "gptossd_generation_tokens_total", &l), 8000.0);
    assert_eq!(
        value(&s, "gptossd_inter_token_latency_seconds_count", &l),
        6000.0
    );
    assert_eq!(m.stats_json()["series"][0]["requests"]["total"], 2000);
}
