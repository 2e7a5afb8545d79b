"""Frozen-prefix states kept on disk (models/state_store.py): computed once per data folder and
encoder prefix, read back bit for bit, rebuilt when damaged or stale, never a crash."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from nlpctr.models import state_store
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.state_cache import clear_state_caches
from nlpctr.models.state_store import MANIFEST, persisted_states

TEXTS = [
    "Cats are great",
    "This headline about a dog who learned to surf is much longer than the other one",
    "a",
    "Another headline of middling length here",
    "You won't believe what happened next",
]
MORE = ["A new headline shown today", "and one more"]
CONFIG = EncoderConfig(layers=2, trainable_layers=1, max_length=16)


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_state_caches()  # each encoder below stands for a fresh process
    yield
    clear_state_caches()


def tokens(lm: TextEncoder, texts: list[str]) -> list[list[int]]:
    return [lm.token_ids(t) for t in texts]


def states_of(lm: TextEncoder, texts: list[str]) -> list[torch.Tensor]:
    return lm.frozen_states(tokens(lm, texts))


def fresh(config: EncoderConfig = CONFIG) -> TextEncoder:
    clear_state_caches()
    return TextEncoder(config, trainable=True)


def shards(root: Path) -> list[Path]:
    return sorted(root.glob(f"*/*{state_store.SUFFIX}"))


def test_stored_states_are_the_computed_ones_bit_for_bit(tmp_path: Path) -> None:
    computed = fresh()
    computed.prefill(tokens(computed, TEXTS))  # no store: what a run computed before
    expected = states_of(computed, TEXTS)
    with persisted_states(tmp_path):
        first = fresh()
        assert first.prefill(tokens(first, TEXTS)) == len(TEXTS)  # computed, and kept
        [folder] = [p for p in tmp_path.iterdir()]
        assert folder.name.startswith(f"{CONFIG.slug}-frozen1-float32-cpu-")
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["encoder_version"] == CONFIG.version and manifest["frozen_layers"] == 1
        assert len(shards(tmp_path)) == 1
        second = fresh()  # another run, another process
        assert second.prefill(tokens(second, TEXTS)) == 0  # every state read, none computed
        for got, want in zip(states_of(second, TEXTS), expected, strict=True):
            assert torch.equal(got, want)
        batch = second.tokenize(TEXTS)
        with torch.no_grad():  # the LM's output does not move
            assert torch.equal(second.eval()(**batch), computed.eval()(**batch))
    assert len(shards(tmp_path)) == 1  # nothing new to keep


def test_new_texts_are_computed_and_kept_beside_the_old(tmp_path: Path) -> None:
    with persisted_states(tmp_path):
        first = fresh()
        first.prefill(tokens(first, TEXTS))
        second = fresh()
        assert second.prefill(tokens(second, TEXTS + MORE)) == len(MORE)  # only the new ones
        assert len(shards(tmp_path)) == 2
        third = fresh()
        assert third.prefill(tokens(third, TEXTS + MORE)) == 0
    reference = fresh()
    for got, want in zip(states_of(third, MORE), states_of(reference, MORE), strict=True):
        assert torch.equal(got, want)  # computed alone either way


def test_states_held_from_another_data_folder_are_kept_in_this_one(tmp_path: Path) -> None:
    lm = fresh()
    with persisted_states(tmp_path / "a"):
        assert lm.prefill(tokens(lm, TEXTS)) == len(TEXTS)
    with persisted_states(tmp_path / "b"):  # the same process, another data folder
        again = TextEncoder(CONFIG, trainable=True)  # shares the process's cache
        assert again.prefill(tokens(again, TEXTS)) == 0  # nothing computed: all in memory
        assert again.prefill(tokens(again, TEXTS)) == 0
    assert len(shards(tmp_path / "b")) == 1  # ... and kept in b's store too, once
    with persisted_states(tmp_path / "b"):
        later = fresh()  # another process, reading b only
        assert later.prefill(tokens(later, TEXTS)) == 0


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "flipped"])
def test_a_damaged_shard_is_rebuilt_not_a_crash(tmp_path: Path, damage: str, caplog) -> None:
    with persisted_states(tmp_path):
        first = fresh()
        first.prefill(tokens(first, TEXTS))
        expected = states_of(first, TEXTS)
        [shard] = shards(tmp_path)
        raw = shard.read_bytes()
        if damage == "truncated":
            shard.write_bytes(raw[: len(raw) // 2])
        elif damage == "zeroed":
            shard.write_bytes(bytes(len(raw)))
        else:  # one bit of one state: only the checksum sees it
            shard.write_bytes(raw[:-9] + bytes([raw[-9] ^ 1]) + raw[-8:])
        again = fresh()
        with caplog.at_level(logging.WARNING):
            assert again.prefill(tokens(again, TEXTS)) == len(TEXTS)  # recomputed
        assert "damaged frozen-prefix states" in caplog.text
        assert len(shards(tmp_path)) == 1
        for got, want in zip(states_of(again, TEXTS), expected, strict=True):
            assert torch.equal(got, want)
        last = fresh()
        assert last.prefill(tokens(last, TEXTS)) == 0  # the rebuilt shard reads back


def test_folders_follow_the_prefix_and_a_stale_one_is_refilled(tmp_path: Path) -> None:
    with persisted_states(tmp_path):
        for config in (CONFIG, EncoderConfig(layers=2, trainable_layers=0, max_length=16)):
            lm = fresh(config)
            lm.prefill(tokens(lm, TEXTS))
        half = fresh(EncoderConfig(layers=2, trainable_layers=1, max_length=16, cache_dtype="float16"))
        half.prefill(tokens(half, TEXTS))
        names = sorted(p.name for p in tmp_path.iterdir())
        assert (
            len(names) == 3 and any("-frozen2-" in n for n in names) and any("-float16-" in n for n in names)
        )
        # Frozen weights that changed (a loaded checkpoint) are another folder.
        changed = fresh()
        state = changed.state_dict()
        state["model.embeddings.word_embeddings.weight"] = (
            state["model.embeddings.word_embeddings.weight"] * 2
        )
        changed.load_state_dict(state)
        assert changed.prefill(tokens(changed, TEXTS)) == len(TEXTS)
        assert len(list(tmp_path.iterdir())) == 4
        # Another max_length of the same weights: its own folder, and the first one's states stay.
        longer = fresh(EncoderConfig(layers=2, trainable_layers=1, max_length=24))
        assert longer.prefill(tokens(longer, TEXTS)) == len(TEXTS)
        assert len(list(tmp_path.iterdir())) == 5
        again = fresh()
        assert again.prefill(tokens(again, TEXTS)) == 0
        # A library upgraded since: the folder is emptied and filled again.
        lm = fresh()
        folder = tmp_path / lm.prefix_key.folder_name
        manifest = json.loads((folder / MANIFEST).read_text())
        (folder / MANIFEST).write_text(json.dumps({**manifest, "torch": "0.0.1"}))
        assert lm.prefill(tokens(lm, TEXTS)) == len(TEXTS)
        assert json.loads((folder / MANIFEST).read_text())["torch"] == torch.__version__
        assert len(list(folder.glob(f"*{state_store.SUFFIX}"))) == 1


def test_a_folder_that_cannot_be_written_warns_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(state_store, "save_file", full_disk)
    with persisted_states(tmp_path), caplog.at_level(logging.WARNING):
        lm = fresh()
        assert lm.prefill(tokens(lm, TEXTS)) == len(TEXTS)
    assert "not kept" in caplog.text and "No space left" in caplog.text
    assert shards(tmp_path) == [] and not list(tmp_path.glob("*/.tmp-*"))
    assert len(lm.state_cache or []) == len(TEXTS)  # the run has its states all the same


def test_a_folder_that_is_not_ours_is_never_touched(tmp_path: Path) -> None:
    lm = fresh()
    folder = tmp_path / lm.prefix_key.folder_name
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text('{"kind": "somebody else\'s"}')
    (folder / "notes.txt").write_text("mine")
    with persisted_states(tmp_path):
        assert lm.prefill(tokens(lm, TEXTS)) == len(TEXTS)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "notes.txt"]


def test_what_a_killed_run_left_is_removed(tmp_path: Path) -> None:
    with persisted_states(tmp_path):
        lm = fresh()
        lm.prefill(tokens(lm, TEXTS))
        folder = tmp_path / lm.prefix_key.folder_name
        dead = folder / f".tmp-{2**22 + 12345}-0123abcd{state_store.SUFFIX}"  # no such process
        dead.write_bytes(b"half a shard")
        again = fresh()
        assert again.prefill(tokens(again, TEXTS)) == 0
    assert not dead.exists()


def test_without_a_root_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lm = fresh()
    assert state_store.active_root() is None
    assert lm.prefill(tokens(lm, TEXTS)) == len(TEXTS)
    assert list(tmp_path.iterdir()) == []
