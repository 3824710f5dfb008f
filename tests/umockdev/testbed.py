#!/usr/bin/python3
"""umockdev testbed owner for nitrokey-e2e's `usb::Testbed` (tests/src/usb.rs).

Must run under `umockdev-wrapper` (LD_PRELOAD of libumockdev-preload): umockdev resolves the
device of a uevent through libudev, which only sees the testbed's /sys under the preload.

Protocol: one JSON object per line on stdin, one line back on stdout.
  {"op": "add", "record": "<umockdev record>", "syspath": "/sys/devices/..."}  -> ok
  {"op": "remove", "syspath": "/sys/devices/..."}                              -> ok
  {"op": "quit"}                                                               -> ok, exit
Errors answer `error <message>`. At start the helper prints `ready <testbed root dir>`.
"""
import json
import shutil
import sys

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402


def main():
    testbed = UMockdev.Testbed.new()
    root = testbed.get_root_dir()
    print(f"ready {root}", flush=True)
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
                op = request["op"]
                if op == "add":
                    testbed.add_from_string(request["record"])
                    testbed.uevent(request["syspath"], "add")
                elif op == "remove":
                    testbed.uevent(request["syspath"], "remove")
                    testbed.remove_device(request["syspath"])
                elif op == "quit":
                    print("ok", flush=True)
                    break
                else:
                    raise ValueError(f"unknown op {op!r}")
                print("ok", flush=True)
            except Exception as e:  # report, keep serving
                print("error " + str(e).replace("\n", " "), flush=True)
    finally:
        del testbed
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
