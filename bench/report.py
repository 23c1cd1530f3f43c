"""The benchmarks page: ``stanceserve bench --report docs/benchmarks.md`` writes it from one run's result.

:func:`write_report` turns the JSON result of :mod:`bench.cli` into a Markdown page that a reader can rerun:
the machine (CPU model and the instruction-set flags that matter to the matmuls, cores, torch version and
threads, GPU name on CUDA), the command, the date, the settings, and the medians of every scenario that ran.
:func:`update_headline` keeps the README's short table (between :data:`HEADLINE_BEGIN` and :data:`HEADLINE_END`)
in step with the page.
:func:`machine_info` reads the machine. The page holds one run only: no history, no comparison with other runs.
This module measures nothing and imports neither torch nor the engine (the caller passes what torch reports).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path
from typing import Any

#: CPU flags that decide which matmul kernels run (shown when present; ``/proc/cpuinfo`` names).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon", "asimd")

#: Engine scenarios, in the order of the table, with their row label.
#: the heading of the engine scenarios' table, the one the README's headline copies
THROUGHPUT_HEADING = "## Throughput and latency"
ENGINE_ROWS = {
    "base": "base model",
    "one_adapter": "one adapter",
    "distinct_adapters": "distinct adapters (one per request)",
    "blend3": "3-adapter blends",
}


def machine_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU model, its relevant flags and the core count, read from ``/proc/cpuinfo`` where there is one.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (default: read it; empty on systems without one).

    Returns:
        ``{"cpu_model": str, "cpu_flags": [str], "cores": int, "os": str, "load_average": float | None}``: the
        load average is the 1-minute one when the report is written (other work on the machine skews timings).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cores": os.cpu_count() or 1,
        "os": f"{platform.system()} {platform.release()}",
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _s(x: float | None, unit: str = "s") -> str:
    if x is None:
        return "-"
    if unit == "ms":
        return f"{x * 1000:.1f} ms"
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:,.0f} MB"


def _engine_table(sc: dict[str, Any], repeats: int) -> list[str]:
    rows = [k for k in ENGINE_ROWS if k in sc]
    if not rows:
        return []
    base = sc.get("base", {}).get("output_tok_per_s")
    out = [f"{THROUGHPUT_HEADING} (median of {repeats} interleaved runs)", "",
           "| scenario | output tok/s | ratio to base | TTFT p50 | inter-token p50 | decode step | peak memory |",
           "|---|---|---|---|---|---|---|"]
    for k in rows:
        r = sc[k]
        tps = r.get("output_tok_per_s")
        ratio = f"{tps / base:.2f}" if base and tps else "-"
        step = r.get("decode_step_s_median", r.get("decode_step_s"))
        out.append(f"| {ENGINE_ROWS[k]} | **{tps:.1f}** | {ratio} | {_s(r.get('ttft_s_p50'))} | "
                   f"{_s(r.get('itl_s_p50'), 'ms')} | {_s(step, 'ms')} | {_mb(r.get('peak_memory_bytes'))} |")
    return out + [""]


def _capacity_table(sc: dict[str, Any]) -> list[str]:
    cap = sc.get("capacity")
    if not cap:
        return []
    runs = [(k, v) for k, v in cap.items() if isinstance(v, dict) and "tok_per_s_ratio" in v]
    chat = cap.get("chat_prompt_tokens")
    chat_note = (f" *Chat* prompts are short questions under the model's chat template ({min(chat)}-{max(chat)} "
                 "tokens, the template's system prompt shared by all, each question sent by every eighth request), "
                 "so the prefix cache serves their common blocks, as it does for a chat service's requests; the "
                 "TTFT floor is given for random prompts only." if chat else "")
    out = ["## Capacity (paged KV cache)", "",
           f"One KV budget, {_mb(cap.get('kv_budget_bytes'))} (what 16 rows of the longest sequence need), "
           f"{cap.get('kv_bytes_per_token', 0):,} bytes per token. Each row runs the same requests "
           f"(*random*: {cap.get('prompt_tokens')} random prompt tokens; {cap.get('max_tokens')} new tokens) at 16 "
           f"rows per step and at the default cap of {cap.get('default_max_batch_size')}, alternating; at 16 streams both "
           f"caps run the same schedule, so their ratio shows the run's noise.{chat_note} "
           "*TTFT floor* is what prefill compute alone allows for the median first token when every request arrives "
           "at once (half the prompts at the run's own prefill rate). Peak RSS is the whole process's, so after other "
           "scenarios in the same run it also holds what they allocated: run `--scenarios capacity` alone to compare "
           "it.", "",
           "| streams | prompts | stance | tok/s at 16 rows | tok/s paged | ratio | TTFT p50 16 rows / paged | "
           "TTFT floor | peak RSS 16 rows / paged | peak KV | preemptions |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in runs:
        mix, _, n = key.rpartition("_")
        mix, n = v.get("stance", mix), v.get("streams", n)
        a, b = v["rows16"], v["paged"]
        out.append(f"| {n} | {v.get('prompts', 'random')} | {ENGINE_ROWS.get(mix, mix)} | "
                   f"{a.get('output_tok_per_s', 0):.1f} | "
                   f"**{b.get('output_tok_per_s', 0):.1f}** | {v['tok_per_s_ratio']:.2f} | "
                   f"{_s(a.get('ttft_s_p50'))} / {_s(b.get('ttft_s_p50'))} | {_s(b.get('ttft_s_p50_floor'))} | "
                   f"{_mb(a.get('peak_memory_bytes'))} / {_mb(b.get('peak_memory_bytes'))} | "
                   f"{_mb(b.get('kv_bytes_peak'))} | {b.get('preemptions', 0)} |")
    mixed = cap.get("mixed_lengths")
    if mixed:
        out += ["", f"Mixed lengths in the same budget: {mixed.get('long_requests')} prompts of "
                    f"{mixed.get('long_prompt_tokens')} tokens and {mixed.get('short_requests')} short ones at once: "
                    f"{mixed.get('output_tok_per_s', 0):.1f} tok/s, up to {mixed.get('decode_rows_peak')} rows in one "
                    f"decode step, peak KV {_mb(mixed.get('kv_bytes_peak'))} "
                    f"({mixed.get('kv_budget_fraction_peak', 0) * 100:.0f}% of the budget), "
                    f"{mixed.get('preemptions', 0)} preemptions."]
    return out + [""]


def _service_table(sc: dict[str, Any], repeats: int) -> list[str]:
    svc = sc.get("service")
    if not svc or "base" not in svc:
        return []
    base = svc["base"].get("output_tok_per_s") or 0
    out = ["## Service over HTTP", "",
           f"{svc.get('streams')} concurrent streamed chat completions per stance mix (the load test's questions under "
           f"the model's chat template, {svc.get('max_tokens')} new tokens each, greedy) against `stanceserve serve`, "
           f"which the benchmark starts on loopback with {svc.get('adapters')} rank-{svc.get('rank')} adapters in its "
           f"store. Times are the client's; the round with the median tok/s of {repeats} interleaved rounds. Peak "
           f"memory of the service (PSS, over every round): {_mb(svc.get('peak_pss_bytes'))}.", "",
           "| stance mix | output tok/s | ratio to base | TTFT p50 / p99 | inter-token p50 / p99 |",
           "|---|---|---|---|---|"]
    labels = {**ENGINE_ROWS, "distinct_adapters": f"{svc.get('adapters')} distinct adapters, taken in turn"}
    for k in ("base", "one_adapter", "distinct_adapters", "blend3"):
        r = svc.get(k)
        if not r:
            continue
        tps = r.get("output_tok_per_s") or 0
        ratio = f"{tps / base:.2f}" if base else "-"
        out.append(f"| {labels[k]} | **{tps:.1f}** | {ratio} | {_s(r.get('ttft_s_p50'))} / "
                   f"{_s(r.get('ttft_s_p99'))} | {_s(r.get('itl_s_p50'), 'ms')} / {_s(r.get('itl_s_p99'), 'ms')} |")
    return out + [""]


def _other_rows(sc: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if "decode_step" in sc:
        d = sc["decode_step"]
        steps = ", ".join(f"{ENGINE_ROWS[k]} {_s(d.get(f'{k}_step_s'), 'ms')}" for k in ENGINE_ROWS
                          if d.get(f"{k}_step_s") is not None)
        rows.append((f"one decode step, {d.get('rows')} rows at {d.get('context_tokens')} tokens", steps))
        if d.get("one_adapter_alternating_ratio_to_base") is not None:
            rows.append(("one adapter on every row: decode step vs base, interleaved steps",
                         f"{_s(d.get('alternating_one_adapter_step_s'), 'ms')} vs "
                         f"{_s(d.get('alternating_base_step_s'), 'ms')} "
                         f"({d['one_adapter_alternating_ratio_to_base']:.2f}x base speed)"))
        for k in ("distinct_adapters", "blend3"):
            by = d.get(f"{k}_step_s_by_kernel")
            if by:
                rows.append((f"{ENGINE_ROWS[k]}: decode step by LoRA kernel (engine: {d.get('decode_kernel')})",
                             ", ".join(f"{kernel} {_s(t, 'ms')}" for kernel, t in by.items())))
        if d.get("base_step_vs_roofline") is not None:
            rows.append(("base decode step vs its matmuls alone (roofline)",
                         f"{_s(d.get('base_step_paired_s'), 'ms')} vs {_s(d.get('matmul_roofline_s'), 'ms')} "
                         f"({d['base_step_vs_roofline']:.2f}x)"))
    if "shared_prefix" in sc:
        p = sc["shared_prefix"]
        rows.append((f"TTFT p50 of {p.get('requests')} requests sharing a {p.get('system_tokens')}-token system "
                     "prompt, prefix cache on / off",
                     f"{_s(p.get('ttft_s_p50_prefix_cache'))} / {_s(p.get('ttft_s_p50_no_prefix_cache'))} "
                     f"({p.get('ratio', 0):.2f}x)"))
    if "busy_ttft" in sc:
        b = sc["busy_ttft"]
        rows.append((f"TTFT p50 of a request arriving while {b.get('background_requests')} others decode, vs idle",
                     f"{_s(b.get('busy_ttft_s_p50'))} vs {_s(b.get('idle_ttft_s_p50'))} ({b.get('ratio_p50', 0):.2f}x)"))
    if "stance_switching" in sc:
        rows.append(("latency when consecutive requests alternate adapters, vs staying on one",
                     f"{sc['stance_switching'].get('ratio', 0):.2f}x"))
    if "cold_load" in sc:
        c = sc["cold_load"]
        rows.append((f"cold load of a rank-{c.get('rank')} adapter: slot load / store add / upload to first token, p50",
                     f"{_s(c.get('slot_load_s_p50'), 'ms')} / {_s(c.get('store_add_s_p50'), 'ms')} / "
                     f"{_s(c.get('upload_to_first_token_s_p50'))}"))
    if "many_adapters" in sc:
        m = sc["many_adapters"]
        rows.append((f"{m.get('registered_adapters')} registered adapters over {m.get('device_slots')} slots "
                     f"({m.get('requests')} requests, {m.get('concurrency')} at a time)",
                     f"{m.get('output_tok_per_s', 0):.1f} tok/s, TTFT p50 {_s(m.get('ttft_s_p50'))}, "
                     f"{m.get('slot_misses')} slot misses"))
    for key, label in (("baseline_peft_adapter_names", "plain peft, one batch with `adapter_names`"),
                       ("baseline_serial_set_adapter", "plain peft, serial `set_adapter` per request")):
        if key in sc:
            rows.append((label, f"{sc[key].get('output_tok_per_s', 0):.1f} tok/s"))
    if "soak" in sc:
        s = sc["soak"]
        rows.append((f"memory over {s.get('requests')} requests of mixed stances",
                     f"{_mb(s['memory_bytes_at_checkpoints'][0])} after warm-up, "
                     f"{s.get('growth_after_warmup_fraction', 0) * 100:+.2f}% at the end"))
    if "bf16_parity" in sc:
        p = sc["bf16_parity"]
        rows.append((f"{p.get('dtype')} vs float32 greedy answers ({p.get('prompts')} prompts)",
                     f"{p.get('token_agreement', 0) * 100:.1f}% of tokens equal, "
                     f"{p.get('identical_answers', 0) * 100:.1f}% of answers identical"))
    if "compile" in sc:
        c = sc["compile"]
        shown = ", ".join(f"{k} {_s(v, 'ms')}" for k, v in c.items() if k.endswith("_step_s") and v is not None)
        if shown:
            rows.append(("`torch.compile` vs eager decode step", shown))
    return rows


def render_report(result: dict[str, Any], *, command: str, date: dt.datetime | None = None,
                  machine: dict[str, Any] | None = None) -> str:
    """The benchmarks page (Markdown) for one ``stanceserve bench`` result.

    Args:
        result: the JSON object :mod:`bench.cli` prints (``model``, ``machine``, ``settings``, ``scenarios``).
        command: the command line that produced it, shown for rerunning.
        date: when it ran (default: now, UTC).
        machine: :func:`machine_info` (default: read now).

    Returns:
        The page's text.
    """
    date = date or dt.datetime.now(dt.timezone.utc)
    machine = machine if machine is not None else machine_info()
    run = result.get("machine", {})
    st = result.get("settings", {})
    sc = result.get("scenarios", {})
    flags = ", ".join(machine.get("cpu_flags", [])) or "none of " + ", ".join(CPU_FLAGS[:4])
    hw = f"{machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores (flags: {flags})"
    if run.get("gpu"):
        hw = f"{run['gpu']}; host CPU {hw}"
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by `stanceserve bench --report`; edit the writer (bench/report.py), not this page. -->",
        "",
        "One run of the benchmark on one machine. Numbers depend on the machine: rerun the command below on yours.",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{command}` |",
        f"| date | {date.strftime('%Y-%m-%d %H:%M')} UTC |",
        f"| machine | {hw} |",
        f"| OS | {machine.get('os', '?')} |",
        *([f"| load average (1 min) at the end | {machine['load_average']} on {machine.get('cores', '?')} cores "
           "(other work on the machine slows every row) |"] if machine.get("load_average") is not None else []),
        f"| torch | {run.get('torch', '?')} ({run.get('cpu_threads', '?')} threads), Python {run.get('python', '?')} |",
        f"| model | {result.get('model', '?')}, {run.get('device', '?')}, {run.get('dtype', '?')}"
        + (f", {result['weight_bytes'] / 1e6:,.0f} MB of weights |" if result.get("weight_bytes") else " |"),
        f"| workload | {st.get('requests', '?')} concurrent requests of {st.get('prompt_len', '?')} prompt tokens and "
        f"{st.get('max_tokens', '?')} new tokens, greedy, rank-{st.get('rank', '?')} adapters, "
        f"{st.get('max_loras', '?')} device slots |",
    ]
    if result.get("total_s") is not None:
        lines.append(f"| run time | {result['total_s']:.0f} s |")
    lines.append("")
    lines += _engine_table(sc, st.get("repeats", 1))
    lines += _capacity_table(sc)
    lines += _service_table(sc, st.get("repeats", 1))
    other = _other_rows(sc)
    if other:
        lines += ["## Other scenarios", "", "| scenario | result |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in other] + [""]
    lines += [
        "## What the scenarios measure",
        "",
        "`stanceserve bench` runs the engine in process on random rank-R adapters over all seven projections, so "
        "no HTTP or tokenisation cost is included, except in *Service over HTTP*. *Output tok/s* counts generated tokens of all concurrent "
        "requests per second of wall time; *TTFT* is arrival to first token; *decode step* is the time of one "
        "batched decode step. *Distinct adapters* gives every request its own adapter, *3-adapter blends* every "
        "request a blend of three. `--scenarios` picks a subset; `stanceserve bench --help` lists them all.",
        "",
    ]
    return "\n".join(lines)


#: Markers around the README's headline table, which :func:`headline` derives from the benchmarks page.
HEADLINE_BEGIN = "<!-- BEGIN bench-headline: from docs/benchmarks.md, rewritten by `stanceserve bench --report` -->"
HEADLINE_END = "<!-- END bench-headline -->"


def headline(page: str, link: str = "docs/benchmarks.md") -> str:
    """The README's short version of a benchmarks page: its command, date and machine, and the throughput table.

    Args:
        page: the text :func:`render_report` wrote.
        link: where the README links to the full page.

    Raises:
        ValueError: the page has no command, date, machine or throughput table.
    """
    rows = dict(re.findall(r"^\| (command|date|machine|model) \| (.*) \|$", page, re.MULTILINE))
    table = re.search(rf"^{THROUGHPUT_HEADING}[^\n]*\n\n((?:\|[^\n]*\|\n?)+)", page, re.MULTILINE)
    if not table or not {"command", "date", "machine", "model"} <= set(rows):
        raise ValueError("not a benchmarks page written by bench.report")
    cells = [[c.strip() for c in line.strip().strip("|").split("|")][:4] for line in table.group(1).strip().splitlines()]
    short = "\n".join("| " + " | ".join(row) + " |" for row in cells)
    return (f"{short}\n\n{rows['model']}; {rows['machine']}; {rows['date']}; `{rows['command'].strip('`')}`. "
            f"More scenarios and what they measure: [benchmarks]({link}).")


def update_headline(readme: str, page: str) -> str:
    """``readme`` with the block between :data:`HEADLINE_BEGIN` and :data:`HEADLINE_END` set to :func:`headline`.

    Raises:
        ValueError: the markers are missing.
    """
    start, end = readme.find(HEADLINE_BEGIN), readme.find(HEADLINE_END)
    if start < 0 or end < start:
        raise ValueError(f"no {HEADLINE_BEGIN!r} ... {HEADLINE_END!r} block")
    return f"{readme[: start + len(HEADLINE_BEGIN)]}\n{headline(page)}\n{readme[end:]}"


def write_report(path: Path, result: dict[str, Any], *, command: str, date: dt.datetime | None = None,
                 machine: dict[str, Any] | None = None, readme: Path | None = None) -> Path:
    """Write :func:`render_report` to ``path`` (parents created), and the headline into ``readme`` when it has
    the :data:`HEADLINE_BEGIN` block and the page a throughput table (a run of other scenarios alone leaves the
    README as it is); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_report(result, command=command, date=date, machine=machine)
    path.write_text(page, encoding="utf-8")
    if readme is not None and readme.is_file() and THROUGHPUT_HEADING in page:
        text = readme.read_text(encoding="utf-8")
        if HEADLINE_BEGIN in text:
            readme.write_text(update_headline(text, page), encoding="utf-8")
    return path
