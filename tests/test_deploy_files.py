"""The deployment examples in scripts/: Kubernetes manifests valid against the API schemas
(kubernetes-validate), wired to each other and to flags that exist; systemd units and the
NGINX config naming real flags and settings."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway.workers_file import check_worker_address
from headrace.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "scripts"
K8S = DEPLOY / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # a version every supported cluster understands


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d["kind"] == kind]


def parse_command(container: dict) -> None:
    """The container's command line parses with headrace's own parser."""
    argv = [*container["command"][1:], *container["args"]]
    argv = [re.sub(r"\$\((\w+)\)", "x", a) for a in argv]  # $(ENV) expands in the pod
    build_parser().parse_args(argv)


@pytest.mark.parametrize("name,doc", manifests(), ids=lambda x: x if isinstance(x, str) else "")
def test_manifest_is_valid_kubernetes(name: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_manifests_fit_together() -> None:
    (workers,) = by_kind("StatefulSet")
    (gateway,) = by_kind("Deployment")
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    (config,) = by_kind("ConfigMap")
    worker_pod = workers["spec"]["template"]["spec"]
    (wc,) = worker_pod["containers"]
    assert wc["resources"]["limits"]["nvidia.com/gpu"] == 1  # one GPU per worker
    assert wc["readinessProbe"]["httpGet"]["path"] == "/health"
    assert (
        "--health-port=8001" in wc["args"]
        and {"name": "health", "containerPort": 8001} in wc["ports"]
    )
    parse_command(wc)
    (gc,) = gateway["spec"]["template"]["spec"]["containers"]
    assert gc["readinessProbe"]["httpGet"]["path"] == "/health"
    parse_command(gc)
    # The workers file lists exactly the StatefulSet's pods through its headless Service.
    svc = services[workers["spec"]["serviceName"]]
    assert svc["spec"]["clusterIP"] == "None"
    listed = [
        check_worker_address(line)
        for line in config["data"]["workers"].splitlines()
        if line.strip() and not line.startswith("#")
    ]
    name = workers["metadata"]["name"]
    wanted = [
        f"tcp://{name}-{i}.{svc['metadata']['name']}:5550"
        for i in range(workers["spec"]["replicas"])
    ]
    assert listed == wanted
    assert f"--workers-file=/etc/headrace/{next(iter(config['data']))}" in gc["args"]
    # Every Service selects pods that exist.
    pod_labels = [workers["spec"]["template"]["metadata"]["labels"]]
    pod_labels.append(gateway["spec"]["template"]["metadata"]["labels"])
    for s in services.values():
        sel = s["spec"]["selector"]
        assert any(sel.items() <= labels.items() for labels in pod_labels), s["metadata"]["name"]


def test_systemd_units_name_real_flags() -> None:
    systemd = DEPLOY / "systemd"
    worker = (systemd / "headrace-worker@.service").read_text()
    line = next(x for x in worker.splitlines() if x.startswith("ExecStart="))
    cmd = shlex.split(line.split("-c ", 1)[1])[0]  # the sh -c script
    for shell, value in (
        ('"$$HEADRACE_MODEL"', "/m"),
        ("$$HEADRACE_WORKER_ARGS", ""),
        ('"tcp://$$HEADRACE_WORKER_HOST:$$((5550 + %i))"', "tcp://127.0.0.1:5550"),
        ('"%H-gpu%i"', "h-gpu0"),
        ('"$$((8100 + %i))"', "8100"),
        ('"$$HEADRACE_WORKER_HOST"', "127.0.0.1"),
    ):
        assert shell in cmd, shell
        cmd = cmd.replace(shell, value)
    assert cmd.startswith("exec headrace ")
    build_parser().parse_args(shlex.split(cmd)[2:])
    for env in ("gateway.env.example",):
        text = (systemd / env).read_text()
        args = re.search(r"^HEADRACE_GATEWAY_ARGS=(.*)$", text, re.M)
        assert args is not None, env
        build_parser().parse_args(["gateway", *shlex.split(args.group(1))])
    workers = (systemd / "workers.example").read_text().splitlines()
    assert [check_worker_address(w) for w in workers if w and not w.startswith("#")]


def test_nginx_config_has_the_streaming_settings() -> None:
    conf = (DEPLOY / "deploy" / "nginx" / "headrace.conf").read_text()
    for setting in (
        "proxy_buffering off;",
        "proxy_ignore_client_abort off;",
        "proxy_read_timeout 3600s;",
        "proxy_http_version 1.1;",
        "least_conn;",
        "max_fails=2 fail_timeout=5s",
        "location = /health",
    ):
        assert setting in conf, setting
    assert "non_idempotent" not in conf.split("proxy_next_upstream ", 1)[1].split(";")[0]
