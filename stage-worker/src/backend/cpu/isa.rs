//! The instruction sets the CPU kernels come in, and which one this CPU runs.
//!
//! Every choice gives bit-identical results (see `kernels.rs`); only the speed differs. The
//! choice is made at run time, so one binary runs everywhere.

/// The instruction set the kernels run with. Every choice gives bit-identical results; only the
/// speed differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust (`f32::mul_add`), for any CPU.
    Portable,
    /// x86-64 AVX2 + FMA.
    Avx2Fma,
    /// x86-64 AVX-512 F + VL, with AVX2 + FMA.
    Avx512,
    /// x86-64 AVX-512 F + VL + VBMI (Ice Lake, Zen 4 and later), with AVX2 + FMA.
    Avx512Vbmi,
}

impl Isa {
    /// The fastest instruction set this CPU supports, capped by the environment variable
    /// [`ISA_ENV`] when it names one (`portable`, `avx2`, `avx512` or `avx512vbmi`): a way to
    /// run, measure or debug a slower path on a faster CPU. An unknown name is ignored.
    pub fn detect() -> Isa {
        let cap = std::env::var(ISA_ENV)
            .ok()
            .and_then(|name| Isa::from_name(&name))
            .unwrap_or(Isa::Avx512Vbmi);
        [Isa::Avx512Vbmi, Isa::Avx512, Isa::Avx2Fma]
            .into_iter()
            .find(|&isa| isa <= cap && isa.is_available())
            .unwrap_or(Isa::Portable)
    }

    /// The instruction set a name given to [`ISA_ENV`] stands for.
    pub fn from_name(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "portable" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2Fma),
            "avx512" => Some(Isa::Avx512),
            "avx512vbmi" => Some(Isa::Avx512Vbmi),
            _ => None,
        }
    }

    /// Whether this CPU can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2Fma => avx2_fma_detected(),
            Isa::Avx512 => avx2_fma_detected() && avx512_detected(),
            Isa::Avx512Vbmi => avx2_fma_detected() && avx512_detected() && vbmi_detected(),
        }
    }
}

/// The environment variable that caps [`Isa::detect`].
pub const ISA_ENV: &str = "GPTOSSD_CPU_ISA";

#[cfg(target_arch = "x86_64")]
fn avx2_fma_detected() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn avx512_detected() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
}

#[cfg(target_arch = "x86_64")]
fn vbmi_detected() -> bool {
    is_x86_feature_detected!("avx512vbmi")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_fma_detected() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_detected() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn vbmi_detected() -> bool {
    false
}
