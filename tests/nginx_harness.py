"""Real NGINX for the scale-out test: Debian's package (installed with apt-get when
missing), running the shipped scripts/deploy/nginx/headrace.conf with its upstream servers
and listen address rewritten to loopback ports, from a private prefix in a temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONF = REPO / "scripts" / "deploy" / "nginx" / "headrace.conf"

MAIN_CONF = """\
{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/headrace.conf;
}}
"""


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def ensure_nginx() -> str:
    """The nginx binary, installing Debian's package first if needed (as root)."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("nginx is not installed and this is not root: apt-get install nginx")
    # Keep the package from starting the system's nginx on port 80 (a container's
    # usual policy-rc.d does this already): only the test's own nginx may run.
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        r = _apt_get("install", "-y", "-q", "nginx")
        if r.returncode != 0:  # a fresh image has no package lists yet
            _apt_get("update", "-q")
            r = _apt_get("install", "-y", "-q", "nginx")
        if r.returncode != 0:
            raise RuntimeError(
                f"apt-get install nginx failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
            )
    finally:
        if added_policy:
            policy.unlink()
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise RuntimeError("apt-get installed nginx but there is no nginx binary")
    return found


def site_conf(listen_port: int, gateway_ports: list[int]) -> str:
    """The shipped config with its example gateways and port replaced by loopback ones."""
    text = SHIPPED_CONF.read_text()
    servers = "".join(
        f"    server 127.0.0.1:{p} max_fails=2 fail_timeout=5s;\n" for p in gateway_ports
    )
    text, n = re.subn(r"(?m)^(    server \S+:\d+ [^\n]*\n)+", servers, text, count=1)
    assert n == 1, "the shipped config's upstream servers were not found"
    text, n = re.subn(r"(?m)^    listen 80;$", f"    listen 127.0.0.1:{listen_port};", text)
    assert n == 1, "the shipped config's listen line was not found"
    return text


class Nginx:
    """nginx in the foreground with its own prefix under `tmp`."""

    def __init__(self, tmp: Path, listen_port: int, gateway_ports: list[int]) -> None:
        binary = ensure_nginx()
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "headrace.conf").write_text(site_conf(listen_port, gateway_ports))
        # As root, nginx's workers would run as `nobody`, who cannot enter pytest's
        # private temporary folders.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (tmp / "nginx.conf").write_text(MAIN_CONF.format(tmp=tmp, user=user))
        self.base = f"http://127.0.0.1:{listen_port}"
        args = [binary, "-e", str(tmp / "error.log"), "-p", str(tmp), "-c", str(tmp / "nginx.conf")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr  # the shipped config parses
        self.popen = subprocess.Popen([*args, "-g", "daemon off;"])

    def wait_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, self.error_log()
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"nginx not serving /health:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
