//! The on-disk cubin cache: a compiled kernel is kept under a key that hashes everything the
//! cubin depends on, so a worker that starts again loads it instead of running NVRTC.
//!
//! Key: SHA-256 over a format tag and, each length-prefixed, the kernel source, the compile
//! options, the architecture and the NVRTC version ([`CacheKey`]). SHA-256 (the `sha2` crate,
//! already in the workspace's lock file for the golden tests) rather than BLAKE3: the inputs
//! are a few hundred KB once per worker start, so speed does not matter, and no new crate is
//! needed. A change to any input is a different file; stale files are never read (and never
//! cleaned up: a kernel's cubin is tens of KB).
//!
//! File (`<dir>/<key hex>.cubin`): a 16-byte magic, the payload's length (u64 LE), the
//! payload's SHA-256, the payload. A file whose magic, length or digest does not match (a
//! truncated write, a flipped bit, another program's file) is ignored: the kernel is compiled
//! again and the file replaced. Writes are atomic: a temporary file in the same directory,
//! synced, then renamed over the entry, so a reader sees the old file, the new one, or none.
//!
//! Directory: `$GPTOSSD_KERNEL_CACHE`, else `$XDG_CACHE_HOME/gptossd/kernels`, else
//! `$HOME/.cache/gptossd/kernels`; with none of them set there is no cache (every start
//! compiles). The cache is an optimisation only: a failure to write it is reported to the
//! caller to log, never a load failure.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::nvrtc::{self, Arch, CompileError, CudaVersion, OPTIONS};

/// The environment variable naming the cache directory.
pub const CACHE_ENV: &str = "GPTOSSD_KERNEL_CACHE";

/// The first bytes of every cache file; the trailing digit is the file format's version.
const MAGIC: &[u8; 16] = b"GPTOSSD-CUBIN-1\n";
/// Magic, payload length, payload digest.
const HEADER_LEN: usize = 16 + 8 + 32;

/// The hash of everything a cubin depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of `source` compiled for `arch` by NVRTC `nvrtc` with `options`.
    pub fn new(source: &str, options: &[&str], arch: Arch, nvrtc: CudaVersion) -> CacheKey {
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        field(MAGIC);
        field(source.as_bytes());
        field(&(options.len() as u64).to_le_bytes());
        for option in options {
            field(option.as_bytes());
        }
        field(arch.to_string().as_bytes());
        field(nvrtc.to_string().as_bytes());
        CacheKey(hash.finalize().into())
    }

    /// The key of a kernel compiled the project's way ([`OPTIONS`]).
    pub fn for_kernel(source: &str, arch: Arch, nvrtc: CudaVersion) -> CacheKey {
        CacheKey::new(source, OPTIONS, arch, nvrtc)
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot write the kernel cache file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Where a cubin came from.
#[derive(Debug)]
pub enum Fetched {
    /// A valid cache file.
    Cache,
    /// Compiled now; `stored` says whether the cache file was written.
    Compiled { stored: Result<(), CacheError> },
}

/// A cache directory (created on the first store).
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache { dir: dir.into() }
    }

    /// The cache in the directory the environment names (module doc), if any.
    pub fn from_env() -> Option<KernelCache> {
        default_dir(|name| std::env::var_os(name)).map(KernelCache::new)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `key`.
    pub fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.cubin", key.hex()))
    }

    /// The cubin stored under `key`, or `None` when there is no valid file for it (missing,
    /// unreadable, truncated, corrupt).
    pub fn load(&self, key: &CacheKey) -> Option<Vec<u8>> {
        let bytes = fs::read(self.path(key)).ok()?;
        decode(&bytes)
    }

    /// Stores `cubin` under `key`, atomically (temporary file, sync, rename).
    pub fn store(&self, key: &CacheKey, cubin: &[u8]) -> Result<(), CacheError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = self.path(key);
        let temp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            key.hex(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            fs::create_dir_all(&self.dir)?;
            let mut file = fs::File::create_new(&temp)?;
            file.write_all(&encode(cubin))?;
            file.sync_all()?;
            fs::rename(&temp, &path)
        };
        write().map_err(|source| {
            // The temporary file may or may not exist by now; either way it must not stay.
            let _ = fs::remove_file(&temp);
            CacheError::Write { path, source }
        })
    }

    /// The cubin under `key` from the cache, or from `compile` (then stored).
    pub fn get_or_compile<E>(
        &self,
        key: &CacheKey,
        compile: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<(Vec<u8>, Fetched), E> {
        if let Some(cubin) = self.load(key) {
            return Ok((cubin, Fetched::Cache));
        }
        let cubin = compile()?;
        let stored = self.store(key, &cubin);
        Ok((cubin, Fetched::Compiled { stored }))
    }

    /// The cubin of kernel source `source` (`program` names it) for `arch`: from the cache, or
    /// compiled by NVRTC (version `nvrtc`, the library's own) with the project's options.
    pub fn cubin(
        &self,
        program: &str,
        source: &str,
        arch: Arch,
        nvrtc: CudaVersion,
    ) -> Result<(Vec<u8>, Fetched), CompileError> {
        let key = CacheKey::for_kernel(source, arch, nvrtc);
        self.get_or_compile(&key, || {
            nvrtc::compile(program, source, arch).map(|c| c.cubin)
        })
    }
}

/// The cache directory from the environment (looked up through `var`): the first of
/// `$GPTOSSD_KERNEL_CACHE`, `$XDG_CACHE_HOME/gptossd/kernels` (only when absolute, as the XDG
/// specification asks), `$HOME/.cache/gptossd/kernels` that is set and not empty.
pub fn default_dir(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(CACHE_ENV) {
        return Some(dir);
    }
    if let Some(xdg) = set("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("gptossd").join("kernels"));
    }
    set("HOME").map(|home| home.join(".cache").join("gptossd").join("kernels"))
}

fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

/// The payload of a cache file, or `None` unless magic, length and digest all match.
fn decode(bytes: &[u8]) -> Option<Vec<u8>> {
    let (header, payload) = bytes.split_at_checked(HEADER_LEN)?;
    let (magic, rest) = header.split_at(MAGIC.len());
    let (len, digest) = rest.split_at(8);
    let len = u64::from_le_bytes(len.try_into().ok()?);
    let valid = magic == MAGIC
        && len == payload.len() as u64
        && Sha256::digest(payload).as_slice() == digest;
    valid.then(|| payload.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const SM90: Arch = Arch {
        major: 9,
        minor: 0,
        specific: false,
    };
    const V13_0: CudaVersion = CudaVersion {
        major: 13,
        minor: 0,
    };

    #[test]
    fn the_key_changes_with_every_input_and_only_with_them() {
        let base = CacheKey::new("src", &["-a", "-b"], SM90, V13_0);
        assert_eq!(base, CacheKey::new("src", &["-a", "-b"], SM90, V13_0));
        let variants = [
            base,
            CacheKey::new("src ", &["-a", "-b"], SM90, V13_0),
            CacheKey::new("src", &["-a"], SM90, V13_0),
            CacheKey::new("src", &["-b", "-a"], SM90, V13_0),
            // Field boundaries count: the same bytes split differently are another key.
            CacheKey::new("src", &["-a-b"], SM90, V13_0),
            CacheKey::new("src", &["-a", "-b"], "sm_90a".parse().unwrap(), V13_0),
            CacheKey::new("src", &["-a", "-b"], "sm_89".parse().unwrap(), V13_0),
            CacheKey::new(
                "src",
                &["-a", "-b"],
                SM90,
                CudaVersion {
                    major: 13,
                    minor: 1,
                },
            ),
        ];
        let distinct: HashSet<_> = variants.iter().collect();
        assert_eq!(distinct.len(), variants.len());
        assert_eq!(base.hex().len(), 64);
        assert_ne!(
            CacheKey::for_kernel("src", SM90, V13_0),
            CacheKey::new("src", &[], SM90, V13_0),
            "the project's options are part of the key"
        );
    }

    #[test]
    fn a_stored_cubin_loads_back_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path().join("nested").join("kernels"));
        let key = CacheKey::for_kernel("a", SM90, V13_0);
        assert_eq!(cache.load(&key), None);
        cache.store(&key, b"\x7fELF cubin bytes").unwrap();
        assert_eq!(
            cache.load(&key).as_deref(),
            Some(&b"\x7fELF cubin bytes"[..])
        );
        let other = CacheKey::for_kernel("b", SM90, V13_0);
        assert_eq!(cache.load(&other), None);
        let names: Vec<_> = fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![format!("{}.cubin", key.hex())]);
    }

    #[test]
    fn a_truncated_or_corrupt_file_is_ignored_and_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path());
        let key = CacheKey::for_kernel("k", SM90, V13_0);
        let cubin = vec![7u8; 1000];
        cache.store(&key, &cubin).unwrap();
        let good = fs::read(cache.path(&key)).unwrap();

        let mut damaged: Vec<Vec<u8>> = vec![
            Vec::new(),
            good[..10].to_vec(),
            good[..HEADER_LEN].to_vec(),
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
            b"not a cache file at all, but long enough to hold a header............".to_vec(),
        ];
        for at in [0, 20, 40, HEADER_LEN + 500] {
            let mut flipped = good.clone();
            flipped[at] ^= 1;
            damaged.push(flipped);
        }
        for bad in damaged {
            fs::write(cache.path(&key), &bad).unwrap();
            assert_eq!(
                cache.load(&key),
                None,
                "a damaged file of {} bytes loaded",
                bad.len()
            );
            let mut compiled = 0;
            let (got, fetched) = cache
                .get_or_compile(&key, || {
                    compiled += 1;
                    Ok::<_, ()>(cubin.clone())
                })
                .unwrap();
            assert_eq!((got, compiled), (cubin.clone(), 1));
            assert!(matches!(fetched, Fetched::Compiled { stored: Ok(()) }));
            // The replaced file is whole again: the next fetch is a hit.
            let (got, fetched) = cache
                .get_or_compile(&key, || Err("compiled twice"))
                .unwrap();
            assert_eq!(got, cubin);
            assert!(matches!(fetched, Fetched::Cache));
        }
    }

    #[test]
    fn an_interrupted_write_leaves_the_previous_entry_readable() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path());
        let key = CacheKey::for_kernel("k", SM90, V13_0);
        cache.store(&key, b"old").unwrap();
        // A writer killed before its rename leaves only its temporary file behind.
        let temp = dir.path().join(format!(".{}.1.0.tmp", key.hex()));
        fs::write(&temp, &encode(b"new")[..20]).unwrap();
        assert_eq!(cache.load(&key).as_deref(), Some(&b"old"[..]));
        // Writers racing on one key: every reader sees one whole cubin or the other.
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let cache = &cache;
                s.spawn(move || cache.store(&key, &vec![i; 4096]).unwrap());
                s.spawn(move || {
                    let got = cache.load(&key).expect("an entry exists throughout");
                    assert!(
                        got == b"old" || (got.len() == 4096 && got.iter().all(|&b| b == got[0]))
                    );
                });
            }
        });
    }

    #[test]
    fn a_cache_that_cannot_be_written_still_gives_the_cubin() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, b"").unwrap();
        let cache = KernelCache::new(file.join("kernels"));
        let key = CacheKey::for_kernel("k", SM90, V13_0);
        let (got, fetched) = cache
            .get_or_compile(&key, || Ok::<_, ()>(vec![1, 2]))
            .unwrap();
        assert_eq!(got, vec![1, 2]);
        match fetched {
            Fetched::Compiled { stored: Err(e) } => {
                assert!(e.to_string().contains("a-file/kernels"), "{e}")
            }
            other => panic!("expected a failed store, got {other:?}"),
        }
        let err = cache.get_or_compile(&key, || Err::<Vec<u8>, _>("nvrtc failed"));
        assert_eq!(err.unwrap_err(), "nvrtc failed");
    }

    /// With NVRTC on the library path (CI installs it): a cold fetch compiles an ELF cubin and
    /// stores it, the next one reads the same bytes back.
    #[test]
    fn a_kernel_is_compiled_once_then_read_from_the_cache() {
        let Ok(version) = nvrtc::version() else {
            eprintln!("skipped: no NVRTC library");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path());
        let source = r#"extern "C" __global__ void k(float* p) { p[threadIdx.x] = 1.0f; }"#;
        let (cold, fetched) = cache.cubin("k", source, SM90, version).unwrap();
        assert!(matches!(fetched, Fetched::Compiled { stored: Ok(()) }));
        assert_eq!(&cold[..4], b"\x7fELF");
        let (warm, fetched) = cache.cubin("k", source, SM90, version).unwrap();
        assert!(matches!(fetched, Fetched::Cache));
        assert_eq!(warm, cold);
    }

    #[test]
    fn the_directory_comes_from_the_environment_in_order() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = &[
            (CACHE_ENV, "/var/cache/gptossd/kernels"),
            ("XDG_CACHE_HOME", "/home/u/.xdg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(
            default_dir(env(all)),
            Some("/var/cache/gptossd/kernels".into())
        );
        let no_override = &[(CACHE_ENV, ""), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(
            default_dir(env(no_override)),
            Some("/x/gptossd/kernels".into())
        );
        let relative_xdg = &[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")];
        assert_eq!(
            default_dir(env(relative_xdg)),
            Some("/h/.cache/gptossd/kernels".into())
        );
        assert_eq!(default_dir(env(&[])), None);
    }
}
