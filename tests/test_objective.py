"""The PACE objective: chunked supervised-position losses equal the naive full-logit formulas."""

import pytest
import torch
import torch.nn.functional as F

from pace_llm import LoraArgs, PaceArgs, inject_noisy_lora
from pace_llm.data.collate import supervised_index
from pace_llm.lora import lora_layers, shared_views
from pace_llm.noise import RowKeys, pace_noise
from pace_llm.objective import PaceObjective, doubled
from conftest import tiny_llama


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100           # prompt
    labels[2, 7:] = -100           # padding of row 2
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("chunk", [1000, 4])  # one chunk, and several recomputed chunks
@pytest.mark.parametrize("task_loss_on", ["first", "both"])
def test_chunked_terms_equal_naive(chunk, task_loss_on):
    model = tiny_llama()
    inject_noisy_lora(model, LoraArgs(r=4), PaceArgs(sigma=1.0))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.2)
    model.train()
    objective = PaceObjective(model, causal=True, task_loss_on=task_loss_on)
    objective.chunk = chunk
    b = doubled(batch())
    keys = RowKeys(seed=0, step=3, positions=(5, 1, 2))
    out = objective(**b, views=2, lam=0.3, scale=0.5, noise_keys=keys,
                    supervised=supervised_index(b["labels"], 2))
    out["loss"].backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    with shared_views(model, 2), pace_noise(model, 6, keys, views=2):  # the same noise
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    sel = b["labels"][:3, 1:] != -100
    l1, l2 = logits[:3, :-1][sel], logits[3:, :-1][sel]
    y = b["labels"][:3, 1:][sel]
    ce = F.cross_entropy(l1, y, reduction="sum")
    if task_loss_on == "both":
        ce = 0.5 * (ce + F.cross_entropy(l2, y, reduction="sum"))
    cons = ((l1 - l2) ** 2).sum()
    loss = (ce + 0.3 * cons) * 0.5
    loss.backward()
    assert torch.allclose(out["ce"], ce.detach(), rtol=1e-5)
    assert torch.allclose(out["cons"], cons.detach(), rtol=1e-5) and cons > 0
    assert torch.allclose(out["loss"], loss.detach(), rtol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (ours[n] - p.grad).abs().max() <= 1e-4 * p.grad.abs().max(), n


def test_hidden_consistency_and_classification_terms():
    model = tiny_llama()
    inject_noisy_lora(model, LoraArgs(r=4), PaceArgs(sigma=1.0))
    model.train()
    obj = PaceObjective(model, causal=True, consistency_on="hidden")
    b = doubled(batch())
    torch.manual_seed(1)  # no keys: one draw from the torch RNG, supervised positions found here
    out = obj(**b, views=2, lam=1.0)
    torch.manual_seed(1)
    with shared_views(model, 2), pace_noise(model, 6, views=2):
        h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    sel = b["labels"][:3, 1:] != -100
    expected = ((h[:3, :-1][sel] - h[3:, :-1][sel]) ** 2).sum()
    assert torch.allclose(out["cons"], expected.detach(), rtol=1e-5)
    # classification: paper's squared L2 summed over classes, fast-mode history skips unseen rows
    cls = PaceObjective.__new__(PaceObjective)
    cls.regression, cls.task_loss_on = False, "first"
    logits = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    history = torch.tensor([[0.0, 2.0], [float("nan"), float("nan")]])
    ce, cons = cls._cls_terms(logits, torch.tensor([1, 0]), 1, history)
    assert cons.item() == pytest.approx(1.0)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([1, 0]), reduction="sum").item())


def test_supervised_index_matches_the_boolean_mask():
    b = doubled(batch())
    labels = b["labels"]
    flat = supervised_index(labels, 2)
    sel = labels[:3, 1:] != -100
    hidden = torch.arange(6 * 10).reshape(6, 10, 1)
    n = flat.numel() // 2
    assert n == int(sel.sum()) == 15
    assert torch.equal(hidden.reshape(-1)[flat[:n]], hidden[:3, :-1][sel][:, 0])
    assert torch.equal(hidden.reshape(-1)[flat[n:]], hidden[3:, :-1][sel][:, 0])
    assert torch.equal(labels.reshape(-1)[1:][flat[:n]], labels[:3, 1:][sel])
    assert torch.equal(supervised_index(labels[:3], 1), flat[:n])
