"""``distillery <command>``: each command is a thin call into a recipe.

Configs are YAML files (``--config``) plus ``key=value`` overrides (``train.lr=3e-4``); the
common flags (``--data``, ``--teacher``, ``--student``, ``--out``) are shorthands for fields.
Problems with the user's input print one ``distillery: error: ...`` line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from distillery.errors import DistilleryError
from distillery.interrupt import sigint_seen, watch_sigint


def _model_spec(value: str) -> dict[str, Any]:
    """``--student``/``--model``: an existing folder, else a preset name."""
    if Path(value).exists() or "/" in value:
        return {"path": value, "preset": None}
    return {"preset": value, "path": None}


def _run_config(args: argparse.Namespace, command: str) -> Any:
    from distillery.config import RunConfig, build_config, deep_merge, load_yaml

    base: dict[str, Any] = {}
    saved = Path(args.out) / "config.yaml" if args.out else None
    if args.resume and saved is not None and saved.is_file():
        base = load_yaml(saved)  # resume what was started; overrides may still change it
    shorthands: dict[str, Any] = {}
    if args.data:
        shorthands["data"] = {"source": args.data}
    if getattr(args, "teacher", None):  # --teacher A [--teacher B ...]: an ensemble
        # {path: ...} without a kind: a live teacher, unless an override names another kind
        # (``teacher.kind=mc_dropout``, ``teacher.kind=cache teacher.cache=DIR``).
        paths = args.teacher[0] if len(args.teacher) == 1 else args.teacher
        shorthands["teacher"] = {"path": paths}
    if args.student:
        shorthands["model"] = _model_spec(args.student)
    if args.out:
        shorthands["out"] = args.out
    if command == "distill" and "objectives" not in base:
        base.setdefault("objectives", [{"kind": "ce"}, {"kind": "forward_kl", "temperature": 2.0}])
    deep_merge(base, load_yaml(Path(args.config)) if args.config else {})
    deep_merge(base, shorthands)
    cfg = build_config(RunConfig, None, args.overrides, base=base)
    if command == "distill" and cfg.teacher is None:
        raise DistilleryError("distill needs a teacher: --teacher DIR (an HF model folder)")
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from distillery.recipes.run import run

    cfg = _run_config(args, args.command)
    summary = run(
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_after=args.stop_after,
        name=args.command,
    )
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from distillery.recipes.evaluate import evaluate_folder

    result = evaluate_folder(
        Path(args.model),
        teacher=Path(args.teacher) if args.teacher else None,
        data=args.data or "bbc-news",
        overrides=args.overrides,
        out=Path(args.out) if args.out else None,
    )
    print(json.dumps(result, indent=2))
    return 0


def _recipe_config(cls: type, args: argparse.Namespace) -> Any:
    """A recipe's config: ``--config`` file, then the ``--out``/``--data`` shorthands, then
    ``key=value`` overrides (later ones win)."""
    from distillery.config import build_config, deep_merge, load_yaml

    base: dict[str, Any] = load_yaml(Path(args.config)) if args.config else {}
    shorthands: dict[str, Any] = {}
    if args.out:
        shorthands["out"] = args.out
    if args.data:
        shorthands["data"] = {"source": args.data}
    deep_merge(base, shorthands)
    return build_config(cls, None, args.overrides, base=base)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from distillery.recipes.quickstart import QuickstartConfig, quickstart

    quickstart(_recipe_config(QuickstartConfig, args), overwrite=args.overwrite)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from distillery.recipes.ablate import AblationConfig, ablate

    ablate(_recipe_config(AblationConfig, args), overwrite=args.overwrite)
    return 0


def cmd_mode(args: argparse.Namespace) -> int:
    from distillery.config import load_yaml
    from distillery.recipes.modes import compare_modes
    from distillery.recipes.modes_config import ModesConfig

    file = load_yaml(Path(args.config)) if args.config else {}
    mode = file.get("mode")
    given = mode.get("kind") if isinstance(mode, dict) else None
    if given is not None and given != args.mode:
        raise DistilleryError(
            f"config file {args.config} is for mode {given!r}, not {args.mode!r}; run "
            f"`distillery mode {given}` or remove its mode.kind"
        )
    extra = [f"mode.kind={args.mode}"]
    if args.generations is not None:
        if args.mode != "self-distill":
            raise DistilleryError("--generations is for `distillery mode self-distill`")
        extra.append(f"mode.generations={args.generations}")
    if not args.out and "out" not in file:
        args.out = f"runs/modes/{args.mode}"
    args.overrides = [*extra, *args.overrides]
    compare_modes(_recipe_config(ModesConfig, args), overwrite=args.overwrite)
    return 0


# ``distillery experiment NAME``: the seeded studies (module, config class, function); with
# ``--quick`` they run their first seed only.
STUDIES = {
    "codistill": ("codistill_study", "CodistillStudyConfig", "codistill_study"),
    "codistill-hetero": ("codistill_hetero", "CodistillHeteroConfig", "codistill_hetero"),
    "classifiers": ("classifiers", "ClassifiersConfig", "classifiers"),
    "iit": ("iit", "IITStudyConfig", "iit_study"),
    "on-policy": ("on_policy", "OnPolicyStudyConfig", "on_policy_study"),
    "cross-tokenizer": ("cross_tokenizer", "CrossTokenizerStudyConfig", "cross_tokenizer_study"),
    "prune": ("prune_study", "PruneStudyConfig", "prune_study"),
    "pool-ensemble": ("pool_ensemble", "PoolEnsembleConfig", "pool_ensemble"),
}


def cmd_experiment(args: argparse.Namespace) -> int:
    if args.experiment in STUDIES:
        import importlib

        module, cls, fn = STUDIES[args.experiment]
        recipe = importlib.import_module(f"distillery.recipes.{module}")
        study = _recipe_config(getattr(recipe, cls), args)
        if args.quick:
            study = study.model_copy(update={"seeds": study.seeds[:1]})
        getattr(recipe, fn)(study, overwrite=args.overwrite)
        return 0
    from distillery.recipes.distill_expand import DistillExpandConfig, distill_expand

    cfg = _recipe_config(DistillExpandConfig, args)
    if args.quick:  # one seed, one sweep point: a smoke run of the whole protocol
        cfg = cfg.model_copy(update={"seeds": cfg.seeds[:1], "sweep": cfg.sweep[:1]})
    distill_expand(cfg, overwrite=args.overwrite)
    return 0


def cmd_codistill(args: argparse.Namespace) -> int:
    from distillery.config import CodistillConfig
    from distillery.recipes.codistill import codistill

    codistill(
        _recipe_config(CodistillConfig, args),
        peer=args.peer,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from distillery.recipes.calibrate import CalibrateConfig, calibrate

    calibrate(_recipe_config(CalibrateConfig, args), overwrite=args.overwrite)
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from distillery.config import CacheTeacherConfig
    from distillery.recipes.cache import cache_teacher

    if args.teacher:
        args.overrides = [f"teacher={args.teacher}", *args.overrides]
    meta = cache_teacher(_recipe_config(CacheTeacherConfig, args), overwrite=args.overwrite)
    print(json.dumps(meta, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from distillery.recipes.generate import GenerateConfig, generate

    if args.teacher:
        args.overrides = [f"teacher={args.teacher}", *args.overrides]
    manifest = generate(_recipe_config(GenerateConfig, args), overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=2))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from distillery.recipes.prune import PruneConfig, prune

    if args.teacher:
        args.overrides = [f"teacher={args.teacher}", *args.overrides]
    summary = prune(_recipe_config(PruneConfig, args), overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if "importance" not in k}, indent=2))
    return 0


def cmd_teachers(args: argparse.Namespace) -> int:
    from distillery.recipes.teacher_stage import TeachersConfig, teachers

    teachers(_recipe_config(TeachersConfig, args), reuse=not args.overwrite)
    return 0


def common(p: argparse.ArgumentParser) -> None:
    """The flags every config-driven command takes."""
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--data", help="'bbc-news', a text file/folder, .jsonl or .csv")
    p.add_argument("--out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _run_commands(sub: Any) -> None:
    """``train``, ``distill`` and ``eval``."""
    for name, text in (("train", "train a model on data"), ("distill", "distil a teacher")):
        p = sub.add_parser(name, help=text)
        common(p)
        p.add_argument("--student", "--model", dest="student", help="preset name or model folder")
        if name == "distill":
            p.add_argument(
                "--teacher",
                action="append",
                help="teacher model folder (HF format); repeat for an ensemble of teachers",
            )
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
        p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="evaluate a model folder (optionally against a teacher)")
    p.add_argument("--model", "--student", dest="model", required=True, help="model folder")
    p.add_argument("--teacher", help="teacher folder: adds agreement and KL")
    p.add_argument("--data", help="'bbc-news', a text file/folder, .jsonl or .csv")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.seq_len=256")
    p.set_defaults(func=cmd_eval)


def _study_commands(sub: Any) -> None:
    """The recipes that run several runs: quickstart, ablate, mode, experiment, calibrate."""
    p = sub.add_parser("quickstart", help="teacher → distilled student vs scratch, with a report")
    common(p)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser(
        "ablate", help="the same student distilled with each objective removed, over seeds"
    )
    common(p)
    p.set_defaults(func=cmd_ablate)

    from distillery.recipes.modes_config import MODES

    p = sub.add_parser(
        "mode", help="a distillation mode vs plain distillation at equal compute, over seeds"
    )
    p.add_argument("mode", choices=MODES, help="which mode to run")
    common(p)
    p.add_argument(
        "--generations", type=int, default=None, help="self-distill: born-again generations"
    )
    p.set_defaults(func=cmd_mode)

    p = sub.add_parser(
        "experiment",
        help="a lab experiment: distill-expand (distil mid-training, grow back), iit "
        "(interchange intervention training at equal compute), codistill (pools vs alone), "
        "codistill-hetero (unequal peers on their own cores, a slowed worker, a "
        "kill-and-rejoin), "
        "classifiers (DistilBERT's recipe: retained-performance table), on-policy (GKD vs "
        "supervised and sequence-level KD), cross-tokenizer (ULD from a teacher with another "
        "tokenizer), pool-ensemble (a codistilled pool vs independent peers as ensembles, and "
        "students distilled from each)",
    )
    p.add_argument(
        "experiment",
        choices=["distill-expand", *STUDIES],
        help="which experiment",
    )
    common(p)
    p.add_argument("--quick", action="store_true", help="one seed (distill-expand: one point)")
    p.set_defaults(func=cmd_experiment)
    p = sub.add_parser(
        "calibrate",
        help="single model, temperature scaling, MC dropout, deep ensemble and students "
        "distilled from them: calibration over seeds",
    )
    common(p)
    p.set_defaults(func=cmd_calibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery", description="Distil transformer language models into smaller students."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _run_commands(sub)
    _study_commands(sub)
    p = sub.add_parser(
        "codistill",
        help="one peer of a codistillation pool (torchrun: one process per peer, or --peer I)",
    )
    common(p)
    p.add_argument("--peer", type=int, default=None, help="run peer I alone (no torchrun)")
    p.add_argument("--resume", action="store_true", help="continue from the peer's checkpoint")
    p.set_defaults(func=cmd_codistill)
    p = sub.add_parser(
        "cache-teacher", help="store a teacher's top-k over the training data, to distil from"
    )
    common(p)
    p.add_argument("--teacher", help="teacher model folder (HF format)")
    p.set_defaults(func=cmd_cache_teacher)
    p = sub.add_parser(
        "generate",
        help="a model folder completes prompt data into JSONL shards (sequence-level KD data)",
    )
    common(p)
    p.add_argument("--teacher", "--model", dest="teacher", help="the generating model folder")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser(
        "prune", help="cut a student from a teacher folder by importance (depth and/or width)"
    )
    common(p)
    p.add_argument("--teacher", help="teacher model folder (HF format)")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser(
        "teachers", help="train teachers to early stopping, once per config and seed"
    )
    common(p)
    p.set_defaults(func=cmd_teachers)
    return parser


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after the options.
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    watch_sigint()
    try:  # everything, imports included: Ctrl-C in the first seconds is one line too
        return _main(argv)
    except DistilleryError as exc:
        print(f"distillery: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except Exception:  # Ctrl-C inside a lazy import can surface as another error
        if sigint_seen():
            return _interrupted()
        raise


def _interrupted() -> int:
    print("distillery: interrupted; `--resume` continues from the last checkpoint", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
