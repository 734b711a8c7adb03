"""Deployment files, validated by parsing (no Docker engine or cluster here): docker-compose.yml
structure, GPU reservations and healthchecks; the Kubernetes manifests against the API schema."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest
import yaml

from services.drafter.settings import parse_settings
from services.verifier.settings import parse_settings as parse_verifier
from specdec.config import TreeConfig
from tests.conftest import REPO

K8S_VERSION = "1.30"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
MANIFESTS = [doc for path in sorted((REPO / "deploy" / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()


def test_compose_services_ports_and_gpus() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"drafter", "verifier"}
    assert services["verifier"]["ports"] == ["8000:8000"]
    assert "ports" not in services["drafter"], "the drafter is internal"
    for name, service in services.items():
        build = service["build"]
        assert build["dockerfile"] == "deploy/Dockerfile" and build["target"] == name
        assert re.search(rf"^FROM .* AS {name}$", DOCKERFILE, re.M), f"no {name} stage in deploy/Dockerfile"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
        health = service["healthcheck"]
        assert health["test"][0] == "CMD" and health["test"][1:4] == ["python", "-m", "services.probe"]
        assert service["restart"] in {"always", "unless-stopped", "on-failure"}
        assert "--device" in service["command"] and "cuda" in service["command"]


def test_dockerfile_has_cuda_base() -> None:
    assert re.search(r"^FROM nvidia/cuda:\S+ AS base$", DOCKERFILE, re.M)


def test_kubernetes_manifests_validate() -> None:
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in MANIFESTS)
    assert kinds == [("Deployment", "specdec-drafter"), ("Deployment", "specdec-verifier"), ("Service", "specdec-drafter"), ("Service", "specdec-verifier")]
    for doc in MANIFESTS:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_broken_manifest() -> None:
    broken = copy.deepcopy(next(d for d in MANIFESTS if d["kind"] == "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "not-a-port"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kubernetes_gpus_probes_and_services() -> None:
    deployments = {d["metadata"]["name"]: d for d in MANIFESTS if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in MANIFESTS if d["kind"] == "Service"}
    for name, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert services[name]["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in container
    drafter = deployments["specdec-drafter"]["spec"]["template"]["spec"]["containers"][0]
    assert all("grpc" in drafter[p] for p in ("readinessProbe", "livenessProbe"))
    verifier = deployments["specdec-verifier"]["spec"]["template"]["spec"]["containers"][0]
    assert verifier["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert verifier["livenessProbe"]["httpGet"]["path"] == "/health"


def test_gpu_drafters_use_the_reference_tree() -> None:
    """The CPU-tuned tree defaults would starve a GPU: the deployed drafters parse to EAGLE-2's
    reference tree with every node verified."""
    drafter_k8s = next(d for d in MANIFESTS if d["metadata"]["name"] == "specdec-drafter" and d["kind"] == "Deployment")
    for args in (COMPOSE["services"]["drafter"]["command"], drafter_k8s["spec"]["template"]["spec"]["containers"][0]["args"]):
        assert parse_settings(args).tree() == TreeConfig(top_k=10, depth=6, total_tokens=60, min_prob=0.0)


def test_deployed_verifiers_use_the_remote_drafter_service(monkeypatch) -> None:
    """Their drafter settings (flags and SPECDEC_VERIFIER_DRAFTER* variables) parse to the
    remote mode at the drafter service's address."""
    verifier_k8s = next(d for d in MANIFESTS if d["metadata"]["name"] == "specdec-verifier" and d["kind"] == "Deployment")
    (container,) = verifier_k8s["spec"]["template"]["spec"]["containers"]
    compose = COMPOSE["services"]["verifier"]
    deployed = [
        (compose["command"], compose["environment"], "drafter:50051"),
        (container["args"], {e["name"]: e["value"] for e in container["env"] if "value" in e}, "specdec-drafter:50051"),
    ]
    for args, env, address in deployed:
        with monkeypatch.context() as patch:
            for name, value in env.items():
                if name.startswith("SPECDEC_VERIFIER_DRAFTER"):
                    patch.setenv(name, value)
            settings = parse_verifier(args)
        assert (settings.drafter, settings.drafter_address) == ("remote", address)
