"""``params=``: which parameters are differentiated (names, globs, modules or module types)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from fasttrak.errors import ConfigError, ConfigTypeError

ParamSpec = str | nn.Module | type | Iterable[str | nn.Module | type] | None
"""None (every trainable parameter), a name or glob ("fc.*"), ``"lora"`` (every LoRA adapter
matrix of a PEFT model), a submodule, a module type (nn.Linear), an exclusion ("!fc.bias",
"!*.norm.*"), or a list mixing those."""

LORA = "lora"
"""``params="lora"``: the adapter tensors PEFT adds (``lora_A``, ``lora_B``, ``lora_embedding_A/B``,
``lora_magnitude_vector``), whatever the adapter's name; the frozen base model is not
differentiated."""


def select_parameters(model: nn.Module, params: ParamSpec = None) -> list[str]:
    """Names of the selected parameters, in ``model.named_parameters()`` order.

    Entries that start with ``"!"`` (``"!lm_head.*"``) exclude names or globs from what the
    other entries select (from every trainable parameter when there are only exclusions).
    Raises ValueError when an entry matches nothing or nothing is left, naming what exists.
    """
    named = dict(model.named_parameters())
    items = (
        []
        if params is None
        else [params]
        if isinstance(params, (str, nn.Module, type))
        else list(params)
    )
    if params is not None and not items:
        raise ConfigError("params= is an empty list; pass None to use every trainable parameter")
    excludes = [i[1:] for i in items if isinstance(i, str) and i.startswith("!")]
    includes = [i for i in items if not (isinstance(i, str) and i.startswith("!"))]
    available = ", ".join(list(named)[:12]) + (" ..." if len(named) > 12 else "")
    if includes:
        chosen: set[str] = set()
        for item in includes:
            matched = _match(model, named, item)
            if not matched:
                raise ConfigError(
                    f"params= entry {item!r} matches no parameter of the model; "
                    f"parameter names are: {available}"
                )
            chosen |= matched
    else:
        chosen = {name for name, p in named.items() if p.requires_grad}
        if not chosen:
            raise ConfigError(
                "the model has no parameter with requires_grad=True; pass params= to choose "
                "which parameters to attribute through"
            )
    for pattern in excludes:
        dropped = _match(model, named, pattern)
        if not dropped:
            raise ConfigError(
                f"params= exclusion '!{pattern}' matches no parameter of the model; "
                f"parameter names are: {available}"
            )
        chosen -= dropped
    if not chosen:
        raise ConfigError(f"params= {params!r} leaves no parameter to differentiate")
    return [name for name in named if name in chosen]


def _match(model: nn.Module, named: dict[str, nn.Parameter], item: object) -> set[str]:
    if item == LORA:
        found = {name for name in named if ".lora_" in f".{name}"}
        if not found:
            raise ConfigError(
                'params="lora" selects PEFT LoRA adapters, but the model has no parameter named '
                "lora_*; wrap it with peft.get_peft_model(model, LoraConfig(...)) first"
            )
        return found
    if isinstance(item, str):
        return {name for name in named if name == item or fnmatch.fnmatchcase(name, item)}
    if isinstance(item, type) and issubclass(item, nn.Module):
        return {
            f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules()
            if isinstance(module, item)
            for name, _ in module.named_parameters(recurse=False)
        }
    if isinstance(item, nn.Module):
        ids = {id(p) for p in item.parameters()}
        return {name for name, p in named.items() if id(p) in ids}
    raise ConfigTypeError(
        "params= entries must be names/globs, submodules or module types, "
        f"got {type(item).__name__}"
    )
