//! A really small filesystem for a test: a tmpfs mounted for the test's
//! lifetime. Mounting needs root; elsewhere the test says it is skipped
//! (past the harness's capture), unless `LEADFLO_REQUIRE_MOUNT` is set
//! (`.ci/run` sets it), when a failed mount fails the test.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

/// A tmpfs of a given size, unmounted when dropped.
pub struct SmallFs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` (`16m`); `None` when it cannot (not root).
    pub fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(output) if output.status.success() => Some(SmallFs {
                path: dir.path().to_owned(),
                _dir: dir,
            }),
            other => {
                let why = match other {
                    Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                    Err(err) => err.to_string(),
                };
                assert!(
                    std::env::var("LEADFLO_REQUIRE_MOUNT").is_err(),
                    "mounting a tmpfs is required (LEADFLO_REQUIRE_MOUNT) but failed: {why}"
                );
                // Past the test harness's capture, so the skip is seen.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: the small-filesystem tests need to mount a tmpfs (root): {why}"
                );
                None
            }
        }
    }

    /// Grows or shrinks the mounted filesystem to `size`.
    pub fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(status.success(), "remount failed");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
