//! The shim's OpenSC behaviours as an independent client sees them: OpenSC's own `pkcs11-tool`
//! loads the shim in front of a SoftHSM2 token. The shim reads its settings once per process,
//! so every scenario is its own `pkcs11-tool` run.

use nitrokey_e2e::softhsm::{SoftHsm, USER_PIN};
use nitrokey_e2e::token::Token;
use std::process::{Command, Output};

fn pkcs11_tool(hsm: &SoftHsm, settings: &[(&str, &str)], args: &[&str]) -> Output {
    let shim = nitrokey_e2e::bins::pkcs11_shim().expect("shim module");
    Command::new("pkcs11-tool")
        .envs(hsm.env())
        .env("NKSHIM_MODULE", hsm.module())
        .envs(settings.iter().copied())
        .arg("--module")
        .arg(shim)
        .args(args)
        .output()
        .expect("run pkcs11-tool (install opensc)")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Lists the objects on the token's slot, logged in.
fn list_objects(hsm: &SoftHsm, settings: &[(&str, &str)]) -> Output {
    let slot = hsm.slot_id().to_string();
    pkcs11_tool(
        hsm,
        settings,
        &[
            "--slot",
            &slot,
            "--login",
            "--pin",
            USER_PIN,
            "--list-objects",
        ],
    )
}

#[test]
fn opensc_labels_decorate_the_token_label_and_library_manufacturer() {
    let hsm = SoftHsm::new().expect("softhsm");
    let on = [("NKSHIM_OPENSC_LABELS", "1")];
    let info = text(&pkcs11_tool(&hsm, &on, &["--show-info"]));
    assert!(info.contains("OpenSC Project"), "{info}");
    let slots = text(&pkcs11_tool(&hsm, &on, &["--list-token-slots"]));
    assert!(slots.contains("bank-vaults (UserPIN)"), "{slots}");

    let plain = text(&pkcs11_tool(&hsm, &[], &["--list-token-slots"]));
    assert!(plain.contains("bank-vaults"), "{plain}");
    assert!(!plain.contains("(UserPIN)"), "{plain}");
}

#[test]
fn no_token_is_present_until_the_delay_has_passed() {
    let hsm = SoftHsm::new().expect("softhsm");
    let waiting = [("NKSHIM_TOKEN_DELAY_MS", "600000")];
    let slots = text(&pkcs11_tool(&hsm, &waiting, &["--list-token-slots"]));
    assert!(!slots.contains("bank-vaults"), "{slots}");
    let all = text(&pkcs11_tool(&hsm, &waiting, &["--list-slots"]));
    assert!(
        all.contains(&format!("{:#x}", hsm.slot_id())),
        "the reader's slot itself stays listed: {all}"
    );
    let out = list_objects(&hsm, &waiting);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("CKR_TOKEN_NOT_PRESENT"),
        "{}",
        text(&out)
    );

    let out = list_objects(&hsm, &[("NKSHIM_TOKEN_DELAY_MS", "0")]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_removed_card_is_absent_until_it_is_put_back() {
    let hsm = SoftHsm::new().expect("softhsm");
    let control = hsm.dir().join("card");
    let control_path = control.display().to_string();
    let settings = [("NKSHIM_CONTROL", control_path.as_str())];

    std::fs::write(&control, "removed").expect("control file");
    let slots = text(&pkcs11_tool(&hsm, &settings, &["--list-token-slots"]));
    assert!(!slots.contains("bank-vaults"), "{slots}");
    let out = list_objects(&hsm, &settings);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("CKR_TOKEN_NOT_PRESENT"),
        "{}",
        text(&out)
    );

    std::fs::write(&control, "present").expect("control file");
    let out = list_objects(&hsm, &settings);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("bank-vaults"), "{}", text(&out));
}

#[test]
fn bad_settings_are_named_and_the_module_refuses_to_load() {
    let hsm = SoftHsm::new().expect("softhsm");
    let out = pkcs11_tool(
        &hsm,
        &[("NKSHIM_LATENCY", "decrypt=fast")],
        &["--show-info"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("NKSHIM_LATENCY"), "{}", text(&out));

    let out = pkcs11_tool(&hsm, &[("NKSHIM_MODULE", "")], &["--show-info"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("NKSHIM_MODULE"), "{}", text(&out));
}
