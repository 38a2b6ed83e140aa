//! Programs the tests drive (nginx, Prometheus, Chromium, systemd-analyze): finding them,
//! installing them from Debian when running as root, and systemd-analyze itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Whether the tests run as root (effective user 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The first of `names` that is a file in a directory of PATH, then of `extra_dirs`.
pub fn find_program(names: &[&str], extra_dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().map(PathBuf::from))
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// `apt-get install -y` of `packages` (without recommends), after `apt-get update` if the
/// first try fails; whether it worked. Quiet but for errors.
pub fn apt_install(packages: &[&str]) -> bool {
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = [
        &["install", "-y", "-q", "--no-install-recommends"],
        packages,
    ]
    .concat();
    apt(&install) || (apt(&["update", "-q"]) && apt(&install))
}

/// `systemd-analyze`: on PATH, else installed from Debian's `systemd` package when running
/// as root; otherwise the test fails saying how to get it.
pub fn systemd_analyze() -> PathBuf {
    let found = || find_program(&["systemd-analyze"], &[]);
    if let Some(p) = found() {
        return p;
    }
    let how = "install it (Debian/Ubuntu: `apt-get install systemd`)";
    assert!(
        is_root(),
        "systemd-analyze is not installed and this test is not root: {how}"
    );
    assert!(
        find_program(&["apt-get"], &[]).is_some(),
        "systemd-analyze is not installed and there is no apt-get: {how}"
    );
    assert!(
        apt_install(&["systemd"]),
        "systemd-analyze is not installed and `apt-get install systemd` failed: {how}"
    );
    found().expect("systemd-analyze after installing systemd")
}

/// `systemd-analyze verify` on `unit` (a unit file named `consul-router*`): the exit
/// status, and the output lines that name it (its warnings, e.g. an unknown key,
/// leave the exit status 0).
pub fn verify(analyze: &Path, unit: &Path) -> (bool, Vec<String>) {
    let out = Command::new(analyze)
        .arg("verify")
        .arg(unit)
        .current_dir(unit.parent().unwrap())
        .output()
        .expect("run systemd-analyze");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let about_ours = text
        .lines()
        .filter(|l| l.contains("consul-router"))
        .map(str::to_owned)
        .collect();
    (out.status.success(), about_ours)
}
