"""Classification runs: labelled data, residual dropout, MC dropout and temperature teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distillery.config import RunConfig
from distillery.data import encode_labelled, load_labelled, split_labelled
from distillery.data.tokenizer import load_tokenizer
from distillery.errors import DistilleryError
from distillery.models.dropout import add_residual_dropout, dropout_on, has_dropout
from distillery.teachers import LiveTeacher, MCDropoutTeacher, TemperatureScaled, mean_distribution
from tests.conftest import run_cli, tiny_llama


def classify_run(corpus: Path, cache_dir: Path, out: Path, **fields: object) -> RunConfig:
    """A tiny classifier run on the test corpus' topics (overridable top-level fields)."""
    spec = {
        "data": {
            "task": "classify",
            "source": str(corpus),
            "seq_len": 48,
            "vocab_size": 512,
            "val_fraction": 0.15,
            "test_fraction": 0.15,
            "cache_dir": str(cache_dir),
        },
        "model": {"preset": "tiny", "dropout": 0.1},
        "objectives": [{"kind": "ce"}],
        "train": {"steps": 8, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_batches": 2},
        "out": str(out),
    }
    spec.update(fields)
    return RunConfig.model_validate(spec)


@pytest.fixture(scope="module")
def classifier(corpus: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distillery.recipes.run import run

    out = tmp_path_factory.mktemp("classifier")
    summary = run(classify_run(corpus, cache_dir, out))
    assert summary["finished"]
    return out


class _Tok:
    """Whitespace 'tokenizer' with the ``_encode`` fallback interface, for exact token counts."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[2 + len(w) for w in t.split()] for t in texts]}


def test_examples_keep_the_first_tokens_end_in_eos_and_are_right_padded():
    pairs = [("a bb ccc", "sport"), ("dddd", "tech"), ("e e e e e e e", "sport")]
    data = encode_labelled(pairs, _Tok(), seq_len=5, classes=["sport", "tech"], name="train")
    assert data.ids.tolist() == [[3, 4, 5, 1, 0], [6, 1, 0, 0, 0], [3, 3, 3, 3, 1]]
    assert data.labels.tolist() == [0, 1, 0]
    assert data.truncated == 1  # the seven-word text, cut to its first four tokens
    ids, labels = data.examples([2, 0])
    assert ids.shape == (2, 5) and labels.tolist() == [0, 0]


def test_labels_are_checked(tmp_path: Path):
    with pytest.raises(DistilleryError, match="do not occur in the training split"):
        encode_labelled([("x", "politics")], _Tok(), 4, ["sport", "tech"], "val")
    with pytest.raises(DistilleryError, match="two labels"):
        split_labelled([("same text", "a"), ("same text", "b")], 0.1, 0.1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "topic": "a"}\n', encoding="utf-8")
    with pytest.raises(DistilleryError, match=r"no field 'label'.*label_field"):
        load_labelled(bad)
    bad.write_text('{"text": "hello", "label": true}\n', encoding="utf-8")
    with pytest.raises(DistilleryError, match="string or an integer"):
        load_labelled(bad)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"text": "a", "label": 3}\n{"text": " ", "label": 1}\n', encoding="utf-8")
    assert load_labelled(ok) == [("a", "3")]  # integer labels become names; blank texts dropped
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nhello,\n", encoding="utf-8")
    with pytest.raises(DistilleryError, match="record 1: the label"):
        load_labelled(csv)
    csv.write_text("body,label\nhello,a\n", encoding="utf-8")
    with pytest.raises(DistilleryError, match="no column 'text'"):
        load_labelled(csv)


def test_a_single_class_is_refused_with_one_line(tmp_path: Path, cache_dir: Path):
    data = tmp_path / "one.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"text number {i}", "label": "x"}) + "\n" for i in range(30)),
        encoding="utf-8",
    )
    cfg = classify_run(data, cache_dir, tmp_path / "out")
    result = run_cli("train", "--config", str(_dump(cfg, tmp_path)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "distillery: error: the training split has a single class (x): a classifier needs at "
        "least two labels"
    ]


def _dump(cfg: RunConfig, folder: Path) -> Path:
    from distillery.config import config_to_yaml

    path = folder / "config.yaml"
    path.write_text(config_to_yaml(cfg), encoding="utf-8")
    return path


def test_classifier_round_trips_through_plain_transformers(classifier: Path, corpus: Path):
    from transformers import AutoModelForSequenceClassification

    summary = json.loads((classifier / "summary.json").read_text())
    assert summary["classes"] == sorted({json.loads(x)["label"] for x in corpus.open()})
    for key in ("accuracy", "macro_f1", "ece", "mce", "brier", "val_loss"):
        assert 0.0 <= summary[key] < 10.0, key
    assert summary["truncated_train_texts"] > 0  # BBC articles are longer than 48 tokens
    model = AutoModelForSequenceClassification.from_pretrained(classifier / "model").eval()
    assert model.config.num_labels == len(summary["classes"])
    assert [model.config.id2label[i] for i in range(5)] == summary["classes"]  # names saved
    assert model.config.residual_dropout == 0.1
    tok = load_tokenizer(classifier / "model")
    ids = torch.tensor([tok("Shares rose as the bank reported profits").input_ids])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    from distillery.models import load_pretrained

    ours = load_pretrained(classifier / "model", "model", "classify").eval()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, plain, atol=1e-6)
    # Our loader hooked the residual dropout back on: stochastic in training mode only.
    ours.train()
    with torch.no_grad():
        assert not torch.allclose(ours(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_distil_a_classifier_from_mc_dropout_and_from_an_ensemble(
    classifier: Path, corpus: Path, cache_dir: Path, tmp_path: Path
):
    from distillery.recipes.run import run

    teacher = classifier / "model"
    kl = [{"kind": "forward_kl", "temperature": 1.0}]
    mc = run(
        classify_run(
            corpus, cache_dir, tmp_path / "mc", objectives=kl,
            teacher={"kind": "mc_dropout", "path": str(teacher), "samples": 3},
        )
    )  # fmt: skip
    plain = run(classify_run(corpus, cache_dir, tmp_path / "plain", teacher=str(teacher)))
    # Three stochastic teacher passes per token are charged (the plain run has no teacher term).
    tokens = 8 * 48 * 8  # batch × seq_len × steps
    one_pass = 2.0 * plain["compute_params"] * tokens  # the teacher has the student's size
    assert mc["flops"] - plain["flops"] == pytest.approx(3 * one_pass, rel=1e-6)
    assert 0.0 <= mc["agreement"] <= 1.0
    ens = run(
        classify_run(
            corpus, cache_dir, tmp_path / "ens", teacher=[str(teacher), str(teacher)],
            objectives=kl,
        )
    )  # fmt: skip
    assert ens["finished"] and ens["agreement"] >= 0.0


def test_classification_config_errors_are_one_line():
    base = {"data": {"task": "classify"}, "teacher": "t"}
    with pytest.raises(Exception, match="are for causal language models"):
        RunConfig.model_validate({**base, "objectives": [{"kind": "attention_kl"}]})
    # Hidden states are matched over the texts' tokens (see test_encoders).
    RunConfig.model_validate({**base, "objectives": [{"kind": "hidden_cosine"}]})
    with pytest.raises(Exception, match=r"teacher\.mc_dropout\.path"):  # one folder only
        RunConfig.model_validate({"teacher": {"kind": "mc_dropout", "path": ["a", "b"]}})
    with pytest.raises(Exception, match="for causal language models"):
        RunConfig.model_validate({**base, "train": {"logit_chunk_size": 64}})


def test_residual_dropout_is_active_in_training_mode_only():
    model = tiny_llama(97)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.eval()(input_ids=ids).logits
    assert not has_dropout(model)
    add_residual_dropout(model, 0.2)
    assert has_dropout(model) and model.config.residual_dropout == 0.2
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reference)
        model.train()
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(a, b) and not torch.allclose(a, reference)
    with pytest.raises(DistilleryError, match="already has"):
        add_residual_dropout(model, 0.2)


def test_mc_dropout_teacher_is_the_mean_of_its_passes_and_needs_dropout():
    model = tiny_llama(97)
    with pytest.raises(DistilleryError, match="trained with dropout"):
        MCDropoutTeacher(LiveTeacher(tiny_llama(97)), 4)
    add_residual_dropout(model, 0.3)
    teacher = LiveTeacher(model)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    got = MCDropoutTeacher(teacher, 3).logits(ids)
    torch.manual_seed(5)
    with dropout_on(model), torch.no_grad():
        passes = [model(input_ids=ids).logits for _ in range(3)]
    assert not model.training  # restored to eval
    assert torch.allclose(got, mean_distribution(passes, None), atol=1e-5)
    manual = torch.log(torch.stack([p.softmax(-1) for p in passes]).mean(0))
    assert torch.allclose(got, manual, atol=1e-5)
    assert MCDropoutTeacher(teacher, 3).compute_params == 3 * teacher.compute_params


def test_temperature_scaled_teacher_divides_the_logits():
    teacher = LiveTeacher(tiny_llama(97))
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    scaled = TemperatureScaled(teacher, 2.0)
    assert torch.allclose(scaled.logits(ids), teacher.logits(ids) / 2.0)
    chunked = scaled.run(ids, logits=False).chunk_logits
    assert chunked is not None
    assert torch.allclose(chunked(slice(0, 6), None), teacher.logits(ids)[0] / 2.0, atol=1e-6)


def test_eval_cli_reads_a_classifier_and_checks_its_classes(
    classifier: Path, corpus: Path, cache_dir: Path, tmp_path: Path
):
    data = [
        "data.task=classify",
        f"data.source={corpus}",
        "data.seq_len=48",
        "data.val_fraction=0.15",
        "data.test_fraction=0.15",
        f"data.cache_dir={cache_dir}",
    ]
    result = run_cli("eval", "--model", str(classifier / "model"), *data)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout)
    assert metrics["eval_examples"] > 0 and 0 <= metrics["macro_f1"] <= 1
    assert "generation_tokens_per_s" not in metrics and len(metrics["classes"]) == 5
    # Labels renamed in the data: the model's saved class names no longer fit.
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(
        "".join(
            json.dumps({**(row := json.loads(line)), "label": row["label"].upper()}) + "\n"
            for line in corpus.open()
        ),
        encoding="utf-8",
    )
    result = run_cli("eval", "--model", str(classifier / "model"), *data, f"data.source={renamed}")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "the model's classes are ['business'" in result.stderr
