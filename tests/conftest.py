"""Shared fixtures: tiny random MoE models of every supported architecture, built from config
(no network), saved through save_pretrained with an offline tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The packed-set disk cache would outlive the run in the user's cache folder and answer later runs'
# first loads: off, except where a test points it at its own folder.
os.environ.setdefault("EXPERTLIB_PACKED_CACHE", "0")
# On CUDA, Triton's float32 dot products are TF32 unless told otherwise; the engine tests compare
# float32 tokens exactly (docs/GPU.md, "Exactness of the GPU engine tests").
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

from expertlib.testing import TINY_CONFIGS, make_tiny_model  # noqa: E402

ARCHS = sorted(TINY_CONFIGS)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """`-m EXPR` may name registered markers only (pyproject.toml): a misspelt or unregistered one
    would deselect every test silently (`-m vllm` once skipped whole GPU test files)."""
    import re

    known = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", config.getoption("markexpr", "") or ""))
    unknown = sorted(words - known - {"and", "or", "not"})
    if unknown:
        raise pytest.UsageError(f"-m names unregistered markers {unknown}; registered: {sorted(known)}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(model_type, seed=0) -> folder with config, weights and tokenizer (cached per session)."""
    cache: dict = {}

    def get(model_type: str, seed: int = 0):
        key = (model_type, seed)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{model_type}-{seed}")
            make_tiny_model(model_type, path, seed=seed)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """One `expertlib serve` of tests/served_world.py's world (sets alpha and beta, no keys), shared by
    the modules that only send it requests: {url, ref (the transformers Reference), root, base_dir}.
    Started on first use, stopped at the session's end: one server start for all of them."""
    from served_world import Reference, build, serve

    root = tmp_path_factory.mktemp("shared-server")
    base_dir, sets = build(root)
    ref = Reference(base_dir, sets)
    with serve(root, base_dir) as url:
        yield dict(url=url, ref=ref, root=root, base_dir=base_dir)


@pytest.fixture
def serve_settings(monkeypatch):
    """serve_settings(*ARGS, env=None) -> the ServerSettings `expertlib serve ARGS` would serve with
    (the command runs to the end; the server is not started)."""
    from click.testing import CliRunner

    from expertlib.cli.main import cli

    seen = []
    monkeypatch.setattr("expertlib.server.serve", seen.append)

    def settings(*args, env=None):
        res = CliRunner().invoke(cli, ["serve", *map(str, args)], env=env)
        assert res.exit_code == 0, res.output
        return seen.pop()

    return settings


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    """Parametrises a test over every supported architecture."""
    return request.param
