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
