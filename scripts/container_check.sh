#!/usr/bin/env bash
# Build the app's image, run it, call /compare through gradio_client, check what the runtime user
# may change, and stop it; prints the image size and the stop time.
#
#   scripts/container_check.sh                                  # GPU image, python:3.11-slim-bookworm base
#   scripts/container_check.sh --build-arg TORCH=cpu            # CPU image
#   BASE_IMAGE=localhost/debian-python:bookworm scripts/container_check.sh   # no registry reachable
#
# ENGINE (podman or docker; the first found), TAG, PORT and BASE_IMAGE come from the environment;
# other arguments go to `build`. Needs gradio_client on the host (requirements-test.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v curl >/dev/null || { echo "curl is needed on the host" >&2; exit 3; }
ENGINE=${ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$ENGINE" ] || { echo "no container engine (podman or docker) found" >&2; exit 3; }
TAG=${TAG:-lgam-app:check}
PORT=${PORT:-7861}
BUILD_ARGS=()
[ -n "${BASE_IMAGE:-}" ] && BUILD_ARGS+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
# podman writes OCI images by default, which have no HEALTHCHECK: ask for Docker's format
[ "$(basename "$ENGINE")" = podman ] && BUILD_ARGS+=(--format docker)

t0=$(date +%s)
# (an empty array expanded under `set -u` aborts bash before 4.4, macOS's /bin/bash among them)
"$ENGINE" build -t "$TAG" ${BUILD_ARGS[@]+"${BUILD_ARGS[@]}"} "$@" .
echo "build: $(( $(date +%s) - t0 )) s"
"$ENGINE" image inspect "$TAG" --format 'image size: {{.Size}} bytes'

cid=$("$ENGINE" run -d -p "127.0.0.1:$PORT:$PORT" -e "GRADIO_SERVER_PORT=$PORT" "$TAG")
trap '"$ENGINE" rm -f "$cid" >/dev/null 2>&1 || true' EXIT
serving=
for _ in $(seq 1 120); do
  curl -fs "http://127.0.0.1:$PORT/" >/dev/null 2>&1 && { serving=1; break; }
  sleep 1
done
"$ENGINE" logs "$cid" 2>&1 | tail -5
[ -n "$serving" ] || { echo "FAIL: the app did not answer on port $PORT within 120 s" >&2; exit 1; }
if [ "$(basename "$ENGINE")" = podman ]; then  # the image's HEALTHCHECK, run now
  "$ENGINE" healthcheck run "$cid" && echo "healthcheck: healthy" \
    || { echo "FAIL: the HEALTHCHECK reports unhealthy" >&2; exit 1; }
fi

python scripts/compare_client.py "http://127.0.0.1:$PORT/"

# the runtime user reads, but cannot change, the code and the weights
for path in app/ui.py lgam/cam.py checkpoints/manifest.json; do
  if "$ENGINE" exec "$cid" sh -c "test -r $path && ! (echo x >> $path) 2>/dev/null"; then
    echo "read-only for the runtime user: $path"
  else
    echo "FAIL: $path is writable or unreadable for the runtime user" >&2; exit 1
  fi
done

t0=$(date +%s.%N)
"$ENGINE" stop -t 10 "$cid" >/dev/null
stop_s=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
echo "stop: ${stop_s} s (SIGTERM; the engine would kill at 10 s)"
python3 -c "import sys; sys.exit(0 if $stop_s < 2 else 1)" || { echo "FAIL: stop took ${stop_s} s" >&2; exit 1; }
echo "container check passed"
