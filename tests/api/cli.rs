//! The binary's subcommands as an operator runs them.

use std::process::Command;

fn tally(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("tally runs")
}

#[test]
fn check_config_lists_every_problem_with_its_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "public_addr = \"nowhere\"\n[http]\nmax_connections = 0\n[[links]]\nmerchant_id = \"m\"\nid = \"l\"\npartner_id = \"p\"\ndestination = \"ftp://x\"\n",
    )
    .unwrap();
    let out = tally(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["http.max_connections", "public_addr", "links[0].destination"] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }

    std::fs::write(&path, "").unwrap();
    let out = tally(&["check-config", "--config", path.to_str().unwrap()], &[("TALLY_PUBLIC_ADDR", "127.0.0.1:0")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("public 127.0.0.1:0"),
        "TALLY_PUBLIC_ADDR overrides the file"
    );

    let out = tally(&["check-config", "--config", path.to_str().unwrap()], &[("TALLY_HTTP__MAX_CONNECTIONS", "0")]);
    assert_eq!(out.status.code(), Some(2), "nested variables use __");
}

#[test]
fn check_config_lists_seven_mistakes_in_one_run_and_refuses_what_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
pubilc_addr = "127.0.0.1:8080"
admin_addr = "nowhere"
print_example = "yes"
[http]
max_conections = 5
max_connections = 0
[storage]
max_batch = "lots"
[[merchants]]
id = "demo"
name = "Demo"
[[partners]]
merchant_id = "demo"
id = "ann"
name = "Ann"
kind = "affiliate"
[[links]]
merchant_id = "demo"
id = "l1"
partner_id = "bob"
destination = "https://shop.example.com/?c={click_id}"
"#,
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let out = tally(&["check-config", "--config", config], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "pubilc_addr",
        "admin_addr",
        "print_example",
        "http.max_conections",
        "http.max_connections",
        "storage.max_batch",
        "links[0].partner_id",
    ] {
        assert!(
            err.contains(&format!("  - {key}: ")),
            "{key} missing from:
{err}"
        );
    }
    assert!(err.contains("7 problem(s)"), "{err}");

    // serve refuses the same file with the same list, before opening anything.
    let data = dir.path().join("db");
    let out = tally(&["serve", "--config", config], &[("TALLY_DATA_DIR", data.to_str().unwrap())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("links[0].partner_id"));
    assert!(!data.exists(), "nothing was created");
}

#[test]
fn check_config_vets_seeded_outbound_destinations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbound.toml");
    let config = |url: &str| {
        format!(
            "[[merchants]]\nid = \"m\"\nname = \"M\"\n[[partners]]\nmerchant_id = \"m\"\nid = \"p\"\nname = \"P\"\nkind = \"affiliate\"\noutbound = {{ url = \"{url}\", method = \"GET\" }}\n"
        )
    };
    std::fs::write(&path, config("http://10.0.0.1/pb?c={click_id}")).unwrap();
    let out = tally(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("partners[0].outbound.url") && err.contains("private"), "{err}");
    let out =
        tally(&["check-config", "--config", path.to_str().unwrap()], &[("TALLY_OUTBOUND__ALLOW_PRIVATE", "true")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn check_config_warns_about_stray_variables_and_accepts_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").unwrap();
    let out = tally(
        &["check-config", "--config", path.to_str().unwrap()],
        &[
            ("TALLY_PORT", "tcp://10.0.0.1:8080"),
            ("TALLY_SERVICE_HOST", "10.0.0.1"),
            ("TALLY_ADMIN_ADDR", "127.0.0.1:0"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ignoring TALLY_PORT") && err.contains("ignoring TALLY_SERVICE_HOST"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("admin 127.0.0.1:0"));
}

#[test]
fn help_examples_keep_their_lines() {
    for (command, example) in [("sign", tally::cli::SIGN_EXAMPLE), ("sign-url", tally::cli::SIGN_URL_EXAMPLE)] {
        let out = tally(&[command, "--help"], &[]);
        let help = String::from_utf8_lossy(&out.stdout);
        for line in example.lines().skip(1) {
            assert!(help.lines().any(|l| l == line), "{command}: line {line:?} not intact in:\n{help}");
        }
    }
}

#[test]
fn sign_prints_the_reference_vector() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "sign",
            "--secret",
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "--id",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            "--timestamp",
            "1649367553",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"{"email":"test@example.com","username":"test_user"}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "webhook-id: msg_27UH4WbU6Z5A5EzD8u03UvzRbpk\nwebhook-timestamp: 1649367553\nwebhook-signature: v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=\n"
    );
}

#[test]
fn help_names_every_subcommand() {
    let out = tally(&["--help"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "check-config", "sign", "TALLY_DATA_DIR"] {
        assert!(text.contains(word), "{word} missing from --help:\n{text}");
    }
}
