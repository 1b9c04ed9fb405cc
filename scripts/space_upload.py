"""Upload this repository to a Hugging Face Docker Space, the Hub's supported way.

    python scripts/space_upload.py --dry-run     # the files it would send, their size (offline)
    hf auth login                                # once (or set HF_TOKEN)
    python scripts/space_upload.py USER/SPACE    # create the Space if needed, then upload

It sends :func:`space_files` with ``HfApi.upload_folder(repo_type="space")``, which stores every
binary file (the ``.safetensors`` parts, the example images) in the Hub's LFS/Xet storage itself:
the Hub refuses binaries pushed with plain git, whatever their size. A ``git push`` to the Space
needs git-lfs and the LFS patterns of ``.gitattributes`` instead. The upload also deletes from the
Space the files this list no longer holds (e.g. renamed checkpoint parts), so the Space mirrors it.

Before anything is sent :func:`space_problems` checks what the Space would otherwise fail on:
README.md's front matter (``sdk: docker``, ``app_port`` = the port the Dockerfile serves on),
every path the Dockerfile COPYs, every binary file covered by an LFS pattern of .gitattributes.
"""
from __future__ import annotations

import argparse
import glob
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
#: what the Space needs (patterns as ``HfApi.upload_folder`` reads them: ``fnmatch``, ``*``
#: crossing folders): its configuration (README.md's front matter; the Dockerfile and the
#: .dockerignore of its build; .gitattributes, for whoever clones the Space) and every path the
#: Dockerfile COPYs
SPACE_PATTERNS = ("README.md", "Dockerfile", ".dockerignore", ".gitattributes", "requirements.txt",
                  "constraints.txt", "LICENSE", "lgam/*", "app/*", "checkpoints/*",
                  "docs/*")  # README's figures and links (the image leaves them out: .dockerignore)
#: never sent, even where a pattern above matches: the training runs' logs, Python's caches
SPACE_IGNORE = ("checkpoints/runs/*", "*__pycache__*", "*.pyc")
#: the first bytes git (and the Hub) look at to call a file binary: one NUL byte among them
BINARY_SNIFF_BYTES = 8000


class SpaceError(Exception):
    """The repository cannot be uploaded as it is; the message says what to change."""


def _git(root: Path, *args: str, stdin: bytes | None = None) -> bytes:
    try:
        return subprocess.run(["git", "-C", str(root), *args], input=stdin, capture_output=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        why = getattr(e, "stderr", b"") or str(e).encode()
        raise SpaceError(f"git {args[0]} failed in {root}: {why.decode(errors='replace').strip()} "
                         "(the file list comes from git: run this in a git checkout)") from None


def repository_files(root: Path = REPO) -> list[str]:
    """What git would commit, sorted: the tracked files still present and the new files git does
    not ignore (so no .venv, no caches, no ``__pycache__``, never ``.git``)."""
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    names = {n for n in out.decode().split("\0") if n}
    return sorted(n for n in names if (root / n).is_file())


def space_files(root: Path = REPO) -> list[str]:
    """The files the Space gets, sorted: :func:`repository_files` that match
    :data:`SPACE_PATTERNS` and none of :data:`SPACE_IGNORE`, matched as the upload matches."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(repository_files(root), allow_patterns=list(SPACE_PATTERNS),
                                    ignore_patterns=list(SPACE_IGNORE)))


def upload_patterns(files: Sequence[str]) -> dict[str, list[str]]:
    """``upload_folder``'s ``allow_patterns``/``ignore_patterns`` that select exactly ``files``
    from the folder (each path escaped, so that it matches itself only)."""
    return {"allow_patterns": [glob.escape(f) for f in files],
            "ignore_patterns": list(SPACE_IGNORE)}


def is_binary(path: Path) -> bool:
    """Git's test, which the Hub applies to a push: a NUL byte in the first 8000 bytes."""
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def lfs_files(root: Path, files: Sequence[str]) -> set[str]:
    """Those of ``files`` that .gitattributes puts in LFS (``filter=lfs``), as git matches it."""
    out = _git(root, "check-attr", "-z", "--stdin", "filter",
               stdin="".join(f"{f}\0" for f in files).encode())
    fields = out.decode().split("\0")
    return {path for path, _, value in zip(fields[0::3], fields[1::3], fields[2::3])
            if value == "lfs"}


def front_matter(readme: Path) -> dict:
    """README.md's YAML front matter, parsed as the Hub parses it (``{}`` when there is none)."""
    from huggingface_hub import metadata_load

    return metadata_load(readme) or {}


def instructions(dockerfile_text: str) -> list[list[str]]:
    """The Dockerfile's instructions as word lists (comments dropped, ``\\`` continuations
    joined), e.g. ``["COPY", "app/", "app/"]``."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        ln for ln in dockerfile_text.splitlines() if not ln.lstrip().startswith("#")))
    return [ln.split() for ln in joined.splitlines() if ln.strip()]


def served_port(dockerfile_text: str) -> int | None:
    """The port the image serves on: the ``GRADIO_SERVER_PORT=...`` its ENV sets."""
    for words in instructions(dockerfile_text):
        for w in words[1:] if words[0].upper() == "ENV" else ():
            if w.startswith("GRADIO_SERVER_PORT="):
                return int(w.split("=", 1)[1])
    return None


def copy_sources(dockerfile_text: str) -> list[str]:
    """The build-context paths the Dockerfile's COPY/ADD lines read (folders end with ``/``)."""
    return [w for words in instructions(dockerfile_text)
            if words[0].upper() in ("COPY", "ADD") and len(words) >= 3
            for w in words[1:-1] if not w.startswith("--")]


def _config_problems(root: Path) -> list[str]:
    meta, dockerfile = front_matter(root / "README.md"), (root / "Dockerfile").read_text()
    port = served_port(dockerfile)
    problems = []
    if meta.get("sdk") != "docker":
        problems.append(f"README.md's front matter says sdk: {meta.get('sdk')!r}; the Space "
                        "builds the Dockerfile only with sdk: docker")
    if port is None or meta.get("app_port") != port:
        problems.append(f"README.md's front matter says app_port: {meta.get('app_port')!r} but "
                        f"the Dockerfile serves on GRADIO_SERVER_PORT={port}: make them equal")
    return problems


def _copy_problems(root: Path, files: Sequence[str]) -> list[str]:
    dockerfile = (root / "Dockerfile").read_text()
    missing = [s for s in copy_sources(dockerfile)
               if not any(f == s.rstrip("/") or f.startswith(s.rstrip("/") + "/") for f in files)]
    return [f"the Dockerfile copies {s}, which the upload does not send: add it to "
            "SPACE_PATTERNS (and to git)" for s in missing]


def space_problems(root: Path, files: Sequence[str]) -> list[str]:
    """What would break the Space if ``files`` were uploaded from ``root``: the front matter, the
    Dockerfile's COPY sources, binaries outside LFS (one message per problem; none: ready)."""
    problems = [f"the Space needs {n}, which the upload does not send"
                for n in ("README.md", "Dockerfile") if n not in files]
    if problems:
        return problems
    binary = [f for f in files if is_binary(root / f)]
    uncovered = sorted(set(binary) - lfs_files(root, binary))
    problems += _config_problems(root) + _copy_problems(root, files)
    problems += [f"{f} is binary but no LFS pattern of .gitattributes covers it: add a line "
                 f"'*{Path(f).suffix or Path(f).name} filter=lfs diff=lfs merge=lfs -text'"
                 for f in uncovered]
    return problems


def dry_run_report(root: Path, files: Sequence[str]) -> str:
    """One line per file (size in KiB, ``lfs`` for a binary, the path), then the total."""
    lines, total, binaries = [], 0, 0
    for f in files:
        size, binary = (root / f).stat().st_size, is_binary(root / f)
        total, binaries = total + size, binaries + binary
        lines.append(f"{size / 1024:10.1f} KiB  {'lfs' if binary else '   '}  {f}")
    lines.append(f"{len(files)} files ({binaries} binary, stored with LFS/Xet), "
                 f"{total / 2**20:.1f} MiB in all")
    return "\n".join(lines)


def upload(repo_id: str, files: Sequence[str], root: Path = REPO, private: bool = False,
           message: str = "Upload lgam (scripts/space_upload.py)", torch: str = "cpu") -> str:
    """Create the Docker Space ``repo_id`` if it does not exist, set its ``TORCH`` variable (the
    Dockerfile's build argument: ``cpu`` for CPU hardware, a ~1 GB image; ``gpu`` for a GPU, the
    CUDA image), then upload ``files`` to it (deleting the Space's other files); returns the
    commit's URL. A new Space runs on CPU hardware: without the variable it built the 6.8 GB CUDA
    image there."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="space", space_sdk="docker", private=private,
                    exist_ok=True)
    variable = api.get_space_variables(repo_id).get("TORCH")
    if getattr(variable, "value", None) != torch:  # setting it rebuilds the Space: only on a change
        api.add_space_variable(repo_id, "TORCH", torch, description="Dockerfile build argument: cpu or gpu")
    info = api.upload_folder(folder_path=root, repo_id=repo_id, repo_type="space",
                             commit_message=message, delete_patterns="*",
                             **upload_patterns(files))
    return str(getattr(info, "commit_url", info))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo_id", nargs="?", help="the Space, USER/NAME (created when missing)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the files and their total size, check them, send nothing")
    p.add_argument("--private", action="store_true", help="create the Space private")
    p.add_argument("--torch", choices=("cpu", "gpu"), default="cpu",
                   help="the Space's TORCH variable, the image's torch build: cpu (CPU hardware, the "
                        "default) or gpu (CUDA, for GPU hardware)")
    args = p.parse_args(argv)
    if not args.dry_run and not args.repo_id:
        p.error("name the Space (USER/NAME), or pass --dry-run")
    try:
        files = space_files()
        problems = space_problems(REPO, files)
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dry_run_report(REPO, files))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems or args.dry_run:
        return 2 if problems else 0
    print(upload(args.repo_id, files, private=args.private, torch=args.torch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
