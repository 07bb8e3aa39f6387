"""The schemas of a run's objectives (built from the registered functions) and of its teacher
signal (one discriminated union)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    create_model,
    model_validator,
)

from distillery.config.loader import Strict
from distillery.objectives import get_objective
from distillery.objectives.registry import Temperature

# Layer maps: "uniform" (student block i ↔ teacher block round(i·L_t/L_s)), "last",
# "embeddings" (the embedding outputs; hidden states only) or explicit [student, teacher] pairs
# (0 = embeddings, i = block i).
LayerMap = Literal["uniform", "last", "embeddings"] | list[tuple[int, int]]
Weight = Annotated[float, Field(ge=0.0)]

# What each kind of objective adds to its parameters: which layers, and how they are compared.
_ROUTING: dict[str, dict[str, Any]] = {
    "logits": {},
    "states": {"projection": (Literal["auto", "linear"], "auto")},  # auto: if widths differ
    "attentions": {"heads": (Literal["auto", "average", "map"], "auto")},  # if counts differ
}


def objective_schema(name: str, class_name: str) -> type[Strict]:
    """The config schema of a registered objective, built from the function itself: ``kind``,
    ``weight``, the routing fields of its kind, and its keyword-only parameters with their
    defaults and bounds — so the schema and the function agree by construction."""
    objective = get_objective(name)
    fields: dict[str, Any] = {"kind": (Literal[name], name), "weight": (Weight, 1.0)}
    if objective.default_layers is not None:
        fields["layers"] = (LayerMap, objective.default_layers)
    fields |= _ROUTING[objective.reads] | objective.param_specs
    doc = (objective.fn.__doc__ or name).strip().splitlines()[0]
    return create_model(class_name, __base__=Strict, __doc__=doc, **fields)


CrossEntropyObjective = objective_schema("ce", "CrossEntropyObjective")
HardLabelsObjective = objective_schema("hard_labels", "HardLabelsObjective")
ForwardKLObjective = objective_schema("forward_kl", "ForwardKLObjective")
ReverseKLObjective = objective_schema("reverse_kl", "ReverseKLObjective")
JSDObjective = objective_schema("jsd", "JSDObjective")
TVDObjective = objective_schema("tvd", "TVDObjective")
SkewKLObjective = objective_schema("skew_kl", "SkewKLObjective")
SkewReverseKLObjective = objective_schema("skew_reverse_kl", "SkewReverseKLObjective")
HiddenCosineObjective = objective_schema("hidden_cosine", "HiddenCosineObjective")
HiddenMSEObjective = objective_schema("hidden_mse", "HiddenMSEObjective")
AttentionKLObjective = objective_schema("attention_kl", "AttentionKLObjective")
ULDObjective = objective_schema("uld", "ULDObjective")


class InterchangeObjective(Strict):
    """Interchange intervention training (Wu, Geiger et al. 2022): with probability
    ``probability`` a batch's rows are paired (base, source); for one aligned layer pair drawn
    from ``layers``, each model runs on the base with that layer's states at the sampled
    ``positions`` swapped in from its own run on the source, and the student's counterfactual
    output is pulled towards the teacher's by ``divergence`` at ``temperature``."""

    kind: Literal["iit"] = "iit"
    weight: Weight = 1.0
    layers: LayerMap = "uniform"  # the alignment: one pair is drawn per batch
    positions: Literal["all", "span", "fraction"] = "span"
    fraction: float = Field(0.5, gt=0.0, le=1.0)  # span length / share of positions swapped
    probability: float = Field(1.0, gt=0.0, le=1.0)  # share of batches that get interventions
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    temperature: Temperature = get_objective("forward_kl").param_specs["temperature"][1]


ObjectiveConfig = Annotated[
    CrossEntropyObjective  # type: ignore[valid-type]
    | HardLabelsObjective  # type: ignore[valid-type]
    | ForwardKLObjective  # type: ignore[valid-type]
    | ReverseKLObjective  # type: ignore[valid-type]
    | JSDObjective  # type: ignore[valid-type]
    | TVDObjective  # type: ignore[valid-type]
    | SkewKLObjective  # type: ignore[valid-type]
    | SkewReverseKLObjective  # type: ignore[valid-type]
    | HiddenCosineObjective  # type: ignore[valid-type]
    | HiddenMSEObjective  # type: ignore[valid-type]
    | AttentionKLObjective  # type: ignore[valid-type]
    | ULDObjective  # type: ignore[valid-type]
    | InterchangeObjective,
    Field(discriminator="kind"),
]


def needs_teacher(objective: Any) -> bool:
    """Whether a config entry reads the teacher (the registry answers; IIT always does)."""
    return objective.kind == "iit" or get_objective(objective.kind).needs_teacher


# A frozen teacher's forward: bf16 (fp16 on a GPU without bf16) by default where it is fast
# ("auto": CUDA, or a CPU with avx512_bf16/amx), else fp32; int8: dynamic quantisation of its
# linear layers (CPU). Its outputs reach the objectives in float32 whatever it ran in.
TeacherPrecision = Literal["auto", "bf16", "fp16", "fp32", "int8"]


class LiveTeacherSpec(Strict):
    """A frozen teacher folder run on every batch, or several sharing a tokenizer combined into
    one (an ensemble: ``combine`` = ``mean`` of their probabilities with ``weights``, or the
    most ``confident`` per position). The first folder also gives the tokenizer and the layers
    for ``model.init_from_teacher``.

    ``tokenizer: own``: one teacher that keeps its own tokenizer, different from the student's
    (the data is cut with the student's: ``model.path``, ``data.tokenizer`` or a BPE of
    ``data.vocab_size``); each batch is decoded to text, re-tokenized for the teacher and the
    two aligned where token boundaries coincide (``teachers.cross_tokenizer``); only objectives
    that compare different vocabularies (``uld``) and the student's own ``ce`` apply."""

    kind: Literal["live"] = "live"
    path: Path | list[Path]
    weights: list[Weight] | None = None  # one per folder (an ensemble)
    combine: Literal["mean", "confident"] = "mean"
    precision: TeacherPrecision = "auto"
    tokenizer: Literal["shared", "own"] = "shared"

    @model_validator(mode="after")
    def _one_weight_each(self) -> LiveTeacherSpec:
        if isinstance(self.path, list) and not self.path:
            raise ValueError("give a folder, or a list of at least one")
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ValueError(f"weights: give one weight per teacher ({len(self.paths)})")
        if self.tokenizer == "own" and len(self.paths) > 1:
            raise ValueError(
                "tokenizer: own is for one teacher; an ensemble's members must share a tokenizer"
            )
        return self

    @property
    def paths(self) -> list[Path]:
        return list(self.path) if isinstance(self.path, list) else [self.path]


class MCDropoutTeacherSpec(Strict):
    """One teacher folder under MC dropout: the mean of ``samples`` stochastic passes with its
    dropout on (costs ``samples`` forwards per batch)."""

    kind: Literal["mc_dropout"] = "mc_dropout"
    path: Path
    samples: int = Field(8, ge=2)
    precision: TeacherPrecision = "auto"

    @property
    def paths(self) -> list[Path]:
        return [self.path]


class CachedTeacherSpec(Strict):
    """The teacher's top-k read from ``cache`` (`distillery cache-teacher`) instead of running
    it while training; the folder ``path`` is still needed (tokenizer, init, final evaluation)."""

    kind: Literal["cache"] = "cache"
    path: Path
    cache: Path
    precision: TeacherPrecision = "auto"  # the live teacher of the final evaluation

    @property
    def paths(self) -> list[Path]:
        return [self.path]


TeacherSpec = Annotated[
    LiveTeacherSpec | MCDropoutTeacherSpec | CachedTeacherSpec, Field(discriminator="kind")
]
