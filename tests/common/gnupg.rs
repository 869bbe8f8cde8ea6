//! GnuPG as a process, in a throwaway GNUPGHOME (the agent is stopped when it is dropped).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct GnuPg {
    home: tempfile::TempDir,
}

impl GnuPg {
    pub fn new() -> GnuPg {
        let home = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            home.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        GnuPg { home }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", self.home.path())
            .args([
                "--batch",
                "--yes",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs gpg; returns (success, stdout, stderr).
    pub fn run(&self, args: &[&str], stdin: Option<&Path>) -> (bool, Vec<u8>, String) {
        let mut c = self.command(args);
        c.stdin(match stdin {
            Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
            None => Stdio::null(),
        });
        let out = c.output().expect("gpg runs");
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs gpg with `input` on its standard input.
    pub fn run_input(&self, args: &[&str], input: &[u8]) -> (bool, Vec<u8>, String) {
        let mut c = self.command(args);
        c.stdin(Stdio::piped());
        let mut child = c.spawn().expect("gpg runs");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Imports a key file.
    pub fn import(&self, file: &Path) {
        let (ok, _, err) = self.run(&["--import", file.to_str().unwrap()], None);
        assert!(ok, "gpg --import {}: {err}", file.display());
    }

    /// Generates a key without expiry; returns its fingerprint.
    pub fn generate(&self, uid: &str, algo: &str) -> String {
        let (ok, _, err) = self.run(&["--quick-gen-key", uid, algo, "sign", "never"], None);
        assert!(ok, "{err}");
        let (_, out, _) = self.run(&["--with-colons", "--list-keys", uid], None);
        String::from_utf8_lossy(&out)
            .lines()
            .find_map(|l| {
                l.strip_prefix("fpr:")
                    .map(|r| r.trim_matches(':').to_string())
            })
            .unwrap()
    }

    pub fn export(&self, uid: &str) -> Vec<u8> {
        self.run(&["--armor", "--export", uid], None).1
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }
}

impl Drop for GnuPg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .status();
    }
}
