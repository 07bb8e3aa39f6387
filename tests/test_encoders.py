"""Encoders: BERT's dynamic masking, masked-LM distillation, encoder classifiers, the
retained-performance experiment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distillery.config import RunConfig
from distillery.data import IGNORE_INDEX, encode_labelled, mask_tokens
from distillery.errors import DistilleryError
from distillery.models import build_model, every_other, init_from_teacher
from distillery.models.loading import mask_padding
from distillery.recipes.classifiers import ClassifiersConfig
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import LiveTeacher
from tests.conftest import run_cli

SPECIALS = (0, 1)  # e.g. eos and pad: never chosen
MASK, VOCAB = 2, 50


def _masks(ids: torch.Tensor, rows: np.ndarray, draw: int = 0, seed: int = 0) -> tuple:
    return mask_tokens(
        ids, rows, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, probability=0.15,
        seed=seed, draw=draw,
    )  # fmt: skip


def test_masking_statistics_follow_bert():
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (400, 128))
    ids[:, ::16] = 0  # special tokens in every row
    inputs, labels = _masks(ids, np.arange(400))
    chosen = labels != IGNORE_INDEX
    special = ids == 0
    assert not chosen[special].any()  # specials are never predicted
    rate = chosen.sum().item() / (~special).sum().item()
    assert rate == pytest.approx(0.15, abs=0.005)  # 47,600 candidates: std ≈ 0.0016
    assert torch.equal(labels[chosen], ids[chosen])  # the target is the original token
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unchosen inputs are untouched
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.015)
    # 10% random tokens (which equal the original 1 time in VOCAB) + 10% kept as they were
    assert kept == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.012)
    assert 1.0 - masked - kept == pytest.approx(0.1 * (1 - 1 / VOCAB), abs=0.012)


def test_masks_are_dynamic_and_reproducible():
    ids = torch.randint(3, VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))
    rows = np.arange(100, 108)
    first, again = _masks(ids, rows, draw=5), _masks(ids, rows, draw=5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = _masks(ids, rows, draw=6)
    assert not torch.equal(first[1], other[1])  # a new step draws new masks
    # A row's masks depend on its identity, not on the batch it is in (micro-batches, ranks).
    alone = _masks(ids[3:5], rows[3:5], draw=5)
    assert torch.equal(alone[0], first[0][3:5]) and torch.equal(alone[1], first[1][3:5])


def _tiny_bert(vocab: int, layers: int, seed: int, **kw: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("bert-tiny", vocab, {"num_hidden_layers": layers, **kw}, task="mlm")


def test_mlm_distillation_counts_masked_positions_only():
    """The mix's soft-target KL and masked-LM CE equal a float64 reference over the masked
    positions alone; the hidden cosine is a mean over every token (DistilBERT's L_cos)."""
    vocab = 60
    student = _tiny_bert(vocab, 2, 0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = _tiny_bert(vocab, 4, 1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student.eval()
    teacher.eval()
    ids = torch.randint(3, vocab, (3, 47), generator=torch.Generator().manual_seed(2))
    inputs, labels = mask_tokens(
        ids, np.arange(3), mask_id=MASK, vocab_size=vocab, special_ids=SPECIALS,
        probability=0.2, seed=0,
    )  # fmt: skip
    objectives = [
        {"kind": "forward_kl", "weight": 5.0, "temperature": 2.0},
        {"kind": "ce", "weight": 2.0},
        {"kind": "hidden_cosine", "weight": 1.0, "layers": "last"},
    ]
    mix = DistillStep(
        terms_from_config(objectives), LiveTeacher(teacher), student=student, vocab=vocab,
        states_on="tokens", pad_token_id=1,
    )  # fmt: skip
    counts = mix.counts(inputs, labels)
    n_masked = int((labels != IGNORE_INDEX).sum())
    assert counts.tolist() == [n_masked, 3 * 47]
    _, sums = mix(student, inputs, labels, counts=counts)

    with torch.no_grad():
        s_out = student(input_ids=inputs, output_hidden_states=True)
        t_out = teacher(input_ids=inputs, output_hidden_states=True)
    keep = labels != IGNORE_INDEX
    s = s_out.logits[keep].double()
    t = t_out.logits[keep].double()
    p_t = torch.softmax(t / 2.0, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / 2.0, -1))).sum() * 4.0
    ce = F.cross_entropy(s, labels[keep], reduction="sum")
    cos = 1 - F.cosine_similarity(
        s_out.hidden_states[-1].double(), t_out.hidden_states[-1].double(), dim=-1
    )
    assert sums["forward_kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert sums["ce"].item() == pytest.approx(ce.item(), rel=1e-4)
    # after the engine's division by the masked count: the mean over all 141 tokens
    assert sums["hidden_cosine"].item() / n_masked == pytest.approx(cos.mean().item(), rel=1e-4)

    # No gradient reaches the student's logits at unmasked positions.
    s_logits = student(input_ids=inputs).logits.detach().requires_grad_(True)
    with torch.no_grad():
        t_logits = teacher(input_ids=inputs).logits
    signals = {
        "student_logits": s_logits.reshape(-1, vocab),
        "teacher_logits": t_logits.reshape(-1, vocab),
        "labels": labels.reshape(-1),
        "mask": keep.reshape(-1),
    }
    mix.term_sums(signals).sum().backward()
    grads = [s_logits.grad]
    assert grads[0][~keep].abs().max() == 0.0  # no gradient reaches unmasked positions
    assert grads[0][keep].abs().max() > 0.0


def test_every_other_init_copies_bert_layers():
    teacher, student = _tiny_bert(80, 4, 0), _tiny_bert(80, 2, 1)
    init_from_teacher(student, teacher, every_other(4, 2))
    for i, j in enumerate(every_other(4, 2)):
        s_layer = student.bert.encoder.layer[i].state_dict()
        t_layer = teacher.bert.encoder.layer[j].state_dict()
        assert all(torch.equal(v, t_layer[k]) for k, v in s_layer.items())
    assert torch.equal(
        student.bert.embeddings.word_embeddings.weight,
        teacher.bert.embeddings.word_embeddings.weight,
    )


def test_encoder_classifier_ignores_padding():
    torch.manual_seed(0)
    model = build_model("bert-tiny", 40, {"hidden_dropout_prob": 0.0}, num_labels=3, pad_token_id=1)
    model.eval()
    row = torch.tensor([[0, 5, 6, 7, 0]])
    padded = torch.cat([row, torch.ones(1, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=row).logits, model(input_ids=padded).logits, atol=1e-5
        )
        # without the mask the padding would change the prediction (a real test of the hook)
        plain = build_model("bert-tiny", 40, {"hidden_dropout_prob": 0.0}, num_labels=3)
        plain.load_state_dict(model.state_dict())
        plain.eval()
        assert not torch.allclose(plain(input_ids=padded).logits, model(input_ids=row).logits)
    mask_padding(model)  # idempotent: one hook
    assert len(model._forward_pre_hooks) == 1


def test_encoder_layout_of_labelled_texts():
    class Tok:
        eos_token_id, pad_token_id, bos_token_id = 9, 0, 8
        sep_token_id, cls_token_id = 3, 2

        def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
            return {"input_ids": [[10 + len(w) for w in t.split()] for t in texts]}

    data = encode_labelled(
        [("a bb ccc", "x"), ("a b c d e", "y")], Tok(), 5, ["x", "y"], encoder=True
    )
    assert data.ids.tolist() == [[2, 11, 12, 13, 3], [2, 11, 11, 11, 3]]  # cls … sep
    assert data.truncated == 1


def _mlm_run(corpus: Path, cache_dir: Path, out: Path, **fields: object) -> RunConfig:
    spec: dict = {
        "data": {
            "task": "mlm", "source": str(corpus), "seq_len": 32, "vocab_size": 512,
            "cache_dir": str(cache_dir),
        },
        "model": {"preset": "bert-tiny", "overrides": {"num_hidden_layers": 4}},
        "train": {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_batches": 2,
                  "log_every": 1},
        "out": str(out),
    }  # fmt: skip
    spec.update(fields)
    return RunConfig.model_validate(spec)


@pytest.fixture(scope="module")
def mlm_teacher(corpus: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distillery.recipes.run import run

    out = tmp_path_factory.mktemp("mlm-teacher")
    summary = run(_mlm_run(corpus, cache_dir, out))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r and not r.get("final")]
    assert summary["finished"] and losses[-1] < losses[0]  # masked LM learns
    return out / "model"


def test_mlm_distillation_run_and_classifier_round_trip(
    mlm_teacher: Path, corpus: Path, cache_dir: Path, tmp_path: Path
):
    from distillery.recipes.run import run

    tok = AutoTokenizer.from_pretrained(mlm_teacher)
    assert tok.mask_token is not None  # the lab's BPE got a mask token
    distilled = run(
        _mlm_run(
            corpus, cache_dir, tmp_path / "student", teacher=str(mlm_teacher),
            model={"preset": "bert-tiny", "init_from_teacher": "every_other"},
            objectives=[
                {"kind": "forward_kl", "weight": 5.0, "temperature": 2.0},
                {"kind": "ce", "weight": 2.0},
                {"kind": "hidden_cosine", "weight": 1.0},
            ],
        )
    )  # fmt: skip
    assert distilled["finished"] and 0.0 <= distilled["agreement"] <= 1.0
    assert distilled["layers"] == 2 and "generation_tokens_per_s" not in distilled

    # Fine-tune the masked LM into a classifier (a new head) and distil a classifier from it.
    labelled = {
        "task": "classify", "source": str(corpus), "seq_len": 48, "vocab_size": 512,
        "val_fraction": 0.15, "test_fraction": 0.15, "cache_dir": str(cache_dir),
    }  # fmt: skip
    train = {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_batches": 2}
    teacher = run(
        RunConfig.model_validate(
            {"data": labelled, "model": {"path": str(mlm_teacher)}, "train": train,
             "out": str(tmp_path / "teacher-cls")}
        )
    )  # fmt: skip
    assert teacher["finished"] and 0.0 <= teacher["macro_f1"] <= 1.0
    student = run(
        RunConfig.model_validate(
            {"data": labelled, "model": {"path": str(tmp_path / "student" / "model")},
             "teacher": str(tmp_path / "teacher-cls" / "model"),
             "objectives": [{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0},
                            {"kind": "hidden_cosine", "projection": "linear"}],
             "train": train, "out": str(tmp_path / "student-cls")}
        )
    )  # fmt: skip
    assert student["finished"] and student["classes"] == teacher["classes"]

    # Plain transformers reads the folder: same logits as ours, classes in id2label.
    folder = tmp_path / "student-cls" / "model"
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert plain.config.model_type == "bert"
    assert [plain.config.id2label[i] for i in range(5)] == teacher["classes"]
    tok = AutoTokenizer.from_pretrained(folder)
    text = "The minister said the budget would cut taxes for business."
    enc = tok(text, return_tensors="pt")
    ids = torch.cat([torch.tensor([[tok.bos_token_id]]), enc.input_ids,
                     torch.tensor([[tok.eos_token_id]])], 1)  # fmt: skip
    from distillery.models import load_pretrained

    ours = load_pretrained(folder, "student", "classify").eval()
    padded = torch.cat([ids, torch.full((1, 5), tok.pad_token_id)], 1)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ours(input_ids=padded).logits, atol=1e-5)


def test_encoder_errors_are_one_line(teacher_dir: Path, corpus: Path, cache_dir: Path):
    with pytest.raises(Exception, match="masked-LM runs need a bert-\\* preset"):
        RunConfig.model_validate({"data": {"task": "mlm"}, "model": {"preset": "mini"}})
    with pytest.raises(Exception, match=r"is an encoder: use data\.task=mlm or classify"):
        RunConfig.model_validate({"model": {"preset": "bert-mini"}})
    with pytest.raises(Exception, match="every other layer"):
        ClassifiersConfig.model_validate({"teacher": {"preset": "bert-tiny"}, "student_layers": 2})
    with pytest.raises(DistilleryError, match="cannot be a masked language model"):
        build_model("tiny", 100, task="mlm")
    # A decoder's tokenizer has no mask token: one line, no traceback.
    proc = run_cli(
        "train", "--out", str(cache_dir.parent / "mlm-bad"), "data.task=mlm",
        "model.preset=bert-tiny", f"data.source={corpus}", f"data.tokenizer={teacher_dir}",
        f"data.cache_dir={cache_dir}", "data.seq_len=32", "train.steps=1",
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs a tokenizer with a mask token" in proc.stderr


def _classifiers_spec(
    corpus: Path, cache_dir: Path, tmp_path: Path, preset: str, steps: int, seeds: list[int]
) -> dict:
    """A classifiers study of 4-layer tiny teachers, every stage ``steps`` long."""
    stage = {"steps": steps, "batch_size": 8, "checkpoint_every": 0, "eval_batches": 2}
    return {
        "data": {
            "task": "classify", "source": str(corpus), "seq_len": 32, "vocab_size": 512,
            "val_fraction": 0.15, "test_fraction": 0.15, "cache_dir": str(cache_dir),
        },
        "teacher": {"preset": preset, "overrides": {"num_hidden_layers": 4}},
        "teacher_pretrain": stage, "teacher_finetune": stage, "general_train": stage,
        "finetune": stage, "seeds": seeds, "out": str(tmp_path / "out"),
    }  # fmt: skip


def test_classifiers_experiment_end_to_end(corpus: Path, cache_dir: Path, tmp_path: Path):
    spec = {
        **_classifiers_spec(corpus, cache_dir, tmp_path, "bert-tiny", 4, [0, 1]),
        "results": str(tmp_path / "results"),
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")
    proc = run_cli("experiment", "classifiers", "--config", str(path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "results" / "classifiers.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["teacher", "distilled", "distilled-labels", "init-labels", "no-teacher"]
    assert rows["teacher"]["layers"] == 4 and rows["distilled"]["layers"] == 2
    assert rows["distilled"]["params"] < rows["teacher"]["params"]
    for row in rows.values():
        assert len(row["runs"]) == 2 and 0.0 <= row["accuracy"]["mean"] <= 1.0
        assert row["retained_accuracy"] == pytest.approx(
            100 * row["accuracy"]["mean"] / rows["teacher"]["accuracy"]["mean"]
        )
        assert row["speedup"] > 0
    # The distilled student paid for teacher forwards; the teacher-free one did not.
    assert rows["distilled"]["flops"]["mean"] > rows["no-teacher"]["flops"]["mean"]
    # The teacher-initialised body read no teacher outputs: the teacher-free body's cost.
    assert rows["init-labels"]["flops"]["mean"] == rows["no-teacher"]["flops"]["mean"]
    init = yaml.safe_load((tmp_path / "out/body-init/seed-0/config.yaml").read_text())
    assert init["model"]["init_from_teacher"] == "every_other"
    assert [o["kind"] for o in init["objectives"]] == ["ce"]
    assert (
        "| model | layers | params | accuracy |"
        in (tmp_path / "results" / "classifiers.md").read_text()
    )
    # A second call reuses every finished stage.
    again = run_cli("experiment", "classifiers", "--config", str(path), timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing") >= 1 + 2 * 8


def test_classifiers_with_converged_teacher_bodies(corpus: Path, cache_dir: Path, tmp_path: Path):
    """``teacher_stage``: one early-stopped body per stage seed; student seed i is taught by
    body i mod n (its fine-tuned teacher, its distilled and initialised bodies), and the
    teacher row is charged all its stage spent."""
    spec = {
        **_classifiers_spec(corpus, cache_dir, tmp_path, "tiny", 3, [0, 1, 2]),
        "teacher_stage": {"seeds": [0, 1], "eval_every": 2, "patience": 1, "max_steps": 4,
                          "eval_batches": 2, "root": str(tmp_path / "teachers")},
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")
    proc = run_cli("experiment", "classifiers", "--config", str(path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "classifiers.json").read_text())
    stage = [json.loads((d / "summary.json").read_text()) for d in
             sorted((tmp_path / "teachers").iterdir())]  # fmt: skip
    by_seed = {s["seed"]: s for s in stage}
    assert sorted(by_seed) == [0, 1] and all(s["finished"] for s in stage)
    pre = result["teacher_pretrain"]
    assert pre["converged"] and [t["seed"] for t in pre["teachers"]] == [0, 1]
    assert [t["val_ppl"] for t in pre["teachers"]] == [by_seed[0]["val_ppl"], by_seed[1]["val_ppl"]]
    for i in range(3):
        body = Path(by_seed[i % 2]["model"])
        for stage_name in ("teacher", "body-distilled", "body-init"):
            cfg = yaml.safe_load((tmp_path / f"out/{stage_name}/seed-{i}/config.yaml").read_text())
            key = cfg["model"]["path"] if stage_name == "teacher" else cfg["teacher"]["path"]
            assert Path(key) == body, (stage_name, i)
        fine = json.loads((tmp_path / f"out/teacher/seed-{i}/summary.json").read_text())
        assert result["rows"]["teacher"]["runs"][i]["flops"] == pytest.approx(
            by_seed[i % 2]["flops_trained"] + fine["flops"]
        )
    assert "Teacher test accuracy" in (tmp_path / "out" / "classifiers.md").read_text()
    # A pretrained folder and a stage are two answers to one question.
    bad = {**spec, "teacher": {"path": str(tmp_path)}, "student": {"preset": "tiny"}}
    path.write_text(json.dumps(bad), encoding="utf-8")
    proc = run_cli("experiment", "classifiers", "--config", str(path))
    assert proc.returncode == 2
    assert "teacher_stage: the teacher is a pretrained folder" in proc.stderr


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def test_token_mean_terms_are_exact_across_micro_batches(
    mlm_teacher: Path, corpus: Path, cache_dir: Path, tmp_path: Path
):
    """Masked-LM distillation with a hidden cosine (counted over tokens, labels on ~15% of
    them) gives the same update in one batch and in micro-batches of one block."""
    from distillery.recipes.run import run

    for name, micro in (("big", None), ("micro", 1)):
        run(
            _mlm_run(
                corpus, cache_dir, tmp_path / name, teacher=str(mlm_teacher),
                model={"preset": "bert-tiny", "overrides": NO_DROPOUT},
                objectives=[{"kind": "forward_kl", "temperature": 2.0}, {"kind": "ce"},
                            {"kind": "hidden_cosine", "projection": "linear"}],
                train={"steps": 3, "batch_size": 4, "micro_batch_size": micro, "lr": 3e-3,
                       "warmup_steps": 1, "eval_batches": 1},
            )
        )  # fmt: skip
    a, b = _weights(tmp_path / "big"), _weights(tmp_path / "micro")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_masked_lm_run_resumes_bit_identically(corpus: Path, cache_dir: Path, tmp_path: Path):
    from distillery.recipes.run import run

    train = {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_batches": 1,
             "checkpoint_every": 2}  # fmt: skip
    run(_mlm_run(corpus, cache_dir, tmp_path / "full", train=train))
    cut = _mlm_run(corpus, cache_dir, tmp_path / "cut", train=train)
    assert run(cut, stop_after=3) == {"step": 3, "finished": False}
    assert run(cut, resume=True)["finished"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_engine_reports_token_terms_as_means_over_tokens(tmp_path: Path):
    """With labels on a few positions, the engine's hidden-cosine term is still the mean over
    every token of the global batch (not a sum over tokens divided by the label count)."""
    from distillery.config import TrainConfig
    from distillery.data import global_batch_indices
    from distillery.engine import Engine

    vocab = 60

    class Blocks:  # 6 fixed blocks, labels on a few positions only
        seq_len, num_blocks, identity = 16, 6, "blocks"
        ids = torch.randint(3, vocab, (6, 16), generator=torch.Generator().manual_seed(0))

        def examples(self, indices: np.ndarray, draw: int = 0) -> tuple:
            return mask_tokens(
                self.ids[torch.as_tensor(indices)], indices, mask_id=MASK, vocab_size=vocab,
                special_ids=SPECIALS, probability=0.15, seed=0, draw=draw,
            )  # fmt: skip

    student = _tiny_bert(vocab, 2, 0, **NO_DROPOUT)
    teacher = _tiny_bert(vocab, 2, 1, **NO_DROPOUT)
    mix = DistillStep(
        terms_from_config([{"kind": "ce"}, {"kind": "hidden_cosine"}]), LiveTeacher(teacher),
        student=student, vocab=vocab, states_on="tokens", pad_token_id=1,
    )  # fmt: skip
    cfg = TrainConfig(steps=1, batch_size=4, micro_batch_size=1, tensorboard=False)
    data = Blocks()
    ids, labels = data.examples(global_batch_indices(6, 0, 4, cfg.seed), draw=0)
    with torch.no_grad():
        s = student(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        t = teacher(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    expected = (1 - F.cosine_similarity(s, t, dim=-1)).mean().item()
    engine = Engine(
        student, mix, data, cfg, tmp_path, device=torch.device("cpu"), flops_per_token=1.0
    )
    out = engine.train_step(0)
    assert (labels != IGNORE_INDEX).sum() < ids.numel() / 3
    assert out["hidden_cosine"] == pytest.approx(expected, rel=1e-4)


def test_a_masked_lm_is_no_classifier_teacher(mlm_teacher: Path):
    from distillery.models import load_pretrained

    with pytest.raises(DistilleryError, match="not a classifier: fine-tune it first"):
        load_pretrained(mlm_teacher, "teacher", "classify")
