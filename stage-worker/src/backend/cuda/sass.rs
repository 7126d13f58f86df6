//! A lint over the machine code (SASS) of compiled kernels, for the checks that compile them
//! (`tests/kernels_compile.rs`, `examples/kernel_report.rs`); the worker never runs it.
//!
//! `cuobjdump -sass` (it needs `nvdisasm` on `PATH`) prints each kernel as `Function : name`
//! followed by instruction lines `/*0080*/  @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;`. The lint
//! flags, per kernel:
//! - local memory (`LDL`, `STL`): spilled or indexed-array data lives in slow memory;
//! - float atomics (`ATOM`, `ATOMG`, `ATOMS`, `RED`, `REDG` on a floating-point type, or
//!   `ATOMS.CAST.SPIN`, the compare-and-swap loop a float add on shared memory compiles to):
//!   their order of arrival, hence the rounding of a sum, changes from run to run, which breaks
//!   batch invariance (integer atomics, `ATOMS.CAS` included, are exact and allowed).
//!
//! It also measures loops ([`loops`]): a loop body is the instructions from a backward branch's
//! target to that branch, so the MXFP4 GEMV's inner loop can be held to an instruction budget
//! per weight (`tests/kernel_budgets.toml`, `[mxfp4_loops]`).

use std::fmt;
use std::path::Path;
use std::process::Command;

/// One instruction the lint rejects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kernel: String,
    pub rule: Rule,
    /// The instruction as cuobjdump printed it.
    pub instruction: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    LocalMemory,
    FloatAtomic,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rule = match self.rule {
            Rule::LocalMemory => "local memory",
            Rule::FloatAtomic => "float atomic",
        };
        write!(f, "{}: {rule}: {}", self.kernel, self.instruction)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SassError {
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error("{tool} failed on {cubin}: {stderr}")]
    Failed {
        tool: String,
        cubin: String,
        stderr: String,
    },
}

/// `cuobjdump -sass cubin` as text.
pub fn dump(cuobjdump: &Path, cubin: &Path) -> Result<String, SassError> {
    let tool = cuobjdump.display().to_string();
    let out = Command::new(cuobjdump)
        .arg("-sass")
        .arg(cubin)
        .output()
        .map_err(|source| SassError::Spawn {
            tool: tool.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(SassError::Failed {
            tool,
            cubin: cubin.display().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernels of a SASS listing, as (name, instructions), in listing order.
pub fn kernels(sass: &str) -> Vec<(String, Vec<String>)> {
    located(sass)
        .into_iter()
        .map(|(name, body)| (name, body.into_iter().map(|(_, i)| i).collect()))
        .collect()
}

/// The kernels of a SASS listing with each instruction's byte offset.
fn located(sass: &str) -> Vec<(String, Vec<(u64, String)>)> {
    let mut kernels: Vec<(String, Vec<(u64, String)>)> = Vec::new();
    for line in sass.lines() {
        if let Some(name) = line.split("Function : ").nth(1) {
            kernels.push((name.trim().to_string(), Vec::new()));
        } else if let (Some((offset, instruction)), Some((_, body))) =
            (instruction(line), kernels.last_mut())
        {
            body.push((offset, instruction.to_string()));
        }
    }
    kernels
}

/// The instruction on a listing line: its `/*offset*/` and the text up to the `;`.
fn instruction(line: &str) -> Option<(u64, &str)> {
    let line = line.trim_start();
    let rest = line.strip_prefix("/*")?;
    let (offset, rest) = rest.split_once("*/")?;
    if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let offset = u64::from_str_radix(offset, 16).ok()?;
    let (text, _) = rest.split_once(';')?;
    Some((offset, text.trim()))
}

/// One loop of a kernel: the instructions from the target of a backward branch (`BRA` to an
/// offset at or before its own) up to and including that branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loop {
    /// Offset of the loop's first instruction (the branch target).
    pub start: u64,
    /// Offset of the backward branch.
    pub end: u64,
    pub instructions: Vec<String>,
}

impl Loop {
    /// How many instructions of the body have this base opcode (`FFMA`, `LOP3`, ...).
    pub fn count(&self, base: &str) -> usize {
        self.instructions
            .iter()
            .filter(|i| opcode(i).split('.').next() == Some(base))
            .count()
    }
}

/// Every loop of every kernel, as (kernel name, loops in listing order). A branch to itself
/// (the `BRA` after `EXIT` that pads a kernel) is not a loop.
pub fn loops(sass: &str) -> Vec<(String, Vec<Loop>)> {
    located(sass)
        .into_iter()
        .map(|(name, body)| {
            let mut found = Vec::new();
            for (i, (end, text)) in body.iter().enumerate() {
                let Some(target) = branch_target(text) else {
                    continue;
                };
                if target >= *end {
                    continue;
                }
                if let Some(first) = body[..i].iter().position(|(o, _)| *o == target) {
                    found.push(Loop {
                        start: target,
                        end: *end,
                        instructions: body[first..=i].iter().map(|(_, t)| t.clone()).collect(),
                    });
                }
            }
            (name, found)
        })
        .collect()
}

/// The target offset of a `BRA` instruction (`@P0 BRA 0x510`).
fn branch_target(instruction: &str) -> Option<u64> {
    if opcode(instruction).split('.').next() != Some("BRA") {
        return None;
    }
    let last = instruction.split_whitespace().last()?;
    u64::from_str_radix(last.strip_prefix("0x")?, 16).ok()
}

/// The opcode with its modifiers (`LDG.E.128`), past an optional predicate (`@!P0`).
fn opcode(instruction: &str) -> &str {
    let mut words = instruction.split_whitespace();
    let first = words.next().unwrap_or_default();
    if first.starts_with('@') {
        words.next().unwrap_or_default()
    } else {
        first
    }
}

/// Every instruction of `sass` that breaks a rule.
pub fn lint(sass: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (kernel, body) in kernels(sass) {
        for instruction in body {
            let op = opcode(&instruction);
            let mut parts = op.split('.');
            let base = parts.next().unwrap_or_default();
            let modifiers: Vec<&str> = parts.collect();
            let rule = match base {
                "LDL" | "STL" => Some(Rule::LocalMemory),
                "ATOM" | "ATOMG" | "ATOMS" | "RED" | "REDG"
                    if modifiers.iter().any(|m| is_float_type(m) || *m == "CAST") =>
                {
                    Some(Rule::FloatAtomic)
                }
                _ => None,
            };
            if let Some(rule) = rule {
                findings.push(Finding {
                    kernel: kernel.clone(),
                    rule,
                    instruction: instruction.clone(),
                });
            }
        }
    }
    findings
}

fn is_float_type(modifier: &str) -> bool {
    matches!(
        modifier,
        "F32" | "F64" | "F16" | "F16x2" | "BF16" | "BF16x2" | "BF16_V2" | "F16_V2" | "FTZ" | "RN"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape `cuobjdump -sass` prints (13.2, sm_90), trimmed.
    const SASS: &str = "
\tcode for sm_90
\t\tFunction : good
\t.headerflags\t@\"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90\"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                /* 0x00000a00ff017b82 */
                                                                         /* 0x000fe20000000800 */
        /*0010*/              @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;      /* 0x0000000602047981 */
        /*0020*/                   ATOMG.E.ADD.STRONG.GPU PT, R5, desc[UR4][R2.64], R5 ;
        /*0028*/                   ATOMS.CAS RZ, [R0], R8, R9 ;
        /*0030*/                   EXIT ;
\t\tFunction : bad
        /*0000*/                   STL [R1], R4 ;
        /*0010*/                   LDL.64 R4, [R1+0x8] ;
        /*0020*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R0 ;
        /*0030*/               @P1 ATOMS.ADD.F32 RZ, [R3], R0 ;
        /*0038*/                   ATOMS.CAST.SPIN P0, [R0], R2, R3 ;
        /*0040*/                   EXIT ;
";

    #[test]
    fn kernels_and_their_instructions_are_read() {
        let kernels = kernels(SASS);
        assert_eq!(kernels.len(), 2);
        assert_eq!(kernels[0].0, "good");
        assert_eq!(
            kernels[0].1,
            [
                "LDC R1, c[0x0][0x28]",
                "@!P0 LDG.E.128 R4, desc[UR6][R2.64]",
                "ATOMG.E.ADD.STRONG.GPU PT, R5, desc[UR4][R2.64], R5",
                "ATOMS.CAS RZ, [R0], R8, R9",
                "EXIT"
            ]
        );
        assert_eq!(opcode(&kernels[0].1[1]), "LDG.E.128");
    }

    #[test]
    fn loops_run_from_a_backward_branch_target_to_the_branch() {
        const LOOPS: &str = "
\t\tFunction : k
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0020*/                   FFMA R0, R4, R5, R0 ;
        /*0030*/                   FFMA R0, R6, R7, R0 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/              @!P1 BRA 0x80 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70 ;
";
        let found = loops(LOOPS);
        assert_eq!(found.len(), 1);
        let (name, loops) = &found[0];
        assert_eq!(name, "k");
        assert_eq!(loops.len(), 1, "{loops:?}");
        assert_eq!((loops[0].start, loops[0].end), (0x10, 0x40));
        assert_eq!(loops[0].instructions.len(), 4);
        assert_eq!(loops[0].count("FFMA"), 2);
        assert_eq!(loops[0].count("LDG"), 1);
    }

    #[test]
    fn local_memory_and_float_atomics_are_flagged_integer_atomics_are_not() {
        let found: Vec<(String, Rule)> =
            lint(SASS).into_iter().map(|f| (f.kernel, f.rule)).collect();
        let bad = |rule| ("bad".to_string(), rule);
        assert_eq!(
            found,
            [
                bad(Rule::LocalMemory),
                bad(Rule::LocalMemory),
                bad(Rule::FloatAtomic),
                bad(Rule::FloatAtomic),
                bad(Rule::FloatAtomic)
            ]
        );
    }
}
