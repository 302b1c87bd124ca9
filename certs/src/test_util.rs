//! Test helpers shared by the modules' tests: the openssl CLI as a reference.

use std::path::Path;
use std::process::Command;

pub(crate) fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The reference pin, computed by the openssl CLI exactly as the docs of
/// Chromium's --ignore-certificate-errors-spki-list say.
pub(crate) fn openssl_pin(cert_pem: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -pubkey -noout -in '{}' | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
            cert_pem.display()
        ))
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
