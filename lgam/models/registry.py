"""Model registry in the manner of timm: ``create_model(name, ...)`` and ``list_models()``.

Names are ``<backbone>`` or ``<backbone>_<attention>``: backbones ``resnet18``, ``resnet34``,
``wrn16_10``, ``resnext29_32x4d``; attentions ``se``, ``sge``, ``cbam``, ``bam``, ``lgam``
(G=4, r=16) and ``lgam_g32`` (G=32, r=2, the setting matching the paper's parameter counts).
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any, Callable, Sequence

from torch import nn

from ..attention import ATTENTION, attention_placement
from ..errors import UsageError
from .resnet import ResNet, check_num_classes
from .resnext import ResNeXt
from .wrn import WideResNet

__all__ = ["FIGURE5_MODELS", "create_model", "list_models", "register_model", "model_config"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}

BACKBONES: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "resnet18": (ResNet, {"layers": [2, 2, 2, 2], "stem": "imagenet"}),
    "resnet34": (ResNet, {"layers": [3, 4, 6, 3], "stem": "imagenet"}),
    "wrn16_10": (WideResNet, {"depth": 16, "widen": 10, "stem": "cifar"}),
    "resnext29_32x4d": (ResNeXt, {"depth": 29, "cardinality": 32, "base_width": 4, "stem": "cifar"}),
}

#: the six ImageNet ResNet18 variants of the paper's Table 4 and Figure 5, in its column order:
#: name -> the paper's label (the app's and ``lgam figure5``'s columns)
FIGURE5_MODELS: dict[str, str] = {
    "resnet18": "ResNet18", "resnet18_se": "SE", "resnet18_sge": "SGE", "resnet18_cbam": "CBAM",
    "resnet18_bam": "BAM", "resnet18_lgam": "LGAM",
}

#: per-backbone attention arguments: WRN-16-10's widths (160, 320, 640) are not divisible by SGE's
#: 64 groups, so its SGE uses 32 (the largest power of two that divides them all)
ATTENTION_KWARGS: dict[tuple[str, str], dict[str, Any]] = {("wrn16_10", "sge"): {"groups": 32}}


def register_model(name: str, builder: Callable[..., nn.Module], **defaults: Any) -> None:
    """Register ``builder(**defaults, **overrides)`` under ``name``: a call, not a decorator as
    timm's ``@register_model`` (``register_model("mynet", MyNet, depth=18)``)."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = builder
    _DEFAULTS[name] = defaults


for _bb, (_cls, _kw) in BACKBONES.items():
    register_model(_bb, _cls, **_kw)
    for _att in ATTENTION:
        _extra = ATTENTION_KWARGS.get((_bb, _att))
        register_model(
            f"{_bb}_{_att}", _cls, **_kw, attention=_att, placement=attention_placement(_att),
            **({"attention_kwargs": _extra} if _extra else {}),
        )


def list_models(pattern: str | Sequence[str] = "*") -> list[str]:
    """Sorted registered names matching the shell-style ``pattern`` (e.g. ``"resnet18*"``), or
    any of several (``["resnet18", "wrn*"]``), as timm's ``list_models``."""
    patterns = ([pattern] if isinstance(pattern, str) else
                list(pattern) if isinstance(pattern, Sequence) else None)
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise UsageError(f"list_models takes a name pattern such as 'resnet18*', or a list of them; "
                         f"got {pattern!r}")
    return sorted(n for n in _MODELS if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def _check_known(name: str) -> None:
    if not isinstance(name, str):
        raise UsageError(f"a model name is a string such as 'resnet18_lgam' (see lgam.list_models()), "
                         f"got {name!r}")
    if name not in _MODELS:
        close = difflib.get_close_matches(name.lower(), _MODELS, n=6, cutoff=0.6)
        close += [n for n in _MODELS if n.startswith(name.lower().split("_")[0]) and n not in close]
        raise UsageError(
            f"unknown model {name!r}; see lgam.list_models()" + (f" (e.g. {close[:8]})" if close else "")
        )


#: the builder arguments that make a registered name what it is: another value would build
#: another architecture under that name (and its checkpoint would overwrite the real one's)
ARCHITECTURE_KEYS = ("layers", "depth", "widen", "cardinality", "base_width", "placement")


def _check_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """:class:`UsageError` for a keyword the builder (or the attention module, for
    ``attention_kwargs``) does not take, listing those it does, and for one of
    :data:`ARCHITECTURE_KEYS` given another value than the name's."""
    defaults = _DEFAULTS[name]

    def same(a: Any, b: Any) -> bool:  # layers=(2, 2, 2, 2) is resnet18's [2, 2, 2, 2]
        return (list(a) == list(b)) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

    fixed = [k for k in ARCHITECTURE_KEYS if k in kwargs and k in defaults and not same(kwargs[k], defaults[k])]
    if fixed:
        raise UsageError(f"{name!r} is {', '.join(f'{k}={defaults[k]!r}' for k in fixed)}: another value "
                         "builds another architecture under its name; register one "
                         "(lgam.models.register_model('mynet', builder, ...)) or build the class itself")
    fixed_keys = set(ARCHITECTURE_KEYS) & set(defaults)  # the name's own values: not offered
    _check_accepted(f"create_model({name!r})", _MODELS[name], set(kwargs),
                    {"num_classes", "stem", "attention", *fixed_keys} | (set(defaults) - {"attention_kwargs"}),
                    own=("num_classes", "stem", "attention", "pretrained"))
    attention = defaults.get("attention")
    if attention in ATTENTION and kwargs.get("attention_kwargs"):
        _check_accepted(f"the {attention!r} module", ATTENTION[attention], set(kwargs["attention_kwargs"]),
                        {"channels"})


def _check_accepted(what: str, fn: Callable[..., Any], given: set[str], supplied: set[str],
                    own: Sequence[str] = ()) -> None:
    """:class:`UsageError` for keywords in ``given`` that ``fn`` does not take, listing what a
    caller may pass: ``own`` (the caller's own keywords) first, then ``fn``'s parameters that are
    not ``supplied`` for it (fixed by the registry or the caller)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(given - set(params))
    if unknown:
        own = [k for k in own if k in params or k in ("attention", "pretrained")]  # create_model's
        accepted = [*own, *sorted(set(params) - supplied - set(own))]
        raise UsageError(f"{what} takes no {', '.join(unknown)}; it accepts: {', '.join(accepted)}")


def _canonical_name(name: str, kwargs: dict[str, Any]) -> str:
    """The registered name of what ``create_model(name, **kwargs)`` builds: a backbone given
    ``attention="bam"`` is ``<backbone>_bam`` (so its checkpoint cannot overwrite the plain
    backbone's), ``attention`` then leaves ``kwargs``. An attention that contradicts the name, or
    ``attention_kwargs`` for a model without attention, is a :class:`UsageError`."""
    _check_known(name)
    registered = _DEFAULTS[name].get("attention")
    if "attention" in kwargs:
        wanted = kwargs["attention"]
        if wanted is not None and wanted not in ATTENTION:
            raise UsageError(f"unknown attention {wanted!r}; choose one of {list(ATTENTION)} or None")
        if registered is not None and wanted != registered:
            backbone = name[: -len(registered) - 1]
            raise UsageError(f"{name!r} has {registered!r} attention, not {wanted!r}: build "
                             f"{backbone + ('_' + wanted if wanted else '')!r} instead")
        if registered is None and wanted is not None and f"{name}_{wanted}" not in _MODELS:
            return name  # a model registered without variants: its builder takes attention= itself
        del kwargs["attention"]
        if registered is None and wanted is not None:
            name = f"{name}_{wanted}"
            registered = wanted
    if kwargs.get("attention_kwargs") and registered is None:
        raise UsageError(f"{name!r} has no attention module: attention_kwargs "
                         f"{kwargs['attention_kwargs']} would be ignored (give attention=... too)")
    return name


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full keyword arguments ``create_model(name, **overrides)`` passes to the builder."""
    _check_known(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = dict(_DEFAULTS[name])
    if given.get("attention") in ATTENTION and "placement" not in given:  # BAM between stages
        given["placement"] = attention_placement(given["attention"])
    if "attention_kwargs" in given:  # merged: a registered setting (WRN's SGE groups) stays
        given["attention_kwargs"] = {**cfg.get("attention_kwargs", {}), **given["attention_kwargs"]}
    cfg.update(given)
    return cfg


def create_model(
    name: str, num_classes: int = 1000, stem: str | None = None, **kwargs: Any
) -> nn.Module:
    """Build a registered model. ``stem=None`` keeps the backbone's default (``imagenet`` for the
    ResNets, ``cifar`` for WRN and ResNeXt). Extra ``kwargs`` (e.g. ``attention_kwargs={"groups":
    8}``) go to the builder. The model gets ``model_name`` and ``model_kwargs`` attributes, so
    ``create_model(m.model_name, **m.model_kwargs)`` rebuilds it; a backbone given ``attention=``
    is named as its registered variant (``create_model("resnet18", attention="bam").model_name ==
    "resnet18_bam"``). ``pretrained=False`` is accepted (timm's argument); there are no weights to
    download: trained models load from a checkpoint folder
    (:func:`lgam.checkpoints.load_checkpoint`).
    """
    if kwargs.pop("pretrained", False):
        raise UsageError("lgam downloads no pretrained weights: load a trained model from a checkpoint "
                         "folder with `model, entry = lgam.checkpoints.load_checkpoint(directory, name)` "
                         "(entry: its manifest entry, with the input_size, mean and std it was trained on)")
    name = _canonical_name(name, kwargs)
    _check_kwargs(name, kwargs)
    num_classes = check_num_classes(num_classes)  # an int (a NumPy integer would not go into JSON)
    cfg = model_config(name, num_classes=num_classes, stem=stem, **kwargs)
    model = _MODELS[name](**cfg)
    model.model_name = name
    model.model_kwargs = {"num_classes": num_classes, **({"stem": cfg["stem"]} if "stem" in cfg else {}),
                          **kwargs}
    return model
