"""The Kubernetes manifests: every overlay renders with kustomize, validates against the Kubernetes
schemas, and holds together (Services reach pods, probes hit the gRPC ports, budgets add up)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_commands import DEPLOY, render, tool
from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from llm_server.settings import LlmSettings
from video_server.settings import VideoSettings
from vram.sizes import parse_bytes

OVERLAYS = ["overlays/separate-gpus", "overlays/shared-gpu-16gb", "overlays/cpu-dev"]
KUBERNETES_VERSION = "1.37.0"
# Prometheus-operator kinds: kubernetes-validate has no schema for them; checked by the tests below.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
GiB = 2**30
MiB = 2**20


def of_kind(objects: tuple[dict, ...], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: tuple[dict, ...], kind: str, name: str) -> dict:
    (found,) = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    return found


def containers(deployment: dict, init: bool = False) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def env_of(objects: tuple[dict, ...], container: dict) -> dict[str, str]:
    """The container's environment from its ConfigMaps (what the server's settings read)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


def setting(env: dict[str, str], suffix: str) -> str:
    """The value of SCRIPTREEL_<SERVER>_<suffix> in a server's environment."""
    (value,) = [v for k, v in env.items() if re.fullmatch(rf"SCRIPTREEL_[A-Z]+_{suffix}", k)]
    return value


def schema_errors(objects: tuple[dict, ...]) -> list[str]:
    """What kubernetes-validate finds wrong in rendered objects (operator kinds: their apiVersion)."""
    errors = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in OPERATOR_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1", where
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{where}: {error.message}")
    return errors


@pytest.mark.parametrize("kustomization", ["base", *OVERLAYS])
def test_renders_and_validates_against_kubernetes_schemas(kustomization: str) -> None:
    errors = schema_errors(render(kustomization))
    assert not errors, "\n".join(errors)


def test_the_validator_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(named(render("base"), "Deployment", "scriptreel-llm"))
    containers(deployment)[0]["readinesProbe"] = containers(deployment)[0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_that_serve_their_ports(overlay: str) -> None:
    objects = render(overlay)
    for service in of_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        pods = [
            d
            for d in of_kind(objects, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for pod in pods:
            ports = {p["name"]: p["containerPort"] for c in containers(pod) for p in c["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, (service["metadata"]["name"], port)
        assert "metrics" in {port["name"] for port in service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_balances_over_headless_services(overlay: str) -> None:
    objects = render(overlay)
    env = env_of(objects, containers(named(objects, "Deployment", "scriptreel-gateway"))[0])
    for key in ("SCRIPTREEL_GATEWAY_LLM_TARGET", "SCRIPTREEL_GATEWAY_VIDEO_TARGET"):
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", env[key])
        assert match, f"{key}={env[key]} is not dns:///service:port"
        service = named(objects, "Service", match.group(1))
        assert service["spec"]["clusterIP"] == "None", "DNS must return every pod, not one virtual IP"
        assert int(match.group(2)) in {port["port"] for port in service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servers_listen_where_probes_services_and_prometheus_look(overlay: str) -> None:
    objects = render(overlay)
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        names = [p["name"] for c in containers(deployment) for p in c["ports"]]
        assert len(names) == len(set(names)), f"port names repeat in a pod: {names}"
        for container in containers(deployment):
            env = env_of(objects, container)
            assert setting(env, "HOST") == setting(env, "METRICS_HOST") == "0.0.0.0"
            grpc_port, metrics_port = int(setting(env, "PORT")), int(setting(env, "METRICS_PORT"))
            assert {p["containerPort"] for p in container["ports"]} == {grpc_port, metrics_port}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"] == {"port": grpc_port}, (container["name"], probe)
            startup = container["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, (
                "model loading needs 20 min"
            )
            grace = float(setting(env, "GRACE_SECONDS"))
            assert pod["terminationGracePeriodSeconds"] >= grace + 10, (
                container["name"],
                "drain would be cut",
            )


SETTINGS: dict[str, type[BaseSettings]] = {
    "llm": LlmSettings,
    "video": VideoSettings,
    "gateway": GatewaySettings,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_names_a_field_and_the_servers_accept_its_value(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydantic-settings ignores unknown variables: a misspelt one would silently do nothing.
    objects = render(overlay)
    for deployment in of_kind(objects, "Deployment"):
        for container in containers(deployment):
            settings, env = SETTINGS[container["name"]], env_of(objects, container)
            prefix = settings.model_config["env_prefix"]
            unknown = [k for k in env if k.removeprefix(prefix).lower() not in settings.model_fields]
            assert not unknown, f"{container['name']}: no such setting: {unknown}"
            with monkeypatch.context() as patch:
                for key, value in env.items():
                    patch.setenv(key, value)
                settings()  # raises on a value the server would refuse


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_with_a_read_only_root(overlay: str) -> None:
    for deployment in of_kind(render(overlay), "Deployment"):
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in containers(deployment, init=True):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_disruption_budget(overlay: str) -> None:
    objects = render(overlay)
    budgets = of_kind(objects, "PodDisruptionBudget")
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets)


@pytest.mark.parametrize("overlay", ["overlays/separate-gpus", "overlays/shared-gpu-16gb"])
def test_model_servers_get_a_gpu_and_read_only_weights(overlay: str) -> None:
    objects = render(overlay)
    (claim,) = of_kind(objects, "PersistentVolumeClaim")
    for deployment in of_kind(objects, "Deployment"):
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        for container in containers(deployment):
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            if container["name"] == "gateway":
                assert gpus is None
                continue
            assert gpus == 1
            env = env_of(objects, container)
            assert setting(env, "MODEL_DIR").startswith("/models/")
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
            assert mount["readOnly"] is True
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_the_compile_cache_component_gives_every_model_server_one_shared_cache(tmp_path: Path) -> None:
    """An overlay of one's own adding the component, as deploy/README says: both model pods mount one
    ReadWriteMany claim, writable by their user, and point inductor's cache into it."""
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    mine = tmp_path / "deploy" / "k8s" / "overlays" / "mine"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../separate-gpus"],
                "components": ["../../components/compile-cache"],
            }
        )
    )
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(mine)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    objects = tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)
    assert not schema_errors(objects)
    claim = named(objects, "PersistentVolumeClaim", "scriptreel-compile-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    served = {}
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in containers(deployment):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if "TORCHINDUCTOR_CACHE_DIR" not in env:
                continue
            (mount,) = [
                m
                for m in container["volumeMounts"]
                if env["TORCHINDUCTOR_CACHE_DIR"].startswith(m["mountPath"])
            ]
            assert not mount.get("readOnly")
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "scriptreel-compile-cache"
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
            served[container["name"]] = env["TORCHINDUCTOR_CACHE_DIR"]
    assert served == {"llm": "/var/cache/scriptreel/inductor", "video": "/var/cache/scriptreel/inductor"}


def test_separate_gpus_puts_each_model_in_its_own_pod() -> None:
    objects = render("overlays/separate-gpus")
    pods = {d["metadata"]["name"]: [c["name"] for c in containers(d)] for d in of_kind(objects, "Deployment")}
    assert pods == {
        "scriptreel-gateway": ["gateway"],
        "scriptreel-llm": ["llm"],
        "scriptreel-video": ["video"],
    }


def test_shared_gpu_runs_both_servers_in_one_pod_with_budgets_under_the_card() -> None:
    objects = render("overlays/shared-gpu-16gb")
    (pod,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] != "scriptreel-gateway"]
    llm, video = containers(pod)
    assert (llm["name"], video["name"]) == ("llm", "video")
    assert pod["spec"]["strategy"]["type"] == "Recreate", "a second copy of the pair cannot fit the card"
    # The containers are the base's, only resized.
    base = render("base")
    for container, deployment in ((llm, "scriptreel-llm"), (video, "scriptreel-video")):
        (original,) = containers(named(base, "Deployment", deployment))
        strip = ("resources", "envFrom")
        assert {k: v for k, v in container.items() if k not in strip} == {
            k: v for k, v in original.items() if k not in strip
        }
    # The arithmetic of the overlay's comment: budgets (CUDA contexts included) + slack <= the card,
    # and each budget holds the plan auto picks for the reference models at the overlay's limits.
    card = 16376 * MiB
    budgets = [parse_bytes(setting(env_of(objects, c), "VRAM_BUDGET")) or card for c in (llm, video)]
    assert sum(budgets) + GiB // 4 <= card, [b / GiB for b in budgets]
    from bench.fullsize import glm_config
    from llm_server.engine import QUANTIZE_SKIP
    from llm_server.footprint import predict_footprint
    from vram.plan import Hardware, Policy, resolve_plan

    llm_env = env_of(objects, llm)
    glm = predict_footprint(
        glm_config(),
        int(setting(llm_env, "MAX_BATCH_SIZE")),
        int(setting(llm_env, "MAX_CONTEXT_TOKENS")),
        quantize_skip=QUANTIZE_SKIP,
        prefill_chunk=512,
        cuda_graphs=True,  # as the server predicts on a GPU
    )
    a4000 = Hardware("cuda:0", card, (8, 6), bf16=True)
    assert resolve_plan(glm, a4000, Policy(budget_bytes=budgets[0])).precision == "int8"


def test_cpu_dev_needs_no_gpu_and_builds_tiny_models() -> None:
    objects = render("overlays/cpu-dev")
    assert "nvidia.com" not in yaml.safe_dump_all(objects)
    assert not of_kind(objects, "PersistentVolumeClaim")
    for name in ("scriptreel-llm", "scriptreel-video"):
        deployment = named(objects, "Deployment", name)
        (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert init["command"] == ["python", "-m", "tiny_models", "/models"]
        env = env_of(objects, containers(deployment)[0])
        assert (setting(env, "DEVICE"), setting(env, "PRECISION")) == ("cpu", "fp32")
    images = {c["image"] for d in of_kind(objects, "Deployment") for c in containers(d, init=True)}
    assert images == {"scriptreel-gateway"}, "the CPU image runs everything"


@pytest.mark.parametrize("overlay", ["overlays/separate-gpus", "overlays/shared-gpu-16gb"])
def test_monitoring_objects_cover_every_server(overlay: str) -> None:
    objects = render(overlay)
    (monitor,) = of_kind(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in of_kind(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} == {
        "scriptreel-gateway",
        "scriptreel-llm",
        "scriptreel-video",
    }
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]

    (rule,) = of_kind(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())

    dashboard = named(objects, "ConfigMap", "scriptreel-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (DEPLOY / "grafana" / "scriptreel-dashboard.json").read_text()
    assert dashboard["data"] == {"scriptreel-dashboard.json": source}
    assert json.loads(source)["uid"] == "scriptreel"
