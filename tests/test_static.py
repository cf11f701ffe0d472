"""Static checks of the container and deployment files: no Docker engine, no cluster, no network (scripts/lint.sh).

What an image build or a cluster would catch late is checked here from the files themselves:
- the Dockerfile's install step installs exactly requirements/gpu.lock.txt with hashes, its labels and build-time
  check agree with requirements/gpu.txt; every lock is whole, hashed and agrees with the pins it locks;
- every FT_ name in env/*.env, docker-compose.yml, the Dockerfile, the workflows and deploy/** is a setting;
- the env presets are valid settings and read the same by Compose, `docker run --env-file` and kubectl;
- the Kubernetes Jobs map the exit codes as the job defines them, and the sweep runs each line of its JSONL;
- the compose services and the image's stages fit together;
- deploy/entrypoint.py forwards signals once and stops RunPod/Vast.ai machines with the right API call.
`make test-image` builds and runs the image itself (podman, no GPU): what only an engine can tell.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from app.errors import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_NO_GPU
from app.settings import env_names, load_settings, read_config_file

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
GPU_REQUIREMENTS = ROOT / "requirements" / "gpu.txt"
CPU_REQUIREMENTS = ROOT / "requirements" / "cpu.txt"
GPU_LOCK = ROOT / "requirements" / "gpu.lock.txt"
GPU_TEST_LOCK = ROOT / "requirements" / "gpu-test.lock.txt"
CPU_LOCK = ROOT / "requirements" / "cpu.lock.txt"
CPU_COMPOSE_OVERRIDE = ROOT / ".ci" / "compose.cpu.yml"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
SWEEP_CONFIGS = K8S / "sweep-configs.jsonl"
FT_NAME = re.compile(r"\bFT_[A-Z0-9_]*[A-Z0-9]\b")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    """name -> version of a requirements file; every requirement must be an exact pin."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: {line!r} is not an exact pin (name==version)"
        pins[_norm(match[1])] = match[2]
    return pins


LOCK_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})+)\s*$", re.M)


def _lock(path: Path) -> dict[str, str]:
    """name -> version of a hash lock (scripts/lock.sh); every entry must be an exact pin with sha256 hashes."""
    text = path.read_text()
    entries = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    locked = {_norm(match[1]): match[2] for match in LOCK_ENTRY.finditer(text)}
    assert len(locked) == len(entries), f"{path.name}: entries without name==version and hashes: {entries}"
    return locked


# --- Dockerfile ---------------------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped, as Docker does."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not pending and not stripped):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _stages() -> list[dict]:
    stages = []
    for keyword, arguments in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "base": words[0], "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, arguments))
    return stages


def _lineage(stage_name: str | None = None) -> list[dict]:
    """The stage (default: the last one, what `docker build .` produces) and the stages it is built FROM."""
    stages = _stages()
    by_name = {stage["name"]: stage for stage in stages if stage["name"]}
    stage = by_name[stage_name] if stage_name else stages[-1]
    chain = [stage]
    while chain[-1]["base"] in by_name:
        chain.append(by_name[chain[-1]["base"]])
    return chain[::-1]


def _pip_installs(stages: list[dict]) -> list[dict]:
    """Each `pip install` in the stages: requirement files (as repo paths, via COPY and WORKDIR), literals, indexes."""
    installs, workdir, copied = [], "/", {}
    for stage in stages:
        for keyword, arguments in stage["instructions"]:
            if keyword == "WORKDIR":
                workdir = os.path.normpath(os.path.join(workdir, arguments))
            elif keyword == "COPY" and not arguments.startswith("--"):
                *sources, destination = shlex.split(arguments)
                if len(sources) == 1:
                    copied[os.path.normpath(os.path.join(workdir, destination))] = sources[0]
            elif keyword == "RUN":
                for command in arguments.split("&&"):
                    words = shlex.split(command.split("python -c", 1)[0])
                    if words[:2] != ["pip", "install"]:
                        continue
                    install = {"files": [], "literals": [], "indexes": [], "options": set()}
                    words = iter(words[2:])
                    for word in words:
                        if word in ("-r", "--requirement"):
                            path = os.path.normpath(os.path.join(workdir, next(words)))
                            install["files"].append(copied.get(path, path))
                        elif word in ("--index-url", "--extra-index-url", "-i"):
                            install["indexes"].append(next(words))
                        elif word.startswith("-"):
                            install["options"].add(word)
                        else:
                            install["literals"].append(word)
                    installs.append(install)
    return installs


def test_the_image_installs_exactly_the_gpu_lock():
    installs = _pip_installs(_lineage())
    assert len(installs) == 1, f"the job image should have one pip install step, found {installs}"
    install = installs[0]
    assert install["files"] == ["requirements/gpu.lock.txt"], install
    assert install["literals"] == [], f"packages outside requirements/gpu.lock.txt: {install['literals']}"
    # PyPI's torch 2.11.0 is the CUDA 13.0 build: an extra index only adds a host to every project's lookup.
    assert install["indexes"] == [], install["indexes"]
    assert {"--require-hashes", "--no-deps"} <= install["options"], "the lock is the whole set, every file hashed"
    (test_install,) = _pip_installs(_lineage("test")[-1:])
    assert test_install["files"] == ["requirements/gpu-test.lock.txt"] and not test_install["literals"], test_install
    assert {"--require-hashes", "--no-deps"} <= test_install["options"] and not test_install["indexes"]
    assert not DOCKERFILE.read_text().startswith("# syntax="), "a syntax directive makes BuildKit pull a frontend"


def test_the_gpu_lock_is_requirements_gpu_txt_resolved_whole():
    pins, locked = _pins(GPU_REQUIREMENTS), _lock(GPU_LOCK)
    differ = {name: (version, locked.get(name)) for name, version in pins.items() if locked.get(name) != version}
    assert not differ, f"requirements/gpu.txt vs gpu.lock.txt (pin, locked); run scripts/lock.sh: {differ}"
    assert pins["torch"] == "2.11.0", "DESIGN.md's GPU set: torch 2.11.0 (CUDA 13.0)"
    assert "xformers" not in locked, "the GPU set was verified without xformers"
    # torch's own CUDA 13 dependencies stay in the lock: without them the image's torch has no CUDA libraries.
    assert {"triton", "nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cuda-runtime"} <= set(locked)
    assert not any("+" in version for version in locked.values()), "PyPI's builds only: no local versions"
    # Its other packages take the CPU test set's versions, so that `make test` runs what the image ships.
    cpu = _pins(CPU_REQUIREMENTS)
    differ = {name: (cpu[name], version) for name, version in locked.items()
              if name in cpu and name not in pins and cpu[name] != version}
    assert not differ, f"gpu.lock.txt vs cpu.txt (cpu, gpu) outside gpu.txt's pins; run scripts/lock.sh: {differ}"


def test_the_test_stage_lock_adds_pytest_and_changes_nothing_of_the_gpu_set():
    added, locked, cpu = _lock(GPU_TEST_LOCK), _lock(GPU_LOCK), _pins(CPU_REQUIREMENTS)
    assert added["pytest"] == cpu["pytest"], "pytest at the CPU test set's pin"
    differ = {name: (locked[name], version) for name, version in added.items() if name in locked and locked[name] != version}
    assert not differ, f"the test stage would change the job's packages (gpu.lock.txt, gpu-test.lock.txt): {differ}"


def test_the_cpu_lock_is_requirements_cpu_txt_with_hashes_and_the_cpu_torch():
    pins, locked = _pins(CPU_REQUIREMENTS), _lock(CPU_LOCK)
    assert locked.pop("torch") == pins.pop("torch") + "+cpu", "torch is the explicit CPU build, not PyPI's CUDA one"
    assert locked.pop("setuptools", None), "setuptools (which `pip freeze` leaves out) is locked too"
    assert locked == pins, "cpu.txt vs cpu.lock.txt: run scripts/lock.sh"


def test_the_build_time_check_is_valid_python_and_checks_the_torch_build():
    runs = [arguments for stage in _lineage() for keyword, arguments in stage["instructions"] if keyword == "RUN"]
    checks = [run.split("python -c '", 1)[1].rsplit("'", 1)[0] for run in runs if "python -c '" in run]
    assert len(checks) == 1, "one build-time `python -c` check in the job image"
    compile(checks[0], "Dockerfile build-time check", "exec")
    assert "requirements/gpu.lock.txt" in checks[0] and 'torch.version.cuda == "13.0"' in checks[0]
    assert "pip\", \"check" in checks[0] and "xformers" in checks[0]


def test_the_labels_name_the_pinned_versions():
    pins = _pins(GPU_REQUIREMENTS)
    labels = {}
    for stage in _lineage():
        for keyword, arguments in stage["instructions"]:
            if keyword == "LABEL":
                labels.update(word.split("=", 1) for word in shlex.split(arguments))
    versions = {key.removeprefix("ft-job."): value for key, value in labels.items() if key.startswith("ft-job.")}
    pinned = {name: value for name, value in versions.items() if _norm(name) in pins}
    assert {"torch", "transformers", "trl", "peft", "unsloth"} <= set(pinned), sorted(versions)
    for name, value in pinned.items():
        assert value.split("+")[0] == pins[_norm(name)], f"label ft-job.{name}={value} vs gpu.txt {pins[_norm(name)]}"
    assert versions["cuda"] == "13.0" and versions["python"] == "${PYTHON_VERSION}"
    base_default = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)[1]
    assert labels["org.opencontainers.image.base.name"] == "${BASE_IMAGE}", "the base actually built on"
    assert re.search(r"^ARG PYTHON_VERSION=3\.12$", DOCKERFILE.read_text(), re.M), "Ubuntu 24.04's Python"
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-devel-ubuntu24\.04", base_default), base_default
    project_version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert labels["org.opencontainers.image.version"] == project_version


def _final(keyword: str, stage_name: str | None = None):
    values = [arguments for stage in _lineage(stage_name) for k, arguments in stage["instructions"] if k == keyword]
    return values[-1] if values else None


def test_the_job_image_runs_the_job_under_tini_as_a_non_root_user():
    assert _stages()[-1]["name"] == "job", "`docker build .` must produce the job image: `job` is the last stage"
    entrypoint, cmd = json.loads(_final("ENTRYPOINT")), json.loads(_final("CMD"))
    assert entrypoint[:2] == ["tini", "--"] and "-g" not in entrypoint, entrypoint
    assert entrypoint[2:] == ["python", "/app/deploy/entrypoint.py"], entrypoint
    assert cmd == ["train"]
    assert _final("USER") not in (None, "root", "0", "0:0")
    assert _final("WORKDIR") == "/app", "env/smoke.env's paths are relative to /app"
    env = {}
    for stage in _lineage():
        for keyword, arguments in stage["instructions"]:
            if keyword == "ENV":
                env.update(word.split("=", 1) for word in shlex.split(arguments))
    assert env["HF_HOME"].startswith("/cache/") and env["TRITON_CACHE_DIR"].startswith("/cache/")
    assert env["TRITON_CACHE_AUTOTUNING"] == "1", "autotuning choices are cached with the kernels"
    assert env["UNSLOTH_COMPILE_LOCATION"] and env["UNSLOTH_DISABLE_STATISTICS"] == "1"
    assert env["NCCL_NVLS_ENABLE"] == "0", "NVLink multicast stays off"
    runs = " ".join(a for stage in _lineage() for k, a in stage["instructions"] if k == "RUN")
    assert "python -m app.devmodel --out .cache/models/smoke" in runs, "env/smoke.env's model is built in the image"
    # save_pretrained leaves some files 0600 (root's): the job, uid 1000, could not read its model.
    assert re.search(r"python -m app\.devmodel --out \.cache/models/smoke .*&& chmod -R a\+rX,go-w \.cache", runs)


def test_the_layers_put_dependencies_before_the_code():
    order = [(k, a) for stage in _lineage() for k, a in stage["instructions"]]
    install = next(i for i, (k, a) in enumerate(order) if k == "RUN" and "pip install" in a)
    code = next(i for i, (k, a) in enumerate(order) if k == "COPY" and a.split()[0] == "app/")
    assert install < code, "copy app/ after installing the wheels, so that a code change reuses the install layer"


def test_every_copied_path_is_in_the_build_context():
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for stage in _stages():
        for keyword, arguments in stage["instructions"]:
            if keyword != "COPY" or arguments.startswith("--from"):
                continue
            for source in shlex.split(arguments)[:-1]:
                source = source.rstrip("/")
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is .dockerignored"


# --- settings names and env files -------------------------------------------------------------------------------


def _deployment_files() -> list[Path]:
    files = [*sorted((ROOT / "env").glob("*.env")), COMPOSE, DOCKERFILE, ROOT / "README.md"]
    files += sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    files += sorted(path for path in (ROOT / "deploy").rglob("*") if path.is_file() and "__pycache__" not in path.parts)
    return files


def test_every_ft_name_in_the_deployment_files_is_a_setting():
    known = set(env_names()) | {"FT_HF_TOKEN"}
    unknown = []
    for path in _deployment_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            unknown += [f"{path.relative_to(ROOT)}:{number}: {name}" for name in FT_NAME.findall(line) if name not in known]
    assert not unknown, "not settings of the job (app/settings.py):\n" + "\n".join(unknown)


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}: {line!r} is not NAME=value"
            values[key] = value
    return values


@pytest.mark.parametrize("path", sorted((ROOT / "env").glob("*.env")), ids=lambda p: p.name)
def test_env_presets_are_valid_settings_read_alike_by_compose_docker_and_kubectl(path, monkeypatch):
    """Compose's env_file, `docker run --env-file` and `kubectl create configmap --from-env-file` agree on a file
    only without quotes, inline comments, `$` or `export`; then each preset must load as valid settings."""
    values = _env_file(path)
    for key, value in values.items():
        assert not key.startswith("export"), f"{path.name}: {key}"
        assert value == value.strip() and value[:1] not in "\"'", f"{path.name}: {key}={value!r}: no quotes/padding"
        assert " #" not in value, f"{path.name}: {key}: an inline comment is part of the value for docker/kubectl"
        assert "$" not in value, f"{path.name}: {key}: Compose expands $VARIABLES in env files, docker/kubectl don't"
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    load_settings()  # raises SettingsError listing every problem


# --- Kubernetes ---------------------------------------------------------------------------------------------------


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _job(path: Path) -> dict:
    jobs = [doc for doc in _documents(path) if doc["kind"] == "Job"]
    assert len(jobs) == 1, f"{path.name}: one Job"
    return jobs[0]


def _rules(job: dict, container: str) -> dict[str, set]:
    """action -> exit codes (or pod condition types) it covers; all rules name the job's container."""
    by_action: dict[str, set] = {}
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["containerName"] == container and codes["operator"] == "In", rule
            by_action.setdefault(rule["action"], set()).update(codes["values"])
        for condition in rule.get("onPodConditions", []):
            assert condition.get("status", "True") == "True", rule
            by_action.setdefault(rule["action"], set()).add(condition["type"])
    return by_action


@pytest.mark.parametrize("manifest, fail_action", [("job.yaml", "FailJob"), ("sweep.yaml", "FailIndex")])
def test_the_jobs_map_the_exit_codes(manifest, fail_action):
    job = _job(K8S / manifest)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    rules = _rules(job, container["name"])
    assert {EXIT_INVALID, EXIT_NO_GPU} <= rules[fail_action], "invalid settings (2) and no GPU (3) end it at once"
    assert "DisruptionTarget" in rules["Ignore"], "preemption/drain retries without counting"
    assert EXIT_INTERRUPTED in rules.get("Count", set()) | rules.get("Ignore", set()), "75 (checkpointed) retries"
    assert EXIT_INTERRUPTED not in rules.get("FailJob", set()) | rules.get("FailIndex", set())
    if fail_action == "FailIndex":
        assert spec["backoffLimitPerIndex"] >= 1
    else:
        assert spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0
    assert pod["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy: Never"
    assert pod["terminationGracePeriodSeconds"] >= 60, "room to finish a step and checkpoint after SIGTERM"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert container["terminationMessagePath"] == "/dev/termination-log"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    for path in ("/output", "/cache"):
        assert "persistentVolumeClaim" in volumes[mounts[path]["name"]], f"{path} on the claim"
    assert mounts["/data"].get("readOnly") is True
    env = {item["name"]: item for item in container.get("env", [])}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "HF_TOKEN"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_sweep_runs_one_valid_configuration_per_line(monkeypatch):
    job = _job(K8S / "sweep.yaml")
    spec = job["spec"]
    lines = [line for line in SWEEP_CONFIGS.read_text().splitlines() if line.strip()]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == len(lines), f"completions must equal the {len(lines)} lines of {SWEEP_CONFIGS.name}"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    ft_env = sorted(name for name in env if name.startswith("FT_"))
    assert ft_env == ["FT_CONFIG_FILE"], f"{ft_env}: any other FT_* variable overrides that setting in every line"
    config = Path(env["FT_CONFIG_FILE"])
    assert config.suffix == ".jsonl"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert [item["path"] for item in volume["configMap"]["items"]] == [config.name]
    assert f"--from-file={config.name}=deploy/k8s/{SWEEP_CONFIGS.name}" in (K8S / "sweep.yaml").read_text()

    suffixes = set()
    for index in range(len(lines)):
        monkeypatch.setenv("FT_CONFIG_FILE", str(SWEEP_CONFIGS))
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        values, ignored, problems = read_config_file(SWEEP_CONFIGS, index)
        assert problems == [] and ignored == [], (index, problems, ignored)
        settings, _ = load_settings()
        assert settings.config_index == index
        suffixes.add(settings.job_id_suffix)
    assert len(suffixes) == len(lines) and None not in suffixes, "each line needs its own job_id_suffix"


# --- Compose --------------------------------------------------------------------------------------------------------


def test_compose_services_fit_the_image_and_the_env_files():
    compose = yaml.safe_load(COMPOSE.read_text())
    train, test_gpu = compose["services"]["train"], compose["services"]["test-gpu"]
    for service in (train, test_gpu):
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in device["capabilities"] for device in devices)
        assert service.get("ipc") == "host" or service.get("shm_size")
        assert {"memlock", "stack"} <= set(service["ulimits"])
    assert train["build"]["target"] == "job" and test_gpu["build"]["target"] == "test"
    assert {"job", "test"} <= {stage["name"] for stage in _stages()}
    assert json.loads(_final("CMD", "test")) == ["make", "test-gpu"]
    (env_file,) = train["env_file"]
    default = re.fullmatch(r"\$\{ENV_FILE:-(.+)\}", env_file)[1]
    assert default.startswith("env/") and (ROOT / default).is_file()
    volumes = train["volumes"]
    assert "./data:/data:ro" in volumes
    assert any(v.endswith(":/output") for v in volumes)
    cache = next(v for v in volumes if v.endswith(":/cache")).split(":")[0]
    assert cache in compose["volumes"], "the HF cache is a named volume"
    assert "HF_TOKEN" in train["environment"]


def test_the_cpu_compose_override_removes_only_what_needs_a_gpu_host():
    """.ci/compose.cpu.yml (make test-image): no device reservation, no memlock; the rest as users run it."""

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader, node):
        if isinstance(node, yaml.MappingNode):
            return node.tag, loader.construct_mapping(node, deep=True)
        return node.tag, loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else node.value

    for tag in ("!reset", "!override"):
        Loader.add_constructor(tag, tagged)
    override = yaml.load(CPU_COMPOSE_OVERRIDE.read_text(), Loader=Loader)
    assert set(override) == {"services"} and set(override["services"]) == {"train", "test-gpu"}
    for service in override["services"].values():
        assert service["deploy"] == ("!reset", {})
        tag, ulimits = service["ulimits"]
        assert tag == "!override" and "memlock" not in ulimits and ulimits["stack"] == 67108864, ulimits
        assert set(service) <= {"deploy", "ulimits", "network_mode"}, sorted(service)


# --- deploy/entrypoint.py ---------------------------------------------------------------------------------------------


@pytest.fixture()
def entrypoint(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "deploy"))
    import entrypoint as module

    return module


def test_entrypoint_builds_the_stop_call_of_each_provider(entrypoint):
    assert entrypoint.stop_request({}) is None
    runpod = entrypoint.stop_request({"RUNPOD_POD_ID": "abc123", "RUNPOD_API_KEY": "k"})
    assert runpod.get_method() == "POST" and runpod.full_url.startswith("https://api.runpod.io/graphql?api_key=")
    assert 'podStop(input: {podId: "abc123"})' in json.loads(runpod.data)["query"]
    vast = entrypoint.stop_request({"CONTAINER_ID": "4242", "CONTAINER_API_KEY": "k"})
    assert vast.get_method() == "PUT" and vast.full_url == "https://console.vast.ai/api/v0/instances/4242/"
    assert json.loads(vast.data) == {"state": "stopped"} and vast.get_header("Authorization") == "Bearer k"
    assert entrypoint.stop_request({"CONTAINER_ID": '1"}) {', "CONTAINER_API_KEY": "k"}) is None
    assert entrypoint.wants_stop({"STOP_WHEN_DONE": "1"}) and not entrypoint.wants_stop({"STOP_WHEN_DONE": "0"})


def test_entrypoint_passes_the_exit_code_through(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")} | {"FT_OUTPUT_DIR": str(tmp_path)}
    for stop in ("0", "1"):
        done = subprocess.run([sys.executable, str(ROOT / "deploy" / "entrypoint.py"), "check"], cwd=ROOT,
                              env=env | {"STOP_WHEN_DONE": stop}, capture_output=True, text=True, timeout=120)
        assert done.returncode == EXIT_INVALID, done.stderr  # FT_MODEL and FT_TRAINING_FILE are missing
        assert ("not stopping anything" in done.stderr) == (stop == "1")


def test_entrypoint_forwards_a_signal_to_the_job_once(tmp_path):
    """SIGTERM to the entrypoint's process group (as tini or a terminal sends it) reaches the job exactly once."""
    job = textwrap.dedent("""
        import signal, sys, time
        seen = []
        signal.signal(signal.SIGTERM, lambda *_: seen.append(1))
        print("ready", flush=True)
        while not seen:
            time.sleep(0.01)
        time.sleep(0.5)
        sys.exit(75 if len(seen) == 1 else 99)
    """)
    wrapper = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "deploy")!r})
        import entrypoint
        entrypoint.JOB = [sys.executable, "-c", {job!r}]
        sys.exit(entrypoint.run_then_stop([], {{}}))
    """)
    process = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == EXIT_INTERRUPTED, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_example_env_documents_every_setting():
    from app.settings import env_names

    text = (ROOT / "env" / "example.env").read_text()
    missing = [name for name in env_names() if f"{name}=" not in text]
    assert not missing, f"env/example.env lacks {missing}"
