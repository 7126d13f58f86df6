use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gptossd_shared::config::ModelConfig;
use gptossd_shared::testmodel::{config_json, Dims, Preset};

use super::*;

const SHIPPED: &str = include_str!("../../../packaging/gptossd.toml");
const SHIPPED_MODEL_PATH: &str = "/var/lib/gptossd/models/gpt-oss-20b";
const FILE: &str = "/etc/gptossd/gptossd.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE), &Overrides::default())
}

fn parse_with(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE), overrides)
}

/// A machine with `nodes` NUMA nodes of `per_node` cores each, no GPU, run by root with no
/// runtime-directory variables.
fn machine(nodes: usize, per_node: usize) -> Host {
    Host {
        cores: nodes * per_node,
        numa_nodes: (0..nodes)
            .map(|n| (n * per_node..(n + 1) * per_node).collect())
            .collect(),
        gpus: Vec::new(),
        uid: 0,
        runtime_directory: None,
        xdg_runtime_dir: None,
    }
}

fn parse_on(text: &str, overrides: &Overrides, host: &Host) -> Result<Config, ConfigError> {
    Config::parse_on(text, Path::new(FILE), overrides, host)
}

/// One model and `extra` appended (which may add keys to the model's table first).
fn one_model(extra: &str) -> String {
    format!("[[models]]\nname = \"m\"\npath = \"/models/m\"\n{extra}")
}

/// The error message, asserting that it contains every needle.
#[track_caller]
fn error_with(result: Result<Config, ConfigError>, needles: &[&str]) -> String {
    let e = match result {
        Ok(c) => panic!("expected an error containing {needles:?}, got {c:?}"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(e.contains(n), "{n:?} not in: {e}");
    }
    e
}

fn model_config(dims: &Dims) -> ModelConfig {
    ModelConfig::parse(&config_json(dims).to_string(), Path::new("config.json")).expect("valid")
}

fn shipped_defaults() -> Config {
    Config::default_for_model(Path::new(SHIPPED_MODEL_PATH), Some("gpt-oss-20b")).expect("defaults")
}

#[test]
fn the_shipped_file_parses_to_the_defaults() {
    let c = parse(SHIPPED).expect("the shipped config parses");
    assert_eq!(c, shipped_defaults());
}

#[test]
fn uncommenting_the_shipped_defaults_changes_nothing() {
    // "#key = value" lines show exact defaults; "# key = value" lines are examples.
    let mut uncommented = 0;
    let text: String = SHIPPED
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => {
                uncommented += 1;
                format!("{rest}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    // Every fixed default: all but `control_socket`, `stages` and `devices`, whose defaults
    // depend on the machine and are shown as examples.
    assert!(uncommented >= 32, "only {uncommented} settings documented");
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c, shipped_defaults());
}

#[test]
fn the_defaults_are_the_documented_ones() {
    // A workstation: one NUMA node of 2 cores, root, no runtime directory variables.
    let host = machine(1, 2);
    let overrides = Overrides {
        model: Some("/srv/models/gpt-oss-20b/".into()),
        ..Overrides::default()
    };
    let c = Config::resolve_on(None, &overrides, &host).expect("defaults");
    let s = c.server();
    assert_eq!(s.host, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(s.port, 8080);
    assert_eq!(s.listen_addr().to_string(), "127.0.0.1:8080");
    assert_eq!(s.control_socket, PathBuf::from("/run/gptossd/control.sock"));
    assert_eq!(s.control_socket_source, ControlSocketSource::SystemRun);
    assert_eq!(s.max_body_bytes, 4 << 20);
    assert_eq!(s.request_timeout, Duration::from_secs(10));

    let [m] = c.models() else {
        panic!("one model: {:?}", c.models())
    };
    assert_eq!(m.name, "gpt-oss-20b", "named after the directory");
    assert_eq!(m.path, PathBuf::from("/srv/models/gpt-oss-20b/"));
    assert_eq!(m.size, SizeSetting::Auto);
    assert_eq!(m.stages, 1);
    assert_eq!(m.devices, vec![Device::Cpu { cores: None }]);
    assert_eq!(
        m.stages_reason(),
        "1 stage: one per NUMA node (1 node, no GPU devices configured)"
    );
    assert_eq!(m.layers, None);
    assert_eq!(m.threads_per_stage, 2, "every core");
    assert_eq!(m.block_size, 16);
    assert_eq!(m.kv_blocks, 4096);
    assert_eq!(m.kv_cache_tokens(), 65_536);

    let table = [
        (ProfileName::LatencyFirst, 32, 4, 512, ReasoningEffort::Low),
        (ProfileName::Balanced, 48, 6, 1024, ReasoningEffort::Medium),
        (
            ProfileName::QualityFirst,
            8,
            12,
            2048,
            ReasoningEffort::High,
        ),
    ];
    for (name, batch, window, tokens, effort) in table {
        let p = c.profile(name);
        assert_eq!(p.max_batch, batch, "{name}");
        assert_eq!(p.prefill_window, Duration::from_millis(window), "{name}");
        assert_eq!(p.max_new_tokens, tokens, "{name}");
        assert_eq!(p.reasoning_effort, effort, "{name}");
        assert_eq!(
            (p.model.as_deref(), p.fallback.as_deref()),
            (None, None),
            "{name}"
        );
    }

    let s = c.scheduler();
    assert_eq!(s.default_profile, ProfileName::Balanced);
    assert!(!s.auto_profile);
    assert_eq!(s.max_waiting, 256);
    assert_eq!(s.max_tokens_per_step, 512);
    assert_eq!(s.max_in_flight, None);
    assert_eq!(s.max_in_flight_for(m), 1);

    let w = c.workers();
    assert_eq!(w.heartbeat_interval, Duration::from_millis(200));
    assert_eq!(w.heartbeat_timeout, Duration::from_millis(2000));
    assert_eq!(w.step_deadline, Duration::from_millis(30_000));
    assert_eq!(w.restart_backoff_initial, Duration::from_millis(100));
    assert_eq!(w.restart_backoff_max, Duration::from_millis(5000));
    assert_eq!(w.crash_loop_limit, 5);
    assert_eq!(w.crash_loop_window, Duration::from_secs(60));
    assert_eq!(w.drain_grace, Duration::from_secs(30));
    assert_eq!(w.stderr_tail_lines, 50);
}

#[test]
fn an_empty_file_gives_the_defaults() {
    let overrides = Overrides {
        model: Some(SHIPPED_MODEL_PATH.into()),
        served_model_name: Some("gpt-oss-20b".into()),
        ..Overrides::default()
    };
    assert_eq!(
        parse_with("", &overrides).expect("empty file"),
        shipped_defaults()
    );
    assert_eq!(
        parse_with("# nothing\n\n", &overrides).expect("comments only"),
        shipped_defaults()
    );
    // Without a model anywhere, the error says how to give one.
    error_with(parse(""), &[FILE, "`models`", "[[models]]", "--model"]);
    error_with(
        Config::resolve(None, &Overrides::default()),
        &["`models`", "--model"],
    );
}

#[test]
fn reads_a_file_from_disk_and_names_a_missing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gptossd.toml");
    std::fs::write(&path, SHIPPED).expect("write");
    assert_eq!(
        Config::resolve(Some(&path), &Overrides::default()).expect("reads"),
        shipped_defaults()
    );
    let missing = dir.path().join("nope.toml");
    let e = Config::resolve(Some(&missing), &Overrides::default()).expect_err("missing");
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("nope.toml"), "{e}");
}

#[test]
fn config_path_from_flag_then_environment() {
    let flag = Path::new("/from/flag.toml");
    let env = OsStr::new("/from/env.toml");
    assert_eq!(
        config_path_from(Some(flag), Some(env)),
        Some(flag.to_path_buf())
    );
    assert_eq!(
        config_path_from(None, Some(env)),
        Some(PathBuf::from("/from/env.toml"))
    );
    assert_eq!(config_path_from(None, Some(OsStr::new(""))), None);
    assert_eq!(config_path_from(None, None), None);
    // The flag wins whatever the real environment says.
    assert_eq!(config_path(Some(flag)), Some(flag.to_path_buf()));
    assert_eq!(CONFIG_ENV, "GPTOSSD_CONFIG");
}

#[test]
fn bad_port() {
    let e = error_with(
        parse("[server]\nport = -1\n"),
        &[FILE, ":2:8", "`server.port`", "-1"],
    );
    assert!(e.starts_with(&format!("{FILE}:2:8: ")), "{e}");
    error_with(
        parse("[server]\nport = 70000\n"),
        &[FILE, ":2:8", "`server.port`", "70000"],
    );
    error_with(
        parse("[server]\nport = \"http\"\n"),
        &["`server.port`", "http"],
    );
    error_with(
        parse(&one_model("[server]\nhost = \"example.org\"\n")),
        &["`server.host`", "example.org"],
    );
}

#[test]
fn bad_stages() {
    error_with(
        parse(&one_model("stages = 0\n")),
        &[":4:10", "`models.m.stages`", "= 0", "at least 1"],
    );
    error_with(
        parse(&one_model("stages = -1\n")),
        &[":4:10", "`models[0].stages`", "-1"],
    );
    error_with(
        parse_with(
            &one_model(""),
            &Overrides {
                stages: Some(0),
                ..Overrides::default()
            },
        ),
        &["command line --stages", "`models.m.stages`", "= 0"],
    );
}

#[test]
fn unknown_keys_are_errors_naming_them() {
    error_with(
        parse("[server]\nprot = 8080\n"),
        &[FILE, ":2:1", "`server.prot`", "prot"],
    );
    error_with(
        parse(&one_model("stage = 4\n")),
        &[":4:1", "`models[0].stage`"],
    );
    error_with(
        parse(&one_model("[workers]\nheartbeat_ms = 5\n")),
        &["`workers.heartbeat_ms`"],
    );
    error_with(parse("[serverr]\n"), &[":1:2", "serverr"]);
}

#[test]
fn unknown_profile_names() {
    error_with(
        parse(&one_model("[profiles.fast]\nmax_batch = 4\n")),
        &[":4:11", "`profiles.fast`", "fast"],
    );
    error_with(
        parse(&one_model("[scheduler]\ndefault_profile = \"fast\"\n")),
        &[
            ":5:19",
            "`scheduler.default_profile`",
            "\"fast\"",
            "latency_first",
        ],
    );
}

#[test]
fn bad_devices() {
    error_with(
        parse(&one_model("devices = [\"cpu\", \"gpu:0\"]\n")),
        &[":4:19", "`models.m.devices[1]`", "\"gpu:0\"", "cuda:N"],
    );
    error_with(
        parse(&one_model("devices = [\"cpu:3-1\"]\n")),
        &["`models.m.devices[0]`", "backwards"],
    );
    error_with(
        parse(&one_model(
            "stages = 4\ndevices = [\"cuda:0\", \"cuda:1\"]\n",
        )),
        &[
            ":5:11",
            "`models.m.devices`",
            "2 entries for 4 stages",
            ":4:10",
        ],
    );
    error_with(
        parse(&one_model("devices = []\n")),
        &["`models.m.devices`", "empty"],
    );
    let c = parse(&one_model("devices = [\"cuda:0\", \"cpu:0,2,4-7\"]\n")).expect("valid");
    let m = &c.models()[0];
    assert_eq!(m.stages, 2, "stages follows the device list");
    assert_eq!(m.devices[0], Device::Cuda { ordinal: 0 });
    assert_eq!(
        m.devices[1],
        Device::Cpu {
            cores: Some(vec![0, 2, 4, 5, 6, 7])
        }
    );
}

#[test]
fn explicit_layers() {
    let tiny = model_config(&Preset::Tiny.dims());
    let c = parse(&one_model("layers = [1, 2, 1]\n")).expect("valid");
    let m = &c.models()[0];
    assert_eq!(m.stages, 3, "stages follows the layer list");
    assert_eq!(m.layer_split(&tiny).expect("fits"), vec![0..1, 1..3, 3..4]);

    let c = parse(&one_model("layers = [7, 7, 7, 7]\n")).expect("parses");
    let e = c.models()[0]
        .check_layers(24)
        .expect_err("28 ≠ 24")
        .to_string();
    for n in [":4:10", "`models.m.layers`", "[7, 7, 7, 7]", "28", "24"] {
        assert!(e.contains(n), "{n:?} not in {e}");
    }
    assert!(c.models()[0].check_layers(28).is_ok());
    error_with(
        parse(&one_model("layers = [7, 0, 17]\n")),
        &["`models.m.layers`", "[7, 0, 17]", "stage 1"],
    );
    error_with(
        parse(&one_model("stages = 2\nlayers = [1, 2, 1]\n")),
        &["`models.m.layers`", "3 entries for 2 stages"],
    );
}

#[test]
fn stages_are_checked_against_the_layer_count() {
    let tiny = model_config(&Preset::Tiny.dims());
    let c = parse(&one_model("stages = 5\n")).expect("parses: the layer count is not known yet");
    let e = c.models()[0]
        .layer_split(&tiny)
        .expect_err("5 stages, 4 layers")
        .to_string();
    for n in [":4:10", "`models.m.stages`", "= 5", "4 layers"] {
        assert!(e.contains(n), "{n:?} not in {e}");
    }
    // The default on a machine with 4 NUMA nodes, 4 stages on the 4-layer tiny model: one layer
    // each.
    let overrides = Overrides {
        model: Some("models/tiny-seed0".into()),
        ..Overrides::default()
    };
    let c = Config::resolve_on(None, &overrides, &machine(4, 2)).expect("defaults");
    let m = &c.models()[0];
    assert_eq!(m.stages, 4);
    assert_eq!(m.name, "tiny-seed0");
    assert_eq!(
        m.layer_split(&tiny).expect("fits"),
        vec![0..1, 1..2, 2..3, 3..4]
    );
    let e = m.check_layers(2).expect_err("4 > 2").to_string();
    assert!(
        e.contains("default value") && e.contains("models.tiny-seed0.stages"),
        "{e}"
    );
    // The 20b by the cost model.
    let twenty = model_config(&Preset::Shape20b.dims());
    assert_eq!(
        m.layer_split(&twenty).expect("fits"),
        vec![0..7, 7..15, 15..23, 23..24]
    );
}

#[test]
fn bad_profile_values() {
    error_with(
        parse(&one_model("[profiles.balanced]\nmax_batch = 0\n")),
        &[
            ":5:13",
            "`profiles.balanced.max_batch`",
            "= 0",
            "at least 1",
        ],
    );
    error_with(
        parse(&one_model("[profiles.latency_first]\nmax_new_tokens = 0\n")),
        &["`profiles.latency_first.max_new_tokens`", "= 0"],
    );
    error_with(
        parse(&one_model(
            "[profiles.quality_first]\nmodel = \"gpt-oss-120b\"\n",
        )),
        &[
            ":5:9",
            "`profiles.quality_first.model`",
            "\"gpt-oss-120b\"",
            "configured: m",
        ],
    );
    error_with(
        parse(&one_model(
            "[profiles.quality_first]\nmodel = \"m\"\nfallback = \"m\"\n",
        )),
        &["`profiles.quality_first.fallback`", "\"m\"", "own `model`"],
    );
    error_with(
        parse(&one_model(
            "[profiles.balanced]\nreasoning_effort = \"extreme\"\n",
        )),
        &["`profiles.balanced.reasoning_effort`", "\"extreme\""],
    );
}

#[test]
fn bad_model_entries() {
    let two =
        "[[models]]\nname = \"a\"\npath = \"/m/a\"\n[[models]]\nname = \"a\"\npath = \"/m/b\"\n";
    error_with(
        parse(two),
        &[":5:8", "`models[1].name`", "\"a\"", "distinct"],
    );
    // Names derived from the paths collide too.
    let two = "[[models]]\npath = \"/x/m\"\n[[models]]\npath = \"/y/m\"\n";
    error_with(parse(two), &["`models[1].name`", "\"m\""]);
    error_with(
        parse("[[models]]\nname = \"a\"\n"),
        &[":1:1", "`models[0].path`", "missing"],
    );
    error_with(
        parse("[[models]]\npath = \"/\"\n"),
        &["`models[0].path`", "set `name`"],
    );
    error_with(
        parse("[[models]]\nname = \"a b\"\npath = \"/m\"\n"),
        &["`models[0].name`", "\"a b\""],
    );
    error_with(
        parse(&one_model("size = \"7b\"\n")),
        &["`models.m.size`", "\"7b\"", "\"auto\""],
    );
    error_with(
        parse(&one_model("kv_blocks = 10\nkv_cache_tokens = 160\n")),
        &["`models.m.kv_blocks`", "not both"],
    );
    error_with(
        parse(&one_model("block_size = 0\n")),
        &["`models.m.block_size`", "= 0"],
    );
    error_with(
        parse(&one_model("threads_per_stage = 0\n")),
        &["`models.m.threads_per_stage`"],
    );
}

#[test]
fn kv_pool_sizes() {
    let c = parse(&one_model("kv_cache_tokens = 1000\nblock_size = 32\n")).expect("valid");
    assert_eq!(c.models()[0].kv_blocks, 32, "rounded up to whole blocks");
    let c = parse(&one_model("kv_blocks = 10\n")).expect("valid");
    assert_eq!(
        (c.models()[0].kv_blocks, c.models()[0].kv_cache_tokens()),
        (10, 160)
    );
}

#[test]
fn bad_scheduler_and_worker_values() {
    error_with(
        parse(&one_model("[scheduler]\nmax_waiting = 0\n")),
        &["`scheduler.max_waiting`", "= 0"],
    );
    error_with(
        parse(&one_model("[scheduler]\nmax_tokens_per_step = 8193\n")),
        &["`scheduler.max_tokens_per_step`", "= 8193", "at most 8192"],
    );
    let c = parse(&one_model("[scheduler]\nmax_tokens_per_step = 8192\n")).expect("valid");
    assert_eq!(c.scheduler().max_tokens_per_step, 8192);
    error_with(
        parse(&one_model("[scheduler]\nmax_in_flight = 0\n")),
        &["`scheduler.max_in_flight`"],
    );
    error_with(
        parse(&one_model("[workers]\nheartbeat_timeout_ms = 200\n")),
        &[
            "`workers.heartbeat_timeout_ms`",
            "= 200",
            "heartbeat_interval_ms (200)",
        ],
    );
    error_with(
        parse(&one_model("[workers]\nrestart_backoff_max_ms = 50\n")),
        &["`workers.restart_backoff_max_ms`", "= 50"],
    );
    error_with(
        parse(&one_model("[workers]\ncrash_loop_limit = 0\n")),
        &["`workers.crash_loop_limit`"],
    );
    let c = parse(&one_model("[scheduler]\nmax_in_flight = 2\n")).expect("valid");
    assert_eq!(c.scheduler().max_in_flight_for(&c.models()[0]), 2);
}

#[test]
fn command_line_overrides() {
    let text = one_model("stages = 2\n[profiles.balanced]\nmodel = \"m\"\n");
    let c = parse_with(
        &text,
        &Overrides {
            port: Some(9000),
            stages: Some(3),
            ..Overrides::default()
        },
    )
    .expect("valid");
    assert_eq!(c.server().port, 9000);
    assert_eq!(c.models()[0].stages, 3);
    assert_eq!(c.models()[0].devices.len(), 3);

    // --model replaces the one model's path and keeps its explicit name.
    let c = parse_with(
        &text,
        &Overrides {
            model: Some("/other/x".into()),
            ..Overrides::default()
        },
    )
    .expect("valid");
    assert_eq!(
        (c.models()[0].name.as_str(), c.models()[0].path.as_path()),
        ("m", Path::new("/other/x"))
    );

    // --served-model-name renames it, and the profile naming it follows.
    let c = parse_with(
        &text,
        &Overrides {
            served_model_name: Some("n".into()),
            ..Overrides::default()
        },
    )
    .expect("valid");
    assert_eq!(c.models()[0].name, "n");
    assert_eq!(c.profile(ProfileName::Balanced).model.as_deref(), Some("n"));

    // A name derived from the path follows a new path.
    let text =
        "[[models]]\npath = \"/m/gpt-oss-20b\"\n[profiles.balanced]\nmodel = \"gpt-oss-20b\"\n";
    let c = parse_with(
        text,
        &Overrides {
            model: Some("/m/other".into()),
            ..Overrides::default()
        },
    )
    .expect("valid");
    assert_eq!(c.models()[0].name, "other");
    assert_eq!(
        c.profile(ProfileName::Balanced).model.as_deref(),
        Some("other")
    );

    // --stages against an explicit device list of another length.
    error_with(
        parse_with(
            &one_model("devices = [\"cpu\", \"cpu\"]\n"),
            &Overrides {
                stages: Some(3),
                ..Overrides::default()
            },
        ),
        &[
            "`models.m.devices`",
            "2 entries for 3 stages",
            "command line --stages",
        ],
    );
}

#[test]
fn model_overrides_with_several_models() {
    let two =
        "[[models]]\nname = \"a\"\npath = \"/m/a\"\n[[models]]\nname = \"b\"\npath = \"/m/b\"\n";
    let pick_b = Overrides {
        model: Some("/new/b".into()),
        served_model_name: Some("b".into()),
        ..Overrides::default()
    };
    let c = parse_with(two, &pick_b).expect("valid");
    assert_eq!(
        c.model("b").map(|m| m.path.as_path()),
        Some(Path::new("/new/b"))
    );
    assert_eq!(
        c.model("a").map(|m| m.path.as_path()),
        Some(Path::new("/m/a"))
    );
    error_with(
        parse_with(
            two,
            &Overrides {
                model: Some("/new".into()),
                ..Overrides::default()
            },
        ),
        &[
            "command line --model",
            "--served-model-name",
            "[\"a\", \"b\"]",
        ],
    );
    error_with(
        parse_with(
            two,
            &Overrides {
                served_model_name: Some("c".into()),
                ..Overrides::default()
            },
        ),
        &["command line --served-model-name"],
    );
}

#[test]
fn profiles_choose_models_by_size() {
    let text = "[[models]]\nname = \"small\"\npath = \"/m/s\"\nsize = \"20b\"\n\
                [[models]]\nname = \"big\"\npath = \"/m/b\"\nsize = \"120b\"\n";
    let c = parse(text).expect("valid");
    let size = |m: &ModelSettings| match m.size {
        SizeSetting::Fixed(s) => s,
        SizeSetting::Auto => ModelSize::B20,
    };
    let names = |p: ProfileName| {
        let pm = c.profile_models(p, size);
        (pm.primary.name.clone(), pm.fallback.map(|f| f.name.clone()))
    };
    assert_eq!(names(ProfileName::LatencyFirst), ("small".into(), None));
    assert_eq!(names(ProfileName::Balanced), ("small".into(), None));
    assert_eq!(
        names(ProfileName::QualityFirst),
        ("big".into(), Some("small".into()))
    );

    // One model serves every profile, with no fallback.
    let c = shipped_defaults();
    for p in ProfileName::ALL {
        let pm = c.profile_models(p, |_| ModelSize::B20);
        assert_eq!(
            (pm.primary.name.as_str(), pm.fallback),
            ("gpt-oss-20b", None)
        );
    }

    // Explicit choices win.
    let text = format!("{text}[profiles.latency_first]\nmodel = \"big\"\nfallback = \"small\"\n");
    let c = parse(&text).expect("valid");
    let pm = c.profile_models(ProfileName::LatencyFirst, size);
    assert_eq!(
        (
            pm.primary.name.as_str(),
            pm.fallback.map(|f| f.name.as_str())
        ),
        ("big", Some("small"))
    );
}

#[test]
fn sizes_resolve_from_config_json() {
    let tiny = model_config(&Preset::Tiny.dims());
    let big = model_config(&Dims {
        layers: 36,
        experts: 128,
        ..Preset::Shape20b.dims()
    });
    assert_eq!(ModelSize::detect(&tiny), ModelSize::Test);
    assert_eq!(ModelSize::detect(&tiny).as_str(), "test");
    assert_eq!(
        ModelSize::detect(&model_config(&Preset::Bench.dims())),
        ModelSize::Test
    );
    assert_eq!(
        ModelSize::detect(&model_config(&Preset::Shape20b.dims())),
        ModelSize::B20
    );
    assert_eq!(ModelSize::detect(&big), ModelSize::B120);
    // Only the real shapes are 20b or 120b: a 36-layer model with the 20b's experts is neither.
    let odd = model_config(&Dims {
        layers: 36,
        ..Preset::Shape20b.dims()
    });
    assert_eq!(ModelSize::detect(&odd), ModelSize::Test);
    // The `size` setting still makes a model of another shape a 20b.
    let c = parse(&one_model("size = \"20b\"\n")).expect("valid");
    assert_eq!(c.models()[0].resolve_size(&tiny), ModelSize::B20);
    let c = parse(&one_model("size = \"120b\"\n")).expect("valid");
    assert_eq!(
        c.models()[0].resolve_size(&tiny),
        ModelSize::B120,
        "the setting wins"
    );
    assert_eq!(
        shipped_defaults().models()[0].resolve_size(&big),
        ModelSize::B120
    );
}

#[test]
fn profile_names_round_trip() {
    for p in ProfileName::ALL {
        assert_eq!(p.as_str().parse::<ProfileName>(), Ok(p));
    }
    assert!("fast".parse::<ProfileName>().is_err());
}

#[test]
fn a_test_model_serves_every_profile_as_the_20b_stand_in() {
    let size = |m: &ModelSettings| match m.name.as_str() {
        "tiny" => ModelSize::Test,
        "big" => ModelSize::B120,
        _ => ModelSize::B20,
    };
    let names = |c: &Config, p: ProfileName| {
        let pm = c.profile_models(p, size);
        (pm.primary.name.clone(), pm.fallback.map(|f| f.name.clone()))
    };
    // One test model: every profile runs on it.
    let c = parse("[[models]]\nname = \"tiny\"\npath = \"/m/t\"\n").expect("valid");
    for p in ProfileName::ALL {
        assert_eq!(names(&c, p), ("tiny".into(), None), "{p}");
    }
    // A 120b listed first and a test model: the test model stands in for the 20b, also as
    // quality_first's fallback.
    let c = parse(
        "[[models]]\nname = \"big\"\npath = \"/m/b\"\n[[models]]\nname = \"tiny\"\npath = \"/m/t\"\n",
    )
    .expect("valid");
    assert_eq!(names(&c, ProfileName::LatencyFirst), ("tiny".into(), None));
    assert_eq!(names(&c, ProfileName::Balanced), ("tiny".into(), None));
    assert_eq!(
        names(&c, ProfileName::QualityFirst),
        ("big".into(), Some("tiny".into()))
    );
    // A real 20b is preferred to a stand-in, wherever it is listed.
    let c = parse(
        "[[models]]\nname = \"tiny\"\npath = \"/m/t\"\n[[models]]\nname = \"real\"\npath = \"/m/r\"\n[[models]]\nname = \"big\"\npath = \"/m/b\"\n",
    )
    .expect("valid");
    assert_eq!(names(&c, ProfileName::Balanced), ("real".into(), None));
    assert_eq!(
        names(&c, ProfileName::QualityFirst),
        ("big".into(), Some("real".into()))
    );
    assert_eq!(ModelSize::Test.serves_as(), ModelSize::B20);
    assert_eq!(ModelSize::B120.serves_as(), ModelSize::B120);
}

#[test]
fn stages_default_to_one_per_numa_node_pinned_to_its_cores() {
    let model = one_model("");
    let c = parse_on(&model, &Overrides::default(), &machine(2, 4)).expect("valid");
    let m = &c.models()[0];
    assert_eq!(m.stages, 2);
    assert_eq!(
        m.devices.iter().map(Device::to_string).collect::<Vec<_>>(),
        ["cpu:0-3", "cpu:4-7"]
    );
    assert_eq!(
        m.threads_per_stage, 4,
        "a node's cores, not the machine's 8"
    );
    assert_eq!(
        m.stages_reason(),
        "2 stages: one per NUMA node (2 nodes, no GPU devices configured), each pinned to its \
         node's cores"
    );
    assert_eq!(c.scheduler().max_in_flight_for(m), 2);

    // One node (or none known): one unpinned stage on every core.
    for host in [
        machine(1, 8),
        Host {
            numa_nodes: Vec::new(),
            ..machine(1, 8)
        },
    ] {
        let c = parse_on(&model, &Overrides::default(), &host).expect("valid");
        let m = &c.models()[0];
        assert_eq!(
            (m.stages, m.devices.clone(), m.threads_per_stage),
            (1, vec![Device::Cpu { cores: None }], 8)
        );
        assert!(m.stages_reason().starts_with("1 stage: one per NUMA node"));
    }

    // GPUs (once discovery finds them): one stage each.
    let gpus = Host {
        gpus: vec![0, 1],
        ..machine(2, 4)
    };
    let c = parse_on(&model, &Overrides::default(), &gpus).expect("valid");
    let m = &c.models()[0];
    assert_eq!(
        m.devices,
        vec![Device::Cuda { ordinal: 0 }, Device::Cuda { ordinal: 1 }]
    );
    assert_eq!(m.stages_reason(), "2 stages: one per GPU (2 found)");
    assert_eq!(m.threads_per_stage, 8);
}

#[test]
fn the_config_or_the_command_line_overrides_the_stage_default() {
    let host = machine(2, 4);
    let stages_flag = Overrides {
        stages: Some(4),
        ..Overrides::default()
    };
    let c = parse_on(&one_model(""), &stages_flag, &host).expect("valid");
    let m = &c.models()[0];
    assert_eq!(m.stages, 4);
    assert_eq!(m.devices, vec![Device::Cpu { cores: None }; 4]);
    assert_eq!(m.threads_per_stage, 8);
    assert_eq!(m.stages_reason(), "4 stages: from --stages");

    let c = parse_on(&one_model("stages = 3\n"), &Overrides::default(), &host).expect("valid");
    let m = &c.models()[0];
    assert_eq!(
        (m.stages, m.devices.len(), m.stages_reason()),
        (
            3,
            3,
            "3 stages: from `stages` (/etc/gptossd/gptossd.toml:4:10)"
        )
    );

    let c = parse_on(
        &one_model("devices = [\"cpu:0-3\", \"cpu:4-5\", \"cpu:6\"]\n"),
        &Overrides::default(),
        &host,
    )
    .expect("valid");
    let m = &c.models()[0];
    assert_eq!(
        m.stages_reason(),
        "3 stages: one per entry of `devices` (/etc/gptossd/gptossd.toml:4:11)"
    );
    assert_eq!(m.threads_per_stage, 1, "the smallest pinned core set");

    let c = parse_on(
        &one_model("layers = [2, 2]\n"),
        &Overrides::default(),
        &host,
    )
    .expect("valid");
    let m = &c.models()[0];
    assert_eq!((m.stages, m.devices.len()), (2, 2));
    assert_eq!(m.devices, vec![Device::Cpu { cores: None }; 2]);
    assert!(
        m.stages_reason()
            .starts_with("2 stages: one per entry of `layers`"),
        "{}",
        m.stages_reason()
    );
}

#[test]
fn the_control_socket_default_follows_the_environment() {
    let user = Host {
        uid: 1000,
        ..machine(1, 2)
    };
    let socket = |host: &Host| {
        let s = parse_on(&one_model(""), &Overrides::default(), host)
            .expect("valid")
            .server()
            .clone();
        (s.control_socket, s.control_socket_source)
    };
    assert_eq!(
        socket(&user),
        (
            PathBuf::from("/tmp/gptossd-1000/control.sock"),
            ControlSocketSource::TmpPerUser
        )
    );
    let xdg = Host {
        xdg_runtime_dir: Some("/run/user/1000".into()),
        ..user.clone()
    };
    assert_eq!(
        socket(&xdg),
        (
            PathBuf::from("/run/user/1000/gptossd/control.sock"),
            ControlSocketSource::XdgRuntimeDir
        )
    );
    let systemd = Host {
        runtime_directory: Some("/run/gptossd".into()),
        ..xdg.clone()
    };
    assert_eq!(
        socket(&systemd),
        (
            PathBuf::from("/run/gptossd/control.sock"),
            ControlSocketSource::RuntimeDirectory
        )
    );
    // A configured path wins over every default.
    let c = parse_on(
        &one_model("[server]\ncontrol_socket = \"/srv/admin.sock\"\n"),
        &Overrides::default(),
        &systemd,
    )
    .expect("valid");
    assert_eq!(
        (
            c.server().control_socket.as_path(),
            c.server().control_socket_source
        ),
        (
            Path::new("/srv/admin.sock"),
            ControlSocketSource::Configured
        )
    );
}

#[test]
fn a_config_file_that_is_a_pipe_or_missing_is_refused_at_once_with_its_cause_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("gptossd.toml");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Reading a FIFO with no writer would block forever: this must return at once.
    let e = Config::resolve(Some(&fifo), &Overrides::default()).expect_err("a FIFO");
    let text = e.to_string();
    assert!(text.contains("not a regular file"), "{text}");
    assert!(text.contains("gptossd.toml"), "{text}");

    let missing = dir.path().join("missing.toml");
    let e = Config::resolve(Some(&missing), &Overrides::default()).expect_err("missing");
    let chain = format!("{:#}", anyhow::Error::from(e));
    assert_eq!(chain.matches("os error 2").count(), 1, "{chain}");
}

#[test]
fn slo_thresholds_default_per_profile_and_bad_ones_are_named() {
    let c = parse(&one_model("")).expect("config");
    assert_eq!(
        c.profile(ProfileName::LatencyFirst).slo.ttft_p95,
        Duration::from_secs(1)
    );
    assert_eq!(
        c.profile(ProfileName::QualityFirst).slo.ttft_p95,
        Duration::from_secs(5)
    );
    assert_eq!(
        c.profile(ProfileName::Balanced).slo.e2e_p95,
        Duration::from_secs(10)
    );
    assert_eq!(c.profile(ProfileName::Balanced).slo.error_rate, 0.01);
    assert_eq!(c.slo().window, Duration::from_secs(300));
    let c = parse(&format!(
        "{}\n[profiles.balanced.slo]\nttft_p95_ms = 750\n[slo]\nwindow_secs = 60\n",
        one_model("")
    ))
    .expect("config");
    assert_eq!(
        c.profile(ProfileName::Balanced).slo.ttft_p95,
        Duration::from_millis(750)
    );
    assert_eq!(c.slo().window, Duration::from_secs(60));
    error_with(
        parse(&format!(
            "{}\n[profiles.latency_first.slo]\nerror_rate = 1.5\n",
            one_model("")
        )),
        &["profiles.latency_first.slo.error_rate", "1.5", "(0, 1]"],
    );
    error_with(
        parse(&format!(
            "{}\n[profiles.balanced.slo]\nttft_p95 = 1\n",
            one_model("")
        )),
        &["ttft_p95"],
    );
}

#[test]
fn response_cache_and_timeouts_default_per_profile_and_bad_ones_are_named() {
    let c = parse(&one_model("")).expect("config");
    assert_eq!(c.server().response_cache_bytes, 64 << 20);
    for (name, cache, ceiling) in [
        (ProfileName::LatencyFirst, true, 600),
        (ProfileName::Balanced, false, 600),
        (ProfileName::QualityFirst, false, 1800),
    ] {
        let p = c.profile(name);
        assert_eq!(p.response_cache, cache, "{name}");
        assert_eq!(
            p.timeout,
            TimeoutSettings {
                ceiling: Duration::from_secs(ceiling),
                queue_budget: Duration::from_secs(30),
                ttft_budget: Duration::from_secs(30),
                slack: 2.0,
            },
            "{name}"
        );
    }
    let c = parse(&format!(
        "[server]\nresponse_cache_bytes = 0\n{}\n[profiles.balanced]\nresponse_cache = true\n\
         timeout_ceiling_secs = 1\ntimeout_queue_budget_ms = 5\ntimeout_ttft_budget_ms = 7\n\
         timeout_slack = 1.5\n",
        one_model("")
    ))
    .expect("config");
    assert_eq!(c.server().response_cache_bytes, 0);
    let p = c.profile(ProfileName::Balanced);
    assert!(p.response_cache);
    assert_eq!(
        p.timeout,
        TimeoutSettings {
            ceiling: Duration::from_secs(1),
            queue_budget: Duration::from_millis(5),
            ttft_budget: Duration::from_millis(7),
            slack: 1.5,
        }
    );
    error_with(
        parse(&one_model(
            "[profiles.balanced]\ntimeout_ceiling_secs = 0\n",
        )),
        &[
            "`profiles.balanced.timeout_ceiling_secs`",
            "= 0",
            "at least 1",
        ],
    );
    for slack in ["0.5", "nan", "inf"] {
        error_with(
            parse(&one_model(&format!(
                "[profiles.quality_first]\ntimeout_slack = {slack}\n"
            ))),
            &["`profiles.quality_first.timeout_slack`", "at least 1"],
        );
    }
    error_with(
        parse(&one_model(
            "[profiles.latency_first]\nresponse_cache = \"yes\"\n",
        )),
        &["response_cache"],
    );
}
