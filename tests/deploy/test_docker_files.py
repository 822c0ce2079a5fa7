"""What CI can check of the deployment without a Docker engine: the compose file parses, its
commands and settings exist in the CLI and Settings, .env.example documents every setting, and
the images install the versions pyproject.toml asks for (the API image without torch)."""

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.cli import build_parser
from app.core.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = {"api": REPO / "docker" / "api.Dockerfile", "worker": REPO / "docker" / "worker.Dockerfile"}
# Dependencies only the engine needs: the API image goes without them (no torch, no CUDA). numpy
# and pillow are not among them: the API's upload checks read array headers and image sizes.
ENGINE_ONLY = {"torch", "safetensors"}
# Variables of docker-compose.yml itself, not settings of the service.
DEPLOYMENT_ONLY = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "BAERASE_API_PORT",
                   "BAERASE_API_IMAGE", "BAERASE_WORKER_IMAGE", "BAERASE_WORKER_GPUS"}
SETTINGS = {f"BAERASE_{name.upper()}" for name in Settings.model_fields}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_parses(tmp_path):
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client here")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), "POSTGRES_PASSWORD": "x"}
    for profile in ([], ["--profile", "cpu"]):
        result = subprocess.run([*command, "-f", str(COMPOSE), *profile, "config", "-q"],
                                capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr


def test_the_stack_has_its_services_volumes_and_health_checks():
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "worker-cpu"} <= set(services)
    for name in ("postgres", "redis", "api", "worker", "worker-cpu"):
        assert "healthcheck" in services[name], name
    assert services["migrate"]["command"] == ["baerase", "db", "upgrade"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "profiles" not in services["worker"] and services["worker-cpu"]["profiles"] == ["cpu"]
    assert "ports" not in services["worker"]  # or --scale worker=N would clash on the host port
    assert {"postgres-data", "artifacts"} <= set(compose()["volumes"])
    artifact_dir = services["api"]["environment"]["BAERASE_ARTIFACT_DIR"]
    for name in ("api", "worker", "worker-cpu"):
        assert f"artifacts:{artifact_dir}" in services[name]["volumes"], name


def commands() -> list[list[str]]:
    found = [service["command"] for service in compose()["services"].values()
             if service.get("command") and service["command"][0] == "baerase"]
    for dockerfile in DOCKERFILES.values():
        cmd = re.search(r"^CMD (\[.*\])$", dockerfile.read_text(), re.M).group(1)
        found.append(yaml.safe_load(cmd))
    return found


def test_every_command_exists_in_the_cli():
    parser = build_parser()
    assert len(commands()) >= 6
    for command in commands():
        assert command[0] == "baerase"
        parser.parse_args(command[1:])  # exits (SystemExit) on an unknown command or option


def test_every_setting_given_to_the_service_exists():
    for name, service in compose()["services"].items():
        if service.get("image", "").startswith(("postgres", "redis")):
            continue
        unknown = set(service["environment"]) - SETTINGS
        assert not unknown, f"{name}: not settings: {unknown}"
    for dockerfile in DOCKERFILES.values():
        env_lines = " ".join(re.findall(r"^ENV (.*(?:\\\n.*)*)", dockerfile.read_text(), re.M))
        names = {n for n in re.findall(r"(BAERASE_\w+)=", env_lines)}
        assert names and names <= SETTINGS, dockerfile.name


def test_env_example_documents_every_setting():
    text = (REPO / ".env.example").read_text()
    named = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, re.M))
    assert SETTINGS <= named, f"undocumented: {SETTINGS - named}"
    assert named <= SETTINGS | DEPLOYMENT_ONLY, f"unknown: {named - SETTINGS - DEPLOYMENT_ONLY}"
    # and every ${VAR} the compose file reads is in it
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert used <= named, f"compose reads variables .env.example leaves out: {used - named}"


def project_requirements() -> dict[str, Requirement]:
    """What the service and its workers need: the client's dependencies, the service and worker
    extras, and the further extras these name (s3)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = [Requirement(r) for r in project["dependencies"] + extras["service"] + extras["worker"]]
    named = {extra for r in requirements if r.name == "baerase" for extra in r.extras} - {"service", "worker"}
    requirements += [Requirement(r) for extra in sorted(named) for r in extras[extra]]
    return {canonicalize_name(r.name): r for r in requirements if r.name != "baerase"}


def dockerfile_pins(path: Path) -> dict[str, Requirement]:
    pins = [Requirement(p) for p in re.findall(r'"([A-Za-z0-9_.\-\[\]]+==[^"]+)"', path.read_text())]
    return {canonicalize_name(p.name): p for p in pins}


@pytest.mark.parametrize("image", ["api", "worker"])
def test_dockerfiles_pin_what_pyproject_asks_for(image):
    wanted = project_requirements()
    pins = dockerfile_pins(DOCKERFILES[image])
    expected = set(wanted) - ENGINE_ONLY if image == "api" else set(wanted)
    assert set(pins) == expected
    for name, pin in pins.items():
        (version,) = [s.version for s in pin.specifier]
        assert wanted[name].specifier.contains(version, prereleases=True), f"{name}=={version} vs {wanted[name]}"
        assert pin.extras == wanted[name].extras, name
    text = DOCKERFILES[image].read_text()
    assert re.search(r"^FROM \S+:\d+\.\d+\.\d+-slim", text, re.M) or re.search(r"PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim", text)
    assert re.search(r"^USER (?!root)\w+", text, re.M), "runs as root"
    if image == "api":
        assert "torch" not in pins and "cuda" not in text.lower().replace("no cuda", "")
        assert "--no-deps" in text
    else:
        assert "download.pytorch.org/whl/cu" in text


def test_compose_images_are_pinned():
    for name, service in compose()["services"].items():
        image = service["image"]
        if "${" in image:
            image = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", image)
        tag = image.rpartition(":")[2]
        assert re.match(r"\d+\.\d+(\.\d+)?", tag), f"{name}: {image} is not pinned"
