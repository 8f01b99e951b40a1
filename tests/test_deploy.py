"""The image and the manifests of deploy/: each entrypoint is a command line plvm accepts, each cluster has what its
config asks for, and each field is one KubeRay's API defines."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from subprocess import list2cmdline
from zoneinfo import ZoneInfo

import pytest
import yaml
from conftest import REPO
from croniter import croniter

import submit
from pipelines.cli import parser
from pipelines.config import Config, load_config

DEPLOY = REPO / "deploy"
KUBERAY = "v1.7.0"
"""The KubeRay release whose API the manifests use (ray-operator/apis/ray/v1, ray.io/v1)."""

RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "submissionMode", "backoffLimit", "activeDeadlineSeconds",
               "shutdownAfterJobFinishes", "ttlSecondsAfterFinished"}  # fmt: skip
"""The fields of KubeRay v1.7.0's RayJobSpec (rayjob_types.go) that the manifests rely on."""
RAYCRONJOB_SPEC = {"schedule", "timeZone", "jobTemplate"}
"""The fields of KubeRay v1.7.0's RayCronJobSpec (raycronjob_types.go; alpha, feature gate RayCronJob)."""
RAYCLUSTER_SPEC = {f"rayClusterSpec.{field}" for field in (
    "rayVersion", "headGroupSpec.rayStartParams", "workerGroupSpecs[].groupName", "workerGroupSpecs[].replicas",
    "workerGroupSpecs[].minReplicas", "workerGroupSpecs[].maxReplicas", "workerGroupSpecs[].rayStartParams")}  # fmt: skip
"""The fields of KubeRay v1.7.0's RayClusterSpec, HeadGroupSpec and WorkerGroupSpec (raycluster_types.go) under the
RayJobSpec's ``rayClusterSpec``, besides each group's ``template``."""
POD_TEMPLATE = {"spec.containers[].name", "spec.containers[].image", "spec.containers[].envFrom[].secretRef.name",
                "spec.containers[].ports[].containerPort", "spec.containers[].ports[].name",
                "spec.containers[].resources.limits", "spec.containers[].resources.requests",
                "spec.containers[].volumeMounts[].name", "spec.containers[].volumeMounts[].mountPath",
                "spec.containers[].volumeMounts[].readOnly", "spec.volumes[].name",
                "spec.volumes[].persistentVolumeClaim.claimName", "spec.volumes[].persistentVolumeClaim.readOnly"}  # fmt: skip
"""The fields of Kubernetes' PodTemplateSpec (core/v1) under a group's ``template``, as KubeRay v1.7.0's CRDs hold it."""
MAPS = {"rayStartParams", "limits", "requests"}
"""Fields whose keys are free: ``ray start``'s options, resource names."""


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def fields(node, prefix: str = "") -> set[str]:
    """The dotted paths of ``node``'s fields (``[]`` for a list's items), not entering the maps of :data:`MAPS`."""
    if isinstance(node, list):
        return set().union(*(fields(item, f"{prefix}[]") for item in node)) if node else {prefix}
    if not isinstance(node, dict) or prefix.rsplit(".", 1)[-1] in MAPS:
        return {prefix}
    return set().union(*(fields(value, f"{prefix}.{key}" if prefix else key) for key, value in node.items()))


def rayjob_specs() -> dict[str, dict]:
    """Each manifest's RayJobSpec: the RayJob's spec, the RayCronJob's jobTemplate."""
    return {"rayjob-caption.yaml": manifest("rayjob-caption.yaml")["spec"],
            "raycronjob-nightly.yaml": manifest("raycronjob-nightly.yaml")["spec"]["jobTemplate"]}  # fmt: skip


def rayjob_fields(spec: dict) -> set[str]:
    """A RayJobSpec's fields, each as KubeRay's lists name it (the pod templates' apart)."""
    found = set()
    for path in fields(spec):
        group = re.match(r"rayClusterSpec\.(headGroupSpec|workerGroupSpecs\[\])\.template\.(.*)", path)
        found.add(f"template:{group.group(2)}" if group else path)
    return found


def test_the_manifests_use_only_fields_of_kuberays_api():
    for name, spec in rayjob_specs().items():
        used = rayjob_fields(spec)
        assert {f for f in used if not f.startswith("template:")} <= RAYJOB_SPEC | RAYCLUSTER_SPEC, name
        assert {f.removeprefix("template:") for f in used if f.startswith("template:")} <= POD_TEMPLATE, name
    job, cron = manifest("rayjob-caption.yaml"), manifest("raycronjob-nightly.yaml")
    assert (job["apiVersion"], job["kind"], set(job)) == ("ray.io/v1", "RayJob", {"apiVersion", "kind", "metadata", "spec"})
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert set(cron["spec"]) <= RAYCRONJOB_SPEC and set(job["metadata"]) == set(cron["metadata"]) == {"name"}
    used = set().union(*(rayjob_fields(spec) for spec in rayjob_specs().values()))
    listed = RAYJOB_SPEC | RAYCLUSTER_SPEC | {f"template:{f}" for f in POD_TEMPLATE}
    assert used == listed, f"the lists name exactly the fields the manifests rely on: {used ^ listed}"


def test_the_manifests_values_are_ones_kuberay_and_ray_accept():
    from ray.runtime_env import RuntimeEnv
    from ray.scripts.scripts import start

    ray_start = {option.lstrip("-") for param in start.params for option in param.opts}
    pinned = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    for name, spec in rayjob_specs().items():
        assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"), name
        assert set(yaml.safe_load(spec["runtimeEnvYAML"])) <= RuntimeEnv.known_fields, name
        assert spec["rayClusterSpec"]["rayVersion"] == pinned, f"{name}: the image's Ray"
        for group in groups(spec):
            assert set(group["rayStartParams"]) <= ray_start, f"{name}: options of ray start"
        assert spec["ttlSecondsAfterFinished"] and spec["shutdownAfterJobFinishes"], "the TTL needs the shutdown"
    cron = manifest("raycronjob-nightly.yaml")["spec"]
    assert croniter.is_valid(cron["schedule"]) and ZoneInfo(cron["timeZone"])


def groups(spec: dict) -> list[dict]:
    """A RayJobSpec's head group and worker groups."""
    cluster = spec["rayClusterSpec"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def command_lines(entrypoint: str, submission_mode: str) -> list[list[str]]:
    """The command lines an entrypoint runs on the cluster: in K8sJobMode the submitter pod's shell reads it, ``ray job
    submit`` joins the words again (``list2cmdline``) and the job's shell reads that; ``bash -c '... && ...'`` runs
    its commands one after the other."""
    words = shlex.split(entrypoint)
    if submission_mode == "K8sJobMode":
        assert shlex.split(list2cmdline(words)) == words, f"both shells read the same words: {entrypoint}"
    if words[:2] == ["bash", "-c"] and len(words) == 3:
        words = shlex.split(words[2])
    lines, line = [], []
    for word in [*words, "&&"]:
        if word == "&&":
            lines.append(line)
            line = []
        else:
            line.append(word)
    return lines


def in_image(path: str) -> Path:
    """A path of the image's project folder (the Dockerfile's WORKDIR) as a path of this checkout."""
    [workdir] = re.findall(r"^WORKDIR (\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert path.startswith(f"{workdir}/"), f"{path} is in the image's project folder {workdir}"
    return REPO / path.removeprefix(f"{workdir}/")


def config_of(args, env: dict[str, str], monkeypatch) -> Config:
    """The config a plvm command line loads on the cluster, with the job's environment variables."""
    monkeypatch.delenv("PLVM_MODELS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_config(in_image(args.config), bank=getattr(args, "bank", None))


def quantity(value) -> float:
    """A Kubernetes quantity of CPUs or GPUs as KubeRay gives it to ``ray start`` (whole units, rounded up)."""
    text = str(value)
    return math.ceil(float(text[:-1]) / 1000 if text.endswith("m") else float(text))


def node(group: dict) -> tuple[float, float, list[str]]:
    """A group's pod as a Ray node: CPUs, GPUs (rayStartParams, else the container's limits, then requests, as
    KubeRay's generateRayStartCommand reads them), and the folders mounted in its container."""
    [container] = group["template"]["spec"]["containers"]
    params, limits = group["rayStartParams"], container["resources"].get("limits", {})
    requests = container["resources"].get("requests", {})
    cpus = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    return quantity(cpus), quantity(gpus), [m["mountPath"] for m in container.get("volumeMounts", [])]


@pytest.mark.parametrize("name", ["rayjob-caption.yaml", "raycronjob-nightly.yaml"])
def test_each_entrypoint_is_a_plvm_command_line_whose_config_the_cluster_can_run(name, monkeypatch):
    spec = rayjob_specs()[name]
    env = yaml.safe_load(spec["runtimeEnvYAML"]).get("env_vars", {})
    lines = command_lines(spec["entrypoint"], spec["submissionMode"])
    assert [line[:2] for line in lines] == (
        [["plvm", "caption"]] if name.startswith("rayjob") else [["plvm", "caption"], ["plvm", "rematch"]]
    )
    head, *workers = [node(group) for group in groups(spec)]
    counts = [(g.get("maxReplicas", g["replicas"]), node(g)) for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    for line in lines:
        args = parser().parse_args(line[1:])
        config = config_of(args, env, monkeypatch)
        if args.command == "caption":
            assert args.resume, "a retry or the next night goes on where the last run stopped"
            assert all(uri.startswith("s3://") for uri in (args.input, args.output, config.bank)), "every node reads them"
        assert args.metrics_push, "each run pushes its metrics"
        for kind, path in (("llava", config.models.llava), ("dinov2", config.models.dinov2),
                           ("aligner", config.models.aligner)):  # fmt: skip
            for _, _, mounts in [head, *workers]:
                assert any(path.startswith(f"{m}/") for m in mounts), f"{name}: models.{kind} {path} is mounted"
        actors = [config.detect.resources, config.embed.resources, config.generate.resources]
        for stage in actors:
            assert any(c >= stage.num_cpus and g >= stage.num_gpus for c, g, _ in workers), f"{name}: an actor fits"
        cpus = sum(n * c for n, (c, _, _) in counts)
        gpus = sum(n * g for n, (_, g, _) in counts)
        assert sum(s.concurrency * s.num_cpus for s in actors) + config.tasks.num_cpus <= cpus, name
        assert sum(s.concurrency * s.num_gpus for s in actors) <= gpus, name
        assert config.generate.device == "cuda" and config.generate.resources.num_gpus >= 1


def test_the_cron_line_submits_the_nightly_run_for_its_own_tick():
    [line] = [line for line in (DEPLOY / "crontab").read_text().splitlines()
              if line.strip() and not line.startswith("#") and not re.match(r"^[A-Z_]+=", line)]  # fmt: skip
    *schedule, command = line.split(None, 5)
    lines = command_lines(command, "cron")
    assert lines[0][0] == "cd" and in_image(lines[0][1] + "/submit.py") == REPO / "submit.py"
    plvm = []
    for words in lines[1:]:
        assert words[1] == "submit.py"
        args = submit.build_parser().parse_args(words[2:])
        assert args.tick == " ".join(schedule) and submit.tick_of(args.tick), "the tick is the line's own schedule"
        assert args.wait and args.retries and args.logs and args.no_working_dir
        plvm.append(submit.plvm_command(args))
        config = load_config(in_image(parser().parse_args(plvm[-1]).config))
        assert config.generate.device == "cuda"
    assert [p[0] for p in plvm] == ["caption", "rematch"]
    assert "--resume" in plvm[0] and all("--metrics-push" in p for p in plvm)


def test_the_image_installs_with_setup_sh_and_runs_plvm_as_a_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    accepted = set(re.findall(r"^\s+(--[a-z-]+)\)", setup, re.M))
    runs = re.findall(r"scripts/setup\.sh((?: --[a-z-]+(?: \"[^\"]*\"| [^ ;\"]+)?)*) ;;", dockerfile)
    assert len(runs) == 2, "the CPU and the CUDA variant"
    for options in runs:
        assert set(re.findall(r"--[a-z-]+", options)) <= accepted, options
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M) and re.search(r'^ENTRYPOINT \["plvm"\]', dockerfile, re.M)
    assert "ENV PATH=/opt/plvm/.venv/bin:" in dockerfile, "plvm, python and ray of the environment setup.sh built"
