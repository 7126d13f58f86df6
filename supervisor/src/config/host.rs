//! What the configuration takes from the machine and the environment, and the pure rules that
//! turn those facts into defaults.
//!
//! Every fact is read in one place, [`Host::detect`]; the checks take a [`Host`] as a plain
//! value, so tests can describe any machine (two NUMA nodes, a user without
//! `$XDG_RUNTIME_DIR`…). The rules are pure functions of it:
//!
//! - [`default_control_socket`]: `server.control_socket` when the file gives none.
//! - [`default_layout`]: a model's stages and devices when the file gives none of `stages`,
//!   `devices` and `layers` (and `--stages` is not given): one stage per GPU; with no GPU, one
//!   per NUMA node, each pinned to its node's cores when there are several.
//!
//! GPU discovery is not built yet (no CUDA backend exists): [`Host::detect`] always finds none,
//! so GPUs are used only when `devices` lists them. Discovery plugs in at `detect_gpus`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use gptossd_shared::device::{parse_core_set, Device};

/// Set by systemd for a unit with `RuntimeDirectory=` (the packaged unit has
/// `RuntimeDirectory=gptossd`): the directory it made, or several separated by colons.
pub const RUNTIME_DIRECTORY_ENV: &str = "RUNTIME_DIRECTORY";

/// The user's private runtime directory (XDG Base Directory specification).
pub const XDG_RUNTIME_DIR_ENV: &str = "XDG_RUNTIME_DIR";

/// The control socket's file name inside whichever directory the rule picks.
const CONTROL_SOCKET_NAME: &str = "control.sock";

/// Where the NUMA nodes are described (`node<N>/cpulist` in each).
const NUMA_SYSFS: &str = "/sys/devices/system/node";

/// The facts about this machine and process that defaults depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Cores the daemon may run on (its affinity mask), at least 1: the `threads_per_stage`
    /// default for stages that are not pinned.
    pub cores: usize,
    /// The cores of each NUMA node that the daemon may run on, in node order; nodes with no
    /// such core (memory-only nodes, or outside the affinity mask) are left out. Empty when
    /// the machine does not say (no sysfs): then taken as one node.
    pub numa_nodes: Vec<Vec<usize>>,
    /// GPUs found, by CUDA ordinal. Always empty for now: see `detect_gpus`.
    pub gpus: Vec<u32>,
    /// The daemon's real user id.
    pub uid: u32,
    /// `$RUNTIME_DIRECTORY`, when set.
    pub runtime_directory: Option<OsString>,
    /// `$XDG_RUNTIME_DIR`, when set.
    pub xdg_runtime_dir: Option<OsString>,
}

impl Host {
    /// Reads the facts from this machine and process: the affinity mask (via the standard
    /// library), `/sys/devices/system/node/node*/cpulist` intersected with
    /// `/proc/self/status`'s `Cpus_allowed_list`, the user id and two environment variables.
    /// Anything unreadable counts as "not known" (one NUMA node, no runtime directory).
    pub fn detect() -> Self {
        let allowed = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| allowed_cpus(&s));
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            numa_nodes: numa_nodes(&read_numa_sysfs(Path::new(NUMA_SYSFS)), allowed.as_deref()),
            gpus: detect_gpus(),
            uid: nix::unistd::getuid().as_raw(),
            runtime_directory: std::env::var_os(RUNTIME_DIRECTORY_ENV),
            xdg_runtime_dir: std::env::var_os(XDG_RUNTIME_DIR_ENV),
        }
    }
}

/// GPU discovery plugs in here (CUDA ordinals of the usable GPUs). None is found until the
/// CUDA backend exists: a machine with GPUs then runs on its CPUs unless `devices` lists them.
fn detect_gpus() -> Vec<u32> {
    Vec::new()
}

/// `(node number, cpulist text)` of every `node<N>` directory under `dir`, unsorted; empty when
/// `dir` cannot be read.
fn read_numa_sysfs(dir: &Path) -> Vec<(usize, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix("node")?.parse().ok()?;
            let list = std::fs::read_to_string(e.path().join("cpulist")).ok()?;
            Some((n, list))
        })
        .collect()
}

/// The `Cpus_allowed_list` of a `/proc/<pid>/status` text.
fn allowed_cpus(status: &str) -> Option<Vec<usize>> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_core_set(list.trim()).ok()
}

/// The core sets of the nodes, in node order, restricted to `allowed` (when known); nodes left
/// with no core, or whose cpulist does not parse, are dropped.
fn numa_nodes(nodes: &[(usize, String)], allowed: Option<&[usize]>) -> Vec<Vec<usize>> {
    let mut nodes: Vec<(usize, Vec<usize>)> = nodes
        .iter()
        .filter_map(|(n, text)| {
            let text = text.trim();
            if text.is_empty() {
                return None;
            }
            let mut cores = parse_core_set(text).ok()?;
            if let Some(allowed) = allowed {
                cores.retain(|c| allowed.contains(c));
            }
            (!cores.is_empty()).then_some((*n, cores))
        })
        .collect();
    nodes.sort_unstable_by_key(|(n, _)| *n);
    nodes.into_iter().map(|(_, cores)| cores).collect()
}

/// Which rule gave `server.control_socket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlSocketSource {
    /// Written in the config file.
    Configured,
    /// `$RUNTIME_DIRECTORY/control.sock` (the first directory when several are listed):
    /// systemd made the directory, with the unit's `RuntimeDirectoryMode`.
    RuntimeDirectory,
    /// `$XDG_RUNTIME_DIR/gptossd/control.sock`: under the user's own runtime directory.
    XdgRuntimeDir,
    /// `/run/gptossd/control.sock`: root, with neither variable set.
    SystemRun,
    /// `/tmp/gptossd-<uid>/control.sock`: any other user with neither variable set.
    TmpPerUser,
}

impl ControlSocketSource {
    /// Why this path, for the start-up log.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Configured => "from server.control_socket",
            Self::RuntimeDirectory => "default: in $RUNTIME_DIRECTORY (set by systemd)",
            Self::XdgRuntimeDir => "default: under $XDG_RUNTIME_DIR",
            Self::SystemRun => "default for root: /run/gptossd",
            Self::TmpPerUser => {
                "default for a user without $XDG_RUNTIME_DIR: a private directory in /tmp"
            }
        }
    }

    /// Whether the server must make the socket's directory itself, private to this user: create
    /// it mode 0700, and refuse an existing one that is not a directory (a symlink included)
    /// owned by this user without group or other permissions. True for the defaults under
    /// `/tmp` (where another user could have made the directory first) and under
    /// `$XDG_RUNTIME_DIR`; false where the operator or systemd chose the directory (and its
    /// mode, e.g. `RuntimeDirectoryMode=0750` so a group may use the socket).
    pub fn needs_private_dir(self) -> bool {
        matches!(self, Self::TmpPerUser | Self::XdgRuntimeDir)
    }
}

/// The control socket when the file names none: `$RUNTIME_DIRECTORY/control.sock` when systemd
/// set it, else `$XDG_RUNTIME_DIR/gptossd/control.sock` when set, else
/// `/run/gptossd/control.sock` for root (`uid` 0), else `/tmp/gptossd-<uid>/control.sock`.
/// A variable that is empty or not an absolute path counts as unset (as the XDG specification
/// says); of several colon-separated runtime directories the first is taken.
pub fn default_control_socket(
    runtime_directory: Option<&OsStr>,
    xdg_runtime_dir: Option<&OsStr>,
    uid: u32,
) -> (PathBuf, ControlSocketSource) {
    let absolute = |v: Option<&OsStr>| {
        v.map(Path::new)
            .filter(|p| p.is_absolute())
            .map(Path::to_path_buf)
    };
    let runtime = runtime_directory
        .and_then(|v| v.as_bytes().split(|&b| b == b':').next())
        .map(OsStr::from_bytes);
    if let Some(dir) = absolute(runtime) {
        return (
            dir.join(CONTROL_SOCKET_NAME),
            ControlSocketSource::RuntimeDirectory,
        );
    }
    if let Some(dir) = absolute(xdg_runtime_dir) {
        return (
            dir.join("gptossd").join(CONTROL_SOCKET_NAME),
            ControlSocketSource::XdgRuntimeDir,
        );
    }
    if uid == 0 {
        return (
            Path::new("/run/gptossd").join(CONTROL_SOCKET_NAME),
            ControlSocketSource::SystemRun,
        );
    }
    (
        PathBuf::from(format!("/tmp/gptossd-{uid}")).join(CONTROL_SOCKET_NAME),
        ControlSocketSource::TmpPerUser,
    )
}

/// A model's stages and devices when the file and the command line give none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultLayout {
    /// One per stage.
    pub devices: Vec<Device>,
    /// Which rule applied and why, e.g. "1 stage: one per NUMA node (1 node, no GPU devices
    /// configured)".
    pub reason: String,
}

/// One stage per GPU (`cuda:N`); with no GPU, one per NUMA node: several nodes give one stage
/// pinned to each node's cores (`cpu:LIST`), one node (or no NUMA information) gives a single
/// unpinned `cpu` stage.
pub fn default_layout(host: &Host) -> DefaultLayout {
    if !host.gpus.is_empty() {
        let n = host.gpus.len();
        return DefaultLayout {
            devices: host
                .gpus
                .iter()
                .map(|&ordinal| Device::Cuda { ordinal })
                .collect(),
            reason: format!("{}: one per GPU ({n} found)", stages_phrase(n)),
        };
    }
    match host.numa_nodes.len() {
        0 => DefaultLayout {
            devices: vec![Device::Cpu { cores: None }],
            reason: format!(
                "{}: one per NUMA node (no NUMA information, taken as 1 node; no GPU devices \
                 configured)",
                stages_phrase(1)
            ),
        },
        1 => DefaultLayout {
            devices: vec![Device::Cpu { cores: None }],
            reason: format!(
                "{}: one per NUMA node (1 node, no GPU devices configured)",
                stages_phrase(1)
            ),
        },
        n => DefaultLayout {
            devices: host
                .numa_nodes
                .iter()
                .map(|cores| Device::Cpu {
                    cores: Some(cores.clone()),
                })
                .collect(),
            reason: format!(
                "{}: one per NUMA node ({n} nodes, no GPU devices configured), each pinned to \
                 its node's cores",
                stages_phrase(n)
            ),
        },
    }
}

/// "1 stage", "4 stages".
pub(super) fn stages_phrase(n: usize) -> String {
    if n == 1 {
        "1 stage".to_string()
    } else {
        format!("{n} stages")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(numa_nodes: Vec<Vec<usize>>, gpus: Vec<u32>) -> Host {
        Host {
            cores: 8,
            numa_nodes,
            gpus,
            uid: 1000,
            runtime_directory: None,
            xdg_runtime_dir: None,
        }
    }

    #[test]
    fn control_socket_in_the_runtime_directory_systemd_made() {
        let (path, source) = default_control_socket(
            Some(OsStr::new("/run/gptossd")),
            Some(OsStr::new("/run/user/1000")),
            1000,
        );
        assert_eq!(path, Path::new("/run/gptossd/control.sock"));
        assert_eq!(source, ControlSocketSource::RuntimeDirectory);
        assert!(!source.needs_private_dir());
        // Several directories: the first.
        let (path, _) = default_control_socket(Some(OsStr::new("/run/a:/run/b")), None, 0);
        assert_eq!(path, Path::new("/run/a/control.sock"));
    }

    #[test]
    fn control_socket_under_the_users_xdg_runtime_dir() {
        for runtime in [None, Some(""), Some("relative/dir")] {
            let (path, source) = default_control_socket(
                runtime.map(OsStr::new),
                Some(OsStr::new("/run/user/1000")),
                1000,
            );
            assert_eq!(
                path,
                Path::new("/run/user/1000/gptossd/control.sock"),
                "{runtime:?}"
            );
            assert_eq!(source, ControlSocketSource::XdgRuntimeDir);
        }
        assert!(ControlSocketSource::XdgRuntimeDir.needs_private_dir());
    }

    #[test]
    fn control_socket_in_run_for_root() {
        for xdg in [None, Some(""), Some("not/absolute")] {
            let (path, source) = default_control_socket(None, xdg.map(OsStr::new), 0);
            assert_eq!(path, Path::new("/run/gptossd/control.sock"), "{xdg:?}");
            assert_eq!(source, ControlSocketSource::SystemRun);
        }
        assert!(!ControlSocketSource::SystemRun.needs_private_dir());
    }

    #[test]
    fn control_socket_in_a_private_tmp_directory_for_other_users() {
        let (path, source) = default_control_socket(None, Some(OsStr::new("")), 1234);
        assert_eq!(path, Path::new("/tmp/gptossd-1234/control.sock"));
        assert_eq!(source, ControlSocketSource::TmpPerUser);
        assert!(source.needs_private_dir());
        assert!(source.describe().contains("/tmp"));
    }

    #[test]
    fn one_stage_on_a_single_node_machine_or_without_numa_information() {
        for nodes in [vec![], vec![vec![0, 1]]] {
            let layout = default_layout(&host(nodes.clone(), Vec::new()));
            assert_eq!(
                layout.devices,
                vec![Device::Cpu { cores: None }],
                "{nodes:?}"
            );
            assert!(
                layout.reason.starts_with("1 stage: one per NUMA node"),
                "{}",
                layout.reason
            );
        }
        assert_eq!(
            default_layout(&host(vec![vec![0, 1]], Vec::new())).reason,
            "1 stage: one per NUMA node (1 node, no GPU devices configured)"
        );
    }

    #[test]
    fn one_pinned_stage_per_numa_node() {
        let layout = default_layout(&host(vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]], Vec::new()));
        assert_eq!(
            layout
                .devices
                .iter()
                .map(Device::to_string)
                .collect::<Vec<_>>(),
            ["cpu:0-3", "cpu:4-7"]
        );
        assert_eq!(
            layout.reason,
            "2 stages: one per NUMA node (2 nodes, no GPU devices configured), each pinned to \
             its node's cores"
        );
    }

    #[test]
    fn one_stage_per_gpu_when_gpus_are_found() {
        let layout = default_layout(&host(vec![vec![0], vec![1]], vec![0, 1, 2]));
        assert_eq!(
            layout.devices,
            vec![
                Device::Cuda { ordinal: 0 },
                Device::Cuda { ordinal: 1 },
                Device::Cuda { ordinal: 2 }
            ]
        );
        assert_eq!(layout.reason, "3 stages: one per GPU (3 found)");
    }

    #[test]
    fn numa_nodes_from_sysfs_texts() {
        let sysfs = [
            (1, "4-7\n".to_string()),
            (0, "0-3\n".to_string()),
            (2, "\n".to_string()), // a memory-only node
            (3, "garbage\n".to_string()),
        ];
        assert_eq!(
            numa_nodes(&sysfs, None),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
        // Restricted to the affinity mask; a node left without cores is dropped.
        assert_eq!(numa_nodes(&sysfs, Some(&[2, 3])), vec![vec![2, 3]]);
        let status = "Name:\tgptossd\nCpus_allowed:\tf\nCpus_allowed_list:\t0-2,5\nMems:\t1\n";
        assert_eq!(allowed_cpus(status), Some(vec![0, 1, 2, 5]));
        assert_eq!(allowed_cpus("Name:\tx\n"), None);
    }

    #[test]
    fn reads_a_sysfs_node_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, list) in [("node0", "0-1\n"), ("node1", "2-3\n")] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
            std::fs::write(dir.path().join(name).join("cpulist"), list).expect("write");
        }
        std::fs::create_dir(dir.path().join("power")).expect("mkdir");
        let mut found = read_numa_sysfs(dir.path());
        found.sort();
        assert_eq!(found, vec![(0, "0-1\n".into()), (1, "2-3\n".into())]);
        assert!(read_numa_sysfs(&dir.path().join("missing")).is_empty());
    }
}
