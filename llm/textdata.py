"""Offline evaluation text: real English prose that ships inside pinned PyPI archives.

There is no dataset hub on these machines, so perplexity runs on text files that happen to be
packaged on PyPI (see the design notes, §4):
  - `botchan_text()`: Natsume's *Botchan* (Project Gutenberg EBook #8868, public domain), the
    `test/botchan.txt` of the sentencepiece 0.2.3 sdist, from CHAPTER I to the end of the story
    (the Gutenberg header and licence dropped);
  - `lee_text()`: the Lee news corpus (300 Australian news articles, one per line), the
    `gensim/test/test_data/lee_background.cor` of a gensim 4.4.0 wheel.
Each file is fetched once with `pip download --no-deps` (nothing is installed), only the one
member is cut out of the archive, its sha256 is checked against a pinned digest, and it is
written to `<PACEKERN_MODEL_DIR>/data/<name>` through a `.partial` rename, so a cached file is
always complete and verified. The archive lives in a temporary directory that is removed at once.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pacekern import env
from pacekern.log import log


class TextDataError(RuntimeError):
    """A text file that cannot be fetched or verified; the message says which and why."""


@dataclass(frozen=True)
class TextSource:
    name: str                 # file name in the cache
    pip_args: tuple           # what `pip download --no-deps` gets (one archive, exactly pinned)
    archive: str              # the archive file pip saves
    member: str               # path inside it
    sha256: str               # of the member's bytes


SOURCES = {s.name: s for s in [
    TextSource("botchan.txt", ("--no-binary", ":all:", "sentencepiece==0.2.3"), "sentencepiece-0.2.3.tar.gz",
               "sentencepiece-0.2.3/test/botchan.txt",
               "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"),
    # the platform flags pin one wheel file whatever Python runs this
    TextSource("lee_background.cor", ("--only-binary", ":all:", "--python-version", "3.11", "--implementation", "cp",
                                      "--abi", "cp311", "--platform", "manylinux_2_28_x86_64", "gensim==4.4.0"),
               "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
               "gensim/test/test_data/lee_background.cor",
               "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"),
]}


def data_dir() -> Path:
    return Path(env.get("PACEKERN_MODEL_DIR")) / "data"


def _extract(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    with zipfile.ZipFile(archive) as z:
        return z.read(member)


def fetch(src: TextSource) -> Path:
    """The verified file in the cache, downloading it the first time."""
    out = data_dir() / src.name
    if out.exists():
        return out                                  # only complete, verified files are ever renamed here
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        log.info("fetching %s from PyPI (%s)", src.name, src.pip_args[-1])
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, *src.pip_args]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise TextDataError(f"{src.name}: `pip download {' '.join(src.pip_args)}` failed "
                                f"(is PyPI reachable?):\n{res.stderr[-2000:]}")
        archive = Path(tmp) / src.archive
        if not archive.exists():
            raise TextDataError(f"{src.name}: pip did not produce {src.archive}; it saved "
                                f"{sorted(p.name for p in Path(tmp).iterdir())}")
        try:
            data = _extract(archive, src.member)
        except (KeyError, tarfile.TarError, zipfile.BadZipFile) as e:
            raise TextDataError(f"{src.name}: cannot read {src.member} from {src.archive}: {e}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != src.sha256:
        raise TextDataError(f"{src.name}: sha256 mismatch: got {got}, expected {src.sha256}; nothing was kept")
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, out)
    return out


def _read(name: str) -> str:
    return fetch(SOURCES[name]).read_bytes().decode("utf-8-sig")


def botchan_text() -> str:
    """The novel itself, from "CHAPTER I" to "--(THE END)--": the Gutenberg header, the
    translator's note, the transcriber's typo list and the Gutenberg licence are dropped.

    Line ends stay as shipped (CRLF): the reference perplexities were measured on this exact
    text (68.0k SmolLM2 tokens), and normalizing them changes the tokens and the numbers.
    """
    text = _read("botchan.txt")
    start, end = text.find("CHAPTER I\r\n"), text.find("--(THE END)--\r\n")
    if start < 0 or end < start:
        raise TextDataError("botchan.txt: 'CHAPTER I' or '--(THE END)--' not found")
    return text[start:end + len("--(THE END)--\r\n")]


def lee_text() -> str:
    """The 300 news articles, one per line (LF)."""
    return _read("lee_background.cor")
