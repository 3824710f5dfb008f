//! The minikube script: clean shell, no node patching, and VirtualBox USB passthrough that is
//! idempotent and changes only a stopped VM, against stand-ins for `VBoxManage` and `minikube`.

use std::collections::BTreeSet;
use std::process::Command;

use nitrokey_e2e::host::repo;
use nitrokey_e2e::manifests::*;

#[test]
fn minikube_script_is_clean_shell_and_never_patches_nodes() {
    let script = repo().join("deploy/minikube/setup.sh");
    let text = std::fs::read_to_string(&script).expect("deploy/minikube/setup.sh");
    assert!(
        text.starts_with("#!/usr/bin/env bash"),
        "setup.sh needs a bash shebang"
    );
    assert!(
        text.contains("set -euo pipefail"),
        "setup.sh must stop at the first failure"
    );
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "setup.sh syntax: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needed in [
        "deploy/base/device-plugin",
        "deploy/overlays/vault-single",
        PIN_SECRET,
        "vault-tls",
    ] {
        assert!(
            text.contains(needed),
            "setup.sh must deploy/create {needed}"
        );
    }
    // The Secrets the script creates are the ones the manifests mount.
    let objects = kustomize(&repo().join("deploy/overlays/vault-single"));
    let (_, spec) = workload_pod_specs(&objects)
        .into_iter()
        .next()
        .expect("vault pod");
    let secrets: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
        .collect();
    assert_eq!(
        secrets,
        [PIN_SECRET, "vault-tls"].map(String::from).into(),
        "the single-node example mounts the PIN and TLS Secrets"
    );
    for secret in &secrets {
        assert!(
            text.contains(&format!("secret generic {secret} --from-file")),
            "setup.sh must create Secret {secret} from files"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Helm chart: rendered by Helm's own engine (a `helm` binary when installed, otherwise Helm's Go
// SDK through the PyPI package helm-python-sdk), then held to the same checks as kustomize output.

const FAKE_VBOXMANAGE: &str = r#"#!/usr/bin/env bash
s="$FAKE_STATE"; echo "VBoxManage $*" >> "$s/log"
case "$1" in
  --version) echo 7.0.20r163906 ;;
  list) if [ -f "$s/extpack" ]; then printf 'Extension Packs: 1\nPack no. 0:   Oracle VM VirtualBox Extension Pack\nUsable:       true\n'; else echo 'Extension Packs: 0'; fi ;;
  showvminfo)
    [ -f "$s/exists" ] || { echo "Could not find a registered machine named '$2'" >&2; exit 1; }
    echo "VMState=\"$(cat "$s/state")\""
    [ -f "$s/ehci" ] && echo 'ehci="on"' || echo 'ehci="off"'
    n=1; while read -r v p; do echo "USBFilterVendorId$n=\"$v\""; echo "USBFilterProductId$n=\"$p\""; n=$((n+1)); done < "$s/filters" ;;
  modifyvm)
    [ "$(cat "$s/state")" != running ] || { echo "VBoxManage: error: machine is locked (running)" >&2; exit 1; }
    touch "$s/ehci" ;;
  usbfilter)
    [ "$(cat "$s/state")" != running ] || { echo "VBoxManage: error: machine is locked (running)" >&2; exit 1; }
    v=""; p=""; while [ $# -gt 0 ]; do case "$1" in --vendorid) v=$2;; --productid) p=$2;; esac; shift; done
    echo "$v $p" >> "$s/filters" ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"#;

const FAKE_MINIKUBE: &str = r#"#!/usr/bin/env bash
s="$FAKE_STATE"; echo "minikube $*" >> "$s/log"
[ "$1" = -p ] && shift 2
case "$1" in
  config) [ "$2" = get ] && echo virtualbox; exit 0 ;;
  start) touch "$s/exists"; echo running > "$s/state" ;;
  stop) echo poweroff > "$s/state" ;;
  status) [ "$(cat "$s/state")" = running ] ;;
  ssh)
    [ "$(cat "$s/state")" = running ] || exit 1
    echo "Bus 001 Device 001: ID 1d6b:0002 Linux Foundation 2.0 root hub"
    if [ -f "$s/ehci" ] && grep -q '^20a0 4230$' "$s/filters"; then echo "Bus 001 Device 002: ID 20a0:4230 Nitrokey HSM"; fi ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"#;

struct FakeVm {
    dir: tempfile::TempDir,
}

impl FakeVm {
    /// A running minikube VM without USB passthrough, the Extension Pack installed.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        for (name, body) in [("VBoxManage", FAKE_VBOXMANAGE), ("minikube", FAKE_MINIKUBE)] {
            let path = bin.join(name);
            std::fs::write(&path, body).expect("write stand-in");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("state");
        for (file, content) in [
            ("exists", ""),
            ("state", "running\n"),
            ("filters", ""),
            ("extpack", ""),
            ("log", ""),
        ] {
            std::fs::write(state.join(file), content).expect("state file");
        }
        FakeVm { dir }
    }

    fn state(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join("state").join(file)
    }

    /// Runs setup.sh (passthrough only) and returns (success, output, VBoxManage/minikube calls).
    fn run(&self) -> (bool, String, Vec<String>) {
        std::fs::write(self.state("log"), "").expect("reset log");
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg(repo().join("deploy/minikube/setup.sh"))
            .env("PATH", path)
            .env("FAKE_STATE", self.dir.path().join("state"))
            .env("SKIP_DEPLOY", "1")
            .output()
            .expect("run setup.sh");
        let log = std::fs::read_to_string(self.state("log")).expect("log");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success(),
            text,
            log.lines().map(str::to_string).collect(),
        )
    }
}

#[test]
fn minikube_passthrough_is_idempotent_and_modifies_only_a_stopped_vm() {
    let vm = FakeVm::new();
    let (ok, output, calls) = vm.run();
    assert!(ok, "first run failed:\n{output}");
    let index = |needle: &str| calls.iter().position(|c| c.contains(needle));
    let count =
        |calls: &[String], needle: &str| calls.iter().filter(|c| c.contains(needle)).count();
    assert_eq!(count(&calls, "modifyvm"), 1, "{calls:#?}");
    assert_eq!(count(&calls, "usbfilter add"), 1, "{calls:#?}");
    let stop = index(" stop").expect("the running VM is stopped first");
    assert!(
        stop < index("modifyvm").expect("modifyvm"),
        "modifyvm before stop: {calls:#?}"
    );
    assert!(
        index("usbfilter add").expect("filter") < index(" start").expect("restarted"),
        "{calls:#?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.contains("--vendorid 20a0 --productid 4230")),
        "{calls:#?}"
    );
    assert!(
        output.contains("20a0:4230"),
        "the script shows the stick it found:\n{output}"
    );

    // Second run: everything is in place, nothing is changed, the VM is not stopped.
    let (ok, output, calls) = vm.run();
    assert!(ok, "second run failed:\n{output}");
    for change in ["modifyvm", "usbfilter", " stop", " start"] {
        assert_eq!(
            count(&calls, change),
            0,
            "second run must not `{change}`: {calls:#?}"
        );
    }
    let filters = std::fs::read_to_string(vm.state("filters")).expect("filters");
    assert_eq!(
        filters.lines().count(),
        1,
        "exactly one USB filter: {filters}"
    );
}

#[test]
fn minikube_passthrough_stops_with_a_clear_error_when_a_check_fails() {
    let vm = FakeVm::new();
    std::fs::remove_file(vm.state("extpack")).expect("remove extension pack");
    let (ok, output, calls) = vm.run();
    assert!(!ok, "must fail without the Extension Pack");
    assert!(output.contains("Extension Pack"), "{output}");
    assert!(
        !calls
            .iter()
            .any(|c| c.contains("modifyvm") || c.contains("usbfilter")),
        "{calls:#?}"
    );
}
