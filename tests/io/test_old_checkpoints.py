"""Checkpoints made by an older quadllm (tests/fixtures/old, made by commit 1b415f0 with
tests/fixtures/make_old_checkpoints.py) load with today's code and give the logits they gave then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quadllm import load
from quadllm.config import RECIPE_OFF

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "old"


@pytest.mark.parametrize("name", sorted(p.name for p in OLD.iterdir() if p.is_dir()))
def test_an_old_checkpoint_loads_and_gives_the_same_logits(name):
    model, _, meta = load(OLD / name)
    assert not set(RECIPE_OFF) & set(meta["quant_config"]), "the fixture should predate the recipe's keys"
    ref = torch.load(OLD / name / "logits.pt")
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)


def test_the_fixtures_exist():
    assert len([p for p in OLD.iterdir() if p.is_dir()]) == 2
