"""The Hugging Face Space, offline (``scripts/space_upload.py``): the exact files an upload sends
(what git would commit, no virtualenv or caches), every binary among them in LFS, the front
matter the Space reads, and that the Docker image builds from exactly those files."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from _helpers import REPO, entry_files
from lgam.checkpoints import load_manifest

pytest.importorskip("huggingface_hub")

#: the Space's own configuration: uploaded, never copied into the image
CONFIG_FILES = {"README.md", "Dockerfile", ".dockerignore", ".gitattributes"}


@pytest.fixture(scope="module")
def space():
    """``scripts/space_upload.py`` as a module."""
    path = REPO / "scripts" / "space_upload.py"
    spec = importlib.util.spec_from_file_location("space_upload", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(space) -> list[str]:
    return space.space_files()


def test_the_space_gets_what_it_needs_of_what_git_would_commit(space, files):
    assert files == sorted(files) and set(files) <= set(space.repository_files())
    never = (".venv/", ".git/", "tests/", "scripts/", "benchmarks/", "checkpoints/runs/",
             ".pytest_cache/", ".gradio/", ".ci/")
    assert not [f for f in files if f.startswith(never) or "__pycache__" in f
                or f.endswith(".pyc")]
    assert CONFIG_FILES | {"LICENSE", "requirements.txt", "app/__main__.py", "lgam/engine.py",
                           "app/examples/SOURCES.md", "checkpoints/manifest.json"} <= set(files)
    examples = [f for f in files if f.startswith("app/examples/") and f.endswith(".jpg")]
    assert len(examples) == 6
    checkpoints = REPO / "checkpoints"
    for name in load_manifest(checkpoints)["models"]:  # every shipped model's files
        named = {p.relative_to(REPO).as_posix() for p in entry_files(checkpoints, name)}
        assert named <= set(files), name


def test_upload_folder_selects_exactly_that_list(space, files):
    """What ``HfApi.upload_folder`` sends from the repository folder with the script's patterns:
    every file under it (.venv included), filtered as huggingface_hub filters them."""
    from huggingface_hub import hf_api
    from huggingface_hub.utils import filter_repo_objects

    patterns = space.upload_patterns(files)
    every = [p.relative_to(REPO).as_posix() for p in sorted(REPO.glob("**/*")) if p.is_file()]
    sent = filter_repo_objects(every, allow_patterns=patterns["allow_patterns"],
                               ignore_patterns=patterns["ignore_patterns"]
                               + hf_api.DEFAULT_IGNORE_PATTERNS)
    assert sorted(sent) == files


def test_upload_creates_a_docker_space_and_sends_the_list(space, files, monkeypatch):
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)

        def get_space_variables(self, repo_id):
            return {k: SimpleNamespace(value=v) for (_, k, v) in calls.get("variables", [])[-1:]}

        def add_space_variable(self, repo_id, key, value, **kwargs):
            calls.setdefault("variables", []).append((repo_id, key, value))

        def upload_folder(self, **kwargs):
            calls["upload_folder"] = kwargs
            return "https://huggingface.co/spaces/me/lgam/commit/abc"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert space.upload("me/lgam", files) == "https://huggingface.co/spaces/me/lgam/commit/abc"
    repo_id, kwargs = calls["create_repo"]
    assert repo_id == "me/lgam" and kwargs["repo_type"] == "space"
    assert kwargs["space_sdk"] == "docker" and kwargs["exist_ok"] is True
    up = calls["upload_folder"]
    assert (up["folder_path"], up["repo_id"], up["repo_type"]) == (REPO, "me/lgam", "space")
    assert up["allow_patterns"] == space.upload_patterns(files)["allow_patterns"]
    assert up["delete_patterns"] == "*"  # the Space mirrors the list (.gitattributes is kept)
    # a new Space runs on CPU hardware: it built the 6.8 GB CUDA image there without TORCH=cpu
    assert calls["variables"] == [("me/lgam", "TORCH", "cpu")]
    space.upload("me/lgam", files)  # unchanged: not set again (setting a variable rebuilds the Space)
    assert len(calls["variables"]) == 1
    space.upload("me/lgam", files, torch="gpu")
    assert calls["variables"][-1] == ("me/lgam", "TORCH", "gpu")


def test_every_binary_is_covered_by_an_lfs_pattern(space, files):
    """Those the upload sends and every other one git would commit: a ``git push`` of either
    to the Hub needs them in LFS."""
    committed = space.repository_files()
    binary = [f for f in committed if space.is_binary(REPO / f)]
    assert {f for f in files if f.endswith((".safetensors", ".jpg"))} <= set(binary)
    assert "README.md" not in binary and "app/ui.py" not in binary
    assert space.lfs_files(REPO, committed) >= set(binary), (
        sorted(set(binary) - space.lfs_files(REPO, committed)))


def test_front_matter_is_a_docker_space_on_the_port_the_image_serves(space, files):
    meta = space.front_matter(REPO / "README.md")
    assert meta["sdk"] == "docker" and meta["app_port"] == 7860 and meta["title"]
    assert space.served_port((REPO / "Dockerfile").read_text()) == 7860
    assert space.space_problems(REPO, files) == []


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go's ``filepath.Match`` plus ``**``) as a regex over a path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def build_context(paths: list[str]) -> list[str]:
    """Those of ``paths`` that ``docker build`` sends: not matched, themselves or through a folder
    above them, by a pattern of .dockerignore."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip().strip("/") for ln in lines if ln.strip() and not ln.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "exceptions: this matcher lacks them"
    regexes = [_dockerignore_regex(p) for p in patterns]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(r.match("/".join(parts[:k])) for r in regexes for k in range(1, len(parts) + 1))

    return [p for p in paths if not ignored(p)]


def test_the_image_builds_from_exactly_the_list(space, files):
    """Every path the Dockerfile COPYs is in the list; what the build copies from the Space is
    all of the list but the Space's configuration and docs/ (its README page's figures and links),
    and the same as from a full checkout."""
    sources = space.copy_sources((REPO / "Dockerfile").read_text())
    assert sources and space._copy_problems(REPO, files) == []

    def copied(paths: list[str]) -> set[str]:
        return {p for p in build_context(paths)
                if any(p == s.rstrip("/") or p.startswith(s) and s.endswith("/") for s in sources)}

    page = {f for f in files if f.startswith("docs/")}  # the Space's README page only
    assert page and copied(files) == set(files) - CONFIG_FILES - page
    assert copied(space.repository_files()) == copied(files)


def test_the_dockerignore_matcher():
    r = _dockerignore_regex
    assert r("**/__pycache__").match("app/__pycache__") and r("**/__pycache__").match("__pycache__")
    assert r("*.log").match("a.log") and not r("*.log").match("x/a.log")
    assert r("checkpoints/runs").match("checkpoints/runs") and not r("tests").match("tests2")


def test_dry_run_prints_the_list_and_its_size_offline(files):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "scripts/space_upload.py", "--dry-run"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *lines, total = proc.stdout.strip().splitlines()
    assert [ln.split()[-1] for ln in lines] == files
    assert re.fullmatch(rf"{len(files)} files \(\d+ binary, stored with LFS/Xet\), "
                        r"[\d.]+ MiB in all", total), total
    assert all(" lfs " in ln for ln in lines if ln.endswith(".safetensors"))
    bare = subprocess.run([sys.executable, "scripts/space_upload.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2 and "name the Space (USER/NAME), or pass --dry-run" in bare.stderr


def test_problems_are_named_before_anything_is_sent(space, tmp_path):
    """A wrong front matter, a COPY source the list lacks, a binary outside LFS: each said."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "README.md").write_text("---\nsdk: gradio\napp_port: 8080\n---\n# x\n")
    (tmp_path / "Dockerfile").write_text(
        "# docker run -e GRADIO_SERVER_PORT=9999\nENV A=1 \\\n    GRADIO_SERVER_PORT=7860\n"
        "COPY app/ app/\nCOPY --chown=1000 weights/ weights/\n")
    (tmp_path / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "m.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}")
    (tmp_path / "app" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    files = ["Dockerfile", "README.md", "app/m.safetensors", "app/photo.png"]
    problems = space.space_problems(tmp_path, files)
    assert problems == [
        "README.md's front matter says sdk: 'gradio'; the Space builds the Dockerfile only with "
        "sdk: docker",
        "README.md's front matter says app_port: 8080 but the Dockerfile serves on "
        "GRADIO_SERVER_PORT=7860: make them equal",
        "the Dockerfile copies weights/, which the upload does not send: add it to "
        "SPACE_PATTERNS (and to git)",
        "app/photo.png is binary but no LFS pattern of .gitattributes covers it: add a line "
        "'*.png filter=lfs diff=lfs merge=lfs -text'"]
    assert space.space_problems(tmp_path, files[1:]) == [
        "the Space needs Dockerfile, which the upload does not send"]
    with pytest.raises(space.SpaceError, match="run this in a git checkout"):
        space.repository_files(tmp_path / "app" / "nowhere")


def test_every_file_the_readme_links_to_goes_to_the_space(files):
    """The Space shows README.md as its page: its figures and links to docs/ were broken there
    while docs/ stayed behind."""
    import re

    text = (REPO / "README.md").read_text()
    targets = {m.split("#")[0] for m in re.findall(r"\]\(([^)\s]+)\)", text)
               if not m.startswith(("http://", "https://", "#", "mailto:"))}
    assert targets
    missing = sorted(t for t in targets if t not in files and not any(f.startswith(t.rstrip("/") + "/") for f in files))
    assert not missing, missing
