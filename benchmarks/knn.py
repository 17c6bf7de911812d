"""kNN evaluation benchmark: FAISS weighted kNN vs naive torch mm+topk vs sklearn, and memory use.

    python -m benchmarks.knn             # 10,000 queries x 60,000 x 512 bank, k=200
    python -m benchmarks.knn --memory    # 1M x 256 fp16 bank: peak RSS vs the bank's size

Every engine runs with the same thread count (torch, faiss OpenMP, and BLAS/OpenMP pools via
threadpoolctl). The matmul peak is a plain 4096^3 fp32 GEMM measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import faiss
import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from selfsup.eval.knn import weighted_knn


def clustered(rng, n: int, centres: np.ndarray, dtype=np.float32, chunk: int = 16384):
    """(n, D) features around ``centres`` (C, D) with (n,) labels, generated chunk by chunk into ``dtype``."""
    labels = rng.integers(0, len(centres), n)
    x = np.empty((n, centres.shape[1]), dtype)
    for s in range(0, n, chunk):
        noise = rng.standard_normal((min(chunk, n - s), centres.shape[1]), dtype=np.float32)
        x[s : s + chunk] = centres[labels[s : s + chunk]] + 1.5 * noise
    return x, labels


def best_of(repeats: int, fn):
    """(fastest wall time in seconds, last result) of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def gemm_peak() -> float:
    """FLOP/s of a 4096 x 4096 @ 4096 x 4096 fp32 matmul, best of 3."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    seconds, _ = best_of(3, lambda: a @ b)
    return 2 * 4096**3 / seconds


def torch_knn(bank, bank_labels, queries, k: int, t: float, num_classes: int, chunk: int = 1024) -> np.ndarray:
    """Naive DINO kNN: normalise, mm against the whole bank, topk, weighted vote. Returns (M,) predictions."""
    b = torch.nn.functional.normalize(torch.from_numpy(bank), dim=1)
    labels = torch.from_numpy(bank_labels)
    preds = []
    for s in range(0, len(queries), chunk):
        q = torch.nn.functional.normalize(torch.from_numpy(queries[s : s + chunk]), dim=1)
        sims, idx = torch.topk(q @ b.T, k, dim=1)
        scores = torch.zeros(len(q), num_classes, dtype=torch.float64)
        scores.scatter_add_(1, labels[idx], (sims.double() / t).exp())
        preds.append(scores.argmax(1))
    return torch.cat(preds).numpy()


def speed(args) -> None:
    rng = np.random.default_rng(0)
    centres = 0.28 * rng.normal(size=(args.classes, args.dim)).astype(np.float32)
    bank, yb = clustered(rng, args.bank, centres)
    queries, yq = clustered(rng, args.queries, centres)
    m, n, d, k = args.queries, args.bank, args.dim, args.k
    print(
        f"bank {n} x {d}, {m} queries, k={k}, {args.classes} classes, threads={args.threads}, faiss {faiss.__version__}"
    )

    peak = gemm_peak()
    print(f"fp32 GEMM peak (4096^3, best of 3): {peak / 1e9:.1f} GFLOP/s")

    weighted_knn(bank[:2000], yb[:2000], queries[:100], yq[:100], ((k, 0.07),), backend="faiss")  # warm-up
    t_faiss = t_torch = float("inf")
    for _ in range(args.repeats):  # interleaved, so a burst of load on the shared machine hits both
        t, res = best_of(1, lambda: weighted_knn(bank, yb, queries, yq, ((k, 0.07),), backend="faiss"))
        t_faiss = min(t_faiss, t)
        t, pred_torch = best_of(1, lambda: torch_knn(bank, yb, queries, k, 0.07, args.classes))
        t_torch = min(t_torch, t)

    def sk():  # n_jobs=1: its BLAS gets the same threads; joblib workers on top would oversubscribe
        return KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank, yb).predict(queries)

    t_sk, pred_sk = best_of(1, sk)
    key = f"knn@{k}"
    print(f"(faiss and torch: best of {args.repeats} interleaved runs; sklearn: one run)")
    print(f"faiss  weighted_knn       : {t_faiss:8.2f} s   top-1 {100 * res.top1[key]:.2f}%")
    print(f"torch  naive mm+topk      : {t_torch:8.2f} s   top-1 {100 * (pred_torch == yq).mean():.2f}%")
    print(f"sklearn KNeighbors cosine : {t_sk:8.2f} s   top-1 {100 * (pred_sk == yq).mean():.2f}% (uniform vote)")
    r_sk, r_torch = t_sk / t_faiss, t_torch / t_faiss
    print(f"speed-up faiss vs sklearn : {r_sk:6.2f}x  (need >= 3x)  {'PASS' if r_sk >= 3 else 'FAIL'}")
    print(f"speed-up faiss vs torch   : {r_torch:6.2f}x  (need > 1x)   {'PASS' if r_torch > 1 else 'FAIL'}")
    flops = 2 * m * n * d
    print(
        f"faiss weighted_knn: {flops / t_faiss / 1e9:.1f} GFLOP/s = {flops / t_faiss / peak:.1%} of the GEMM peak "
        f"(2*M*N*D / whole weighted_knn time)"
    )


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(args) -> None:
    rng = np.random.default_rng(0)
    d = 256
    centres = 0.28 * rng.normal(size=(args.classes, d)).astype(np.float32)
    queries, yq = clustered(rng, args.memory_queries, centres)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bank, yb = clustered(rng, 1_000_000, centres, dtype=np.float16)
    after_bank = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before_knn = current_rss()
    start = time.perf_counter()
    res = weighted_knn(bank, yb, queries, yq, backend="faiss")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mib = 2**20
    print(f"bank 1,000,000 x {d} fp16 = {bank.nbytes / mib:.0f} MiB; {len(queries)} queries; threads={args.threads}")
    print(f"baseline peak RSS before the bank : {base / mib:8.0f} MiB")
    print(f"peak RSS after building the bank  : {after_bank / mib:8.0f} MiB (+{(after_bank - base) / mib:.0f})")
    print(f"peak RSS after weighted_knn       : {peak / mib:8.0f} MiB (+{(peak - base) / mib:.0f} over baseline)")
    print(
        f"weighted_knn working memory       : {(peak - before_knn) / mib:8.0f} MiB above the RSS it started at "
        f"({before_knn / mib:.0f} MiB) = {(peak - before_knn) / bank.nbytes:.2f}x the bank"
    )
    ratio = (peak - base) / bank.nbytes
    print(f"peak above baseline / bank size   : {ratio:.2f}x  (need < 2x)  {'PASS' if ratio < 2 else 'FAIL'}")
    print(f"weighted_knn time {seconds:.1f} s; top-1 " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in res.top1.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true", help="1M x 256 fp16 bank: peak RSS instead of speed")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--bank", type=int, default=60_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--memory-queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs of faiss and torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        (memory if args.memory else speed)(args)


if __name__ == "__main__":
    main()
