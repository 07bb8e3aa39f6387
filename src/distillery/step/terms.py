"""The entries of a distillation step: which objective, with which weight and parameters, on
which layers — read from config entries, then resolved against the two models.

Defaults live in one place: an objective's own parameters in its function's signature (the config
schema is built from it), its layer map in the registry (``Objective.default_layers``), and the
interchange settings in ``config.InterchangeObjective``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from distillery.config import InterchangeObjective
from distillery.errors import DistilleryError
from distillery.models.interventions import num_layers
from distillery.models.loading import use_eager_attention
from distillery.objectives.registry import Objective, get_objective
from distillery.objectives.representations import HeadPolicy, LayerSpec, check_heads, layer_pairs
from distillery.teachers import TeacherSignal


@dataclass
class Term:
    """One entry of the mix: a registered objective, its weight and its parameters.

    Representation objectives also say which layers they compare (``layers``, see
    ``representations.layer_pairs``), how attention heads are matched (``heads``) and whether
    the student's hidden states go through a learned projection (``projection``: ``auto`` =
    only when the widths differ, ``linear`` = always).
    """

    name: str
    objective: Objective
    weight: float
    params: dict[str, Any] = field(default_factory=dict)
    layers: LayerSpec | None = None  # None: the objective's default_layers
    heads: HeadPolicy = "auto"
    projection: Literal["auto", "linear"] = "auto"
    pairs: list[tuple[int, int]] = field(default_factory=list)  # resolved by ``resolve``
    # Interchange intervention training: positions / fraction / probability; ``objective`` is
    # then the divergence between the counterfactual outputs (``models.interchange``).
    interchange: dict[str, Any] | None = None

    @property
    def reads(self) -> str:
        """``logits``, ``states``, ``attentions`` or ``interchange`` (counterfactual runs)."""
        return "interchange" if self.interchange is not None else self.objective.reads


ROUTING = ("layers", "heads", "projection")  # Term fields set from config, not loss parameters
SWAP_FIELDS = ("positions", "fraction", "probability")  # how interchange pairs are drawn


def terms_from_config(objectives: Sequence[Any]) -> list[Term]:
    """Terms from config entries (``kind``, ``weight`` and the objective's own parameters)."""
    terms: list[Term] = []
    seen: dict[str, int] = {}
    for entry in objectives:
        spec = entry.model_dump() if hasattr(entry, "model_dump") else dict(entry)
        kind, weight = spec.pop("kind"), float(spec.pop("weight", 1.0))
        if kind == "iit":
            schema = InterchangeObjective.model_fields
            divergence = get_objective(spec.pop("divergence", schema["divergence"].default))
            swap = {k: spec.pop(k, schema[k].default) for k in SWAP_FIELDS}
            layers = spec.pop("layers", schema["layers"].default)
            unknown = set(spec) - set(divergence.params)
            if unknown:
                raise DistilleryError(f"objective 'iit' has no parameter(s) {sorted(unknown)}")
            seen[kind] = seen.get(kind, 0) + 1
            name = kind if seen[kind] == 1 else f"{kind}_{seen[kind]}"
            terms.append(Term(name, divergence, weight, spec, layers=layers, interchange=swap))
            continue
        objective = get_objective(kind)
        routing = {k: spec.pop(k) for k in ROUTING if k in spec}
        allowed = {
            "logits": (),
            "states": ("layers", "projection"),
            "attentions": ("layers", "heads"),
        }
        misplaced = sorted(set(routing) - set(allowed[objective.reads]))
        if misplaced:
            raise DistilleryError(f"objective {kind!r} has no parameter(s) {misplaced}")
        unknown = set(spec) - set(objective.params)
        if unknown:
            raise DistilleryError(f"objective {kind!r} has no parameter(s) {sorted(unknown)}")
        seen[kind] = seen.get(kind, 0) + 1
        name = kind if seen[kind] == 1 else f"{kind}_{seen[kind]}"
        terms.append(Term(name, objective, weight, spec, **routing))
    return terms


def resolve(terms: list[Term], student: nn.Module, teacher: TeacherSignal) -> nn.ModuleDict:
    """Set each representation term's layer pairs from both models' depths, check heads and
    attention settings, and return the learned projections (student width → teacher width)
    that the terms whose widths differ (or that ask for one) train with the student."""
    projections = nn.ModuleDict()
    if not teacher.has_internals:
        names = [t.name for t in terms if t.reads != "logits"]
        raise DistilleryError(f"objectives {names} need a single teacher, not an ensemble")
    s_cfg, t_cfg = student.config, teacher.config
    for term in terms:
        reads = term.reads
        if reads == "logits":
            continue
        if reads == "interchange":
            if not isinstance(getattr(teacher, "model", None), nn.Module):
                raise DistilleryError(
                    f"{term.name}: interchange interventions run the teacher model itself; "
                    "give one live teacher (no teacher cache, ensemble or MC dropout)"
                )
            assert term.layers is not None
            term.pairs = layer_pairs(
                term.layers,
                num_layers(student),
                num_layers(teacher.model),  # type: ignore[attr-defined]
            )
            continue
        term.pairs = layer_pairs(
            term.layers or term.objective.default_layers,  # type: ignore[arg-type]
            s_cfg.num_hidden_layers,
            t_cfg.num_hidden_layers,
            attention=reads == "attentions",
        )
        if reads == "attentions":
            check_heads(s_cfg.num_attention_heads, t_cfg.num_attention_heads, term.heads)
            if getattr(s_cfg, "attention_dropout", 0.0):
                raise DistilleryError(
                    f"{term.name}: the student drops out attention weights "
                    f"(attention_dropout={s_cfg.attention_dropout}), so its maps are not "
                    "distributions; set model.overrides.attention_dropout=0"
                )
            use_eager_attention(student)  # type: ignore[arg-type]
        elif term.projection == "linear" or s_cfg.hidden_size != t_cfg.hidden_size:
            projections[term.name] = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size, bias=False)
    return projections
