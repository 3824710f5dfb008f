//! Configuration through the real binary: invalid files and flags exit 2 with an error naming
//! the field; files, environment and flags combine with flags winning.

mod common;

use std::process::{Command, Output};

use common::{Plugin, TIMEOUT, binary};
use nitrokey_e2e::kubelet::FakeKubelet;
use nitrokey_e2e::usb::Testbed;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("NITROKEY_DEVICE_PLUGIN_CONFIG");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run device-plugin")
}

fn run_with_file(yaml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    run(&["--config", path.to_str().unwrap()], &[])
}

#[test]
fn invalid_config_files_exit_2_naming_the_field() {
    for (yaml, field) in [
        ("resourceNam: nitrokey.com/hsm\n", "resourceNam"),
        ("resourceName: hsm\n", "resourceName"),
        ("sharesPerDevice: 0\n", "sharesPerDevice"),
        ("sharesPerDevice: two\n", "sharesPerDevice"),
        ("gracePeriod: forever\n", "gracePeriod"),
        (
            "devices:\n  - vendor: \"0x20a0\"\n    product: nope\n",
            "product",
        ),
        (
            "devices:\n  - vendor: \"0x20a0\"\n    product: \"0x4230\"\n    color: red\n",
            "color",
        ),
        ("devices: []\n", "devices"),
        ("metricsAddress: everywhere\n", "metricsAddress"),
        ("logFormat: xml\n", "logFormat"),
        ("discovery: psychic\n", "discovery"),
        (
            "devices:\n  - vendor: \"20a0\"\n    product: 4230\n",
            "devices[0].product",
        ),
        ("gracePeriod: 18446744073709551615\n", "gracePeriod"),
        ("gracePeriod: 3000000000000000h\n", "gracePeriod"),
        (
            "rescanInterval: 10000000000000000000s10000000000000000000s\n",
            "rescanInterval",
        ),
        ("- just\n- a list\n", "invalid config"),
    ] {
        let out = run_with_file(yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{yaml:?}: {stderr}");
        assert!(
            stderr.contains(field),
            "{yaml:?}: error does not name {field}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn missing_file_and_bad_flags_exit_2() {
    let out = run(&["--config", "/nonexistent/config.yaml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.yaml"));
    for args in [
        &["--shares-per-device", "x"][..],
        &["--device", "20a0"],
        &["--grace-period", "soon"],
        &["--log-format", "xml"],
        &["--no-such-flag"],
        &["--resource-name", "kubernetes.io/hsm"],
    ] {
        let out = run(args, &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&[], &[("NITROKEY_DEVICE_PLUGIN_SHARES_PER_DEVICE", "0")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NITROKEY_DEVICE_PLUGIN_SHARES_PER_DEVICE")
    );
}

#[test]
fn out_of_range_values_are_reported_as_typed_naming_where_they_came_from() {
    for (env, flag, key, value, expected) in [
        (
            "NITROKEY_DEVICE_PLUGIN_GRACE_PERIOD",
            "--grace-period",
            "gracePeriod",
            "8d",
            "`8d` is longer than 7d",
        ),
        (
            "NITROKEY_DEVICE_PLUGIN_RESCAN_INTERVAL",
            "--rescan-interval",
            "rescanInterval",
            "10ms",
            "`10ms` is shorter than 100ms",
        ),
        (
            "NITROKEY_DEVICE_PLUGIN_EVICTION_RETRY_FOR",
            "--eviction-retry-for",
            "evictionRetryFor",
            "25h",
            "`25h` is longer than 24h",
        ),
        (
            "NITROKEY_DEVICE_PLUGIN_SHARES_PER_DEVICE",
            "--shares-per-device",
            "sharesPerDevice",
            "1001",
            "1001 is not",
        ),
    ] {
        let from_env = run(&[], &[(env, value)]);
        let from_flag = run(&[flag, value], &[]);
        let from_file = run_with_file(&format!("{key}: {value}\n"));
        for (source, out) in [(env, from_env), (flag, from_flag), (key, from_file)] {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{source}={value}: {stderr}");
            assert!(stderr.starts_with("error: "), "{source}={value}: {stderr}");
            assert!(stderr.contains(source), "{source}={value}: {stderr}");
            assert!(stderr.contains(expected), "{source}={value}: {stderr}");
        }
    }
}

/// A value refused after parsing (here a resource name) names where it came from too.
#[test]
fn a_refused_value_names_the_flag_the_variable_or_the_file() {
    let env = "NITROKEY_DEVICE_PLUGIN_RESOURCE_NAME";
    for (out, source) in [
        (
            run(&["--resource-name", "hsm"], &[]),
            "(from flag --resource-name)".to_owned(),
        ),
        (
            run(&[], &[(env, "hsm")]),
            format!("(from environment variable {env})"),
        ),
        (
            run_with_file("resourceName: hsm\n"),
            "(from the configuration file)".to_owned(),
        ),
    ] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{source}: {stderr}");
        assert!(stderr.starts_with("error: "), "{source}: {stderr}");
        assert!(
            stderr.contains(&format!("resourceName {source}: `hsm` is not")),
            "{source}: {stderr}"
        );
    }
}

#[test]
fn huge_durations_exit_2_without_a_panic() {
    for value in [
        "18446744073709551615",
        "3000000000000000h",
        "10000000000000000000s10000000000000000000s",
        "8d",
    ] {
        for (flag, env) in [
            ("--grace-period", "NITROKEY_DEVICE_PLUGIN_GRACE_PERIOD"),
            (
                "--rescan-interval",
                "NITROKEY_DEVICE_PLUGIN_RESCAN_INTERVAL",
            ),
        ] {
            let out = run(&[flag, value], &[]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
            assert!(
                stderr.contains(flag)
                    || stderr.contains("gracePeriod")
                    || stderr.contains("rescanInterval"),
                "{flag} {value}: {stderr}"
            );
            let out = run(&[], &[(env, value)]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{env}={value}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[test]
fn invalid_environment_variables_are_named() {
    for (env, value) in [
        ("NITROKEY_DEVICE_PLUGIN_SHARES_PER_DEVICE", "two"),
        ("NITROKEY_DEVICE_PLUGIN_GRACE_PERIOD", "3000000000000000h"),
        ("NITROKEY_DEVICE_PLUGIN_DEVICE", "20a0"),
        ("NITROKEY_DEVICE_PLUGIN_LOG_FORMAT", "xml"),
        ("NITROKEY_DEVICE_PLUGIN_DISCOVERY", "psychic"),
        ("NODE_IP", "node-1"),
    ] {
        let out = run(&[], &[(env, value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env}={value}: {stderr}");
        assert!(
            stderr.contains(env),
            "{env}={value}: error does not name {env}: {stderr}"
        );
    }
    // The same value on the command line is reported as the flag's.
    let out = run(&["--shares-per-device", "two"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--shares-per-device"), "{stderr}");
    assert!(
        !stderr.contains("NITROKEY_DEVICE_PLUGIN_SHARES_PER_DEVICE"),
        "{stderr}"
    );
}

#[test]
fn help_lists_every_flag() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--resource-name",
        "--device",
        "--shares-per-device",
        "--grace-period",
        "--plugin-dir",
        "--metrics-address",
        "--log-format",
        "--discovery",
        "--rescan-interval",
        "--node-ip",
        "NODE_IP",
        "NITROKEY_DEVICE_PLUGIN_CONFIG",
        "NITROKEY_DEVICE_PLUGIN_DEVICE",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_env_and_flags_combine() {
    let testbed = Testbed::new().unwrap();
    testbed.add_nitrokey_hsm("DENK0000001", 1, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    // The file (named by the environment) sets resource, shares and log format; the
    // environment overrides the shares and the resource, and the flag overrides the resource
    // again.
    std::fs::write(
        &config,
        "resourceName: file.example.com/hsm\nsharesPerDevice: 5\nlogFormat: json\n\
         devices:\n  - vendor: \"20a0\"\n    product: \"0x4230\"\n",
    )
    .unwrap();
    let plugin_dir = dir.path().join("plugins");
    let kubelet = FakeKubelet::start(&plugin_dir).await.unwrap();
    let plugin = Plugin::start_with_env(
        &testbed,
        &plugin_dir,
        &["--resource-name", "example.com/hsm"],
        &[
            ("NITROKEY_DEVICE_PLUGIN_CONFIG", config.to_str().unwrap()),
            ("NITROKEY_DEVICE_PLUGIN_SHARES_PER_DEVICE", "3"),
            (
                "NITROKEY_DEVICE_PLUGIN_RESOURCE_NAME",
                "env.example.com/hsm",
            ),
        ],
    );
    let registration = kubelet.wait_for_registration(TIMEOUT).await.unwrap();
    assert_eq!(registration.request.resource_name, "example.com/hsm");
    kubelet
        .wait_for_devices(|d| d.len() == 3, TIMEOUT)
        .await
        .unwrap();
    let logs = plugin.logs();
    let first = logs.lines().next().unwrap_or_default();
    assert!(
        first.starts_with('{') && first.contains("\"message\""),
        "JSON logs: {first}"
    );
}
