"""The optimiser's fast path makes exactly torch's fused Adam updates."""

from __future__ import annotations

import copy

import torch

from regvi.train.optim import FusedAdam


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _set_grads(model: torch.nn.Module, step: int, skip: set[int] = frozenset()) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(model.parameters()):
        p.grad = None if i in skip else torch.randn(p.shape, generator=g)


def test_fast_path_matches_torch_fused_adam_step_by_step():
    ours_model, torch_model = _model(), _model()
    options = {"lr": 1e-2, "eps": 0.01, "weight_decay": 1e-3}
    ours = FusedAdam(ours_model.parameters(), **options)
    reference = torch.optim.Adam(torch_model.parameters(), fused=True, **options)
    for step in range(12):
        skip = {1} if step == 5 else set()  # a parameter without a gradient: torch skips it
        if step == 8:  # a learning-rate change (as a scheduler makes) is followed
            for opt in (ours, reference):
                opt.param_groups[0]["lr"] = 3e-3
        for model in (ours_model, torch_model):
            _set_grads(model, step, skip)
        ours.step()
        reference.step()
        for a, b in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if step >= 1 and not skip:
            assert ours._lists is not None  # the fast path is the one in use
    for p_ours, p_ref in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        s_ours, s_ref = ours.state[p_ours], reference.state[p_ref]
        assert s_ours.keys() == s_ref.keys()
        for key in s_ref:
            torch.testing.assert_close(s_ours[key], s_ref[key], rtol=0, atol=0)


def test_state_dict_round_trips_with_torch_adam_and_rebuilds_its_lists():
    model = _model()
    opt = FusedAdam(model.parameters(), lr=1e-2)
    for step in range(3):
        _set_grads(model, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    start = [p.detach().clone() for p in model.parameters()]

    def continue_with(optimizer_class, **kw):
        clone = _model()
        with torch.no_grad():
            for p, value in zip(clone.parameters(), start, strict=True):
                p.copy_(value)
        optimizer = optimizer_class(clone.parameters(), lr=1e-2, **kw)
        optimizer.load_state_dict(copy.deepcopy(saved))
        for step in range(3, 6):
            _set_grads(clone, step)
            optimizer.step()
        return [p.detach() for p in clone.parameters()], optimizer

    ours, resumed = continue_with(FusedAdam)
    theirs, _ = continue_with(torch.optim.Adam, fused=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the lists hold the loaded state's tensors, not the ones made before loading
    first = next(iter(resumed.param_groups[0]["params"]))
    assert resumed._lists[0][2][0] is resumed.state[first]["exp_avg"]


def test_closure_runs_once_and_its_loss_is_returned():
    model = _model()
    opt = FusedAdam(model.parameters(), lr=1e-2)
    calls = []

    def closure():
        calls.append(1)
        _set_grads(model, len(calls))
        return torch.tensor(float(len(calls)))

    for _ in range(3):
        loss = opt.step(closure)
    assert len(calls) == 3 and float(loss) == 3.0
