//! Secrets left in the running sidecar's memory. After the init, after an unseal (Vault
//! restarted) and after a reseal (Vault sealed through its API), the sidecar's writable
//! memory (heap, anonymous mappings, stacks) is read through `/proc/<pid>/mem` — what anyone
//! with the process's uid, or a core dump, could read — and searched for every unseal key,
//! the root token and the user PIN. No unseal key and no root token may be there, freed or
//! not, and the PIN at most once: the copy the token session keeps to log in again after the
//! token was lost. The secrets are known to the test from Vault's own answer, read back
//! from the token with pkcs11-tool.
//!
//! A copy that is still being used when a scan runs (a request on its way) would be gone a
//! moment later, so a scan that finds too much is repeated for a few seconds; a leak stays
//! and fails the test.

mod common;

use common::{command, decrypt_stored, wait_http, write_config};
use nitrokey_e2e::openbao::{OpenBao, free_port};
use nitrokey_e2e::softhsm::{SoftHsm, USER_PIN};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::process::Child;
use std::time::{Duration, Instant};

/// Writable private regions of `pid` (start, end), from `/proc/<pid>/maps`.
fn writable_regions(pid: u32) -> Vec<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            if !perms.starts_with("rw") {
                return None;
            }
            let path = line.split_whitespace().nth(5).unwrap_or("");
            // Device mappings (e.g. [vvar]) cannot be read.
            if path.starts_with("[vvar") || path.starts_with("[vsyscall") {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect()
}

fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// How many times each needle occurs in the writable memory of `pid`.
fn scan(pid: u32, needles: &[Vec<u8>]) -> Vec<usize> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/<pid>/mem");
    let longest = needles.iter().map(Vec::len).max().unwrap_or(1);
    let mut counts = vec![0; needles.len()];
    const CHUNK: u64 = 1 << 20;
    for (start, end) in writable_regions(pid) {
        let mut at = start;
        while at < end {
            // Chunks overlap by one needle length, and a hit is counted only when it starts
            // in the chunk's own part, so nothing is counted twice or missed at a boundary.
            let own = CHUNK.min(end - at);
            let len = (own + longest as u64 - 1).min(end - at);
            let mut buf = vec![0u8; len as usize];
            if mem.read_exact_at(&mut buf, at).is_ok() {
                for (i, needle) in needles.iter().enumerate() {
                    let limit = (own as usize + needle.len() - 1).min(buf.len());
                    counts[i] += occurrences(&buf[..limit], needle);
                }
            }
            at += own;
        }
    }
    counts
}

/// The secrets the sidecar must not keep, and the PIN.
struct Secrets {
    keys: Vec<String>,
    root: String,
}

impl Secrets {
    fn needles(&self) -> Vec<Vec<u8>> {
        let mut all: Vec<Vec<u8>> = self.keys.iter().map(|k| k.as_bytes().to_vec()).collect();
        all.push(self.root.as_bytes().to_vec());
        all.push(USER_PIN.as_bytes().to_vec());
        all
    }
}

/// Scans until no key or root token is found and the PIN at most once, for up to 10 s;
/// panics with the counts of the last scan otherwise.
fn assert_clean(pid: u32, secrets: &Secrets, when: &str) {
    let needles = secrets.needles();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counts = scan(pid, &needles);
        let (pin, vault) = counts.split_last().expect("pin counted");
        if vault.iter().all(|n| *n == 0) && *pin <= 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: copies in the sidecar's memory: unseal keys {:?}, root token {}, PIN {pin} (allowed: 0, 0, 1)",
            &vault[..vault.len() - 1],
            vault[vault.len() - 1]
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `PUT /v1/sys/seal` with the root token (the test's own client: no secret of its passes
/// through the sidecar).
fn seal(bao: &OpenBao, token: &str) {
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", bao.port())).expect("connect to OpenBao");
    write!(
        stream,
        "PUT /v1/sys/seal HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Vault-Token: {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send sys/seal");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 204"), "sys/seal: {answer}");
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_unseal_key_or_root_token_and_one_pin_stay_in_the_sidecars_memory() {
    let hsm = SoftHsm::new().expect("softhsm token");
    let mut bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("port");
    let config = write_config(
        dir.path(),
        &hsm,
        &bao.address(),
        &format!("unsealPeriod: 300ms\nmetricsAddress: 127.0.0.1:{port}\n"),
    );
    let mut cmd = command(&hsm);
    cmd.arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let sidecar = Running(cmd.spawn().expect("spawn sidecar"));
    let pid = sidecar.0.id();
    let endpoints = format!("http://127.0.0.1:{port}");
    let unsealed = |bao: &OpenBao| {
        bao.wait_for(Duration::from_secs(120), |s| s.initialized && !s.sealed)
            .expect("unsealed by the sidecar");
    };

    unsealed(&bao);
    wait_http(&endpoints, "/readyz", 200, Duration::from_secs(60));
    let secrets = Secrets {
        keys: (0..5)
            .map(|i| decrypt_stored(&hsm, &format!("vault-unseal-{i}")))
            .collect(),
        root: decrypt_stored(&hsm, "vault-root"),
    };
    assert!(
        secrets.keys.iter().all(|k| k.len() >= 64),
        "unseal keys are hex"
    );
    assert_clean(pid, &secrets, "after the init");

    bao.restart().expect("restart OpenBao");
    unsealed(&bao);
    assert_clean(pid, &secrets, "after an unseal");

    seal(&bao, &secrets.root);
    unsealed(&bao);
    assert_clean(pid, &secrets, "after a reseal");
}
