"""Typed configs: YAML files plus ``key=value`` overrides, validated before anything is loaded.

Every problem in a config is gathered into one error line that names the fields, e.g.
``invalid config: train.lrr: unknown field; train.steps: must be > 0``.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillery.errors import DistilleryError


class Strict(BaseModel):
    """Base for every config section: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Where text comes from and how it becomes token blocks (``task: lm``) or labelled
    examples (``task: classify``: each text's first ``seq_len`` tokens and its label; from
    ``bbc-news`` the label is the topic)."""

    # lm: next tokens (decoders); mlm: masked tokens (encoders, BERT's dynamic masking);
    # classify: one label per text
    task: Literal["lm", "mlm", "classify"] = "lm"
    source: str = "bbc-news"  # "bbc-news", a text file or folder, a .jsonl or a .csv file
    text_field: str = "text"  # field of a JSONL object / column of a CSV file
    label_field: str = "label"  # classify: field / column holding the label
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    seq_len: int = Field(128, gt=1)
    vocab_size: int = Field(4096, ge=300)  # for a BPE trained on the training split
    tokenizer: Path | None = None  # a tokenizer folder; default: the teacher's, else train a BPE
    cache_dir: Path = Path(".distillery-cache")
    mask_probability: float = Field(0.15, gt=0.0, lt=1.0)  # mlm: share of tokens predicted


class GrowSpec(Strict):
    """Make the model deeper before training (``distillery.models.growth``): ``layers`` new
    blocks on ``top`` or ``interleave``d (identity-initialised unless ``identity: false``), or
    ``stack`` (StackBERT: the blocks copied on top of themselves)."""

    kind: Literal["top", "interleave", "stack"] = "top"
    layers: int | None = Field(None, gt=0)  # top/interleave; stack doubles the depth
    identity: bool = True

    @model_validator(mode="after")
    def _layers_given(self) -> GrowSpec:
        if (self.kind == "stack") != (self.layers is None):
            raise ValueError("give 'layers' to grow on top or interleave, and not to stack")
        return self


class ModelSpec(Strict):
    """A model: a built-in preset (plus config overrides) or an HF folder (default: ``mini``)."""

    preset: str | None = None
    path: Path | None = None
    overrides: dict[str, int | float | str | bool] = Field(default_factory=dict)
    # Initialise from the teacher's layers: "every_other" (DistilBERT) or explicit indices.
    init_from_teacher: Literal["every_other"] | list[int] | None = None
    grow: GrowSpec | None = None  # applied after loading / initialising, before training
    # Residual dropout (GPT-2's resid_pdrop) on every block's attention and MLP outputs, added
    # with hooks (``models.dropout``) and recorded in the saved config as ``residual_dropout``.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @property
    def preset_layers(self) -> int | None:
        """The depth of a preset model (its overrides included); None for a folder."""
        from distillery.models.presets import PRESETS

        if self.preset is None:
            return None
        default = PRESETS[self.preset]["num_hidden_layers"]
        return int(self.overrides.get("num_hidden_layers", default))

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        from distillery.models.presets import PRESETS

        if self.preset is not None and self.path is not None:
            raise ValueError("give one of 'preset' or 'path', not both")
        if self.preset is None and self.path is None:
            self.preset = "mini"
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        return self


class CrossEntropyObjective(Strict):
    """Task loss on the data's next tokens."""

    kind: Literal["ce"] = "ce"
    weight: float = Field(1.0, ge=0.0)


class HardLabelsObjective(Strict):
    """Cross-entropy towards the teacher's argmax token."""

    kind: Literal["hard_labels"] = "hard_labels"
    weight: float = Field(1.0, ge=0.0)


class ForwardKLObjective(Strict):
    """T²·KL(teacher ‖ student) on softened distributions."""

    kind: Literal["forward_kl"] = "forward_kl"
    weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)


class ReverseKLObjective(Strict):
    """T²·KL(student ‖ teacher) on softened distributions."""

    kind: Literal["reverse_kl"] = "reverse_kl"
    weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)


class JSDObjective(Strict):
    """Generalized JSD(β) (GKD): β=0 forward KL, β=1 reverse KL."""

    kind: Literal["jsd"] = "jsd"
    weight: float = Field(1.0, ge=0.0)
    beta: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)


class TVDObjective(Strict):
    """T²·total variation distance between softened distributions."""

    kind: Literal["tvd"] = "tvd"
    weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)


# Layer maps: "uniform" (student block i ↔ teacher block round(i·L_t/L_s)), "last",
# "embeddings" (the embedding outputs; hidden states only) or explicit [student, teacher] pairs
# (0 = embeddings, i = block i).
LayerMap = Literal["uniform", "last", "embeddings"] | list[tuple[int, int]]


class HiddenCosineObjective(Strict):
    """1 − cosine between mapped hidden states (DistilBERT), projected if widths differ."""

    kind: Literal["hidden_cosine"] = "hidden_cosine"
    weight: float = Field(1.0, ge=0.0)
    layers: LayerMap = "last"
    projection: Literal["auto", "linear"] = "auto"  # auto: a learned linear map if widths differ


class HiddenMSEObjective(Strict):
    """MSE between mapped hidden states (TinyBERT), through a learned projection if widths
    differ; ``layers: embeddings`` matches the embedding layers."""

    kind: Literal["hidden_mse"] = "hidden_mse"
    weight: float = Field(1.0, ge=0.0)
    layers: LayerMap = "last"
    projection: Literal["auto", "linear"] = "auto"


class AttentionKLObjective(Strict):
    """KL between the attention distributions of mapped layers, per head (needs eager
    attention, switched on automatically)."""

    kind: Literal["attention_kl"] = "attention_kl"
    weight: float = Field(1.0, ge=0.0)
    layers: LayerMap = "uniform"
    heads: Literal["auto", "average", "map"] = "auto"  # when head counts differ


class InterchangeObjective(Strict):
    """Interchange intervention training (Wu, Geiger et al. 2022): with probability
    ``probability`` a batch's rows are paired (base, source); for one aligned layer pair drawn
    from ``layers``, each model runs on the base with that layer's states at the sampled
    ``positions`` swapped in from its own run on the source, and the student's counterfactual
    output is pulled towards the teacher's by ``divergence`` at ``temperature``."""

    kind: Literal["iit"] = "iit"
    weight: float = Field(1.0, ge=0.0)
    layers: LayerMap = "uniform"  # the alignment: one pair is drawn per batch
    positions: Literal["all", "span", "fraction"] = "span"
    fraction: float = Field(0.5, gt=0.0, le=1.0)  # span length / share of positions swapped
    probability: float = Field(1.0, gt=0.0, le=1.0)  # share of batches that get interventions
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0.0)


ObjectiveConfig = Annotated[
    CrossEntropyObjective
    | HardLabelsObjective
    | ForwardKLObjective
    | ReverseKLObjective
    | JSDObjective
    | TVDObjective
    | HiddenCosineObjective
    | HiddenMSEObjective
    | AttentionKLObjective
    | InterchangeObjective,
    Field(discriminator="kind"),
]


REPRESENTATION_KINDS = ("hidden_cosine", "hidden_mse", "attention_kl", "iit")


class TrainConfig(Strict):
    """The engine's knobs. ``batch_size`` is the *global* batch in sequences per step."""

    steps: int = Field(200, gt=0)
    # Set: the run takes as many whole steps as this many FLOPs pay for (training plus teacher
    # forwards, as the meter counts them), replacing ``steps``; compare runs at equal compute.
    flops_budget: float | None = Field(None, gt=0.0)
    batch_size: int = Field(32, gt=0)
    micro_batch_size: int | None = Field(None, gt=0)  # per process; None = batch_size / world
    lr: float = Field(1e-3, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(20, ge=0)  # capped at steps
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[
        Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]
    ] = (
        0.9,
        0.95,
    )
    grad_clip: float | None = Field(1.0, gt=0.0)
    # > 0: logit losses computed this many positions at a time (bounded memory at big vocabularies)
    logit_chunk_size: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    seed: int = Field(0, ge=0)
    # Start this many global batches into the seed's data order (continue another run's stream).
    data_offset: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(100, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    eval_batches: int = Field(20, gt=0)
    tensorboard: bool = True


class RunConfig(Strict):
    """One run of the engine: ``train`` (no teacher) or ``distill`` (a teacher folder)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    # One teacher folder, or several sharing a tokenizer (an ensemble; the first one also
    # provides the tokenizer and the layers for init_from_teacher).
    teacher: Path | list[Path] | None = None
    teacher_weights: list[Annotated[float, Field(ge=0.0)]] | None = None  # one per teacher
    ensemble: Literal["mean", "confident"] = "mean"  # how several teachers are combined
    # MC dropout: the teacher is the mean of this many stochastic passes with its dropout on.
    teacher_mc_samples: int | None = Field(None, ge=2)
    # Read the teacher's top-k from this cache (`distillery cache-teacher`) instead of running
    # it while training; the teacher folder is still needed (tokenizer, init, final evaluation).
    teacher_cache: Path | None = None
    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [CrossEntropyObjective()], min_length=1
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    out: Path = Path("runs/run")

    @property
    def teacher_paths(self) -> list[Path]:
        """The teacher folders, in order (empty without a teacher)."""
        if self.teacher is None:
            return []
        return list(self.teacher) if isinstance(self.teacher, list) else [self.teacher]

    @model_validator(mode="after")
    def _teacher_needed(self) -> RunConfig:
        if isinstance(self.teacher, list) and not self.teacher:
            raise ValueError("teacher: give a folder, or a list of at least one")
        if self.teacher_weights is not None and len(self.teacher_weights) != len(
            self.teacher_paths
        ):
            raise ValueError(
                f"teacher_weights: give one weight per teacher ({len(self.teacher_paths)})"
            )
        needs = [o.kind for o in self.objectives if o.kind != "ce"]
        if needs and self.teacher is None:
            raise ValueError(f"objectives {needs} need a teacher: set 'teacher' (--teacher DIR)")
        if self.teacher_cache is not None and len(self.teacher_paths) != 1:
            raise ValueError("teacher_cache: give the one teacher the cache was made from")
        if self.model.init_from_teacher is not None and self.teacher is None:
            raise ValueError("model.init_from_teacher needs a teacher: set 'teacher'")
        if self.teacher_mc_samples is not None and len(self.teacher_paths) != 1:
            raise ValueError("teacher_mc_samples: MC dropout needs exactly one teacher folder")
        task = self.data.task
        if task != "lm":
            causal_only = [o.kind for o in self.objectives if o.kind in ("attention_kl", "iit")]
            if causal_only:
                raise ValueError(
                    f"objectives {causal_only} are for causal language models (data.task: lm); "
                    f"with data.task: {task} use logits and hidden_cosine/hidden_mse"
                )
            if self.teacher_cache is not None or self.train.logit_chunk_size:
                raise ValueError(
                    "teacher_cache and train.logit_chunk_size are for causal language models "
                    "(data.task: lm)"
                )
        preset = self.model.preset
        if preset is not None and self.model.path is None:
            from distillery.models.presets import is_encoder

            if task == "mlm" and not is_encoder(preset):
                raise ValueError(f"model.preset={preset}: masked-LM runs need a bert-* preset")
            if task == "lm" and is_encoder(preset):
                raise ValueError(
                    f"model.preset={preset} is an encoder: use data.task=mlm or classify"
                )
        return self


class CacheTeacherConfig(Strict):
    """``distillery cache-teacher``: the teacher's top-k over the training blocks, on disk."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: Path
    top_k: int = Field(64, gt=0)
    temperature: float = Field(2.0, gt=0.0)  # must equal the soft objectives' temperature
    batch_size: int = Field(16, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: Path = Path("runs/teacher-cache")


class TeacherStudentRecipe(Strict):
    """What recipes that train their own teacher and then half-depth students share."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelSpec = Field(default_factory=ModelSpec)
    teacher_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=240, lr=2e-3, warmup_steps=20)
    )
    student_layers: int = Field(2, gt=0)  # initialised from every other teacher layer
    student_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=100, lr=2e-3, warmup_steps=10)
    )

    @property
    def teacher_layers(self) -> int:
        """The depth of the teacher the recipe trains (from a preset, checked below)."""
        return self.teacher.preset_layers or 0

    @model_validator(mode="after")
    def _student_fits_teacher(self) -> TeacherStudentRecipe:
        recipe = type(self).__name__.removesuffix("Config").lower()
        teacher = self.teacher
        if teacher.path is not None or teacher.init_from_teacher is not None:
            raise ValueError(f"teacher: {recipe} trains its teacher from a preset (teacher.preset)")
        layers = self.teacher_layers
        if 2 * self.student_layers - 1 > layers:
            raise ValueError(
                f"student_layers={self.student_layers} needs a teacher with at least "
                f"{2 * self.student_layers - 1} layers (every other layer); it has {layers}"
            )
        return self


class QuickstartConfig(TeacherStudentRecipe):
    """The main job: train a teacher, distil a half-depth student, train it from scratch too."""

    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [CrossEntropyObjective(weight=1.0), ForwardKLObjective(weight=1.0)]
    )
    out: Path = Path("runs/quickstart")


class AblationArm(Strict):
    """One arm of an ablation: the full objective mix minus ``drop``, with or without the
    student initialised from the teacher's layers."""

    drop: list[str] = Field(default_factory=list)  # objective kinds left out
    init_from_teacher: bool = True


def _distilbert_mix() -> list[Any]:
    """DistilBERT's triple loss with its weights: soft targets 5 (T=2), task 2, cosine 1."""
    return [
        ForwardKLObjective(weight=5.0, temperature=2.0),
        CrossEntropyObjective(weight=2.0),
        HiddenCosineObjective(weight=1.0, layers="last"),
    ]


def _distilbert_arms() -> dict[str, AblationArm]:
    return {
        "full": AblationArm(),
        "no-soft-kl": AblationArm(drop=["forward_kl"]),
        "no-cosine": AblationArm(drop=["hidden_cosine"]),
        "no-task-ce": AblationArm(drop=["ce"]),
        "random-init": AblationArm(init_from_teacher=False),
    }


class SeededStudy(Strict):
    """What a recipe repeated over seeds adds: the seeds, and a folder for its table."""

    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1
    )
    results: Path | None = None  # also write the table and its JSON here

    @model_validator(mode="after")
    def _distinct_seeds(self) -> SeededStudy:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: give each seed once")
        return self


class AblationConfig(TeacherStudentRecipe, SeededStudy):
    """``distillery ablate``: one teacher, then the same student distilled with the full mix
    and with each part removed, over several seeds."""

    objectives: list[ObjectiveConfig] = Field(default_factory=_distilbert_mix, min_length=1)
    arms: dict[str, AblationArm] = Field(default_factory=_distilbert_arms, min_length=1)
    out: Path = Path("runs/ablation")

    @model_validator(mode="after")
    def _arms_make_sense(self) -> AblationConfig:
        kinds = [o.kind for o in self.objectives]
        if len(set(kinds)) != len(kinds):
            raise ValueError("objectives: each kind once (arms drop objectives by kind)")
        for name, arm in self.arms.items():
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"arms: name {name!r} must be letters, digits, '-' or '_'")
            unknown = sorted(set(arm.drop) - set(kinds))
            if unknown:
                raise ValueError(f"arms.{name}.drop: {unknown} not among the objectives {kinds}")
            if set(kinds) <= set(arm.drop):
                raise ValueError(f"arms.{name}: drops every objective")
        return self


class MultiTeacherMode(Strict):
    """Several teachers (trained with seeds ``teacher_train.seed + i``) distilled together into
    one student, against the student distilled from the first teacher alone at equal FLOPs."""

    kind: Literal["multi-teacher"] = "multi-teacher"
    teachers: int = Field(3, ge=2)
    weights: list[Annotated[float, Field(ge=0.0)]] | None = None  # one per teacher
    ensemble: Literal["mean", "confident"] = "mean"

    @model_validator(mode="after")
    def _one_weight_each(self) -> MultiTeacherMode:
        if self.weights is not None and len(self.weights) != self.teachers:
            raise ValueError(f"weights: give one weight per teacher ({self.teachers})")
        return self


class SelfDistillMode(Strict):
    """Born-again networks: generation k (the teacher's architecture, random init) learns from
    generation k−1, generation 0 being the teacher; against the teacher's architecture trained
    plainly with the FLOPs of the whole chain."""

    kind: Literal["self-distill"] = "self-distill"
    generations: int = Field(2, ge=1)


class RoundsMode(Strict):
    """Teacher assistants: teacher → assistants → student, each round initialised from every
    other layer of the previous model and distilled from it; against teacher → student
    directly with the FLOPs of all rounds."""

    kind: Literal["rounds"] = "rounds"
    assistants: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [4], min_length=1)


class TwoStepMode(Strict):
    """Step 1: the student trained on the data with the task loss (``first_fraction`` of
    ``student_train.steps``); step 2: fine-tuned on the teacher's soft targets; against the
    ``objectives`` mix from the start, at equal FLOPs."""

    kind: Literal["two-step"] = "two-step"
    first_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    finetune_objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [ForwardKLObjective(weight=1.0, temperature=2.0)], min_length=1
    )


ModeConfig = Annotated[
    MultiTeacherMode | SelfDistillMode | RoundsMode | TwoStepMode, Field(discriminator="kind")
]
MODES = ("multi-teacher", "self-distill", "rounds", "two-step")


class ModesConfig(TeacherStudentRecipe, SeededStudy):
    """``distillery mode NAME``: one distillation mode against plain distillation at equal
    compute, over several seeds (the teacher is trained once and shared by every seed)."""

    mode: ModeConfig = Field(default_factory=SelfDistillMode)
    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [CrossEntropyObjective(weight=1.0), ForwardKLObjective(weight=1.0)],
        min_length=1,
    )
    out: Path = Path("runs/modes")

    @model_validator(mode="after")
    def _mode_fits(self) -> ModesConfig:
        if not any(o.kind != "ce" for o in self.objectives):
            raise ValueError("objectives: give at least one teacher objective (e.g. forward_kl)")
        if isinstance(self.mode, RoundsMode):
            sizes = [self.teacher_layers, *self.mode.assistants, self.student_layers]
            for big, small in itertools.pairwise(sizes):
                if not big > small or 2 * small - 1 > big:
                    raise ValueError(
                        f"mode.assistants: each round must shrink the model and keep every "
                        f"other layer ({big} → {small} layers cannot); sizes {sizes}"
                    )
        return self


class ExchangeSpec(Strict):
    """How codistilling peers teach each other (Anil et al. 2018).

    ``predictions``: every ``every`` steps all peers train on one shared batch, after
    exchanging their top-``top_k`` next-token distributions on it (an all-gather: peers wait for
    each other); ``checkpoints``: every ``every`` steps each peer publishes its weights, and the
    others compute targets on their own batches with the freshest copy they have (no waiting;
    staleness is measured); ``none``: each peer trains alone (the baseline). No distillation
    term for the first ``burn_in`` steps.
    """

    mode: Literal["predictions", "checkpoints", "none"] = "checkpoints"
    every: int = Field(50, gt=0)
    top_k: int = Field(32, gt=0)
    burn_in: int = Field(0, ge=0)
    target: Literal["mean", "each"] = "mean"  # mean of the peers' distributions, or per peer
    weight: float = Field(1.0, ge=0.0)  # of the distillation term (the task loss has 1)
    temperature: float = Field(1.0, gt=0.0)
    wait_seconds: float = Field(300.0, gt=0.0)  # predictions: give up on a missing peer after


class CodistillConfig(Strict):
    """``distillery codistill``: one peer per process (torchrun rank, or ``--peer``), each
    training its own model on its own shard of the training blocks, teaching each other."""

    data: DataConfig = Field(default_factory=DataConfig)
    peers: list[ModelSpec] = Field(min_length=2)  # one model per peer (sizes may differ)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(checkpoint_every=50))
    exchange: ExchangeSpec = Field(default_factory=ExchangeSpec)
    out: Path = Path("runs/codistill")

    @model_validator(mode="after")
    def _peers_from_presets(self) -> CodistillConfig:
        for i, peer in enumerate(self.peers):
            if peer.path is not None or peer.init_from_teacher or peer.grow:
                raise ValueError(f"peers.{i}: codistilling peers are built from presets")
        if self.data.task != "lm":
            raise ValueError("data.task: codistillation is for language models (task: lm)")
        return self


CODISTILL_ARMS = ("predictions", "checkpoints", "unequal")


class CodistillStudyConfig(SeededStudy):
    """``distillery experiment codistill``: two-peer pools against each peer trained alone
    (``recipes/codistill_study``): ``predictions`` and ``checkpoints`` exchange between equal
    peers, and ``unequal`` (``model`` with ``small``, checkpoints)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    small: ModelSpec = Field(
        default_factory=lambda: ModelSpec(preset="mini", overrides={"num_hidden_layers": 2})
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(checkpoint_every=0, eval_every=25, eval_batches=1000)
    )
    exchange: ExchangeSpec = Field(default_factory=ExchangeSpec)  # its mode is set per arm
    prediction_every: int = Field(1, gt=0)  # exchange.every for the predictions arm
    arms: list[Literal["predictions", "checkpoints", "unequal"]] = Field(
        default_factory=lambda: list(CODISTILL_ARMS), min_length=1
    )
    out: Path = Path("runs/codistill-study")

    @model_validator(mode="after")
    def _evaluated(self) -> CodistillStudyConfig:
        if not self.train.eval_every:
            raise ValueError("train.eval_every: the study needs validation curves (set it > 0)")
        return self


class IITStudyConfig(TeacherStudentRecipe, SeededStudy):
    """``distillery experiment iit``: the same student distilled with ``objectives`` and with
    ``objectives`` + ``iit``, at equal FLOPs (and, for reference, at equal steps), over seeds."""

    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [CrossEntropyObjective(weight=1.0), ForwardKLObjective(weight=1.0)],
        min_length=1,
    )
    iit: InterchangeObjective = Field(default_factory=InterchangeObjective)
    eval_batches: int | None = Field(None, gt=0)  # held-out batches for interchange agreement
    out: Path = Path("runs/iit")

    @model_validator(mode="after")
    def _no_iit_twice(self) -> IITStudyConfig:
        if any(o.kind == "iit" for o in self.objectives):
            raise ValueError("objectives: the iit term is set apart in 'iit', not in objectives")
        return self


def _classify_data() -> DataConfig:
    return DataConfig(task="classify", val_fraction=0.1, test_fraction=0.1)


class ClassifiersConfig(SeededStudy):
    """``distillery experiment classifiers``: DistilBERT's recipe and a retained-performance
    table (see ``recipes/classifiers``). The teacher is pretrained by the lab on the texts of
    ``data`` (masked LM for a ``bert-*`` preset, next tokens for a decoder) or read from
    ``teacher.path`` (a pretrained masked/causal LM folder), then fine-tuned on the labels; the
    student (``student_layers`` deep, the teacher's width) is pretrained with and without the
    teacher, then fine-tuned with and without task distillation; accuracy and macro-F1 on the
    test split."""

    data: DataConfig = Field(default_factory=_classify_data)  # the labelled texts
    teacher: ModelSpec = Field(default_factory=lambda: ModelSpec(preset="bert-mini"))
    teacher_pretrain: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=600, lr=1e-3, warmup_steps=40)
    )
    teacher_finetune: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=100, lr=5e-4, warmup_steps=10)
    )
    student_layers: int = Field(2, gt=0)  # initialised from every other teacher layer
    # The student's architecture: default the teacher preset at ``student_layers``; needed
    # (a preset of the teacher's width) when the teacher is a folder.
    student: ModelSpec | None = None
    general_objectives: list[ObjectiveConfig] = Field(
        default_factory=_distilbert_mix, min_length=1
    )  # the student's pretraining with the teacher (DistilBERT's triple loss)
    general_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=300, lr=1e-3, warmup_steps=20)
    )
    task_objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [
            CrossEntropyObjective(weight=1.0),
            ForwardKLObjective(weight=1.0, temperature=2.0),
        ],
        min_length=1,
    )  # fine-tuning the distilled student with the fine-tuned teacher
    finetune: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=100, lr=5e-4, warmup_steps=10)
    )
    out: Path = Path("runs/classifiers")

    @model_validator(mode="after")
    def _shape(self) -> ClassifiersConfig:
        if self.data.task != "classify":
            raise ValueError("data.task: the labelled texts must be data.task=classify")
        if self.teacher.init_from_teacher is not None or self.teacher.grow is not None:
            raise ValueError("teacher: a preset or a pretrained folder, nothing else")
        if self.teacher.path is not None and self.student is None:
            raise ValueError("student: give the student's preset when the teacher is a folder")
        if self.student is not None and self.student.path is not None:
            raise ValueError("student: a preset (it is initialised from the teacher's layers)")
        layers = self.teacher.preset_layers
        if layers is not None and 2 * self.student_layers - 1 > layers:
            raise ValueError(
                f"student_layers={self.student_layers} needs a teacher with at least "
                f"{2 * self.student_layers - 1} layers (every other layer); it has {layers}"
            )
        for field in ("general_objectives", "task_objectives"):
            kinds = [o.kind for o in getattr(self, field)]
            if "attention_kl" in kinds or "iit" in kinds:
                raise ValueError(f"{field}: logits and hidden_cosine/hidden_mse only")
        return self


EXPAND_ARMS = ("baseline", "distill-expand", "shrink-expand", "stacking")


class CalibrateConfig(SeededStudy):
    """``distillery calibrate``: a single model, its temperature-scaled and MC-dropout versions,
    a deep ensemble, and students of the single model's size distilled from the ensemble and
    from MC dropout — calibration on the test split, over seeds (see ``recipes/calibrate``)."""

    name: str = Field("calibration", pattern=r"^[A-Za-z0-9_-]+$")  # file names of the results
    data: DataConfig = Field(
        default_factory=lambda: DataConfig(val_fraction=0.1, test_fraction=0.1)
    )
    # Every model's architecture; its dropout is what MC dropout samples (so it must be > 0).
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(preset="mini", dropout=0.1))
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=240, lr=2e-3, warmup_steps=20, checkpoint_every=0)
    )
    members: int = Field(3, ge=2)  # deep-ensemble size (members trained with different seeds)
    mc_samples: int = Field(8, ge=2)  # stochastic passes of MC dropout
    distill_objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [ForwardKLObjective(weight=1.0, temperature=1.0)], min_length=1
    )  # the students' objectives (towards the ensemble's / MC dropout's mean distribution)
    n_bins: int = Field(10, ge=2)  # equal-width ECE bins (equal-mass ECE is reported too)
    eval_batches: int | None = Field(None, gt=0)  # cap on test batches (None: the whole split)
    temperature_batches: int = Field(8, gt=0)  # validation batches the temperature is fitted on
    out: Path = Path("runs/calibrate")

    @model_validator(mode="after")
    def _samples_something(self) -> CalibrateConfig:
        if self.model.dropout <= 0:
            raise ValueError("model.dropout: MC dropout needs a model trained with dropout (> 0)")
        if self.model.path is not None or self.model.init_from_teacher or self.model.grow:
            raise ValueError("model: calibrate trains its models from a preset (model.preset)")
        if not self.data.test_fraction or not self.data.val_fraction:
            raise ValueError(
                "data: calibrate fits temperatures on the validation split and measures on the "
                "test split; give both val_fraction and test_fraction"
            )
        return self


class DistillExpandConfig(SeededStudy):
    """``distillery experiment distill-expand``: arms that all end in the 2n-layer ``model``,
    each spending the same FLOPs budget on the same data order (see ``recipes/distill_expand``)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)  # the 2n-layer model (a preset)
    budget_flops: float = Field(gt=0.0)  # B, per arm and seed
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(lr=2e-3, warmup_steps=10, checkpoint_every=0)
    )  # every phase's settings; ``steps`` is set by each phase's share of B
    distill_objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [CrossEntropyObjective(weight=1.0), ForwardKLObjective(weight=1.0)],
        min_length=1,
    )
    # (f_train, f_distill) points: 2n layers trained for f_train·B, distilled for f_distill·B.
    sweep: list[tuple[Annotated[float, Field(gt=0.0, lt=1.0)], Annotated[float, Field(gt=0.0)]]] = (
        Field(default_factory=lambda: [(0.25, 0.1), (0.5, 0.1)], min_length=1)
    )
    stack_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # stacking: n layers for this share of B
    # More learning rates for the baseline (a tuned baseline); the answer is against the best.
    baseline_lrs: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=list)
    arms: list[Literal["baseline", "distill-expand", "shrink-expand", "stacking"]] = Field(
        default_factory=lambda: list(EXPAND_ARMS), min_length=1
    )
    out: Path = Path("runs/distill-expand")

    @model_validator(mode="after")
    def _fits(self) -> DistillExpandConfig:
        layers = self.model.preset_layers
        if layers is None or self.model.init_from_teacher or self.model.grow:
            raise ValueError("model: give the 2n-layer model as a preset (with overrides)")
        if layers < 2 or layers % 2:
            raise ValueError(f"model: needs an even number of layers (2n), not {layers}")
        for f_train, f_distill in self.sweep:
            if f_train + f_distill >= 1.0:
                raise ValueError(
                    f"sweep: f_train + f_distill = {f_train + f_distill:g} leaves nothing to "
                    "train the grown model with; keep it below 1"
                )
        return self


C = TypeVar("C", bound=BaseModel)


def format_validation_error(err: ValidationError) -> str:
    """All problems of a pydantic error on one line, each naming its dotted field."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a","b","c"], YAML-parsed value)."""
    if "=" not in item:
        raise DistilleryError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise DistilleryError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def deep_merge(tree: dict[str, Any], update: dict[str, Any]) -> None:
    """Deep-merge ``update`` into ``tree`` (mappings merge, everything else replaces)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            deep_merge(tree[key], value)
        else:
            tree[key] = copy.deepcopy(value)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (safe_load), or one clear error."""
    if not path.is_file():
        raise DistilleryError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as exc:
        raise DistilleryError(f"config file {path} cannot be read as UTF-8 text ({exc})") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise DistilleryError(f"config file {path}{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DistilleryError(f"config file {path} must hold a mapping of fields")
    return data


def build_config(
    cls: type[C],
    path: Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> C:
    """Merge ``base`` ← YAML file ← overrides, then validate into ``cls``."""
    tree: dict[str, Any] = {}
    deep_merge(tree, base or {})
    if path is not None:
        deep_merge(tree, load_yaml(path))
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_path(tree, keys, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise DistilleryError(format_validation_error(err)) from None


def config_to_yaml(cfg: BaseModel) -> str:
    """The config as YAML, paths as strings, so a run folder records what it ran."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
