"""Entry points that evaluate without solving: ``classification/evaluate_allocation.py`` (saved
allocations), ``classification/uniform_baseline.py`` and ``classification/show_results.py``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from rdoq.adapters import adapter_registry, get_adapter
from rdoq.adapters.base import Adapter, InputError
from rdoq.cli import (
    POINTS_HINT,
    add_eval_data_flags,
    add_eval_device_flags,
    add_model_flags,
    add_outdir_flag,
    add_quiet_flag,
    build_any_model,
    calib_for,
    check_outdir,
    eval_data_for,
    fp_act_layers,
    method_name,
    resolve_dataset,
    resolve_device,
    script_entry,
    setup_logging,
)
from rdoq.cli_alloc import add_alloc_flags, retrain_specs
from rdoq.fold import is_folded_source

log = logging.getLogger("rdoq")


@script_entry(POINTS_HINT)
def evaluate_main(
    argv: list[str] | None = None, adapters: Mapping[str, Adapter] | None = None
) -> dict[str, Any]:
    """Entry point of ``evaluate_allocation.py``: re-apply saved allocation files to the model and
    evaluate them (corrections stored in the files are used as they are). ``adapters``: the
    ``--dataset`` choices (default: the built-in adapters)."""
    from rdoq.allocfile import load_allocation
    from rdoq.apply import apply_allocation, check_model
    from rdoq.evaluate import (
        ROW_BIT_KEYS,
        bit_report,
        outputs,
        paired_comparison,
        reference_outputs,
        topk_scores,
    )
    from rdoq.report import append_results, format_table

    p = argparse.ArgumentParser(
        description="Evaluate saved allocation files (allocation_<target>.json)."
    )
    p.add_argument("allocations", nargs="+", type=Path, help="allocation JSON files")
    g = p.add_argument_group("model and data")
    adapters = adapter_registry() if adapters is None else adapters
    add_model_flags(g, None, "model name; None = the allocation's model", adapters)
    add_eval_data_flags(g)
    o = p.add_argument_group("output and device")
    add_outdir_flag(o, "where results.jsonl/csv go (default: the first allocation's directory)")
    add_eval_device_flags(o)
    add_quiet_flag(o)
    o.add_argument(
        "--paired",
        action="store_true",
        help="compare every allocation with the first on the same samples: the "
        "per-sample output-MSE difference with a 95 %% bootstrap interval, and "
        "McNemar's exact test on the top-1 (stored as 'paired' in each row)",
    )
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    outdir = args.outdir or args.allocations[0].parent
    try:
        check_outdir(outdir, "--outdir")
        allocs = [(path, load_allocation(path)) for path in args.allocations]
        tuned = [str(path) for path, a in allocs if a.get("fine_tune")]
        if tuned:
            raise InputError(
                f"{tuned[0]} records a fine-tuned point (--re-calibrate / --re-train): its tuned "
                f"parameters are in the model_<target>.pth saved beside it, not in the "
                f"allocation; load that state (rdoq.apply.load_quantized) instead"
            )
        models = {a["model"] for _, a in allocs}
        if args.archname is None:
            if len(models) != 1:
                raise InputError(
                    f"the allocations are for several models {sorted(models)}; "
                    f"evaluate them separately"
                )
            args.archname = models.pop()
        sources = {a.get("weights_source") for _, a in allocs}
        args.dataset = resolve_dataset(
            args.archname, args.dataset, sources.pop() if len(sources) == 1 else None
        )
        adapter = get_adapter(args.dataset, adapters)
        folded = {is_folded_source(a.get("weights_source")) for _, a in allocs}
        if len(folded) > 1:
            raise InputError(
                "some allocations were made with --fold-bn and some without; "
                "evaluate them separately"
            )
        # The allocation knows whether its weights were folded: evaluate the same weights.
        args.fold_bn = args.fold_bn or folded == {True}
        device = resolve_device(args, None)
        dtype = getattr(torch, args.precision)
        model, info = build_any_model(args, adapter)
        for path, a in allocs:
            if a["model"] != info.arch:
                raise InputError(
                    f"{path} is an allocation for {a['model']}, this run loads "
                    f"{info.arch}; pass the matching --archname"
                )
            for key in ("weights_source", "checkpoint_sha256"):
                if key in a and a[key] != getattr(info, key):
                    raise InputError(
                        f"{path} was made for weights {key}={a[key]!r}, this run "
                        f"loads {key}={getattr(info, key)!r}; pass the same "
                        f"--checkpoint/--random-init/--fold-bn as when it was "
                        f"made"
                    )
            check_model(model, a, str(path))
        model = model.to(device=device, dtype=dtype).eval()
        data = eval_data_for(args, model, adapter)
    except (InputError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    ref, labels = reference_outputs(model, data, device, adapter.run)
    fp = {**topk_scores(ref, labels), "n_eval": ref.shape[0]}
    x1 = next(iter(data))[0][:1].to(device=device, dtype=dtype)
    rows = []
    first_out = None
    paired_lines = []
    for path, a in allocs:
        q_model = apply_allocation(model, a)
        metrics = adapter.evaluate(q_model, data, ref, device)
        if args.paired:
            out, _ = outputs(q_model, data, device, adapter.run)  # (N, K)
            if first_out is None:
                first_out = out
            else:
                cmp = paired_comparison(out, first_out, ref, labels)
                metrics["paired"] = {"vs": str(args.allocations[0].resolve()), **cmp}
                lo, hi = cmp["mse_diff_ci95"]
                paired_lines.append(
                    f"{path} − {args.allocations[0]}: output MSE {cmp['mse_diff']:+.4g} "
                    f"(95 % bootstrap interval {lo:+.4g} … {hi:+.4g}, n={cmp['n']})"
                    + (
                        ""
                        if "mcnemar_p" not in cmp
                        else f"; top-1 right only here {cmp['only_a_right']}, only in the first "
                        f"{cmp['only_b_right']}, McNemar exact p = {cmp['mcnemar_p']:.3g}"
                    )
                )
        del q_model
        bits = bit_report(model, a, x1)
        rows.append(
            {
                "model": info.arch,
                "method": f"eval:{a.get('method', a.get('solver'))}",
                "target_bits": a.get("target_bits"),
                **a.get("summary", {}),
                **{k: bits[k] for k in ROW_BIT_KEYS},
                **metrics,
                "fp_top1": fp["top1"],
                "fp_top5": fp["top5"],
                **(
                    {"authors_semantics": a["authors_semantics"]}
                    if a.get("authors_semantics")
                    else {}
                ),
                **(
                    {"eval_batch_size": args.batchsize}
                    if "bca" in a.get("authors_semantics", [])
                    else {}
                ),
                "allocation": str(path.resolve()),
                "fp_weight_layers": bits["fp_weight_layers"],
                "fp_act_layers": bits["fp_act_layers"],
                "bops_inputs": bits["bops_inputs"],
                "created": datetime.now(timezone.utc).isoformat(),
            }
        )
    append_results(Path(outdir), rows)
    table = format_table(rows)
    if paired_lines:
        table += "\npaired with the first allocation:\n" + "\n".join(paired_lines)
    return {"outdir": str(outdir), "rows": rows, "table": table}


@script_entry(POINTS_HINT)
def uniform_main(
    argv: list[str] | None = None, adapters: Mapping[str, Adapter] | None = None
) -> dict[str, Any]:
    """Entry point of ``uniform_baseline.py``: the same bit width for every weight and
    activation, per-channel MSE-optimal steps, evaluated exactly like the RDOQ allocations.
    ``adapters``: the ``--dataset`` choices (default: the built-in adapters)."""
    from rdoq.baselines import collect_acts, uniform_allocation
    from rdoq.pipeline import run_points
    from rdoq.probe import act_shapes

    p = argparse.ArgumentParser(
        description="Uniform-precision baseline: per-channel steps by "
        "minimum MSE, evaluated like RDOQ allocations."
    )
    adapters = adapter_registry() if adapters is None else adapters
    add_alloc_flags(p, "uniform", adapters)
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    outdir = args.outdir or Path(f"{Path(args.archname).name}_uniform_results")
    try:
        check_outdir(outdir, "--outdir")
        args.dataset = resolve_dataset(args.archname, args.dataset)
        adapter = get_adapter(args.dataset, adapters)
        bad = [b for b in args.target_rates + (args.act_target_rates or []) if b < 1]
        if bad:
            raise InputError(f"uniform bit widths must be >= 1, got {bad}")
        act_bits = args.act_target_rates or args.target_rates
        if len(act_bits) not in (1, len(args.target_rates)):
            raise InputError(
                f"--act-target-rates takes one value or one per --target_rates "
                f"({len(args.target_rates)}), got {len(act_bits)}"
            )
        act_bits = act_bits * len(args.target_rates) if len(act_bits) == 1 else act_bits
        device = resolve_device(args, None)
        dtype = getattr(torch, args.precision)
        model, info = build_any_model(args, adapter)
        model = model.to(device=device, dtype=dtype).eval()
        calib = calib_for(args, model, args.calibsize, args.seed, adapter).x
        calib = calib.to(device=device, dtype=dtype)
        data = eval_data_for(args, model, adapter)
        names = [layer.name for layer in adapter.layers(model)]
        called = [n for n in names if n in act_shapes(model, calib[:1], names, args.act_mode)]
        fp_acts = set(fp_act_layers(args.fp_act_layers, called))
        unknown = sorted(fp_acts - set(called))
        if unknown:
            raise InputError(
                f"--fp-act-layers names {unknown}, which are not quantizable layers of {info.arch}"
            )
        act_layers = [] if args.no_acts else [n for n in called if n not in fp_acts]
    except (InputError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    acts = collect_acts(model, calib, act_layers, args.act_mode) if act_layers else {}
    points = [
        (
            uniform_allocation(
                model, calib, w, None if args.no_acts else a, act_layers, args.act_mode, acts
            ),
            {"target_bits": float(w), "act_target_bits": None if args.no_acts else float(a)},
        )
        for w, a in zip(args.target_rates, act_bits, strict=True)
    ]
    use_calib = calib if (args.bias_corr_weight or args.bias_corr_act) else None
    try:
        args.retrain_specs = retrain_specs(args, calib.shape[0])
        if args.retrain_specs:
            use_calib = calib
        return run_points(
            args,
            adapter,
            model,
            info,
            data,
            use_calib,
            outdir,
            method_name("uniform", args),
            points,
            None,
            device,
        )
    except (InputError, ValueError) as e:
        p.error(str(e))


@script_entry()
def results_main(argv: list[str] | None = None) -> str:
    """Entry point of ``show_results.py``: one table of every results.jsonl under the paths
    (latest row per model, method and target), and optionally a combined plot."""
    from rdoq.report import collect_results, format_table, plot_results

    p = argparse.ArgumentParser(description="Tabulate results.jsonl files (method × target).")
    p.add_argument("paths", nargs="+", type=Path, help="results.jsonl files or directories")
    p.add_argument(
        "--all",
        action="store_true",
        help="every row (default: the latest row per model, method and target)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="also write a PNG of all methods of each model (one file per model: "
        "PLOT with the model name appended)",
    )
    args = p.parse_args(argv)
    try:
        rows = collect_results(args.paths)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if not args.all:
        latest: dict[tuple, dict[str, Any]] = {}
        for r in rows:
            latest[
                (
                    r.get("model"),
                    r.get("method"),
                    r.get("target_bits"),
                    r.get("act_target_bits"),
                    r.get("slope_log2"),
                )
            ] = r
        rows = [
            r
            for r in rows
            if latest[
                (
                    r.get("model"),
                    r.get("method"),
                    r.get("target_bits"),
                    r.get("act_target_bits"),
                    r.get("slope_log2"),
                )
            ]
            is r
        ]
    if args.plot is not None:
        for model in dict.fromkeys(r.get("model") for r in rows):
            path = args.plot.with_name(f"{args.plot.stem}_{model}{args.plot.suffix or '.png'}")
            plot_results([r for r in rows if r.get("model") == model], path, str(model))
    return format_table(rows)
