//! Where a stage runs — `cpu`, `cpu:0-3` (a core set) or `cuda:N` — and which kind of backend
//! computes there. One grammar for both sides of the process boundary: the supervisor parses
//! its configuration with it, the stage worker its `--device` argument.
//!
//! A core set is a comma-separated list of cores and inclusive ranges (`0,2,4-7`); it parses
//! into sorted, distinct core numbers and prints back in the shortest range form, so
//! `Device::from_str(&d.to_string()) == Ok(d)`. Serde reads and writes a [`Device`] as that
//! string, so the wire, JSON and the command line all carry the same text.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The device a stage worker is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend. `cores`: the cores the worker is pinned to (sorted, distinct, not
    /// empty); `None` for `"cpu"`, which leaves placement to the kernel.
    Cpu { cores: Option<Vec<usize>> },
    /// The CUDA backend on GPU `ordinal` (as CUDA numbers them).
    Cuda { ordinal: u32 },
}

/// Why a device string is not one. The message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeviceParseError(String);

/// The largest core number accepted (a guard against `cpu:0-4000000000`).
const MAX_CORE: usize = 65_535;

const EXPECTED: &str =
    "expected \"cpu\", \"cpu:CORES\" (e.g. \"cpu:0-3\" or \"cpu:0,2,4-7\") or \"cuda:N\"";

impl FromStr for Device {
    type Err = DeviceParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |why: String| DeviceParseError(why);
        match s.split_once(':') {
            None if s == "cpu" => Ok(Device::Cpu { cores: None }),
            None => Err(fail(EXPECTED.to_string())),
            Some(("cpu", set)) => {
                parse_core_set(set).map(|cores| Device::Cpu { cores: Some(cores) })
            }
            Some(("cuda", n)) => n
                .parse::<u32>()
                .map(|ordinal| Device::Cuda { ordinal })
                .map_err(|_| fail(format!("the GPU number {n:?} is not a number; {EXPECTED}"))),
            Some(_) => Err(fail(EXPECTED.to_string())),
        }
    }
}

/// `0,2,4-7` → `[0, 2, 4, 5, 6, 7]` (also the form of Linux's `cpulist` files).
pub fn parse_core_set(set: &str) -> Result<Vec<usize>, DeviceParseError> {
    let fail = |why: String| DeviceParseError(why);
    let core = |t: &str| -> Result<usize, DeviceParseError> {
        let n = t
            .trim()
            .parse::<usize>()
            .map_err(|_| fail(format!("{t:?} is not a core number; {EXPECTED}")))?;
        if n > MAX_CORE {
            return Err(fail(format!("core {n} is above {MAX_CORE}")));
        }
        Ok(n)
    };
    let mut cores = Vec::new();
    for item in set.split(',') {
        match item.split_once('-') {
            None => cores.push(core(item)?),
            Some((lo, hi)) => {
                let (lo, hi) = (core(lo)?, core(hi)?);
                if lo > hi {
                    return Err(fail(format!("the core range {item:?} runs backwards")));
                }
                cores.extend(lo..=hi);
            }
        }
    }
    cores.sort_unstable();
    if let Some(w) = cores.windows(2).find(|w| w[0] == w[1]) {
        return Err(fail(format!("core {} is listed twice", w[0])));
    }
    Ok(cores)
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu { cores: None } => f.write_str("cpu"),
            Device::Cpu { cores: Some(cores) } => {
                f.write_str("cpu:")?;
                let mut i = 0;
                let mut first = true;
                while i < cores.len() {
                    let mut j = i;
                    while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
                        j += 1;
                    }
                    if !first {
                        f.write_str(",")?;
                    }
                    first = false;
                    if j == i {
                        write!(f, "{}", cores[i])?;
                    } else {
                        write!(f, "{}-{}", cores[i], cores[j])?;
                    }
                    i = j + 1;
                }
                Ok(())
            }
            Device::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl Device {
    /// The kind of backend that computes on this device.
    pub fn kind(&self) -> BackendKind {
        match self {
            Device::Cpu { .. } => BackendKind::Cpu,
            Device::Cuda { .. } => BackendKind::Cuda,
        }
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The kind of backend a stage computes with. Serialized as `"cpu"` or `"cuda"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The backends of a pipeline's stages as one name: `cpu`, `cuda`, or `cuda+cpu` when its
/// stages mix both. No stage at all reads as `cpu`.
pub fn pipeline_backend(kinds: impl IntoIterator<Item = BackendKind>) -> &'static str {
    let (mut cpu, mut cuda) = (false, false);
    for kind in kinds {
        match kind {
            BackendKind::Cpu => cpu = true,
            BackendKind::Cuda => cuda = true,
        }
    }
    match (cuda, cpu) {
        (true, true) => "cuda+cpu",
        (true, false) => "cuda",
        (false, _) => "cpu",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(cores: &[usize]) -> Device {
        Device::Cpu {
            cores: Some(cores.to_vec()),
        }
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu { cores: None }));
        assert_eq!("cpu:0-3".parse(), Ok(cpu(&[0, 1, 2, 3])));
        assert_eq!("cpu:0,2,4-7".parse(), Ok(cpu(&[0, 2, 4, 5, 6, 7])));
        assert_eq!("cpu:5".parse(), Ok(cpu(&[5])));
        assert_eq!("cpu:7, 3".parse(), Ok(cpu(&[3, 7])));
        assert_eq!("cuda:0".parse(), Ok(Device::Cuda { ordinal: 0 }));
        assert_eq!("cuda:7".parse(), Ok(Device::Cuda { ordinal: 7 }));
    }

    #[test]
    fn prints_back_in_range_form() {
        for s in [
            "cpu",
            "cpu:0-3",
            "cpu:0,2,4-7",
            "cpu:5",
            "cuda:3",
            "cpu:0-1,3-4",
        ] {
            let d: Device = s.parse().expect(s);
            assert_eq!(d.to_string(), s);
            assert_eq!(d.to_string().parse(), Ok(d));
        }
        assert_eq!(
            "cpu:3,2,1".parse::<Device>().map(|d| d.to_string()),
            Ok("cpu:1-3".into())
        );
    }

    #[test]
    fn rejects_bad_strings_saying_why() {
        for (s, why) in [
            ("gpu:0", "expected"),
            ("cuda", "expected"),
            ("cuda:", "not a number"),
            ("cuda:x", "not a number"),
            ("cuda:-1", "not a number"),
            ("cpu:", "not a core number"),
            ("cpu:a-3", "not a core number"),
            ("cpu:3-1", "backwards"),
            ("cpu:0,0", "listed twice"),
            ("cpu:0-3,2", "listed twice"),
            ("cpu:0-99999999", "above"),
            ("CPU", "expected"),
            ("", "expected"),
        ] {
            let e = s.parse::<Device>().expect_err(s).to_string();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn serde_carries_the_string_form() {
        for d in [
            Device::Cpu { cores: None },
            cpu(&[0, 2, 4, 5, 6, 7]),
            Device::Cuda { ordinal: 3 },
        ] {
            let json = serde_json::to_string(&d).expect("json");
            assert_eq!(json, format!("\"{d}\""));
            assert_eq!(serde_json::from_str::<Device>(&json).expect("back"), d);
            let wire = crate::wire::encode(&d).expect("encode");
            assert_eq!(crate::wire::decode::<Device>(&wire).expect("decode"), d);
        }
        let bad = serde_json::from_str::<Device>("\"cuda:x\"").expect_err("not a device");
        assert!(bad.to_string().contains("not a number"), "{bad}");
    }

    #[test]
    fn backend_kinds_and_the_pipeline_name() {
        use BackendKind::{Cpu, Cuda};
        assert_eq!(Device::Cpu { cores: None }.kind(), Cpu);
        assert_eq!(Device::Cuda { ordinal: 1 }.kind(), Cuda);
        assert_eq!(serde_json::to_string(&Cuda).expect("json"), "\"cuda\"");
        assert_eq!(Cpu.to_string(), "cpu");
        assert_eq!(pipeline_backend([Cpu, Cpu]), "cpu");
        assert_eq!(pipeline_backend([Cuda, Cuda, Cuda]), "cuda");
        assert_eq!(pipeline_backend([Cuda, Cpu]), "cuda+cpu");
        assert_eq!(pipeline_backend([Cpu, Cuda, Cpu]), "cuda+cpu");
        assert_eq!(pipeline_backend([]), "cpu");
    }
}
