//! `gptossd make-test-model` writes a model a service user can read: every file 0644 and every
//! directory it creates 0755, even under a umask of 077 (which each shard's temporary file is
//! created under), and no temporary file is left behind.
//!
//! The only test in this binary: it changes the process-wide umask.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use gptossd_shared::testmodel::{write_dims, Dims, Preset};
use nix::sys::stat::{umask, Mode};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

#[test]
fn generated_files_are_readable_by_everyone_whatever_the_umask() {
    let root = tempfile::tempdir().expect("tempdir");
    // An existing directory (think `/tmp`) must keep whatever mode it has.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let out = root.path().join("models").join("tiny");
    let dims = Dims {
        vocab: 512,
        shard_bytes: 60_000,
        ..Preset::Tiny.dims()
    };
    let old = umask(Mode::from_bits_truncate(0o077));
    let written = write_dims(&dims, 0, &out);
    umask(old);
    written.expect("write model");

    assert_eq!(
        mode(root.path()),
        0o750,
        "an existing directory keeps its mode"
    );
    for dir in [root.path().join("models"), out.clone()] {
        assert_eq!(mode(&dir), 0o755, "{}", dir.display());
    }
    let mut files = 0;
    for entry in std::fs::read_dir(&out).expect("read dir") {
        let path = entry.expect("entry").path();
        assert_eq!(mode(&path), 0o644, "{}", path.display());
        files += 1;
    }
    assert!(
        files > 4,
        "config, generation config, index and several shards"
    );
}
