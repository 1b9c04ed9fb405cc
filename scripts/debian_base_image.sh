#!/usr/bin/env bash
# A base image with Python 3.11 built from Debian packages alone, for machines that reach Debian's
# archive but no image registry: debootstrap a minimal bookworm, import it into the engine.
#
#   sudo scripts/debian_base_image.sh            # -> localhost/debian-python:bookworm
#   BASE_IMAGE=localhost/debian-python:bookworm scripts/container_check.sh
set -euo pipefail
ENGINE=${ENGINE:-$(command -v podman || command -v docker)}
TAG=${TAG:-localhost/debian-python:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,curl \
  bookworm "$root" "$MIRROR"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
ln -sf python3 "$root"/usr/bin/python
tar -C "$root" -c . | "$ENGINE" import --change 'CMD ["python3"]' - "$TAG"
"$ENGINE" image inspect "$TAG" --format "$TAG: {{.Size}} bytes"
