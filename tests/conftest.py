"""Fixtures: a tiny task and teacher built once per session (seconds), an isolated cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from tests import tiny_assets

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TACNAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A folder with ``tiny/data.csv`` and ``tiny/teacher/`` (what configs/tiny.yaml names)."""
    root = tmp_path_factory.mktemp("tinyproj")
    tiny_assets.build(root / "tiny")
    return root


@pytest.fixture
def project(tiny_dir, tmp_path):
    """A working folder holding tiny/ and tiny.yaml, as a user would have."""
    (tmp_path / "tiny").symlink_to(tiny_dir / "tiny")
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "tiny.yaml")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_dir / "tiny" / "teacher").eval()


@pytest.fixture
def random_teacher():
    """An untrained BERT in the shape of tests' teachers: 4 layers, hidden 64, 4 heads of 16."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL on 127.0.0.1 for the session. Skipped, with the reason shown,
    only where no server can be had; with TACNAS_REQUIRE_POSTGRES=1 (CI) it fails instead."""
    import importlib.util

    from tests import postgres

    reason = None
    if postgres.bindir() is None:
        reason = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    elif importlib.util.find_spec("psycopg") is None:
        reason = "psycopg is not installed (pip install 'tacnas[postgres]')"
    if reason:
        if os.environ.get("TACNAS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"TACNAS_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    with postgres.cluster() as url:
        yield url
