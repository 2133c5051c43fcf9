"""`make lab`: JupyterLab on the loopback interface only, behind a token, with a kernel that imports delving."""

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from delving.params import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(address)
    return found


def test_make_lab_listens_on_localhost_with_a_token():
    port = _free_port()
    proc = subprocess.Popen(["make", "-s", "lab", f"LAB_PORT={port}"], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, token, deadline = "", None, time.time() + 120
        while time.time() < deadline and token is None:
            line = proc.stdout.readline()
            log += line
            m = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=(\w+)", line)
            token = m.group(1) if m else None
        assert token, log[-3000:]
        time.sleep(1)
        # 0100007F is 127.0.0.1 in /proc/net/tcp's byte order; no wildcard or external address.
        assert _listening_addresses(port) == {"0100007F"}, _listening_addresses(port)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents")
        assert refused.value.code == 403
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token={token}") as r:
            assert b"python3" in r.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
