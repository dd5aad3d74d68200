"""Pruning plans (which heads to keep) and physical pruning (removing heads from the weights).

A plan is a [num_layers, num_heads] bool keep-mask. Plans never prune a layer's last head: a
layer with no head left would add nothing but its output bias, a different model from the
"pruned attention" one, and several architectures cannot represent it.

- `plan_pruning(scores, fraction, scope)`: one shot. scope "global" ranks all heads together,
  "layer" prunes the same fraction in every layer, "uniform" keeps the same head shape in
  every layer (and, with grouped-query attention, the same number of query heads per KV head)
  chosen among the shapes the model's config can hold, so `prune_heads` removes every pruned
  head instead of zeroing some.
- `iterative_pruning_plan`: Michel et al. 2019 ("Are Sixteen Heads Really Better than One?",
  github.com/pmichel31415/are-16-heads-really-better-than-1): prune `step` (10%) of the heads,
  re-score with the pruned heads' gates at 0, repeat until `fraction`.
- `keep_from_gates(values)`: the plan learned gates (e.g. hard-concrete) imply.
- `prune_heads(model, keep, gate_values)`: EXACT physical pruning; the pruned model computes
  what the gated model computes (gates = gate_values on kept heads, 0 on pruned ones) and
  reloads with `AutoModelForCausalLM.from_pretrained`. Transformers 5 configs hold one head
  count for all layers (no supported family accepts per-layer counts), and GPT-2, OPT, BLOOM,
  GPT-NeoX and GPT-J derive head_dim = hidden_size / num_heads. So:
    * Llama, Mistral, Qwen2, Phi3 (explicit head_dim): every layer keeps the same number of KV
      heads and of query heads per KV head, the smallest shape that holds every layer's kept
      heads (for Llama also a head count dividing hidden_size, which LlamaConfig requires); the
      rest of the heads are removed from q/k/v/o. Layers that keep fewer heads keep some pruned
      heads as zeros (their output-projection columns set to 0).
    * the others: nothing can be removed; pruned heads' output-projection columns are zeroed
      (the gates are folded into the weights), so the saved model is the gated model.
  The returned report says which happened and why; write it as JSON beside the export.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from testtime.heads.gates import attached_gates, attention_modules, family_of, head_layout, head_rows, in_dim, \
    output_projections
from testtime.heads.importance import gates_in_force, head_importance

SCOPES = ("global", "layer", "uniform")


# ---------------------------------------------------------------------------------------------
# Shapes a config can hold
# ---------------------------------------------------------------------------------------------


def allowed_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, query heads per kv head) pairs every layer of a pruned `model` could have.

    Without grouped-query attention a shape is (n, 1). For families whose config cannot hold
    fewer heads (see the module docstring) it is only the original shape.
    """
    layout = head_layout(model)
    family = family_of(model)[1]
    if not family.removable:
        return [(layout.num_kv_heads, layout.group_size)]
    shapes = []
    for kv, r in itertools.product(range(1, layout.num_kv_heads + 1), range(1, layout.group_size + 1)):
        if family.heads_divide_hidden and model.config.hidden_size % (kv * r):
            continue
        shapes.append((kv, r))
    return shapes


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


def _ranks(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per layer, the rank of each head by (already kept, score), ties by index: 0 = first to prune."""
    order = sorted(range(scores.numel()), key=lambda i: (bool(keep.flatten()[i]), float(scores.flatten()[i]), i))
    ranks = torch.empty(scores.numel(), dtype=torch.long)
    ranks[torch.tensor(order)] = torch.arange(scores.numel())
    return ranks.view(scores.shape)


def plan_pruning(scores: torch.Tensor, fraction: float, scope: str = "global", keep: torch.Tensor | None = None,
                 model: nn.Module | None = None) -> torch.Tensor:
    """Keep-mask [L, H] pruning `fraction` of all heads, lowest `scores` first (higher = more important).

    keep: heads already pruned (False) stay pruned and count toward the fraction.
    scope:
      "global": round(fraction * L * H) heads pruned in total, wherever the scores are lowest.
      "layer": round(fraction * H) heads pruned in every layer.
      "uniform": every layer keeps the same shape (KV heads x query heads per KV head); `model` is
        required. The shape is the one whose head count is closest to H - round(fraction * H)
        (ties: fewer pruned, then more KV heads) among those its config can hold (`allowed_shapes`;
        any shape for the families whose pruned heads are folded, not removed). Each layer keeps
        its best KV groups (by the summed rank of their best heads) and in each its best heads,
        so the count can differ from the target.
    Never prunes a layer's last head, so "global" and "layer" can fall short of the target when
    `fraction` is close to 1.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_layers, num_heads], got shape {tuple(scores.shape)}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    scores = scores.detach().float().cpu()
    L, H = scores.shape
    keep = torch.ones(L, H, dtype=torch.bool) if keep is None else keep.detach().cpu().bool().clone()
    if tuple(keep.shape) != (L, H):
        raise ValueError(f"keep must have the scores' shape {(L, H)}, got {tuple(keep.shape)}")

    if scope == "global":
        target = round(fraction * L * H)
        pruned, left = int((~keep).sum()), keep.sum(1)
        for i in sorted(range(L * H), key=lambda i: (float(scores.flatten()[i]), i)):
            layer, head = divmod(i, H)
            if pruned >= target:
                break
            if keep[layer, head] and left[layer] > 1:
                keep[layer, head] = False
                left[layer] -= 1
                pruned += 1
        return keep

    if scope == "layer":
        target = round(fraction * H)
        for layer in range(L):
            for head in sorted(range(H), key=lambda h: (float(scores[layer, h]), h)):
                if int((~keep[layer]).sum()) >= target:
                    break
                if keep[layer, head] and keep[layer].sum() > 1:
                    keep[layer, head] = False
        return keep

    if model is None:
        raise ValueError("scope='uniform' needs model= (its KV grouping and the head counts its config allows)")
    layout = head_layout(model)
    if (layout.num_layers, layout.num_heads) != (L, H):
        raise ValueError(f"scores have shape {(L, H)}, the model has {(layout.num_layers, layout.num_heads)}")
    want = max(1, H - round(fraction * H))
    shapes = (allowed_shapes(model) if family_of(model)[1].removable else  # the others fold: any shape
              list(itertools.product(range(1, layout.num_kv_heads + 1), range(1, layout.group_size + 1))))
    kv, r = min(shapes, key=lambda s: (abs(s[0] * s[1] - want), -s[0] * s[1], -s[0]))
    plan = torch.zeros(L, H, dtype=torch.bool)
    for layer in range(L):
        ranks = _ranks(scores[layer:layer + 1], keep[layer:layer + 1])[0].view(layout.num_kv_heads, layout.group_size)
        best = ranks.sort(dim=1, descending=True).values[:, :r].sum(1)
        for group in best.argsort(descending=True, stable=True)[:kv].tolist():
            heads = ranks[group].argsort(descending=True, stable=True)[:r] + group * layout.group_size
            plan[layer, heads] = True
    return plan


def iterative_pruning_plan(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], fraction: float,
                           step: float = 0.1, method: str = "gradient", scope: str = "global",
                           gates=None, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Prune `step` of all heads at a time, re-scoring after each, until `fraction` (Michel et al.).

    Each round scores with the current plan applied (pruned heads' gates at 0, the others at the
    gates' values; temporary gates at 1 if none are attached) through `head_importance(method)`.
    Returns (keep [L, H] bool, history): one dict per round with "fraction", "pruned" (count so
    far) and "scores" ([L, H] scores that round's plan was made from).
    """
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    batches = list(batches)  # read once per round
    with gates_in_force(model, gates) as gates:
        base = gates.values.detach().clone()
        keep = torch.ones_like(base, dtype=torch.bool, device="cpu")
        history = []
        for k in itertools.count(1):
            current = min(k * step, fraction)
            with gates.overridden(base * keep.to(base.device)):
                scores = head_importance(model, batches, method=method, gates=gates, seed=seed)
            keep = plan_pruning(scores, current, scope=scope, keep=keep, model=model)
            history.append({"fraction": current, "pruned": int((~keep).sum()), "scores": scores})
            if current >= fraction:
                return keep, history


def keep_from_gates(values: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Keep-mask of gates above `threshold` (a hard-concrete deterministic gate is exactly 0 when
    closed); a layer with none above it keeps its largest gate (never prune a layer's last head)."""
    values = values.detach().float().cpu()
    keep = values > threshold
    for layer in torch.nonzero(~keep.any(1)).flatten().tolist():
        keep[layer, values[layer].argmax()] = True
    return keep


# ---------------------------------------------------------------------------------------------
# Physical pruning
# ---------------------------------------------------------------------------------------------


def _keep_rows(module: nn.Module, idx: torch.Tensor) -> None:
    """Keep output features `idx` of an nn.Linear / Conv1D (weight rows / columns, bias entries)."""
    idx = idx.to(module.weight.device)
    dim = 1 - in_dim(module)
    module.weight = nn.Parameter(module.weight.detach().index_select(dim, idx).clone(),
                                 requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.detach()[idx].clone(), requires_grad=module.bias.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features = len(idx)
    else:
        module.nf = len(idx)


def _keep_columns(module: nn.Module, idx: torch.Tensor, scale: torch.Tensor) -> None:
    """Keep input features `idx` of the output projection, multiplied by `scale` (one per feature)."""
    idx = idx.to(module.weight.device)
    dim = in_dim(module)
    weight = module.weight.detach().index_select(dim, idx).clone()
    shape = [1, 1]
    shape[dim] = -1
    changed = scale != 1  # untouched columns stay bit-identical
    if changed.any():
        weight = torch.where(changed.view(shape).to(weight.device),
                             weight * scale.view(shape).to(weight.device, weight.dtype), weight)
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if isinstance(module, nn.Linear):
        module.in_features = len(idx)
    else:
        module.nx = len(idx)


def _layer_heads(keep: torch.Tensor, kv: int, r: int, group_size: int) -> tuple[list[int], list[int]]:
    """(KV groups, query heads) one layer keeps: its groups with a kept head plus the lowest-index
    others up to `kv`; in each group its kept heads plus the lowest-index others up to `r`."""
    groups = [g for g in range(keep.numel() // group_size) if keep[g * group_size:(g + 1) * group_size].any()]
    groups += [g for g in range(keep.numel() // group_size) if g not in groups][:kv - len(groups)]
    heads = []
    for g in sorted(groups):
        members = list(range(g * group_size, (g + 1) * group_size))
        chosen = [h for h in members if keep[h]]
        chosen += [h for h in members if not keep[h]][:r - len(chosen)]
        heads += sorted(chosen)
    return sorted(groups), heads


@torch.no_grad()
def prune_heads(model: nn.Module, keep: torch.Tensor, gate_values: torch.Tensor | None = None) -> dict:
    """Prune `model` in place so it computes the gated model with gates = gate_values * keep.

    keep: [L, H] bool plan. gate_values: [L, H] gates to fold into the kept heads' output columns
    (default 1: kept heads unchanged). Detach any attached gates first. Modules keep their identity
    (their weights are replaced), so build optimizers after pruning.

    Returns a JSON-serialisable report:
      architecture, method ("removed" | "folded" | "removed+folded" | "unchanged"), why,
      heads_per_layer_before / kv_heads_per_layer_before, heads_per_layer_after /
      kv_heads_per_layer_after (physical, the same in every layer), heads_kept, heads_pruned,
      heads_removed (out of the weights), heads_zeroed (pruned but left in the weights as zeros),
      gates_folded (a kept head's gate != 1 was multiplied into its columns), keep ([L][H] bools),
      physical_heads ([L] lists of the original indices of the heads left in the weights),
      parameters_before, parameters_after.
    """
    if attached_gates(model) is not None:
        raise ValueError("prune_heads: the model has head gates attached; read their values, call .detach(), "
                         "and pass the values as gate_values=")
    model_type, family = family_of(model)
    layout = head_layout(model)
    L, H, KV, D, G = layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.group_size
    keep = keep.detach().cpu().bool()
    if tuple(keep.shape) != (L, H):
        raise ValueError(f"keep must have shape {(L, H)} (layers, heads) for this {model_type} model, "
                         f"got {tuple(keep.shape)}")
    gates = torch.ones(L, H) if gate_values is None else gate_values.detach().float().cpu()
    if tuple(gates.shape) != (L, H):
        raise ValueError(f"gate_values must have shape {(L, H)}, got {tuple(gates.shape)}")
    effective = gates * keep
    parameters_before = sum(p.numel() for p in model.parameters())

    # The smallest shape every layer fits in (the original one where nothing can be removed).
    per_group = keep.view(L, KV, G).sum(-1)
    need_kv = max(1, int((per_group > 0).sum(-1).max()))
    need_r = max(1, int(per_group.max()))
    kv, r = min((s for s in allowed_shapes(model) if s[0] >= need_kv and s[1] >= need_r),
                key=lambda s: (s[0] * s[1], -s[1]))

    config_name = type(model.config).__name__
    rows_of = [head_rows(model, layer) for layer in range(L)]  # read before any weight changes shape
    physical = []
    for layer, (attn, proj) in enumerate(zip(attention_modules(model), output_projections(model))):
        groups, heads = _layer_heads(keep[layer], kv, r, G)
        physical.append(heads)
        heads_t = torch.tensor(heads)
        columns = (heads_t[:, None] * D + torch.arange(D)).flatten()
        _keep_columns(proj, columns, effective[layer, heads_t].repeat_interleave(D))
        if (kv, r) == (KV, G):
            continue
        rows = rows_of[layer]
        per_module: dict[nn.Module, list[torch.Tensor]] = {}
        for name in ("q", "k", "v"):  # fused q|k|v modules keep that order
            module, idx = rows[name]
            per_module.setdefault(module, []).append(idx[heads_t if name == "q" else torch.tensor(groups)].flatten())
        for module, pieces in per_module.items():
            _keep_rows(module, torch.cat(pieces))
        for name, value in (("num_heads", kv * r), ("num_attention_heads", kv * r),
                            ("num_key_value_heads", kv), ("num_key_value_groups", r)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    removed = L * H - L * kv * r
    zeroed = sum(int((effective[l, torch.tensor(physical[l])] == 0).sum()) for l in range(L))
    if (kv, r) != (KV, G):
        model.config.num_attention_heads = kv * r
        model.config.num_key_value_heads = kv
        model.config.head_dim = D
    if not family.removable:
        why = (f"{config_name} derives head_dim from hidden_size / num_attention_heads and has one head count for "
               "all layers, so no head can leave the weights: pruned heads' output-projection columns are zeroed "
               "(the gates folded into the weights); same size, same function as the gated model")
    else:
        divides = ", dividing hidden_size (LlamaConfig requires it)," if family.heads_divide_hidden else ""
        why = (f"{config_name} has one head count and one KV head count for all layers: every layer keeps {kv} KV "
               f"head(s) x {r} query head(s) each{divides} the smallest shape holding every layer's kept heads; "
               "pruned heads left in that shape are zeroed. Plan with scope='uniform' to remove every pruned head")
    method = ("unchanged" if removed == 0 and zeroed == 0 and bool((effective == 1).all()) else
              "removed" if zeroed == 0 and removed > 0 else
              "removed+folded" if removed > 0 else "folded")
    return {
        "architecture": model_type,
        "method": method,
        "why": why,
        "heads_per_layer_before": H,
        "kv_heads_per_layer_before": KV,
        "heads_per_layer_after": kv * r,
        "kv_heads_per_layer_after": kv,
        "heads_kept": int(keep.sum()),
        "heads_pruned": int((~keep).sum()),
        "heads_removed": removed,
        "heads_zeroed": zeroed,
        "gates_folded": bool(((gates != 1) & keep).any()),
        "keep": keep.tolist(),
        "physical_heads": physical,
        "parameters_before": parameters_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
    }
