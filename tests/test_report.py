"""Reports and model cards: written by a real tiny run, a study and the quickstart's report
writer, parsed by huggingface_hub and rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard

from distillery.config import CodistillConfig, RunConfig
from distillery.recipes.run import run
from distillery.recipes.study import write_study
from distillery.report import plot_loss_curves, read_metrics, write_report
from distillery.report.card import write_model_card
from distillery.report.html import markdown_to_html
from tests.conftest import tiny_run

# Every image loaded and drawn, every table with rows of cells, nothing fetched from outside.
PAGE_FACTS = """
const imgs = [...document.images];
return {
  title: document.title,
  h1: document.querySelector('h1') ? document.querySelector('h1').textContent : null,
  images: imgs.length,
  drawn: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
  sources: imgs.map(i => i.getAttribute('src').slice(0, 22)),
  tables: [...document.querySelectorAll('table')].map(t => ({
    rows: t.querySelectorAll('tbody tr').length,
    cells: [...t.querySelectorAll('tr')].map(r => r.querySelectorAll('td, th').length),
  })),
  external: [...document.querySelectorAll('[src], [href]')]
    .map(e => e.getAttribute('src') || e.getAttribute('href'))
    .filter(u => /^(https?:)?\\/\\//.test(u)).length,
  scripts: document.querySelectorAll('script').length,
  text: document.body.innerText,
};
"""


@pytest.fixture(scope="module")
def browser() -> Any:
    """Headless Chromium through selenium, or a visible skip when it is not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if driver_path is None or chromium is None:
        pytest.skip("chromium-driver not installed: apt-get install chromium chromium-driver")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    yield driver
    driver.quit()


def page_facts(browser: Any, path: Path) -> dict[str, Any]:
    browser.get(path.resolve().as_uri())
    facts = browser.execute_script(PAGE_FACTS)
    assert facts["images"] == facts["drawn"], facts["sources"]
    assert all(s.startswith("data:image/png;base64,") for s in facts["sources"])
    assert facts["external"] == 0 and facts["scripts"] == 0
    for table in facts["tables"]:
        assert table["rows"] > 0 and all(n > 0 for n in table["cells"]), table
    return facts


@pytest.fixture(scope="module")
def distilled(corpus: Path, cache_dir: Path, teacher_dir: Path, tmp_path_factory) -> Path:
    """A tiny run distilled from the conftest teacher with task CE + forward KL at T=2."""
    out = tmp_path_factory.mktemp("report") / "student"
    cfg = tiny_run(corpus, cache_dir, out, teacher=teacher_dir)
    objectives = [{"kind": "ce"}, {"kind": "forward_kl", "weight": 0.5, "temperature": 2.0}]
    cfg = RunConfig.model_validate({**cfg.model_dump(mode="json"), "objectives": objectives})
    run(cfg, name="student")
    return out


def test_the_run_report_renders_in_a_browser(distilled: Path, browser: Any):
    summary = json.loads((distilled / "summary.json").read_text(encoding="utf-8"))
    facts = page_facts(browser, distilled / "report.html")
    assert facts["title"] == facts["h1"] == "distillery run: student"
    assert facts["images"] == 1  # the loss curves: vs steps and vs FLOPs
    assert len(facts["tables"]) >= 3  # metrics, cost, provenance
    assert f"{summary['val_ppl']:.2f}" in facts["text"]
    assert f"{summary['flops']:.3e}" in facts["text"]  # teacher forwards included
    assert "temperature: 2.0" in facts["text"]  # the config, as YAML


def test_the_model_card_parses_and_says_how_it_was_made(distilled: Path, teacher_dir: Path):
    summary = json.loads((distilled / "summary.json").read_text(encoding="utf-8"))
    card = ModelCard.load(distilled / "model" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["base_model"] == str(teacher_dir)
    assert {"distillery", "knowledge-distillation", "causal-lm"} <= set(data["tags"])
    assert data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["news.jsonl"] and "license" not in data
    assert "`forward_kl`, weight 0.5 (temperature=2.0)" in card.text
    assert f"{summary['agreement']:.4f}" in card.text
    teacher = json.loads((teacher_dir.parent / "summary.json").read_text(encoding="utf-8"))
    assert f"{teacher['val_ppl']:.2f}" in card.text  # the teacher's own, from the lab's summary
    own = 6.0 * summary["compute_params"] * summary["tokens"]
    assert f"{summary['flops'] - own:.3e}" in card.text and summary["flops"] > own


def test_a_card_without_a_measured_teacher_or_with_a_pool(tmp_path: Path):
    teacher = tmp_path / "outside" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a teacher\n")
    cfg = {"data": {"task": "classify"}, "teacher": {"kind": "live", "path": [str(teacher)] * 2}}
    summary = {"name": "s", "params": 10, "val_loss": 1.0, "accuracy": 0.5}
    (tmp_path / "m").mkdir()
    card = ModelCard.load(write_model_card(tmp_path / "m", config=cfg, summary=summary))
    assert card.data.base_model == [str(teacher)] * 2 and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-classification"
    assert "was not measured" in card.text and "BBC's" in card.text

    pool = CodistillConfig.model_validate(
        {"peers": [{"preset": "tiny"}, {"preset": "tiny"}], "out": str(tmp_path / "pool-run")}
    )
    peer_summary = {"name": "peer1", "peer": 1, "val_loss": 2.0, "flops": 1e9}
    peer_summary |= {"params": 10, "compute_params": 8, "tokens": 100}
    (tmp_path / "p").mkdir()
    card = ModelCard.load(write_model_card(tmp_path / "p", config=pool, summary=peer_summary))
    assert card.data.base_model is None and "codistillation" in card.data.tags
    assert "Peer 1 of a codistillation pool of 2" in card.text
    assert "other peers' forwards" in card.text and "teacher's forwards" not in card.text
    assert str(tmp_path / "pool-run" / "pool") in card.text


def test_a_study_page_has_its_tables_and_only_its_new_plots(tmp_path: Path, browser: Any):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "older.png").write_bytes(b"not this study's")  # left from another study
    table = "\n".join(
        [
            "# Ablation (tiny, seeds [0, 1])",
            "",
            "Teacher: **4 layers**; the <script>alert(1)</script> stays text.",
            "",
            "| arm | objectives | val ppl |",
            "|---|---|---:|",
            "| full | 5·forward_kl \\| ce | 292.7 ± 0.8 |",
            "| no-kl | `ce` | 273.0 ± 0.4 |",
            "",
            "- one bullet",
            "- another",
        ]
    )
    records = [{"step": s, "flops": 1e6 * s, "ce": 5.0 - 0.1 * s} for s in range(1, 6)]

    def plot(dest: Path) -> None:
        plot_loss_curves({"arm": records}, dest / "curves.png")

    result = {"config": {"seeds": [0, 1]}, "hardware": "test-machine"}
    write_study("ablation", result, table, [folder], plot)
    facts = page_facts(browser, folder / "ablation.html")
    assert facts["title"] == "Ablation (tiny, seeds [0, 1])"
    assert facts["images"] == 1  # curves.png, not older.png
    main = facts["tables"][0]
    assert main["rows"] == 2 and main["cells"] == [3, 3, 3]
    assert "5·forward_kl | ce" in facts["text"] and "<script>alert(1)</script>" in facts["text"]
    assert "test-machine" in facts["text"] and "seeds:" in facts["text"]


def test_the_quickstart_report_has_an_html_twin(distilled: Path, tmp_path: Path, browser: Any):
    summary = json.loads((distilled / "summary.json").read_text(encoding="utf-8"))
    models = {"student": {"run_dir": str(distilled), **summary}}
    write_report(tmp_path, models, title="distillery quickstart", notes=["One *note*."])
    facts = page_facts(browser, tmp_path / "report.html")
    assert facts["title"] == "distillery quickstart" and facts["images"] == 1
    assert facts["tables"][0]["rows"] == 1 and facts["tables"][0]["cells"][0] == 11
    assert f"{summary['val_ppl']:.1f}" in facts["text"]
    assert read_metrics(distilled)  # the curves came from the run's own metrics


def test_markdown_conversion_escapes_and_aligns():
    out = markdown_to_html("| a | b |\n|:---|---:|\n| x<y | **1** |\n\ntext `<b>`")
    assert '<td style="text-align:left">x&lt;y</td>' in out
    assert '<td style="text-align:right"><strong>1</strong></td>' in out
    assert "<code>&lt;b&gt;</code>" in out


def test_compute_panel_charges_the_teachers_training(tmp_path: Path, monkeypatch):
    import matplotlib.axes

    drawn: list[tuple[str, list[float]]] = []
    real = matplotlib.axes.Axes.plot

    def record(self, xs, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(xs)))
        return real(self, xs, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    records = [{"step": s, "flops": 1e6 * s, "ce": 5.0 - 0.1 * s} for s in range(1, 4)]
    plot_loss_curves({"distilled": records, "scratch": records}, tmp_path / "c.png",
                     charged={"distilled": 1e9})  # fmt: skip
    by_flops = {label: xs for label, xs in drawn[1::2]}  # step panel, then compute panel
    assert by_flops["distilled"] == [1e9 + 1e6, 1e9 + 2e6, 1e9 + 3e6]
    assert by_flops["scratch"] == [1e6, 2e6, 3e6]


def test_seed_band_draws_the_mean_and_one_std_either_side():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distillery.report import plot_seed_band

    fig, (two, one) = plt.subplots(1, 2)
    seeds = [[(1.0, 4.0), (2.0, 3.0), (3.0, 9.0)], [(3.0, 6.0), (4.0, 5.0)]]  # second is shorter
    assert plot_seed_band(two, seeds) == ([2.0, 3.0], [5.0, 4.0])
    (band,) = two.collections
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert (low, high) == pytest.approx((4.0 - 2**0.5, 5.0 + 2**0.5))  # sample std √2
    plot_seed_band(one, seeds[:1])
    assert not one.collections  # one seed: no spread to show
    plt.close(fig)
