"""Summaries, targets and tables of benchmarks.perf.compare's results (docs/performance.md is
rendered from the JSON by `render`, never typed by hand)."""

from __future__ import annotations

from typing import Any

from . import common, svdiff_state

TARGETS = {"step_vs_peft": 1.00, "peak_vs_peft": 1.00, "merged_vs_base": 1.01, "merge_vs_peft": 1.00,
           "selective_vs_frozen": 1.05, "apply_s": 1.0,
           # issue 16: every method at its floor
           "ssf_peak_vs_lora": 1.05, "svdiff_step_vs_lora": 1.4, "svdiff_unmerged_vs_base": 1.1,
           "shpeft_step_vs_lora": 1.1, "data_peak_vs_lora": 1.2}
DATA_METHODS = ("shpeft", "spt")  # choose weights from data at apply time
PEFT_PAIRS = {"vit": {"lora": "lora", "layernorm": "ln_tuning"}, "resnet": {"lora": "lora"},
              "unet": {"lora": "lora"}}  # peftvision method -> its peft counterpart


# ---- summary: medians, ratios, targets -----------------------------------------------------------

def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b != b or a != a or b == 0:
        return None
    return a / b


def summarise(entry: dict[str, Any]) -> None:
    """Add medians and ratios to every row of one model's entry (in place)."""
    rows = entry["rows"]
    for r in rows:
        r["median_step_s"] = common.median(r["step_times_s"]) if r["step_times_s"] else None
        r["median_cpu_s"] = common.median(r["step_cpu_s"]) if r["step_cpu_s"] else None
        for rec in r["infer"].values():
            if rec.get("times_s"):
                rec["median_s"] = common.median(rec["times_s"])
                rec["median_cpu_s"] = common.median(rec["cpu_s"])
    frozen = {r["group"]: r for r in rows if r["method"] == "frozen" and not r["compiled"]}
    by = {r["label"]: r for r in rows}
    for r in rows:  # step relative to its group's frozen: the common unit across groups
        f = frozen.get(r["group"])
        for key in ("median_step_s", "median_cpu_s"):
            r[f"{key}_vs_frozen"] = _ratio(r.get(key), f.get(key) if f else None)

    def rel(r: dict, other: dict | None, key: str) -> float | None:
        if other is None:
            return None
        return _ratio(r.get(f"{key}_vs_frozen"), other.get(f"{key}_vs_frozen"))

    for r in rows:
        pair = next((f"peft:{k}" for m, k in PEFT_PAIRS[entry["arch"]].items() if m == r["method"]
                     and r["library"] == "peftvision"), None)
        if pair and r["compiled"]:
            pair += "+compile"
        refs = {"peft": by.get(pair) if pair else None, "lora": by.get("lora"), "full": by.get("full")}
        for name, other in refs.items():
            r[f"cpu_vs_{name}"] = rel(r, other, "median_cpu_s")
            r[f"wall_vs_{name}"] = rel(r, other, "median_step_s")
            r[f"peak_vs_{name}"] = _ratio(r.get("peak_rss_mb"), other.get("peak_rss_mb") if other else None)
        base = frozen.get(r["group"], {}).get("infer", {})  # the same group's base model
        for mode, rec in r["infer"].items():
            b = base.get(mode, {})
            rec["cpu_vs_base"] = _ratio(rec.get("median_cpu_s"), b.get("median_cpu_s"))
            rec["wall_vs_base"] = _ratio(rec.get("median_s"), b.get("median_s"))


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked on whatever the results file holds (CPU-time ratios)."""
    out = []

    def add(target, model, measured, limit, note="", samples=None):
        """`samples`: (this variant's times, the reference's times). When the medians miss the
        limit but the best runs meet it, the miss is within this machine's noise: "unresolved"."""
        met: bool | str | None = None if measured is None else measured <= limit
        if met is False and samples and samples[0] and samples[1]:
            best = min(samples[0]) / min(samples[1])
            note = f"best-of-runs ratio {best:.3f}; " + note
            if best <= limit:
                met = "unresolved"
        out.append({"target": target, "model": model, "measured": measured, "limit": limit,
                    "met": met, "note": note})

    for entry in data["models"].values():
        rows, name = entry["rows"], entry["case"]
        by = {r["label"]: r for r in rows}
        for label in ("lora", "lora+compile"):
            r = by.get(label)
            if r is None or (r["compiled"] and r.get("error")):
                continue
            tag = " (compiled)" if r["compiled"] else ""
            peer = by.get("peft:lora" + ("+compile" if r["compiled"] else ""), {})
            add(f"LoRA train step <= 1.00x peft{tag}", name, r.get("cpu_vs_peft"), TARGETS["step_vs_peft"],
                _fmt_note(r, "wall_vs_peft", "wall") + f"; CPU s per step: peftvision "
                f"{_range(r['step_cpu_s'])}, peft {_range(peer.get('step_cpu_s'))}",
                (r["step_cpu_s"], peer.get("step_cpu_s")))
            if not r["compiled"]:
                base = r.get("baseline_rss_mb") or 0.0
                add("LoRA peak memory <= 1.00x peft", name, r.get("peak_vs_peft"), TARGETS["peak_vs_peft"],
                    f"{_mb(r.get('peak_rss_mb'))} vs {_mb(peer.get('peak_rss_mb'))} MiB peak RSS; above "
                    f"the common {base:,.0f} MiB import baseline: "
                    f"{_mb(_minus(r.get('peak_rss_mb'), base))} vs {_mb(_minus(peer.get('peak_rss_mb'), base))}")
        lora_merged = by.get("lora", {}).get("infer", {}).get("merged", {})
        peft_merged = by.get("peft:lora", {}).get("infer", {}).get("merged", {})
        for key, what in (("merge_cpu_s", "merge"), ("unmerge_cpu_s", "unmerge")):
            ours, theirs = lora_merged.get(key), peft_merged.get(key)
            if ours and theirs:
                add(f"LoRA {what} <= 1.00x peft", name, _ratio(common.median(ours), common.median(theirs)),
                    TARGETS["merge_vs_peft"], f"CPU s: peftvision {_range(ours)}, peft {_range(theirs)}",
                    (ours, theirs))
        if entry["arch"] == "vit":  # the rows are measured on ViT-B
            floor_targets(by, name, add)
        frozen_infer = by.get("frozen", {}).get("infer", {})
        for r in rows:
            if r["library"] != "peftvision" or not r["mergeable"]:
                continue
            mode = "unmerged" if r["kind"] == "selective" else "unloaded"  # selective: as deployed
            rec = r["infer"].get(mode)
            if rec and rec.get("cpu_vs_base") is not None:
                base_cpu = frozen_infer.get(mode, {}).get("cpu_s")
                how = ("selective: the model as applied is the deployed one" if mode == "unmerged"
                       else "unload(merge=True)")
                add(f"merged inference within 1% of base: {r['label']}", name, rec["cpu_vs_base"],
                    TARGETS["merged_vs_base"], f"{how}; wall {_f(rec.get('wall_vs_base'))}x; base CPU s "
                    f"{_range(base_cpu)}, this {_range(rec.get('cpu_s'))}"
                    + (f"; module tree == base: {rec['structure_equal_base']}" if "structure_equal_base" in rec
                       else "")
                    + (f" (first difference: {rec['structure_diff']})" if rec.get("structure_diff") else ""),
                    (rec.get("cpu_s"), base_cpu))
        for r in rows:
            if r["method"] in ("bias", "norm", "difffit") and r["library"] == "peftvision":
                add(f"{r['method']} step <= 1.05x frozen backward", name, r.get("median_cpu_s_vs_frozen"),
                    TARGETS["selective_vs_frozen"], _fmt_note(r, "median_step_s_vs_frozen", "wall")
                    + f"; CPU s per step: {_range(r['step_cpu_s'])}, frozen "
                    f"{_range(by.get('frozen', {}).get('step_cpu_s'))}",
                    (r["step_cpu_s"], by.get("frozen", {}).get("step_cpu_s")))
    for timing in (data.get("apply_timing") or {}).values():
        for r in timing["rows"]:
            if r["library"] == "peftvision" and r.get("apply_s") is not None:
                apart = r["method"] == "svdiff"
                add(f"apply < 1 s: {r['method']}" + (" (reported apart)" if apart else ""),
                    timing["model"], r["apply_s"], TARGETS["apply_s"], r.get("note", ""))
    for t in out:  # SV-Diff's SVD and data passes are reported, not held to the 1 s target
        if "reported apart" in t["target"]:
            t["met"] = None
    return out


def floor_targets(by: dict[str, dict], name: str, add) -> None:
    """Issue 16's rows: SSF memory, SV-Diff step and inference, SH-PEFT step, data-pass peaks."""
    lora = by.get("lora", {})

    def peak(label: str, limit: float) -> None:
        r = by.get(label)
        if r and r.get("peak_vs_lora") is not None:
            add(f"{label} peak memory (apply included) <= {limit:.2f}x LoRA", name, r["peak_vs_lora"],
                limit, f"{_mb(r.get('peak_rss_mb'))} vs {_mb(lora.get('peak_rss_mb'))} MiB peak RSS; "
                f"training peak {_mb(r.get('train_peak_rss_mb'))} MiB")

    def step(label: str, limit: float) -> None:
        r = by.get(label)
        if r and r.get("cpu_vs_lora") is not None:
            add(f"{label} train step <= {limit:.2f}x LoRA", name, r["cpu_vs_lora"], limit,
                _fmt_note(r, "wall_vs_lora", "wall") + f"; CPU s per step: {_range(r['step_cpu_s'])}, "
                f"LoRA {_range(lora.get('step_cpu_s'))}", (r["step_cpu_s"], lora.get("step_cpu_s")))

    peak("ssf", TARGETS["ssf_peak_vs_lora"])
    step("svdiff", TARGETS["svdiff_step_vs_lora"])
    step("shpeft", TARGETS["shpeft_step_vs_lora"])
    for label in DATA_METHODS:
        peak(label, TARGETS["data_peak_vs_lora"])
    rec = by.get("svdiff", {}).get("infer", {}).get("unmerged", {})
    if rec.get("cpu_vs_base") is not None:
        base = by.get("frozen", {}).get("infer", {}).get("unmerged", {}).get("cpu_s")
        add("svdiff unmerged inference <= 1.10x base", name, rec["cpu_vs_base"],
            TARGETS["svdiff_unmerged_vs_base"], f"wall {_f(rec.get('wall_vs_base'))}x; base CPU s "
            f"{_range(base)}, this {_range(rec.get('cpu_s'))}", (rec.get("cpu_s"), base))


def compile_table(entry: dict) -> list[str]:
    """Eager against torch.compile (inductor), training step, for every compiled variant."""
    by = {r["label"]: r for r in entry["rows"]}
    lines = []
    for r in entry["rows"]:
        eager = by.get(r["label"].removesuffix("+compile")) if r["compiled"] else None
        if eager is None:
            continue
        lines.append([eager["label"], _f(eager.get("median_cpu_s")), _f(r.get("median_cpu_s")),
                      _f(_ratio(r.get("median_cpu_s"), eager.get("median_cpu_s"))),
                      _f(_ratio(r.get("median_step_s"), eager.get("median_step_s"))),
                      _mb(eager.get("peak_rss_mb")), _mb(r.get("peak_rss_mb")),
                      _status(r) or (f"compile {r['compile_s']:.0f} s" if r.get("compile_s") else "")])
    header = ["variant", "eager step CPU s", "compiled step CPU s", "compiled/eager CPU",
              "compiled/eager wall", "eager peak MiB", "compiled peak MiB", "note"]
    return _table(header, lines) if lines else []


def _fmt_note(r: dict, key: str, what: str) -> str:
    v = r.get(key)
    return f"{what} {v:.3f}x" if v is not None else ""


def _range(values: list[float] | None) -> str:
    """min-max of a few timings: the noise band a ratio has to be read against."""
    if not values:
        return "n/a"
    return f"{min(values):.3f}" if len(values) == 1 else f"{min(values):.3f}-{max(values):.3f}"


def _minus(a: float | None, b: float) -> float | None:
    return None if a is None else a - b


def _plain(v: Any) -> str:
    return "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


# ---- tables -----------------------------------------------------------------------------------

def _f(v: Any, fmt: str = ".3f", none: str = "") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return none
    return format(v, fmt)


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def _infer(r: dict, mode: str, key: str = "cpu_vs_base") -> str:
    rec = r["infer"].get(mode, {})
    if rec.get("error"):
        return "failed"
    return _f(rec.get(key))


def _status(r: dict) -> str:
    return f"**failed/skipped**: {r['error']}" if r.get("error") else ""


def peer_table(entry: dict) -> list[str]:
    arch = entry["arch"]
    keep = {"frozen"} | {m for m in PEFT_PAIRS[arch]} | {f"peft:{k}" for k in PEFT_PAIRS[arch].values()}
    rows = [r for r in entry["rows"] if r["method"] in keep or r["label"] in keep
            or r["label"].removesuffix("+compile") in keep]
    rows = [r for r in rows if r["group"] == 0]
    header = ["variant", "trainable", "apply s", "step s (wall)", "step CPU s", "CPU vs peft",
              "wall vs peft", "peak RSS MiB", "vs peft", "infer CPU s", "unmerged vs base",
              "merged vs base", "unloaded vs base", "adapter bytes", "note"]
    lines = []
    for r in rows:
        unm = r["infer"].get("unmerged", {})
        note = _status(r) or (f"compile {r['compile_s']:.0f} s" if r.get("compile_s") else "")
        if r["label"] == "frozen":
            note = note or "frozen backbone (+ head), input grads; eval: the bare base model"
        lines.append([r["label"], f"{r.get('trainable_params') or 0:,}", _f(r.get("apply_s")),
                      _f(r.get("median_step_s")), _f(r.get("median_cpu_s")),
                      _f(r.get("cpu_vs_peft")), _f(r.get("wall_vs_peft")), _mb(r.get("peak_rss_mb")),
                      _f(r.get("peak_vs_peft")), _f(unm.get("median_cpu_s")), _infer(r, "unmerged"),
                      _infer(r, "merged"), _infer(r, "unloaded"),
                      _f(r.get("adapter_bytes"), ","), note])
    return _table(header, lines)


def methods_table(entry: dict) -> list[str]:
    rows = [r for r in entry["rows"] if r["library"] in ("peftvision", "reference") and not r["compiled"]]
    import peftvision as pv

    measured = {r["method"] for r in rows}
    rows += [{"label": m, "method": m, "kind": info.kind, "mergeable": info.mergeable, "group": 0,
              "infer": {}, "compiled": False, "library": "peftvision",
              "error": "not measured in this run (time budget): add it with --model "
                       f"{entry['model']} --methods {m}"}
             for m, info in pv.methods().items() if entry["arch"] in info.architectures
             and m not in measured]
    header = ["method", "kind", "trainable", "apply s", "step CPU s", "step s (wall)", "vs frozen",
              "vs LoRA", "vs full", "peak RSS MiB", "vs LoRA", "vs full", "training peak MiB",
              "unmerged vs base", "merged vs base", "adapter bytes", "note"]
    lines = []
    for r in rows:
        if r["kind"] == "reference":
            merged = "1.000" if r["infer"].get("unmerged") else ""
        elif r["kind"] == "selective":
            merged = _infer(r, "unmerged")  # nothing to merge: as applied is as deployed
        else:
            merged = _infer(r, "unloaded") if r["mergeable"] else "not mergeable"
        note = _status(r) or ("own group (memory): ratios via its group's frozen" if r["group"] else "")
        lines.append([r["label"], r["kind"], _f(r.get("trainable_params"), ","), _f(r.get("apply_s")),
                      _f(r.get("median_cpu_s")), _f(r.get("median_step_s")),
                      _f(r.get("median_cpu_s_vs_frozen"), ".2f"), _f(r.get("cpu_vs_lora"), ".2f"),
                      _f(r.get("cpu_vs_full"), ".2f"), _mb(r.get("peak_rss_mb")),
                      _f(r.get("peak_vs_lora"), ".2f"), _f(r.get("peak_vs_full"), ".2f"),
                      _mb(r.get("train_peak_rss_mb")), _infer(r, "unmerged"), merged,
                      _f(r.get("adapter_bytes"), ","), note])
    return _table(header, lines)


def apply_table(timing: dict) -> list[str]:
    lines = [[r["library"], r["method"], _f(r.get("apply_s")), _f(r.get("unload_s")),
              _f(r.get("trainable_params"), ","), r.get("error") or r.get("note", "")]
             for r in timing["rows"]]
    lines += [["peftvision", m, "", "", "", why] for m, why in timing.get("skipped", {}).items()]
    return _table(["library", "method", "apply s", "unload s", "trainable", "note"], lines)


def targets_table(targets: list[dict]) -> list[str]:
    mark = {True: "met", False: "**not met**", None: "reported",
            "unresolved": "unresolved (noise)"}
    return _table(["target", "model", "measured", "limit", "status", "note"],
                  [[t["target"], t["model"], _f(t["measured"]), _f(t["limit"], ".2f"), mark[t["met"]],
                    t["note"]] for t in targets])


def render(data: dict[str, Any], source: str = "benchmarks/results/perf/compare_cpu.json") -> str:
    env, lines = data["environment"], []
    lines += ["# Performance", "",
              f"Generated by `python -m benchmarks.perf.compare --render --out {source} --markdown "
              "...` from the results file; do not edit by hand.", "",
              f"Measured with torch {env['torch']}, timm {env['timm']}, diffusers {env['diffusers']}, "
              f"peft {env.get('peft')}, peftvision {env['peftvision']}, Python {env['python']} on "
              f"{env.get('cpu', '?')} ({env['cpu_count']} CPUs, {env.get('mem_total_gib')} GiB), "
              f"{env['torch_threads']} torch thread(s) per process, device {env['device']}. "
              "Random init. The machine is shared: wall times carry other jobs' load; ratios use "
              "each process's CPU time (the steadier figure), wall ratios are shown beside them.", "",
              "Columns: *step* = zero_grad + forward + loss + backward + AdamW step, median of the "
              "timed steps; *vs frozen* = against the frozen backbone's backward with input "
              "gradients (the floor); *peak RSS* = the variant's own process (the same imports for "
              "all: the baseline is in the JSON), apply included (shpeft/spt: their data pass); "
              "*training peak* = the same process's peak from the end of apply on (n/a: not "
              "recorded in that run); *X vs base* = inference CPU time against the bare "
              "base model, interleaved (unmerged: as applied; merged: `peftvision.merge`/peft "
              "`merge_adapter`, wrappers kept; unloaded: `unload(merge=True)`/`merge_and_unload`).", "",
              "Serving one batch whose samples use different adapters (`pv.adapter_per_sample` "
              "against peft's `adapter_names=`) is measured apart: see "
              "[Serving mixed batches](performance-routing.md) (`python -m benchmarks.perf.routing`).", ""]
    for entry in data["models"].values():
        lines += [f"## {entry['case']}", "",
                  ", ".join(f"{k}={_plain(v)}" for k, v in entry["config"].items())
                  + f"; {entry['steps']} timed steps after {entry['warmup']} "
                  f"warm-up, {entry['infer_reps']} inference reps; load average "
                  f"{entry['loadavg_1m_start']:.1f} -> {entry['loadavg_1m_end']:.1f}; measured "
                  f"{entry['timestamp']} in {entry['elapsed_s'] / 60:.1f} min at git "
                  f"{(entry.get('git_sha') or '?')[:10]}"
                  f"{' + uncommitted changes' if entry.get('git_dirty') else ''}; command: "
                  f"`{entry.get('command', '?')}`.", "",
                  "Against peft (same weights, inputs, targets, rank, head):", ""]
        lines += peer_table(entry) + ["", "Every method:", ""] + methods_table(entry) + [""]
        compiled = compile_table(entry)
        if compiled:
            lines += ["Eager against torch.compile (inductor, default mode), training step:", ""]
            lines += compiled + [""]
    for timing in (data.get("apply_timing") or {}).values():
        lines += [f"## apply time on {timing['model']}", "",
                  f"{timing.get('params', 0):,} parameters, built once; each method applied, timed, "
                  "then unloaded.", ""] + apply_table(timing) + [""]
    if data.get("svdiff_state"):
        lines += svdiff_state.table(data["svdiff_state"]) + [""]
    lines += ["## Targets", "",
              "Checked on CPU-time medians. *unresolved (noise)*: the medians miss the limit but "
              "the best runs meet it (the best-of-runs ratio is in the note), so this machine's "
              "noise cannot tell; *reported*: one-time costs shown, not held to the limit.", ""]
    lines += targets_table(evaluate_targets(data) + svdiff_state.targets(data.get("svdiff_state"))) + [""]
    lines += ["## Commands", ""] + [f"- `{c}` ({t})" for c, t in data.get("commands", [])] + [""]
    return "\n".join(lines)
