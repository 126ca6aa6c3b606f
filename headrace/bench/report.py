"""`headrace bench serve` results: one summary per request rate with `vllm bench serve`'s
field names, the sweep's JSON, its plot (TTFT, TPOT and throughput against the rate) and
the printed table.

Field names follow vLLM's benchmark_serving results: `completed`, `failed`, `duration`,
`total_input_tokens`, `total_output_tokens`, `request_throughput`, `output_throughput`,
`total_token_throughput`, and for ttft / tpot / itl / e2el: `mean_*_ms`, `median_*_ms`,
`std_*_ms`, `p99_*_ms` (plus `p50`/`p90`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headrace.bench.serve import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(sorted_vals: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_vals) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def latency_fields(name: str, seconds: list[float]) -> dict[str, float]:
    """mean/median/std/pNN of one latency, in milliseconds, named as vLLM names them."""
    vals = sorted(v * 1e3 for v in seconds if not math.isnan(v))
    if not vals:
        nan = math.nan
        out = {f"mean_{name}_ms": nan, f"median_{name}_ms": nan, f"std_{name}_ms": nan}
        return out | {f"p{p}_{name}_ms": nan for p in PERCENTILES}
    out = {
        f"mean_{name}_ms": statistics.fmean(vals),
        f"median_{name}_ms": statistics.median(vals),
        f"std_{name}_ms": statistics.pstdev(vals),
    }
    return out | {f"p{p}_{name}_ms": percentile(vals, p) for p in PERCENTILES}


def summarize_run(
    rate: float,
    reqs: list[RequestResult],
    duration: float,
    max_concurrency: int | None,
    cpu: float | None = None,
    detailed: bool = False,
) -> dict[str, Any]:
    """One rate's results, vLLM-named."""
    ok = [r for r in reqs if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    result: dict[str, Any] = {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "max_concurrency": max_concurrency,
        "num_prompts": len(reqs),
        "completed": len(ok),
        "failed": len(reqs) - len(ok),
        "duration": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    result |= latency_fields("ttft", [r.ttft for r in ok])
    result |= latency_fields("tpot", [r.tpot for r in ok])
    result |= latency_fields("itl", [g for r in ok for g in r.itl])
    result |= latency_fields("e2el", [r.e2e for r in ok])
    result["errors"] = sorted({r.error for r in reqs if r.error})[:10]
    if cpu is not None:
        result["measured_pid_cpu_s"] = cpu
        result["measured_pid_cpu_s_per_output_token"] = cpu / max(out_tokens, 1)
    if detailed:
        result["requests"] = [asdict(r) | {"tpot": r.tpot} for r in reqs]
    return result


def sweep_result(header: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON file: the run settings, `runs` (one per rate, in order) and, when there is
    a single rate, that run's fields at the top level too (as `vllm bench serve` writes)."""
    out = dict(header)
    if len(runs) == 1:
        out |= runs[0]
    out["runs"] = runs
    return out


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """Three panels against the request rate: TTFT, TPOT (mean and p99), throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [str(r["request_rate"]) for r in runs]
    x = list(range(len(runs)))  # categorical: "inf" has no place on a numeric axis
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for stat, style in (("mean", "o-"), ("median", "s--"), ("p99", "^:")):
            ax.plot(x, [r[f"{stat}_{key}_ms"] for r in runs], style, label=stat)
        ax.set(title=f"{title} (ms)", xlabel="request rate (req/s)")
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(x, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    ax.plot(x, [r["total_token_throughput"] for r in runs], "s--", label="total tok/s")
    ax.set(title="throughput (tokens/s)", xlabel="request rate (req/s)")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    n = runs[0]["num_prompts"] if runs else 0
    fig.suptitle(f"headrace bench serve: {result['model']}, {n} requests per rate", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def print_sweep(result: dict[str, Any]) -> None:
    cols = (
        ("rate", "request_rate", "{}"),
        ("ok/fail", None, ""),
        ("req/s", "request_throughput", "{:.2f}"),
        ("out tok/s", "output_throughput", "{:.1f}"),
        ("TTFT mean/p99 ms", ("mean_ttft_ms", "p99_ttft_ms"), "{:.1f} / {:.1f}"),
        ("TPOT mean/p99 ms", ("mean_tpot_ms", "p99_tpot_ms"), "{:.2f} / {:.2f}"),
        ("ITL p50 ms", "median_itl_ms", "{:.2f}"),
        ("E2E mean ms", "mean_e2el_ms", "{:.0f}"),
    )
    widths = [max(len(name), 10) for name, _, _ in cols]
    print("  ".join(name.rjust(w) for (name, _, _), w in zip(cols, widths, strict=True)))
    for run in result["runs"]:
        cells = []
        for _, key, fmt in cols:
            if key is None:
                cells.append(f"{run['completed']}/{run['failed']}")
            elif isinstance(key, tuple):
                cells.append(fmt.format(*(run[k] for k in key)))
            else:
                cells.append(fmt.format(run[key]))
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
        if "measured_pid_cpu_s" in run:
            per = run["measured_pid_cpu_s_per_output_token"] * 1e6
            print(f"    measured PID: {run['measured_pid_cpu_s']:.2f} CPU s, {per:.1f} us/token")
        for e in run["errors"]:
            print(f"    error: {e}")
