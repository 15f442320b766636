#!/usr/bin/env python
"""tacnas command line: profile, search, resume, status, export, report, distill.

Parses and dispatches only. A user's mistake (config, data, checkpoint, storage, budget) exits
with code 2 and a one-line message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import yaml

from tacnas.errors import UserError

log = logging.getLogger("tacnas")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    def storage_args(sp, run_dir=True, study_required=True):
        sp.add_argument("--study", required=study_required,
                        help="study name (default: the config file's name)")
        sp.add_argument("--storage", help="Optuna storage URL (default: sqlite in the run folder)")
        if run_dir:
            sp.add_argument("--run-dir", default="runs", help="where runs/<study>/ lives")

    def search_args(sp):
        sp.add_argument("--config", required=True)
        storage_args(sp, run_dir=False, study_required=False)
        sp.add_argument("--n-trials", type=int, help="trained candidates in the study, in total")
        sp.add_argument("--timeout", type=float, help="seconds of search in this process")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set search.n_trials=5")

    search_args(sub.add_parser("search", help="start (or join) a search"))
    c = sub.add_parser("compress", help="search, then distill the best student fully and "
                                        "write it as a model to ship (search + distill)")
    search_args(c)
    c.add_argument("--out", help="the distilled student's folder (default: runs/<study>/final)")
    runtimes_arg(c)

    pr = sub.add_parser("profile", help="profile this device's latency table for a config")
    pr.add_argument("--config", required=True)
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pr.add_argument("--fresh", action="store_true", help="discard the existing table first")

    r = sub.add_parser("resume", help="continue a study (its config is stored in it)")
    storage_args(r)
    r.add_argument("--n-trials", type=int, help="new total of trained candidates")
    r.add_argument("--timeout", type=float)

    st = sub.add_parser("status", help="a table of the study's trials and the best one")
    storage_args(st)

    e = sub.add_parser("export", help="write a trial as a Hugging Face folder with a report")
    storage_args(e)
    which = e.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, help="trial number (default: the best)")
    which.add_argument("--pareto", action="store_true",
                       help="every member of the feasible Pareto front, into OUT/trial_N/")
    e.add_argument("--out", required=True, help="output folder")
    runtimes_arg(e)

    d = sub.add_parser("distill", help="train a chosen student fully with KD; write it as export")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", metavar="STUDY[:TRIAL]",
                     help="a study's best trial, or trial TRIAL")
    src.add_argument("--arch", help="an arch.json (as export writes)")
    d.add_argument("--config", help="the run's config (default with --from: the study's)")
    d.add_argument("--storage", help="the study's storage URL (default: sqlite in the run folder)")
    d.add_argument("--run-dir", default="runs")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set distill.epochs=5")
    d.add_argument("--teacher-layers", metavar="I,J,...",
                   help="the teacher layer each student layer starts from, e.g. 0,2,4 "
                        "(default: spread over the teacher's depth, as in the search)")
    d.add_argument("--out", required=True, help="output folder (a checkpoint in it resumes)")
    runtimes_arg(d)

    rp = sub.add_parser("report", help="trials.png (latency vs score, front, budget, "
                                       "importances) and report.md")
    storage_args(rp)
    rp.add_argument("--out", required=True, help="output folder")
    return p


def runtimes_arg(p) -> None:
    p.add_argument("--runtimes", metavar="NAME,...",
                   help="where the written model is measured and scored: torch, onnxruntime, "
                        "onnxruntime-int8 (default: all three when ONNX Runtime is installed; "
                        "model.onnx and model.int8.onnx are written beside the weights unless "
                        "only torch is asked for)")


def _storage(args, run_dir: str, study: str) -> str:
    from tacnas.nas.study import default_storage

    return args.storage or default_storage(run_dir, study)


def _existing_storage(args) -> str:
    from tacnas.nas.study import run_folder

    if args.storage:
        return args.storage
    path = run_folder(args.run_dir, args.study) / "study.db"
    if not path.is_file():
        raise UserError(
            f"--study {args.study}: no {path}; pass --storage URL or --run-dir where it was run"
        )
    return f"sqlite:///{path}"


def _positive(flag: str, value, *, none_ok: bool = True):
    if value is None and none_ok:
        return value
    if value is None or value <= 0:
        raise UserError(f"{flag} {value}: must be a positive number")
    return value


def _start_search(args, cfg):
    """The study for ``search``/``compress``, created only once the task, the teacher and the
    budget's inputs have been prepared (a mistake found there leaves no study behind)."""
    from tacnas.nas.pipeline import prepare
    from tacnas.nas.study import check_name, create_or_load, run_folder

    _check_strategy_installed(cfg)
    name = check_name(args.study or Path(args.config).stem)
    run = prepare(cfg, progress=not args.quiet)
    study = create_or_load(name, _storage(args, cfg.run_dir, name), cfg)
    folder = run_folder(cfg.run_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run, study


def _search_config(args):
    from tacnas.nas.config import load_config

    _positive("--n-trials", args.n_trials)
    _positive("--timeout", args.timeout)
    overrides = list(args.set)
    if args.n_trials is not None:
        overrides.append(f"search.n_trials={args.n_trials}")
    return load_config(args.config, overrides)


def cmd_search(args) -> int:
    cfg = _search_config(args)
    run, study = _start_search(args, cfg)
    return _finish_search(run, study, cfg.search.n_trials, args.timeout or cfg.search.timeout)


def cmd_compress(args) -> int:
    """The one command from a config to a model to ship: the search (or its resumption), then
    the config's ``distill`` recipe on the best trial, written and measured as ``export``."""
    from tacnas.nas.deploy import parse_runtimes
    from tacnas.nas.distill import distill
    from tacnas.nas.export import check_out, pick_trial, search_summary
    from tacnas.nas.optuna_search import reuse_finalist
    from tacnas.nas.report import comparison_text
    from tacnas.nas.study import arch_of, check_name, run_folder

    cfg = _search_config(args)
    runtimes = parse_runtimes(args.runtimes)
    name = check_name(args.study or Path(args.config).stem)
    out = Path(args.out) if args.out else run_folder(cfg.run_dir, name) / "final"
    check_out(out)
    run, study = _start_search(args, cfg)
    _finish_search(run, study, cfg.search.n_trials, args.timeout or cfg.search.timeout)
    trial = pick_trial(study, None)
    print(f"\ndistilling the best student, trial #{trial.number} ({arch_of(trial).name}), with "
          f"the config's distill recipe into {out}")
    if reused := reuse_finalist(run, study, arch_of(trial), out):
        print(f"(search.rescore_recipe: distill trained it already: continuing from {reused})")
    report = distill(run, arch_of(trial), out, label=f"distilled (trial #{trial.number})",
                     search=search_summary(study, trial),
                     budget_ms=study.user_attrs.get("budget_ms"), runtimes=runtimes)
    print(comparison_text(report))
    dd = report["distill"]
    print(f"\n{dd['steps_run']} distillation steps{' (early stop)' if dd['early_stopped'] else ''}"
          f", best dev at step {dd['best_step']}; the model to ship: {out} "
          "(AutoModelForSequenceClassification.from_pretrained loads it)")
    return 0


def _check_strategy_installed(cfg) -> None:
    """Before the (possibly long) preparation: an optional strategy's library is importable."""
    if cfg.search.strategy.startswith("nni-"):
        from tacnas.nas.nni_search import import_nni

        import_nni()


def cmd_profile(args) -> int:
    from tacnas.evaluators.latency_table import teacher_arch
    from tacnas.nas.config import load_config
    from tacnas.nas.pipeline import profile_device
    from tacnas.nas.report import table as text_table

    cfg = load_config(args.config, args.set)
    if cfg.budget.latency != "predict":
        log.warning("budget.latency is %r: searches with this config will not use the table",
                    cfg.budget.latency)
    table, path, done, space, tc = profile_device(cfg, fresh=args.fresh,
                                                  progress=not args.quiet)
    fp = table.fingerprint
    print(f"latency table {path}")
    print(f"device: {fp['cpu']}, {fp['cores']} cores, {fp['threads']} threads, torch "
          f"{fp['torch']}, {fp['backend']}; batch {fp['batch_size']}, seq_len {fp['seq_len']}")
    print(f"profiled now: {done['blocks']} blocks, {done['whole_models']} whole models in "
          f"{done['seconds']:.1f} s (table: {len(table.blocks)} blocks, "
          f"{table.profile_seconds:.1f} s of profiling in all); unit {table.unit_ms:.3f} ms")
    forms = ", ".join(f"{k}: {c[0]:+.3f} ms + {c[1]:.3f} x blocks"
                      for k, c in sorted(table.correction.items()))
    print(f"correction: {forms or 'none'}")
    archs = sorted(space.all_archs(), key=table.predict_ms)
    teacher = teacher_arch(tc)
    rows = [[label, a.name, f"{table.predict_ms(a):.2f}", f"{table.block_sum(a):.2f}",
             f"{table.fit_points[a.name]:.2f}" if a.name in table.fit_points else "-"]
            for label, a in (("fastest", archs[0]), ("median", archs[len(archs) // 2]),
                             ("slowest", archs[-1]), ("teacher", teacher))]
    print(text_table(["", "architecture", "predicted ms", "blocks sum ms", "measured ms"], rows))
    return 0


def cmd_resume(args) -> int:
    from tacnas.nas.pipeline import prepare
    from tacnas.nas.study import load_study, stored_config

    _positive("--n-trials", args.n_trials)
    _positive("--timeout", args.timeout)
    study = load_study(args.study, _existing_storage(args))
    cfg = stored_config(study.user_attrs, args.study)
    _check_strategy_installed(cfg)
    run = prepare(cfg, progress=not args.quiet)
    return _finish_search(run, study, args.n_trials, args.timeout)


def _finish_search(run, study, n_trials, timeout) -> int:
    from tacnas.nas.report import status_text
    from tacnas.nas.strategy import search

    summary = search(run, study, n_trials=n_trials, timeout=timeout)
    print(status_text(study))
    if run.cfg.search.strategy != "differentiable":
        print(f"\n{summary['trained']} trained of {summary['target']} requested")
    elif "derived" in summary:
        within = ("" if summary["budget_ms"] is None
                  else f" against a budget of {summary['budget_ms']:.2f} ms")
        print(f"\nderived {summary['arch']} ({summary['derived']}): "
              f"{summary['latency_ms']:.2f} ms{within}; supernet dev score "
              f"{summary['score']:.4f}; {summary['seconds']:.0f} s of search")
    return 0


def cmd_status(args) -> int:
    from tacnas.nas.report import status_text
    from tacnas.nas.study import load_study

    print(status_text(load_study(args.study, _existing_storage(args))))
    return 0


def cmd_export(args) -> int:
    from tacnas.nas.deploy import parse_runtimes
    from tacnas.nas.export import check_out, export_trial, pick_trial
    from tacnas.nas.pipeline import prepare
    from tacnas.nas.report import comparison_text
    from tacnas.nas.study import feasible_trained, load_study, pareto_front, stored_config

    runtimes = parse_runtimes(args.runtimes)
    study = load_study(args.study, _existing_storage(args))
    if args.pareto:
        trials = pareto_front(feasible_trained(study))
        if not trials:
            raise UserError(f"--study {args.study}: no trained candidate within the budget yet")
    else:
        trials = [pick_trial(study, args.trial)]
    outs = [Path(args.out) / f"trial_{t.number}" if args.pareto else Path(args.out)
            for t in trials]
    if args.pareto and Path(args.out).is_file():
        raise UserError(f"--out {args.out}: is a file; name a folder (it is created)")
    for out in outs:  # before the (long) preparation
        check_out(out)
    run = prepare(stored_config(study.user_attrs, args.study), progress=not args.quiet)
    for trial, out in zip(trials, outs):
        report = export_trial(run, study, trial, out, runtimes=runtimes)
        print(comparison_text(report))
        print(f"\nexported to {out} (AutoModelForSequenceClassification.from_pretrained loads it)\n")
    return 0


def cmd_distill(args) -> int:
    import json

    from tacnas.nas.config import apply_overrides, config_from_dict, load_config
    from tacnas.nas.deploy import parse_runtimes
    from tacnas.nas.distill import distill
    from tacnas.nas.export import pick_trial, search_summary
    from tacnas.nas.pipeline import prepare
    from tacnas.nas.report import comparison_text
    from tacnas.nas.study import arch_of, load_study, stored_config
    from tacnas.searchspace.arch import ArchConfig

    search, budget_ms = None, None
    runtimes = parse_runtimes(args.runtimes)
    if args.source:
        name, _, number = args.source.partition(":")
        if number and not number.isdigit():
            raise UserError(f"--from {args.source}: expected STUDY or STUDY:TRIAL (a number)")
        args.study = name
        study = load_study(name, _existing_storage(args))
        trial = pick_trial(study, int(number) if number else None)
        arch = arch_of(trial)
        cfg = load_config(args.config, args.set) if args.config else config_from_dict(
            apply_overrides(stored_config(study.user_attrs, name).to_dict(), args.set),
            source=f"study {name}")
        search = search_summary(study, trial)
        budget_ms = study.user_attrs.get("budget_ms")
        label = f"distilled (trial #{trial.number})"
    else:
        if not args.config:
            raise UserError("--config: required with --arch (the task, teacher and budget)")
        try:
            arch = ArchConfig.from_json(Path(args.arch).read_text())
        except OSError as e:
            raise UserError(f"--arch {args.arch}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"--arch {args.arch}: not JSON ({e.msg})") from None
        cfg = load_config(args.config, args.set)
        label = "distilled"
    layers = None
    if args.teacher_layers:
        try:
            layers = [int(x) for x in args.teacher_layers.split(",")]
        except ValueError:
            raise UserError(f"--teacher-layers {args.teacher_layers}: expected integers "
                            "separated by commas, e.g. 0,2,4") from None
    run = prepare(cfg, progress=not args.quiet)
    report = distill(run, arch, Path(args.out), label=label, search=search, budget_ms=budget_ms,
                     layers=layers, runtimes=runtimes)
    dd = report["distill"]
    print(comparison_text(report))
    print(f"\n{dd['steps_run']} of {dd['planned_steps']} steps"
          f"{' (early stop)' if dd['early_stopped'] else ''}, best dev at step {dd['best_step']},"
          f" {dd['train_seconds']:.0f} s; written to {args.out}")
    return 0


def cmd_report(args) -> int:
    from tacnas.nas.report import write_report
    from tacnas.nas.study import load_study

    done = write_report(load_study(args.study, _existing_storage(args)), Path(args.out))
    print(f"wrote {done['png']} and {done['md']}; Pareto front: "
          + ", ".join(f"#{n}" for n in done["front"]))
    return 0


COMMANDS = {"profile": cmd_profile, "search": cmd_search, "compress": cmd_compress, "resume": cmd_resume,
            "status": cmd_status, "export": cmd_export, "report": cmd_report,
            "distill": cmd_distill}


def _not_a_failed_trial(record) -> bool:
    """Optuna's report of a failed trial (with a traceback for Ctrl-C) is left out: a diverged
    trial is reported by the search in one line, Ctrl-C by ours, a bug by its own traceback."""
    return not re.match(r"Trial \d+ failed with", record.getMessage())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING if args.quiet else getattr(logging, args.log_level)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import optuna
    import transformers

    optuna.logging.set_verbosity(optuna.logging.DEBUG if level <= logging.DEBUG else optuna.logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for handler in optuna.logging.get_logger("optuna").handlers:
        handler.addFilter(_not_a_failed_trial)
    if args.quiet:
        import datasets

        datasets.disable_progress_bars()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished trials are kept; continue with `run_search.py resume`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
