"""`r1`: run the pipeline or one stage, evaluate a model, show the resolved config.

    r1 run pipeline [--config FILE] [--set key=value ...]
    r1 run stage NAME [--config FILE] [--set key=value ...] [--init-model DIR] [--no-register]
    r1 stages                                           the stage catalog
    r1 eval --model PATH_OR_MODELS_URI --data FILE [--k K] [--base-url URL --served-model NAME]
    r1 eval --model A --model B [--model C ...] --data FILE [--k K]   B - A, C - A on the same prompts
    r1 config [--config FILE] [--set key=value ...]
    r1 plan [--config FILE] [--set key=value ...] [--json]   memory per stage and worker, before a run
    r1 serve [--config FILE] [--set key=value ...]      the Prefect deployments, served until stopped
    r1 ui [--prefect-port P] [--mlflow-port M] [--artifacts-destination DIR] [--stop]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from flows import catalog
from r1core.config import ConfigError, load_config


def local_defaults(workdir: str) -> None:
    """Project-local Prefect home unless PREFECT_API_URL / PREFECT_HOME point elsewhere; runs go
    to the Prefect server that `make ui` started for this same workdir when it is up, else to an
    ephemeral local API (never to whatever else listens on 127.0.0.1:4200)."""
    if "PREFECT_API_URL" not in os.environ and (url := _this_workdirs_ui(workdir)):
        os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_HOME", str(Path(workdir).resolve() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the ephemeral API server gets 20 s to start by default: too tight on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def _this_workdirs_ui(workdir: str) -> str | None:
    """The API URL of the Prefect server `r1 ui` runs for `workdir`, if its launcher is alive."""
    from flows.ui import pid_file

    try:
        started = json.loads(pid_file(workdir).read_text())
        os.kill(int(started["launcher"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    url = f"{started['prefect'].rstrip('/')}/api"
    return url if _healthy(url + "/health") else None


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks of errors (a bad input is otherwise one line)")
    p.add_argument("--config", help="profile YAML (default configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set r1_zero.steps=10 (repeatable)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="r1", description="DeepSeek-R1 recipe: Prefect + Ray + MLflow")
    ap.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline or one stage as Prefect flows")
    run_sub = run.add_subparsers(dest="what", required=True)
    _config_args(run_sub.add_parser("pipeline", help="all stages"))
    stage = run_sub.add_parser("stage", help="one stage")
    stage.add_argument("name", choices=list(catalog.CATALOG))
    stage.add_argument("--init-model", help="model dir or models:/ URI the stage starts from (default: the model of "
                       "the stage it starts from in this configuration, see `r1 stages`)")
    stage.add_argument("--no-register", action="store_true",
                       help="evaluate but do not register the model (ablations)")
    _config_args(stage)
    ev = sub.add_parser("eval", help="held-out pass@1 / cons@k / format rate of a model, or of several "
                        "compared on the same prompts")
    ev.add_argument("--model", required=True, action="append",
                    help="HF model dir, or models:/name@alias, runs:/id/model; given again, each further model "
                         "is compared with the first: the paired difference in pass@1 and readability over "
                         "prompts, with a 95%% bootstrap interval")
    ev.add_argument("--data", required=True, help="JSONL or parquet rows {prompt, answer, task}")
    ev.add_argument("--k", type=int, help="samples per prompt (default: eval.k)")
    ev.add_argument("--num-prompts", type=int, help="first N rows (default: eval.num_prompts)")
    ev.add_argument("--base-url", help="OpenAI-compatible server (e.g. vllm serve) instead of in-process")
    ev.add_argument("--served-model", help="model name on that server")
    _config_args(ev)
    data = sub.add_parser("data", help="prepare data files")
    data_sub = data.add_subparsers(dest="what", required=True)
    imp = data_sub.add_parser("import-code", help="HumanEval / MBPP problems (JSONL, .gz too) as code rows "
                                                "{prompt, task: code, tests, entry_point} for data.train_file")
    imp.add_argument("file", help="HumanEval.jsonl(.gz) or an MBPP JSONL file")
    imp.add_argument("--out", required=True, help="JSONL file to write (atomically)")
    sub.add_parser("stages", help="the stage catalog: each stage, its kind, config section, starting model and "
                                  "registered name")
    _config_args(sub.add_parser("config", help="print the resolved configuration"))
    _config_args(sub.add_parser("doctor", help="check the environments the configuration uses (this one, and "
                                               "the vLLM environment of rollout.backend vllm) and the files it "
                                               "names (data rows, models) before a run"))
    plan = sub.add_parser("plan", help="per stage and worker: estimated memory (parameters, gradients, optimizer, "
                                       "activations, logits, reference, generation) and tokens per step")
    plan.add_argument("--json", action="store_true", help="the plans as JSON")
    _config_args(plan)
    _config_args(sub.add_parser("serve", help="register the deployments (pipeline, every stage, scheduled "
                                              "retrain) with the Prefect API and run their flow runs"))
    ui = sub.add_parser("ui", help="Prefect server + MLflow server + `r1 serve` on 127.0.0.1 (Ctrl-C stops all)")
    ui.add_argument("--prefect-port", type=int, default=4200)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.add_argument("--artifacts-destination", help="the MLflow server keeps artifacts here and flow runs upload "
                                                    "them over HTTP (default: the local store, as `make demo`)")
    ui.add_argument("--stop", action="store_true", help="stop the UI started from this workdir")
    _config_args(ui)
    return ap


def doctor(cfg) -> int:
    """One line per environment check; exit 1 if any fails."""
    import platform
    from importlib.metadata import version

    from flows.plan import vllm_users
    from tasks.environments import EnvironmentMismatch, check_vllm_environment, resolve_python

    print(f"ok    this environment: Python {platform.python_version()}, " +
          ", ".join(f"{p} {version(p)}" for p in ("torch", "ray", "prefect", "mlflow", "transformers")))
    uses = vllm_users(cfg)
    failed = False
    for python, stages in sorted(uses.items()):
        try:
            found = check_vllm_environment(python)
            print(f"ok    vLLM environment '{resolve_python(python)}' ({', '.join(stages)}): vllm {found['vllm']}, "
                  f"ray {found['ray']}, torch {found['torch']}, Python {found['python']}")
        except EnvironmentMismatch as e:
            failed = True
            print(f"FAIL  {e} (used by {', '.join(stages)})")
    if not uses:
        print("ok    no stage samples with vLLM: no vLLM environment needed")
    from flows.preflight import check_inputs

    try:
        for line in check_inputs(cfg):
            print(f"ok    {line}")
    except ConfigError as e:
        failed = True
        print(f"FAIL  {e}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a failure while running, 2 a bad input (one line naming it, nothing
    started)."""
    from tasks.lifecycle import WorkdirBusy, exit_code, interrupted

    args = parser().parse_args(argv)
    try:
        return command(args)
    except (ConfigError, WorkdirBusy) as e:
        if args.verbose:
            raise
        print(f"r1: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as e:  # Ray Train re-raises an interrupt as SystemExit
        if (signum := interrupted()) is None and not isinstance(e, KeyboardInterrupt):
            raise
        signum = signum or signal.SIGINT
        print(f"r1: stopped by {signal.Signals(signum).name}; the stage's runs are marked KILLED, and a re-run "
              "resumes from the last checkpoint", file=sys.stderr)
        return exit_code(signum)
    except Exception as e:
        if args.verbose:
            raise
        print(f"r1: {failure_line(e)}  (`r1 -v ...` shows the traceback)", file=sys.stderr)
        return 1


# How a full disk reads, by who hit it: the OS, SQLite (MLflow's and Prefect's stores), safetensors
_DISK_FULL = ("no space left on device", "database or disk is full", "disk quota exceeded")


def failure_line(e: BaseException) -> str:
    """One line for a failed run. A full disk is named as such wherever in the chain of causes it
    surfaced (an MLflow store error wraps SQLite's, Ray wraps a worker's OSError), since the
    outermost message rarely says it."""
    import errno

    seen, chain = set(), [e]
    while chain[-1] is not None and id(chain[-1]) not in seen and len(chain) < 32:
        seen.add(id(chain[-1]))
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for link in chain[:-1]:
        text = str(link).lower()
        if getattr(link, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(s in text for s in _DISK_FULL):
            return (f"No space left on device ({type(link).__name__}); free space and re-run: completed "
                    "stages and checkpoints are kept")
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def command(args: argparse.Namespace) -> int:
    from flows.preflight import check_data, check_inputs, resolve_model_argument

    if args.command == "data":
        return import_code(args.file, args.out)
    if args.command == "stages":
        print(stage_table())
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command in ("run", "eval", "serve"):
        local_defaults(cfg.runtime.workdir)  # before Prefect is imported: it reads its settings then
    if args.command == "eval":
        overrides = {"k": args.k, "num_prompts": args.num_prompts}
        cfg.eval = cfg.eval.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        if not Path(args.data).is_file():
            raise ConfigError(f"--data: file not found: '{args.data}'")
        check_data(args.data, "--data", cfg.data.error_budget)
        if len(args.model) > 1 and args.base_url:
            raise ConfigError("--base-url evaluates one served model: compare several --model in-process")
        if args.base_url and not args.served_model:
            raise ConfigError("--base-url needs --served-model")
        if not args.base_url:
            args.model_dirs = {m: resolve_model_argument(m, "--model", cfg) for m in args.model}

    if args.command == "plan":
        from flows.plan import plan_all
        from r1core.memory_plan import plans_as_json, render

        plans = plan_all(cfg)
        print(plans_as_json(plans) if args.json else render(plans))
        for p in plans:
            if not p.fits():
                print(f"r1 plan: {p.refusal()}", file=sys.stderr)
        return 0 if all(p.fits() for p in plans) else 1
    if args.command == "doctor":
        return doctor(cfg)
    if args.command == "run":
        from flows.plan import PlanError, check, check_environments
        from tasks.environments import EnvironmentMismatch

        stages = None if args.what == "pipeline" else [args.name]
        try:  # before Prefect, Ray or any worker starts
            check(cfg, stages)
            check_environments(cfg, stages)
        except (PlanError, EnvironmentMismatch) as e:
            raise ConfigError(str(e)) from None
        check_inputs(cfg)
        flow_kwargs = stage_arguments(cfg, args) if args.what == "stage" else {}
    if args.command == "config":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    if args.command == "ui":
        from flows import ui

        if args.stop:
            return ui.stop_running(cfg.runtime.workdir)
        config_args = ([f"--config={Path(args.config).resolve()}"] if args.config else []) + [f"--set={o}" for o in args.overrides]
        return ui.run(cfg, config_args, args.prefect_port, args.mlflow_port, args.artifacts_destination)
    if args.command in ("run", "eval", "serve"):
        # made after the checks (a refused run leaves nothing behind) and before Prefect is
        # imported: Prefect's own mkdir has no parents and warns on a fresh workdir
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        return run_flows(cfg, args, flow_kwargs)
    if args.command == "eval":
        print(json.dumps(run_eval(cfg, args), indent=None))
        return 0
    if args.command == "serve":
        from flows.deployments import serve

        if not os.environ.get("PREFECT_API_URL"):
            print("r1 serve: no Prefect server: set PREFECT_API_URL, or use `r1 ui` / `make ui`", file=sys.stderr)
            return 2
        serve(cfg, args.config, args.overrides)
        return 0
    return 0


def run_flows(cfg, args, flow_kwargs: dict) -> int:
    """`r1 run`: the pipeline or one stage as Prefect flows in this process, holding the workdir,
    with SIGTERM / SIGINT stopping it cleanly and a watchdog that kills whatever it started if
    it is killed itself."""
    from tasks import console, lifecycle

    log_dir = Path(cfg.runtime.log_dir) if cfg.runtime.log_dir else cfg.run_dir() / "logs"
    with lifecycle.workdir_lock(cfg.runtime.workdir, " ".join(["r1", *sys.argv[1:]])), lifecycle.handle_signals(), \
            console.attach(log_dir, verbose=getattr(args, "verbose", False)):
        lifecycle.start_watchdog()
        with contextlib.ExitStack() as at_end:
            at_end.callback(console.link_ray_logs, log_dir)
            at_end.callback(quiet_temporary_prefect_server)
            if args.what == "pipeline":
                from flows.pipeline import r1_pipeline

                print_summary(cfg, r1_pipeline(config=cfg))
                return 0
            result = catalog.stage_flows()[args.name](config=cfg, **flow_kwargs)
            results = result if isinstance(result, dict) else {args.name: result}
            print(json.dumps({k: r.model_dump() for k, r in results.items()}, indent=1))  # the log's
            models = {k: r for k, r in results.items() if hasattr(r, "model_dir")}  # a data stage has a dataset
            if models:
                print_summary(cfg, models, title=f"stage {args.name}")
    return 0


def stage_arguments(cfg, args) -> dict:
    """The stage flow's arguments from --init-model (checked intact) and --no-register."""
    from flows.preflight import resolve_model_argument

    parameters = catalog.stage_flows()[args.name].parameters.properties
    kwargs = {}
    if args.init_model:
        if "init_model" not in parameters:
            raise ConfigError(f"--init-model does not apply to stage {args.name}")
        kwargs["init_model"] = str(Path(resolve_model_argument(args.init_model, "--init-model", cfg)).resolve())
    if args.no_register:
        if "register_model" not in parameters:
            raise ConfigError(f"--no-register does not apply to stage {args.name}")
        kwargs["register_model"] = False
    return kwargs


def stage_table() -> str:
    """`r1 stages`: the catalog as a table."""
    from tasks.report import markdown

    rows = [{"stage": s.name, "kind": s.kind, "config": s.section, "starts from": s.starts_from or "-",
             "registers": s.registers if isinstance(s.registers, str) else ", ".join((s.registers or {}).values()) or "-",
             "description": s.description} for s in catalog.CATALOG.values()]
    return markdown(rows)


def import_code(source: str, out: str) -> int:
    """`r1 data import-code`: write the code rows of a HumanEval / MBPP file; a bad row is an
    error naming the file and line, and nothing is written."""
    from r1core.code_data import import_code_rows
    from r1core.problems import write_rows

    try:
        rows = import_code_rows(source)
    except (OSError, ValueError) as e:
        print(f"r1 data import-code: {e}", file=sys.stderr)
        return 2
    write_rows(rows, out)
    print(f"{len(rows)} code rows from {source} -> {out}")
    return 0


def run_eval(cfg, args) -> dict:
    from r1core.problems import read_rows

    rows = read_rows(args.data)
    if len(args.model) > 1:
        return paired_comparison(cfg, args.model, args.model_dirs, rows)
    (model,) = args.model
    if args.base_url:
        from r1core import code_rewards
        from r1core.engine import OpenAIEngine
        from r1core.evaluation import evaluate_heldout

        tokenizer = None
        if Path(model).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
        code_rewards.configure(cfg.code)
        return evaluate_heldout(OpenAIEngine(args.base_url, args.served_model, tokenizer), rows, cfg.eval)
    return evaluate_in_process(cfg, args.model_dirs[model], rows)


def evaluate_in_process(cfg, model_dir: str, rows: list[dict], per_prompt: bool = False):
    """`tasks.evaluate.evaluate_locally` of a model directory, as this configuration asks."""
    from tasks.evaluate import evaluate_locally

    return evaluate_locally(model_dir, rows, cfg.eval, cfg.rollout.batch_size,
                            threads=cfg.runtime.num_cpus or os.cpu_count(), code=cfg.code, per_prompt=per_prompt)


def paired_comparison(cfg, models: list[str], model_dirs: dict[str, str], rows: list[dict]) -> dict:
    """Each model's metrics, and each further model minus the first, prompt by prompt (keyed by
    the names given: directories or `models:/` URIs, resolved in `model_dirs`). A model given twice
    is evaluated twice: the same prompts and samples' seeds must give a difference of exactly 0."""
    from r1core.evaluation import paired_difference

    runs = [(model, *evaluate_in_process(cfg, model_dirs[model], rows, per_prompt=True)) for model in models]
    (first, _, first_scores), rest = runs[0], runs[1:]
    return {"models": {model: metrics for model, metrics, _ in runs},
            f"minus {first}": {model: {name: paired_difference(first_scores[name], scores[name]) for name in scores}
                               for model, _, scores in rest}}


def quiet_temporary_prefect_server() -> None:
    """The ephemeral Prefect server a run started stops at interpreter exit, after the console is
    detached, and logs 'Stopping temporary server on ...' to the terminal: that one record is
    dropped (stopping the server here instead would break a caller that calls `main` again)."""
    from prefect.server.api.server import subprocess_server_logger

    subprocess_server_logger.addFilter(lambda record: not record.getMessage().startswith("Stopping temporary server"))


def print_summary(cfg, results, title: str = "r1_pipeline") -> None:
    from tasks.console import say
    from tasks.report import comparison_rows, finding_rows, markdown
    from tasks.tracking import experiment_url, tracking_uri

    say(f"\n=== {title} finished: held-out evaluation of every model "
          f"(k = {cfg.eval.k}, T {cfg.eval.sampling.temperature}, top-p {cfg.eval.sampling.top_p}) ===\n")
    say(markdown(comparison_rows(results, cfg.eval.k)))
    # the paper's findings: in the log and the run's artifacts (comparison/findings.md), not on the quiet console
    print(f"\nThe paper's findings on this run (paired, 95%):\n{markdown(finding_rows(results))}", flush=True)
    for name, r in results.items():
        if "pairwise_accuracy" in r.metrics:
            say(f"{name}: held-out pairwise accuracy {r.metrics['pairwise_accuracy']:.3f}  -> {r.registered}")
    uri = tracking_uri(cfg.runtime)
    say(f"\nOutputs:  {cfg.run_dir()}")
    say(f"MLflow:   {uri}  (experiment '{cfg.runtime.experiment}'; the comparison table, its chart and the "
          "paper's findings are in the r1_pipeline run's artifacts, comparison/)")
    say(f"          its runs: {experiment_url(cfg.runtime)}" + ("  (after `make ui`)" if uri.startswith("sqlite") else ""))
    say(f"Prefect:  flow runs in {os.environ.get('PREFECT_API_URL') or os.environ['PREFECT_HOME']}"
          " (`make ui` shows them)")


if __name__ == "__main__":
    sys.exit(main())
