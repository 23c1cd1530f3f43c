"""The benchmarks page writer (bench/report.py) on a small fake result: machine, command, date, medians; no
history. The benchmark itself is not run here (tests/bench covers its scenarios on a tiny model)."""

from __future__ import annotations

import datetime as dt

import pytest

from bench.report import HEADLINE_BEGIN, HEADLINE_END, headline, machine_info, update_headline, write_report

CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 foo
processor\t: 1
model name\t: Example CPU 9000
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 foo
"""

MACHINE = {"cpu_model": "Example CPU 9000", "cpu_flags": ["avx2", "fma"], "cores": 8, "os": "Linux 6.1",
           "load_average": 0.5}
DATE = dt.datetime(2030, 1, 2, 3, 4, tzinfo=dt.timezone.utc)


def fake_result() -> dict:
    def engine(tps, step):
        return {"output_tok_per_s": tps, "ttft_s_p50": 0.5, "itl_s_p50": 0.04, "decode_step_s_median": step,
                "peak_memory_bytes": 2.5e9}

    return {
        "model": "TinyModel", "weight_bytes": 5.38e8,
        "machine": {"python": "3.11.7", "torch": "2.13.0+cpu", "cpu_threads": 8, "device": "cpu", "dtype": "float32"},
        "settings": {"requests": 16, "prompt_len": 64, "max_tokens": 32, "rank": 16, "repeats": 3, "max_loras": 32},
        "scenarios": {
            "base": engine(100.0, 0.1), "one_adapter": engine(80.0, 0.12), "distinct_adapters": engine(75.0, 0.13),
            "blend3": engine(60.0, 0.15),
            "shared_prefix": {"requests": 16, "system_tokens": 500, "ttft_s_p50_prefix_cache": 1.0,
                              "ttft_s_p50_no_prefix_cache": 4.0, "ratio": 0.25},
            "cold_load": {"rank": 16, "slot_load_s_p50": 0.0125, "store_add_s_p50": 0.2,
                          "upload_to_first_token_s_p50": 0.6},
        },
        "total_s": 123.4,
    }


def test_machine_info_reads_model_flags_and_cores():
    info = machine_info(CPUINFO)
    assert info["cpu_model"] == "Example CPU 9000"
    assert info["cpu_flags"] == ["avx2", "fma", "avx512f", "avx512_bf16"]  # only the flags that matter, in order
    assert info["cores"] >= 1 and info["os"]


def test_page_records_machine_command_date_and_medians(tmp_path):
    page = write_report(tmp_path / "docs" / "benchmarks.md", fake_result(), command="stanceserve bench --repeats 3",
                        date=DATE, machine=MACHINE).read_text()
    assert "| command | `stanceserve bench --repeats 3` |" in page
    assert "| date | 2030-01-02 03:04 UTC |" in page
    assert "Example CPU 9000, 8 cores (flags: avx2, fma)" in page
    assert "2.13.0+cpu (8 threads)" in page and "TinyModel" in page
    assert "| load average (1 min) at the end | 0.5 on 8 cores" in page
    assert "| base model | **100.0** | 1.00 | 0.50 s | 40.0 ms | 100.0 ms | 2,500 MB |" in page
    assert "| 3-adapter blends | **60.0** | 0.60 |" in page
    assert "median of 3" in page
    assert "1.00 s / 4.00 s (0.25x)" in page and "12.5 ms / 200.0 ms / 0.60 s" in page
    assert "session" not in page.lower() and "commit" not in page.lower()


def test_capacity_runs_get_their_own_table():
    from bench.report import render_report

    def run(tps, ttft, rss):
        return {"output_tok_per_s": tps, "ttft_s_p50": ttft, "ttft_s_p50_floor": 0.9, "peak_memory_bytes": rss,
                "kv_bytes_peak": 3e7, "preemptions": 2}

    result = fake_result()
    result["scenarios"]["capacity"] = {
        "kv_budget_bytes": 1.5e9, "kv_bytes_per_token": 46080, "prompt_tokens": 80, "max_tokens": 32,
        "default_max_batch_size": 256,
        "base_64": {"rows16": run(300.0, 2.8, 2.4e9), "paged": run(450.0, 1.9, 2.3e9), "tok_per_s_ratio": 1.5},
        "chat_one_adapter_64": {"prompts": "chat", "stance": "one_adapter", "streams": 64,
                                "rows16": run(250.0, 4.1, 2.4e9), "paged": dict(run(450.0, 0.4, 2.3e9), ttft_s_p50_floor=None),
                                "tok_per_s_ratio": 1.8},
        "chat_prompt_tokens": [36, 39],
        "mixed_lengths": {"long_requests": 4, "long_prompt_tokens": 1500, "short_requests": 60,
                          "output_tok_per_s": 200.0, "decode_rows_peak": 64, "kv_bytes_peak": 6e8,
                          "kv_budget_fraction_peak": 0.4, "preemptions": 0},
        "summary": {"ratio_median": 1.5},
    }
    page = render_report(result, command="stanceserve bench --scenarios capacity", date=DATE, machine=MACHINE)
    assert "## Capacity (paged KV cache)" in page and "default cap of 256" in page
    assert ("| 64 | random | base model | 300.0 | **450.0** | 1.50 | 2.80 s / 1.90 s | 0.90 s | 2,400 MB / 2,300 MB | "
            "30 MB | 2 |" in page)
    assert ("| 64 | chat | one adapter | 250.0 | **450.0** | 1.80 | 4.10 s / 0.40 s | - | 2,400 MB / 2,300 MB | 30 MB | 2 |"
            in page)
    assert "chat template (36-39 tokens" in page
    assert "4 prompts of 1500 tokens and 60 short ones at once" in page and "(40% of the budget)" in page
    assert "## Capacity" not in render_report(fake_result(), command="x", date=DATE, machine=MACHINE)


def test_the_service_runs_get_their_own_table():
    from bench.report import render_report

    def run(tps, ttft):
        return {"output_tok_per_s": tps, "ttft_s_p50": ttft, "ttft_s_p99": 2 * ttft, "itl_s_p50": 0.05,
                "itl_s_p99": 0.2}

    result = fake_result()
    result["scenarios"]["service"] = {"streams": 64, "max_tokens": 32, "adapters": 16, "rank": 16,
                                      "peak_pss_bytes": 1.7e9, "base": run(400.0, 0.6),
                                      "distinct_adapters": run(300.0, 0.8)}
    page = render_report(result, command="stanceserve bench --scenarios service", date=DATE, machine=MACHINE)
    assert "## Service over HTTP" in page and "with 16 rank-16 adapters" in page and "(PSS, over every round): 1,700 MB" in page
    assert "| base model | **400.0** | 1.00 | 0.60 s / 1.20 s | 50.0 ms / 200.0 ms |" in page
    assert "| 16 distinct adapters, taken in turn | **300.0** | 0.75 | 0.80 s / 1.60 s |" in page
    assert "one adapter |" not in page.split("## Service over HTTP")[1].split("##")[0]  # a mix not run: no row
    assert "## Service" not in render_report(fake_result(), command="x", date=DATE, machine=MACHINE)


def test_missing_scenarios_are_left_out():
    from bench.report import render_report

    result = fake_result()
    result["scenarios"] = {"base": result["scenarios"]["base"]}
    page = render_report(result, command="stanceserve bench --scenarios engine", date=DATE, machine=MACHINE)
    assert "| base model |" in page and "one adapter" not in page and "## Other scenarios" not in page


def test_readme_headline_follows_the_page(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{HEADLINE_BEGIN}\nold\n{HEADLINE_END}\n\nrest\n")
    page = write_report(tmp_path / "bench.md", fake_result(), command="stanceserve bench", date=DATE,
                        machine=MACHINE, readme=readme).read_text()
    text = readme.read_text()
    assert "old" not in text and text.endswith("rest\n")
    assert headline(page) in text
    assert "| base model | **100.0** | 1.00 | 0.50 s |" in text and "`stanceserve bench`" in text
    with pytest.raises(ValueError):
        update_headline("no markers", page)
    with pytest.raises(ValueError):
        headline("# not a report")


def test_a_page_without_the_throughput_table_leaves_the_readme_alone(tmp_path):
    """``--scenarios prefix --report P`` writes P and no headline (there is no throughput table to copy)."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{HEADLINE_BEGIN}\nold\n{HEADLINE_END}\n")
    result = fake_result()
    result["scenarios"] = {"shared_prefix": result["scenarios"]["shared_prefix"]}
    page = write_report(tmp_path / "prefix.md", result, command="stanceserve bench --scenarios prefix", date=DATE,
                        machine=MACHINE, readme=readme).read_text()
    assert "## Throughput" not in page and "1.00 s / 4.00 s (0.25x)" in page
    assert "\nold\n" in readme.read_text()


def test_bench_command_has_the_report_option_and_records_its_command_line(monkeypatch):
    from typer.testing import CliRunner

    from bench.cli import _command_line, app

    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0 and "--report" in result.output
    monkeypatch.setattr("sys.argv", ["/venv/bin/stanceserve", "bench", "--scenarios", "engine", "--report", "a b.md"])
    assert _command_line() == "stanceserve bench --scenarios engine --report 'a b.md'"
    monkeypatch.setattr("sys.argv", ["bench/__main__.py", "--repeats", "1"])
    assert _command_line() == "stanceserve bench --repeats 1"
