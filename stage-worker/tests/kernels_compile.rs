//! Every embedded CUDA kernel compiles with NVRTC, with the project's options, for each GPU
//! architecture the daemon supports, within its committed resource budget
//! (`tests/kernel_budgets.toml`): no compile error, no register spill, no stack frame, registers
//! and static shared memory at most the table's; and their machine code passes the SASS lint
//! (`backend::cuda::sass`: no local memory, no float atomics), and on sm_90 the MXFP4 GEMV
//! inner loops stay within their instructions per weight (`[mxfp4_loops]`). No GPU is needed, only
//! `libnvrtc.so.13` (and its `libnvrtc-builtins`) on the library path and `cuobjdump` (with
//! `nvdisasm`) on `PATH` or named by `$CUOBJDUMP`: `.ci/run` installs the PyPI wheels. Without
//! them the tests fail under `CI=true` and print a skip line elsewhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gptossd_stage::backend::cuda::nvrtc::{self, Arch, Compiled, KernelResources, NO_NVRTC_HELP};
use gptossd_stage::backend::cuda::{kernels, sass};

/// The architectures every kernel must compile for: Ampere (A100, RTX 30), Ada (RTX 40, L40),
/// Hopper (H100, H200), Blackwell workstation (RTX 50, RTX PRO 6000).
const ARCHS: [&str; 5] = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"];

/// The sources to compile, as (program name, complete NVRTC source): every kernel source of
/// the backend (`kernels::ALL`), as the CUDA backend compiles it.
fn sources() -> Vec<(String, String)> {
    kernels::ALL
        .iter()
        .map(|k| (k.name.to_string(), kernels::cuda_source(k)))
        .collect()
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Budget {
    registers: u32,
    shared_bytes: u32,
}

/// The instruction budget of a kernel's MXFP4 inner loop (its largest loop) on
/// [`LOOP_ARCH`]: `weights_per_iteration` is what one pass of the loop body decodes and
/// multiplies per thread (fixed by the source), so the body's length divided by it is the
/// instructions per weight.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoopBudget {
    weights_per_iteration: u32,
    instructions_per_weight: f64,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetTable {
    kernels: BTreeMap<String, Budget>,
    #[serde(default)]
    mxfp4_loops: BTreeMap<String, LoopBudget>,
}

/// The architecture the MXFP4 loop budgets are measured on (H100, H200).
const LOOP_ARCH: &str = "sm_90";

/// The MXFP4 loop budgets checked against one listing: (failures, report lines). A kernel's
/// inner loop is its largest loop; it must hold at least one float accumulation (`FADD` or
/// `FFMA`) per weight the table says it handles, so a wrong `weights_per_iteration` cannot
/// make the loop look cheaper than it is.
fn loop_findings(listing: &str, arch: Arch, table: &BudgetTable) -> (Vec<String>, Vec<String>) {
    let (mut failures, mut report) = (Vec::new(), Vec::new());
    let loops = sass::loops(listing);
    for (kernel, budget) in &table.mxfp4_loops {
        let Some((_, found)) = loops.iter().find(|(name, _)| name == kernel) else {
            continue;
        };
        let Some(body) = found.iter().max_by_key(|l| l.instructions.len()) else {
            failures.push(format!("{arch} {kernel}: no loop in its SASS"));
            continue;
        };
        let len = body.instructions.len();
        let accumulations = body.count("FADD") + body.count("FFMA");
        let per_weight = len as f64 / f64::from(budget.weights_per_iteration);
        report.push(format!(
            "{arch} {kernel}: inner loop {:#x}..{:#x}: {len} instructions, {} weights, \
             {per_weight:.3} per weight ({accumulations} FADD/FFMA)",
            body.start, body.end, budget.weights_per_iteration
        ));
        if accumulations < budget.weights_per_iteration as usize {
            failures.push(format!(
                "{arch} {kernel}: the inner loop has {accumulations} FADD/FFMA, fewer than the \
                 {} weights kernel_budgets.toml says it handles",
                budget.weights_per_iteration
            ));
        }
        if per_weight > budget.instructions_per_weight {
            failures.push(format!(
                "{arch} {kernel}: {per_weight:.3} instructions per weight in the MXFP4 inner \
                 loop, above the budget of {}",
                budget.instructions_per_weight
            ));
        }
    }
    (failures, report)
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

/// Under `CI=true` a missing tool fails the test; elsewhere the test prints why it skips.
fn missing(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {what}");
    }
    eprintln!("SKIPPED: {what}");
}

/// `$CUOBJDUMP`, else `cuobjdump` on `PATH`.
fn cuobjdump() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CUOBJDUMP") {
        return Some(path.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("cuobjdump"))
        .find(|p| p.is_file())
}

const NO_CUOBJDUMP: &str = "no cuobjdump for the SASS lint: `pip install \
    nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51` and put their bin folder on \
    PATH (cuobjdump runs nvdisasm), or set CUOBJDUMP";

/// The SASS lint's findings for one compiled source, plus a line if the listing is not the
/// kernels ptxas reported (the lint would then be looking at nothing).
fn lint(tool: &Path, dir: &Path, name: &str, arch: Arch, compiled: &Compiled) -> Vec<String> {
    match listing(tool, dir, name, arch, compiled) {
        Ok(listing) => lint_listing(&listing, name, arch, compiled),
        Err(e) => vec![e],
    }
}

/// The SASS listing of one compiled source.
fn listing(
    tool: &Path,
    dir: &Path,
    name: &str,
    arch: Arch,
    compiled: &Compiled,
) -> Result<String, String> {
    let path = dir.join(format!("{name}.{arch}.cubin"));
    std::fs::write(&path, &compiled.cubin).expect("the temporary cubin is written");
    sass::dump(tool, &path).map_err(|e| e.to_string())
}

fn lint_listing(listing: &str, name: &str, arch: Arch, compiled: &Compiled) -> Vec<String> {
    let mut found: Vec<String> = sass::lint(listing)
        .iter()
        .map(|f| format!("{arch} {f}"))
        .collect();
    let mut listed: Vec<String> = sass::kernels(listing).into_iter().map(|(n, _)| n).collect();
    let mut reported: Vec<String> = compiled.kernels.iter().map(|k| k.name.clone()).collect();
    listed.sort();
    reported.sort();
    if listed != reported {
        found.push(format!(
            "{arch} {name}: cuobjdump lists {listed:?}, ptxas {reported:?}"
        ));
    }
    found
}

#[test]
fn every_kernel_compiles_for_every_architecture_within_its_budget() {
    if !nvrtc::library_present() {
        return missing(NO_NVRTC_HELP);
    }
    let tool = cuobjdump();
    if tool.is_none() {
        missing(NO_CUOBJDUMP);
    }
    let cubins = tempfile::tempdir().expect("a temporary directory");
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
                        .map(|(name, source)| (arch, (name, nvrtc::compile(name, source, arch))))
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
    let mut linted = 0;
    let mut loop_report = Vec::new();
    let loop_arch: Arch = LOOP_ARCH.parse().expect("a valid arch");
    for (arch, (name, result)) in results.into_iter().flatten() {
        if let (Some(tool), Ok(compiled)) = (&tool, &result) {
            match listing(tool, cubins.path(), name, arch, compiled) {
                Ok(listing) => {
                    failures.extend(lint_listing(&listing, name, arch, compiled));
                    if arch == loop_arch {
                        let (failed, report) = loop_findings(&listing, arch, &table);
                        failures.extend(failed);
                        loop_report.extend(report);
                    }
                }
                Err(e) => failures.push(e),
            }
            linted += 1;
        }
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
        println!("  {:<7} {}", r.arch, r.kernel);
    }
    println!("SASS lint: {linted} cubins");
    for line in &loop_report {
        println!("  {line}");
    }
    if tool.is_some() && loop_report.len() < table.mxfp4_loops.len() {
        failures.push(format!(
            "MXFP4 loop budgets: measured {} of the {} kernels kernel_budgets.toml names",
            loop_report.len(),
            table.mxfp4_loops.len()
        ));
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
            kernels: BTreeMap::from([("a".into(), table.kernels["a"])]),
            mxfp4_loops: BTreeMap::new(),
        }
    )
    .is_empty());
}

/// The lint on real compiler output: a float atomic on global memory, a float add on shared
/// memory (a compare-and-swap loop) and a dynamically indexed local array are caught; an
/// integer atomic is not.
#[test]
fn the_sass_lint_catches_float_atomics_and_local_memory_in_real_cubins() {
    if !nvrtc::library_present() {
        return missing(NO_NVRTC_HELP);
    }
    let Some(tool) = cuobjdump() else {
        return missing(NO_CUOBJDUMP);
    };
    const SOURCE: &str = r#"
extern "C" __global__ void global_float_add(float* p, float v) { atomicAdd(p, v); }
extern "C" __global__ void shared_float_add(float* p, float v) {
    __shared__ float s[32];
    s[threadIdx.x % 32] = 0.0f;
    __syncthreads();
    atomicAdd(&s[threadIdx.x % 7], v);
    __syncthreads();
    p[threadIdx.x] = s[threadIdx.x % 32];
}
extern "C" __global__ void int_add(int* p, int v) { atomicAdd(p, v); }
extern "C" __global__ void local_array(float* p, int i) {
    float a[64];
    for (int k = 0; k < 64; k++) a[k] = p[k + threadIdx.x];
    a[i & 63] += 1.0f;
    p[threadIdx.x] = a[(i >> 3) & 63];
}
"#;
    let dir = tempfile::tempdir().expect("a temporary directory");
    for arch in ["sm_80", "sm_90", "sm_120"] {
        let arch: Arch = arch.parse().expect("a valid arch");
        let compiled = nvrtc::compile("lint_probe", SOURCE, arch).expect("the probe compiles");
        let found = lint(&tool, dir.path(), "lint_probe", arch, &compiled);
        let flagged = |kernel: &str, rule: &str| {
            found
                .iter()
                .any(|f| f.contains(&format!("{kernel}: {rule}")))
        };
        assert!(
            flagged("global_float_add", "float atomic"),
            "{arch}: {found:#?}"
        );
        assert!(
            flagged("shared_float_add", "float atomic"),
            "{arch}: {found:#?}"
        );
        assert!(flagged("local_array", "local memory"), "{arch}: {found:#?}");
        assert!(
            !found.iter().any(|f| f.contains("int_add")),
            "{arch}: {found:#?}"
        );
    }
}
