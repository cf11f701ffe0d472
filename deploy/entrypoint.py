"""The image's entrypoint: the job (`python -m app ARGS`), and, with STOP_WHEN_DONE=1, stop the cloud machine after.

    tini -- python /app/deploy/entrypoint.py train        # the image's ENTRYPOINT + CMD

Default: this process *becomes* the job (exec), so signals, exit code and /dev/termination-log are the job's own,
exactly as `python -m app`. With STOP_WHEN_DONE=1 (one-shot runs on RunPod or Vast.ai, where a machine bills its
GPU until it is stopped, whether or not its job is still running) the job runs as a child that gets SIGTERM/SIGINT
forwarded; when it exits, with any code, the machine is stopped through the provider's API, using the
machine-scoped credentials that the provider puts into the container:

    RunPod   RUNPOD_POD_ID + RUNPOD_API_KEY       GraphQL podStop
    Vast.ai  CONTAINER_ID + CONTAINER_API_KEY     PUT /api/v0/instances/<id>/ {"state": "stopped"}

A stopped machine keeps its disk (result.json, the adapter) and no longer bills the GPU. The exit code is the job's.
Standard library only: it runs before, and apart from, the job's imports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

JOB = [sys.executable, "-m", "app"]
RUNPOD_GRAPHQL = "https://api.runpod.io/graphql"
VAST_INSTANCES = "https://console.vast.ai/api/v0/instances/"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # pod/instance ids are interpolated into a URL or a query


def _log(message: str) -> None:
    print(f"entrypoint: {message}", file=sys.stderr, flush=True)


def wants_stop(environ: dict[str, str]) -> bool:
    return environ.get("STOP_WHEN_DONE", "").strip().lower() in {"1", "true", "yes", "on"}


def stop_request(environ: dict[str, str]) -> urllib.request.Request | None:
    """The API call that stops this machine, or None when no provider's credentials are present."""
    pod, key = environ.get("RUNPOD_POD_ID", ""), environ.get("RUNPOD_API_KEY", "")
    if pod and key and _ID.match(pod):
        query = 'mutation { podStop(input: {podId: "' + pod + '"}) { id desiredStatus } }'
        return urllib.request.Request(
            f"{RUNPOD_GRAPHQL}?api_key={key}",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
    instance, key = environ.get("CONTAINER_ID", ""), environ.get("CONTAINER_API_KEY", "")
    if instance and key and _ID.match(instance):
        return urllib.request.Request(
            f"{VAST_INSTANCES}{instance}/",
            data=json.dumps({"state": "stopped"}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
            method="PUT",
        )
    return None


def stop_machine(environ: dict[str, str], attempts: int = 3) -> bool:
    request = stop_request(environ)
    if request is None:
        _log("STOP_WHEN_DONE is set, but neither RunPod (RUNPOD_POD_ID, RUNPOD_API_KEY) nor Vast.ai "
             "(CONTAINER_ID, CONTAINER_API_KEY) credentials are in the environment: not stopping anything")
        return False
    where = request.full_url.split("?")[0]  # never log the key
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                _log(f"asked {where} to stop this machine: HTTP {response.status}")
                return True
        except (urllib.error.URLError, OSError) as err:
            _log(f"stopping via {where} failed (attempt {attempt}/{attempts}): {getattr(err, 'reason', err)}")
            time.sleep(5 * attempt)
    return False


def run_then_stop(argv: list[str], environ: dict[str, str]) -> int:
    # Own session: a terminal's Ctrl-C reaches only this process, which forwards it once (the job treats a
    # second signal as "exit now, without a checkpoint").
    child: subprocess.Popen | None = None
    early: list[int] = []  # a signal that arrives before the job has started is delivered once it has

    def forward(signum, _frame):
        if child is None:
            early.append(signum)
        else:
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    child = subprocess.Popen(JOB + argv, start_new_session=True)
    for signum in early:
        child.send_signal(signum)
    code = child.wait()
    code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128+N
    _log(f"job exited with code {code}")
    stop_machine(environ)
    return code


def main(argv: list[str]) -> int:
    if not wants_stop(dict(os.environ)):
        os.execv(sys.executable, JOB + argv)  # become the job; does not return
    return run_then_stop(argv, dict(os.environ))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
