//! Finding (and, under cargo, building) the dataplane and ctrl-agent binaries the lab runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Paths of the programs a lab starts.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dataplane: PathBuf,
    pub ctrl_agent: PathBuf,
    pub meshload: PathBuf,
    pub mesh_cni: PathBuf,
}

/// The target directory of the running executable (`target/<profile>`), from its path:
/// binaries live in it, test executables in its `deps/`.
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("executable has no directory"))?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

static BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// Locates the binaries next to this executable. When running under cargo (`cargo run`,
/// `cargo test`), builds them first with the same profile so they are never stale.
pub fn locate() -> anyhow::Result<Binaries> {
    let dir = profile_dir()?;
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let built = BUILT.get_or_init(|| build(&cargo, release));
        if let Err(e) = built {
            anyhow::bail!("building the lab's binaries failed: {e}");
        }
    }
    let find = |name: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            anyhow::bail!(
                "{} is missing; build it with `cargo build --workspace --bins{}`",
                path.display(),
                if dir.ends_with("release") {
                    " --release"
                } else {
                    ""
                }
            )
        }
    };
    Ok(Binaries {
        dataplane: find("dataplane")?,
        ctrl_agent: find("ctrl-agent")?,
        meshload: find("meshload")?,
        mesh_cni: find("mesh-cni")?,
    })
}

fn build(cargo: &str, release: bool) -> Result<(), String> {
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--workspace", "--bins"]);
    // Cargo gives a test the variables of the crate under test. Build scripts that watch one of
    // them (ring watches CARGO_MANIFEST_DIR) would see it change between this build and a shell
    // build, and dependencies would be rebuilt on every test run.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if is_crate_variable(&name) {
            cmd.env_remove(name.as_ref());
        }
    }
    if release {
        cmd.arg("--release");
    } else {
        // `cargo test --workspace` (CI's and the README's test command) builds the binaries
        // with the workspace's dev-dependencies' features (tower-test turns on tokio's
        // test-util). Asking for the examples, of which there are none, resolves features the
        // same way, so those binaries are reused: without it, tokio and everything above it
        // were compiled again for the first lab test (3 min of a CI run). Release binaries,
        // the ones the perf lab measures, keep the plain feature set.
        cmd.arg("--examples");
    }
    if let Some(root) = workspace_root() {
        cmd.current_dir(root);
    }
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("cargo build exited with {s}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The workspace root, for running cargo from anywhere.
pub fn workspace_root() -> Option<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf)
}

/// Variables cargo sets for the crate it runs, as opposed to ones that configure cargo itself.
fn is_crate_variable(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ];
    EXACT.contains(&name) || name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_BIN_EXE_")
}

#[cfg(test)]
mod tests {
    use super::is_crate_variable;

    #[test]
    fn the_inner_build_drops_the_crate_variables_and_keeps_cargo_configuration() {
        for name in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_BIN_EXE_meshlab",
            "OUT_DIR",
        ] {
            assert!(is_crate_variable(name), "{name}");
        }
        for name in [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_PROFILE_RELEASE_DEBUG",
            "RUSTFLAGS",
        ] {
            assert!(!is_crate_variable(name), "{name}");
        }
    }
}
