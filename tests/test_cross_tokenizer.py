"""A teacher with another tokenizer: span alignment on hand-made strings, the aligned logits, the
chunked path, refusals in one line, and a whole ce + uld run."""

from __future__ import annotations

import json
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distillery.data import shift_labels
from distillery.errors import DistilleryError
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import LiveTeacher
from distillery.teachers.cross_tokenizer import (
    AlignedOutput,
    CrossTokenizerTeacher,
    align,
    token_ends,
)
from tests.conftest import tiny_llama, tiny_run

LETTERS = [*"unbelivaÃ©", "Ġ", "x"]
# "unbelievableé" (é is the bytes Ã © in byte-level form) and " x" as one more word.
STUDENT_MERGES = [
    ("u", "n"), ("b", "e"), ("l", "i"), ("be", "li"), ("beli", "e"), ("belie", "v"),
    ("a", "b"), ("l", "e"), ("ab", "le"),
]  # fmt: skip
TEACHER_MERGES = [*STUDENT_MERGES, ("un", "believ"), ("Ã", "©"), ("Ġ", "x")]


def hand_tokenizer(
    merges: list[tuple[str, str]], letters: list[str] = LETTERS
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with exactly these merges (its vocabulary: letters, then merges)."""
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(letters)}}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


TEXT = "unbelievableé x"


def test_hand_made_tokenizations_are_what_the_test_says():
    student, teacher = hand_tokenizer(STUDENT_MERGES), hand_tokenizer(TEACHER_MERGES)
    pieces = lambda tok: tok.convert_ids_to_tokens(tok(TEXT)["input_ids"])  # noqa: E731
    assert pieces(student) == ["un", "believ", "able", "Ã", "©", "Ġ", "x"]
    assert pieces(teacher) == ["unbeliev", "able", "Ã©", "Ġx"]


def test_token_ends_and_alignment_by_hand():
    """Student un|believ|able|Ã|©|Ġ|x ends at characters 2, 8, 12, (12: inside é), 13, 14, 15;
    teacher unbeliev|able|é|Ġx at 8, 12, 13, 15. Aligned: believ↔unbeliev, able↔able, ©↔é,
    x↔Ġx; un (no teacher token ends at 2), Ã (ends inside a character) and Ġ (14) are not."""
    student, teacher = hand_tokenizer(STUDENT_MERGES), hand_tokenizer(TEACHER_MERGES)
    text, ends, whole = token_ends(student, student(TEXT)["input_ids"])
    assert text == TEXT
    assert ends == [2, 8, 12, 12, 13, 14, 15]
    assert whole == [True, True, True, False, True, True, True]
    offsets = teacher(TEXT, return_offsets_mapping=True)["offset_mapping"]
    assert [end for _, end in offsets] == [8, 12, 13, 15]
    assert align(ends, whole, [8, 12, 13, 15]) == [-1, 0, 1, -1, 2, -1, 3]
    # Several teacher tokens ending at one offset (the two bytes of a character): the last.
    assert align([3, 5], [True, True], [3, 5, 5]) == [0, 2]


def test_aligned_logits_are_the_teachers_own_at_the_aligned_positions():
    """The signal's logits at an aligned student position are the teacher's logits, computed
    on its own tokenization, at the aligned teacher position; whole or chunk by chunk."""
    student_tok, teacher_tok = hand_tokenizer(STUDENT_MERGES), hand_tokenizer(TEACHER_MERGES)
    model = tiny_llama(len(teacher_tok) + 3, seed=1)  # a padded table: logits cut to 24 tokens
    signal = CrossTokenizerTeacher(model, teacher_tok, student_tok)
    rows = [student_tok(TEXT)["input_ids"], student_tok("ableunbeliev x")["input_ids"][:7]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (2, 7)
    out = signal.run(ids)
    assert isinstance(out, AlignedOutput) and out.logits is not None
    assert out.logits.shape == (2 * width, len(teacher_tok))
    with torch.no_grad():
        own = model(input_ids=torch.tensor([teacher_tok(TEXT)["input_ids"]])).logits[0]
    expected_mask = [False, True, True, False, True, False, True]
    assert out.mask[:width].tolist() == expected_mask
    for i, j in zip([1, 2, 4, 6], [0, 1, 2, 3], strict=True):
        torch.testing.assert_close(out.logits[i], own[j, : len(teacher_tok)].float())
    chunked = signal.run(ids, logits=False)
    assert chunked.chunk_logits is not None
    parts = [chunked.chunk_logits(slice(s, s + 5), None) for s in range(0, 2 * width, 5)]
    torch.testing.assert_close(torch.cat(parts), out.logits)
    with pytest.raises(DistilleryError, match="another tokenizer"):
        signal.run(ids, hidden_states=True)


def test_step_with_uld_chunked_equals_unchunked_and_ce_keeps_every_position():
    """ce + uld through the distillation step: the chunked path (teacher logits in their own
    vocabulary, not cut to the student's) gives the unchunked values and gradients; CE counts
    every labelled position, ULD only the aligned ones."""
    student_tok, teacher_tok = hand_tokenizer(STUDENT_MERGES), hand_tokenizer(TEACHER_MERGES)
    signal = CrossTokenizerTeacher(tiny_llama(len(teacher_tok), seed=2), teacher_tok, student_tok)
    ids = torch.tensor([student_tok(TEXT)["input_ids"]] * 2)
    labels = shift_labels(ids)
    terms = [{"kind": "ce"}, {"kind": "uld", "temperature": 2.0}]
    results = []
    for chunk in (0, 3):
        student = tiny_llama(len(student_tok), seed=3)
        step = DistillStep(
            terms_from_config(terms), signal, vocab=len(student_tok), chunk_size=chunk
        )
        total, sums = step(student, ids, labels)
        total.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        results.append((total.detach(), {k: v.detach() for k, v in sums.items()}, grads))
    (t0, s0, g0), (t1, s1, g1) = results
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1["uld"], s0["uld"], rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert s0["uld"] > 0
    # The ULD sum by hand: only the aligned, labelled positions (1, 2, 4 of each row; 6 has no
    # label), each the distance between sorted probabilities at T=2, times 4.
    from distillery.objectives import universal_logit_distance

    student = tiny_llama(len(student_tok), seed=3)
    with torch.no_grad():
        s_logits = student(input_ids=ids).logits.flatten(0, 1)
    t_logits = signal.run(ids).logits
    keep = torch.zeros(ids.numel(), dtype=torch.bool)
    keep[[1, 2, 4, 8, 9, 11]] = True
    direct = universal_logit_distance(s_logits, t_logits, keep, temperature=2.0)
    torch.testing.assert_close(s0["uld"], direct, rtol=1e-5, atol=1e-6)


def test_a_teacher_that_cannot_be_aligned_is_one_line():
    """A teacher tokenizer that has no token for the text (no "Ġ", no "x") aligns nowhere on
    the blocks: refused when the signal is built, in one line."""
    from distillery.teachers.factory import cross_tokenizer_teacher

    student_tok = hand_tokenizer(STUDENT_MERGES)
    blind = hand_tokenizer(STUDENT_MERGES, letters=[*"unbelivaÃ©"])
    ids = torch.tensor([student_tok(" x x x")["input_ids"]] * 2)

    class Blocks:  # the two methods of PackedTokens the factory reads
        num_blocks = 2

        def blocks(self, indices):
            return ids[list(indices)]

    with TemporaryDirectory() as folder:
        blind.save_pretrained(folder)
        model = tiny_llama(len(blind), seed=5)
        with pytest.raises(DistilleryError, match="cannot be aligned") as info:
            cross_tokenizer_teacher(Path(folder), model, student_tok, Blocks())  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    with TemporaryDirectory() as folder:  # the right teacher: Ġx|Ġx|Ġx for Ġ|x|Ġ|x|Ġ|x
        teacher_tok = hand_tokenizer(TEACHER_MERGES)
        teacher_tok.save_pretrained(folder)
        model = tiny_llama(len(teacher_tok), seed=5)
        full = LiveTeacher(model).compute_params
        signal = cross_tokenizer_teacher(Path(folder), model, student_tok, Blocks())  # type: ignore[arg-type]
    assert (signal.ratio, signal.aligned) == (0.5, 0.5)
    assert signal.compute_params == round(full * 0.5)  # half as many teacher tokens


def _run_config(corpus: Path, cache_dir: Path, out: Path, folder: Path, **changes):
    cfg = tiny_run(corpus, cache_dir, out, steps=3, generation_tokens=0, draft_prompts=0)
    data = cfg.model_dump()
    data["data"]["vocab_size"] = 384  # the student's own BPE
    data["teacher"] = {"kind": "live", "path": str(folder), "tokenizer": "own"}
    data["objectives"] = [{"kind": "ce"}, {"kind": "uld", "temperature": 2.0}]
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return type(cfg).model_validate(data)


@pytest.fixture(scope="module")
def own_teacher(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher with its own BPE of 512 words (trained on other articles than the data's
    first ones), saved as a folder."""
    from distillery.data import train_bpe_tokenizer

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()][150:]
    folder = tmp_path_factory.mktemp("own-teacher")
    tokenizer = train_bpe_tokenizer(texts, 512, folder)
    tiny_llama(len(tokenizer), hidden=48, layers=2, seed=4).save_pretrained(folder)
    return folder


def test_refusals_are_one_line(corpus: Path, cache_dir: Path, tmp_path: Path, own_teacher: Path):
    from distillery.recipes.run import run

    cases = {
        "use uld": {"objectives": [{"kind": "ce"}, {"kind": "forward_kl"}]},
        "layer by layer": {"objectives": [{"kind": "hidden_cosine"}]},
        "init_from_teacher": {"model__init_from_teacher": [0, 1]},
    }
    for message, changes in cases.items():
        cfg = _run_config(corpus, cache_dir, tmp_path / "r", own_teacher, **changes)
        with pytest.raises(DistilleryError, match=message) as info:
            run(cfg)
        assert "\n" not in str(info.value)
    ensemble = {"kind": "live", "path": [str(own_teacher)] * 2, "tokenizer": "own"}
    with pytest.raises(ValueError, match="one teacher"):
        _run_config(corpus, cache_dir, tmp_path / "r", own_teacher, teacher=ensemble)
    cache = {"kind": "cache", "path": str(own_teacher), "cache": "c", "tokenizer": "own"}
    with pytest.raises(ValueError, match="tokenizer"):
        _run_config(corpus, cache_dir, tmp_path / "r", own_teacher, teacher=cache)


def test_a_run_distils_from_a_teacher_with_another_tokenizer(
    corpus: Path, cache_dir: Path, tmp_path: Path, own_teacher: Path
):
    """3 steps of ce + uld (chunked logits): finite losses with the ULD term, the student
    exported with its own 384-word tokenizer and reloaded."""
    from distillery.data import load_tokenizer
    from distillery.models import load_pretrained
    from distillery.recipes.run import run

    out = tmp_path / "cross"
    cfg = _run_config(corpus, cache_dir, out, own_teacher, train__logit_chunk_size=40)
    summary = run(cfg, name="distill")
    assert summary["finished"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r and not r.get("final")]
    assert len(losses) == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)
    assert all(r["uld"] > 0 for r in losses), losses
    student_tok = load_tokenizer(out / "model")
    assert len(student_tok) == 384 and len(load_tokenizer(own_teacher)) == 512
    model = load_pretrained(out / "model")
    assert model.get_output_embeddings().weight.shape[0] == 384
    ids = torch.tensor([student_tok("The economy grew.")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
