"""Frozen-prefix states kept on disk, per data folder and encoder prefix, so that every run of a
data folder (E2, each E3 fusion, the probe, a rerun, another process) computes them once.

    DIR/lm_cache/<slug>-frozen<k>-<dtype>-<device>-<weights sha1>/
        _manifest.json, <sha1 of its texts>.safetensors (tokens, lengths, states; CRC-32)

Torch and safetensors only; the caller names the folder (`persisted_states`; `nlpctr train`:
its data folder's). Keying, damage handling and why it is bit-exact: docs/DESIGN.md, "Modules
in detail", state_store.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import nlpctr
from nlpctr.atomic import JsonObject

LOG = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
KIND = "frozen-prefix states"
SUFFIX = ".safetensors"
CURRENT, ABSENT, FOREIGN = "current", "absent", "foreign"  # what a folder holds (`_status`)
_TEMPORARY = re.compile(r"\.tmp-(?P<pid>\d+)-[0-9a-f]{8}\.safetensors")

TextKey = tuple[int, ...]  # a text's token ids, as `StateCache` keys it

_root: Path | None = None  # where `persisted_states` keeps them now (None: nowhere)


@contextmanager
def persisted_states(root: Path) -> Iterator[None]:
    """Within the block, encoders with a frozen prefix keep the states their `prefill` computes
    under `root` (e.g. DIR/lm_cache) and read them back from there.

    Args:
        root: the folder that holds one subfolder per encoder prefix (created when written).

    Returns:
        A context manager.
    """
    global _root
    previous, _root = _root, Path(root)
    try:
        yield
    finally:
        _root = previous


def active_root() -> Path | None:
    """The folder `persisted_states` names now, or None."""
    return _root


@dataclass(frozen=True)
class PrefixKey:
    """What a text's frozen-prefix state depends on, besides its token ids."""

    encoder_version: str  # EncoderConfig.version (identity, revision, layers, pooling, length)
    slug: str  # EncoderConfig.slug
    frozen_layers: int
    weights_sha1: str  # of the frozen modules' parameters and buffers
    dtype: str  # the cache's (float32 or float16)
    device: str  # the device type the states were computed on (cpu, cuda)
    batch: int  # texts computed together (FROZEN_BATCH): the batch can move the last bit

    @property
    def folder_name(self) -> str:
        # Every field of the key in the name: two configurations of one encoder (another
        # max_length, say) keep their states side by side instead of emptying each other's folder.
        identity = json.dumps([self.encoder_version, self.weights_sha1, self.batch]).encode()
        digest = hashlib.sha1(identity).hexdigest()[:16]
        return f"{self.slug}-frozen{self.frozen_layers}-{self.dtype}-{self.device}-{digest}"

    def manifest(self) -> JsonObject:
        return {
            "kind": KIND,
            "encoder_version": self.encoder_version,
            "frozen_layers": self.frozen_layers,
            "weights_sha1": self.weights_sha1,
            "dtype": self.dtype,
            "device": self.device,
            "frozen_batch": self.batch,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "nlpctr": nlpctr.__version__,
        }


class StateStore:
    """One encoder prefix's folder of states (`PrefixKey.folder_name` under the root)."""

    def __init__(self, root: Path, key: PrefixKey) -> None:
        self.key = key
        self.folder = Path(root) / key.folder_name

    def load(self, wanted: Sequence[TextKey], device: torch.device) -> dict[TextKey, torch.Tensor]:
        """The stored states of the texts in `wanted` (on `device`); damaged shards are removed
        (their texts are then computed again), a stale folder is emptied."""
        if self._status() != CURRENT:
            return {}
        wanted_set = set(wanted)
        found: dict[TextKey, torch.Tensor] = {}
        for shard in sorted(self.folder.glob(f"*{SUFFIX}")):
            if shard.name.startswith(".") or len(found) == len(wanted_set):
                continue
            tensors = self._read(shard)
            if tensors is None:
                continue
            ids, states = tensors["tokens"].tolist(), tensors["states"]
            start = 0
            for length in tensors["lengths"].tolist():
                key = tuple(ids[start : start + length])
                if key in wanted_set and key not in found:
                    found[key] = states[start : start + length].to(device, copy=True)
                start += length
        return found

    def save(self, states: Mapping[TextKey, torch.Tensor]) -> None:
        """Keep `states` (those a prefill computed) as one new shard, written atomically; a
        folder that cannot be written is one warning, not an error."""
        if not states:
            return
        keys = sorted(states, key=lambda k: (len(k), k))
        tokens = torch.tensor([t for k in keys for t in k], dtype=torch.int32)
        lengths = torch.tensor([len(k) for k in keys], dtype=torch.int32)
        stacked = torch.cat([states[k].detach().cpu() for k in keys]).contiguous()
        tensors = {"tokens": tokens, "lengths": lengths, "states": stacked}
        name = hashlib.sha1(tokens.numpy().tobytes() + lengths.numpy().tobytes()).hexdigest()[:16]
        temporary = self.folder / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            status = self._status()
            if status == FOREIGN:
                LOG.warning("frozen-prefix states not kept: %s is not a folder of them", self.folder)
                return
            if status == ABSENT:
                self._write_manifest()
            save_file(tensors, temporary, metadata={"crc32": str(_crc(tensors))})
            temporary.replace(self.folder / f"{name}{SUFFIX}")
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            LOG.warning(
                "frozen-prefix states not kept in %s (%s): the next run computes them again",
                self.folder,
                exc.strerror or exc,
            )

    # --------------------------------------------------------------------------- internals

    def _status(self) -> str:
        """CURRENT: the folder holds states of this key; ABSENT: none (a folder of ours with
        another manifest, a library upgraded say, is emptied); FOREIGN: not ours, never touched.
        What killed runs left behind in a folder of ours is removed."""
        manifest = self.folder / MANIFEST
        if not manifest.exists():
            return ABSENT
        try:
            content = json.loads(manifest.read_text())
        except (OSError, ValueError):  # damaged: ours when all the folder holds is ours
            content = {"kind": KIND} if self._only_ours() else None
        if not isinstance(content, dict) or content.get("kind") != KIND:
            return FOREIGN
        self._remove_leftovers()
        if content == self.key.manifest():
            return CURRENT
        for shard in self.folder.glob(f"*{SUFFIX}"):
            shard.unlink(missing_ok=True)
        manifest.unlink(missing_ok=True)
        return ABSENT

    def _only_ours(self) -> bool:
        return all(
            p.name == MANIFEST or p.name.endswith(SUFFIX) or p.name.startswith(f".{MANIFEST}.tmp-")
            for p in self.folder.iterdir()
        )

    def _write_manifest(self) -> None:
        staged = self.folder / f".{MANIFEST}.tmp-{os.getpid()}"
        staged.write_text(json.dumps(self.key.manifest(), indent=2, sort_keys=True) + "\n")
        staged.replace(self.folder / MANIFEST)

    def _remove_leftovers(self) -> None:
        for path in self.folder.glob(f".tmp-*{SUFFIX}"):
            found = _TEMPORARY.fullmatch(path.name)
            if found is not None and not _alive(int(found["pid"])):
                path.unlink(missing_ok=True)

    def _read(self, shard: Path) -> dict[str, torch.Tensor] | None:
        """A shard's tensors, checked; None (and the shard removed) when it is damaged."""
        try:
            tensors = load_file(shard)
            with safe_open(shard, framework="pt") as handle:
                crc = (handle.metadata() or {}).get("crc32")
            tokens, lengths, states = tensors["tokens"], tensors["lengths"], tensors["states"]
            sound = (
                crc == str(_crc(tensors))
                and tokens.dim() == lengths.dim() == 1
                and states.dim() == 2
                and int(lengths.sum()) == tokens.numel() == states.shape[0]
                and states.dtype == getattr(torch, self.key.dtype)
            )
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
            sound = False
        if sound:
            return tensors
        LOG.warning("damaged frozen-prefix states %s removed: its texts are computed again", shard)
        shard.unlink(missing_ok=True)
        return None


def _crc(tensors: Mapping[str, torch.Tensor]) -> int:
    crc = 0
    for name in ("tokens", "lengths", "states"):
        crc = zlib.crc32(tensors[name].contiguous().view(torch.uint8).numpy(), crc)
    return crc


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
