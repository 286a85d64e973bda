"""Hub ids resolved from a local Hugging Face cache, offline.

The cache is built here the way huggingface_hub lays it out
(``models--org--name/{refs/main, blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>}``)
from a tiny seeded model, and ``HF_HUB_CACHE`` points at it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tfcompile.cli import main
from tfcompile.errors import ModelLoadError
from tfcompile.frontend import LoadOptions, hub_cache, load_model

HUB_ID = "tiny-org/tiny-gpt2"
OPTIONS = LoadOptions(batch=1, seq=16)


def commit_for(hub_id: str) -> str:
    return hashlib.sha1(hub_id.encode()).hexdigest()


def write_hub_cache(cache: Path, hub_id: str, model_dir: Path, *, commit: str | None = None) -> Path:
    """Put the files of ``model_dir`` into ``cache`` as ``hf download hub_id`` would; returns the snapshot."""
    commit = commit or commit_for(hub_id)
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for folder in (repo / "refs", repo / "blobs", snapshot):
        folder.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # huggingface_hub writes the bare commit, no newline
    for source in sorted(p for p in model_dir.iterdir() if p.is_file()):
        data = source.read_bytes()
        if source.suffix in (".safetensors", ".bin"):  # LFS files: blob named by sha256
            blob = hashlib.sha256(data).hexdigest()
        else:  # regular git files: blob named by the git blob sha1 (the etag)
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / source.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny import tiny_module

    model_dir = tmp_path_factory.mktemp("tiny") / "tiny-gpt2"
    tiny_module("gpt2-small", seed=3).model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """An HF_HUB_CACHE holding the tiny model as tiny-org/tiny-gpt2; the working directory holds nothing."""
    cache = tmp_path / "hub"
    write_hub_cache(cache, HUB_ID, tiny_model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def test_the_fake_cache_is_what_huggingface_hub_reads(hub):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(hub)
    (repo,) = info.repos
    assert repo.repo_id == HUB_ID and set(repo.refs) == {"main"} and not info.warnings
    cached = try_to_load_from_cache(HUB_ID, "config.json", cache_dir=hub)
    assert isinstance(cached, str) and Path(cached).parent.name == commit_for(HUB_ID)


def test_cached_hub_model_loads_like_its_directory(hub, tiny_model_dir):
    from_cache = load_model(HUB_ID, OPTIONS)
    from_dir = load_model(str(tiny_model_dir), OPTIONS)
    assert from_cache.name == "tiny-gpt2"
    assert from_cache.info["source"] == "hf-hub-cache" and from_cache.info["hub_id"] == HUB_ID
    assert from_cache.info["commit"] == commit_for(HUB_ID)
    for a, b in zip(from_cache.example_inputs, from_dir.example_inputs):
        torch.testing.assert_close(a, b)
    for a, b in zip(from_cache.run(), from_dir.run()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_name_without_org_resolves_too(hub, tiny_model_dir):
    write_hub_cache(hub, "tiny-gpt2", tiny_model_dir)
    assert load_model("tiny-gpt2", OPTIONS).info["hub_id"] == "tiny-gpt2"


def test_hf_home_is_honoured(tmp_path, monkeypatch, tiny_model_dir):
    write_hub_cache(tmp_path / "home" / "hub", HUB_ID, tiny_model_dir)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert load_model(HUB_ID, OPTIONS).info["hub_id"] == HUB_ID


def test_optimize_takes_a_cached_hub_id(hub, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["optimize", HUB_ID, "--seq", "16", "--passes", "merge_qkv_projections", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert "tiny-gpt2" in json.dumps(report)


def test_not_cached_is_one_line_that_says_what_to_download(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code = main(["optimize", "bert-base-uncased", "-o", str(out)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, captured.err
    line = lines[0]
    assert "hf download bert-base-uncased" in line and str(cache) in line
    assert "directory holding config.json and model.safetensors" in line and "gpt2-small" in line
    assert not out.exists()


def test_a_repo_folder_without_a_main_snapshot_says_so(hub):
    (hub / "models--tiny-org--tiny-gpt2" / "refs" / "main").unlink()
    with pytest.raises(ModelLoadError, match="models--tiny-org--tiny-gpt2 is there, but with no snapshot of its main"):
        load_model(HUB_ID, OPTIONS)


def test_a_zoo_name_wins_over_the_cache(hub, tiny_model_dir):
    from tests.tiny import TINY_OVERRIDES

    write_hub_cache(hub, "bert-base", tiny_model_dir)
    graph = load_model("bert-base", LoadOptions(batch=1, seq=16, config_overrides=TINY_OVERRIDES["bert-base"]))
    assert graph.info["zoo"] == "bert-base"


def test_no_request_is_attempted_even_when_the_user_allows_them(hub, monkeypatch):
    """HF_HUB_OFFLINE=0 in the user's environment: resolution and loading still run offline, and touch no socket."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def no_connect(self, address, *args):
        attempts.append(address)
        raise OSError("tfcompile tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: no_connect(None, address))
    seen = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        seen.append((constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"), kwargs.get("local_files_only")))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    load_model(HUB_ID, OPTIONS)
    with pytest.raises(ModelLoadError, match="hf download"):
        load_model("not-org/not-cached", OPTIONS)
    assert seen == [(True, "1", True)] * 2
    assert attempts == []
    assert constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"  # the user's setting is back


@pytest.mark.parametrize("hub_id", ["gpt2", "bert-base-uncased", "google/bert_uncased_L-2_H-128_A-2",
                                    "Qwen/Qwen2.5-0.5B", "org_/x.y"])
def test_hub_ids(hub_id):
    assert hub_cache.is_hub_id(hub_id)


@pytest.mark.parametrize("source", ["..", "../x", "org/..", "org/../x", "/etc/passwd", "org\\name", "a/b/c",
                                    "org//name", "org/", "/name", "org--x/name", "x.git", "café/x", "na me", "",
                                    ".hidden", "x" * 97, "org/name:main", "~/models/x", "$HOME/x"])
def test_non_ids_never_reach_the_cache(source, monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a non-id reached huggingface_hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    assert not hub_cache.is_hub_id(source)
    with pytest.raises(ModelLoadError, match="not a Hugging Face hub id"):
        hub_cache.find(source)


def test_cache_location_is_huggingface_hubs(tmp_path):
    """Each environment gives the cache huggingface_hub itself computes (its constants, reloaded per case)."""
    cases = [{"HF_HUB_CACHE": str(tmp_path / "a"), "HF_HOME": str(tmp_path / "b")},
             {"HUGGINGFACE_HUB_CACHE": str(tmp_path / "c"), "HF_HOME": str(tmp_path / "b")},
             {"HF_HOME": str(tmp_path / "b"), "XDG_CACHE_HOME": str(tmp_path / "x")},
             {"XDG_CACHE_HOME": str(tmp_path / "x")},
             {"HOME": str(tmp_path / "home")}]
    script = (
        "import importlib, json, os, sys\n"
        "from huggingface_hub import constants\n"
        "from tfcompile.frontend import hub_cache\n"
        "names = ['HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_HOME', 'XDG_CACHE_HOME']\n"
        "home = os.environ['HOME']\n"
        "for case in json.loads(sys.argv[1]):\n"
        "    for name in names: os.environ.pop(name, None)\n"
        "    os.environ['HOME'] = home\n"
        "    os.environ.update(case)\n"
        "    print(json.dumps([importlib.reload(constants).HF_HUB_CACHE, str(hub_cache.cache_dir())]))\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases)
    for theirs, ours in results:
        assert theirs == ours
    assert results[-1][1] == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")
