//! Where a stage runs: `cpu`, `cpu:0-3` (a core set) or `cuda:N`.
//!
//! A core set is a comma-separated list of cores and inclusive ranges (`0,2,4-7`); it parses
//! into sorted, distinct core numbers and prints back in the shortest range form, so
//! `Device::from_str(&d.to_string()) == Ok(d)`.

use std::fmt;
use std::str::FromStr;

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
pub(super) fn parse_core_set(set: &str) -> Result<Vec<usize>, DeviceParseError> {
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
}
