"""Checkpoints written before the house was laid out by concern (tinylm at 595d9a7, the flat layout) still load,
with their optimizer state, and give the loss they recorded."""
import os

import numpy as np
import pytest

from conftest import ROOT
from tinylm.fast import model as M
from tinylm.io.checkpoint import load_checkpoint


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_checkpoint_of_the_flat_layout_loads_and_computes_what_it_did(optimizer):
    ckpt = load_checkpoint(os.path.join(ROOT, "tests", "data", f"before_rooms_{optimizer}.npz"))
    tok, config, params, meta = ckpt["tokenizer"], ckpt["config"], ckpt["params"], ckpt["meta"]
    assert meta["step"] == 1 and "595d9a7" in meta["note"]
    assert set(ckpt["opt_state"]) >= ({"momentum"} if optimizer == "muon" else {"m", "v"})
    idx, targets = np.array([tok.encode("hello wo")]), np.array([tok.encode("ello wor")])
    _, loss, _ = M.forward(params, config, idx, targets, for_backward=False)
    assert loss == pytest.approx(meta["loss_after_step"], abs=1e-6)
