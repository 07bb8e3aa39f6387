"""The schemas of one run of the engine: data, model, training knobs, teacher, objectives; and
of the commands that run it (``cache-teacher``, ``codistill``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from distillery.config.loader import Strict
from distillery.config.terms import (
    CachedTeacherSpec,
    CrossEntropyObjective,
    ObjectiveConfig,
    TeacherPrecision,
    TeacherSpec,
    needs_teacher,
)

# Bounds checked before anything is allocated (a vocabulary of 1e9 words would abort the
# process, a batch of 2**40 exhaust memory): generous for real runs, refusing absurd ones.
MAX_VOCAB = 1 << 21  # 2,097,152 words (Gemma 3 has 262,144)
MAX_SIZE = 1 << 20  # sequence length, batch, micro-batch, chunk
MAX_STEPS = 10**9


class DataConfig(Strict):
    """Where text comes from and how it becomes token blocks (``task: lm``) or labelled
    examples (``task: classify``: each text's first ``seq_len`` tokens and its label; from
    ``bbc-news`` the label is the topic)."""

    # lm: next tokens (decoders); mlm: masked tokens (encoders, BERT's dynamic masking);
    # classify: one label per text; prompts: prompt + completion rows, loss on the completion
    # (``data.prompts``: bbc-news headline + first sentence → the article's continuation, or a
    # .jsonl of prompt/completion or chat messages)
    task: Literal["lm", "mlm", "classify", "prompts"] = "lm"
    source: str = "bbc-news"  # "bbc-news", a text file or folder, a .jsonl or a .csv file
    text_field: str = "text"  # field of a JSONL object / column of a CSV file
    label_field: str = "label"  # classify: field / column holding the label
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    # Documents held out of the training split into a ``transfer`` split (by the same hash, so
    # val and test do not change): e.g. the set students are distilled on, which the teachers
    # never trained on. ``train_split`` is the split a run trains on.
    transfer_fraction: float = Field(0.0, ge=0.0, lt=0.5)
    train_split: Literal["train", "transfer"] = "train"
    seq_len: int = Field(128, gt=1, le=MAX_SIZE)
    vocab_size: int = Field(4096, ge=300, le=MAX_VOCAB)  # for a BPE trained on the training split
    tokenizer: Path | None = None  # a tokenizer folder; default: the teacher's, else train a BPE
    cache_dir: Path = Path(".distillery-cache")
    mask_probability: float = Field(0.15, gt=0.0, lt=1.0)  # mlm: share of tokens predicted
    # prompts: the JSONL fields, and the most prompt tokens a row keeps (None: seq_len // 2)
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"  # chat: [{role, content}, ...], the last the assistant's
    prompt_tokens: int | None = Field(None, gt=0, le=MAX_SIZE)
    completion_chars: int = Field(600, gt=0)  # bbc-news: the reference continuation's length

    @model_validator(mode="after")
    def _transfer_split(self) -> DataConfig:
        if self.train_split == "transfer" and self.transfer_fraction == 0:
            raise ValueError("train_split=transfer needs transfer_fraction > 0")
        if self.transfer_fraction > 0 and self.task == "prompts":
            raise ValueError("transfer_fraction: prompt data has no transfer split")
        if self.val_fraction + self.test_fraction + self.transfer_fraction >= 1:
            raise ValueError("val_fraction + test_fraction + transfer_fraction must be below 1")
        return self


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


class TrainConfig(Strict):
    """The engine's knobs. ``batch_size`` is the *global* batch in sequences per step."""

    steps: int = Field(200, gt=0, le=MAX_STEPS)
    # Set: the run takes as many whole steps as this many FLOPs pay for (training plus teacher
    # forwards, as the meter counts them), replacing ``steps``; compare runs at equal compute.
    flops_budget: float | None = Field(None, gt=0.0)
    batch_size: int = Field(32, gt=0, le=MAX_SIZE)
    micro_batch_size: int | None = Field(
        None, gt=0, le=MAX_SIZE
    )  # per process; None = batch_size / world
    lr: float = Field(1e-3, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(20, ge=0, le=MAX_STEPS)  # capped at steps
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[
        Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]
    ] = (
        0.9,
        0.95,
    )
    grad_clip: float | None = Field(1.0, gt=0.0)
    # > 0: logit losses computed this many positions at a time (bounded memory at big vocabularies)
    # auto: as many positions as the logits budget holds (models.heads.CHUNK_LOGITS numbers)
    logit_chunk_size: Annotated[int, Field(ge=0, le=MAX_SIZE)] | Literal["auto"] = 0
    # The chunked path's logit matmuls: auto = the hidden states' dtype (bf16 under autocast);
    # bf16 on fp32 hidden states: fp32 accumulation and softmax statistics, ~3e-3 relative
    # error in the gradient (benchmarks/kd_loss.py); compile_loss: torch.compile fuses the
    # objectives' passes over each chunk (compiled once, on the first step).
    logit_matmul: Literal["auto", "fp32", "bf16"] = "auto"
    compile_loss: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    # Under torchrun: ddp replicates the model on every process; fsdp shards it (FSDP2: each
    # block and the root), for a student or teacher that does not fit one device.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    seed: int = Field(0, ge=0, lt=2**63)
    # Start this many global batches into the seed's data order (continue another run's stream).
    data_offset: int = Field(0, ge=0, le=MAX_STEPS)
    # Set (start, end): this run is that slice (fractions) of one longer schedule, whose warmup
    # and cosine decay it follows, so a later phase of a longer run does not warm up again.
    schedule_slice: (
        tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]]
        | None
    ) = None
    # AdamW's moments: written at the end (``optimizer-moments.safetensors`` in the run folder)
    # and read at the start from such a run folder, each parameter taking those of the one it
    # was made from (the same name, the teacher layer it was copied from; grown blocks start
    # afresh: ``engine.moments``), instead of zero moments. Not with parallel=fsdp.
    save_moments: bool = False
    moments_from: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(100, ge=0, le=MAX_STEPS)  # 0: only at the end
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    log_every: int = Field(10, gt=0, le=MAX_STEPS)
    eval_every: int = Field(0, ge=0, le=MAX_STEPS)  # 0: only at the end
    eval_batches: int = Field(20, gt=0, le=MAX_STEPS)
    # The final report: new tokens timed for generate tokens/s, and validation prompts on which
    # the student drafts for the teacher (acceptance lengths); 0 skips either.
    generation_tokens: int = Field(64, ge=0, le=MAX_SIZE)
    draft_prompts: int = Field(16, ge=0, le=MAX_SIZE)
    tensorboard: bool = True

    @model_validator(mode="after")
    def _fsdp_not_compiled(self) -> TrainConfig:
        if self.parallel == "fsdp" and self.compile:
            raise ValueError("train.parallel=fsdp does not combine with train.compile yet")
        if self.parallel == "fsdp" and (self.save_moments or self.moments_from is not None):
            raise ValueError("train.save_moments / moments_from do not combine with parallel=fsdp")
        if self.schedule_slice is not None and self.schedule_slice[0] >= self.schedule_slice[1]:
            raise ValueError(
                f"train.schedule_slice={list(self.schedule_slice)}: give (start, end) with "
                "start < end"
            )
        return self


class OnPolicySpec(Strict):
    """On-policy distillation (GKD, Agarwal et al. 2024; ``data.task: prompts``): each global
    batch, with probability ``fraction`` (λ; drawn from (seed, step)), the completions are
    sampled from the current student (each row seeded by (seed, step, row)) and the teacher
    scores them; otherwise the data's completions are used. λ = 0 is supervised KD."""

    fraction: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(1.0, ge=0.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, gt=0, le=MAX_SIZE)  # also capped by the row's room


class RunConfig(Strict):
    """One run of the engine: ``train`` (no teacher) or ``distill`` (a teacher folder)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSpec = Field(default_factory=ModelSpec)
    # The teacher signal (one field, see ``TeacherSpec``); a folder or a list of folders
    # given alone is a live teacher (``{kind: live, path: ...}``).
    teacher: TeacherSpec | None = None
    objectives: list[ObjectiveConfig] = Field(
        default_factory=lambda: [CrossEntropyObjective()], min_length=1
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    on_policy: OnPolicySpec | None = None  # data.task: prompts
    out: Path = Path("runs/run")

    @field_validator("teacher", mode="before")
    @classmethod
    def _folders_are_live(cls, value: Any) -> Any:
        if isinstance(value, str | Path | list):
            return {"kind": "live", "path": value}
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": "live", **value}
        return value

    @property
    def teacher_paths(self) -> list[Path]:
        """The teacher folders, in order (empty without a teacher)."""
        return [] if self.teacher is None else self.teacher.paths

    @model_validator(mode="after")
    def _teacher_needed(self) -> RunConfig:
        needs = [o.kind for o in self.objectives if needs_teacher(o)]
        if needs and self.teacher is None:
            raise ValueError(f"objectives {needs} need a teacher: set 'teacher' (--teacher DIR)")
        if self.model.init_from_teacher is not None and self.teacher is None:
            raise ValueError("model.init_from_teacher needs a teacher: set 'teacher'")
        if self.train.parallel == "fsdp" and any(o.kind == "iit" for o in self.objectives):
            raise ValueError("the iit objective does not run sharded: use train.parallel=ddp")
        task = self.data.task
        self._check_on_policy()
        if task == "prompts" and isinstance(self.teacher, CachedTeacherSpec):
            raise ValueError("a teacher cache is for token blocks (data.task: lm), not prompts")
        if task not in ("lm", "prompts"):
            causal_only = [o.kind for o in self.objectives if o.kind in ("attention_kl", "iit")]
            if causal_only:
                raise ValueError(
                    f"objectives {causal_only} are for causal language models (data.task: lm); "
                    f"with data.task: {task} use logits and hidden_cosine/hidden_mse"
                )
            if isinstance(self.teacher, CachedTeacherSpec) or self.train.logit_chunk_size:
                raise ValueError(
                    "a teacher cache and train.logit_chunk_size are for causal language models "
                    "(data.task: lm)"
                )
        preset = self.model.preset
        if preset is not None and self.model.path is None:
            from distillery.models.presets import is_encoder

            if task == "mlm" and not is_encoder(preset):
                raise ValueError(f"model.preset={preset}: masked-LM runs need a bert-* preset")
            if task in ("lm", "prompts") and is_encoder(preset):
                raise ValueError(
                    f"model.preset={preset} is an encoder: use data.task=mlm or classify"
                )
        return self

    def _check_on_policy(self) -> None:
        if self.on_policy is None:
            return
        if self.data.task != "prompts":
            raise ValueError("on_policy samples completions: it needs data.task: prompts")
        if not any(needs_teacher(o) for o in self.objectives):
            raise ValueError("on_policy: give an objective that reads the teacher (e.g. jsd)")
        if self.train.parallel == "fsdp":
            raise ValueError("on_policy does not sample from a sharded student: use ddp")


class CacheTeacherConfig(Strict):
    """``distillery cache-teacher``: the teacher's top-k over the training blocks, on disk."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: Path
    top_k: int = Field(64, gt=0)
    temperature: float = Field(2.0, gt=0.0)  # must equal the soft objectives' temperature
    batch_size: int = Field(16, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: TeacherPrecision = "auto"  # the teacher's forward (teachers.factory.lean_teacher)
    # compact: 8-bit log-probabilities (≈ k·(1 + log2(V/k)/8) bytes a position); exact: float32
    codec: Literal["compact", "exact"] = "compact"
    out: Path = Path("runs/teacher-cache")


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
    # Seconds each peer sleeps before every step (one per peer; empty: none): a slowed worker,
    # whose sleep counts in its wall-clock (the engine's logged tokens/s).
    delays: list[Annotated[float, Field(ge=0.0)]] = Field(default_factory=list)
    out: Path = Path("runs/codistill")

    @model_validator(mode="after")
    def _peers_from_presets(self) -> CodistillConfig:
        for i, peer in enumerate(self.peers):
            if peer.path is not None or peer.init_from_teacher or peer.grow:
                raise ValueError(f"peers.{i}: codistilling peers are built from presets")
        if self.data.task != "lm":
            raise ValueError("data.task: codistillation is for language models (task: lm)")
        if self.delays and len(self.delays) != len(self.peers):
            raise ValueError(
                f"delays: give one per peer ({len(self.peers)} peers, {len(self.delays)} delays)"
            )
        every = self.exchange.every
        if self.exchange.mode == "predictions" and self.train.checkpoint_every % every:
            raise ValueError(
                f"train.checkpoint_every ({self.train.checkpoint_every}) must be a multiple of "
                f"exchange.every ({every}) so that peers can restart together"
            )
        if self.train.parallel == "fsdp":
            raise ValueError("train.parallel=fsdp: each codistilling peer trains its own model")
        if self.train.flops_budget is not None:
            raise ValueError(
                "train.flops_budget: a peer's FLOPs per step change with the exchange, so "
                "codistillation runs a number of steps; set train.steps instead"
            )
        return self
