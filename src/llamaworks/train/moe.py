"""Router load balancing for mixture-of-experts training: the Switch auxiliary loss each `MoE`
module leaves after its forward (summed over layers, times `router_aux_loss_coef`, added to the
backpropagated loss), DeepSeek-V3's auxiliary-loss-free bias updates (after each optimizer step
bias_e += rate * sign(mean load - load_e)), and per-layer expert load for metrics.jsonl. A dense
model has no MoE modules, so `RouterBalance.of` returns None and the loop does nothing extra."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llamaworks.model import MoE
from llamaworks.train import distributed as D
from llamaworks.train.config import TrainConfig


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(layer index, its MoE feed-forward) for every MoE block, in layer order."""
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers)
            if isinstance(layer.mlp, MoE)]


def load_stats(load: torch.Tensor) -> tuple[list[float], float]:
    """(share of token slots per expert, max/mean imbalance) of one layer's counts [E];
    a perfectly balanced router gives 1/E each and imbalance 1.0."""
    total = float(load.sum())
    if total == 0:
        return [0.0] * len(load), 0.0
    share = (load.double() / total).tolist()
    return share, max(share) * len(share)


class RouterBalance:
    """The trainer's view of the routers: aux loss per micro-batch, loads per step (summed
    over ranks), bias updates, and load shares over each logging interval."""

    def __init__(self, layers: list[tuple[int, MoE]], tc: TrainConfig, info: D.DistInfo):
        self.layers, self.tc, self.info = layers, tc, info
        n_exp = layers[0][1].cfg.n_experts
        dev = layers[0][1].gate.weight.device
        self.step_load = torch.zeros(len(layers), n_exp, dtype=torch.int64, device=dev)
        self.interval_load = torch.zeros_like(self.step_load)  # since the last metrics row
        self.aux_sum, self.aux_count = 0.0, 0  # aux values (times 1, before the coefficient)
        self.biased = all(hasattr(m.gate, "e_score_correction_bias") for _, m in layers)
        if tc.router_bias_rate and not self.biased:
            raise ValueError("router_bias_rate needs a model whose routers have a correction "
                             "bias (model override router_bias=true, e.g. --set "
                             "router_bias=true)")

    @classmethod
    def of(cls, model: nn.Module, tc: TrainConfig, info: D.DistInfo) -> RouterBalance | None:
        """None for a dense model; refuses bias updates without MoE layers."""
        layers = moe_layers(model)
        if not layers:
            if tc.router_bias_rate:
                raise ValueError("router_bias_rate is set but the model has no MoE layers")
            return None
        return cls(layers, tc, info)

    def take_aux(self) -> torch.Tensor:
        """Sum over MoE layers of the last forward's aux loss (with its graph), and that
        forward's loads added to this step's counts; the modules drop their references."""
        total = None
        for j, (_, m) in enumerate(self.layers):
            if m.aux_loss is None or m.load is None:
                raise RuntimeError("an MoE layer recorded no aux loss (not in training mode?)")
            total = m.aux_loss if total is None else total + m.aux_loss
            self.step_load[j] += m.load
            m.aux_loss, m.load = None, None
        self.aux_sum += float(total.detach())
        self.aux_count += 1
        return total

    def loss(self, lm_loss: torch.Tensor) -> torch.Tensor:
        """The backpropagated loss: the LM loss plus coef x the summed aux loss."""
        aux = self.take_aux()
        coef = self.tc.router_aux_loss_coef
        return lm_loss + coef * aux if coef else lm_loss

    @torch.no_grad()
    def end_step(self) -> None:
        """After the optimizer step: sum the step's loads over ranks, move the biases
        (when `router_bias_rate`), add the loads to the logging interval."""
        load = self.step_load
        if self.info.enabled:
            torch.distributed.all_reduce(load)
        rate = self.tc.router_bias_rate
        if rate:
            for j, (_, m) in enumerate(self.layers):
                bias = m.gate.e_score_correction_bias
                lj = load[j].to(bias.dtype)
                bias.add_(rate * torch.sign(lj.mean() - lj))
        self.interval_load += load
        load.zero_()

    def metrics(self) -> dict[str, Any]:
        """Row fields for the interval since the last call: per-layer load shares and max/mean
        imbalance, the mean summed aux loss per micro-batch (averaged over ranks); resets."""
        loads, imb = {}, {}
        for j, (i, _) in enumerate(self.layers):
            loads[str(i)], imb[str(i)] = load_stats(self.interval_load[j].cpu())
        aux = D.all_reduce_mean(self.aux_sum / max(1, self.aux_count), self.info)
        row: dict[str, Any] = {"aux_loss": aux, "expert_load": loads, "load_imbalance": imb,
                               "max_load_imbalance": max(imb.values())}
        if self.biased:
            row["router_bias_absmax"] = {
                str(i): float(m.gate.e_score_correction_bias.abs().max()) for i, m in self.layers}
        self.interval_load.zero_()
        self.aux_sum, self.aux_count = 0.0, 0
        return row

    def state_dict(self) -> dict[str, Any]:
        """The logging interval's running totals, so a resumed run logs the same rows (a
        collective under torchrun: every rank calls it)."""
        aux = D.all_reduce_mean(self.aux_sum, self.info)  # each rank resumes with the mean
        return {"interval_load": self.interval_load.cpu().clone(), "aux_sum": aux,
                "aux_count": self.aux_count}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.interval_load.copy_(st["interval_load"])
        self.aux_sum, self.aux_count = float(st["aux_sum"]), int(st["aux_count"])
