//! Every embedded CUDA kernel compiles with NVRTC, with the project's options, for each GPU
//! architecture the daemon supports, within its committed resource budget
//! (`tests/kernel_budgets.toml`): no compile error, no register spill, no stack frame, registers
//! and static shared memory at most the table's. No GPU is needed, only `libnvrtc.so.13` (and
//! its `libnvrtc-builtins`) on the library path: `.ci/run` installs the PyPI wheel. Without
//! NVRTC the test fails under `CI=true` and prints a skip line elsewhere.

use std::collections::BTreeMap;
use std::path::Path;

use gptossd_stage::backend::cuda::nvrtc::{self, Arch, KernelResources, NO_NVRTC_HELP};

/// The architectures every kernel must compile for: Ampere (A100, RTX 30), Ada (RTX 40, L40),
/// Hopper (H100, H200), Blackwell workstation (RTX 50, RTX PRO 6000).
const ARCHS: [&str; 5] = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"];

/// The sources to compile, as (program name, complete NVRTC source).
/// The stand-ins prove the harness until the backend's kernels are wired in; then this becomes
/// `kernels::ALL.iter().map(|k| (k.name.to_string(), kernels::cuda_source(k))).collect()`.
fn sources() -> Vec<(String, String)> {
    vec![(
        "stand_in_kernels".to_string(),
        include_str!("stand_in_kernels.cu").to_string(),
    )]
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Budget {
    registers: u32,
    shared_bytes: u32,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetTable {
    kernels: BTreeMap<String, Budget>,
}

fn budgets() -> BudgetTable {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_budgets.toml");
    let text = std::fs::read_to_string(&path).expect("tests/kernel_budgets.toml is committed");
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One kernel compiled for one architecture.
struct Report {
    arch: Arch,
    kernel: KernelResources,
}

/// Every way the reports break the budget table, one line each.
fn violations(reports: &[Report], table: &BudgetTable) -> Vec<String> {
    let mut found = Vec::new();
    for Report { arch, kernel: k } in reports {
        let Some(budget) = table.kernels.get(&k.name) else {
            found.push(format!(
                "{arch} {}: no entry in kernel_budgets.toml",
                k.name
            ));
            continue;
        };
        if k.spill_store_bytes + k.spill_load_bytes > 0 {
            found.push(format!("{arch} {}: spills registers", k));
        }
        if k.stack_bytes > 0 {
            found.push(format!("{arch} {}: uses a stack frame", k));
        }
        if k.registers > budget.registers {
            let limit = budget.registers;
            found.push(format!(
                "{arch} {}: registers above the budget of {limit}",
                k
            ));
        }
        if k.shared_bytes > budget.shared_bytes {
            let limit = budget.shared_bytes;
            found.push(format!(
                "{arch} {}: shared memory above the budget of {limit} B",
                k
            ));
        }
    }
    for name in table.kernels.keys() {
        if !reports.iter().any(|r| &r.kernel.name == name) {
            found.push(format!(
                "kernel_budgets.toml names {name}, which no source defines"
            ));
        }
    }
    found
}

#[test]
fn every_kernel_compiles_for_every_architecture_within_its_budget() {
    if !nvrtc::library_present() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and {NO_NVRTC_HELP}");
        }
        eprintln!("SKIPPED kernels_compile: {NO_NVRTC_HELP}");
        return;
    }
    let version = nvrtc::version().expect("NVRTC reports its version");
    let table = budgets();
    let sources = sources();
    let archs: Vec<Arch> = ARCHS
        .iter()
        .map(|a| a.parse().expect("a valid arch"))
        .collect();

    // One thread per architecture: NVRTC's API is thread-safe, and a compile is single-threaded.
    let results: Vec<Vec<_>> = std::thread::scope(|s| {
        let handles: Vec<_> = archs
            .iter()
            .map(|&arch| {
                let sources = &sources;
                s.spawn(move || {
                    sources
                        .iter()
                        .map(|(name, source)| (arch, nvrtc::compile(name, source, arch)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a compile thread"))
            .collect()
    });

    let mut failures = Vec::new();
    let mut reports = Vec::new();
    for (arch, result) in results.into_iter().flatten() {
        match result {
            Ok(compiled) if compiled.kernels.is_empty() => failures.push(format!(
                "{arch}: ptxas reported no entry function:\n{}",
                compiled.log
            )),
            Ok(compiled) => reports.extend(
                compiled
                    .kernels
                    .into_iter()
                    .map(|kernel| Report { arch, kernel }),
            ),
            Err(e) => failures.push(e.to_string()),
        }
    }
    println!(
        "NVRTC {version}: {} kernels × {} architectures",
        reports.len() / archs.len().max(1),
        archs.len()
    );
    for r in &reports {
        println!("  {:<7} {}", r.arch.to_string(), r.kernel);
    }
    // The budgets are judged only on a complete compile (else every entry looks stale).
    if failures.is_empty() {
        failures.extend(violations(&reports, &table));
    }
    assert!(
        failures.is_empty(),
        "kernel compile check failed:\n{}",
        failures.join("\n")
    );
}

/// The checker itself: each kind of breach is reported (a harness that cannot fail proves
/// nothing).
#[test]
fn the_budget_check_reports_every_kind_of_breach() {
    let table: BudgetTable = toml::from_str(
        "[kernels.a]\nregisters = 32\nshared_bytes = 1024\n\
         [kernels.stale]\nregisters = 32\nshared_bytes = 0\n",
    )
    .unwrap();
    let arch: Arch = "sm_90".parse().unwrap();
    let within = KernelResources {
        name: "a".into(),
        registers: 32,
        shared_bytes: 1024,
        ..KernelResources::default()
    };
    let report = |kernel: KernelResources| Report { arch, kernel };
    let reports = [
        report(within.clone()),
        report(KernelResources {
            registers: 33,
            ..within.clone()
        }),
        report(KernelResources {
            shared_bytes: 1025,
            ..within.clone()
        }),
        report(KernelResources {
            spill_store_bytes: 4,
            ..within.clone()
        }),
        report(KernelResources {
            stack_bytes: 8,
            ..within.clone()
        }),
        report(KernelResources {
            name: "unlisted".into(),
            ..within.clone()
        }),
    ];
    let found = violations(&reports, &table);
    let expect = [
        "registers above the budget of 32",
        "shared memory above the budget of 1024 B",
        "spills registers",
        "uses a stack frame",
        "unlisted: no entry",
        "names stale, which no source defines",
    ];
    assert_eq!(found.len(), expect.len(), "{found:#?}");
    for e in expect {
        assert!(
            found.iter().any(|f| f.contains(e)),
            "{e:?} not in {found:#?}"
        );
    }
    assert!(violations(
        &reports[..1],
        &BudgetTable {
            kernels: BTreeMap::from([("a".into(), table.kernels["a"])])
        }
    )
    .is_empty());
}
