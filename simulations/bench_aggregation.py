"""Benchmark: factored ``svd`` aggregation versus a dense SVD of the full update sum.

For one LoRA module with ``K`` clients of rank ``r`` on a square ``d x d`` weight,
it times (and measures the peak numpy memory of, via ``tracemalloc``):

* ``aggregate("svd", ...)``: stacked factors, thin QR, core decomposition; the
  ``d x d`` matrix is never formed;
* the dense baseline: form ``sum_k p_k s_k B_k A_k`` (``d x d``, float64) and run
  ``numpy.linalg.svd(dense, full_matrices=False)``, truncated to rank ``r``;
* ``aggregate("fedavg", ...)`` and ``aggregate("stack", ...)``.

Usage (from the repository root)::

    python -m simulations.bench_aggregation --quick
    python simulations/bench_aggregation.py --out results/bench_aggregation.json

``--threads N`` sets the BLAS thread count (environment variables read when
numpy loads, so it only works when numpy is not imported yet).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
MB = 1024.0 * 1024.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip d=4096 (dense SVD there takes tens of seconds)")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100], help="numbers of clients K")
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 4096], help="square weight sizes d")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16], help="client LoRA ranks r")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cheap methods (best is kept)")
    parser.add_argument(
        "--dense-repeats", type=int, default=1, help="timed runs of the dense SVD when d > 1024 (else --repeats)"
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="client factor dtype")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (set before numpy loads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def _measure(fn: Callable[[], Any], repeats: int) -> Tuple[float, float, Any]:
    """Best wall time (s) over ``repeats`` runs and the largest tracemalloc peak (MB)."""
    best, peak, result = float("inf"), 0.0, None
    for _ in range(max(1, repeats)):
        result = None
        tracemalloc.start()
        tracemalloc.reset_peak()
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        _, run_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        best = min(best, elapsed)
        peak = max(peak, run_peak / MB)
    return best, peak, result


def make_updates(np: Any, LoraFactors: Any, K: int, d: int, r: int, dtype: str, seed: int):
    """K clients, one square module, A ~ N(0, 1/d), B ~ N(0, 0.02^2), alpha = 2r."""
    rng = np.random.default_rng(seed)
    updates = []
    for _ in range(K):
        A = (rng.standard_normal((r, d)) / np.sqrt(d)).astype(dtype)  # (r, d_in)
        B = (0.02 * rng.standard_normal((d, r))).astype(dtype)  # (d_out, r)
        updates.append({"layer.attn.q": LoraFactors(A=A, B=B, scale=2.0)})
    weights = rng.integers(50, 500, size=K)
    return updates, weights


def dense_svd(np: Any, stack_factors: Any, normalize_weights: Any, updates, weights, rank: int):
    """Baseline: the dense d x d sum and its full thin SVD, truncated to ``rank``."""
    p = normalize_weights(weights, len(updates))
    factors = [u["layer.attn.q"] for u in updates]
    B_stack, A_stack = stack_factors(factors, [pk * f.scale for pk, f in zip(p, factors)])
    dense = B_stack @ A_stack  # (d_out, d_in), float64
    del B_stack, A_stack
    U, S, Vt = np.linalg.svd(dense, full_matrices=False)
    return U[:, :rank] * S[:rank], Vt[:rank], S


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import numpy as np

    from fedlora.aggregation import LoraFactors, aggregate, normalize_weights, stack_factors

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows: List[Dict[str, Any]] = []
    dims = [d for d in args.dims if not (args.quick and d > 1024)]
    for d in dims:
        for K in args.clients:
            for r in args.ranks:
                updates, weights = make_updates(np, LoraFactors, K, d, r, args.dtype, args.seed)
                report: Dict[str, Any] = {}
                t_svd, m_svd, out = _measure(
                    lambda: aggregate("svd", updates, weights, rank=r, report=report), args.repeats
                )
                dense_reps = args.dense_repeats if d > 1024 else args.repeats
                t_dense, m_dense, (UB, Vt, S) = _measure(
                    lambda: dense_svd(np, stack_factors, normalize_weights, updates, weights, r), dense_reps
                )
                t_avg, m_avg, _ = _measure(lambda: aggregate("fedavg", updates, weights), args.repeats)
                t_stack, m_stack, _ = _measure(lambda: aggregate("stack", updates, weights), args.repeats)

                # Check both agree: leading singular values (float64) of factored vs dense.
                s_fact = report["layer.attn.q"].singular_values[:r]
                sv_diff = float(np.max(np.abs(s_fact - S[:r]) / S[0]))
                assert out["layer.attn.q"].rank == r
                row = {
                    "K": K,
                    "d": d,
                    "r": r,
                    "R": K * r,
                    "svd_s": t_svd,
                    "dense_s": t_dense,
                    "speedup": t_dense / t_svd,
                    "svd_peak_mb": m_svd,
                    "dense_peak_mb": m_dense,
                    "mem_ratio": m_dense / m_svd if m_svd > 0 else float("inf"),
                    "theory_factored_mb": (d + d) * K * r * 8 / MB,
                    "theory_dense_mb": d * d * 8 / MB,
                    "fedavg_s": t_avg,
                    "fedavg_peak_mb": m_avg,
                    "stack_s": t_stack,
                    "stack_peak_mb": m_stack,
                    "sv_max_rel_diff": sv_diff,
                    "dense_runs": dense_reps,
                }
                rows.append(row)
                print(
                    f"  done K={K} d={d} r={r}: svd {t_svd:.3f}s, dense {t_dense:.2f}s "
                    f"({t_dense / t_svd:.1f}x)",
                    file=sys.stderr,
                    flush=True,
                )
    meta = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "blas_threads": {v: os.environ.get(v) for v in _THREAD_VARS},
        "dtype": args.dtype,
        "repeats": args.repeats,
        "quick": args.quick,
        "seed": args.seed,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return {"meta": meta, "rows": rows}


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """The results as a markdown table."""
    header = (
        "| K | d | r | R=K·r | svd factored (s) | dense SVD (s) | speedup | factored peak MB | dense peak MB "
        "| mem ratio | theory factored MB | theory dense MB | fedavg (s) | stack (s) | max sv diff |"
    )
    sep = "|" + "---|" * 15
    lines = [header, sep]
    for x in rows:
        lines.append(
            f"| {x['K']} | {x['d']} | {x['r']} | {x['R']} | {x['svd_s']:.4f} | {x['dense_s']:.3f} "
            f"| {x['speedup']:.1f}x | {x['svd_peak_mb']:.1f} | {x['dense_peak_mb']:.1f} | {x['mem_ratio']:.1f}x "
            f"| {x['theory_factored_mb']:.1f} | {x['theory_dense_mb']:.1f} | {x['fedavg_s']:.4f} "
            f"| {x['stack_s']:.4f} | {x['sv_max_rel_diff']:.0e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        if "numpy" in sys.modules:
            print("warning: numpy already loaded, --threads has no effect", file=sys.stderr)
        for var in _THREAD_VARS:
            os.environ[var] = str(args.threads)
    if __package__ in (None, ""):  # run as a script: make the repository importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    results = run(args)
    meta = results["meta"]
    print(
        f"numpy {meta['numpy']}, python {meta['python']}, {meta['cpu_count']} CPUs, "
        f"BLAS threads {args.threads if args.threads is not None else 'default'}, client dtype {args.dtype}; "
        "times are the best of the runs, peaks are tracemalloc peaks of numpy allocations "
        "(LAPACK workspace is not traced)"
    )
    if meta["loadavg_start"] is not None:
        print(f"load average at start {meta['loadavg_start'][0]:.2f}, at end {meta['loadavg_end'][0]:.2f}")
    print()
    print(markdown_table(results["rows"]))
    print()
    print(
        "theory: factored input (d_in + d_out) * K * r * 8 bytes vs dense d_in * d_out * 8 bytes; "
        "speedup and mem ratio are dense / factored"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
