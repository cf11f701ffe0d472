#!/usr/bin/env bash
# make test-image: builds the image from this repository's Dockerfile on a machine with no GPU and no container
# registry (Debian bookworm, root: a developer's machine or CI), then runs it. Fails at the first step that fails.
#
#   1. engine     Debian's podman, buildah, runc, uidmap, mmdebstrap (apt-get, only when missing), rootful with
#                 overlay storage and .ci/containers.conf; podman-compose in a venv under .cache/test-image/.
#   2. base       the stand-in for the CUDA base: Debian bookworm from Debian's archive alone (mmdebstrap), with
#                 this machine's CA certificates (TLS is intercepted here) copied in at build time, never committed.
#                 Tagged localhost/ft-job-standin:bookworm, never as nvidia/cuda: a later real build on the same
#                 engine must not pick it up. Rebuilt only when its recipe or the certificates change.
#   3. build      the Dockerfile users build, targets `job` and `test`; build arguments only for what differs
#                 here: BASE_IMAGE (the stand-in) and PYTHON_VERSION=3.11 (bookworm's; the lock installs on it).
#                 Its build-time check proves the venv is exactly requirements/gpu.lock.txt. Layers are cached:
#                 a rerun rebuilds only what changed.
#   4. imports    the installed set imports as uid 1000 on a read-only root (torch is the CUDA 13.0 build, unused).
#                 The job's containers have two volumes, /output and /cache (compose and Kubernetes mount both):
#                 with a read-only root /cache must be mounted, since importing torch's compiler creates a folder
#                 there (TORCHINDUCTOR_CACHE_DIR).
#   5. test-gpu   the test stage's command, `make test-gpu`, through compose's test-gpu service: without CUDA every
#                 GPU test must be collected and skipped with its reason, none may fail or error.
#   6. smoke      the smoke job (env/smoke.env: the bundled tiny model, data/sample) as uid 1000, read-only root,
#                 no network, a tmpfs /tmp, writable only the mounted /output and /cache: result.json must say
#                 completed, with the adapter written.
#   7. compose    `docker compose run train` as the README has it (podman-compose, ENV_FILE=env/smoke.env), with
#                 .ci/compose.cpu.yml removing the GPU reservation and the memlock ulimit: completed. 4 steps
#                 (FT_MAX_STEPS), since step 6 has trained the whole smoke job already: this one proves the
#                 service's plumbing (env file, volumes, entrypoint), at a sixth of the time.
#   8. sweep      `docker compose run --rm train sweep FILE` as the README has it: a 2-line grid (seeds 1 and 2
#                 over env/smoke.env, 2 steps each) in the mounted /output; sweep.json must say both completed on
#                 one loaded base, each with its adapter, beside sweep.md and sweep.png.
#
# Writes .cache/test-image/summary.txt (times, image sizes). Variables: TEST_IMAGE_STATE (default
# .cache/test-image), KEEP_IMAGES=1 (keep this run's images; by default they stay for the layer cache anyway and
# only superseded ones are removed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

STATE=${TEST_IMAGE_STATE:-$ROOT/.cache/test-image}
SUITE=bookworm
STANDIN_PYTHON=3.11
STANDIN=localhost/ft-job-standin:$SUITE
IMAGE=localhost/ft-job:test-image
TEST_IMAGE=localhost/ft-job-test:test-image
PODMAN_COMPOSE_VERSION=1.6.0
MIRROR=http://deb.debian.org
ENGINE_PACKAGES=(podman buildah runc uidmap mmdebstrap containernetworking-plugins)

export CONTAINERS_CONF=$ROOT/.ci/containers.conf
export CONTAINERS_STORAGE_CONF=$ROOT/.ci/storage.conf
export BUILDAH_FORMAT=docker
mkdir -p "$STATE"
SUMMARY=$STATE/summary.txt
: > "$SUMMARY"

started=$SECONDS
step_started=$SECONDS
step() {  # step NAME: start a timed step (the previous one's time goes to the summary)
    finish_step
    current=$1
    step_started=$SECONDS
    printf '\n== test-image: %s\n' "$1"
}
finish_step() {
    [[ -n ${current:-} ]] && printf '%-9s %4d s\n' "$current" $((SECONDS - step_started)) >> "$SUMMARY"
    current=
}
# The checks that passed: build (its build-time check), imports, test-gpu, smoke, compose. The last line printed
# counts them as "test-image: N passed, M failed", the closing line a CI log reader looks for.
passed=0
fail() { echo "test-image FAILED: $*" >&2; echo "test-image: $passed passed, 1 failed"; exit 1; }

# --- 1. engine ---------------------------------------------------------------------------------------------------
step engine
missing=()
for package in "${ENGINE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || fail "needs root to install ${missing[*]} (and to run rootful podman)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
[[ $(id -u) == 0 ]] || fail "rootful podman: run as root"
podman --version
TOOLS=$STATE/tools
if [[ ! -x $TOOLS/bin/podman-compose ]] || ! "$TOOLS/bin/podman-compose" --version 2>/dev/null | grep -q "$PODMAN_COMPOSE_VERSION"; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
fi
compose() {
    "$TOOLS/bin/podman-compose" --in-pod false -f docker-compose.yml -f .ci/compose.cpu.yml "$@"
}

# --- 2. base stand-in -------------------------------------------------------------------------------------------
step base
build_standin() {
    local tar=$STATE/standin.tar
    # minbase + ca-certificates: apt and what the Dockerfile's first RUN needs; the machine's extra CAs (if any)
    # are synced into the Debian place for local CAs, so that the Dockerfile's own ca-certificates install keeps them.
    mmdebstrap --variant=minbase --include=ca-certificates \
        --customize-hook='sync-in /usr/local/share/ca-certificates /usr/local/share/ca-certificates' \
        --customize-hook='chroot "$1" update-ca-certificates' \
        "$SUITE" "$tar" \
        "deb $MIRROR/debian $SUITE main" "deb $MIRROR/debian $SUITE-updates main" \
        "deb $MIRROR/debian-security $SUITE-security main"
    # pip keeps its own CA bundle: point it at the system's, which holds the machine's CAs.
    podman import \
        --change "LABEL ft-job.standin-recipe=$recipe" \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["bash"]' \
        "$tar" "$STANDIN"
    rm -f "$tar"
}
# The recipe: this function, the mirror and the CA certificates; another recipe, another stand-in.
recipe=$( { declare -f build_standin; echo "$SUITE $MIRROR";
            find /usr/local/share/ca-certificates -type f -print0 2>/dev/null | sort -z | xargs -0r sha256sum; } |
          sha256sum | cut -c1-16)
if [[ $(podman image inspect --format '{{index .Labels "ft-job.standin-recipe"}}' "$STANDIN" 2>/dev/null) == "$recipe" ]]; then
    echo "stand-in $STANDIN is current (recipe $recipe)"
else
    old=$(podman image inspect --format '{{.Id}}' "$STANDIN" 2>/dev/null || true)
    build_standin
    [[ -n $old ]] && podman rmi "$old" >/dev/null 2>&1 || true
fi

# --- 3. build -------------------------------------------------------------------------------------------------------
step build
build() {  # build TARGET TAG
    local previous
    previous=$(podman image inspect --format '{{.Id}}' "$2" 2>/dev/null || true)
    podman build --format docker --layers --network host \
        --build-arg BASE_IMAGE="$STANDIN" --build-arg PYTHON_VERSION="$STANDIN_PYTHON" \
        --target "$1" -t "$2" . || return 1
    # The image this build replaced, untagged now: removed (its layers that the new one shares stay).
    if [[ -n $previous && $previous != $(podman image inspect --format '{{.Id}}' "$2") && -z ${KEEP_IMAGES:-} ]]; then
        podman rmi "$previous" >/dev/null 2>&1 || true
    fi
}
build job "$IMAGE" || fail "podman build --target job"
build test "$TEST_IMAGE" || fail "podman build --target test"
passed=$((passed + 1))

fresh_folder() {  # an empty folder owned by the image's uid 1000, for a volume
    rm -rf "$1" && mkdir -p "$1" && chown 1000:1000 "$1" && chmod 0750 "$1"
}
# A container as the job runs: uid 1000, read-only root, no network, a tmpfs /tmp; writable only the image's two
# volumes, /cache (here a fresh folder: importing torch's compiler creates its cache folder there) and what the
# caller mounts at /output.
cache=$STATE/cache
run_locked_down() {
    podman run --rm --read-only --network none --user 1000:1000 --tmpfs /tmp -v "$cache:/cache" "$@"
}
fresh_folder "$cache"

# --- 4. imports -------------------------------------------------------------------------------------------------
step imports
run_locked_down --entrypoint python "$IMAGE" -c '
import importlib.metadata as md
import accelerate, bitsandbytes, datasets, matplotlib, peft, pydantic_settings, pynvml, tensorboard, torch, torchao
import transformers, trl
import app.pipeline, app.settings
assert torch.version.cuda == "13.0" and not torch.cuda.is_available(), (torch.version.cuda, torch.cuda.is_available())
print("imports ok as uid 1000:", ", ".join("%s %s" % (n, md.version(n)) for n in
      ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth")))
' || fail "the installed set does not import as uid 1000"
passed=$((passed + 1))

# --- 5. the test stage's command: make test-gpu ---------------------------------------------------------------
step test-gpu
log=$STATE/test-gpu.log
TEST_IMAGE=$TEST_IMAGE compose run --rm -T test-gpu 2>&1 | tee "$log" || fail "make test-gpu in the test image exited non-zero"
tail -n 1 "$log" | grep -Eq '^[0-9]+ skipped in ' \
    || fail "make test-gpu without CUDA must only skip (last line: $(tail -n 1 "$log"))"
grep -q 'needs a CUDA GPU' "$log" || fail "make test-gpu: no skip reason naming CUDA in its output"
collected=$(run_locked_down --entrypoint python "$TEST_IMAGE" \
    -m pytest -q --collect-only -m gpu tests/test_gpu.py | grep -c '::' || true)
skipped=$(tail -n 1 "$log" | grep -Eo '^[0-9]+')
((collected > 0 && skipped == collected)) || fail "test-gpu: $collected GPU tests collected, $skipped skipped"
echo "test-gpu: all $collected GPU tests collected and skipped (no CUDA)"
passed=$((passed + 1))

# --- 6. smoke job ------------------------------------------------------------------------------------------------
check_result() {  # check_result OUTPUT_DIR WHAT
    python3 - "$1" "$2" <<'EOF'
import json, pathlib, sys
out, what = pathlib.Path(sys.argv[1]), sys.argv[2]
result = json.loads((out / "result.json").read_text())
print(what, result["id"], result["status"], {k: result["outputs"].get(k) for k in ("train_loss", "global_step")})
assert result["status"] == "completed", f"{what}: status {result['status']}: {result.get('error')}"
adapter = pathlib.Path(result["outputs"]["model_path"].replace("/output", str(out), 1))
assert (adapter / "adapter_model.safetensors").is_file(), f"{what}: no adapter at {adapter}"
EOF
}
step smoke
smoke_out=$STATE/smoke-output
fresh_folder "$smoke_out"
run_locked_down --env-file env/smoke.env -v "$smoke_out:/output" "$IMAGE" \
    || fail "the smoke job exited $? (result: $(cat "$smoke_out/result.json" 2>/dev/null || echo none))"
check_result "$smoke_out" "smoke job (uid 1000, read-only root):" || fail "smoke job: result.json"
passed=$((passed + 1))

# --- 7. compose train ----------------------------------------------------------------------------------------------
step compose
compose_out=$STATE/compose-output
fresh_folder "$compose_out"
ENV_FILE=env/smoke.env OUTPUT_DIR=$compose_out IMAGE=$IMAGE compose run --rm -T -e FT_MAX_STEPS=4 train \
    || fail "compose run train exited $?"
check_result "$compose_out" "compose run train:" || fail "compose train: result.json"
passed=$((passed + 1))

# --- 8. compose sweep ----------------------------------------------------------------------------------------------
step sweep
sweep_out=$STATE/sweep-output
fresh_folder "$sweep_out"
printf '%s\n' '{"seed": 1}' '{"seed": 2}' >"$sweep_out/grid.jsonl"
ENV_FILE=env/smoke.env OUTPUT_DIR=$sweep_out IMAGE=$IMAGE compose run --rm -T -e FT_MAX_STEPS=2 train \
    sweep /output/grid.jsonl || fail "compose run train sweep exited $?"
python3 - "$sweep_out" <<'EOF' || fail "compose sweep: sweep.json"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = json.loads((out / "sweep.json").read_text())
lines = summary["lines"]
print("compose run train sweep:", summary["counts"], "exit", summary["exit_code"], "base loads", summary["base_loads"])
assert summary["exit_code"] == 0 and [line["status"] for line in lines] == ["completed", "completed"], summary
assert summary["base_loads"] == 1, "the two lines share one loaded base"
assert len({line["job_id"] for line in lines}) == 2, "two seeds, two jobs"
for line in lines:
    assert (out / line["job_id"] / "adapter" / "adapter_model.safetensors").is_file(), line["job_id"]
assert (out / "sweep.md").is_file() and (out / "sweep.png").is_file()
EOF
passed=$((passed + 1))

# --- summary ---------------------------------------------------------------------------------------------------------
finish_step
{
    printf '%-9s %4d s\n' total $((SECONDS - started))
    for image in "$STANDIN" "$IMAGE" "$TEST_IMAGE"; do
        printf '%s %s\n' "$image" "$(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}')"
    done
} >> "$SUMMARY"
# Dangling images of this script's own making (superseded builds, an old stand-in); the current ones stay as cache.
podman image prune -f --filter label=org.opencontainers.image.title=ft-job >/dev/null || true
podman image prune -f --filter label=ft-job.standin-recipe >/dev/null || true
printf '\n== test-image passed (%s)\n' "$(date -u +%FT%TZ)"
cat "$SUMMARY"
echo "test-image: $passed passed, 0 failed"
