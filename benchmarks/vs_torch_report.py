"""The output of `bench_vs_torch.py`: per-(configuration, library) summaries, the printed tables and planner table
(which return the goal numbers), and the PNG chart of tokens/s per configuration."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from vs_torch_pipes import Settings, parallel_ranks


def summarise(records: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """One summary per (configuration, library); ratios are taken within a round, then summarised."""
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for rec in records:
        by.setdefault((rec["config"], rec["library"]), {})[rec["round"]] = rec
    single = by[("single", "single")]
    out = []
    for (name, lib), rounds in by.items():
        rows = [rounds[r] for r in sorted(rounds)]
        x: dict[str, Any] = {"config": name, "library": lib, "step_s": [r["step_s"] for r in rows],
                             "tokens_per_s": [tokens / r["step_s"] for r in rows],
                             "vs_single": [single[r["round"]]["step_s"] / r["step_s"] for r in rows]}
        for key in ("schedule", "microbatches", "partition", "balance"):
            if key in rows[0]:
                x[key] = rows[0][key]
        other = by.get((name, "torch"))
        if lib == "stagewise" and other is not None:
            x["vs_torch"] = [other[r["round"]]["step_s"] / r["step_s"] for r in rows]
        if "ideal_s" in rows[0]:
            P = len(rows[0]["busy_s"])
            x.update(
                ideal_s=[r["ideal_s"] for r in rows], traced_step_s=[r["traced_step_s"] for r in rows],
                measured_over_ideal=[r["traced_step_s"] / r["ideal_s"] for r in rows],
                bubble_measured=[[r["bubble_measured"][d] for r in rows] for d in range(P)],
                bubble_simulated=[[r["bubble_simulated"][d] for r in rows] for d in range(P)],
                wait_s=[[r["wait_s"][d] for r in rows] for d in range(P)],
                outside_trace_s=[r["outside_trace_s"] for r in rows],
                saved_peak_bytes=[statistics.median(r["saved_peak_bytes"][d] for r in rows) for d in range(P)],
                saved_predicted_bytes=[statistics.median(r["saved_predicted_bytes"][d] for r in rows)
                                       for d in range(P)],
                saved_predicted_swept_bytes=[statistics.median(r["saved_predicted_swept_bytes"][d] for r in rows)
                                             for d in range(P)],
                peak_inflight=rows[0]["peak_inflight"],
            )
        out.append(x)
    return out


def print_tables(P: int, result: dict[str, Any], summaries: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """The three tables of one pipeline size; returns the goal numbers."""
    from _common import spread

    med = statistics.median
    tokens = s.batch * s.seq_len
    get = {(x["config"], x["library"]): x for x in summaries}
    single = get[("single", "single")]
    first = result["first_loss"]
    print(f"\n== P={P}: {P} ranks x 1 thread (gloo), {s.n_layer + 2}-layer GPT d{s.n_embd} h{s.n_head} vocab "
          f"{s.vocab}{' tied' if s.tie else ''}, batch {s.batch} x {s.seq_len} = {tokens} tokens; {s.repeats} rounds "
          f"x {s.steps} steps; median [min-max] over rounds")
    print(f"single process, 1 thread: {spread(single['tokens_per_s'], '.0f')} tokens/s, "
          f"first loss {first['single']['single']:.6f}")
    print(f"{'configuration':<16} {'balance':<18} {'stagewise tok/s':<19} {'torch tok/s':<19} "
          f"{'stagewise/torch':<20} {'best/best':<9} {'sw/1 proc':<9} {'first loss sw / torch':<22}")
    goals: dict[str, Any] = {"P": P, "parity": [], "efficiency": [], "auto": None}
    for name, inf in result["info"].items():
        if inf["partition"] != "even" or (name, "stagewise") not in get:
            continue
        sw, th = get[(name, "stagewise")], get.get((name, "torch"))
        bal = str(inf["balance"]).replace(" ", "")
        ratio = spread(sw["vs_torch"], ".3f") if th else "-"
        best = f"{max(sw['tokens_per_s']) / max(th['tokens_per_s']):.3f}" if th else "-"
        loss = first[name]
        lt = f"{loss['torch']:.6f}" if "torch" in loss else inf["torch"][:12]
        print(f"{name:<16} {bal:<18} {spread(sw['tokens_per_s'], '.0f'):<19} "
              f"{spread(th['tokens_per_s'], '.0f') if th else '-':<19} {ratio:<20} {best:<9} "
              f"{med(sw['vs_single']):<9.2f} {loss['stagewise']:.6f} / {lt}")
        if th:
            goals["parity"].append((name, med(sw["vs_torch"]), max(sw["tokens_per_s"]) / max(th["tokens_per_s"])))
    print("\nstagewise efficiency: the last traced step vs the simulator's ideal from its measured per-stage F/B "
          "(I/W) and STEP costs; bubble = 1 - busy / step, per device.\nSaved activations per device (MB): measured "
          "peak; pred = simulated peak in-flight x the device's saved bytes per micro-batch; pred swept = the "
          "simulated timeline\nswept with each (stage, micro-batch)'s measured bytes (they differ when a device's "
          "virtual_stages save different amounts)")
    dev = "/".join(f"d{d}" for d in range(P))
    print(f"{'configuration':<21} {'ideal s':<7} {'step s':<7} {'measured/ideal':<20} {'bubble meas ' + dev:<19} "
          f"{'bubble sim ' + dev:<18} {'in-flight':<16} {'saved MB meas':<20} {'pred':<20} {'pred swept':<20}")
    for name in result["info"]:
        if (name, "stagewise") not in get or name.startswith("planner@"):
            continue
        x = get[(name, "stagewise")]
        meas = "/".join(f"{med(v):.2f}" for v in x["bubble_measured"])
        sim = "/".join(f"{med(v):.2f}" for v in x["bubble_simulated"])
        infl = "/".join(f"{v:g}" for v in x["peak_inflight"])
        saved, pred, swept = ("/".join(f"{v / 2**20:.1f}" for v in x[k]) for k in
                              ("saved_peak_bytes", "saved_predicted_bytes", "saved_predicted_swept_bytes"))
        print(f"{name:<21} {med(x['ideal_s']):<7.3f} {med(x['traced_step_s']):<7.3f} "
              f"{spread(x['measured_over_ideal'], '.3f'):<20} {meas:<19} {sim:<18} {infl:<16} {saved:<20} {pred:<20} "
              f"{swept:<20}")
        goals["efficiency"].append((name, med(x["measured_over_ideal"])))
    autos = [n for n, inf in result["info"].items() if inf["partition"] == "auto"]
    if autos:
        bound = parallel_ranks(P) * med(single["tokens_per_s"])
        print(f"\nstagewise partition=auto (best schedule per m) vs torch on the even split (best schedule per m, and "
              f"the same schedule); ratios within each round, median [min-max]. Bound: {parallel_ranks(P)} of "
              f"{os.cpu_count()} cores x the single process = {bound:.0f} tokens/s")
        print(f"{'m':<3} {'best stagewise auto':<24} {'balance':<20} {'tok/s':<19} {'best torch even':<17} "
              f"{'tok/s':<19} {'ratio':<21} {'vs torch same schedule':<22}")
        best_ratios = []
        for m in sorted({result["info"][n]["microbatches"] for n in autos}):
            mine = [n for n in autos if result["info"][n]["microbatches"] == m]
            theirs = [n for n, inf in result["info"].items() if inf["partition"] == "even"
                      and inf["microbatches"] == m and (n, "torch") in get]
            if not theirs:
                continue
            a = max(mine, key=lambda n: med(get[(n, "stagewise")]["tokens_per_s"]))
            t = max(theirs, key=lambda n: med(get[(n, "torch")]["tokens_per_s"]))
            xa, xt = get[(a, "stagewise")], get[(t, "torch")]
            ratios = [ts / sa for ts, sa in zip(xt["step_s"], xa["step_s"])]
            ratio = med(ratios)
            same = get.get((a.removesuffix(" auto"), "torch"))
            same_ratios = [ts / sa for ts, sa in zip(same["step_s"], xa["step_s"])] if same else []
            print(f"{m:<3} {a:<24} {str(result['info'][a]['balance']).replace(' ', ''):<20} "
                  f"{spread(xa['tokens_per_s'], '.0f'):<19} {t:<17} {spread(xt['tokens_per_s'], '.0f'):<19} "
                  f"{spread(ratios, '.3f'):<21} {spread(same_ratios, '.3f') if same else '-':<22}")
            best_ratios.append((m, a, t, ratio, med(same_ratios) if same else None,
                                med(xa["tokens_per_s"]) / bound))
        goals["auto"] = best_ratios
    return goals


def print_planner(P: int, result: dict[str, Any], summaries: list[dict[str, Any]],
                  s: Settings) -> dict[str, Any] | None:
    """The planner's choice against torch's configurations on the even split (and the n-thread process), ratios
    within the rounds of each configuration (the planner ran in every configuration's rotation)."""
    from _common import spread

    if "planner" not in result["info"]:
        return None
    med = statistics.median
    get = {(x["config"], x["library"]): x for x in summaries}
    inf = result["info"]["planner"]
    choice = (f"{inf['schedule']}{' v=' + str(inf['virtual_stages']) if inf['virtual_stages'] > 1 else ''} "
              f"m={inf['microbatches']} "
              f"[{','.join(map(str, inf['balance']))}]" + (f" recompute={inf['recompute']}"
                                                             if inf["recompute"] != "never" else ""))
    plan = result["plans"]["planner"]
    print(f"\nthe planner's choice: {choice} (plan and profile built in {inf['build_s']:.1f} s; predicted "
          f"{plan['choice']['step_s']:.3f} s per step, noise {plan['stats'].get('noise_measured', 0):.1%}) against "
          f"torch.distributed.pipelining on the even split, alternating in every configuration's rounds")
    threads = s.single_threads > 1
    print(f"{'torch configuration':<18} {'torch tok/s':<19} {'planner tok/s':<19} {'planner/torch':<21}"
          + (f"{f'{s.single_threads}-thread process tok/s':<28} {'planner/it':<20}" if threads else ""))
    names = [n for n, i in result["info"].items() if i.get("partition") == "even" and (n, "torch") in get]
    single_ratios: list[float] = []
    for n in names:
        th, pl = get[(n, "torch")], get[(f"planner@{n}", "stagewise")]
        ratios = [t / p for t, p in zip(th["step_s"], pl["step_s"])]
        one = get.get((f"single{s.single_threads}@{n}", "single-threads"))
        if one:
            single_ratios += [t / p for t, p in zip(one["step_s"], pl["step_s"])]
        print(f"{n:<18} {spread(th['tokens_per_s'], '.0f'):<19} {spread(pl['tokens_per_s'], '.0f'):<19} "
              f"{spread(ratios, '.3f'):<21}" + (
                  f"{spread(one['tokens_per_s'], '.0f') if one else '-':<28} "
                  f"{spread([t / p for t, p in zip(one['step_s'], pl['step_s'])], '.3f') if one else '-':<20}"
                  if threads else ""))
    if not names:
        return None
    best = max(names, key=lambda n: med(get[(n, "torch")]["tokens_per_s"]))
    mine = get[(f"planner@{best}", "stagewise")]["step_s"]
    ratio = med([t / p for t, p in zip(get[(best, "torch")]["step_s"], mine)])
    pooled = [x for n in names for x in get[(f"planner@{n}", "stagewise")]["tokens_per_s"]]
    print(f"planner over all rounds: {spread(pooled, '.0f')} tokens/s; torch's best configuration: {best}; planner/"
          f"torch's best within its rounds: {ratio:.3f}x" + (f"; planner / {s.single_threads}-thread process "
                                                              f"(pooled rounds): {spread(single_ratios, '.3f')}"
                                                              if single_ratios else ""))
    single = get.get(("single", "single"))
    bound = parallel_ranks(P) * med(single["tokens_per_s"]) if single else None
    if bound:
        top = med(get[(best, "torch")]["tokens_per_s"])
        # P ranks of one thread cannot beat min(P, cores) single processes: what a ratio can reach is bounded
        print(f"the cores' bound (min(P, {os.cpu_count()} cores) x the single process): {bound:.0f} tokens/s; torch's "
              f"best reached {top / bound:.0%} of it, the planner {med(pooled) / bound:.0%}; 1.15x torch's best "
              f"would be {1.15 * top / bound:.0%} of it")
    return {"choice": choice, "torch_best": best, "ratio": ratio, "threads": s.single_threads,
            "vs_single": med(single_ratios) if single_ratios else None, "bound": bound}


def draw_chart(all_summaries: dict[int, list[dict[str, Any]]], path: Path) -> None:
    """Bars of tokens/s (median, min-max) per P and configuration: stagewise and torch on the even split, stagewise
    with partition=auto, and the planner's choice timed in that configuration's rounds (each where it ran), with
    the single process and the cores' bound as lines; written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[Any]] = {"even": [], "torch": [], "auto": [], "planner": []}
    labels: list[str] = []
    baselines = []  # (P, first bar, last bar, single-process tokens/s) per P
    for P, summaries in all_summaries.items():
        get = {(x["config"], x["library"]): x for x in summaries}
        first = len(labels)
        configs = dict.fromkeys(x["config"] for x in summaries
                                if (x["library"] == "stagewise" and x.get("partition") == "even")
                                or x["library"] == "torch")
        for config in configs:
            labels.append(f"P={P}\n" + config.replace(" m=", "\nm="))
            keys = {"even": (config, "stagewise"), "torch": (config, "torch"),
                    "auto": (config + " auto", "stagewise"), "planner": (f"planner@{config}", "stagewise")}
            for name, key in keys.items():
                x = get.get(key)
                series[name].append(x["tokens_per_s"] if x and (name != "even" or x.get("partition") == "even")
                                    else None)
        if len(labels) > first and ("single", "single") in get:
            baselines.append((P, first, len(labels) - 1,
                              statistics.median(get[("single", "single")]["tokens_per_s"])))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 4.8))
    bars = (("even", "tab:blue", "stagewise (even split)"),
            ("torch", "tab:orange", "torch.distributed.pipelining (even split)"),
            ("auto", "tab:green", "stagewise partition=auto"),
            ("planner", "tab:purple", "stagewise, the planner's choice"))
    shown = [bar for bar in bars if any(series[bar[0]])]
    width = 0.8 / max(1, len(shown))
    for k, (name, color, text) in enumerate(shown):
        values = series[name]
        xs = [i + (k - (len(shown) - 1) / 2) * width for i, v in enumerate(values) if v]
        vals = [v for v in values if v]
        mids = [statistics.median(v) for v in vals]
        err = [[m - min(v) for m, v in zip(mids, vals)], [max(v) - m for m, v in zip(mids, vals)]]
        ax.bar(xs, mids, width, yerr=err, capsize=2, label=text, color=color)
    for k, (P, lo, hi, value) in enumerate(baselines):
        ax.hlines(value, lo - 0.45, hi + 0.45, colors="gray", linestyles="dashed",
                  label="single process, 1 thread" if k == 0 else None)
        ax.hlines(parallel_ranks(P) * value, lo - 0.45, hi + 0.45, colors="black", linestyles="dotted",
                  label=f"bound: min(P, {os.cpu_count()} cores) x single process" if k == 0 else None)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("tokens/s (median, min-max)")
    ax.set_title("stagewise vs torch.distributed.pipelining, CPU, 1 thread per rank")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
