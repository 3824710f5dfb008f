//! The README's first command runs this demo; this test runs it the same way and checks that
//! what it shows a newcomer is true: the kubelet sees the stick, follows an unplug and a
//! replug, OpenBao ends initialised and unsealed with every key on the token, and the PIN is
//! never printed.

use std::process::Command;

use nitrokey_e2e::softhsm::USER_PIN;

#[test]
fn demo_shows_the_whole_mission_working() {
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    for expected in [
        "Register: resource nitrokey.com/hsm version v1beta1 endpoint nitrokey-hsm.sock",
        "2 healthy units [\"DENK01234567-0\", \"DENK01234567-1\"]",
        "container gets /dev/bus/usb/001/002 (rw)",
        "both units Unhealthy",
        "plugged in again at /dev/bus/usb/001/003",
        "Allocate now hands out /dev/bus/usb/001/003",
        "initialized=false sealed=true",
        "successfully unsealed vault",
        "vault-test, vault-unseal-0, vault-unseal-1, vault-unseal-2, vault-unseal-3, \
         vault-unseal-4, vault-root",
        "initialized=true sealed=false (threshold 3 of 5 shares)",
        "Every process the demo started has been stopped.",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
    for text in [&stdout, &stderr] {
        assert!(
            !text.contains(USER_PIN),
            "the demo printed the PIN:\n{text}"
        );
    }
}

/// Processes whose command line or environment mention `needle` (the demo's temporary
/// directory appears in every helper it starts: the token's config, OpenBao's config, the
/// plugin's socket directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == std::process::id().to_string() {
            continue;
        }
        for file in ["cmdline", "environ"] {
            let Ok(raw) = std::fs::read(entry.path().join(file)) else {
                continue;
            };
            let text = String::from_utf8_lossy(&raw).replace('\0', " ");
            if text.contains(needle) {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                found.push(format!(
                    "{pid}: {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
                break;
            }
        }
    }
    found
}

#[test]
fn ctrl_c_stops_the_demo_cleanly_with_status_130() {
    use std::io::BufRead as _;
    use std::os::unix::process::CommandExt as _;
    use std::time::{Duration, Instant};

    let scratch = tempfile::tempdir().expect("scratch directory");
    let needle = scratch.path().display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo"))
        .env("TMPDIR", scratch.path())
        // A process group of its own, standing in for the terminal's foreground group that
        // Ctrl-C signals as a whole.
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the demo");
    let group = child.id() as i32;
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());

    // Interrupt while unseal-init is initialising OpenBao: every helper is running then.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines_rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("the demo never reached step 5 ({e}):\n{seen:#?}"));
        let reached = line.contains("initializing vault");
        seen.push(line);
        if reached {
            break;
        }
    }
    // SAFETY: kill(2) on the process group of a child this test started.
    assert_eq!(unsafe { libc::kill(-group, libc::SIGINT) }, 0, "kill");
    let exit_deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < exit_deadline,
            "the demo did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = stderr.join().expect("stderr reader");
    seen.extend(lines_rx.try_iter());
    let stdout = seen.join("\n");
    assert_eq!(status.code(), Some(130), "{status}\n{stdout}\n{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    for noise in ["Traceback", "KeyboardInterrupt", "failed", "signal: 2"] {
        assert!(
            !stdout.contains(noise) && !stderr.contains(noise),
            "Ctrl-C printed {noise:?}:\n{stdout}\n{stderr}"
        );
    }
    // Nothing it started outlives it, and nothing it wrote stays behind.
    let settle = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_mentioning(&needle);
        let files: Vec<_> = std::fs::read_dir(scratch.path())
            .expect("read scratch")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        if left.is_empty() && files.is_empty() {
            break;
        }
        assert!(
            Instant::now() < settle,
            "left behind after Ctrl-C: processes {left:#?}, files {files:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
