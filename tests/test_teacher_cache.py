"""The offline teacher cache: built once, read instead of the teacher, refused when stale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillery.config import CacheTeacherConfig, RunConfig, build_config
from distillery.data import shift_labels
from distillery.distributed import DistEnv
from distillery.errors import DistilleryError
from distillery.models import load_pretrained
from distillery.objectives import forward_kl
from distillery.recipes.cache import cache_teacher
from distillery.recipes.common import prepare_data
from distillery.recipes.run import run
from distillery.step import DistillStep, terms_from_config
from distillery.teachers import LiveTeacher
from distillery.teachers.cache import CachedTeacher, cache_key
from tests.conftest import bucketed_kl_rows, tiny_run


def _cache(corpus, cache_dir, teacher_dir, out, **fields) -> CacheTeacherConfig:
    """A cache through the recipe; fp32 and the exact codec unless ``fields`` say otherwise."""
    fields = {"precision": "fp32", "codec": "exact", **fields}
    cfg = build_config(
        CacheTeacherConfig,
        overrides=[
            f"data.source={corpus}",
            "data.seq_len=32",
            f"data.cache_dir={cache_dir}",
            f"teacher={teacher_dir}",
            f"out={out}",
            *(f"{k}={v}" for k, v in fields.items()),
        ],
    )
    cache_teacher(cfg)
    return cfg


@pytest.fixture(scope="module")
def small(corpus, tmp_path_factory):
    """24 of the test articles: caches of a few hundred blocks."""
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    path.write_text("".join(corpus.read_text().splitlines(keepends=True)[:24]))
    return path


@pytest.fixture(scope="module")
def setting(small, cache_dir, teacher_dir, tmp_path_factory):
    """Tokenizer, training blocks, the live teacher and a cache with k = V − 1 (exact)."""
    corpus = small
    cfg = tiny_run(corpus, cache_dir, tmp_path_factory.mktemp("r"))
    tokenizer, train, _ = prepare_data(cfg.data, DistEnv(), teacher_dir)
    folder = tmp_path_factory.mktemp("c") / "exact"
    _cache(corpus, cache_dir, teacher_dir, folder, top_k=len(tokenizer) - 1, temperature=2.0)
    return tokenizer, train, LiveTeacher(load_pretrained(teacher_dir)), folder


def _all_rest(cached: CachedTeacher) -> np.ndarray:
    """The log of the left-over mass at every cached position."""
    return np.concatenate([cached.block(i)[2] for i in range(len(cached.offsets) - 1)])


def test_cache_files_and_meta(setting, teacher_dir):
    tokenizer, train, live, folder = setting
    meta = json.loads((folder / "cache.json").read_text())
    assert meta["blocks"] == train.num_blocks and meta["seq_len"] == 32
    assert meta["teacher_flops"] == 2.0 * live.compute_params * train.num_blocks * 32
    assert meta["codec"] == "exact" and meta["version"] == "distillery-teacher-cache-v2"
    offsets = np.load(folder / "offsets.npy")
    assert offsets.shape == (train.num_blocks + 1,)
    assert offsets[-1] == (folder / "blocks.bin").stat().st_size
    assert meta["bytes_per_position"] == offsets[-1] / (train.num_blocks * 32)
    ids, logp, rest = CachedTeacher(folder, train, {}).block(train.num_blocks - 1)
    assert ids.shape == logp.shape == (32, len(tokenizer) - 1) and rest.shape == (32,)
    assert not list(folder.parent.glob(".*tmp*"))  # written atomically


def test_cached_distribution_with_k_v_minus_1_is_the_teacher_s(setting, teacher_dir):
    tokenizer, train, live, folder = setting
    vocab = len(tokenizer)
    cached = CachedTeacher(folder, train, cache_key(teacher_dir, tokenizer, train))
    ids = train.blocks([3, 0, 5])
    want = torch.log_softmax(live.logits(ids)[..., :vocab].float() / 2.0, -1)
    got = torch.log_softmax(cached.logits(ids) / 2.0, -1)  # as an objective at T=2 sees it
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sparse_cache_loss_is_the_top_k_plus_one_bucket_kl(
    setting, small, cache_dir, teacher_dir, tmp_path
):
    """With k < V the cached loss is KL over the top-k plus one bucket for the rest (value and
    gradient, against a float64 reference written from the live teacher); it is at most the
    full KL and close to it when k covers most of the mass; a student equal to the teacher
    has zero loss."""
    tokenizer, train, live, _ = setting
    vocab, k = len(tokenizer), 3 * len(tokenizer) // 4
    _cache(small, cache_dir, teacher_dir, tmp_path / "c", top_k=k, temperature=1.0)
    cached = CachedTeacher(tmp_path / "c", train, cache_key(teacher_dir, tokenizer, train))
    ids = train.blocks(list(range(8)))
    labels = shift_labels(ids)
    mask = labels.reshape(-1) != -100
    student = load_pretrained(teacher_dir)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # a different model
        z = student(input_ids=ids).logits[..., :vocab].reshape(-1, vocab)
    z = z.detach().requires_grad_(True)
    terms = terms_from_config([{"kind": "forward_kl", "temperature": 1.0}])
    mix = DistillStep(terms, cached, vocab=vocab)
    signals = {"student_logits": z, "labels": labels.reshape(-1), "mask": mask}
    out = cached.run(ids)
    signals["teacher_logits"] = out.chunk_logits(slice(None), z.detach())
    ours = mix.term_sums(signals)[0]

    p = live.logits(ids)[..., :vocab].reshape(-1, vocab).double().softmax(-1)
    z64 = z.detach().double().requires_grad_(True)
    q = z64.softmax(-1)
    reference = bucketed_kl_rows(p, q, k)[mask].sum()
    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-5)
    (g,) = torch.autograd.grad(ours, z)
    (g64,) = torch.autograd.grad(reference, z64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-6)

    full = forward_kl(z.detach(), live.logits(ids)[..., :vocab].reshape(-1, vocab), mask)
    assert 0 < ours <= full and (full - ours) <= 0.1 * full  # k covers > 90%: close
    assert 1 - np.exp(_all_rest(cached)).mean() > 0.9
    teacher_as_student = live.logits(ids)[..., :vocab].reshape(-1, vocab)
    same = {**signals, "student_logits": teacher_as_student}
    same["teacher_logits"] = out.chunk_logits(slice(None), teacher_as_student)
    assert abs(mix.term_sums(same)[0].item()) < 1e-3

    # Chunked and whole reads agree, through the mix.
    whole, _ = mix(student, ids, labels)
    chunked, _ = DistillStep(terms, cached, vocab=vocab, chunk_size=13)(student, ids, labels)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-4)


def test_stale_or_mismatched_caches_are_refused(setting, small, cache_dir, teacher_dir, tmp_path):
    tokenizer, train, _, folder = setting
    key = cache_key(teacher_dir, tokenizer, train)
    with pytest.raises(DistilleryError, match="teacher: cache"):
        CachedTeacher(folder, train, {**key, "teacher": "another"})
    other_blocks = prepare_data(
        tiny_run(small, cache_dir, tmp_path / "r").data.model_copy(update={"seq_len": 16}),
        DistEnv(),
        teacher_dir,
    )[1]
    with pytest.raises(DistilleryError, match="rebuild it with `distillery cache-teacher`"):
        CachedTeacher(folder, other_blocks, cache_key(teacher_dir, tokenizer, other_blocks))
    with pytest.raises(DistilleryError, match="missing or corrupt"):
        CachedTeacher(tmp_path / "nothing", train, key)


def test_distilling_from_the_cache_end_to_end(setting, small, cache_dir, teacher_dir, tmp_path):
    folder = setting[3]
    cfg = tiny_run(small, cache_dir, tmp_path / "s", teacher=teacher_dir, steps=3).model_dump()
    cfg["teacher"] = {"kind": "cache", "path": str(teacher_dir), "cache": str(folder)}
    cfg["objectives"] = [{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}]
    summary = run(RunConfig.model_validate(cfg), name="distill")
    assert summary["flops"] == pytest.approx(6 * summary["compute_params"] * 3 * 4 * 32)
    assert summary["teacher_cache_flops"] > 0 and 0 <= summary["agreement"] <= 1

    cfg["objectives"][1]["temperature"] = 1.0
    cfg["out"] = str(tmp_path / "t")
    with pytest.raises(DistilleryError, match="another temperature"):
        run(RunConfig.model_validate(cfg))


def test_a_confident_teacher_leaves_a_finite_rest_and_reverse_kl_stays_finite(
    setting, small, cache_dir, teacher_dir, tmp_path
):
    """A very peaked teacher: 1 − Σ top-k cancels to 0 in float32, the mass outside does not."""
    from distillery.recipes.common import export_model
    from distillery.teachers.cache import build_teacher_cache

    tokenizer, train, _, _ = setting
    model = load_pretrained(teacher_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # (tied) logits 40× sharper
    peaked_dir = export_model(model, tokenizer, tmp_path / "peaked")
    key = {**cache_key(peaked_dir, tokenizer, train), "top_k": 4, "temperature": 1.0}
    build_teacher_cache(
        LiveTeacher(model), train, tmp_path / "c", key=key, device=torch.device("cpu")
    )
    cached = CachedTeacher(tmp_path / "c", train, key)
    rest = _all_rest(cached)
    assert np.isfinite(rest).all() and rest.min() < -17  # mass < 6e-8 somewhere, still finite
    ids = train.blocks([0, 1])
    labels = shift_labels(ids)
    for kind in ("reverse_kl", "jsd", "tvd", "forward_kl"):
        mix = DistillStep(terms_from_config([{"kind": kind}]), cached, vocab=len(tokenizer))
        total, _ = mix(load_pretrained(teacher_dir), ids, labels)
        assert torch.isfinite(total), kind


def test_hard_labels_are_refused_with_a_cache(setting, small, cache_dir, teacher_dir, tmp_path):
    cfg = tiny_run(small, cache_dir, tmp_path / "s", teacher=teacher_dir, steps=2).model_dump()
    cfg["teacher"] = {"kind": "cache", "path": str(teacher_dir), "cache": str(setting[3])}
    cfg["objectives"] = [{"kind": "hard_labels"}]
    with pytest.raises(DistilleryError, match="hard_labels cannot read a teacher cache"):
        run(RunConfig.model_validate(cfg))


def test_codec_round_trip_on_hand_made_rows():
    """exact: ids, log-probabilities and rest come back unchanged; compact: the same ids, each
    log-probability within half a quantisation step of its range, the rest within float16."""
    from distillery.teachers.cache_codec import LEVELS, decode_block, encode_block

    g = np.random.default_rng(0)
    vocab, t, k = 70_000, 5, 9  # ids need 3 bytes
    ids = np.stack([g.choice(vocab, k, replace=False) for _ in range(t)]).astype(np.int32)
    ids[0, :3] = [0, vocab - 1, 1]  # both ends of the vocabulary, a gap of 0
    logp = np.sort(-g.exponential(3.0, (t, k)), axis=1).astype(np.float32)[:, ::-1]
    rest = -g.exponential(2.0, t).astype(np.float32)
    for codec in ("exact", "compact"):
        record = encode_block(ids, logp, rest, vocab=vocab, codec=codec)
        got_ids, got_logp, got_rest = decode_block(record, seq_len=t, k=k, vocab=vocab, codec=codec)
        for row in range(t):
            order = np.argsort(ids[row])
            assert (got_ids[row] == ids[row][order]).all()  # sorted by id
            want = logp[row][order]
            if codec == "exact":
                assert (got_logp[row] == want).all() and (got_rest == rest).all()
            else:
                step = (want.max() - want.min()) / LEVELS
                assert np.abs(got_logp[row] - want).max() <= 0.5 * step + 2e-3 * abs(want).max()
                assert np.abs(got_rest - rest).max() <= 1e-3 * np.abs(rest).max()
    assert len(encode_block(ids, logp, rest, vocab=vocab, codec="compact")) < t * (8 * k + 4)


def test_compact_cache_keeps_the_forward_kl_of_the_exact_one(
    setting, small, cache_dir, teacher_dir, tmp_path
):
    """The same teacher and top-k stored compact (8-bit log-probabilities) and exact: a
    student's forward KL to them differs by < 0.5%, at a fraction of the bytes."""
    tokenizer, train, _, _ = setting
    vocab, k = len(tokenizer), 32
    caches = {}
    for codec in ("exact", "compact"):
        _cache(
            small, cache_dir, teacher_dir, tmp_path / codec, top_k=k, temperature=2.0, codec=codec
        )
        caches[codec] = CachedTeacher(
            tmp_path / codec, train, cache_key(teacher_dir, tokenizer, train)
        )
    assert caches["compact"].meta["bytes_per_position"] < 0.5 * (8 * k + 4)
    ids = train.blocks(list(range(8)))
    labels = shift_labels(ids)
    student = load_pretrained(teacher_dir)
    with torch.no_grad():  # a student clearly unlike the teacher (KL well above rounding)
        student.get_output_embeddings().weight.add_(torch.randn_like(student.lm_head.weight))
    terms = terms_from_config([{"kind": "forward_kl", "temperature": 2.0}])
    kl = {c: DistillStep(terms, t, vocab=vocab)(student, ids, labels)[0] for c, t in caches.items()}
    assert kl["exact"] > 0.05
    assert abs(kl["compact"] - kl["exact"]) <= 5e-3 * kl["exact"]


def test_an_old_cache_is_refused_in_one_line(setting, tmp_path):
    _, train, _, folder = setting
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((folder / "cache.json").read_text())
    (old / "cache.json").write_text(json.dumps({**meta, "version": "distillery-teacher-cache-v1"}))
    with pytest.raises(DistilleryError, match=r"another format .*rebuild it"):
        CachedTeacher(old, train, {})
