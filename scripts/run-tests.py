#!/usr/bin/env python3
"""Runs the workspace's test binaries several at a time, as `cargo test` would run them one by one.

Usage: run-tests.py ARTIFACTS LOG

ARTIFACTS is the JSON `cargo test --no-run --message-format=json-render-diagnostics` printed;
every test executable in it runs once, through scripts/test-runner.sh (its own temporary
directory, its time recorded), with what Cargo gives a test binary it runs: the package's
directory as working directory, CARGO, CARGO_MANIFEST_DIR, CARGO_PKG_NAME and
CARGO_PKG_VERSION. Most binaries spend their time waiting on their peers (OpenBao starting,
a token's key generation, a kubelet stand-in's timers), which is why several fit on two cores;
the tests judge timing from events, so the load this adds changes no verdict (the test command's
--loaded mode shows the same on a saturated machine).

Each binary's whole output is appended to LOG, in the order the binaries end, for the test
command's closing count; the console gets one line per binary, and the whole output of any
that failed. The longest binaries start first: their names come from the last run's times
(target/test-times.tsv, rewritten at the end), else from the list below.

NITROKEY_TEST_JOBS sets how many run at once (default 3). Exits 1 if any binary failed.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "scripts", "test-runner.sh")
HISTORY = os.path.join(REPO, "target", "test-times.tsv")
# Before any run has recorded times: the binaries known to take longest (each over a minute on
# two cores), so they do not start last and keep the run waiting.
KNOWN_LONG = [
    "fresh_install", "images", "image_rootfs", "fault_matrix", "failures", "stick",
    "rotate_key", "disaster_recovery", "ha_rejoin", "rekey", "soak",
]


def executables(artifacts_path):
    """(name, executable, manifest dir, package name, package version) of every test binary."""
    found = []
    with open(artifacts_path, encoding="utf-8") as artifacts:
        for line in artifacts:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("reason") != "compiler-artifact" or not message.get("executable"):
                continue
            if not message.get("profile", {}).get("test"):
                continue
            manifest_dir = os.path.dirname(message["manifest_path"])
            # `path+file:///dir#name@version`, or `path+file:///dir/name#version` when the
            # directory is named after the package.
            spec = message["package_id"].rsplit("#", 1)[-1]
            if "@" in spec:
                package, version = spec.split("@", 1)
            else:
                package, version = os.path.basename(manifest_dir), spec
            kind = message["target"]["kind"][0]
            name = message["target"]["name"]
            label = f"{package} ({kind})" if kind == "lib" else name
            found.append((label, message["executable"], manifest_dir, package, version))
    return found


def history():
    times = {}
    try:
        with open(HISTORY, encoding="utf-8") as f:
            for line in f:
                seconds, _, name = line.rstrip("\n").partition("\t")
                if seconds.isdigit():
                    times[name] = int(seconds)
    except OSError:
        pass
    return times


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    artifacts_path, log_path = sys.argv[1], sys.argv[2]
    jobs = int(os.environ.get("NITROKEY_TEST_JOBS", "3") or "3")
    binaries = executables(artifacts_path)
    if not binaries:
        print("error: the build listed no test binaries", file=sys.stderr)
        return 1
    past = history()

    def expected(binary):
        label = binary[0]
        if label in past:
            return past[label]
        return 10_000 - KNOWN_LONG.index(label) if label in KNOWN_LONG else 0

    binaries.sort(key=expected, reverse=True)
    cargo = os.environ.get("CARGO", "cargo")
    lock = threading.Lock()
    durations = {}
    failed = []

    def run(binary):
        label, executable, manifest_dir, package, version = binary
        env = dict(os.environ, CARGO=cargo, CARGO_MANIFEST_DIR=manifest_dir,
                   CARGO_PKG_NAME=package, CARGO_PKG_VERSION=version)
        started = time.monotonic()
        done = subprocess.run([RUNNER, executable], cwd=manifest_dir, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, check=False)
        seconds = round(time.monotonic() - started)
        output = done.stdout.decode("utf-8", "replace")
        results = [line for line in output.splitlines() if line.startswith("test result:")]
        summary = results[-1][len("test result: "):] if results else "no result line"
        with lock:
            durations[label] = seconds
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"     Running {label}\n{output}\n")
            print(f"    {label}: {summary.split(';')[0]}"
                  f"{'; ' + summary.split(';')[1].strip() if ';' in summary else ''} ({seconds} s)",
                  flush=True)
            if done.returncode != 0:
                failed.append(label)
                print(f"---- output of {label} (exit {done.returncode}) ----\n{output}", flush=True)

    print(f"    {len(binaries)} test binaries, {jobs} at a time", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(run, b) for b in binaries]:
            future.result()
    try:
        os.makedirs(os.path.dirname(HISTORY), exist_ok=True)
        with open(HISTORY, "w", encoding="utf-8") as f:
            for label, seconds in sorted(durations.items(), key=lambda kv: -kv[1]):
                f.write(f"{seconds}\t{label}\n")
    except OSError:
        pass
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
