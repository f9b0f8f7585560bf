//! Installing what the stack needs from Debian's packages, once, and only what is missing.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Whether an executable called `name` is on the `PATH`.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// Whether we run as root (apt-get and service users need it; otherwise we use sudo).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Install `packages` with apt-get, keeping their services from starting on their own.
///
/// Debian's postinst scripts start a package's daemon (Redis on 6379, a `main`
/// PostgreSQL cluster on 5432) where they can; those would take the ports the
/// stack's own, project-owned instances need. A `policy-rc.d` that answers 101
/// ("action forbidden") for the duration of the install stops that.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !on_path("apt-get") {
        bail!(
            "missing {} and this is not a Debian-like machine (no apt-get): install them yourself",
            packages.join(", ")
        );
    }
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    eprintln!("stack: installing {} with apt-get", packages.join(" "));
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        run(sudo, &["sh", "-c", "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d"])?;
    }
    let result = run(sudo, &["apt-get", "update", "-q"]).and_then(|_| {
        let mut args = vec![
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
        ];
        args.extend_from_slice(packages);
        run(sudo, &args)
    });
    if own_policy {
        run(sudo, &["rm", "-f", "/usr/sbin/policy-rc.d"])?;
    }
    result
}

fn run(prefix: &[&str], args: &[&str]) -> Result<()> {
    let all: Vec<&str> = prefix.iter().chain(args).copied().collect();
    let status = Command::new(all[0])
        .args(&all[1..])
        .status()
        .with_context(|| format!("running {}", all.join(" ")))?;
    if !status.success() {
        bail!("`{}` failed with {status}", all.join(" "));
    }
    Ok(())
}
